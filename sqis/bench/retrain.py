"""`sqis bench retrain`: the whole retrain loop (training/retrain.py) on the synthetic camera's data, timed.

A PostgreSQL of its own (the local stack without Kafka) in a temporary state dir; the synthetic dataset
(`sqis data synth`) as the base dataset version; the committed demo model (models/demo: best.pt as its
run's checkpoint, model.onnx as the version) as NAME@production; reviewed frames rendered by the
synthetic camera, stored in the object store and recorded as reviewed inspections (confirmed defects
with their true boxes, false rejects on defect-free parts). Then ``retrain`` ``--runs`` times (each on the
same reviews, a fresh working folder). Prints one JSON object: per run the step timings, the status and
the gate figures; over the runs the median and worst of each step. The helpers are shared with
tests/test_retrain.py.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sqis.bench.pipeline import bench_app

if TYPE_CHECKING:
    from infra.settings import Settings

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def synth_base(root: Path, images: int, *, size: int = 160, seed: int = 0, settings: Settings | None = None,
               name: str = "synthetic") -> Path:
    """`sqis data synth`: a synthetic-camera dataset in the internal format at ROOT (logged as NAME when
    settings are given)."""
    from producers.synthetic import generate_dataset
    from training.importers import import_dataset

    with tempfile.TemporaryDirectory(prefix="sqis-synth-") as tmp:
        generate_dataset(Path(tmp) / "raw", images, seed=seed, size=size, defect_rate=0.75)
        import_dataset("yolo", Path(tmp) / "raw", root, force=True)
    if settings is not None:
        from training.dataset_versions import log_dataset_version

        log_dataset_version(settings, root, name, operation="synth")
    return root


def register_demo_production(settings: Settings, name: str, *, checkpoint: bool = True) -> str:
    """The committed demo model as a new version of NAME, aliased @production; its run holds best.pt as
    the ``weights`` artifact, as `sqis train` leaves it (checkpoint False: a version without one)."""
    from training.registry import client_for, ensure_experiment, promote, register_onnx

    client = client_for(settings)
    run = client.create_run(ensure_experiment(client, settings, "sqis-detector"), run_name=f"{name}-demo",
                            tags={"sqis.kind": "register-demo"})
    if checkpoint:
        client.log_artifact(run.info.run_id, str(DEMO / "best.pt"), "weights")
    version = register_onnx(client, run, DEMO / "model.onnx", name, tags={"model": "yolov8n", "source": "models/demo"})
    client.set_terminated(run.info.run_id)
    promote(client, name, version, "production")
    return version


def seed_reviews(settings: Settings, n: int, *, seed: int = 1, size: int = 160, line_id: str = "line-retrain",
                 false_reject_share: float = 0.25) -> list[str]:
    """N synthetic-camera frames as reviewed inspections of LINE_ID (images in the object store): defective
    parts confirmed with their true boxes, the rest false rejects (a bogus box the reviewer rejected).
    Returns the frame ids."""
    import cv2
    import numpy as np

    from dashboard.queries import set_review
    from infra.db import connect
    from infra.objectstore import open_store
    from producers.synthetic import CLASS_NAMES, render_part

    store = open_store(settings)
    rng = np.random.default_rng([seed, 77])
    now = datetime.now(UTC)
    rows, defects, decisions = [], [], []
    for i in range(n):
        clean = i < round(n * false_reject_share)
        img, truth = render_part(rng, size, size, defect_rate=0.0 if clean else 1.0)
        fid = uuid.uuid4()
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        uri = store.put(f"frames/{line_id}/cam-1/{fid}.jpg", buf.tobytes(), "image/jpeg")
        boxes = [(CLASS_NAMES.index(c), c, x1, y1, x2, y2) for c, x1, y1, x2, y2 in truth] or \
                [(2, "spot", size * 0.4, size * 0.4, size * 0.5, size * 0.5)]
        t = now - timedelta(seconds=n - i)
        rows.append((fid, line_id, "cam-1", i, t, t, uri, size, size, "demo", "1", "FAIL", len(boxes)))
        defects += [(fid, k, cid, cn, 0.5, float(x1), float(y1), float(x2), float(y2))
                    for k, (cid, cn, x1, y1, x2, y2) in enumerate(boxes)]
        decisions.append((fid, "false_reject" if clean else "confirmed"))
    with connect(settings.dsn(), autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany("INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at,"
                            " image_uri, width, height, model_name, model_version, verdict, n_defects)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
            cur.executemany("INSERT INTO defects (frame_id, idx, class_id, class_name, score, x1, y1, x2, y2)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", defects)
        for fid, d in decisions:
            set_review(conn, fid, d, "bench", "retrain scenario")
    return [str(f) for f, _ in decisions]


def open_drift_alert(settings: Settings, line_id: str, *, state: str = "open") -> str:
    """Insert a drift alert on LINE_ID (as the stream processors' alert sink writes one); returns its id."""
    from infra.db import connect

    aid = f"a-{uuid.uuid4().hex[:16]}"
    with connect(settings.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO alerts (alert_id, kind, rule, state, line_id, opened_at, message)"
                     " VALUES (%s, 'drift', 'psi_image_score', %s, %s, now(), 'image-score drift')", (aid, state, line_id))
    return aid


def _stats(xs: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 1), "worst": round(max(xs), 1)}


