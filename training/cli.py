"""`sqis train`, `sqis eval`, `sqis model ...` (and `sqis data ...`, re-exported from training/data_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings
from training.data_cli import data_app  # noqa: E402,F401

if TYPE_CHECKING:
    from inference_workers.tiling import TileSpec
    from training.train import TrainResult

model_app = typer.Typer(help="Model registry (MLflow): list, promote, export, register a checkpoint.", no_args_is_help=True)

TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI [default: sqlite under the state dir]")]
AllowUnverified = Annotated[bool, typer.Option(
    "--allow-unverified-parity", help="register even when the parity check had no detections to compare")]

TorchScript = Annotated[bool, typer.Option("--torchscript", help="also export (and log) a TorchScript file")]


def _check_parity(result: TrainResult, allow_unverified: bool) -> None:
    """Exit 1 when the parity check blocked registration; warn when an unverified model went through."""
    from training.errors import ParityBlocked
    from training.train import parity_blocks_registration

    p = result.parity
    if p is None or p.passed:
        return
    if parity_blocks_registration(p, allow_unverified):
        why = "failed" if p.status == "failed" else (
            f"unverified ({p.images} golden images, {p.matched} matched detections; "
            "--allow-unverified-parity registers anyway)")
        raise ParityBlocked(f"ONNX/PyTorch parity check {why}; the model was not registered")
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
    model: Annotated[str, typer.Option("--model", help="yolov8n|s|m|l|x or rtdetr-l|x (built from yaml, no download)")] = "yolov8n",
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
    out: Annotated[Path | None, typer.Option("--out", help=(
        "folder for the run folders (weights, results.csv, ONNX) [default: STATE_DIR/runs]"))] = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="no tracking and no registration")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="turn off augmentation")] = False,
    experiment: Annotated[str, typer.Option("--experiment")] = "sqis-detector",
    allow_unverified: AllowUnverified = False,
    torchscript: TorchScript = False,
    task: Annotated[str, typer.Option("--task", help="detect | segment (YOLOv8-seg on the dataset's polygons)")] = "detect",
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Train YOLOv8 (or RT-DETR: --model rtdetr-l) on an imported dataset; export ONNX, check parity, log to
    MLflow and register (tagged arch=yolov8|rtdetr).

    Where things go: each run writes OUT/<model>-<imgsz>-<time>/ (weights/best.pt, last.pt,
    results.csv, the ONNX export), OUT being --out or STATE_DIR/runs; runs, metrics and registered
    versions go to the MLflow store --tracking-uri, by default sqlite:///STATE_DIR/mlflow.db with
    artifacts in STATE_DIR/mlartifacts (STATE_DIR: --state-dir, env SQIS_STATE_DIR, default ./.sqis).
    Browse it with `mlflow ui --backend-store-uri sqlite:///STATE_DIR/mlflow.db`. A run stopped with
    Ctrl-C or SIGTERM ends KILLED in MLflow; continue it with --resume <run folder>/weights/last.pt.
    """
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.errors import RunKilled
    from training.train import TrainingStopped, train

    if time_h is not None and time_h <= 0:
        raise UserError("--time-h must be > 0")
    try:
        result = train(
            data, model=model, imgsz=imgsz, epochs=epochs, batch=batch, weights=weights, device=device,
            workers=workers, seed=seed, patience=patience, time_h=time_h, resume=resume, mlflow=not no_mlflow,
            experiment=experiment, register_name=None if no_mlflow else name, augment=not no_augment,
            settings=settings, progress=True, allow_unverified_parity=allow_unverified, torchscript=torchscript,
            project_dir=out, task=task,
        )
    except TrainingStopped as exc:
        raise RunKilled(f"training stopped by SIGTERM; the MLflow run is KILLED "
                        f"({'; '.join(getattr(exc, '__notes__', []))}); continue with --resume "
                        "<run_dir>/weights/last.pt") from None
    typer.echo(json.dumps(result.to_dict(), indent=2))
    _check_parity(result, allow_unverified)
    if result.model_version:
        typer.echo(f"registered {result.model_name} version {result.model_version}")


Tile = Annotated[int | None, typer.Option("--tile", min=32, help=(
    "run on overlapping SIZE x SIZE tiles of each frame (small defects in large frames)"))]
