"""Train a YOLOv8 or RT-DETR defect detector, export it to ONNX, check ONNX/PyTorch parity and register it
in MLflow (the run and the model version tagged arch=yolov8|rtdetr).

RT-DETR (`--model rtdetr-l`, built from Ultralytics' rtdetr-l.yaml, no weights) trains through
Ultralytics' RTDETR class (its own trainer, loss and validator), with AMP off on every device (AMP can
give NaN in its matching); for YOLOv8 on CUDA the offline AMP check below stands in for the one that
downloads weights.

torch and ultralytics are imported lazily (the `train` extra); everything runs offline
(training/offline.py). The parity tolerance is PARITY_TOLERANCE in training/export.py.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.errors import TrainingError, TrainingStopped
from training.export import PARITY_CONF, PARITY_TOLERANCE, ParityReport
from training.golden import (
    _data_cfg,
    find_val_images,
    golden_images,
    parity_blocks_registration,
)
from training.offline import import_ultralytics, require_train_extra

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from infra.settings import Settings

from training.augment import NO_AUGMENT_HYP, SURFACE_HYP, names, surface_augmentations, trainer_class

log = logging.getLogger(__name__)

__all__ = [
    "SURFACE_HYP", "TrainResult", "find_val_images", "golden_images", "parity_blocks_registration",
    "register_checkpoint", "resolve_data_yaml", "surface_augmentations", "train",
]

FINAL_METRIC_KEYS = {
    "metrics/mAP50(B)": "map50", "metrics/mAP50-95(B)": "map50_95",
    "metrics/precision(B)": "precision", "metrics/recall(B)": "recall",
    # --task segment: the mask side of the same validation
    "metrics/mAP50(M)": "mask_map50", "metrics/mAP50-95(M)": "mask_map50_95",
    "metrics/precision(M)": "mask_precision", "metrics/recall(M)": "mask_recall",
}
TASKS = ("detect", "segment")
FAMILIES = ("yolov8", "rtdetr")


def model_family(model: str | Path) -> str:
    """'rtdetr' for an RT-DETR yaml/checkpoint name (rtdetr-l, rtdetr-x.yaml, .../rtdetr-l.pt), else 'yolov8'."""
    return "rtdetr" if Path(str(model)).stem.lower().startswith("rtdetr") else "yolov8"


def _ultralytics_model(model: str, family: str) -> Any:
    """The Ultralytics model object for a yaml name / checkpoint of this family (RT-DETR: its own class,
    trainer, loss and validator; YOLO() would build the yaml into a DetectionModel with the YOLO loss)."""
    if family == "rtdetr":
        from ultralytics import RTDETR

        return RTDETR(model)
    from ultralytics import YOLO

    return YOLO(model)


@dataclass
class TrainResult:
    """What a training (or checkpoint registration) produced."""

    run_dir: Path
    best_pt: Path
    last_pt: Path | None = None
    results_csv: Path | None = None
    onnx_path: Path | None = None
    torchscript_path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    parity: ParityReport | None = None
    run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    epochs_run: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "best_pt": str(self.best_pt),
            "last_pt": str(self.last_pt) if self.last_pt else None,
            "results_csv": str(self.results_csv) if self.results_csv else None,
            "onnx": str(self.onnx_path) if self.onnx_path else None,
            "torchscript": str(self.torchscript_path) if self.torchscript_path else None, "metrics": self.metrics,
            "parity": self.parity.to_dict() if self.parity else None, "run_id": self.run_id,
            "model_name": self.model_name, "model_version": self.model_version, "epochs_run": self.epochs_run,
        }


# ---- dataset helpers ------------------------------------------------------------------------------
def resolve_data_yaml(data: Path | str, work_dir: Path | None = None) -> Path:
    """data.yaml of a dataset dir (or the yaml itself); rewritten with `path` = its directory when the
    recorded path does not exist (a dataset moved or copied to another machine)."""
    import yaml

    p = Path(data).expanduser()
    if p.is_dir():
        p = p / "data.yaml"
    if not p.is_file():
        raise TrainingError(f"{data}: no data.yaml (expected an imported dataset dir; see `sqis data import`)")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainingError(f"{p}: invalid YAML: {exc}") from None
    if not isinstance(cfg, dict) or "train" not in cfg or "names" not in cfg:
        raise TrainingError(f"{p}: not a YOLO data.yaml (needs train, val and names)")
    root = cfg.get("path")
    if root and Path(root).is_dir():
        return p.resolve()
    cfg["path"] = str(p.parent.resolve())
    work = work_dir or Path(tempfile.mkdtemp(prefix="sqis-data-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "data.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def card_info(data_yaml: Path) -> tuple[Path | None, str | None]:
    """The dataset card next to data.yaml (or under its `path`) and the sha256 of its bytes."""
    cfg = _data_cfg(data_yaml)
    for d in (Path(cfg.get("path") or data_yaml.parent), data_yaml.parent):
        card = d / "card.json"
        if card.is_file():
            return card, hashlib.sha256(card.read_bytes()).hexdigest()
    return None, None


# ---- MLflow -------------------------------------------------------------------------------------
_METRIC_KEY = re.compile(r"[^\w\-./ ]")


def metric_key(k: str) -> str:
    """An Ultralytics column name as an MLflow metric key: 'metrics/mAP50(B)' -> 'metrics/mAP50_B'."""
    return _METRIC_KEY.sub("_", k.strip()).strip("_")


class MlflowRun:
    """One MLflow run written through an explicit client (no global fluent state)."""

    def __init__(self, settings: Settings, tracking_uri: str | None, experiment: str, run_name: str,
                 tags: Mapping[str, str] | None = None) -> None:
        from training.registry import client_for, ensure_experiment

        self.settings = settings
        self.client: MlflowClient = client_for(settings, tracking_uri)
        exp_id = ensure_experiment(self.client, settings, experiment)
        self.run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id: str = self.run.info.run_id

    def params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], str(v)[:6000]) for k, v in params.items() if v is not None]
        with _DEFER.hold():
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(metric_key(k), float(v), ts, step) for k, v in values.items()
              if isinstance(v, int | float) and math.isfinite(float(v))]
        if ms:
            with _DEFER.hold():
                self.client.log_batch(self.run_id, metrics=ms)

    def artifact(self, path: Path | str | None, subdir: str | None = None) -> None:
        if path is not None and Path(path).exists():
            with _DEFER.hold():
                self.client.log_artifact(self.run_id, str(path), subdir)

    def tags(self, tags: Mapping[str, Any]) -> None:
        with _DEFER.hold():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def finish(self, ok: bool | str) -> None:
        """End the run: True -> FINISHED, False -> FAILED, or an MLflow status such as 'KILLED'."""
        status = ok if isinstance(ok, str) else ("FINISHED" if ok else "FAILED")
        self.client.set_terminated(self.run_id, status)


class _Deferral:
    """SIGTERM arriving inside a tracking write is held until the write is done: an exception raised
    mid-commit leaves SQLite's write lock with a connection nobody closes, and the run could then not
    be marked KILLED ("database is locked")."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.pending is not None:
                signum, self.pending = self.pending, None
                raise TrainingStopped(f"stopped by signal {signum}")


