"""``mes-trace-proxy explain``: what the proxy would record for a request, with no socket at all.

It runs the handler's own pure steps (``exchange.py``) — refuse, match, the body-inspection
rule, extract, the user-id pseudonym, the SERVER span's attributes — so a user can debug a rule
file against a sample request before any traffic flows, and the report cannot drift from what
the proxy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from multidict import CIMultiDict

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.config import Config, ConfigError, ListenerConfig
from mes_trace_proxy.core.exchange import BodyReading, body_reading, refusal, span_attributes, user_pseudonym
from mes_trace_proxy.core.extract import NO_FACTS, OrderFacts, request_facts, response_facts
from mes_trace_proxy.core.framing import UnderscorePolicy
from mes_trace_proxy.core.redact import Redactor
from mes_trace_proxy.core.rules import RouteMatch

__all__ = ["explain"]

_JSON: Final = "application/json"
#: What a user can do about a body the proxy would not read, by reason.
_FIXES: Final = {
    BodyReading.NOT_JSON: f"pass -H 'Content-Type: {_JSON}', or name the --body file *.json",
    BodyReading.TOO_LARGE: "raise inspect_body_limit above the body's size, or send a smaller body",
    BodyReading.RULE_IGNORES_BODY: "nothing to fix: the rule reads the path, query or headers",
    BodyReading.NO_RULE: "add a rule for this method and path to the rules file",
}


def explain(
    config: Config,
    *,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
    response_body: bytes | None = None,
    listener: str | None = None,
    body_file: str | None = None,
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
        body_file: the name of the file ``body`` was read from: one ending in ``.json`` sent
            without a ``Content-Type`` is taken as JSON, and the report says so.

    Returns:
        A JSON-ready report: rule, span name, attributes, whether the body is inspected (and
        if not, why and what to do), and whether the request would be refused.

    Raises:
        ConfigError: ``--listener`` names no listener.
    """
    chosen = _listener(config, listener)
    lookup = CIMultiDict(headers)
    assumed = _assume_json(lookup, body, body_file)
    refused = _refused(chosen, method, target, headers, body)
    if refused is not None:
        return refused
    path, _, query = target.partition("?")
    match = chosen.rules.match(method, path)
    reading = body_reading(
        match,
        has_body=body is not None,
        content_type=lookup.get("Content-Type"),
        content_length=None if body is None else len(body),
        limit=chosen.inspect_body_limit,
    )
    inspected = body if reading.inspected else None
    facts = _facts(match, query, lookup, inspected, response_body)
    redactor = Redactor(config.privacy.policy())
    attrs = span_attributes(
        method=method,
        path=path,
        query=query,
        match=match,
        listener=chosen.name,
        facts=facts,
        redactor=redactor,
        user=user_pseudonym(config.privacy.user_id_key, config.privacy.user_id_header, lookup),
    )
    if facts.observed_status is not None:
        attrs[A.MES_ORDER_STATUS_OBSERVED] = redactor.value(facts.observed_status)
    route = match.rule.route if match is not None else None
    report: dict[str, object] = {
        "listener": chosen.name,
        "upstream": chosen.upstream.url,
        "rule": match.rule.name if match is not None else None,
        "route": route,
        "span_name": A.span_name(method, route),
        **_body_report(reading, body, inspected, assumed),
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


def _body_report(
    reading: BodyReading, body: bytes | None, inspected: bytes | None, assumed: str | None
) -> dict[str, object]:
    """Whether the body is inspected; what was assumed; if a body is not read, why and what to do."""
    report: dict[str, object] = {"body_inspected": inspected is not None}
    if assumed is not None:
        report["assumed"] = assumed
    if body is not None and inspected is None:
        report["body_not_inspected"] = {"reason": reading.value, "fix": _FIXES.get(reading, "")}
    return report


def _refused(
    chosen: ListenerConfig, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes | None
) -> dict[str, object] | None:
    """The report of a request the handler would refuse (``exchange.refusal``), or ``None``."""
    rejection = refusal(
        method,
        target,
        headers,
        [value for _, value in headers],
        chunked=any(name.lower() == "transfer-encoding" for name, _ in headers),
        underscore=UnderscorePolicy(
            lookalikes=chosen.underscore_lookalikes, others=chosen.underscore_headers
        ),
        content_length=None if body is None else len(body),
        max_body_size=chosen.limits.max_body_size,
    )
    if rejection is None:
        return None
    return {
        "listener": chosen.name,
        "refused": {"status": rejection.status, "type": rejection.problem_type, "title": rejection.title},
    }


def _assume_json(lookup: CIMultiDict[str], body: bytes | None, body_file: str | None) -> str | None:
    """A ``--body`` file named ``*.json`` sent without a ``Content-Type`` is JSON: set it, say so."""
    if (
        body is None
        or body_file is None
        or not body_file.lower().endswith(".json")
        or "Content-Type" in lookup
    ):
        return None
    lookup["Content-Type"] = _JSON
    return f"Content-Type: {_JSON} (the --body file's name ends in .json)"


def _facts(
    match: RouteMatch | None,
    query: str,
    lookup: CIMultiDict[str],
    inspected: bytes | None,
    response_body: bytes | None,
) -> OrderFacts:
    """What the request says, and, given a sample answer, what MES would have said back."""
    if match is None:
        return NO_FACTS
    facts = request_facts(match, raw_query=query, headers=lookup, body=inspected)
    if response_body is None:
        return facts
    return response_facts(
        match,
        facts,
        raw_query=query,
        request_headers=lookup,
        response_headers=CIMultiDict({"Content-Type": _JSON}),
        response_body=response_body,
    )


def _listener(config: Config, name: str | None) -> ListenerConfig:
    """The listener ``--listener`` names, or the first."""
    if name is None:
        return config.listeners[0]
    for candidate in config.listeners:
        if candidate.name == name:
            return candidate
    names = ", ".join(lst.name for lst in config.listeners)
    raise ConfigError("--listener", f"no listener {name!r}; have {names}")
