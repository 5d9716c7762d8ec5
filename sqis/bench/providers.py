"""`sqis bench model --provider cpu,cpu-int8,openvino,openvino-int8`: providers x models side by side.

A provider with the suffix ``-int8`` runs the model's INT8 file (`sqis model quantize` writes
``<stem>-int8.onnx`` next to the FP32 file) on that runtime. Runs are interleaved (every repeat
goes through every model and provider in turn) so a machine shared with other jobs slows all of them
alike; the summary gives the median and the worst of the repeats. With a dataset per model, each
provider's mAP@0.5 on the test split is measured through the same detector.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.quantize import INT8_SUFFIX, int8_path

__all__ = ["PROVIDERS", "bench_model", "bench_providers", "int8_path", "parse_providers"]

PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino")

def parse_providers(spec: str) -> list[tuple[str, str, bool]]:
    """'cpu,openvino-int8' -> [(label, runtime provider, int8)]; ValueError on an unknown name."""
    out = []
    for raw in (s.strip().lower() for s in spec.split(",")):
        if not raw:
            continue
        int8 = raw.endswith(INT8_SUFFIX)
        base = raw.removesuffix(INT8_SUFFIX)
        if base not in PROVIDERS:
            raise ValueError(f"--provider {raw!r}: choose from {', '.join(PROVIDERS)}, each optionally with {INT8_SUFFIX}")
        out.append((raw, base, int8))
    if not out:
        raise ValueError("--provider: name at least one provider")
    return out


def bench_model(model: str, *, provider: str = "cpu", batches: Sequence[int] = (1, 8), runs: int = 30,
                warmup: int = 5, fp16: bool = False, engine_cache_dir: Path | None = None, size: int = 256,
                threads: int = 0) -> dict[str, Any]:
    """The model alone on one execution provider: latency per batch size and frames/s."""
    import cv2

    from inference_workers.detector import Detector, Thresholds, make_session
    from sqis.bench.harness import render_jpegs

    t0 = time.perf_counter()
    session = make_session(model, provider, threads, fp16=fp16, engine_cache_dir=engine_cache_dir)
    det = Detector(session, Thresholds(), path=model)
    load_s = time.perf_counter() - t0
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in render_jpegs(16, size)]
    out: dict[str, Any] = {"model": model, "provider": provider, "providers": det.providers, "fp16": fp16,
                           "engine_cache_dir": str(engine_cache_dir) if engine_cache_dir else None,
                           "session_load_s": round(load_s, 3), "imgsz": list(det.imgsz), "batches": {}}
    for b in batches:
        batch = [images[i % len(images)] for i in range(b)]
        t_w = time.perf_counter()
        for _ in range(warmup):
            det.detect(batch)
        warm_s = time.perf_counter() - t_w
        ms = []
        for _ in range(runs):
            t = time.perf_counter()
            det.detect(batch)
            ms.append((time.perf_counter() - t) * 1000)
        out["batches"][str(b)] = {"warmup_s": round(warm_s, 3), "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95),
                                  "fps": round(b * 1000 / float(np.median(ms)), 2)}
    return out


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 2) if len(values) else None


def _map50(model: str, provider: str, data: Path, threads: int) -> float | None:
    from infra.settings import Settings
    from training.evaluate import evaluate

    settings = Settings(onnx_providers=provider, onnx_threads=threads)
    return evaluate(model, data, "test", settings=settings)["map50"]


def bench_providers(
    models: Sequence[str], providers: str, *, data: Sequence[Path | None] = (), int8: Sequence[str | None] = (),
    batches: Sequence[int] = (1, 8), runs: int = 30, warmup: int = 5, threads: int = 2, repeat: int = 3,
    size: int = 256, say: Any = None,
) -> dict[str, Any]:
    """Every model on every provider, `repeat` interleaved rounds; per (model, provider, batch): the
    frames/s and p50/p95 of each round, their median and worst, and the mAP@0.5 when data is given."""
    specs = parse_providers(providers)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    files: dict[tuple[str, str], str] = {}
    for i, m in enumerate(models):
        q = (int8[i] if i < len(int8) else None) or str(int8_path(m))
        for label, _, is_int8 in specs:
            path = q if is_int8 else m
            if not Path(path).is_file():
                raise FileNotFoundError(f"{label}: no INT8 model {path} (run `sqis model quantize` first)")
            files[(m, label)] = path
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]  # a shared machine: say how busy it was
    for r in range(repeat):
        for m in models:
            for label, base, _ in specs:
                if say:
                    say(f"round {r + 1}/{repeat}: {Path(m).parent.name}/{Path(m).name} on {label}")
                res = bench_model(files[(m, label)], provider=base, batches=batches, runs=runs, warmup=warmup,
                                  threads=threads, size=size)
                row = rows.setdefault((m, label), {"model": m, "provider": label, "file": files[(m, label)],
                                                   "runtime": res["providers"], "imgsz": res["imgsz"], "rounds": []})
                row["rounds"].append({"session_load_s": res["session_load_s"], "batches": res["batches"]})
    for row in rows.values():
        summary = {}
        for b in batches:
            per = [rd["batches"][str(b)] for rd in row["rounds"]]
            fps = [p["fps"] for p in per]
            p95 = [p["p95_ms"] for p in per]
            p50 = [p["p50_ms"] for p in per]
            summary[str(b)] = {"fps_median": round(float(np.median(fps)), 2), "fps_worst": min(fps),
                               "p50_ms_median": round(float(np.median(p50)), 2),
                               "p95_ms_median": round(float(np.median(p95)), 2), "p95_ms_worst": max(p95)}
        row["summary"] = summary
    for i, m in enumerate(models):
        d = data[i] if i < len(data) else None
        if d is None:
            continue
        for label, base, _ in specs:
            if say:
                say(f"mAP: {Path(m).parent.name} on {label}")
            rows[(m, label)]["map50_test"] = round(float(_map50(files[(m, label)], base, Path(d), threads) or 0), 4)
            rows[(m, label)]["data"] = str(d)
    for m in models:  # speed-up against FP32 ONNX Runtime CPU, where it was run
        ref = rows.get((m, "cpu"))
        if ref is None:
            continue
        for label, _, _ in specs:
            row = rows[(m, label)]
            row["speedup_vs_cpu"] = {b: round(row["summary"][b]["fps_median"] / ref["summary"][b]["fps_median"], 2)
                                     for b in row["summary"]}
    return {"threads": threads, "runs_per_round": runs, "warmup": warmup, "rounds": repeat, "batches": list(batches),
            "image_size": size, "wall_s": round(time.perf_counter() - t0, 1), "load_avg_start": load_start,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "results": list(rows.values())}