_DEFER = _Deferral()


def _on_sigterm(signum: int, _frame: object) -> None:
    if _DEFER.depth:
        _DEFER.pending = signum
        return
    raise TrainingStopped(f"stopped by signal {signum}")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises TrainingStopped in the main thread, so cleanup runs (the default kills at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_results_csv(path: Path) -> list[dict[str, float]]:
    """Rows of an Ultralytics results.csv as floats (column names stripped)."""
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k.strip()] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


# ---- Ultralytics callbacks ------------------------------------------------------------------------
class _EpochHooks:
    """Per-epoch metrics and progress from Ultralytics callbacks.

    on_fit_epoch_end also fires once more after training for the final validation of best.pt;
    an epoch is only counted when on_train_epoch_start fired since the last call.
    """

    def __init__(self, on_epoch: Callable[[int, dict[str, float]], None], progress: Any | None = None) -> None:
        self.on_epoch = on_epoch
        self.progress = progress
        self.task = None
        self.in_epoch = False
        self.final: dict[str, float] = {}
        self.epochs_run = 0

    def on_train_start(self, trainer: Any) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task("epochs", total=trainer.epochs, completed=trainer.start_epoch)

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.in_epoch = True

    def on_fit_epoch_end(self, trainer: Any) -> None:
        vals = {k: float(v) for k, v in (trainer.metrics or {}).items() if isinstance(v, int | float)}
        if not self.in_epoch:  # the final validation of best.pt
            self.final = vals
            return
        self.in_epoch = False
        self.epochs_run += 1
        loss = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
        vals.update({k: float(v) for k, v in loss.items()})
        vals.update({k: float(v) for k, v in (getattr(trainer, "lr", None) or {}).items()})
        self.on_epoch(int(trainer.epoch) + 1, vals)
        if self.progress is not None and self.task is not None:
            m50 = vals.get("metrics/mAP50(B)", float("nan"))
            self.progress.update(self.task, total=trainer.epochs, completed=trainer.epoch + 1,
                                 description=f"epochs (val mAP50 {m50:.3f})")

    def attach(self, model: Any) -> None:
        for ev in ("on_train_start", "on_train_epoch_start", "on_fit_epoch_end"):
            model.add_callback(ev, getattr(self, ev))


