"""Benchmarks of the stream processors (no broker): false alerts and detection delays over simulated
weeks (``sqis bench alerts``) and the rates processor's throughput and memory (``sqis bench rates``).

The alert simulation feeds the *same* ``SpcProcessor.on_window`` and ``DriftProcessor.on_points`` the
stream loop uses, with per-window counts and statistic means drawn from a model of the line, because a
week of a 4x4 plant at 10 fps is 97 million inspections. The window code itself is exercised per
inspection by the throughput benchmark.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stream_processors.processors import DriftConfig, DriftProcessor, SpcConfig, SpcProcessor
from stream_processors.windows import US, RateRecord

WEEK_MIN = 7 * 24 * 60
BASE_STATS = {"brightness": 120.0, "contrast": 40.0, "sharpness": 300.0, "max_score": 0.35}
# frame-to-frame spread of each statistic, and slow ambient wander (sd of an AR(1) on minute means)
FRAME_SD = {"brightness": 8.0, "contrast": 4.0, "sharpness": 90.0, "max_score": 0.15}
AMBIENT_SD = {"brightness": 0.8, "contrast": 0.3, "sharpness": 3.0, "max_score": 0.003}


@dataclass(frozen=True)
class Plant:
    lines: int = 4
    cameras: int = 4  # per line
    fps: float = 10.0
    p: float = 0.02  # in-control defect rate per frame
    overdispersion: float = 0.0  # sd of the per-window rate as a fraction of p (0 = binomial)

    def frames_per_window(self, window_s: int) -> int:
        return int(self.cameras * self.fps * window_s)


def _window_counts(rng: np.random.Generator, plant: Plant, n: int, p: np.ndarray) -> np.ndarray:
    if plant.overdispersion > 0:
        p = np.clip(p * (1 + plant.overdispersion * rng.standard_normal(p.shape)), 0, 1)
    return rng.binomial(n, p)


def simulate_spc(plant: Plant, minutes: int, seed: int, config: SpcConfig, *, shift_line: int | None = None,
                 shift_at_min: int = 0, factor: float = 2.0) -> list[dict[str, Any]]:
    """Alerts opened over ``minutes`` of simulated line windows; optional step of one line's rate."""
    rng = np.random.default_rng(seed)
    proc = SpcProcessor(config)
    n = plant.frames_per_window(config.window_s)
    steps = minutes * 60 // config.window_s
    opened: list[dict[str, Any]] = []
    p = np.full(plant.lines, plant.p)
    for t in range(steps):
        if shift_line is not None and t * config.window_s >= shift_at_min * 60:
            p[shift_line] = min(1.0, plant.p * factor)
        d = _window_counts(rng, plant, n, p)
        start = t * config.window_s * US
        for li in range(plant.lines):
            rec = RateRecord(f"L{li}", "", "", start, config.window_s, n, int(d[li]), int(d[li]), 0, None, True)
            for _topic, _key, a in proc.on_window(rec):
                if a["state"] == "open" and a["fired"] == 1:
                    opened.append(a)
    return opened


def simulate_drift(plant: Plant, minutes: int, seed: int, config: DriftConfig, *, shift_cam: int | None = None,
                   shift_at_min: int = 0, brightness_factor: float = 0.9, ramp_min: int = 0) -> list[dict[str, Any]]:
    """Drift alerts over ``minutes`` of per-camera minute means; optional lighting change on one camera.

    A lighting change scales brightness and contrast by ``brightness_factor`` (over ``ramp_min``
    minutes; 0 = a step, like a lamp failing) and sharpness by its square (Laplacian variance).
    """
    rng = np.random.default_rng(seed + 1)
    proc = DriftProcessor(config)
    cams = plant.lines * plant.cameras
    n = int(plant.fps * config.window_s)
    stats = list(BASE_STATS)
    base = np.array([[BASE_STATS[s] * (1 + 0.1 * rng.standard_normal()) for s in stats] for _ in range(cams)])
    frame_sd = np.array([FRAME_SD[s] for s in stats])
    amb_sd = np.array([AMBIENT_SD[s] for s in stats])
    phi = 0.98  # ambient wander: AR(1) with a ~50-minute memory
    amb = rng.standard_normal((cams, len(stats))) * amb_sd
    opened: list[dict[str, Any]] = []
    steps = minutes * 60 // config.window_s
    for t in range(steps):
        amb = phi * amb + math.sqrt(1 - phi ** 2) * amb_sd * rng.standard_normal((cams, len(stats)))
        means = base + amb + rng.standard_normal((cams, len(stats))) * frame_sd / math.sqrt(n)
        minute = t * config.window_s / 60
        if shift_cam is not None and minute >= shift_at_min:
            frac = 1.0 if ramp_min <= 0 else min(1.0, (minute - shift_at_min) / ramp_min)
            f = 1 + (brightness_factor - 1) * frac
            means[shift_cam, 0] *= f
            means[shift_cam, 1] *= f
            means[shift_cam, 2] *= f * f
        start = t * config.window_s * US
        for c in range(cams):
            line = f"L{c // plant.cameras}"
            pts = proc.monitor.add_means(f"{line}-C{c % plant.cameras}", line, start, n,
                                         {s: float(means[c, i]) for i, s in enumerate(stats)})
            for _topic, _key, a in proc.on_points(pts):
                if a["state"] == "open" and a["fired"] == 1:
                    opened.append(a)
    return opened


