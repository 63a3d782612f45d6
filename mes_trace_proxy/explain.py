"""``mes-trace-proxy explain``: what the proxy would record for a request, with no socket at all.

It runs the same pure steps as the handler — match, extract, redact, build attributes —
so a user can debug a rule file against a sample request before any traffic flows.
"""

from __future__ import annotations

from collections.abc import Sequence

from multidict import CIMultiDict

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.config import Config, ConfigError
from mes_trace_proxy.core.extract import NO_FACTS, is_json_content_type, request_facts, response_facts
from mes_trace_proxy.core.forwarding import check_host_headers, check_target
from mes_trace_proxy.core.redact import Redactor, pseudonymize, user_id_from_headers

__all__ = ["explain"]


def explain(
    config: Config,
    *,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
    response_body: bytes | None = None,
    listener: str | None = None,
) -> dict[str, object]:
    """Describe how the proxy would treat one request.

    Args:
        config: the effective configuration.
        method: the request method.
        target: the request target (path and query) as a client would send it.
        headers: request headers.
        body: the request body, if any.
        response_body: a sample response body, to show the observed status.
        listener: which listener's rules to use (default: the first).

    Returns:
        A JSON-ready report: rule, span name, attributes, and whether it would be refused.

    Raises:
        ConfigError: ``--listener`` names no listener.
    """
    chosen = config.listeners[0]
    if listener is not None:
        found = [lst for lst in config.listeners if lst.name == listener]
        if not found:
            names = ", ".join(lst.name for lst in config.listeners)
            raise ConfigError("--listener", f"no listener {listener!r}; have {names}")
        chosen = found[0]
    rejection = check_target(method, target) or check_host_headers(headers)
    if rejection is not None:
        return {
            "listener": chosen.name,
            "refused": {"status": rejection.status, "type": rejection.problem_type, "title": rejection.title},
        }
    path, _, query = target.partition("?")
    lookup = CIMultiDict(headers)
    match = chosen.rules.match(method, path)
    inspected = body
    if (
        match is None
        or not match.rule.needs_request_body
        or not is_json_content_type(lookup.get("Content-Type"))
        or (body is not None and len(body) > chosen.inspect_body_limit)
    ):
        inspected = None
    facts = request_facts(match, raw_query=query, headers=lookup, body=inspected) if match else NO_FACTS
    if match is not None and response_body is not None:
        facts = response_facts(
            match,
            facts,
            raw_query=query,
            request_headers=lookup,
            response_headers=CIMultiDict({"Content-Type": "application/json"}),
            response_body=response_body,
        )
    redactor = Redactor(config.privacy.policy())
    user = None
    if config.privacy.user_id_key is not None:
        user_id = user_id_from_headers(lookup, header_name=config.privacy.user_id_header)
        user = pseudonymize(config.privacy.user_id_key, user_id) if user_id else None
    route = match.rule.route if match is not None else None
    attrs = A.request_attributes(
        method=method,
        path=path,
        query=query,
        route=route,
        rule_name=match.rule.name if match is not None else None,
        listener=chosen.name,
        facts=facts,
        redactor=redactor,
        user_pseudonym=user,
    )
    if facts.observed_status is not None:
        attrs[A.MES_ORDER_STATUS_OBSERVED] = redactor.value(facts.observed_status)
    report: dict[str, object] = {
        "listener": chosen.name,
        "upstream": chosen.upstream.url,
        "rule": match.rule.name if match is not None else None,
        "route": route,
        "span_name": A.span_name(method, route),
        "body_inspected": inspected is not None,
        "attributes": dict(sorted(attrs.items())),
    }
    if match is not None and match.rule.sample is not None:
        report["sample"] = match.rule.sample
    if facts.status is not None:
        report["event"] = {
            "name": A.EVENT_STATUS_CHANGE,
            "attributes": {A.MES_ORDER_STATUS: attrs[A.MES_ORDER_STATUS]},
        }
    return report