def _patch_offline_amp_check(device: str) -> None:
    """Ultralytics' AMP self-check downloads yolo26n.pt; offline, trust AMP on CUDA instead."""
    if device == "cpu":
        return
    from ultralytics.engine import trainer as _trainer

    _trainer.check_amp = lambda model: next(model.parameters()).device.type == "cuda"


def _final_metrics(vals: Mapping[str, float]) -> dict[str, float]:
    return {short: float(vals[k]) for k, short in FINAL_METRIC_KEYS.items() if k in vals}


# ---- entry points ---------------------------------------------------------------------------------
def train(
    data_yaml: Path | str,
    *,
    model: str = "yolov8n",
    imgsz: int = 256,
    epochs: int = 30,
    batch: int = 16,
    weights: Path | str | None = None,
    device: str = "cpu",
    workers: int = 8,
    seed: int = 0,
    patience: int = 50,
    time_h: float | None = None,
    resume: Path | str | None = None,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "sqis-detector",
    register_name: str | None = None,
    project_dir: Path | str | None = None,
    run_name: str | None = None,
    augment: bool = True,
    cache: bool | str = False,
    export: bool = True,
    parity: bool = True,
    conf: float = PARITY_CONF,
    iou: float = 0.45,
    allow_unverified_parity: bool = False,
    torchscript: bool = False,
    settings: Settings | None = None,
    progress: bool = False,
    extra_args: Mapping[str, Any] | None = None,
    task: str = "detect",
) -> TrainResult:
    """Train YOLOv8 (or RT-DETR: model rtdetr-l / rtdetr-x) from `{model}.yaml` (no pretrained download;
    `weights` loads a local .pt), then
    export ONNX, parity-check it (PARITY_TOLERANCE) and, with mlflow and register_name, register it.

    device: 'cpu' or a CUDA index such as '0' (AMP on). time_h overrides epochs. resume: a last.pt.
    conf/iou: the parity check's thresholds. An unverified parity check (no detection to compare)
    blocks registration unless allow_unverified_parity. torchscript: also export and log a TorchScript file.
    task: "detect" (boxes from labels/) or "segment" (YOLOv8-seg from `{model}-seg.yaml` on the
    importer's polygons in labels-seg/; its parity check also compares masks: training/segment_export.py).
    """
    require_train_extra("torch", "torchvision", "ultralytics", "onnx", "onnxslim")
    if task not in TASKS:
        raise TrainingError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if settings is None:
        from infra.settings import Settings

        settings = Settings()
    state = settings.state_dir.resolve()
    if imgsz % 32 or imgsz < 32:
        raise TrainingError(f"--imgsz {imgsz}: must be a positive multiple of 32")
    if epochs < 1 or batch < 1:
        raise TrainingError("--epochs and --batch must be >= 1")
    if weights is not None and not Path(weights).is_file():
        raise TrainingError(f"--weights {weights}: no such file")
    if resume is not None and not Path(resume).is_file():
        raise TrainingError(f"--resume {resume}: no such checkpoint")
    family = model_family(resume if resume is not None else model)
    if family == "rtdetr" and task != "detect":
        raise TrainingError(f"--model {model}: RT-DETR is a detector (--task detect only)")
    import_ultralytics(state)

    data_path = resolve_data_yaml(data_yaml, state / "tmp" / f"data-{int(time.time() * 1000)}")
    if task == "segment":
        from training.segment_data import segment_data_view

        data_path = segment_data_view(data_path, state / "tmp" / f"seg-data-{int(time.time() * 1000)}")
        if not model.endswith((".yaml", ".pt")) and not model.endswith("-seg"):
            model = f"{model}-seg"
    # absolute: Ultralytics puts a relative project under its own runs_dir
    project = Path(project_dir).expanduser().resolve() if project_dir else state / "runs"
    run_name = run_name or f"{Path(model).stem}-{imgsz}-{time.strftime('%Y%m%d-%H%M%S')}"
    card_path, card_hash = card_info(data_path)
    _patch_offline_amp_check(str(device))

    args: dict[str, Any] = dict(
        data=str(data_path), imgsz=imgsz, epochs=epochs, batch=batch, device=device, workers=workers, seed=seed,
        patience=patience, time=time_h, project=str(project), name=run_name, exist_ok=False, plots=False,
        # RT-DETR: AMP can give NaN in the bipartite matching (Ultralytics' own note), so fp32 everywhere
        amp=str(device) != "cpu" and family != "rtdetr", cache=cache, val=True, verbose=True, deterministic=False,
        # Ultralytics >= 8.4 rebuilds the model from its yaml when pretrained=False, dropping any loaded
        # weights: a fine-tune must name its checkpoint here.
        pretrained=str(weights) if weights is not None else model.endswith(".pt"),
    )
    # augment: SURFACE_HYP (Ultralytics' geometry and value jitter) + the torchvision photometric set in
    # Ultralytics' Albumentations slot; off: NO_AUGMENT_HYP and no photometric step (training/augment.py)
    args.update(SURFACE_HYP if augment else NO_AUGMENT_HYP)
    args.update(extra_args or {})
    trainer_cls = trainer_class(task, augment, family)

    run: MlflowRun | None = None
    if mlflow:
        run = MlflowRun(settings, tracking_uri, experiment, run_name, tags={
            "sqis.kind": "train", "sqis.task": task, "arch": family, "dataset_card_hash": card_hash or "", "resumed_from": str(resume or ""),
        })
        run.params(args | {
            "model": model, "weights": str(weights) if weights else None, "augment": augment,
            "augmentations": names(surface_augmentations()) if augment else [],
            "parity_tolerance": json.dumps(PARITY_TOLERANCE),
        })
        run.artifact(card_path, "dataset")
        from training.dataset_versions import record_input
        from training.registry import DATASET_DIGEST_TAG

        record_input(run.client, run.run_id, data_path, "training", DATASET_DIGEST_TAG)

    def on_epoch(epoch: int, vals: dict[str, float]) -> None:
        log.info("epoch done", extra={"epoch": epoch, **{metric_key(k): round(v, 5) for k, v in vals.items()}})
        if run is not None:
            run.metrics(vals, step=epoch)

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    hooks = _EpochHooks(on_epoch, bar)
    status = "FAILED"
    yolo = None
    if run is not None:  # the folder is known from the first second: a stopped run never leaves an orphan
        run.tags({"sqis.run_dir": project / run_name})
    signals = contextlib.ExitStack()
    signals.enter_context(_sigterm_raises())
    try:
        if resume is not None:
            yolo = _ultralytics_model(str(resume), family)
            hooks.attach(yolo)
            train_kw: dict[str, Any] = {"resume": True, "trainer": trainer_cls}
        else:
            # --weights is loaded by Ultralytics' trainer from args["pretrained"]
            yolo = _ultralytics_model(model if model.endswith((".yaml", ".pt")) else f"{model}.yaml", family)
            hooks.attach(yolo)
            train_kw = args | {"trainer": trainer_cls}
        t0 = time.time()
        if bar is not None:
            with bar:
                yolo.train(**train_kw)
        else:
            yolo.train(**train_kw)
        trainer = yolo.trainer
        save_dir = Path(trainer.save_dir)
        result = TrainResult(
            run_dir=save_dir, best_pt=Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last),
            last_pt=Path(trainer.last) if Path(trainer.last).exists() else None,
            results_csv=save_dir / "results.csv" if (save_dir / "results.csv").exists() else None,
            metrics=_final_metrics(hooks.final) or _final_metrics(trainer.metrics or {}),
            run_id=run.run_id if run else None, epochs_run=hooks.epochs_run,
        )
        result.metrics["train_wall_s"] = round(time.time() - t0, 1)
        if run is not None:
            run.metrics({f"final/{k}": v for k, v in result.metrics.items()}, step=hooks.epochs_run)
            run.artifact(result.best_pt, "weights")
            run.artifact(result.results_csv)
            run.artifact(save_dir / "args.yaml")
        if task == "segment":  # imported only now: a long run picks up the newest export/parity code
            from training.segment_export import export_check_register_segment

            export_check_register_segment(result, data_path, run, register_name, conf=conf, iou=iou, export=export,
                                          parity=parity, state=state, card_hash=card_hash, model=model,
                                          allow_unverified=allow_unverified_parity)
        else:
            _export_check_register(result, data_path, run, register_name, imgsz=None, conf=conf, iou=iou,
                                   export=export, parity=parity, state=state, card_hash=card_hash, model=model,
                                   allow_unverified=allow_unverified_parity, torchscript=torchscript)
        status = "FINISHED"
        return result
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (TrainingStopped)
        status = "KILLED"
        trainer = getattr(yolo, "trainer", None)
        save_dir = Path(trainer.save_dir) if trainer is not None and getattr(trainer, "save_dir", None) else None
        last = save_dir / "weights" / "last.pt" if save_dir is not None else None
        log.warning("training stopped", extra={"run_id": run.run_id if run else None, "run_dir": str(save_dir),
                                               "resume": str(last) if last and last.is_file() else None})
        if run is not None:
            run.tags({"sqis.stopped": type(exc).__name__, "sqis.run_dir": save_dir or project / run_name,
                      "sqis.resume_from": last if last is not None and last.is_file() else ""})
        exc.add_note(f"run_dir={save_dir}")
        raise
    finally:
        signals.close()
        if run is not None:
            run.finish(status)