Overlap = Annotated[float, typer.Option("--overlap", min=0.0, max=0.89, help="tile overlap as a fraction of SIZE")]


def _tile_spec(tile: int | None, overlap: float) -> TileSpec | None:
    from inference_workers.tiling import TileSpec

    try:
        return None if tile is None else TileSpec(tile, overlap)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def calibrate_cmd(
    model: Annotated[str, typer.Option("--model", help=".onnx path or models:/NAME@alias | models:/NAME/VERSION")],
    data: Annotated[Path, typer.Option("--data", help="imported dataset dir")],
    split: Annotated[str, typer.Option("--split", help="the split to calibrate on (never the test split)")] = "val",
    max_fpr: Annotated[float | None, typer.Option("--max-fpr", min=0.0, max=1.0, help=(
        "image-level false-reject budget: share of defect-free images allowed to FAIL [default: 0.05]"))] = None,
    target_recall: Annotated[float | None, typer.Option("--target-recall", min=0.0, max=1.0, help=(
        "instead of --max-fpr: the fewest false rejects that still reach this image-level recall"))] = None,
    iou: Annotated[float, typer.Option("--iou", min=0.0, max=1.0, help="NMS IoU threshold")] = 0.45,
    out: Annotated[Path | None, typer.Option("--out", help=(
        "where calibration.json and calibration.png go [default: next to an .onnx file, else "
        "STATE_DIR/calibration/NAME-VERSION]"))] = None,
    no_store: Annotated[bool, typer.Option("--no-store", help="only report; do not store the thresholds")] = False,
    tile: Tile = None,
    overlap: Overlap = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Choose the operating point on the val split: an image-level threshold with the highest recall
    within the false-reject budget, and per-class box thresholds; plot the trade-off and store the
    thresholds with the model version, where workers and `sqis eval` pick them up by default."""
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from inference_workers.detector import DetectorError
    from training.calibrate import calibrate, summary_lines

    if max_fpr is not None and target_recall is not None:
        raise UserError("give --max-fpr or --target-recall, not both")
    if max_fpr is None and target_recall is None:
        max_fpr = 0.05
    for flag, v in (("--max-fpr", max_fpr), ("--target-recall", target_recall), ("--iou", iou)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise UserError(f"{flag} {v}: must be within [0, 1]")
    if split == "test":
        typer.secho("warning: calibrating on the test split leaves no unbiased test figure", err=True, fg="yellow")
    if out is None:
        if model.startswith("models:/"):
            out = settings.state_dir / "calibration" / model.removeprefix("models:/").replace("/", "-").replace("@", "-")
        else:
            out = Path(model).expanduser().parent
    try:
        cal = calibrate(model, data, split, max_fpr=max_fpr, target_recall=target_recall, iou=iou, settings=settings,
                        out_dir=out, store=not no_store, tile=_tile_spec(tile, overlap))
    except DetectorError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(cal.to_dict()))
        return
    for line in summary_lines(cal):
        typer.echo(line)
    typer.echo(f"curve: {out / 'calibration.json'}" + (f", {out / 'calibration.png'}" if cal.point else ""))


def eval_cmd(
    model: Annotated[str, typer.Option("--model", help=".onnx path or models:/NAME@alias | models:/NAME/VERSION")],
    data: Annotated[Path, typer.Option("--data", help="imported dataset dir")],
    split: Annotated[str, typer.Option("--split")] = "test",
    conf: Annotated[float | None, typer.Option("--conf", min=0.0, max=1.0, help=(
        "operating score threshold [default: the model's calibrated operating point, else 0.25]"))] = None,
    iou: Annotated[float, typer.Option("--iou", min=0.0, max=1.0, help="NMS IoU threshold")] = 0.45,
    class_conf: Annotated[list[str] | None, typer.Option("--class-conf", "--class-score", help="per-class threshold NAME=SCORE (repeatable, or NAME=S,NAME=S); same syntax as `sqis worker`")] = None,
    fpr: Annotated[float, typer.Option("--fpr", min=0.0, max=1.0, help="image-level false-positive rate for the recall figure")] = 0.05,
    latency: Annotated[bool, typer.Option("--latency", help="also measure CPU latency at batch 1 and 8")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    tile: Tile = None,
    overlap: Overlap = 0.2,
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
        if v is not None and not 0.0 <= v <= 1.0:
            raise UserError(f"{flag} {v}: must be within [0, 1]")
    try:
        out = evaluate(model, data, split, conf, iou, settings=settings, per_class=_parse_per_class(class_conf),
                       target_fpr=fpr, latency=latency, tile=_tile_spec(tile, overlap), segmenter=segmenter,
                       sam_model=sam_model)
    except DetectorError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"model {out['model']['name']} v{out['model']['version']}  split {split}  images {out['images']}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    typer.echo(f"mAP50 {fmt(out['map50'])}  mAP50-95 {fmt(out['map50_95'])}  "
               f"P {fmt(out['precision'])}  R {fmt(out['recall'])} @ thresholds {out['thresholds']['source']} "
               f"(default {out['conf']:g}" + (f", image {out['thresholds']['image_score']:.4f})"
                                               if out["thresholds"]["image_score"] is not None else ")"))
    for cname, c in out["per_class"].items():
        typer.echo(f"  {cname:<20} gt {c['gt']:>5}  AP50 {fmt(c['ap50'])}  AP50-95 {fmt(c['ap50_95'])}  "
                   f"P {fmt(c['precision'])}  R {fmt(c['recall'])}")
    il = out["image_level"]
    typer.echo(f"image-level recall @ FPR<={fpr}: {fmt(il['recall'])}" + (f" ({il['reason']})" if il["reason"] else ""))
    op = il.get("at_operating") or {}
    typer.echo(f"image-level at the operating point: recall {fmt(op.get('recall'))}  "
               f"false-reject rate {fmt(op.get('fpr'))}")
    if latency:
        typer.echo(f"CPU latency ms/img: {out['latency_ms_per_image']}")
    if "masks" in out:
        mk = out["masks"]
        typer.echo(f"masks ({mk['segmenter']}): mask mAP50 {fmt(mk['mask_map50'])}  mAP50-95 {fmt(mk['mask_map50_95'])}  "
                   f"mean IoU {fmt(mk['mean_mask_iou'])} (detected {fmt(mk['mean_mask_iou_detected'])})  "
                   f"Dice {fmt(mk['mean_dice'])}  pixel AUROC {fmt(mk['pixel_auroc'])}")


@model_app.command("list")
def model_list(
    name: Annotated[str | None, typer.Argument(help="registered model name [default: every model]")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Versions of a registered model (or of every model), newest first, with aliases and metrics tags."""
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from training.registry import client_for, list_models, list_versions

    client = client_for(settings)
    names = [name] if name else list_models(client)
    if not names and not as_json:
        typer.echo(f"no registered models in {tracking_uri or settings.tracking_uri()}")
        return
    versions = [v for n in names for v in list_versions(client, n)]
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in versions]))
        return
    for v in versions:
        m = {k.removeprefix("metric."): v.tags[k] for k in sorted(v.tags) if k.startswith("metric.map")}
        cal = " calibrated" if "sqis.thresholds" in v.tags else ""
        typer.echo(f"{v.name} v{v.version:<4} {','.join(v.aliases) or '-':<12} run {v.run_id}  {m}{cal}")


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
        "--parity-conf", min=0.0, max=1.0, help="score threshold of the parity check (lower it for an undertrained model)")] = 0.05,
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


