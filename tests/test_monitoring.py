"""k8s/monitoring: the alert rules and the Grafana dashboard, checked offline.

Every PromQL expression must name metrics the proxy really exports; promtool (Debian package
``prometheus``) checks the rules and runs unit tests of the alerts against synthetic series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from mes_trace_proxy.messages.service import METRIC_FAMILIES
from mes_trace_proxy.telemetry.metrics import ProxyMetrics
from mes_trace_proxy.telemetry.tracing import ExportStats

REPO: Final = Path(__file__).resolve().parents[1]
MONITORING: Final = REPO / "k8s" / "monitoring"
RULES: Final = MONITORING / "alert-rules.yaml"
DASHBOARD: Final = MONITORING / "mes-trace-proxy-dashboard.json"
WATCHDOG_DOC: Final = REPO / "docs" / "watchdog.md"
# promtool checks a file in well under a second; the bound only stops a hung binary.
PROMTOOL_TIMEOUT_S: Final = 60
METRIC_NAME: Final = re.compile(r"\b(mes_[a-z0-9_]+)\b")
_SUFFIXES: Final = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported_names() -> frozenset[str]:
    """Every series name the proxy's registry can expose, with every scrape-time source bound."""
    metrics = ProxyMetrics(known_statuses=("SUBMITTED",))
    metrics.bind(
        export_stats=ExportStats,
        order_counts=dict,
        stuck_counts=dict,
        store_stats=dict,
    )
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(f"{family.name}{suffix}" for suffix in _SUFFIXES.get(family.type, ("",)))
    # The message path's collector, registered when --amqp-url is set (messages/service.py).
    for name, kind in METRIC_FAMILIES.items():
        names.update(f"{name}{suffix}" for suffix in _SUFFIXES[kind])
    return frozenset(names)


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def _panel_exprs() -> Iterator[tuple[str, str]]:
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; CI must check the alert rules: apt-get install prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return binary


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False
    )


# ── structure ────────────────────────────────────────────────────────────────────────────────


def test_every_expression_names_an_exported_metric() -> None:
    """Each mes_* name in the rules and the dashboard is a series metrics.py exports."""
    exported = _exported_names()
    used = {("rule " + r["alert"], name) for r in _rules() for name in METRIC_NAME.findall(r["expr"])}
    used |= {(title, name) for title, expr in _panel_exprs() for name in METRIC_NAME.findall(expr)}
    assert {name for _, name in used} >= {"mes_orders_stuck", "mes_order_anomalies_total"}
    assert sorted(where for where, name in used if name not in exported) == []


def test_alerts_cover_stuck_orders_per_status_and_rising_anomalies() -> None:
    """The stuck alert keeps the status label; the anomaly alert compares a recent rate with a baseline."""
    rules = {rule["alert"]: rule for rule in _rules()}
    assert "by (namespace, status) (mes_orders_stuck)" in rules["MesOrderStuck"]["expr"]
    anomalies = rules["MesOrderAnomaliesRising"]["expr"]
    assert "rate(mes_order_anomalies_total[15m])" in anomalies
    assert "rate(mes_order_anomalies_total[1d])" in anomalies


def test_every_alert_has_severity_summary_and_a_runbook_that_exists() -> None:
    """Each alert says how bad it is, what happened, and links a section of docs/watchdog.md that exists."""
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in WATCHDOG_DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (REPO / path).resolve() == WATCHDOG_DOC
        assert anchor in anchors, rule["alert"]


def test_dashboard_is_grafana_json_with_placed_panels() -> None:
    """The dashboard parses, has a stable uid, unique panel ids, and every panel fits the 24-column grid."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "mes-trace-proxy"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    titles = {panel["title"] for panel in panels}
    assert {"Stuck orders by status", "Anomalies per minute by kind", "State store"} <= titles


# ── promtool ─────────────────────────────────────────────────────────────────────────────────


def test_promtool_accepts_the_rules() -> None:
    """promtool check rules parses every expression and template of the rules file."""
    result = _run(_promtool(), "check", "rules", str(RULES), cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's PromQL parses (checked as recording rules by promtool)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, (_, expr) in enumerate(_panel_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = _run(_promtool(), "check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


RUNBOOK: Final = "docs/watchdog.md#when-an-alert-fires"


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One promtool input series in namespace "mes"."""
    pairs = ",".join(f'{key}="{value}"' for key, value in {"namespace": "mes", **labels}.items())
    return {"series": f"{name}{{{pairs}}}", "values": values}


def _alert(labels: dict[str, str], summary: str, description: str) -> dict[str, object]:
    """One expected alert: severity warning in namespace "mes", with its annotations."""
    return {
        "exp_labels": {"severity": "warning", "namespace": "mes", **labels},
        "exp_annotations": {"summary": summary, "description": description, "runbook": RUNBOOK},
    }