def _export_check_register(
    result: TrainResult, data_yaml: Path, run: MlflowRun | None, register_name: str | None, *, imgsz: int | None,
    conf: float, iou: float, export: bool, parity: bool, state: Path, card_hash: str | None, model: str,
    allow_unverified: bool = False, torchscript: bool = False,
) -> None:
    """Export best.pt to ONNX (and TorchScript when asked), check parity on the golden val images,
    log them, register when asked (never after a failed check; after an unverified one only with
    allow_unverified)."""
    if not export:
        return
    # imported now, not with this module: a run that trained for hours exports and checks with the
    # code installed at its end (as the segment path does)
    from training.export import export_onnx, export_torchscript, parity_check
    if torchscript:
        result.torchscript_path = export_torchscript(result.best_pt, result.run_dir / "model.torchscript",
                                                     imgsz=imgsz, state_dir=state)
        if run is not None:
            run.artifact(result.torchscript_path, "torchscript")
    onnx_path = export_onnx(result.best_pt, result.run_dir / "model.onnx", imgsz=imgsz, name=register_name,
                            state_dir=state)
    result.onnx_path = onnx_path
    if parity:
        golden = golden_images(data_yaml)
        result.parity = parity_check(result.best_pt, onnx_path, golden, conf=conf, iou=iou, state_dir=state)
        if run is not None:
            p = result.parity
            run.metrics({"parity/max_score_diff": p.max_score_diff, "parity/min_box_iou": p.min_box_iou,
                         "parity/unmatched_above_margin": p.unmatched_above_margin, "parity/matched": p.matched,
                         "parity/passed": float(p.passed)}, step=0)
            run.tags({"parity_passed": p.passed, "parity_status": p.status,
                      "parity_tolerance": json.dumps(p.tolerance), "parity_golden_images": p.images})
    failed = parity_blocks_registration(result.parity, allow_unverified)
    if run is not None and (failed or not register_name):
        # Not registered: the run keeps its ONNX. A registered version uploads its own (stamped) copy to
        # the same place, so each run holds the file once.
        from training.registry import MODEL_ARTIFACT_DIR

        run.artifact(onnx_path, MODEL_ARTIFACT_DIR)
    if failed:
        assert result.parity is not None
        log.error("ONNX/PyTorch parity check %s: not registering", result.parity.status,
                  extra=result.parity.to_dict())
        return
    if run is not None and register_name:
        from training.registry import register_onnx

        meta = _onnx_summary(onnx_path)
        tags = {"dataset_card_hash": card_hash or "", "imgsz": meta.get("imgsz", ""), "model": model,
                "arch": meta.get("arch") or model_family(model),
                "classes": meta.get("names", ""), **{f"metric.{k}": v for k, v in result.metrics.items()}}
        if result.parity is not None:
            tags["parity_status"] = result.parity.status
            tags["parity_max_score_diff"] = result.parity.max_score_diff
            tags["parity_min_box_iou"] = result.parity.min_box_iou
        result.model_name = register_name
        result.model_version = register_onnx(run.client, run.run, onnx_path, register_name, tags=tags)
        run.tags({"registered_model": f"{register_name}/{result.model_version}"})


