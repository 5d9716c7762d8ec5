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
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix
from infra.settings import Settings
from sqis.bench.harness import (
    BenchError,
    FramePublisher,
    TopicCollector,
    WorkerPool,
    export_untrained_detector,
)
from sqis.bench.providers import bench_model, bench_providers, parse_providers

bench_app = typer.Typer(help="Benchmarks of the inference path.", no_args_is_help=True)


@bench_app.callback()
def _bench_root() -> None:
    """SIGTERM (a time box, `timeout`, systemd) unwinds like Ctrl-C: the workers, the local broker and
    the scratch topics a benchmark started are stopped and removed, not orphaned."""
    import signal

    def _stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. called from a test's thread)
        signal.signal(signal.SIGTERM, _stop)


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
    # the bench's own consumer of the results: a short fetch wait makes arrival times sharp, but every
    # empty fetch costs the local broker CPU
    collector_fetch_wait_ms: int = 20
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


def steady_fps(arrived: Sequence[float], batch_sizes: Sequence[int]) -> float | None:
    """Steady-state frames/s: the frames after the first batch over the time from that batch's result
    to the last frame's (``arrived``: seconds, one per frame). It leaves out the one-off pipeline fill (first FrameRef -> first result, a
    latency, reported as such), which an end-to-end rate charges to a short run's throughput."""
    order = sorted(range(len(arrived)), key=arrived.__getitem__)
    if not order:
        return None
    first = min(max(1, batch_sizes[order[0]]), len(order))
    span = arrived[order[-1]] - arrived[order[first - 1]]
    return round((len(order) - first) / span, 2) if span > 0 else None


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
    # by the worker's clock (inspected_at: when the result was produced), so the collector's own fetch
    # cadence does not blur the rate
    steady = steady_fps([r["inspected_at"] / 1e6 for r in recs], [int(r["batch_size"]) for r in recs])
    lat = _latency_ms(recs)
    # the same latency split where the worker dispatched the frame's batch: before it (broker, poll,
    # batching wait) and after it (fetch, decode, infer, produce: the worker's own stages)
    before = [r["timings"]["queue_ms"] for r in recs]
    inside = [max(0.0, r["timings"]["total_ms"] - r["timings"]["queue_ms"]) for r in recs]
    share: dict[str, int] = {}
    for r in recs:
        share[r["worker_id"]] = share.get(r["worker_id"], 0) + 1
    return {"frames_per_worker": sorted(share.values(), reverse=True), "fps": round(n / elapsed, 2), "fps_steady": steady, "elapsed_s": round(elapsed, 3), "p50": _pct(lat, 50), "p95": _pct(lat, 95),
            "p99": _pct(lat, 99), "p95_before_dispatch": _pct(before, 95), "p95_in_worker": _pct(inside, 95), "mean_batch": round(float(np.mean([r["batch_size"] for r in recs])), 2)}


@dataclass
class Session:
    """What every run of one benchmark invocation shares: settings, model, publisher, collector."""

    settings: Settings
    model: str
    pub: FramePublisher
    coll: TopicCollector
    tmp: Path
    p: BenchParams
    pools: int = 0


@contextlib.contextmanager
def bench_session(p: BenchParams, *, state_dir: Path | None = None, bootstrap: str | None = None,
                  topic_prefix: str | None = None, partitions: int | None = None) -> Iterator[Session]:
    """A local stack (or the given broker), the catalog topics, a model, a publisher and a collector."""
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
        kafka.create_topics(s, cat, partitions={"frames": partitions} if partitions else None)
        es.callback(lambda: kafka.delete_topics(s, [n for n, _ in cat.all()]))
        # one camera per partition of the frames topic, placed round-robin: 1..N workers get equal shares
        # (by key hash, 4 cameras on 12 partitions split 3/1 between 2 workers)
        n_parts = partitions or cat.topic("frames").partitions
        pub = FramePublisher(s, cameras=max(p.cameras, n_parts), size=p.size, distinct=16, spread=n_parts)
        es.callback(pub.close)
        coll = TopicCollector(s, fetch_wait_ms=p.collector_fetch_wait_ms)
        es.callback(coll.close)
        yield Session(s, model, pub, coll, tmp, p)


