"""Promotion through the real MLflow registry hot-swaps the model of a running worker (no restart)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from inference_workers.bench import TopicCollector, settings_env
from producers.run import run_producer
from training.registry import client_for, ensure_experiment, list_versions, promote, register_onnx

FRAMES_PER_CAMERA = 4
CAMERAS = 2


def _register(s: Any, onnx_path: Path, name: str) -> str:
    client = client_for(s)
    run = client.create_run(ensure_experiment(client, s, "hot-reload"))
    version = register_onnx(client, run, onnx_path, name, tags={"test": "hot-reload"})
    client.set_terminated(run.info.run_id)
    return version


def _produce(s: Any, seed: int, frames_topic: TopicCollector, already: int) -> set[str]:
    """Publish CAMERAS x FRAMES_PER_CAMERA synthetic frames; returns their frame ids (read back from the topic)."""
    stats = run_producer(s, "synthetic", cameras=CAMERAS, frames=FRAMES_PER_CAMERA, size="64x64", seed=seed,
                         install_signal_handlers=False)
    n = CAMERAS * FRAMES_PER_CAMERA
    assert stats.produced == n and stats.failed == 0
    assert frames_topic.wait_for(lambda recs: len(recs) >= already + n, 60)
    return {r["frame_id"] for r in frames_topic.snapshot()[already:already + n]}


def test_cli_promotion_hot_reloads_a_running_worker(settings_factory, worker_factory, onnx_model_path,
                                                    tmp_path: Path, unique_id: str) -> None:
    s = settings_factory(partitions={"frames": 2}, state_dir=tmp_path / "state",
                         mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", onnx_providers="cpu",
                         onnx_threads=1)
    name = f"hot-{unique_id}"
    # two versions of the same untrained detector: the registered copies differ (stamped name/version)
    assert (_register(s, onnx_model_path, name), _register(s, onnx_model_path, name)) == ("1", "2")
    promote(client_for(s), name, "1", "production")

    frames = TopicCollector(s, "frames")
    insp = TopicCollector(s, "inspections")
    dlq = TopicCollector(s, "frames_dlq")
    w = worker_factory(s, model_uri=f"models:/{name}@production", model_poll_s=0.3, max_batch=4, max_wait_ms=20)
    try:
        assert w.worker.watcher.current.version == "1"
        before = _produce(s, 1, frames, 0)
        assert insp.wait_frames(before, 120)
        assert {r["model_version"] for r in insp.snapshot()} == {"1"}

        out = subprocess.run([sys.executable, "-m", "infra.cli", "model", "promote", name, "2",
                              "--alias", "production"], env=settings_env(s) | {"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert [v.aliases for v in list_versions(client_for(s), name)] == [["production"], []]
        deadline = time.monotonic() + 90
        while w.worker.stats.model_reloads == 0 and time.monotonic() < deadline and w.thread.is_alive():
            time.sleep(0.1)  # the watcher thread prepares v2; the idle loop swaps it between batches
        assert w.worker.stats.model_reloads == 1 and w.worker.watcher.current.version == "2"

        after = _produce(s, 2, frames, len(before))
        assert insp.wait_frames(before | after, 120)
        assert w.thread.is_alive()  # the same worker all along
        stats = w.stop()
        recs = insp.snapshot()
    finally:
        for c in (frames, insp, dlq):
            c.close()

    assert len(before) == len(after) == CAMERAS * FRAMES_PER_CAMERA and not before & after
    counts = Counter(r["frame_id"] for r in recs)
    assert set(counts) == before | after and max(counts.values()) == 1  # every frame inspected exactly once
    by_id = {r["frame_id"]: r for r in recs}
    assert {by_id[f]["model_version"] for f in before} == {"1"}
    assert {by_id[f]["model_version"] for f in after} == {"2"}
    assert {r["model_name"] for r in recs} == {name}
    assert {r["worker_id"] for r in recs} == {w.worker.worker_id}
    assert stats.model_reloads == 1 and stats.inspected == len(recs) and stats.dead_lettered == 0
    assert dlq.snapshot() == []
