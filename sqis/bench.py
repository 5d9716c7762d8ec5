"""`sqis bench ...`: the bare model versus producer -> Kafka -> worker processes -> inspections.

Frames are rendered, JPEG-encoded and uploaded to the object store *before* the clock starts;
the timed part is: FrameRef produced -> consumed by a worker -> fetched, decoded, detected ->
Inspection produced -> consumed by the bench.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix
from infra.settings import Settings
from sqis.harness import BenchError, FramePublisher, TopicCollector, WorkerPool, export_untrained_detector

bench_app = typer.Typer(help="Benchmarks of the inference path.", no_args_is_help=True)


# ---- the benchmark ----------------------------------------------------------------------------


@dataclass
class BenchParams:
    frames: int = 500
    workers: int = 2
    cameras: int = 4
    size: int = 256
    max_batch: int = 8
    max_wait_ms: float = 10.0
    fetch_threads: int = 2
    onnx_threads: int = 1
    model: str | None = None
    imgsz: int = 256
    run_70pct: bool = True
    warmup_frames: int = 0  # 0: 2 batches per worker
    timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 2) if len(values) else None


def _latency_ms(recs: Sequence[dict[str, Any]]) -> list[float]:
    return [(r["inspected_at"] - r["captured_at"]) / 1000.0 for r in recs]


def bare_model_fps(settings: Settings, model: str, jpegs: Sequence[bytes], batch: int, *,
                   min_seconds: float = 3.0, min_batches: int = 10) -> dict[str, Any]:
    """The same ONNX model in a tight loop on decoded frames, ``batch`` images per call."""
    import cv2

    from inference_workers.detector import Thresholds
    from inference_workers.model_loader import load_detector

    det = load_detector(settings, model, Thresholds())
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    batches = [[images[(i * batch + k) % len(images)] for k in range(batch)] for i in range(len(images))]
    det.detect(batches[0])  # warm-up
    times: list[float] = []
    t_start = time.perf_counter()
    i = 0
    while len(times) < min_batches or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        det.detect(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
        i += 1
    total = time.perf_counter() - t_start
    ms = [t * 1000 for t in times]
    return {"bare_fps": round(len(times) * batch / total, 2), "bare_batch_latency_ms_p50": _pct(ms, 50),
            "bare_batch_latency_ms_p95": _pct(ms, 95), "bare_batches": len(times),
            "model_name": det.name, "model_version": det.version, "model_imgsz": list(det.imgsz)}


def _timed_run(pub: FramePublisher, coll: TopicCollector, n: int, rate: float | None, timeout: float) -> dict[str, Any]:
    refs = pub.prepare(n)
    ids = {r["frame_id"] for r in refs}
    t_start = pub.publish(refs, rate_fps=rate)
    if not coll.wait_frames(ids, timeout):
        got = len(ids & {r["frame_id"] for r in coll.snapshot()})
        raise BenchError(f"only {got}/{n} inspections arrived within {timeout:.0f} s")
    recs, arrived = [], []
    seen: set[str] = set()
    with coll._cond:
        for r, t in zip(coll.records, coll.received_at, strict=True):
            if r["frame_id"] in ids and r["frame_id"] not in seen:
                seen.add(r["frame_id"])
                recs.append(r)
                arrived.append(t)
    elapsed = max(arrived) - t_start
    lat = _latency_ms(recs)
    share: dict[str, int] = {}
    for r in recs:
        share[r["worker_id"]] = share.get(r["worker_id"], 0) + 1
    return {"frames_per_worker": sorted(share.values(), reverse=True), "fps": round(n / elapsed, 2), "elapsed_s": round(elapsed, 3), "p50": _pct(lat, 50), "p95": _pct(lat, 95),
            "p99": _pct(lat, 99), "mean_batch": round(float(np.mean([r["batch_size"] for r in recs])), 2)}


def run_pipeline_bench(p: BenchParams, *, state_dir: Path | None = None, bootstrap: str | None = None,
                       topic_prefix: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result as a JSON-able dict (see the module docstring)."""
    from infra import kafka
    from infra.cli_common import build_settings
    from schemas.catalog import TopicCatalog

    with contextlib.ExitStack() as es:
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="sqis-bench-")))
        prefix = topic_prefix or f"bench{uuid.uuid4().hex[:6]}."
        common = {"topic_prefix": prefix, "kafka_session_timeout_ms": 2000, "kafka_heartbeat_interval_ms": 500,
                  "onnx_threads": p.onnx_threads, "log_level": "WARNING"}
        if bootstrap is None:
            from infra.stack import LocalStack

            stack = LocalStack(state_dir or tmp / "stack")
            stack.up(kafka=True, postgres=False)
            es.callback(stack.down, purge=state_dir is None)
            s = stack.settings(**common)
        else:
            s = build_settings(state_dir=state_dir or tmp, bootstrap=bootstrap, **common)
            if s.object_store_url is None and not s.stack_info():
                s = build_settings(state_dir=state_dir or tmp, bootstrap=bootstrap,
                                   object_store_url=(tmp / "objects").as_uri(), **common)
        model = p.model
        if model is None:
            from inference_workers.model_loader import demo_model_path

            found = demo_model_path()
            if found is not None:
                model = str(found)
            else:
                with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints; stdout is for the result
                    model = str(export_untrained_detector(tmp / "model", p.imgsz))
        cat = TopicCatalog(prefix)
        kafka.create_topics(s, cat)
        es.callback(lambda: kafka.delete_topics(s, [n for n, _ in cat.all()]))

        pub = FramePublisher(s, cameras=p.cameras, size=p.size, distinct=16)
        es.callback(pub.close)
        result: dict[str, Any] = bare_model_fps(s, model, pub.images, p.max_batch)
        coll = TopicCollector(s)
        es.callback(coll.close)
        pool = WorkerPool(s, model, p.workers, tmp / "logs", max_batch=p.max_batch, max_wait_ms=p.max_wait_ms,
                          fetch_threads=p.fetch_threads, onnx_threads=p.onnx_threads)
        es.callback(pool.stop)
        pool.wait_ready()
        warm = p.warmup_frames or 2 * p.workers * p.max_batch
        _timed_run(pub, coll, warm, None, p.timeout_s)
        sat = _timed_run(pub, coll, p.frames, None, p.timeout_s)
        result.update({"pipeline_fps": sat["fps"], "latency_ms_p50": sat["p50"], "latency_ms_p95": sat["p95"],
                       "latency_ms_p99": sat["p99"], "pipeline_elapsed_s": sat["elapsed_s"],
                       "mean_batch_size": sat["mean_batch"], "frames_per_worker": sat["frames_per_worker"]})
        if p.run_70pct:
            rate = 0.7 * sat["fps"]
            r70 = _timed_run(pub, coll, p.frames, rate, p.timeout_s)
            result.update({"load_70pct_fps_target": round(rate, 2), "fps_at_70pct": r70["fps"],
                           "latency_at_70pct_ms_p50": r70["p50"], "latency_at_70pct_ms_p95": r70["p95"],
                           "latency_at_70pct_ms_p99": r70["p99"], "mean_batch_size_at_70pct": r70["mean_batch"],
                           "frames_per_worker_at_70pct": r70["frames_per_worker"]})
        pool.stop()
        result["worker_rss_mb"] = [round(x, 1) for x in pool.rss_peak_mb]
        result["worker_rss_mb_max"] = round(max(pool.rss_peak_mb), 1) if pool.rss_peak_mb else None
        params = asdict(p)
        params.pop("extra")
        params["model"] = model if p.model else f"{model} (default)"
        result["params"] = params
        result["cpu_count"] = os.cpu_count()
        return result
    raise AssertionError("unreachable")


