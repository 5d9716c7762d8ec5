"""``sqis bench lifecycle``: the whole model-lifecycle loop on the local stack, on synthetic data, timed.

    production  the demo YOLOv8n (models/demo, trained on the synthetic camera) registered @production,
                a synthetic base dataset logged as a dataset version
    live        synthetic cameras -> an inference worker -> ``inspections`` -> the PostgreSQL sink
    review      the FAIL frames reviewed through dashboard.queries.set_review by a simulated operator who
                sees the part (the synthetic camera's ``FrameRef.truth``): false_reject when it has no defect,
                confirmed when the model boxed every defect, skipped when it missed one (the dashboard cannot
                fix boxes); a seeded share of them
    retrain     training/retrain.py: reviewed frames + base -> new dataset version -> fine-tune -> calibrate
                -> gate -> @challenger
    shadow      the worker shadows a share of the frames with the challenger; the shadow agreement
                processor (stream_processors/shadow.py, as ``sqis model shadow``) writes shadow_agreement
    canary      ``CanaryController`` routes line-1 to the challenger -> promoted after the clean period
    bad         an inverted-score challenger (sqis.bench.canary.invert_scores) -> canary -> rolled back

Everything runs in this process against one local stack (Kafka, PostgreSQL) started for the run (or the one
under --state-dir); MLflow is a SQLite file in a temporary folder. The result is one JSON document: seconds per
step, the dataset digests, the versions, the agreement figures, the decisions and their evidence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.cli_common import StateDir

log = logging.getLogger(__name__)

CAMERAS, LINES = 4, 2  # cam-01/03 on line-1 (the canary line), cam-02/04 on line-2
CANARY_LINES = ["line-1"]
DEMO_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"


def _iou(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    w = min(a["x2"], b["x2"]) - max(a["x1"], b["x1"])
    h = min(a["y2"], b["y2"]) - max(a["y1"], b["y1"])
    inter = max(0.0, w) * max(0.0, h)
    union = (a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]) - inter
    return inter / union if union > 0 else 0.0


def operator_decision(boxes: Sequence[Mapping[str, Any]], truth: Sequence[Mapping[str, Any]] | None,
                      min_iou: float = 0.3) -> str | None:
    """What an operator who sees the part decides on a FAIL frame: ``false_reject`` when it has no defect,
    ``confirmed`` when every defect has a box of its class on it (IoU >= min_iou), else None: the frame is
    left unreviewed, since the dashboard cannot fix boxes and confirming would teach the missed defect as
    background. None too without ground truth."""
    if truth is None:
        return None
    if not truth:
        return "false_reject"
    hit = all(any(b["class_name"] == t["class_name"] and _iou(b, t) >= min_iou for b in boxes) for t in truth)
    return "confirmed" if hit else None


def simulated_reviews(candidates: Sequence[Mapping[str, Any]], truth: Mapping[str, Sequence[Any] | None],
                      share: float, seed: int) -> list[tuple[str, str]]:
    """(frame_id, decision) of the simulated operator on a seeded ``share`` of the FAIL frames
    (:func:`operator_decision` on each; the frames it leaves undecided are skipped). Deterministic for a seed."""
    fails = sorted(str(c["frame_id"]) for c in candidates if c["verdict"] == "FAIL")
    picked = sorted(random.Random(seed).sample(fails, round(len(fails) * share)))
    boxes = {str(c["frame_id"]): c.get("boxes") or [] for c in candidates}
    out = [(f, operator_decision(boxes[f], truth.get(f))) for f in picked]
    return [(f, d) for f, d in out if d is not None]


class _Clock:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.warning(f"lifecycle: {name} ...", extra={"step": name})
        try:
            yield
        finally:
            self.steps[name] = round(time.perf_counter() - t0, 2)
            log.warning(f"lifecycle: {name} done in {self.steps[name]:.1f} s", extra={"step": name,
                                                                                  "seconds": self.steps[name]})


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"lifecycle bench: {what} not within {timeout:.0f} s")
        time.sleep(0.1)


class _Producer:
    """Synthetic cameras in a thread: a fixed number of frames, or until stopped."""

    def __init__(self, s: Any, *, frames: int, fps: float, seed: int, size: int) -> None:
        from producers.run import run_producer

        self.stop = threading.Event()
        self.stats: list[Any] = []
        self.thread = threading.Thread(target=lambda: self.stats.append(run_producer(
            s, "synthetic", cameras=CAMERAS, lines=LINES, fps=fps, frames=frames, size=f"{size}x{size}", seed=seed,
            install_signal_handlers=False, stop_event=self.stop)), daemon=True)
        self.thread.start()

    def close(self, timeout: float = 60) -> None:
        self.stop.set()
        self.thread.join(timeout)


def _count(conn: Any, sql: str, params: Sequence[Any] = ()) -> int:
    return int(conn.execute(sql, params).fetchone()[0] or 0)


def _canary(s: Any, name: str, dsn: str, *, fps: float, seed: int, size: int, poll_s: float, clean_s: float,
            min_frames: int, min_agreement: float, max_s: float) -> dict[str, Any]:
    from sqis.canary import CanaryController, CanaryPolicy

    # latency is not judged: on a shared CPU the bench's own training and producers set it, not the model
    policy = CanaryPolicy(min_frames=min_frames, min_pairs=min_frames, clean_s=clean_s, latency_budget_ms=60_000,
                          min_agreement=min_agreement)
    ctl = CanaryController(s, name, lines=CANARY_LINES, policy=policy, dsn=dsn, poll_s=poll_s, lease_s=60)
    prod = _Producer(s, frames=0, fps=fps, seed=seed, size=size)
    try:
        out = ctl.run(max_s=max_s)
    finally:
        prod.close()
    return {"version": out.version, "action": out.action, "rule": out.rule, "message": out.message,
            "decided_after_s": round(out.decided_after_s, 2), "evidence": out.evidence}


def run_lifecycle(s: Any, tmp: Path, *, epochs: int, imgsz: int | None, batch: int, base_images: int,
                  frames: int, shadow_frames: int, fps: float, size: int, review_share: float, shadow_share: float,
                  clean_s: float, min_frames: int, min_agreement: float, margin: float, seed: int,
                  max_canary_s: float, lr0: float | None = None, recall_slack: float = 0.0) -> dict[str, Any]:
    """The loop on a ready stack (settings ``s`` with topics, PostgreSQL, object store); returns the report."""
    from dashboard.queries import set_review
    from inference_workers.worker import InferenceWorker
    from infra.db import connect
    from producers.synthetic import generate_dataset
    from sinks.postgres import PostgresSink
    from sqis.bench.canary import invert_scores
    from sqis.bench.harness import TopicCollector
    from stream_processors.shadow import run_agreement
    from training.calibrate import calibrate
    from training.dataset_versions import log_dataset_version
    from training.importers import import_dataset
    from training.registry import client_for, ensure_experiment, promote, register_onnx
    from training.retrain import FINE_TUNE_ARGS, retrain
    from training.train import register_checkpoint

    clock = _Clock()
    report: dict[str, Any] = {"seconds": clock.steps}
    name = f"lifecycle-{uuid.uuid4().hex[:6]}"
    report["model_name"] = name
    client = client_for(s)
    dsn = s.dsn()

    with clock.step("base_dataset"):  # fresh parts (not the demo's own training images: another seed)
        generate_dataset(tmp / "raw", base_images, seed=1000 + seed, size=size)
        base = tmp / "datasets" / "synthetic-base"
        import_dataset("yolo", tmp / "raw", base, force=True)
        dv, _ = log_dataset_version(s, base, "synthetic-base", operation="synth")
        report["base_dataset"] = {"name": dv.name, "version": dv.version, "digest": dv.digest, "images": dv.images}

    with clock.step("production"):
        ckpt = tmp / "demo" / "best.pt"  # the export writes next to the checkpoint: not into models/demo
        ckpt.parent.mkdir()
        shutil.copy2(DEMO_DIR / "best.pt", ckpt)
        tr = register_checkpoint(ckpt, DEMO_DIR / "results.csv", base / "data.yaml", name,
                                 settings=s, run_name="demo-production")
        if tr.model_version is None:
            raise RuntimeError("the demo checkpoint was not registered (parity check)")
        # at its own operating point, as a deployed model is (`sqis calibrate`): the gate then compares both
        # models calibrated the same way (max FPR 5 % on val), not a calibrated challenger with a default champion
        cal = calibrate(f"models:/{name}/{tr.model_version}", base, "val", max_fpr=0.05, settings=s,
                        out_dir=tmp / "calibration", store=True)
        promote(client, name, tr.model_version, "production")
        report["production_version"] = tr.model_version
        report["production_operating_point"] = cal.point.to_dict() if cal.point else None

    frames_seen = TopicCollector(s, "frames")
    worker = InferenceWorker(s, f"models:/{name}@production", model_poll_s=1.0, max_batch=8, max_wait_ms=20,
                             fetch_threads=2, group_id=f"lifecycle-{uuid.uuid4().hex[:6]}")
    sink = PostgresSink(s, group_id=f"lifecycle-sink-{uuid.uuid4().hex[:6]}", max_wait_ms=200)
    stop_w = threading.Event()
    threads = [threading.Thread(target=worker.run, args=(stop_w,), daemon=True),
               threading.Thread(target=sink.run, daemon=True)]
    conn = connect(dsn, autocommit=True)
    try:
        for t in threads:
            t.start()
        with clock.step("live"):
            n = CAMERAS * frames
            _Producer(s, frames=frames, fps=fps, seed=seed, size=size).thread.join()
            _wait(lambda: _count(conn, "SELECT count(*) FROM inspections WHERE model_name = %s", (name,)) >= n,
                  120 + n, f"{n} inspections in PostgreSQL")
            report["live"] = {"frames": n, "fps_per_camera": fps, "fail": _count(
                conn, "SELECT count(*) FROM inspections WHERE model_name = %s AND verdict = 'FAIL'", (name,))}

        with clock.step("review"):
            truth = {str(r["frame_id"]): r.get("truth") for r in frames_seen.snapshot()}
            rows = conn.execute(
                "SELECT i.frame_id::text, i.verdict, coalesce((SELECT json_agg(json_build_object('class_name',"
                " d.class_name, 'x1', d.x1, 'y1', d.y1, 'x2', d.x2, 'y2', d.y2)) FROM defects d"
                " WHERE d.frame_id = i.frame_id), '[]'::json) FROM inspections i WHERE i.model_name = %s",
                (name,)).fetchall()
            decisions = simulated_reviews([{"frame_id": f, "verdict": v, "boxes": b} for f, v, b in rows], truth,
                                          review_share, seed)
            for fid, d in decisions:
                set_review(conn, fid, d, "bench-operator", "simulated from the synthetic ground truth")
            report["review"] = {"fail_frames": sum(v == "FAIL" for _, v, _ in rows), "reviewed": len(decisions),
                                "confirmed": sum(d == "confirmed" for _, d in decisions),
                                "false_reject": sum(d == "false_reject" for _, d in decisions)}

        with clock.step("retrain"):
            rr = retrain(s, name=name, base="synthetic-base", epochs=epochs, imgsz=imgsz, batch=batch, margin=margin,
                         recall_slack=recall_slack, lr0=lr0, seed=seed, out=tmp / "retrain", progress=False)
            report["retrain"] = {"lr0": FINE_TUNE_ARGS["lr0"] if lr0 is None else lr0, "status": rr.status, "version": rr.version, "reason": rr.reason,
                                 "dataset": rr.dataset, "dataset_digest": rr.dataset_digest,
                                 "timings": rr.timings, "gate": rr.gate}
        if rr.status != "registered":
            report["loop"] = f"stopped: the retrain {rr.status} the challenger ({rr.reason})"
        else:
            challenger = str(rr.version)
            with clock.step("shadow"):
                _wait(lambda: worker.challenger is not None and worker.challenger.served is not None
                      and worker.challenger.served.version == challenger, 120, "the worker loading the challenger")
                stop_a = threading.Event()
                joins: list[Any] = []
                agg = threading.Thread(target=lambda: joins.append(run_agreement(
                    s, dsn, since_s=5.0, window_s=60.0, flush_s=1.0, stop=stop_a)), daemon=True)
                agg.start()
                _Producer(s, frames=shadow_frames, fps=fps, seed=seed + 1, size=size).thread.join()
                want = int(0.5 * shadow_share * CAMERAS * shadow_frames)  # a conservative share of the expected pairs

                def pairs() -> int:
                    return _count(conn, "SELECT sum(frames) FROM shadow_agreement WHERE model_name = %s AND "
                                  "challenger_version = %s", (name, challenger))
                _wait(lambda: pairs() >= want, 120, f"{want} shadow pairs")
                time.sleep(2.0)  # the stragglers
                stop_a.set()
                agg.join(30)
                f, agree, cf, pf, mb, iou = conn.execute(
                    "SELECT sum(frames), sum(verdict_agree), sum(challenger_fail), sum(champion_fail), "
                    "sum(matched_boxes), sum(iou_sum) FROM shadow_agreement WHERE model_name = %s AND "
                    "challenger_version = %s", (name, challenger)).fetchone()
                report["shadow"] = {"pairs": int(f), "verdict_agreement": round(agree / f, 4),
                                    "champion_fail_rate": round(pf / f, 4), "challenger_fail_rate": round(cf / f, 4),
                                    "matched_boxes": int(mb), "mean_iou": round(iou / mb, 4) if mb else None,
                                    "share": shadow_share}
            with clock.step("canary_good"):
                report["canary_good"] = _canary(s, name, dsn, fps=fps, seed=seed + 2, size=size, poll_s=0.5,
                                                clean_s=clean_s, min_frames=min_frames, min_agreement=min_agreement,
                                                max_s=max_canary_s)
            report["loop"] = "promoted" if report["canary_good"]["action"] == "promote" else \
                f"canary {report['canary_good']['action']}"

        with clock.step("bad_challenger"):
            bad = invert_scores(DEMO_DIR / "model.onnx", tmp / "inverted.onnx")
            run = client.create_run(ensure_experiment(client, s, "bench-lifecycle"))
            bad_version = register_onnx(client, run, bad, name)
            client.set_terminated(run.info.run_id)
            promote(client, name, bad_version, s.challenger_alias)
            _wait(lambda: worker.challenger is not None and worker.challenger.served is not None
                  and worker.challenger.served.version == str(bad_version), 120, "the worker loading the bad challenger")
        with clock.step("canary_bad"):
            report["canary_bad"] = _canary(s, name, dsn, fps=fps, seed=seed + 3, size=size, poll_s=0.5,
                                           clean_s=max(clean_s, 600.0), min_frames=min_frames,
                                           min_agreement=min_agreement, max_s=max_canary_s)
        aliases = {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
        report["aliases_after"] = aliases
        report["model_switches"] = [
            {"action": a, "to_version": v, "reason": r[:200]} for a, v, r in conn.execute(
                "SELECT action, to_version, reason FROM model_switches WHERE model_name = %s ORDER BY at",
                (name,)).fetchall()]
    finally:
        stop_w.set()
        sink.stop()
        for t in threads:
            t.join(60)
        frames_seen.close()
        conn.close()
    return report


def bench_lifecycle(
    epochs: Annotated[int, typer.Option("--epochs", min=1, max=50, help="fine-tune epochs (CPU)")] = 3,
    imgsz: Annotated[int, typer.Option("--imgsz", min=0, max=1280, help=(
        "fine-tune image size, a multiple of 32; 0: the production checkpoint's (256)"))] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, max=256)] = 16,
    base_images: Annotated[int, typer.Option("--base-images", min=30, max=5000, help=(
        "synthetic base dataset (80/10/10 split; its test split is the gate's)"))] = 300,
    frames: Annotated[int, typer.Option("--frames", min=5, max=10_000, help=(
        "live frames per camera before the reviews (4 cameras, 2 lines)"))] = 40,
    shadow_frames: Annotated[int, typer.Option("--shadow-frames", min=5, max=10_000, help=(
        "frames per camera while the challenger is in shadow"))] = 30,
    fps: Annotated[float, typer.Option("--fps", min=0.5, max=100.0, help="frames/s per camera")] = 5.0,
    size: Annotated[int, typer.Option("--size", min=64, max=1024, help="synthetic image size (px)")] = 320,
    review_share: Annotated[float, typer.Option("--review-share", min=0.0, max=1.0, help=(
        "share of the FAIL frames the simulated operator reviews"))] = 1.0,
    shadow_share: Annotated[float, typer.Option("--shadow-share", min=0.01, max=1.0)] = 0.5,
    clean_s: Annotated[float, typer.Option("--clean-s", min=0.0, max=3600.0, help=(
        "canary clean period before promotion"))] = 15.0,
    min_frames: Annotated[int, typer.Option("--min-frames", min=1, max=100_000, help=(
        "canary verdicts before the rules judge"))] = 30,
    min_agreement: Annotated[float, typer.Option("--min-agreement", min=0.0, max=1.0, help=(
        "canary rollback: shadow verdict agreement below"))] = 0.9,
    margin: Annotated[float, typer.Option("--margin", min=0.0, max=1.0, help=(
        "retrain gate: AP@0.5 margin (retrain's default 0.05 refuses most short CPU fine-tunes here: "
        "docs/lifecycle.md)"))] = 0.1,
    recall_slack: Annotated[float, typer.Option("--recall-slack", min=0.0, max=1.0, help=(
        "retrain gate: image recall may be this much below production's (0.03: one reviewed frame of ~50)"))] = 0.03,
    lr0: Annotated[float, typer.Option("--lr0", min=0.0, max=0.1, help=(
        "fine-tune learning rate for this run (AdamW); 0: retrain's own (training.retrain.FINE_TUNE_ARGS: 1e-4)"))] = 5e-5,
    max_canary_s: Annotated[float, typer.Option("--max-canary-s", min=10.0, max=3600.0, help=(
        "a canary still undecided after this is reported as stopped"))] = 300.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document (default: indented)")] = False,
    state_dir: StateDir = None,
) -> None:
    """The model-lifecycle loop on synthetic data, timed: reviewed frames -> new dataset version -> challenger ->
    shadow agreement -> canary -> promoted; then a bad challenger -> canary -> rolled back."""
    import os

    from infra import kafka
    from infra.cli_common import UserError
    from infra.db import migrate
    from infra.stack import LocalStack
    from schemas.catalog import TopicCatalog

    if imgsz and imgsz % 32:
        raise UserError(f"--imgsz {imgsz}: must be a multiple of 32 (or 0)")
    if not (DEMO_DIR / "best.pt").is_file():
        raise UserError(f"{DEMO_DIR / 'best.pt'}: the demo checkpoint is missing (a source checkout has it)")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as es:
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="sqis-lifecycle-")))
        stack = LocalStack(state_dir or tmp / "stack")
        t_stack = time.perf_counter()
        was_up = stack.is_up()
        stack.up(kafka=True, postgres=True, mqtt=False)
        if not was_up:
            es.callback(stack.down, purge=state_dir is None)
        prefix = f"life{uuid.uuid4().hex[:6]}."
        s = stack.settings(topic_prefix=prefix, state_dir=tmp / "state", log_level="WARNING",
                           mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", onnx_providers="cpu", onnx_threads=1,
                           shadow_share=shadow_share, challenger_poll_s=1.0, kafka_session_timeout_ms=6000,
                           kafka_heartbeat_interval_ms=1000,
                           object_store_url=(tmp / "objects").as_uri())
        migrate(s.dsn())
        cat = TopicCatalog(prefix)
        kafka.create_topics(s, cat, partitions={"frames": CAMERAS})
        es.callback(lambda: kafka.delete_topics(s, [n for n, _ in cat.all()]))
        stack_s = round(time.perf_counter() - t_stack, 2)
        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints; stdout is for the result
            report = run_lifecycle(s, tmp, epochs=epochs, imgsz=imgsz or None, batch=batch, base_images=base_images,
                                   frames=frames, shadow_frames=shadow_frames, fps=fps, size=size,
                                   review_share=review_share, shadow_share=shadow_share, clean_s=clean_s,
                                   min_frames=min_frames, min_agreement=min_agreement, margin=margin, seed=seed,
                                   max_canary_s=max_canary_s, lr0=lr0 or None,
                                   recall_slack=recall_slack)
    report["seconds"] = {"stack": stack_s, **report["seconds"], "total": round(time.perf_counter() - t0, 2)}
    report["params"] = {"epochs": epochs, "imgsz": imgsz or None, "batch": batch, "base_images": base_images,
                        "frames": frames, "shadow_frames": shadow_frames, "fps": fps, "size": size,
                        "review_share": review_share, "shadow_share": shadow_share, "clean_s": clean_s,
                        "min_frames": min_frames, "min_agreement": min_agreement, "margin": margin, "recall_slack": recall_slack, "lr0": lr0 or None, "seed": seed}
    report["cpu_count"] = os.cpu_count()
    typer.echo(json.dumps(report, default=str) if as_json else json.dumps(report, indent=2, default=str))
