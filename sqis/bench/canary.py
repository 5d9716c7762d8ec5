"""Challenger helpers for the canary tests and ``sqis bench canary``: a deliberately bad challenger
(a YOLOv8 ONNX detector with inverted class scores) and the time a canary takes to be rolled back or
promoted on the local stack."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix


def invert_scores(src: Path | str, dst: Path | str) -> Path:
    """Write a copy of the YOLOv8 detector ``src`` whose class scores are ``1 - score`` (boxes unchanged):
    a challenger that sees defects everywhere it saw none. Needs the onnx package."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    out = m.graph.output[0].name
    raw = f"{out}_raw"
    for node in m.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    consts = {"inv_0": [0], "inv_4": [4], "inv_end": [2**62], "inv_ax": [1]}
    for k, v in consts.items():
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    m.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "inv_one"))
    m.graph.node.extend([
        helper.make_node("Slice", [raw, "inv_0", "inv_4", "inv_ax"], ["inv_boxes"]),
        helper.make_node("Slice", [raw, "inv_4", "inv_end", "inv_ax"], ["inv_scores"]),
        helper.make_node("Sub", ["inv_one", "inv_scores"], ["inv_inverted"]),
        helper.make_node("Concat", ["inv_boxes", "inv_inverted"], [out], axis=1),
    ])
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return Path(dst)


def run_canary(settings: Any, model: str, tmp: Path, *, bad: bool, cameras: int = 4, lines: int = 2,
               fps: float = 10.0, share: float = 0.5, poll_s: float = 0.5, clean_s: float = 10.0,
               min_frames: int = 20, max_s: float = 120.0) -> dict[str, Any]:
    """One canary on line-1 of a worker in this process: a bad (inverted-score) or good (same weights)
    challenger; the time to the decision and until the worker stopped routing, and what leaked."""
    import threading
    import uuid

    from inference_workers.worker import InferenceWorker
    from producers.run import run_producer
    from sqis.bench.harness import TopicCollector
    from sqis.canary import CanaryController, CanaryPolicy
    from training.registry import client_for, ensure_experiment, promote, register_onnx

    name = f"bench-canary-{uuid.uuid4().hex[:6]}"
    s = settings.model_copy(update={"state_dir": tmp, "mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                                    "shadow_share": share, "challenger_poll_s": poll_s})
    client = client_for(s)
    challenger = invert_scores(model, tmp / "inverted.onnx") if bad else Path(model)
    for path in (Path(model), challenger):  # a run each: a version's source is its run's model/ directory
        run = client.create_run(ensure_experiment(client, s, "bench-canary"))
        register_onnx(client, run, path, name)
        client.set_terminated(run.info.run_id)
    promote(client, name, "1", "production")
    promote(client, name, "2", "challenger")
    insp = TopicCollector(s, "inspections")
    worker = InferenceWorker(s, f"models:/{name}@production", model_poll_s=poll_s, max_batch=8, max_wait_ms=20,
                             fetch_threads=2, group_id=f"bench-canary-{uuid.uuid4().hex[:6]}")
    stop_w, stop_p = threading.Event(), threading.Event()
    threads = [threading.Thread(target=worker.run, args=(stop_w,), daemon=True)]
    policy = CanaryPolicy(min_frames=min_frames, min_pairs=min_frames, clean_s=clean_s, latency_budget_ms=60_000)
    ctl = CanaryController(s, name, lines=["line-1"], policy=policy, poll_s=poll_s)
    outcome: list[Any] = []
    try:
        threads[0].start()
        t_ctl = threading.Thread(target=lambda: outcome.append(ctl.run(max_s=max_s)), daemon=True)
        t_ctl.start()
        ch = worker.challenger
        t0 = time.monotonic()
        while worker.challenger is None or ch.canary_model() is None:
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the worker never picked up the canary route")
            time.sleep(0.05)
        route_seen_s = time.monotonic() - t0
        prod = threading.Thread(target=run_producer, args=(s, "synthetic"), kwargs=dict(
            cameras=cameras, lines=lines, fps=fps, frames=0, size="64x64", install_signal_handlers=False,
            stop_event=stop_p), daemon=True)
        prod.start()
        t_ctl.join(max_s + 30)
        time.sleep(2 * poll_s)
        stop_p.set()
        prod.join(30)
        time.sleep(1.0)
        recs = insp.snapshot()
    finally:
        stop_p.set()
        stop_w.set()
        for t in threads:
            t.join(60)
        insp.close()
    o = outcome[0] if outcome else None
    decided = ctl.state.started_at + (o.decided_after_s if o else max_s)  # the controller's decision (wall clock)
    chal = [r for r in recs if r["model_version"] == "2"]
    before = [r for r in chal if r["inspected_at"] / 1e6 <= decided]
    after = [r for r in chal if r["inspected_at"] / 1e6 > decided]
    return {"challenger": "inverted scores" if bad else "same weights", "outcome": o.action if o else None,
            "rule": o.rule if o else None, "decided_after_s": round(o.decided_after_s, 2) if o else None,
            "route_seen_by_worker_s": round(route_seen_s, 2),
            "challenger_verdicts": len(chal), "challenger_fail": sum(r["verdict"] == "FAIL" for r in chal),
            # after a rollback: how long the worker kept serving line-1 with it; after a promotion it is production
            "challenger_verdicts_after_decision": len(after),
            "last_challenger_verdict_after_decision_s": round(max(r["inspected_at"] for r in after) / 1e6 - decided, 2)
            if after else None,
            "challenger_verdicts_outside_line_1_before_decision": sum(r["line_id"] != "line-1" for r in before),
            "inspections": len(recs), "evidence": o.evidence if o else None, "fps": fps, "poll_s": poll_s, "clean_s": clean_s, "min_frames": min_frames}


def bench_canary(
    fps: Annotated[float, typer.Option("--fps", min=0.5, help="frames/s per camera (4 cameras, 2 lines)")] = 5.0,
    poll_s: Annotated[float, typer.Option("--poll-s", min=0.05, help="controller judge + worker route poll")] = 0.5,
    clean_s: Annotated[float, typer.Option("--clean-s", min=0, help="clean period before promotion")] = 10.0,
    min_frames: Annotated[int, typer.Option("--min-frames", min=1)] = 20,
    only: Annotated[str, typer.Option("--only", help="bad | good | both")] = "both",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """A bad (inverted scores) and a good (same weights) challenger on line-1: time to rollback / promotion,
    time until the worker stopped routing, challenger verdicts outside line-1 and after the decision."""
    import os

    from sqis.bench.pipeline import BenchParams, bench_session

    results = []
    with bench_session(BenchParams(onnx_threads=1), state_dir=state_dir, bootstrap=bootstrap,
                       topic_prefix=topic_prefix) as sess:
        for bad in [b for b in (True, False) if only == "both" or (only == "bad") == b]:
            sub = sess.tmp / ("bad" if bad else "good")
            sub.mkdir()
            results.append(run_canary(sess.settings, sess.model, sub, bad=bad, fps=fps, poll_s=poll_s,
                                      clean_s=clean_s, min_frames=min_frames))
    out = {"runs": results, "cpu_count": os.cpu_count()}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        for r in results:
            typer.echo(json.dumps(r))