@contextlib.contextmanager
def worker_pool(sess: Session, workers: int, max_batch: int, max_wait_ms: float,
                delivery: str | None = None, *, update: dict[str, Any] | None = None,
                extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Iterator[WorkerPool]:
    """``workers`` worker processes in a fresh group, ready and warmed up (2 batches each); ``delivery``
    overrides the workers' SQIS_WORKER_DELIVERY, ``update`` other settings; ``env`` is added to theirs."""
    p = sess.p
    sess.pools += 1
    upd = dict(update or {}) | ({"worker_delivery": delivery} if delivery is not None else {})
    s = sess.settings.model_copy(update=upd) if upd else sess.settings
    pool = WorkerPool(s, sess.model, workers, sess.tmp / f"logs-{sess.pools}", max_batch=max_batch,
                      max_wait_ms=max_wait_ms, fetch_threads=p.fetch_threads, onnx_threads=p.onnx_threads,
                      extra_args=extra_args, env=env, cwd=cwd)
    try:
        pool.wait_ready()
        _timed_run(sess.pub, sess.coll, p.warmup_frames or 2 * workers * max_batch, None, p.timeout_s)
        yield pool
    finally:
        pool.stop()


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(float(np.median(vals)), 4) if vals else None


def measure_once(sess: Session, bare: dict[str, Any], *, run_70pct: bool) -> dict[str, Any]:
    """One saturation run (all frames at once) and, optionally, one at 70 % of that throughput."""
    p = sess.p
    sat = _timed_run(sess.pub, sess.coll, p.frames, None, p.timeout_s)
    out = {"pipeline_fps": sat["fps"], "pipeline_fps_steady": sat["fps_steady"],
           "latency_ms_p50": sat["p50"], "latency_ms_p95": sat["p95"],
           "latency_ms_p99": sat["p99"], "pipeline_elapsed_s": sat["elapsed_s"],
           "mean_batch_size": sat["mean_batch"], "frames_per_worker": sat["frames_per_worker"],
           "ratio_pipeline_to_bare": round(sat["fps"] / bare["bare_fps"], 4) if bare["bare_fps"] else None,
           "ratio_steady_to_bare": round(sat["fps_steady"] / bare["bare_fps"], 4)
           if bare["bare_fps"] and sat["fps_steady"] else None}
    if run_70pct:
        rate = 0.7 * sat["fps"]
        r70 = _timed_run(sess.pub, sess.coll, p.frames, rate, p.timeout_s)
        out.update({"load_70pct_fps_target": round(rate, 2), "fps_at_70pct": r70["fps"],
                    "latency_at_70pct_ms_p50": r70["p50"], "latency_at_70pct_ms_p95": r70["p95"],
                    "latency_at_70pct_ms_p99": r70["p99"], "mean_batch_size_at_70pct": r70["mean_batch"],
                    "frames_per_worker_at_70pct": r70["frames_per_worker"],
                    "p95_at_70pct_minus_bare_batch_p95_ms": round(r70["p95"] - bare["bare_batch_latency_ms_p95"], 2)
                    if r70["p95"] is not None and bare["bare_batch_latency_ms_p95"] is not None else None})
    return out


def targets(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets from the median of the runs: throughput ratio >= 0.95; p95 at 70 % load
    <= bare-model batch p95 + 50 ms. The throughput ratio is end to end (first FrameRef published to
    last result received, so the pipeline fill is charged to the run); the steady-state ratio (see
    steady_fps) is reported beside it."""
    ratio = _median([r.get("ratio_pipeline_to_bare") for r in runs])
    steady = _median([r.get("ratio_steady_to_bare") for r in runs])
    margin = _median([r.get("p95_at_70pct_minus_bare_batch_p95_ms") for r in runs])
    return {"runs": len(runs), "median_ratio_pipeline_to_bare": ratio, "target_ratio": 0.95,
            "ratio_met": ratio is not None and ratio >= 0.95,
            "median_p95_at_70pct_minus_bare_batch_p95_ms": margin, "target_margin_ms": 50.0,
            "latency_met": margin is not None and margin <= 50.0,
            "ratios": [r.get("ratio_pipeline_to_bare") for r in runs],
            "median_ratio_steady_to_bare": steady,
            "ratios_steady": [r.get("ratio_steady_to_bare") for r in runs],
            "margins_ms": [r.get("p95_at_70pct_minus_bare_batch_p95_ms") for r in runs]}


def offered_load(sess: Session, saturation_fps: float, steps: Sequence[float], seconds: float = 8.0
                 ) -> list[dict[str, Any]]:
    """Frames/s stepped as fractions of saturation: achieved throughput and latency at each step."""
    out = []
    for frac in steps:
        rate = max(0.5, frac * saturation_fps)
        n = max(2 * sess.p.max_batch, int(rate * seconds))
        r = _timed_run(sess.pub, sess.coll, n, rate, sess.p.timeout_s)
        out.append({"offered_pct": round(100 * frac), "offered_fps": round(rate, 2), "frames": n,
                    "throughput_fps": r["fps"], "p50_ms": r["p50"], "p95_ms": r["p95"], "p99_ms": r["p99"],
                    "mean_batch": r["mean_batch"]})
    return out


def plot_offered_load(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """PNG: throughput and p95 latency against offered load."""
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'sqis[bench]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["offered_fps"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=110)
    ax1.plot(x, x, ":", color="grey", label="offered = served")
    ax1.plot(x, [r["throughput_fps"] for r in rows], "o-", color="tab:blue", label="throughput")
    ax1.set_xlabel("offered load (frames/s)")
    ax1.set_ylabel("throughput (frames/s)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [r["p95_ms"] for r in rows], "s--", color="tab:red", label="p95 latency")
    ax2.set_ylabel("end-to-end p95 (ms)", color="tab:red")
    ax2.set_yscale("log")
    for r in rows:
        ax1.annotate(f"{r['offered_pct']}%", (r["offered_fps"], r["throughput_fps"]), textcoords="offset points",
                     xytext=(0, 6), ha="center", fontsize=7)
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.9), fontsize=8)
    ax1.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_pipeline_bench(p: BenchParams, *, state_dir: Path | None = None, bootstrap: str | None = None,
                       topic_prefix: str | None = None, repeat: int = 1, sweep: bool = False, scaling: int = 0,
                       offered: bool = False, plot: Path | None = None, delivery_compare: bool = False,
                       segment_compare: bool = False, seg_score: float = 0.3, baseline_src: Path | None = None,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result as a JSON-able dict (see the module docstring)."""
    say = progress or (lambda _m: None)
    with bench_session(p, state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix,
                       partitions=max(scaling, p.workers) if scaling > 12 else None) as sess:
        result: dict[str, Any] = bare_model_fps(sess.settings, sess.model, sess.pub.images, p.max_batch)
        bare = dict(result)
        runs = []
        with worker_pool(sess, p.workers, p.max_batch, p.max_wait_ms) as pool:
            for i in range(repeat):
                # The machine is shared: bracket each pipeline run with bare-model runs just before and
                # after it, and compare with their mean, so a load change between them cancels out.
                run = measure_once(sess, bare, run_70pct=p.run_70pct)
                after = bare_model_fps(sess.settings, sess.model, sess.pub.images, p.max_batch, min_seconds=2.0)
                bracket = (bare["bare_fps"] + after["bare_fps"]) / 2
                steady = run["pipeline_fps_steady"]
                run |= {"bare_fps_before": bare["bare_fps"], "bare_fps_after": after["bare_fps"],
                        "bare_batch_latency_ms_p95": bare["bare_batch_latency_ms_p95"],
                        "ratio_pipeline_to_bare": round(run["pipeline_fps"] / bracket, 4) if bracket else None,
                        "ratio_steady_to_bare": round(steady / bracket, 4) if bracket and steady else None}
                runs.append(run)
                bare = after
                say(f"run {i + 1}/{repeat}: pipeline {run['pipeline_fps']} fps end to end ({steady} steady)"
                    f" = {run['ratio_pipeline_to_bare']} x bare ({run['ratio_steady_to_bare']} steady)")
            result.update({k: v for k, v in runs[0].items()
                           if k not in ("bare_fps_before", "bare_fps_after", "bare_batch_latency_ms_p95")})
            if offered:
                steps = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
                sat = _median([r["pipeline_fps_steady"] or r["pipeline_fps"] for r in runs]) or runs[0]["pipeline_fps"]
                result["offered_load"] = offered_load(sess, sat, steps)
                say("offered-load run done")
            pool_rss = pool.rss_peak_mb
        if repeat > 1 or p.run_70pct:
            result["runs"] = runs
            result["targets"] = targets(runs)
        if delivery_compare:
            result["delivery_compare"] = compare_delivery(sess, bare, repeat, say)
        if segment_compare:
            result["segment_compare"] = compare_segment(sess, repeat, say, score=seg_score, baseline_src=baseline_src)
        if sweep:
            result["sweep"] = []
            for mb in (1, 4, 8, 16):
                for mw in (0.0, 5.0, 20.0):
                    with worker_pool(sess, 1, mb, mw):
                        r = measure_once(sess, bare, run_70pct=False)
                    result["sweep"].append({"max_batch": mb, "max_wait_ms": mw, "fps": r["pipeline_fps"],
                                            "fps_steady": r["pipeline_fps_steady"],
                                            "p95_ms": r["latency_ms_p95"], "mean_batch": r["mean_batch_size"]})
                    say(f"sweep batch {mb} wait {mw}: {r['pipeline_fps']} fps")
        if scaling:
            result["scaling"] = []
            for n in range(1, scaling + 1):
                with worker_pool(sess, n, p.max_batch, p.max_wait_ms):
                    r = measure_once(sess, bare, run_70pct=False)
                result["scaling"].append({"workers": n, "fps": r["pipeline_fps"], "fps_steady": r["pipeline_fps_steady"],
                                          "p95_ms": r["latency_ms_p95"],
                                          "frames_per_worker": r["frames_per_worker"]})
                say(f"scaling {n} workers: {r['pipeline_fps']} fps")
        if plot is not None and "offered_load" in result:
            result["plot"] = str(plot_offered_load(
                result["offered_load"], plot,
                f"{p.workers} worker(s), batch {p.max_batch}, {os.cpu_count()} CPUs; bare model {bare['bare_fps']} fps"))
        result["worker_rss_mb"] = [round(x, 1) for x in pool_rss]
        result["worker_rss_mb_max"] = round(max(pool_rss), 1) if pool_rss else None
        params = asdict(p)
        params.pop("extra")
        params["model"] = sess.model if p.model else f"{sess.model} (default)"
        result["params"] = params
        result["cpu_count"] = os.cpu_count()
        return result
    raise AssertionError("unreachable")


def compare_delivery(sess: Session, bare: dict[str, Any], repeat: int,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """Saturation runs with exactly_once and at_least_once workers, alternated ``repeat`` times (so a
    load change on the shared machine hits both), each followed by a run paced at 60 % of the bare
    model; medians of throughput and p95 latency (saturated and paced) per mode."""
    p = sess.p
    modes = ("exactly_once", "at_least_once")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    paced_rate = 0.6 * bare["bare_fps"] if bare.get("bare_fps") else None
    for i in range(repeat):
        for mode in modes:
            with worker_pool(sess, p.workers, p.max_batch, p.max_wait_ms, delivery=mode):
                r = measure_once(sess, bare, run_70pct=False)
                # the same offered load for both modes (60 % of the bare model): latency without queueing
                paced = _timed_run(sess.pub, sess.coll, p.frames, paced_rate, p.timeout_s) if paced_rate else None
            runs[mode].append({"fps": r["pipeline_fps"], "fps_steady": r["pipeline_fps_steady"],
                               "p95_ms": r["latency_ms_p95"], "p50_ms": r["latency_ms_p50"],
                               "paced_fps": paced_rate and round(paced_rate, 2),
                               "paced_p50_ms": paced and paced["p50"], "paced_p95_ms": paced and paced["p95"]})
            say(f"delivery {mode} run {i + 1}/{repeat}: {r['pipeline_fps']} fps, p95 {r['latency_ms_p95']} ms; "
                f"paced at {paced_rate or 0:.0f} fps: p95 {paced and paced['p95']} ms")
    out: dict[str, Any] = {m: {"fps_median": _median([r["fps"] for r in runs[m]]),
                               "p95_ms_median": _median([r["p95_ms"] for r in runs[m]]),
                               "p95_ms_worst": max((r["p95_ms"] or 0.0) for r in runs[m]),
                               "paced_p95_ms_median": _median([r["paced_p95_ms"] for r in runs[m] if r["paced_p95_ms"]]),
                               "paced_p95_ms_worst": max((r["paced_p95_ms"] or 0.0) for r in runs[m]),
                               "runs": runs[m]}
                           for m in modes}
    eos, alo = out["exactly_once"], out["at_least_once"]
    out["throughput_ratio_eos_to_alo"] = (round(eos["fps_median"] / alo["fps_median"], 4)
                                          if eos["fps_median"] and alo["fps_median"] else None)
    out["p95_ms_eos_minus_alo"] = (round(eos["p95_ms_median"] - alo["p95_ms_median"], 2)
                                   if eos["p95_ms_median"] is not None and alo["p95_ms_median"] is not None else None)
    return out


def compare_segment(sess: Session, repeat: int, say: Callable[[str], None], *, score: float,
                    baseline_src: Path | None = None) -> dict[str, Any]:
    """The same YOLOv8-seg model served detect-only and with segmenter=yolo-seg (and, with
    ``baseline_src``, with segmenter=yolo-seg by the worker code of that checkout: the before), alternated
    ``repeat`` times so a load change on the shared machine hits every mode; each mode a saturation run
    and a run paced at 60 % of the detect-only rate of the same round."""
    p = sess.p
    modes: dict[str, tuple[dict[str, Any], dict[str, str] | None]] = {
        "detect": ({"segmenter": "none"}, None), "seg": ({"segmenter": "yolo-seg"}, None)}
    if baseline_src is not None:
        modes["seg_before"] = ({"segmenter": "yolo-seg"}, {"PYTHONPATH": str(baseline_src)})
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for i in range(repeat):
        paced_rate: float | None = None
        for mode, (update, env) in modes.items():
            with worker_pool(sess, p.workers, p.max_batch, p.max_wait_ms, update=update,
                             extra_args=("--score", str(score)), env=env, cwd=baseline_src if env else None):
                sat = _timed_run(sess.pub, sess.coll, p.frames, None, p.timeout_s)
                if paced_rate is None:
                    paced_rate = 0.6 * (sat["fps_steady"] or sat["fps"])
                paced = _timed_run(sess.pub, sess.coll, p.frames, paced_rate, p.timeout_s)
            recs = [r for r in sess.coll.snapshot()[-p.frames:]]
            dets = [len(r["detections"]) for r in recs]
            masked = sum(1 for r in recs for d in r["detections"] if d.get("mask"))
            runs[mode].append({"fps": sat["fps"], "fps_steady": sat["fps_steady"], "p95_ms": sat["p95"],
                               "paced_fps": round(paced_rate, 2), "paced_p50_ms": paced["p50"],
                               "paced_p95_ms": paced["p95"], "paced_p95_in_worker_ms": paced["p95_in_worker"],
                               "detections_per_frame": round(float(np.mean(dets)), 2) if dets else 0.0,
                               "masks": masked,
                               "segment_ms_median": _median([r["timings"].get("segment_ms") or 0.0 for r in recs]),
                               "infer_ms_median": _median([r["timings"]["infer_ms"] for r in recs])})
            say(f"segment compare {mode} run {i + 1}/{repeat}: {sat['fps']} fps ({sat['fps_steady']} steady), "
                f"p95 {sat['p95']} ms; paced at {paced_rate:.1f} fps: p95 {paced['p95']} ms")
    out: dict[str, Any] = {}
    for m in modes:
        rs = runs[m]
        out[m] = {"fps_median": _median([r["fps"] for r in rs]), "fps_worst": min(r["fps"] for r in rs),
                  "fps_steady_median": _median([r["fps_steady"] for r in rs]),
                  "p95_ms_median": _median([r["p95_ms"] for r in rs]), "p95_ms_worst": max(r["p95_ms"] for r in rs),
                  "paced_p95_ms_median": _median([r["paced_p95_ms"] for r in rs]),
                  "paced_p95_ms_worst": max(r["paced_p95_ms"] for r in rs), "runs": rs}
    for m in (k for k in modes if k != "detect"):
        ratios = [round(s["fps"] / d["fps"], 4) for s, d in zip(runs[m], runs["detect"], strict=True)]
        out[f"{m}_to_detect_fps_ratio"] = {"median": _median(ratios), "worst": min(ratios), "runs": ratios}
        deltas = [round(s["paced_p95_ms"] - d["paced_p95_ms"], 2) for s, d in zip(runs[m], runs["detect"], strict=True)]
        out[f"{m}_minus_detect_paced_p95_ms"] = {"median": _median(deltas), "worst": max(deltas), "runs": deltas}
    out["score"] = score
    out["target"] = "seg fps within 10 % of detect-only on the same model (ratio >= 0.9)"
    return out


def _stable(p95s: Sequence[float]) -> bool:
    """Flat: no window's p95 above 1.3x the median window's (issue #17's rule)."""
    return bool(p95s) and max(p95s) <= 1.3 * float(np.median(p95s))


def _cpu_seconds(procs: dict[str, Any]) -> dict[str, float]:
    import psutil

    out = {}
    for k, pr in procs.items():
        with contextlib.suppress(psutil.Error):
            t = pr.cpu_times()
            out[k] = t.user + t.system
    return out


def run_soak(p: BenchParams, *, duration_s: float, load: float = 0.7, fps: float | None = None,
             sample_s: float = 1.0, window_s: float = 60.0, state_dir: Path | None = None, warmup_s: float = 0.0,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Frames at ``load`` x saturation for ``duration_s``: RSS of every process each second, p95 per window.

    ``warmup_s`` first runs the same load unmeasured (the broker's JVM compiles its hot paths in the
    first minute: its CPU per frame halves after it), reported as ``warmup``, outside the windows."""
    import psutil

    say = progress or (lambda _m: None)
    with bench_session(p, state_dir=state_dir) as sess, worker_pool(sess, p.workers, p.max_batch, p.max_wait_ms) as pool:
        if fps is None:
            sat = _timed_run(sess.pub, sess.coll, p.frames, None, p.timeout_s)
            fps = (sat["fps_steady"] or sat["fps"]) * load
        warmup: dict[str, Any] | None = None
        if warmup_s > 0:
            w = _timed_run(sess.pub, sess.coll, max(1, int(fps * warmup_s)), fps, p.timeout_s)
            warmup = {"seconds": warmup_s, "fps": w["fps"], "p95_ms": w["p95"]}
            say(f"warm-up {warmup_s:.0f} s: {w['fps']} fps p95 {w['p95']} ms (not counted)")
            with sess.coll._cond:
                sess.coll.records.clear()
                sess.coll.received_at.clear()
                sess.coll.meta.clear()
        say(f"soak at {fps:.1f} frames/s for {duration_s:.0f} s")
        procs = {f"worker-{i}": psutil.Process(pr.pid) for i, pr in enumerate(pool.procs)}
        procs["bench"] = psutil.Process()
        for child in psutil.Process().children(recursive=True):  # the local broker, when the bench started it
            with contextlib.suppress(psutil.Error):
                if "-Dsqis.local.kafka=1" in " ".join(child.cmdline()):
                    procs["broker"] = child
        rss: dict[str, list[float]] = {k: [] for k in procs}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(sample_s):
                for k, pr in procs.items():
                    with contextlib.suppress(psutil.Error):
                        rss[k].append(round(pr.memory_info().rss / 2**20, 1))

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        windows = []
        t_end = time.monotonic() + duration_s
        try:
            while time.monotonic() < t_end:
                n = max(1, int(fps * min(window_s, t_end - time.monotonic())))
                cpu0 = _cpu_seconds(procs)
                r = _timed_run(sess.pub, sess.coll, n, fps, p.timeout_s)
                cpu1 = _cpu_seconds(procs)
                # CPU milliseconds per frame of each process: which one grows when latency does
                cpu_ms = {k: round((cpu1[k] - cpu0[k]) * 1000 / n, 2) for k in cpu1 if k in cpu0}
                windows.append({"frames": n, "fps": r["fps"], "p50_ms": r["p50"], "p95_ms": r["p95"],
                                "p95_before_dispatch_ms": r["p95_before_dispatch"],
                                "p95_in_worker_ms": r["p95_in_worker"], "cpu_ms_per_frame": cpu_ms})
                say(f"window {len(windows)}: {r['fps']} fps p95 {r['p95']} ms (before dispatch "
                    f"{r['p95_before_dispatch']}, in the worker {r['p95_in_worker']}); cpu ms/frame {cpu_ms}")
                with sess.coll._cond:  # keep the collector's memory bounded over a long soak
                    sess.coll.records.clear()
                    sess.coll.received_at.clear()
                    sess.coll.meta.clear()
        finally:
            stop.set()
            sampler.join(5)
    p95s = [w["p95_ms"] for w in windows if w["p95_ms"] is not None]
    per_proc = {}
    for k, xs in rss.items():
        if not xs:
            continue
        warm = xs[min(len(xs) - 1, max(0, int(window_s / sample_s) // 2)):]  # after the first half window
        per_proc[k] = {"samples": len(xs), "start_mb": xs[0], "max_mb": max(xs), "end_mb": xs[-1],
                       "growth_after_warmup_mb": round(max(warm) - warm[0], 1)}
    bound_mb = 64.0
    return {"duration_s": duration_s, "offered_fps": round(fps, 2), "warmup": warmup, "windows": windows,
            "rss": per_proc,
            "rss_bound_growth_mb": bound_mb,
            # the project's processes; the broker's JVM heap is bounded by its -Xmx (infra/kafka_broker.HEAP)
            "rss_within_bound": all(v["growth_after_warmup_mb"] <= bound_mb for k, v in per_proc.items()
                                    if k != "broker"),
            "p95_median_ms": _median(p95s), "p95_max_ms": max(p95s) if p95s else None,
            "p95_stable": _stable(p95s),
            "p95_in_worker_stable": _stable([w["p95_in_worker_ms"] for w in windows if w["p95_in_worker_ms"] is not None]),
            "cpu_ms_per_frame_first_last": {k: (windows[0]["cpu_ms_per_frame"].get(k), windows[-1]["cpu_ms_per_frame"].get(k))
                                            for k in windows[0]["cpu_ms_per_frame"]} if windows else {},
            "rss_series_mb": rss}


def _emit(result: dict[str, Any], as_json: bool, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(result))
        return
    for k, v in result.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            typer.echo(f"{k}:")
            cols = list(v[0])
            typer.echo("  " + "  ".join(f"{c:>14}" for c in cols))
            for row in v:
                typer.echo("  " + "  ".join(f"{str(row.get(c)):>14}" for c in cols))
        elif isinstance(v, dict):
            typer.echo(f"{k}:")
            for k2, v2 in v.items():
                typer.echo(f"  {k2:<44} {v2}")
        else:
            typer.echo(f"{k:<46} {v}")


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


@bench_app.command("pipeline")
def bench_pipeline(
    frames: Annotated[int, typer.Option("--frames", min=1, help="frames per timed run")] = 500,
    workers: Annotated[int, typer.Option("--workers", min=1, max=32, help="worker subprocesses")] = 2,
    cameras: Annotated[int, typer.Option("--cameras", min=1, help="synthetic cameras (at least one per partition of the frames topic)")] = 4,
    size: Annotated[int, typer.Option("--size", min=32, help="frame width = height (pixels)")] = 256,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0)] = 10.0,
    fetch_threads: Annotated[int, typer.Option("--fetch-threads", min=1)] = 2,
    onnx_threads: Annotated[int, typer.Option("--onnx-threads", min=1, help="intra-op threads per worker (and for the bare run)")] = 1,
    model: Annotated[str | None, typer.Option("--model", help="PATH.onnx (default: the demo model, else an untrained YOLOv8n)")] = None,
    imgsz: Annotated[int, typer.Option("--imgsz", min=32, help="input size when exporting the untrained model")] = 256,
    no_70pct: Annotated[bool, typer.Option("--no-70pct", help="skip the run at 70% of saturation")] = False,
    repeat: Annotated[int, typer.Option("--repeat", min=1, max=20, help="timed runs; the targets use their median")] = 1,
    sweep: Annotated[bool, typer.Option("--sweep", help="also sweep max batch (1,4,8,16) x max wait (0,5,20 ms), 1 worker")] = False,
    scaling: Annotated[int, typer.Option("--scaling", min=0, max=32, help="also run 1..N workers")] = 0,
    offered: Annotated[bool, typer.Option("--offered-load", help="also step the load from 20% to 120% of saturation")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of throughput and p95 against offered load")] = None,
    delivery_compare: Annotated[bool, typer.Option("--compare-delivery", help=(
        "also run the workers exactly_once and at_least_once, alternated --repeat times: throughput ratio, p95 of each"))] = False,
    segment_compare: Annotated[bool, typer.Option("--compare-segment", help=(
        "also serve the (YOLOv8-seg) model detect-only and with segmenter=yolo-seg, alternated --repeat times: "
        "fps ratio and p95 of each; without --model an untrained YOLOv8n-seg with a spread class head"))] = False,
    seg_score: Annotated[float, typer.Option("--seg-score", min=0.0, max=1.0, help=(
        "--compare-segment: the workers' score threshold (how many masks per frame)"))] = 0.3,
    baseline_src: Annotated[Path | None, typer.Option("--baseline-src", help=(
        "--compare-segment: also run segmenter=yolo-seg workers on the code of this checkout (the before)"))] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also write the JSON result to this file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Producer -> Kafka -> workers -> inspections: throughput, latency, worker RSS, vs the bare model."""
    if segment_compare and model is None:
        from sqis.bench.segment import export_untrained_yolo_seg

        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints; stdout is for the result
            model = str(export_untrained_yolo_seg(Path(tempfile.gettempdir()) / "sqis-bench-seg", imgsz, spread_head=True))
    params = BenchParams(frames=frames, workers=workers, cameras=cameras, size=size, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, fetch_threads=fetch_threads, onnx_threads=onnx_threads, model=model,
                         imgsz=imgsz, run_70pct=not no_70pct)
    result = run_pipeline_bench(params, state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix,
                                repeat=repeat, sweep=sweep, scaling=scaling, offered=offered or plot is not None,
                                plot=plot, delivery_compare=delivery_compare, segment_compare=segment_compare,
                                seg_score=seg_score, baseline_src=baseline_src, progress=None if as_json else _say)
    _emit(result, as_json, out)


@bench_app.command("soak")
def bench_soak(
    duration_s: Annotated[float, typer.Option("--duration-s", min=10, help="how long to run (the issue's soak: 600)")] = 600.0,
    load: Annotated[float, typer.Option("--load", min=0.05, max=1.5, help="fraction of the measured saturation")] = 0.7,
    fps: Annotated[float | None, typer.Option("--fps", min=0.1, help="offered frames/s (skips measuring saturation)")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=32)] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1)] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0)] = 10.0,
    window_s: Annotated[float, typer.Option("--window-s", min=5, help="p95 per window of this length")] = 60.0,
    warmup_s: Annotated[float, typer.Option("--warmup-s", min=0, help=(
        "first run the load this long, unmeasured (JVM warm-up of the broker)"))] = 60.0,
    model: Annotated[str | None, typer.Option("--model")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also write the JSON result to this file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    state_dir: StateDir = None,
) -> None:
    """Steady load for a long time: RSS of every process each second (bounded?) and p95 per window (stable?)."""
    # latency is read from the records (captured_at -> inspected_at), not from arrival at the bench, so
    # the bench's collector can fetch lazily and leave the shared 2 cores to the worker and the broker
    params = BenchParams(frames=300, workers=workers, max_batch=max_batch, max_wait_ms=max_wait_ms, model=model,
                         collector_fetch_wait_ms=250)
    result = run_soak(params, duration_s=duration_s, load=load, fps=fps, window_s=window_s, state_dir=state_dir,
                      warmup_s=warmup_s, progress=None if as_json else _say)
    if not as_json:
        result = {k: v for k, v in result.items() if k != "rss_series_mb"}
    _emit(result, as_json, out)