# Unit tests for the alerts (promtool test rules): synthetic series, the alerts expected at
# chosen times. Series notation: "a+bxN" is a, then N more samples each b larger.
ALERT_TESTS: Final = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "name": "one order stuck in SUBMITTED",
            "interval": "1m",
            "input_series": [
                _series("mes_orders_stuck", "0 0 1 1 1 1", status="SUBMITTED", pod="p1"),
                _series("mes_orders_stuck", "0 0 1 1 1 1", status="SUBMITTED", pod="p2"),
                _series("mes_orders_stuck", "0x5", status="PACKAGING", pod="p1"),
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "MesOrderStuck", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "MesOrderStuck",
                    # Two replicas sharing Redis report the same order: one alert, value 1.
                    "exp_alerts": [
                        _alert(
                            {"status": "SUBMITTED"},
                            "1 order(s) stuck in SUBMITTED",
                            "1 order(s) stayed in SUBMITTED longer than its dwell limit. Open the "
                            "proxy's admin page (port 9901, /) for the list, each order's timeline "
                            "and its spans in Jaeger; /orders/-/stuck has the same as JSON.",
                        )
                    ],
                },
                {"eval_time": "4m", "alertname": "MesOrdersStuckPilingUp", "exp_alerts": []},
            ],
        },
        {
            "name": "anomalies jump above the day's rate",
            "interval": "1m",
            # A steady 1 per 10 minutes for a day, then 2 a minute for 20 minutes.
            "input_series": [
                _series("mes_order_anomalies_total", "0+0.1x1440 144+2x20", kind="skip", pod="p1"),
                _series("mes_order_anomalies_total", "0+0.1x1460", kind="backward", pod="p1"),
            ],
            "alert_rule_test": [
                {"eval_time": "1440m", "alertname": "MesOrderAnomaliesRising", "exp_alerts": []},
                {
                    "eval_time": "1460m",
                    "alertname": "MesOrderAnomaliesRising",
                    "exp_alerts": [
                        _alert(
                            {"kind": "skip"},
                            "Order lifecycle anomalies (skip) are rising",
                            "The rate of skip anomalies in the last 15 minutes is more than twice the "
                            "day's average. Search Jaeger for spans with the tag mes.order.anomaly=skip.",
                        )
                    ],
                },
            ],
        },
        {
            "name": "state store failing",
            "interval": "1m",
            "input_series": [
                _series("mes_state_store_errors_total", "0 0 0+3x30", pod="p1"),
                _series("mes_state_store_errors_total", "0x32", pod="p2"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "MesStateStoreFailing", "exp_alerts": []},
                {
                    "eval_time": "25m",
                    "alertname": "MesStateStoreFailing",
                    "exp_alerts": [
                        _alert(
                            {"pod": "p1"},
                            "mes-trace-proxy cannot write its order state",
                            "The state store (SQLite file or Redis) has been failing for 10 minutes; "
                            "requests still pass, order state is kept in memory and written once the "
                            'store is back. p1 logs "state store write failed" with the cause.',
                        )
                    ],
                },
            ],
        },
        {
            "name": "dead letters arrive from one queue; a watcher stays away from the broker",
            "interval": "1m",
            "input_series": [
                # Two replicas, competing consumers: 1 + 1 dead letters in the window.
                _series(
                    "mes_messages_dead_lettered_total",
                    "0 0 1 1 1",
                    queue="mes.price.requests",
                    reason="expired",
                    pod="p1",
                ),
                _series(
                    "mes_messages_dead_lettered_total",
                    "0 0 1 1 1",
                    queue="mes.price.requests",
                    reason="expired",
                    pod="p2",
                ),
                _series("mes_messages_broker_connected", "1 0x14", pod="p1"),
                _series("mes_messages_broker_connected", "1x15", pod="p2"),
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "MesDeadLettersArriving", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "MesDeadLettersArriving",
                    "exp_alerts": [
                        _alert(
                            {"queue": "mes.price.requests", "reason": "expired"},
                            "Messages dead-lettered from mes.price.requests (expired)",
                            "RabbitMQ gave up on 2 message(s) from mes.price.requests in the last 10 "
                            'minutes (expired). The admin page\'s "Dead letters" section lists the orders '
                            "with the cause; fix the consumer, then re-drive them there or with POST "
                            "/orders/{id}/redrive.",
                        )
                    ],
                },
                {"eval_time": "5m", "alertname": "MesDeadLetterWatcherDisconnected", "exp_alerts": []},
                {
                    "eval_time": "12m",
                    "alertname": "MesDeadLetterWatcherDisconnected",
                    "exp_alerts": [
                        _alert(
                            {"pod": "p1"},
                            "mes-trace-proxy cannot reach RabbitMQ",
                            "p1 has not been connected to RabbitMQ for 10 minutes; dead letters wait on "
                            'the broker (nothing is lost) and are not shown. Its log says why ("cannot '
                            'connect", "does not exist", "access refused").',
                        )
                    ],
                },
            ],
        },
    ],
}


def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    """The alerts fire on the series they are for, with their labels and text, and stay quiet otherwise."""
    promtool = _promtool()
    shutil.copy(RULES, tmp_path / RULES.name)
    tests = dict(ALERT_TESTS, rule_files=[RULES.name])
    (tmp_path / "alert-tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    result = _run(promtool, "test", "rules", "alert-tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
