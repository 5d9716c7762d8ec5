"""`sqis bench review`: how many frames per hour the demo's synthetic line queues for review (issue #21 s.2).

Offline, no stack: ``--frames`` synthetic parts (producers/synthetic.py, the demo's cameras: 320 x 320,
defect rate 0.3) go through the served model as a worker serves it (one batched forward pass, the
verdict, the active-learning marks of inference_workers/review.py with the settings' band, candidates
and mask rule). The marked share, per reason, scales to the demo line (``--cameras`` on ``--lines`` at
``--fps``): frames offered per line and hour, and those queued under the rate and the per-hour cap (the
sampler's rate is a hash of the frame id, so the expected share is the rate itself; with the cap spread
over the hour, its slots are used evenly whenever more is offered than the cap). Also the time the
marking adds per frame (the candidate decode). Prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Annotated, Any

import typer

from sqis.bench.pipeline import bench_app


@bench_app.command("review")
def bench_review(
    frames: Annotated[int, typer.Option("--frames", min=10, max=5000, help="synthetic frames run through the model")] = 400,
    batch: Annotated[int, typer.Option("--batch", min=1, max=64, help="frames per forward pass")] = 8,
    cameras: Annotated[int, typer.Option("--cameras", min=1, max=64, help="demo cameras")] = 4,
    lines: Annotated[int, typer.Option("--lines", min=1, max=16, help="demo lines")] = 2,
    fps: Annotated[float, typer.Option("--fps", min=0.1, max=100.0, help="frames per second per camera")] = 2.0,
    defect_rate: Annotated[float, typer.Option("--defect-rate", min=0.0, max=1.0)] = 0.3,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**31 - 1)] = 7,
    model: Annotated[str | None, typer.Option("--model", help="default: the demo model")] = None,
) -> None:
    """Share of frames marked for review on the synthetic line, and frames queued per line and hour, as JSON."""
    import numpy as np

    from inference_workers.inference import load_served
    from inference_workers.review import ReviewPolicy
    from inference_workers.verdict import decide
    from infra.settings import Settings
    from producers.synthetic import render_part
    from sqis.demo import resolve_demo_model

    settings = Settings(local=True)
    uri = resolve_demo_model(settings, model).uri
    served = load_served(settings, uri)
    rp = ReviewPolicy.from_settings(settings)
    rng = np.random.default_rng(seed)
    images = [render_part(rng, 320, 320, defect_rate=defect_rate)[0] for _ in range(frames)]
    reasons: dict[str, int] = {}
    marked = fails = marked_pass = 0
    n_cands: list[int] = []
    plain_ms: list[float] = []
    mark_ms: list[float] = []
    for i in range(0, frames, batch):
        chunk = images[i:i + batch]
        t0 = time.perf_counter()
        out, fwd = served.detect_batch(chunk)
        out = served.finish(chunk, out, fwd)
        t1 = time.perf_counter()
        for j, dets in enumerate(out.results):
            if isinstance(dets, Exception):
                continue
            fail = decide(dets, served.thresholds) == "FAIL"
            fails += fail
            cands = served.candidates(fwd, j, rp.band, rp.top_k) if hasattr(served, "candidates") else None
            m = rp.mark(dets, served.thresholds, cands)
            if m.reasons:
                marked += 1
                marked_pass += not fail
                n_cands.append(len(m.candidates))
                for r in m.reasons:
                    reasons[r] = reasons.get(r, 0) + 1
        t2 = time.perf_counter()
        plain_ms.append((t1 - t0) * 1000 / len(chunk))
        mark_ms.append((t2 - t1) * 1000 / len(chunk))
    share = marked / frames
    per_line_fps = fps * cameras / lines
    offered_h = share * per_line_fps * 3600
    rate, cap = settings.review_rate, settings.review_per_hour
    sampled_h = rate * offered_h
    out_json: dict[str, Any] = {
        "model": uri, "frames": frames, "thresholds": served.thresholds.to_avro(),
        "settings": {"review_band": rp.band, "review_candidates": rp.top_k, "review_min_mask_frac": rp.min_mask_frac,
                     "review_rate": rate, "review_per_hour": cap},
        "fail_share": round(fails / frames, 4), "marked_share": round(share, 4),
        "marked_pass_share": round(marked_pass / frames, 4),  # of which PASS frames (their candidates matter)
        "marked_by_reason": {k: round(v / frames, 4) for k, v in sorted(reasons.items())},
        "candidates_per_marked_frame": round(statistics.mean(n_cands), 2) if n_cands else 0,
        "line": {"cameras": cameras, "lines": lines, "fps_per_camera": fps, "frames_per_line_hour": per_line_fps * 3600},
        "offered_per_line_hour": round(offered_h, 1), "sampled_per_line_hour": round(sampled_h, 1),
        "queued_per_line_hour": round(min(cap, sampled_h), 1),
        # spread (default): the cap's slots are released evenly, so one frame every 60/queued minutes
        "spread": settings.review_spread,
        "minutes_between_queued": round(60 / min(cap, sampled_h), 1) if min(cap, sampled_h) > 0 else None,
        "infer_ms_per_frame_median": round(statistics.median(plain_ms), 3),
        "marking_ms_per_frame_median": round(statistics.median(mark_ms), 3),
        "marking_ms_per_frame_max": round(max(mark_ms), 3),
    }
    typer.echo(json.dumps(out_json, indent=2))
