"""deploy/'s Prometheus rules and Grafana dashboard: promtool checks them, the
alerts fire on the series that should raise them, and every metric they name is
one the service exports (or is listed as pending, see PENDING_METRICS)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from stock.app.wiring import create_app
from stock.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stock.json"
# Named by the rules and the dashboard before the service exports it.
PENDING_METRICS: set[str] = set()
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def promtool(*args: str, cwd: Path = ROOT) -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool missing: `make test-tools` (apt-get install prometheus)"
    done = subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in out


def test_alerts_fire_on_the_series_that_should_raise_them() -> None:
    promtool("test", "rules", "alerts.test.yml", cwd=ALERTS.parent)


def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # as compose mounts it
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    promtool("check", "config", str(local))


def expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return exprs


def named_metrics() -> set[str]:
    return {name for expr in expressions() for name in re.findall(r"\bstock_[a-z0-9_]+", expr)}


@pytest.fixture
async def exported(settings: Settings) -> AsyncIterator[set[str]]:
    # with a payment URL (nothing is due, so nothing is asked) for the probe's metrics
    config = replace(settings, admin_token="t", payment_status_url="http://127.0.0.1:9/{order_id}")
    app = create_app(config, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        text = await (await client.get("/metrics")).text()
    yield {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES
    }


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_rules_and_dashboard_name_real_metrics(exported: set[str]) -> None:
    named = named_metrics()
    assert {
        "stock_writer_flush_lag_seconds",
        "stock_expiry_lag_seconds",
        "stock_reconcile_drifting_skus",
        "stock_oversell_skus",
        "stock_writer_buckets_held",
    } <= named
    assert named - exported == PENDING_METRICS, "a rule or panel names an unknown metric"
    assert not PENDING_METRICS & exported, "now exported: take it off PENDING_METRICS"


def test_alerts_cover_the_issue_list() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for alert, metric in {
        "StockFlushLagHigh": "stock_writer_flush_lag_seconds",
        "StockExpiryLagHigh": "stock_expiry_lag_seconds",
        "StockReconcileDrift": "stock_reconcile_drifting_skus",
        "StockOversell": "stock_oversell_skus",
        "StockWriterBucketsUnheld": "stock_writer_buckets_held",
        "StockWebhookDeliveriesFailed": "stock_webhook_deliveries_failed_total",
        "StockPaymentProbeErrors": "stock_payment_probe_total",
        "StockPaymentGraceExhausted": "stock_payment_probe_total",
    }.items():
        assert metric in by_name[alert]["expr"], alert
        pending = by_name[alert]["labels"].get("pending_metric") == "true"
        assert pending == (metric in PENDING_METRICS), f"{alert}: pending_metric label"


def test_dashboard_and_compose_wiring() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = [
        v.split(":")[0] for name in ("prometheus", "grafana") for v in services[name]["volumes"]
    ]
    for mount in mounts:
        assert (ROOT / mount).exists(), mount
    assert any(m.endswith("alerts.yml") for m in mounts)
    assert any(m.endswith("dashboards") for m in mounts)
    assert datasource["url"] == "http://prometheus:9090"
