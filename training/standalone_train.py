"""Train a YOLOv8 (or RT-DETR: --model rtdetr-l) detector where only torch + ultralytics (+ torchvision, which it needs) exist, e.g. a GPU box.

The project's `sqis train` runs the whole flow (MLflow, export, parity, registry) on one machine.
This script is its remote half: it trains on a dataset in the internal format (training/datasets.py)
with the same offline settings and augmentation, and writes best.pt, last.pt and results.csv, which
`sqis model register-checkpoint` then exports, parity-checks, logs to MLflow and registers here.

    python -m training.standalone_train --data DATA_DIR --model yolov8s --imgsz 320 \
        --time-h 0.13 --device 0 --out OUT_DIR

Of the project it imports only training.augment (+ training.augment_trainers) and training.offline
(stdlib, torch, torchvision, ultralytics only), so it runs from
a bare checkout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

from training.augment import NO_AUGMENT_HYP, SURFACE_HYP, trainer_class
from training.offline import INTEGRATIONS_OFF


def _offline_env(state: Path) -> None:
    """No network from Ultralytics: no online checks, no font/asset/weights downloads, no pip."""
    cfg = state / "ultralytics"
    (cfg / "Ultralytics").mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(cfg),
        "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(state / "mpl"), "XDG_CACHE_HOME": str(state / "cache"),
    })
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (cfg / "Ultralytics" / name).exists():
            shutil.copy(font, cfg / "Ultralytics" / name)


def _polars_fallback() -> None:
    """Ultralytics reads results.csv with polars; where polars is absent, a csv-module stand-in."""
    try:
        import polars  # noqa: F401
    except ImportError:
        mod = types.ModuleType("polars")

        class _Frame:
            def __init__(self, rows: list[dict[str, str]]) -> None:
                self.rows = rows

            def to_dict(self, as_series: bool = False) -> dict[str, list[float | str]]:
                out: dict[str, list[float | str]] = {}
                for r in self.rows:
                    for k, v in r.items():
                        try:
                            out.setdefault(k.strip(), []).append(float(v))
                        except ValueError:
                            out.setdefault(k.strip(), []).append(v)
                return out

        def read_csv(data: bytes, **_: object) -> _Frame:
            return _Frame(list(csv.DictReader(data.decode().splitlines())))

        mod.read_csv = read_csv  # type: ignore[attr-defined]
        sys.modules["polars"] = mod


def local_data_yaml(data_dir: Path, work: Path) -> Path:
    """data.yaml with `path` rewritten to where the dataset lies on this machine."""
    import yaml

    cfg = yaml.safe_load((data_dir / "data.yaml").read_text())
    cfg["path"] = str(data_dir.resolve())
    out = work / "data.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _extra(pairs: list[str]) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {p!r}")
        out[k] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset dir in the internal format")
    ap.add_argument("--model", default="yolov8n", help="yolov8n|s|m|l|x or rtdetr-l|x (from yaml) or a .pt path")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--time-h", type=float, default=None, help="train for this many hours (overrides epochs)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="0")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", type=Path, default=None, help="a last.pt to resume")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-augment", action="store_true", help="turn off augmentation (as `sqis train --no-augment`)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Ultralytics train argument, e.g. --set lr0=0.002 (repeatable)")
    a = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sqis-train-"))
    _offline_env(work / "state")
    _polars_fallback()
    from ultralytics import RTDETR, YOLO, settings
    from ultralytics.engine import trainer as _trainer
    from ultralytics.nn.tasks import RTDETRDetectionModel

    # No hub sync, and no logging integration: Ultralytics' own MLflow callback would write an
    # mlflow.db into the working directory. The run is registered later by `sqis model register-checkpoint`.
    settings.update(INTEGRATIONS_OFF)
    # Ultralytics' AMP self-check downloads yolo26n.pt; offline, trust AMP on CUDA instead.
    _trainer.check_amp = lambda model: next(model.parameters()).device.type == "cuda"
    data_yaml = local_data_yaml(a.data, work)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.resume:
        model = YOLO(str(a.resume))
        if isinstance(model.model, RTDETRDetectionModel):
            model = RTDETR(str(a.resume))
        family = "rtdetr" if isinstance(model, RTDETR) else "yolov8"
        model.train(resume=True, trainer=trainer_class("detect", not a.no_augment, family))
    else:
        from_weights = a.model.endswith(".pt")
        src = a.model if from_weights else f"{a.model}.yaml"
        rtdetr = Path(src).stem.lower().startswith("rtdetr")
        if from_weights and not rtdetr:
            rtdetr = isinstance(YOLO(src).model, RTDETRDetectionModel)
        model = RTDETR(src) if rtdetr else YOLO(src)
        trainer = trainer_class("detect", not a.no_augment, "rtdetr" if rtdetr else "yolov8")
        model.train(
            data=str(data_yaml), imgsz=a.imgsz, epochs=a.epochs, time=a.time_h, batch=a.batch,
            device=a.device, workers=a.workers, seed=a.seed, deterministic=False, patience=0,
            project=str(work / "runs"), name="train", exist_ok=True, plots=False,
            amp=a.device != "cpu" and not rtdetr,  # RT-DETR: AMP can give NaN in its matching
            cache="ram", cos_lr=True,
            # Ultralytics >= 8.4 rebuilds the model from its yaml when pretrained=False, even from a .pt:
            # a fine-tune must keep it True.
            pretrained=from_weights,
            trainer=trainer, **((NO_AUGMENT_HYP if a.no_augment else SURFACE_HYP) | _extra(a.set)),
        )
    wall = time.time() - t0
    run = Path(model.trainer.save_dir)
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml"):
        if (run / name).exists():
            shutil.copy(run / name, a.out / Path(name).name)
    metrics = getattr(model.trainer, "metrics", {}) or {}
    summary = {"wall_s": round(wall, 1), "epochs_run": model.trainer.epoch + 1,
               "final_val": {k: float(v) for k, v in metrics.items()}, "args": vars(a) | {
                   "data": str(a.data), "out": str(a.out), "resume": str(a.resume) if a.resume else None}}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
