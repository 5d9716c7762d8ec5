"""`sqis data ...`: import a source dataset into the internal format (YOLO layout + card), export reviewed frames."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings

data_app = typer.Typer(help="Datasets: import sources into the internal YOLO format.", no_args_is_help=True)


@data_app.command("import")
def import_cmd(
    fmt: Annotated[
        str,
        typer.Argument(metavar="FORMAT", help=(
            "neu-det | kolektor | ksdd2 | mvtec-ad | dagm | voc | yolo | coco | pixel-boxes; the layout each "
            "expects: docs/formats/FORMAT.md")),
    ],
    src: Annotated[Path, typer.Argument(metavar="SRC", help="source dataset directory")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="output directory (internal format)")],
    splits: Annotated[
        Path | None,
        typer.Option(
            "--splits",
            help="split dir ({train,val,test}.txt) or file of `id split` lines [default: SRC/splits if present]",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the stratified split")] = 0,
    val_frac: Annotated[
        float, typer.Option("--val-frac", min=0.0, max=0.9, help="share of images for val (seeded split)")
    ] = 0.15,
    test_frac: Annotated[
        float, typer.Option("--test-frac", min=0.0, max=0.9, help="share of images for test (seeded split)")
    ] = 0.15,
    resplit: Annotated[
        bool,
        typer.Option(
            "--resplit",
            help="ignore the source's own splits (SRC/splits, published train/test) and split seeded",
        ),
    ] = False,
    classes: Annotated[
        str | None, typer.Option("--classes", help="comma-separated class list; other names are an error")
    ] = None,
    single_class: Annotated[
        bool, typer.Option("--single-class", help="mvtec-ad/dagm: one class `defect`")
    ] = False,
    min_area: Annotated[
        int, typer.Option("--min-area", min=0, help="mask formats: ignore components smaller than this (px)")
    ] = 10,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing imported dataset at OUT")
    ] = False,
) -> None:
    """Import SRC (of FORMAT) into OUT: images/, labels/ (YOLO), data.yaml, card.json, CARD.md.

    Each format's expected layout, class-id and coordinate rules are in docs/formats/FORMAT.md
    (docs/formats/README.md lists them). Splits: the source's own (SRC/splits/{train,val,test}.txt of
    image ids, or a published train/test), else seeded and stratified; a missing val split is carved
    from train.
    """
    from infra.logs import setup_logging
    from training.importers import FORMATS, ImportOptions, import_dataset

    setup_logging("WARNING")
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r} (known: {', '.join(FORMATS)})")
    opts = ImportOptions(
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None,
        single_class=single_class,
        min_area=min_area,
    )
    card = import_dataset(
        fmt,
        src,
        out,
        splits=splits,
        seed=seed,
        val_frac=val_frac,
        test_frac=test_frac,
        resplit=resplit,
        force=force,
        opts=opts,
    )
    typer.echo(
        f"imported {card.total_images} images, {card.total_boxes} boxes, {len(card.classes)} classes -> {out}"
    )
    for sp, st in card.splits.items():
        typer.echo(f"  {sp:<5} images={st.images:<6} defect_free={st.defect_free_images:<5} boxes={st.boxes}")
    typer.echo(f"  split: {card.split_origin.get('kind')}  data.yaml: {Path(out) / 'data.yaml'}")


@data_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="output directory (internal format, with card)")],
    images: Annotated[int, typer.Option("--images", min=3, help="number of images")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the synthetic camera")] = 0,
    size: Annotated[int, typer.Option(min=64, max=2048, help="square image size in pixels")] = 320,
    defect_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of parts with defects")] = 0.85,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset at OUT")] = False,
) -> None:
    """Render a labelled dataset with the synthetic camera (scratch, dent, spot) and import it.

    The frames are the ones `sqis produce --source synthetic` publishes, so a model trained on it
    finds real detections in `make demo`.
    """
    import tempfile

    from producers.synthetic import generate_dataset
    from training.importers import import_dataset

    with tempfile.TemporaryDirectory(prefix="sqis-synth-") as tmp:
        generate_dataset(Path(tmp) / "raw", images, seed=seed, size=size, defect_rate=defect_rate)
        import_dataset("yolo", Path(tmp) / "raw", out, force=force)
    typer.echo(f"synthetic dataset ({images} images, seed {seed}, {size}px) -> {out}")


@data_app.command("tile")
def tile_cmd(
    src: Annotated[Path, typer.Argument(help="an imported dataset (sqis data import)")],
    out: Annotated[Path, typer.Argument(help="output directory for the tiled dataset")],
    tile: Annotated[int, typer.Option("--tile", min=32, help="tile size in pixels of the original frame")] = 512,
    overlap: Annotated[float, typer.Option("--overlap", min=0.0, max=0.89, help="tile overlap, a fraction of SIZE")] = 0.2,
    train_empty_frac: Annotated[float, typer.Option("--train-empty-frac", min=0.0, max=1.0, help=(
        "share of defect-free train tiles kept (seeded); val and test keep every tile"))] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="seed of the defect-free tile sample")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing OUT")] = False,
) -> None:
    """Cut every image of SRC into the overlapping tiles `--tile SIZE --overlap R` inference uses, boxes
    clipped to each tile, splits kept: train on it to serve a model with --tile."""
    from inference_workers.tiling import TileSpec
    from training.tiles import tile_dataset

    stats = tile_dataset(src, out, TileSpec(tile, overlap), force=force, train_empty_frac=train_empty_frac, seed=seed)
    for sp, st in stats.items():
        typer.echo(f"  {sp:<5} images={st['images']:<6} tiles={st['tiles']:<6} boxes={st['boxes']:<6} "
                   f"defect_free_tiles={st['defect_free_tiles']}")
    typer.echo(f"tiled dataset -> {out / 'data.yaml'}")


# ---- sqis data export-reviewed ----------------------------------------------------------------


@data_app.command("export-reviewed")
def export_reviewed(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="output directory (internal dataset format)")],
    state_dir: StateDir = None,
    since: Annotated[str | None, typer.Option("--since", help="only reviews at/after this ISO time")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the stratified split")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset at OUT")] = False,
) -> None:
    """Reviewed frames as a labelled set for retraining: confirmed defects keep their boxes, false
    rejects become defect-free images (the internal YOLO format with card, as `sqis data import`)."""
    from datetime import datetime

    from training.reviewed import export_reviewed as run

    s = build_settings(state_dir=state_dir)
    t = None
    if since:
        try:
            t = datetime.fromisoformat(since)
        except ValueError:
            raise UserError(f"--since {since!r} is not an ISO time (2026-12-01T08:00:00+00:00)") from None
    card = run(s, out, since=t, seed=seed, force=force)
    typer.echo(f"exported {card.total_images} reviewed images, {card.total_boxes} boxes, "
               f"classes {', '.join(card.classes)} -> {out}")
