"""Debian's prometheus, run with the project's deploy/prometheus/prometheus.yml (each job's targets
rewritten to this test's 127.0.0.1 ports, the alert rules loaded as they are), scraping a running
local pipeline: `sqis produce`, `sqis worker`, `sqis sink postgres` and `sqis metrics exporter` as
subprocesses. Checked through Prometheus' HTTP API: every target up, the key series have samples.

Prometheus is installed by `make sysdeps` (apt); without it the test is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.stack import free_port
from sqis.bench.harness import settings_env
from tests.deploy_helpers import REPO, clean_env, sqis_cmd

PROM_DIR = REPO / "deploy" / "prometheus"
JOBS = ("sqis-producer", "sqis-worker", "sqis-sink-postgres", "sqis-lag-exporter")
# series that must have samples once frames flow (name -> PromQL)
KEY_SERIES = {
    "produced": 'sqis_producer_frames_total{outcome="produced"} > 0',
    "inspected": 'sqis_worker_frames_total{outcome="inspected"} > 0',
    "latency": "sqis_worker_latency_ms_count > 0",
    "stage": 'sqis_worker_stage_ms_count{stage="infer"} > 0',
    "model_info": "sqis_model_info",
    "persisted": "sqis_sink_inspections_total > 0",
    "sink_write": 'sqis_sink_write_ms_count{sink="postgres"} > 0',
    "frame_stages": 'sqis_frame_stage_ms_count{stage="decode"} > 0',
    "end_to_end": 'sqis_end_to_end_ms_count{sink="postgres"} > 0',
    "lag": 'sqis_consumer_lag{group=~"w-.*|s-.*"}',
    # each consumer process exports the lag of its own group too
    "worker_lag": 'sqis_consumer_lag{job="sqis-worker",group=~"w-.*"}',
    "sink_lag": 'sqis_consumer_lag{job="sqis-sink-postgres",group=~"s-.*"}',
}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _prometheus_config(tmp: Path, ports: dict[str, int], prom_port: int) -> Path:
    """The project's prometheus.yml with dns_sd targets replaced by this test's static ones."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [str(PROM_DIR / Path(f).name) for f in cfg["rule_files"]]
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
        elif job["job_name"] in ports:
            assert job["dns_sd_configs"][0]["port"] == 9400
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        else:
            continue  # services of other issues, not started here
        jobs.append(job)
    cfg["scrape_configs"] = jobs
    out = tmp / "prometheus.yml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@contextlib.contextmanager
def _procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_prometheus_scrapes_the_pipeline_with_the_project_config(settings_factory: Any, onnx_model_path: Path,
                                                               tmp_path: Path, unique_id: str) -> None:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (make sysdeps installs Debian's package)")
    s = settings_factory(partitions={"frames": 2, "inspections": 2})
    ports = {job: free_port() for job in JOBS}
    prom_port = free_port()
    worker_group, sink_group = f"w-{unique_id}", f"s-{unique_id}"
    env = clean_env() | settings_env(s) | {"PYTHONPATH": str(REPO), "SQIS_LOG_FORMAT": "json"}
    env.pop("SQIS_METRICS_PORT", None)
    py = sqis_cmd()
    commands = {
        "sqis-producer": [*py, "produce", "--source", "synthetic", "--cameras", "2", "--lines", "2", "--fps", "10",
                          "--frames", "0", "--size", "128x128"],
        "sqis-worker": [*py, "worker", "--model", str(onnx_model_path), "--group", worker_group, "--max-batch", "4",
                        "--fetch-threads", "1"],
        "sqis-sink-postgres": [*py, "sink", "postgres", "--group", sink_group, "--max-wait-ms", "200"],
        "sqis-lag-exporter": [*py, "metrics", "exporter", "--interval-s", "1",
                              "--groups", f"{worker_group}:frames,{sink_group}:inspections"],
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    with _procs() as procs:
        for job, cmd in commands.items():
            procs.append(subprocess.Popen(
                [*cmd, "--metrics-port", str(ports[job])], env=env, cwd=tmp_path, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=(logs / f"{job}.log").open("wb")))
        cfg = _prometheus_config(tmp_path, ports, prom_port)
        check = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        procs.append(subprocess.Popen(
            [exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=(logs / "prometheus.log").open("wb")))
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def failed_procs() -> str:
            dead = [(j, p.returncode) for j, p in zip([*commands, "prometheus"], procs, strict=True)
                    if p.poll() is not None]
            return "; ".join(f"{j} exited {rc}: {(logs / f'{j}.log').read_text()[-1500:]}" for j, rc in dead)

        deadline = time.monotonic() + 150
        targets: list[dict[str, Any]] = []
        missing: dict[str, str] = dict(KEY_SERIES)
        while time.monotonic() < deadline:
            assert not failed_procs(), failed_procs()
            with contextlib.suppress(OSError, ValueError):
                targets = _get(f"{api}/targets")["data"]["activeTargets"]
                for name, q in list(missing.items()):
                    if _get(f"{api}/query?query={urllib.parse.quote(q)}")["data"]["result"]:
                        del missing[name]
                if not missing and targets and all(t["health"] == "up" for t in targets):
                    break
            time.sleep(1)
        by_job = {t["labels"]["job"]: t for t in targets}
        assert set(by_job) == {*JOBS, "prometheus"}, by_job.keys()
        assert all(t["health"] == "up" for t in targets), [(t["labels"]["job"], t["lastError"]) for t in targets]
        assert not missing, f"no samples for {sorted(missing)}"
        lag = _get(f"{api}/query?query={urllib.parse.quote('sqis_consumer_lag')}")["data"]["result"]
        assert {r["metric"]["group"] for r in lag} == {worker_group, sink_group}
        assert {(r["metric"]["topic"], r["metric"]["partition"]) for r in lag if r["metric"]["group"] == worker_group} \
            == {(f"{s.topic_prefix}frames", "0"), (f"{s.topic_prefix}frames", "1")}
        rules = _get(f"{api}/rules")["data"]["groups"]
        assert rules and rules[0]["name"] == "sqis" and all(r["health"] == "ok" for r in rules[0]["rules"])