def bench_alerts(weeks: float, plant: Plant, seed: int, spc: SpcConfig | None = None,
                 drift: DriftConfig | None = None, shifts: int = 5) -> dict[str, Any]:
    """False alerts per week over in-control weeks, and detection delays over injected shifts."""
    spc = spc or SpcConfig()
    drift = drift or DriftConfig()
    minutes = int(weeks * WEEK_MIN)
    t0 = time.perf_counter()
    false_spc = simulate_spc(plant, minutes, seed, spc)
    false_drift = simulate_drift(plant, minutes, seed, drift)
    warm = 3 * 60  # shifts start after warm-up and reference windows
    delays_rate, delays_light_step, delays_light_ramp = [], [], []
    for i in range(shifts):
        s = seed * 1000 + i
        line = i % plant.lines
        got = [a for a in simulate_spc(plant, warm + 60, s, spc, shift_line=line, shift_at_min=warm)
               if a["line_id"] == f"L{line}" and a["window_start"] >= warm * 60 * US - spc.window_s * US]
        delays_rate.append((got[0]["window_end"] / US / 60 - warm) if got else None)
        cam = i % (plant.lines * plant.cameras)
        for ramp, sink in ((0, delays_light_step), (30, delays_light_ramp)):
            got = [a for a in simulate_drift(plant, warm + 90, s, drift, shift_cam=cam, shift_at_min=warm, ramp_min=ramp)
                   if a["camera_id"] == f"L{cam // plant.cameras}-C{cam % plant.cameras}"
                   and a["window_start"] >= warm * 60 * US]
            sink.append((got[0]["window_end"] / US / 60 - warm) if got else None)

    def summary(ds: list[float | None]) -> dict[str, Any]:
        hit = [d for d in ds if d is not None]
        return {"delays_min": ds, "detected": f"{len(hit)}/{len(ds)}",
                "max_delay_min": max(hit) if hit else None, "mean_delay_min": sum(hit) / len(hit) if hit else None}

    fa_spc = len(false_spc) / weeks
    fa_drift = len(false_drift) / weeks
    return {
        "plant": asdict(plant), "weeks": weeks, "seed": seed,
        "settings": {"spc": {k: v for k, v in asdict(spc).items() if k != "thresholds"}, "drift": asdict(drift)},
        "false_alerts_per_week": {"spc": fa_spc, "drift": fa_drift, "total": fa_spc + fa_drift},
        "false_alert_rules": sorted({a["rule"] for a in false_spc + false_drift}),
        "rate_doubling_one_line": summary(delays_rate),
        "lighting_step_10pct_one_camera": summary(delays_light_step),
        "lighting_ramp_10pct_over_30min_one_camera": summary(delays_light_ramp),
        "targets": {"false_alerts_per_week": "< 2", "rate_doubling_delay_min": "<= 15", "lighting_delay_min": "<= 30"},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


def _rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def bench_rates(n: int, plant: Plant, seed: int, *, sim_minutes: int = 60) -> dict[str, Any]:
    """Inspections/s through the rates processor, and RSS after ``sim_minutes`` of simulated traffic."""
    from stream_processors.processors import RatesProcessor

    rng = np.random.default_rng(seed)
    cams = [(f"L{li}", f"L{li}-C{c}") for li in range(plant.lines) for c in range(plant.cameras)]
    classes = ["scratch", "dent", "spot"]
    fps_total = plant.fps * len(cams)
    step_us = int(US / fps_total)

    def inspections(count: int, t0_us: int) -> Any:
        fails = rng.random(count) < plant.p
        for i in range(count):
            line, cam = cams[i % len(cams)]
            dets = [{"class_name": classes[i % 3], "score": 0.8}] if fails[i] else []
            yield {"frame_id": str(uuid.UUID(int=i)), "line_id": line, "camera_id": cam, "captured_at": t0_us + i * step_us,
                   "verdict": "FAIL" if fails[i] else "PASS", "detections": dets, "timings": {"total_ms": 12.0}}

    proc = RatesProcessor()
    recs = list(inspections(n, 1_800_000_000 * US))
    t0 = time.perf_counter()
    outs = 0
    for r in recs:
        outs += len(proc.handle(r, 0.0))
    dt = time.perf_counter() - t0
    rss0 = _rss_mb()
    sim = int(sim_minutes * 60 * fps_total)
    proc2 = RatesProcessor()
    rss_samples = []
    chunk = int(fps_total * 600)
    start = 1_900_000_000 * US
    for done in range(0, sim, chunk):
        for r in inspections(min(chunk, sim - done), start + done * step_us):
            proc2.handle(r, 0.0)
        rss_samples.append(round(_rss_mb(), 1))
    return {
        "plant": asdict(plant), "inspections": n, "seconds": round(dt, 3),
        "inspections_per_s": round(n / dt), "records_out": outs, "target_per_s": ">= 5000",
        "simulated_minutes": sim_minutes, "simulated_inspections": sim,
        "rss_mb_before": round(rss0, 1), "rss_mb_every_10_min": rss_samples,
        "state_keys_after": proc2.windows.state_size(), "late_frames": proc2.windows.late_frames,
    }


def bench_rates_broker(settings: Any, n: int, seed: int = 0) -> dict[str, Any]:
    """The rates app on a real broker: N inspections produced to a fresh topic prefix, then consumed,
    decoded, windowed and published by a ProcessorRunner; inspections/s from its first to last batch."""
    import threading

    from infra.kafka import create_topics, delete_topics
    from infra.kafka import producer as make_producer
    from schemas.catalog import TopicCatalog
    from schemas.serde import serialize
    from stream_processors.app import ProcessorRunner
    from stream_processors.processors import RatesProcessor

    prefix = f"bench{uuid.uuid4().hex[:6]}."
    s = settings.model_copy(update={"topic_prefix": prefix})
    cat = TopicCatalog(prefix)
    create_topics(s, cat)
    try:
        rng = np.random.default_rng(seed)
        p = make_producer(s, client_id="bench-rates")
        t0_us = (int(time.time()) - 3600) * US
        base = {"seq": 0, "part_id": None, "inspected_at": t0_us, "image_uri": "file:///x.jpg", "width": 640,
                "height": 480, "model_name": "bench", "model_version": "1",
                "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {}, "source": "", "image_score": None},
                "verdict_rules": [], "mask_uri": None, "segmenter": None,
                "image_stats": {"brightness": 120.0, "contrast": 40.0, "sharpness": 300.0, "max_score": 0.3},
                "timings": {k: 1.0 for k in ("queue_ms", "fetch_ms", "decode_ms", "infer_ms", "postprocess_ms",
                                             "segment_ms", "total_ms")},
                "batch_size": 8, "worker_id": "bench", "source_partition": 0, "source_offset": 0}
        fails = rng.random(n) < 0.02
        for i in range(n):
            cam = f"L{i % 4}-C{(i // 4) % 4}"
            det = [{"class_id": 0, "class_name": "scratch", "score": 0.9, "x1": 1.0, "y1": 1.0, "x2": 9.0, "y2": 9.0,
                    "mask": None, "polygon": [], "area_mm2": None, "length_mm": None}] if fails[i] else []
            rec = base | {"frame_id": str(uuid.UUID(int=i + 1)), "line_id": f"L{i % 4}", "camera_id": cam,
                          "captured_at": t0_us + i * 6250, "verdict": "FAIL" if fails[i] else "PASS", "detections": det}
            value, headers = serialize("inspection", rec)
            while True:
                try:
                    p.produce(cat.inspections, value=value, key=cam.encode(), headers=headers)
                    break
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
        p.flush(60)
        stop = threading.Event()
        runner = ProcessorRunner(s, RatesProcessor(), group_id=f"bench-rates-{uuid.uuid4().hex[:6]}", stop_event=stop)
        marks: list[float] = []
        orig = runner._batch

        def timed(msgs: list[Any], loop: Any) -> None:
            orig(msgs, loop)
            marks.append(time.perf_counter())

        runner.loop.on_batch = timed
        t_start = time.perf_counter()
        runner.run(max_idle_s=8)  # after the last batch: 5 s idle close publishes the open windows
        if not marks:
            raise RuntimeError("the rates app consumed nothing")
        first_batch = marks[0]
        return {"inspections": n, "consumed": runner.loop.consumed, "published": runner.published,
                "seconds_first_to_last_batch": round(marks[-1] - first_batch, 3),
                "seconds_including_group_join": round(marks[-1] - t_start, 3),
                "inspections_per_s": round(runner.loop.consumed / max(1e-9, marks[-1] - first_batch)),
                "target_per_s": ">= 5000", "rss_mb": round(_rss_mb(), 1), **runner.processor.metrics()}
    finally:
        delete_topics(s, [name for name, _ in cat.all()])
