"""`sqis bench pipeline --json` prints exactly one JSON object with the promised keys (tiny run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.model_fixtures import model_identity

pytestmark = pytest.mark.slow


def test_bench_pipeline_prints_one_json_object(onnx_model_path, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}
    cmd = [sys.executable, "-m", "sqis", "bench", "pipeline", "--frames", "48", "--workers", "2",
           "--size", "96", "--max-batch", "4", "--model", str(onnx_model_path), "--json"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # nothing else on stdout
    for key in ("bare_fps", "pipeline_fps", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
                "latency_at_70pct_ms_p50", "latency_at_70pct_ms_p95", "latency_at_70pct_ms_p99",
                "bare_batch_latency_ms_p50", "worker_rss_mb", "params"):
        assert key in result, key
    assert result["bare_fps"] > 0 and result["pipeline_fps"] > 0 and result["pipeline_fps_steady"] > 0
    assert result["ratio_steady_to_bare"] > 0 and result["ratio_pipeline_to_bare"] > 0
    assert result["latency_ms_p50"] <= result["latency_ms_p95"] <= result["latency_ms_p99"]
    assert len(result["worker_rss_mb"]) == 2 and min(result["worker_rss_mb"]) > 10
    assert sum(result["frames_per_worker"]) == 48
    assert result["params"]["frames"] == 48 and result["params"]["max_batch"] == 4
    assert result["model_name"] == model_identity(onnx_model_path)[0]


def test_bench_soak_samples_every_process_and_splits_latency(onnx_model_path, tmp_path) -> None:
    """A 10-second soak: RSS of the worker, the bench and the local broker sampled each second; per
    window the latency split at dispatch (the worker's own part can never exceed the whole) and CPU per
    frame of each process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}
    cmd = [sys.executable, "-m", "sqis", "bench", "soak", "--duration-s", "10", "--window-s", "5", "--fps", "10",
           "--warmup-s", "2", "--max-batch", "4", "--model", str(onnx_model_path), "--json"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result["rss"]) == {"worker-0", "bench", "broker"}
    assert result["warmup"]["seconds"] == 2 and result["warmup"]["p95_ms"] is not None  # not among the windows
    assert all(v["samples"] >= 5 for v in result["rss"].values())
    assert result["windows"] and sum(w["frames"] for w in result["windows"]) >= 50
    for w in result["windows"]:
        assert 0 <= w["p95_in_worker_ms"] <= w["p95_ms"] and 0 <= w["p95_before_dispatch_ms"] <= w["p95_ms"]
        assert set(w["cpu_ms_per_frame"]) == {"worker-0", "bench", "broker"} and w["cpu_ms_per_frame"]["worker-0"] > 0
    assert isinstance(result["rss_within_bound"], bool) and isinstance(result["p95_in_worker_stable"], bool)