@bench_app.command("pipeline")
def bench_pipeline(
    frames: Annotated[int, typer.Option("--frames", min=1, help="frames to push through")] = 500,
    workers: Annotated[int, typer.Option("--workers", min=1, max=32, help="worker subprocesses")] = 2,
    cameras: Annotated[int, typer.Option("--cameras", min=1, help="synthetic cameras")] = 4,
    size: Annotated[int, typer.Option("--size", min=32, help="frame width = height (pixels)")] = 256,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0)] = 10.0,
    fetch_threads: Annotated[int, typer.Option("--fetch-threads", min=1)] = 2,
    onnx_threads: Annotated[int, typer.Option("--onnx-threads", min=1, help="intra-op threads per worker (and for the bare run)")] = 1,
    model: Annotated[str | None, typer.Option("--model", help="PATH.onnx (default: the demo model, else an untrained YOLOv8n)")] = None,
    imgsz: Annotated[int, typer.Option("--imgsz", min=32, help="input size when exporting the untrained model")] = 256,
    no_70pct: Annotated[bool, typer.Option("--no-70pct", help="skip the run at 70% of saturation")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Producer -> Kafka -> workers -> inspections: throughput, latency, worker RSS, vs the bare model."""
    params = BenchParams(frames=frames, workers=workers, cameras=cameras, size=size, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, fetch_threads=fetch_threads, onnx_threads=onnx_threads, model=model, imgsz=imgsz,
                         run_70pct=not no_70pct)
    result = run_pipeline_bench(params, state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for k, v in result.items():
            typer.echo(f"{k:<32} {v}")
