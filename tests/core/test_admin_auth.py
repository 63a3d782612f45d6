"""Admin access: the token parser and verdicts, then bearer tokens and roles on the real admin listener."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from mes_trace_proxy.admin.app import ROUTE_ROLES
from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.admin_auth import (
    ANSWERS,
    Role,
    TokenError,
    TokenTable,
    Verdict,
    WarningGate,
    authorize,
    parse_tokens,
)
from mes_trace_proxy.core.config import load_config
from mes_trace_proxy.server import RunningProxy
from tests.conftest import StartProxy
from tests.upstream import RecordingUpstream

VIEWER = "viewer-token-0123456789abcdef"
ADMIN = "admin-token-fedcba9876543210"
TOKENS_TEXT = f"# the admin API's tokens\nviewer:{VIEWER}\n\nadmin:{ADMIN}\n"
TABLE = parse_tokens(TOKENS_TEXT)


# ── the pure core ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("root:" + "x" * 20, "line 1"),
        ("viewer " + "x" * 20, "line 1"),
        ("# c\nviewer:short", "line 2"),
        ("viewer:" + "x" * 20 + "\nadmin:" + "x" * 20, "line 2"),
        ("viewer:" + "x" * 19 + " y", "line 1"),
        ("", "no ROLE:TOKEN"),
        ("# only comments\n\n", "no ROLE:TOKEN"),
    ],
    ids=["unknown-role", "no-colon", "short", "duplicate", "space-inside", "empty", "comments-only"],
)
def test_bad_token_files_name_the_line_never_the_token(text: str, line: str) -> None:
    """Each malformed file fails naming its line (or saying it is empty), and the message holds no token."""
    with pytest.raises(TokenError) as info:
        parse_tokens(text)
    assert line in str(info.value)
    assert "xxxx" not in str(info.value)


GENERATE = "generate one with `openssl rand -hex 32`"
# The placeholders k8s/base/mes-trace-proxy-admin-tokens.yaml ships, and ways to copy them.
PLACEHOLDERS = (
    "CHANGEME-viewer-0000000000000000",
    "changeme-0123456789abcdef0123",
    "0123456789abcdef-ChangeMe-0123",
    "CHANGEME",
)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        *(
            (f"viewer:{token}", "line 1", "the viewer token is a published placeholder")
            for token in PLACEHOLDERS
        ),
        (
            f"# c\nviewer:{VIEWER}\nadmin:{PLACEHOLDERS[0]}x",
            "line 3",
            "the admin token is a published placeholder",
        ),
        ("viewer:short", "line 1", "shorter than 16 characters"),
        ("admin:" + "a1" * 7 + "b", "line 1", "shorter than 16 characters"),
    ],
    ids=["shipped", "lower-case", "mixed-case-inside", "bare", "second-role", "short", "fifteen"],
)
def test_placeholder_and_short_tokens_are_refused_with_the_cure(text: str, line: str, reason: str) -> None:
    """A token holding CHANGEME (any case) or under 16 characters is refused: the line, why, and
    how to make a real one; never the token itself."""
    with pytest.raises(TokenError) as info:
        parse_tokens(text)
    message = str(info.value)
    assert message.startswith(f"{line}: ")
    assert reason in message
    assert message.endswith(GENERATE)
    assert not any(token in message for token in (*PLACEHOLDERS[:3], VIEWER, "a1a1a1"))


def test_sixteen_characters_and_lookalikes_are_accepted() -> None:
    """The boundary: exactly 16 characters is enough, and 'change' without 'me' is no placeholder."""
    table = parse_tokens("viewer:" + "a1" * 8 + "\nadmin:change-the-world-0123456\n")
    assert {role for _, role in table.entries} == {Role.VIEWER, Role.ADMIN}


def test_token_table_hides_its_tokens() -> None:
    """The table keeps digests only; its repr says how many tokens, not which."""
    assert repr(TABLE) == "TokenTable(2 tokens)"
    assert VIEWER.encode() not in repr(TABLE.entries).encode()
    assert {role for _, role in TABLE.entries} == {Role.VIEWER, Role.ADMIN}


@pytest.mark.parametrize(
    ("authorization", "required", "verdict"),
    [
        (None, None, Verdict.ALLOWED),
        (None, Role.VIEWER, Verdict.MISSING),
        ("Basic dXNlcjpwYXNz", Role.VIEWER, Verdict.MISSING),
        ("Bearer", Role.VIEWER, Verdict.INVALID),
        ("Bearer wrong-token-0123456789", Role.VIEWER, Verdict.INVALID),
        (f"Bearer {VIEWER[:-1]}", Role.VIEWER, Verdict.INVALID),
        ("Bearer " + "y" * 5000, Role.VIEWER, Verdict.INVALID),
        (f"Bearer {VIEWER}", Role.VIEWER, Verdict.ALLOWED),
        (f"bearer  {VIEWER} ", Role.VIEWER, Verdict.ALLOWED),
        (f"Bearer {VIEWER}", Role.ADMIN, Verdict.FORBIDDEN),
        (f"Bearer {ADMIN}", Role.ADMIN, Verdict.ALLOWED),
        (f"Bearer {ADMIN}", Role.VIEWER, Verdict.ALLOWED),
    ],
    ids=[
        "open-route",
        "no-header",
        "other-scheme",
        "empty-token",
        "unknown",
        "prefix",
        "oversized",
        "viewer",
        "scheme-case-and-spaces",
        "viewer-on-admin-route",
        "admin",
        "admin-includes-viewer",
    ],
)
def test_authorize_table(authorization: str | None, required: Role | None, verdict: Verdict) -> None:
    """Each header and required role yields its verdict (RFC 6750: scheme case-insensitive)."""
    assert authorize(TABLE, authorization, required) is verdict


def test_no_tokens_means_no_access_control() -> None:
    """Without a tokens file (loopback default) every route is open."""
    assert authorize(TokenTable(), None, Role.ADMIN) is Verdict.ALLOWED


def test_every_refusal_has_an_rfc6750_answer() -> None:
    """401 carries a Bearer challenge (invalid_token when a token was sent), 403 insufficient_scope."""
    assert set(ANSWERS) == set(Verdict) - {Verdict.ALLOWED}
    assert ANSWERS[Verdict.MISSING].status == ANSWERS[Verdict.INVALID].status == 401
    assert ANSWERS[Verdict.FORBIDDEN].status == 403
    for answer in ANSWERS.values():
        assert (answer.www_authenticate or "").startswith("Bearer ")
    assert 'error="invalid_token"' in (ANSWERS[Verdict.INVALID].www_authenticate or "")
    assert 'error="insufficient_scope"' in (ANSWERS[Verdict.FORBIDDEN].www_authenticate or "")


def test_probes_are_the_only_open_routes() -> None:
    """Only /healthz and /readyz need no token; the purge and the config dump need admin."""
    assert {route for route, role in ROUTE_ROLES.items() if role is None} == {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    }
    assert ROUTE_ROLES[("GET", "/config")] is Role.ADMIN
    assert ROUTE_ROLES[("POST", "/orders/purge")] is Role.ADMIN


# ── the admin listener ─────────────────────────────────────────────────────────────────────

StartGuarded = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def guarded(
    tmp_path: Path,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    default_rules: dict[str, object],
) -> StartGuarded:
    """A factory: a proxy whose admin listener reads a tokens file (its path is ``tmp_path/tokens``)."""
    base, _ = recording_upstream
    tokens = tmp_path / "tokens"

    async def start(text: str = TOKENS_TEXT) -> RunningProxy:
        tokens.write_text(text)
        config = load_config(
            flags={
                "upstream": base,
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "state": "memory",
                "admin_token_file": str(tokens),
            },
            environ={},
            file_doc=None,
            defaults=default_rules,
            read_file=lambda path: Path(path).read_bytes(),
        )
        return await start_proxy(config)

    return start


async def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, client.request(method, url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_probes_answer_without_a_token(guarded: StartGuarded) -> None:
    """/healthz and /readyz stay open for Kubernetes even when tokens are required."""
    proxy = await guarded()
    assert (await _get(f"{proxy.admin_url}/healthz"))[0] == 200
    assert (await _get(f"{proxy.admin_url}/readyz"))[0] == 200


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/metrics", None, 401),
        ("/metrics", "not-a-token-0123456789", 401),
        ("/metrics", VIEWER, 200),
        ("/metrics", ADMIN, 200),
        ("/config", VIEWER, 403),
        ("/config", ADMIN, 200),
        ("/no/such/page", None, 401),
        ("/no/such/page", VIEWER, 404),
    ],
    ids=[
        "metrics-anonymous",
        "metrics-bad-token",
        "metrics-viewer",
        "metrics-admin",
        "config-viewer",
        "config-admin",
        "unknown-anonymous",
        "unknown-viewer",
    ],
)
async def test_routes_need_their_role(
    guarded: StartGuarded, path: str, token: str | None, status: int
) -> None:
    """Every route but the probes needs a token of its role: 401 without, 403 with too low a role."""
    proxy = await guarded()
    got, headers, body = await _get(f"{proxy.admin_url}{path}", token)
    assert got == status
    if status in (401, 403):
        assert headers["Content-Type"].startswith("application/problem+json")
        assert headers["WWW-Authenticate"].startswith("Bearer ")
        assert VIEWER not in body
        assert ADMIN not in body


async def test_config_dump_masks_every_secret(
    tmp_path: Path,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    default_rules: dict[str, object],
) -> None:
    """GET /config (admin) shows the effective config but no token, user-id key, URL password or
    query token."""
    base, _ = recording_upstream
    (tmp_path / "tokens").write_text(TOKENS_TEXT)
    user_key = "user-id-key-canary-0123456789"
    config = load_config(
        flags={
            "upstream": base,
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "state": "memory",
            "admin_token_file": str(tmp_path / "tokens"),
            "jaeger_url": "http://jaeger:pa55word-canary@jaeger:16686/?token=t0ken-canary&lang=en",
        },
        environ={"MES_PROXY_USER_ID_KEY": user_key},
        file_doc=None,
        defaults=default_rules,
        read_file=lambda path: Path(path).read_bytes(),
    )
    proxy = await start_proxy(config)
    status, _, body = await _get(f"{proxy.admin_url}/config", ADMIN)
    assert status == 200
    for secret in (VIEWER, ADMIN, user_key, "pa55word-canary", "t0ken-canary"):
        assert secret not in body
    assert "http://jaeger:***@jaeger:16686/?token=***&lang=en" in body
    assert '"tokens": 2' in body or '"tokens":2' in body


async def test_tokens_reload_and_a_bad_file_keeps_the_old_ones(
    tmp_path: Path, guarded: StartGuarded, caplog: pytest.LogCaptureFixture
) -> None:
    """Reload (SIGHUP) reads the tokens file again; a broken file is logged and the old tokens stay."""
    proxy = await guarded()
    new_admin = "rotated-admin-token-0123456789"
    (tmp_path / "tokens").write_text(f"admin:{new_admin}\n")
    proxy.reload()
    assert (await _get(f"{proxy.admin_url}/config", ADMIN))[0] == 401
    assert (await _get(f"{proxy.admin_url}/config", new_admin))[0] == 200
    (tmp_path / "tokens").write_text(f"superuser:{new_admin}-x\n")
    with caplog.at_level(logging.ERROR, logger="mes_trace_proxy.admin"):
        proxy.reload()
    assert (await _get(f"{proxy.admin_url}/config", new_admin))[0] == 200
    logged = " ".join(str(vars(record)) for record in caplog.records)
    assert "line 1" in logged
    assert new_admin not in logged
    # A rotation that forgot to fill in the template: refused like at start-up, the old token stays.
    caplog.clear()
    (tmp_path / "tokens").write_text("admin:CHANGEME-admin-00000000000000000\n")
    with caplog.at_level(logging.ERROR, logger="mes_trace_proxy.admin"):
        proxy.reload()
    assert (await _get(f"{proxy.admin_url}/config", new_admin))[0] == 200
    assert (await _get(f"{proxy.admin_url}/config", "CHANGEME-admin-00000000000000000"))[0] == 401
    logged = " ".join(str(vars(record)) for record in caplog.records)
    assert "the admin token is a published placeholder" in logged
    assert GENERATE in logged


async def test_unknown_tokens_are_logged_without_the_token(
    guarded: StartGuarded, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong token is worth a warning for the operator; the warning never holds what was sent."""
    proxy = await guarded()
    sent = "guessed-token-0123456789-canary"
    with caplog.at_level(logging.WARNING, logger="mes_trace_proxy.admin"):
        assert (await _get(f"{proxy.admin_url}/metrics", sent))[0] == 401
    assert any(record.name == "mes_trace_proxy.admin" for record in caplog.records)
    assert sent not in " ".join(str(vars(record)) for record in caplog.records)


