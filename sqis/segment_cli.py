"""`sqis sam export` and `sqis bench segment` (registered in the CLI root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings
from training.errors import ParityBlocked

sam_app = typer.Typer(help="Segment Anything: export checkpoints to ONNX for the worker's segmenter.",
                      no_args_is_help=True)


@sam_app.command("export")
def sam_export(
    out: Annotated[Path, typer.Option("--out", help="directory for encoder.onnx, decoder.onnx, sam.json")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="segment-anything .pth (omit with --random)")] = None,
    sam_type: Annotated[str, typer.Option("--type", help="vit_b | vit_l | vit_h (tiny: a small test graph)")] = "vit_b",
    random_weights: Annotated[bool, typer.Option("--random", help="random weights (timing only), no checkpoint")] = False,
    opset: Annotated[int, typer.Option("--opset", min=11, max=21, help="ONNX opset")] = 17,
    no_parity: Annotated[bool, typer.Option("--no-parity", help="skip the ONNX/PyTorch parity check")] = False,
    state_dir: StateDir = None,
) -> None:
    """Export a SAM checkpoint's image encoder and batched box decoder to ONNX, with a parity check."""
    build_settings(state_dir=state_dir)
    if checkpoint is None and not random_weights:
        raise UserError("--checkpoint PATH is required (or --random for a random-weight graph)")
    if checkpoint is not None and not checkpoint.is_file():
        raise UserError(f"--checkpoint {checkpoint}: no such file")
    from training.sam_export import SAM_TYPES, export_sam, load_sam

    if sam_type not in SAM_TYPES:
        raise UserError(f"--type {sam_type!r}: expected one of {', '.join(SAM_TYPES)}")
    sam = load_sam(sam_type, checkpoint)
    result = export_sam(sam, out, sam_type=sam_type, checkpoint=checkpoint, opset=opset, parity=not no_parity)
    typer.echo(json.dumps(result.to_dict(), indent=2))
    if result.parity and not result.parity.get("passed"):
        raise ParityBlocked("ONNX/PyTorch parity check failed")


def bench_segment(
    sam_type: Annotated[str, typer.Option("--sam-type", help="SAM graph to time (random weights)")] = "vit_b",
    sam_dir: Annotated[Path | None, typer.Option("--sam-dir", help="an exported SAM dir [default: export one]")] = None,
    yolo_model: Annotated[Path | None, typer.Option("--yolo-model", help="yolo-seg .onnx [default: untrained v8n-seg]")] = None,
    yolo_imgsz: Annotated[int, typer.Option("--yolo-imgsz", min=32, max=4096, help="imgsz of the untrained yolo-seg")] = 640,
    image: Annotated[int, typer.Option("--image", min=64, max=8192, help="square frame size in px")] = 1024,
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 3,
    threads: Annotated[int, typer.Option("--threads", min=0, help="ONNX Runtime intra-op threads (0 = default)")] = 0,
    skip_sam: Annotated[bool, typer.Option("--skip-sam")] = False,
    skip_yolo: Annotated[bool, typer.Option("--skip-yolo")] = False,
    tinyvit: Annotated[bool, typer.Option("--tinyvit", help="also time a MobileSAM-scale (TinyViT-5M) encoder; needs timm")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    state_dir: StateDir = None,
) -> None:
    """Segmentation-stage latency per image with 1, 5 and 20 boxes: SAM (encoder once, one batched decoder
    call) and yolo-seg (one forward pass, numpy mask decoding)."""
    settings = build_settings(state_dir=state_dir)
    from sqis.bench.segment import bench_sam, bench_yolo_seg, export_untrained_yolo_seg

    out: dict[str, object] = {}
    work = settings.state_dir / "bench" / "segment"
    if not skip_sam:
        if sam_dir is None:
            from training.sam_export import SAM_TYPES, export_sam, load_sam

            if sam_type not in SAM_TYPES:
                raise UserError(f"--sam-type {sam_type!r}: expected one of {', '.join(SAM_TYPES)}")
            sam_dir = work / f"sam-{sam_type}-random"
            if not (sam_dir / "sam.json").is_file():
                export_sam(load_sam(sam_type, None), sam_dir, sam_type=sam_type, parity=False)
        elif not (sam_dir / "sam.json").is_file():
            raise UserError(f"--sam-dir {sam_dir}: no sam.json")
        out["sam"] = bench_sam(sam_dir, repeats=repeats, threads=threads, image_hw=(image, image))
    if not skip_yolo:
        if yolo_model is not None and not yolo_model.is_file():
            raise UserError(f"--yolo-model {yolo_model}: no such file")
        model = yolo_model or export_untrained_yolo_seg(work / "yolo", imgsz=yolo_imgsz)
        out["yolo_seg"] = bench_yolo_seg(model, repeats=max(repeats, 5), threads=threads, image_hw=(image, image))
    if tinyvit:
        import importlib.util

        if importlib.util.find_spec("timm") is None:
            raise UserError("--tinyvit needs timm (pip install -e '.[sam]')")
        from sqis.bench.segment import bench_tinyvit, export_tinyvit_encoder

        out["tinyvit"] = bench_tinyvit(export_tinyvit_encoder(work / "tinyvit-5m.onnx", image), repeats=max(repeats, 5),
                                       threads=threads, img_size=image)
    if as_json:
        typer.echo(json.dumps(out))
        return
    for kind, res in out.items():
        assert isinstance(res, dict)
        typer.echo(f"{kind}: {res.get('segmenter') or res.get('encoder')}")
        for row in res.get("per_boxes", [res]):
            typer.echo("  " + "  ".join(f"{k} {v}" for k, v in row.items()))
