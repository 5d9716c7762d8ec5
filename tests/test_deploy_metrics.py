"""Metrics without servers: the consumer-lag arithmetic (Apache Kafka semantics),
the producer collector, and Grafana dashboards / Prometheus rules against the metrics the code exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from infra.metrics import ProducerCollector, consumer_lag
from tests.deploy_helpers import REPO, exported_metric_names

DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
_METRIC = re.compile(r"\b(sqis_[a-z0-9_]+)")
# series every dashboard user needs; the reverse check: each is queried by some dashboard
KEY_METRICS = {
    "sqis_producer_frames_total", "sqis_worker_frames_total", "sqis_worker_latency_ms_bucket",
    "sqis_worker_stage_ms_bucket", "sqis_consumer_lag", "sqis_worker_dlq_total", "sqis_sink_inspections_total",
    "sqis_sink_write_ms_bucket", "sqis_model_info", "sqis_alerts_fired_total", "sqis_producer_spool_frames",
    "sqis_sink_retries_total", "sqis_sink_dlq_total", "sqis_frame_stage_ms_bucket", "sqis_end_to_end_ms_bucket",
}


# ---- consumer lag --------------------------------------------------------------------------------

def test_lag_is_high_watermark_minus_committed() -> None:
    lags = consumer_lag("g", {("f", 0): 90, ("f", 1): None, ("f", 2): 5, ("f", 3): -1001},
                        {("f", 0): (0, 100), ("f", 1): (10, 40), ("f", 2): (20, 30), ("f", 3): (0, 0)})
    assert [(p.partition, p.committed, p.lag) for p in lags] == [(0, 90, 10), (1, None, 30), (2, 5, 10), (3, None, 0)]


def test_lag_when_the_group_is_ahead_of_a_stale_watermark_is_zero() -> None:
    # a watermark read before the commit landed must never give a negative lag
    assert consumer_lag("g", {("f", 0): 120}, {("f", 0): (0, 100)})[0].lag == 0


@given(low=st.integers(0, 10**9), span=st.integers(0, 10**6), committed=st.one_of(st.none(), st.integers(-1, 2 * 10**9)))
def test_lag_properties(low: int, span: int, committed: int | None) -> None:
    high = low + span
    (p,) = consumer_lag("g", {("t", 0): committed}, {("t", 0): (low, high)})
    assert 0 <= p.lag <= span  # never negative, never more than what is retained
    if committed is not None and low <= committed <= high:
        assert p.lag == high - committed
    if committed is None or committed < 0:
        assert p.lag == span and p.committed is None


def test_producer_collector_exports_the_stats_snapshot() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    c = ProducerCollector("synthetic")
    reg.register(c)
    c.update({"captured": 7, "produced": 5, "dropped": 1, "spooled": 2, "spool": 3, "degraded": 1})
    text = generate_latest(reg).decode()
    assert 'sqis_producer_frames_total{outcome="produced",source="synthetic"} 5.0' in text
    assert 'sqis_producer_frames_total{outcome="dropped",source="synthetic"} 1.0' in text
    assert 'sqis_producer_spool_frames{source="synthetic"} 3.0' in text
    assert 'sqis_producer_degraded{source="synthetic"} 1.0' in text


# ---- dashboards and rules against the code ---------------------------------------------------------

def _exprs(dash: dict) -> list[str]:
    out = []
    for p in dash["panels"]:
        out += [t["expr"] for t in p.get("targets", [])]
        for sub in p.get("panels", []):
            out += [t["expr"] for t in sub.get("targets", [])]
    return out


def _queried(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _METRIC.findall(e)}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


def test_dashboards_exist_and_use_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert DASHBOARDS, "no dashboards"
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        titles = " | ".join(p["title"].lower() for p in dash["panels"])
        for needed in ("throughput", "latency percentiles", "lag per group", "dead letters by reason",
                       "defect rate per line", "alerts", "model version per worker"):
            assert needed in titles, f"{path.name}: no panel about {needed}"
        for p in dash["panels"]:
            assert p["datasource"]["uid"] == ds["uid"], p["title"]
            assert p["targets"], p["title"]


def test_every_metric_a_dashboard_queries_is_exported(exported: set[str]) -> None:
    for path in DASHBOARDS:
        missing = _queried(_exprs(json.loads(path.read_text()))) - exported
        assert not missing, f"{path.name} queries metrics no code exports: {sorted(missing)}"


def test_key_metrics_are_on_a_dashboard(exported: set[str]) -> None:
    queried = set().union(*(_queried(_exprs(json.loads(p.read_text()))) for p in DASHBOARDS))
    assert KEY_METRICS <= exported, sorted(KEY_METRICS - exported)
    assert KEY_METRICS <= queried, f"not on any dashboard: {sorted(KEY_METRICS - queried)}"


def test_the_check_would_catch_a_typo(exported: set[str]) -> None:
    assert _queried(["rate(sqis_worker_frame_total[1m])"]) - exported == {"sqis_worker_frame_total"}


def test_alert_rules_use_exported_metrics(exported: set[str]) -> None:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 5
    assert not _queried(exprs) - exported, sorted(_queried(exprs) - exported)


def test_prometheus_config_scrapes_every_long_running_service() -> None:
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    scraped = {n for j in prom["scrape_configs"] for sd in j.get("dns_sd_configs", []) for n in sd["names"]}
    long_running = {n for n, s in compose["services"].items()
                    if "sqis" in str(s.get("image", "")) and s.get("restart") != "no" and "entrypoint" not in s}
    assert long_running <= scraped, f"not scraped: {long_running - scraped}"
    assert all(sd["port"] == 9400 for j in prom["scrape_configs"] for sd in j.get("dns_sd_configs", []))