def test_tokens_file_errors_name_the_key(tmp_path: Path) -> None:
    """A missing or malformed tokens file stops start-up naming the flag that gave it."""
    from mes_trace_proxy.core.config import ConfigError

    def load(path: str) -> None:
        load_config(
            flags={"upstream": "http://mes:1", "admin_token_file": path},
            environ={},
            file_doc=None,
            defaults=read_default_rules(),
            read_file=lambda p: Path(p).read_bytes(),
        )

    with pytest.raises(ConfigError) as missing:
        load(str(tmp_path / "absent"))
    assert missing.value.key == "--admin-token-file"
    (tmp_path / "bad").write_text("owner:" + "t" * 20 + "\n")
    with pytest.raises(ConfigError) as bad:
        load(str(tmp_path / "bad"))
    assert bad.value.key == "--admin-token-file"
    assert "line 1" in bad.value.message
    assert "tttt" not in str(bad.value)
    (tmp_path / "placeholder").write_text("viewer:CHANGEME-viewer-0000000000000000\n")
    with pytest.raises(ConfigError) as placeholder:
        load(str(tmp_path / "placeholder"))
    assert str(placeholder.value) == (
        f"--admin-token-file: {tmp_path / 'placeholder'}: line 1: the viewer token is a published"
        f" placeholder (CHANGEME): {GENERATE}"
    )


def test_the_warning_gate_lets_one_through_a_period_and_counts_the_rest() -> None:
    """One warning per interval; the next one let through says how many were held back."""
    gate = WarningGate(60.0)
    seen = [gate.allow(t) for t in (0.0, 1.0, 2.0, 59.9, 60.0, 61.0, 200.0)]
    assert seen == [0, None, None, None, 3, None, 1]