@bench_app.command("chaos")
def bench_chaos(
    frames: Annotated[int, typer.Option("--frames", min=1, help="frames published (the issue's run: 5,000)")] = 5000,
    workers: Annotated[int, typer.Option("--workers", min=1, max=16)] = 2,
    publish_s: Annotated[float | None, typer.Option("--publish-s", min=1, help="spread the frames over this long (default frames/30)")] = None,
    kill_every_s: Annotated[float, typer.Option("--kill-every-s", min=0.5, help="SIGKILL + restart a random worker this often")] = 3.0,
    delivery: Annotated[str, typer.Option("--delivery", help="exactly_once | at_least_once (the workers' SQIS_WORKER_DELIVERY)")] = "exactly_once",
    seed: Annotated[int, typer.Option("--seed")] = 17,
    model: Annotated[str | None, typer.Option("--model", help="PATH.onnx (default: the demo model, else an untrained YOLOv8n)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also write the JSON result to this file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Workers SIGKILLed and restarted at random while frames come in; counts inspections per frame_id
    (read_committed): exactly_once should show none missing and none doubled."""
    from infra.cli_common import UserError
    from sqis.bench.harness import run_worker_chaos

    if delivery not in ("exactly_once", "at_least_once"):
        raise UserError(f"--delivery {delivery!r}: choose exactly_once or at_least_once")
    params = BenchParams(frames=frames, workers=workers, model=model, imgsz=128, size=96)
    with bench_session(params, state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix) as sess:
        s = sess.settings.model_copy(update={"worker_delivery": delivery})
        result = run_worker_chaos(s, sess.model, frames, sess.tmp / "chaos-logs", workers=workers,
                                  publish_s=publish_s or frames / 30, kill_every_s=kill_every_s, seed=seed,
                                  timeout_s=max(240.0, 3 * (publish_s or frames / 30)),
                                  progress=None if as_json else _say)
    result["cpu_count"] = os.cpu_count()
    _emit(result, as_json, out)


@bench_app.command("model")
def bench_model_cmd(
    model: Annotated[list[str] | None, typer.Option("--model", help=(
        "PATH.onnx, repeatable (default: the demo model); its INT8 file is PATH-int8.onnx unless --int8-model"))] = None,
    provider: Annotated[str, typer.Option("--provider", help=(
        "cpu | cuda | tensorrt | openvino, each optionally -int8 (the model's INT8 file); a comma list runs "
        "them side by side, e.g. cpu,cpu-int8,openvino,openvino-int8"))] = "cpu",
    batch: Annotated[list[int] | None, typer.Option("--batch", min=1, max=256, help="batch sizes (repeatable)")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1)] = 30,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="untimed runs first (TensorRT builds its engine here)")] = 5,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT: fp16 engine")] = False,
    engine_cache: Annotated[Path | None, typer.Option("--engine-cache", help="TensorRT engine cache directory")] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU intra-op threads (0: default)")] = 0,
    int8_model: Annotated[list[str] | None, typer.Option("--int8-model", help="the INT8 file of each --model, in order")] = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help=(
        "an imported dataset per --model, in order: adds each provider's test mAP@0.5"))] = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, max=20, help="interleaved rounds; median and worst reported")] = 1,
    out: Annotated[Path | None, typer.Option("--out", help="also write the JSON result to this file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """The model alone on execution providers (no Kafka): latency per batch size, frames/s; several
    providers and models side by side with a comma list of providers and repeated --model."""
    from infra.cli_common import UserError

    try:
        specs = parse_providers(provider)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not model:
        from inference_workers.model_loader import demo_model_path

        found = demo_model_path()
        if found is None:
            raise UserError("no model: pass --model PATH.onnx")
        model = [str(found)]
    if data and len(data) != len(model):
        raise UserError(f"--data: {len(data)} given for {len(model)} --model; give one per model, in order")
    from inference_workers.detector import DetectorError

    single = len(model) == 1 and len(specs) == 1 and not specs[0][2] and repeat == 1 and not data
    try:
        if single:
            result = bench_model(model[0], provider=provider, batches=batch or [1, 8], runs=runs, warmup=warmup,
                                 fp16=fp16, threads=threads, engine_cache_dir=engine_cache or (
                                     Path(".sqis/trt-cache") if provider == "tensorrt" else None))
        else:
            result = bench_providers(model, provider, data=list(data or []), int8=list(int8_model or []),
                                     batches=batch or [1, 8], runs=runs, warmup=warmup, threads=threads,
                                     repeat=repeat, say=_say)
            result["cpu_count"] = os.cpu_count()
    except (DetectorError, FileNotFoundError) as exc:
        raise UserError(f"--provider {provider}: {exc}") from None
    _emit(result, as_json, out)
