"""`sqis train`, `sqis eval`, `sqis model ...` (and `sqis data ...`, re-exported from training/data_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings
from training.data_cli import data_app  # noqa: E402,F401

if TYPE_CHECKING:
    from training.train import TrainResult

model_app = typer.Typer(help="Model registry (MLflow): list, promote, export, register a checkpoint.", no_args_is_help=True)

TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI [default: sqlite under the state dir]")]
AllowUnverified = Annotated[bool, typer.Option(
    "--allow-unverified-parity", help="register even when the parity check had no detections to compare")]

TorchScript = Annotated[bool, typer.Option("--torchscript", help="also export (and log) a TorchScript file")]


def _check_parity(result: TrainResult, allow_unverified: bool) -> None:
    """Exit 1 when the parity check blocked registration; warn when an unverified model went through."""
    from training.train import parity_blocks_registration

    p = result.parity
    if p is None or p.passed:
        return
    if parity_blocks_registration(p, allow_unverified):
        why = "failed" if p.status == "failed" else (
            f"unverified ({p.images} golden images, {p.matched} matched detections; "
            "--allow-unverified-parity registers anyway)")
        typer.secho(f"error: ONNX/PyTorch parity check {why}; the model was not registered", err=True, fg="red")
        raise typer.Exit(1)
    typer.secho(f"warning: ONNX/PyTorch parity unverified ({p.images} golden images, {p.matched} matched detections)",
                err=True, fg="yellow")


def _parse_per_class(values: list[str] | None) -> dict[str, float]:
    """The worker's syntax (inference_workers.detector.Thresholds.parse_per_class)."""
    from inference_workers.detector import Thresholds

    try:
        return Thresholds.parse_per_class(values, "--class-conf")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="imported dataset dir (or its data.yaml)")],
    model: Annotated[str, typer.Option("--model", help="yolov8n|s|m|l|x (built from yaml, no download)")] = "yolov8n",
    imgsz: Annotated[int, typer.Option("--imgsz", min=32, help="square input size, multiple of 32")] = 256,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    batch: Annotated[int, typer.Option("--batch", min=1)] = 16,
    weights: Annotated[Path | None, typer.Option("--weights", help="local .pt to start from")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or a CUDA index (0)")] = "cpu",
    workers: Annotated[int, typer.Option("--workers", min=0, help="dataloader workers (ignored on CPU)")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    patience: Annotated[int, typer.Option("--patience", min=0, help="early-stopping patience (epochs)")] = 50,
    time_h: Annotated[float | None, typer.Option("--time-h", min=0.001, help="train this many hours (overrides --epochs)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="a last.pt to resume")] = None,
    name: Annotated[str, typer.Option("--name", help="registered model name")] = "sqis-detector",
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="no tracking and no registration")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="turn off augmentation")] = False,
    experiment: Annotated[str, typer.Option("--experiment")] = "sqis-detector",
    allow_unverified: AllowUnverified = False,
    torchscript: TorchScript = False,
    task: Annotated[str, typer.Option("--task", help="detect | segment (YOLOv8-seg on the dataset's polygons)")] = "detect",
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Train YOLOv8 on an imported dataset; export ONNX, check parity, log to MLflow and register."""
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.train import train

    if time_h is not None and time_h <= 0:
        raise UserError("--time-h must be > 0")
    result = train(
        data, model=model, imgsz=imgsz, epochs=epochs, batch=batch, weights=weights, device=device,
        workers=workers, seed=seed, patience=patience, time_h=time_h, resume=resume, mlflow=not no_mlflow,
        experiment=experiment, register_name=None if no_mlflow else name, augment=not no_augment,
        settings=settings, progress=True, allow_unverified_parity=allow_unverified, torchscript=torchscript,
        task=task,
    )
    typer.echo(json.dumps(result.to_dict(), indent=2))
    _check_parity(result, allow_unverified)
    if result.model_version:
        typer.echo(f"registered {result.model_name} version {result.model_version}")


def eval_cmd(
    model: Annotated[str, typer.Option("--model", help=".onnx path or models:/NAME@alias | models:/NAME/VERSION")],
    data: Annotated[Path, typer.Option("--data", help="imported dataset dir")],
    split: Annotated[str, typer.Option("--split")] = "test",
    conf: Annotated[float, typer.Option("--conf", min=0.0, max=1.0, help="operating score threshold")] = 0.25,
    iou: Annotated[float, typer.Option("--iou", min=0.0, max=1.0, help="NMS IoU threshold")] = 0.45,
    class_conf: Annotated[list[str] | None, typer.Option("--class-conf", "--class-score", help="per-class threshold NAME=SCORE (repeatable, or NAME=S,NAME=S); same syntax as `sqis worker`")] = None,
    fpr: Annotated[float, typer.Option("--fpr", min=0.0, max=1.0, help="image-level false-positive rate for the recall figure")] = 0.05,
    latency: Annotated[bool, typer.Option("--latency", help="also measure CPU latency at batch 1 and 8")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    segmenter: Annotated[str, typer.Option("--segmenter", help="none | yolo-seg (the model) | sam: adds mask metrics")] = "none",
    sam_model: Annotated[str | None, typer.Option("--sam-model", help="with --segmenter sam: a `sqis sam export` dir")] = None,
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Evaluate a model on a split through the serving detector: mAP, P/R, image-level recall at fixed FPR."""
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from inference_workers.detector import DetectorError
    from training.evaluate import evaluate

    for flag, v in (("--conf", conf), ("--iou", iou), ("--fpr", fpr)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{flag} {v}: must be within [0, 1]")
    try:
        out = evaluate(model, data, split, conf, iou, settings=settings, per_class=_parse_per_class(class_conf),
                       target_fpr=fpr, latency=latency, segmenter=segmenter, sam_model=sam_model)
    except DetectorError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"model {out['model']['name']} v{out['model']['version']}  split {split}  images {out['images']}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    typer.echo(f"mAP50 {fmt(out['map50'])}  mAP50-95 {fmt(out['map50_95'])}  "
               f"P {fmt(out['precision'])}  R {fmt(out['recall'])} @ conf {conf}")
    for cname, c in out["per_class"].items():
        typer.echo(f"  {cname:<20} gt {c['gt']:>5}  AP50 {fmt(c['ap50'])}  AP50-95 {fmt(c['ap50_95'])}  "
                   f"P {fmt(c['precision'])}  R {fmt(c['recall'])}")
    il = out["image_level"]
    typer.echo(f"image-level recall @ FPR<={fpr}: {fmt(il['recall'])}" + (f" ({il['reason']})" if il["reason"] else ""))
    if latency:
        typer.echo(f"CPU latency ms/img: {out['latency_ms_per_image']}")
    if "masks" in out:
        mk = out["masks"]
        typer.echo(f"masks ({mk['segmenter']}): mask mAP50 {fmt(mk['mask_map50'])}  mAP50-95 {fmt(mk['mask_map50_95'])}  "
                   f"mean IoU {fmt(mk['mean_mask_iou'])} (detected {fmt(mk['mean_mask_iou_detected'])})  "
                   f"Dice {fmt(mk['mean_dice'])}  pixel AUROC {fmt(mk['pixel_auroc'])}")


@model_app.command("list")
def model_list(
    name: Annotated[str, typer.Argument(help="registered model name")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Versions of a registered model, newest first, with aliases and metrics tags."""
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.registry import client_for, list_versions

    versions = list_versions(client_for(settings), name)
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in versions]))
        return
    for v in versions:
        m = {k.removeprefix("metric."): v.tags[k] for k in sorted(v.tags) if k.startswith("metric.map")}
        typer.echo(f"{v.name} v{v.version:<4} {','.join(v.aliases) or '-':<12} run {v.run_id}  {m}")


@model_app.command("average")
def model_average(
    checkpoints: Annotated[list[Path], typer.Argument(help="two or more .pt checkpoints of one architecture")],
    out: Annotated[Path, typer.Option("--out", help="the averaged .pt to write")],
    state_dir: StateDir = None,
) -> None:
    """Uniform weight average ("model soup") of checkpoints from one training trajectory; choose the
    members on the val split, then register the result with register-checkpoint."""
    settings = build_settings(state_dir=state_dir)
    from training.soup import average_checkpoints

    path = average_checkpoints(checkpoints, out, state_dir=settings.state_dir)
    typer.echo(f"averaged {len(checkpoints)} checkpoints into {path}")


@model_app.command("promote")
def model_promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="version number")],
    alias: Annotated[str, typer.Option("--alias", help="alias the serving side loads (models:/NAME@alias)")] = "production",
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Point NAME@alias at VERSION; workers watching models:/NAME@alias swap to it."""
    if not version.isdigit():
        raise UserError(f"VERSION {version!r}: expected a number")
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.registry import client_for, promote

    promote(client_for(settings), name, version, alias)
    typer.echo(f"{name}@{alias} -> version {version}")


@model_app.command("export")
def model_export(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="version number")],
    out_dir: Annotated[Path, typer.Argument(help="directory for mlflow_export.json (e.g. models/<name>)")],
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Write OUT_DIR/mlflow_export.json: aliases, tags, params, final + per-epoch metrics, artifact sha256."""
    if not version.isdigit():
        raise UserError(f"VERSION {version!r}: expected a number")
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.registry import export_version

    path = export_version(settings, name, version, out_dir)
    typer.echo(f"exported {name} version {version} to {path}")


@model_app.command("register-checkpoint")
def model_register_checkpoint(
    best_pt: Annotated[Path, typer.Argument(help="best.pt trained elsewhere")],
    data: Annotated[Path, typer.Option("--data", help="the imported dataset it was trained on")],
    name: Annotated[str, typer.Option("--name", help="registered model name")] = "sqis-detector",
    results: Annotated[Path | None, typer.Option("--results", help="its results.csv [default: next to BEST_PT]")] = None,
    experiment: Annotated[str, typer.Option("--experiment")] = "sqis-detector",
    allow_unverified: AllowUnverified = False,
    torchscript: TorchScript = False,
    parity_conf: Annotated[float, typer.Option(
        "--parity-conf", help="score threshold of the parity check (lower it for an undertrained model)")] = 0.05,
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Export, parity-check, log (per-epoch metrics from results.csv) and register a checkpoint."""
    if not 0.0 < parity_conf <= 1.0:
        raise UserError(f"--parity-conf {parity_conf}: must be within (0, 1]")
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.train import register_checkpoint

    result = register_checkpoint(best_pt, results, data, name, settings=settings, experiment=experiment,
                                 allow_unverified_parity=allow_unverified, torchscript=torchscript, conf=parity_conf)
    typer.echo(json.dumps(result.to_dict(), indent=2))
    _check_parity(result, allow_unverified)
    typer.echo(f"registered {result.model_name} version {result.model_version}")