def _onnx_summary(onnx_path: Path) -> dict[str, str]:
    from training.export import read_metadata

    meta = read_metadata(onnx_path)
    return {"imgsz": meta.get("imgsz", ""), "names": meta.get("names", ""), "arch": meta.get("sqis_arch", "")}


def register_checkpoint(
    best_pt: Path | str,
    results_csv: Path | str | None,
    data_yaml: Path | str,
    name: str,
    *,
    settings: Settings | None = None,
    tracking_uri: str | None = None,
    experiment: str = "sqis-detector",
    run_name: str | None = None,
    conf: float = PARITY_CONF,
    iou: float = 0.45,
    params: Mapping[str, Any] | None = None,
    allow_unverified_parity: bool = False,
    torchscript: bool = False,
) -> TrainResult:
    """Export, parity-check and register a checkpoint trained elsewhere (e.g. training/standalone_train.py
    on a GPU machine); per-epoch metrics come from its results.csv."""
    require_train_extra("torch", "ultralytics", "onnx", "onnxslim")
    if settings is None:
        from infra.settings import Settings

        settings = Settings()
    state = settings.state_dir.resolve()
    best = Path(best_pt)
    if not best.is_file():
        raise TrainingError(f"{best_pt}: no such checkpoint")
    csv_path = Path(results_csv) if results_csv else (best.parent / "results.csv")
    if results_csv and not csv_path.is_file():
        raise TrainingError(f"--results {results_csv}: no such file")
    import_ultralytics(state)
    import torch

    data_path = resolve_data_yaml(data_yaml, state / "tmp" / f"data-{int(time.time() * 1000)}")
    card_path, card_hash = card_info(data_path)
    ckpt = torch.load(str(best), map_location="cpu", weights_only=False)
    train_args = dict(ckpt.get("train_args") or {})
    imgsz = int(train_args.get("imgsz", 640))
    work = state / "runs" / "registered" / (run_name or f"{best.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    run = MlflowRun(settings, tracking_uri, experiment, work.name, tags={
        "sqis.kind": "register-checkpoint", "dataset_card_hash": card_hash or "", "checkpoint": str(best.resolve()),
    })
    ok = False
    try:
        run.params({**{k: v for k, v in train_args.items() if k in (
            "model", "imgsz", "epochs", "batch", "device", "seed", "patience", "time", "optimizer", "lr0")},
            **(params or {}), "parity_tolerance": json.dumps(PARITY_TOLERANCE)})
        rows = read_results_csv(csv_path) if csv_path.is_file() else []
        for row in rows:
            step = int(row.pop("epoch", 0))
            row.pop("time", None)
            run.metrics(row, step=step)
        last = rows[-1] if rows else {}
        result = TrainResult(run_dir=work, best_pt=best, results_csv=csv_path if rows else None,
                             metrics=_final_metrics(last), run_id=run.run_id, epochs_run=len(rows))
        run.artifact(card_path, "dataset")
        from training.dataset_versions import record_input
        from training.registry import DATASET_DIGEST_TAG

        record_input(run.client, run.run_id, data_path, "training", DATASET_DIGEST_TAG)
        run.artifact(best, "weights")
        run.artifact(result.results_csv)
        if result.metrics:
            run.metrics({f"final/{k}": v for k, v in result.metrics.items()}, step=len(rows))
        if train_args.get("task") == "segment":  # a YOLOv8-seg checkpoint: the box + mask parity check
            from training.segment_data import segment_data_view
            from training.segment_export import export_check_register_segment

            seg_data = segment_data_view(data_path, state / "tmp" / f"seg-data-{int(time.time() * 1000)}")
            export_check_register_segment(result, seg_data, run, name, conf=conf, iou=iou, export=True, parity=True,
                                          state=state, card_hash=card_hash,
                                          model=str(train_args.get("model", best.name)),
                                          allow_unverified=allow_unverified_parity)
        else:
            _export_check_register(result, data_path, run, name, imgsz=imgsz, conf=conf, iou=iou, export=True,
                                   parity=True, state=state, card_hash=card_hash,
                                   model=str(train_args.get("model", best.name)),
                                   allow_unverified=allow_unverified_parity, torchscript=torchscript)
        ok = True
        return result
    finally:
        run.finish(ok)