@bench_app.command("retrain")
def bench_retrain(
    images: Annotated[int, typer.Option("--images", min=10, max=5000, help="base dataset size (synthetic camera)")] = 120,
    reviewed: Annotated[int, typer.Option("--reviewed", min=2, max=2000, help="reviewed frames")] = 40,
    size: Annotated[int, typer.Option("--size", min=64, max=1024, help="image size in pixels")] = 160,
    epochs: Annotated[int, typer.Option("--epochs", min=1, max=100)] = 2,
    imgsz: Annotated[int, typer.Option("--imgsz", min=32, max=1024, help="fine-tuning size (multiple of 32)")] = 160,
    batch: Annotated[int, typer.Option("--batch", min=1, max=256)] = 16,
    margin: Annotated[float, typer.Option("--margin", min=0.0, max=1.0)] = 0.05,
    runs: Annotated[int, typer.Option("--runs", min=1, max=10, help="retrains in a row (same reviews)")] = 2,
    out: Annotated[Path | None, typer.Option("--out", help="keep the working folders here [default: a temp dir]")] = None,
) -> None:
    """Time `sqis retrain` end to end on the synthetic camera's data (own PostgreSQL, MLflow in a temp dir)."""
    from infra.stack import LocalStack
    from training.retrain import output_to_stderr, retrain

    root = Path(out or tempfile.mkdtemp(prefix="sqis-bench-retrain-")).resolve()
    stack = LocalStack(root / "stack")
    try:
        stack.up(kafka=False, postgres=True, mqtt=False, registry=False)  # PostgreSQL only
        settings = stack.settings(state_dir=root / "state", object_store_url=(root / "objects").as_uri(),
                                  onnx_providers="cpu", log_level="WARNING")
        t0 = time.perf_counter()
        synth_base(root / "base", images, size=size, settings=settings, name="synthetic")
        version = register_demo_production(settings, "sqis-detector")
        seed_reviews(settings, reviewed, size=size)
        setup_s = round(time.perf_counter() - t0, 1)
        results = []
        for i in range(runs):
            with output_to_stderr(settings.state_dir.resolve()):
                r = retrain(settings, name="sqis-detector", base="synthetic@v1", epochs=epochs, imgsz=imgsz, batch=batch,
                            margin=margin, out=root / f"run-{i + 1}", progress=False,
                            since=datetime.now(UTC) - timedelta(hours=1))
            results.append(r)
            typer.echo(f"run {i + 1}: {r.status} v{r.version} in {sum(r.timings.values()):.1f} s", err=True)
        steps = list(results[0].timings)
        doc: dict[str, Any] = {
            "bench": "retrain", "images": images, "reviewed": reviewed, "size": size, "epochs": epochs, "imgsz": imgsz,
            "production_version": version, "setup_s": setup_s, "cpus": os.cpu_count(),
            "runs": [{"status": r.status, "version": r.version, "dataset_digest": r.dataset_digest,
                      "timings_s": r.timings, "total_s": round(sum(r.timings.values()), 1), "reason": r.reason,
                      "gate": {k: r.gate.get(k) for k in ("test", "reviewed", "passed")}} for r in results],
            "steps_s": {s: _stats([r.timings.get(s, 0.0) for r in results]) for s in steps},
            "total_s": _stats([sum(r.timings.values()) for r in results]),
            "out": str(root) if out else None,
        }
        typer.echo(json.dumps(doc))
    finally:
        stack.down(purge=True)
        if out is None:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