@model_app.command("quantize")
def model_quantize(
    model: Annotated[str, typer.Option("--model", help=".onnx path or models:/NAME@alias | models:/NAME/VERSION (FP32)")],
    data: Annotated[Path, typer.Option("--data", help="the imported dataset: val calibrates, test gates")],
    out: Annotated[Path | None, typer.Option("--out", help=(
        "the INT8 .onnx to write [default: next to an .onnx file as NAME-int8.onnx, else STATE_DIR/quantized/]"))] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, help="val images for activation ranges")] = 64,
    keep_fp32: Annotated[str, typer.Option("--keep-fp32", help=(
        "what stays FP32: auto (decode, then head-all if the gate refuses) | decode (the head's box decode, "
        "DFL and concat) | head (every non-Conv head node) | head-all (the whole head) | none"))] = "auto",
    calib_from: Annotated[str | None, typer.Option("--calib-from", help=(
        "split the calibration images come from [default: val]; train gives a small val more images"))] = None,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="per-tensor weight scales (default: per channel)")] = False,
    calib_method: Annotated[str, typer.Option("--calib-method", help="minmax | percentile | entropy")] = "minmax",
    max_map_drop: Annotated[float, typer.Option("--max-map-drop", min=0.0, max=1.0, help=(
        "gate: largest allowed test mAP@0.5 drop against FP32"))] = 0.01,
    max_fpr: Annotated[float, typer.Option("--max-fpr", min=0.0, max=1.0, help=(
        "false-reject budget of the INT8 model's own calibration on val"))] = 0.05,
    no_gate: Annotated[bool, typer.Option("--no-gate", help="skip the test-split gate (parity report only)")] = False,
    register: Annotated[str | None, typer.Option("--register", help="register the INT8 model as a new version of NAME")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    tracking_uri: TrackingUri = None,
    state_dir: StateDir = None,
) -> None:
    """Static INT8 quantization (ONNX Runtime QDQ, per-channel weights, val-split calibration) with a
    parity report against FP32 and an accuracy gate on the test split (mAP@0.5 drop <= --max-map-drop;
    image recall at the calibrated operating point not lower). Refused (exit 1, the figures on one
    line, no file left) when the gate fails; else calibrated on val in its own right and optionally
    registered as a new version."""
    settings = build_settings(state_dir=state_dir, mlflow_tracking_uri=tracking_uri)
    from inference_workers.detector import DetectorError
    from training.quantize import KEEP_FP32, quantize  # QuantizeRefused: one line, exit 1 (sqis/cli.py)

    if keep_fp32 != "auto" and keep_fp32 not in KEEP_FP32:
        raise UserError(f"--keep-fp32 {keep_fp32!r}: choose auto or one of {', '.join(KEEP_FP32)}")
    if out is None:
        if model.startswith("models:/"):
            out = settings.state_dir / "quantized" / (model.removeprefix("models:/").replace("/", "-").replace("@", "-")
                                                      + "-int8.onnx")
        else:
            from training.quantize import int8_path

            out = int8_path(Path(model).expanduser())
    try:
        report = quantize(model, data, out, settings=settings, calib_images=calib_images, calib_from=calib_from,
                          keep_fp32=keep_fp32,
                          per_channel=not per_tensor, method=calib_method, max_map_drop=max_map_drop,
                          gate=not no_gate, max_fpr=max_fpr, register=register)
    except DetectorError as exc:
        raise UserError(str(exc)) from None
    report_path = out.with_name(out.stem + ".quantize.json")
    report_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    q, p = report.quantization, report.parity
    typer.echo(f"INT8 model {out} ({q['dst_bytes'] / 1e6:.1f} MB from {q['src_bytes'] / 1e6:.1f} MB; "
               f"{q['fp32_nodes']} nodes kept FP32 ({q['keep_fp32']}); {q['calibration_images']} calibration images)")
    typer.echo(f"parity on {p['images']} val images: raw score |diff| max {p['raw_score_abs_diff']['max']} "
               f"mean {p['raw_score_abs_diff']['mean']}; boxes at conf {p['conf']}: {p['boxes']['matched']}/"
               f"{p['boxes']['fp32']} matched, IoU min {p['matched_iou']['min']} mean {p['matched_iou']['mean']}, "
               f"score |diff| max {p['matched_score_abs_diff']['max']}")
    if report.gate is not None:
        g = report.gate
        typer.echo(f"gate (test): mAP@0.5 FP32 {g.fp32['map50']:.4f} INT8 {g.int8['map50']:.4f} "
                   f"(max drop {g.max_map_drop:g}); image recall at the operating point FP32 "
                   f"{_fmt3(g.fp32['image_recall_at_operating'])} INT8 {_fmt3(g.int8['image_recall_at_operating'])}: passed")
    if report.calibration:
        typer.echo(f"INT8 operating point stored: {', '.join(report.calibration['stored'])}")
    if report.registered:
        typer.echo(f"registered {report.registered['name']} version {report.registered['version']}")
    typer.echo(f"report: {report_path}")


def _fmt3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
