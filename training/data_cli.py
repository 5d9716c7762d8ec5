"""`sqis data ...`: import a source dataset into the internal format (YOLO layout + card), export reviewed frames."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings

data_app = typer.Typer(help="Datasets: import sources into the internal YOLO format.", no_args_is_help=True)

DatasetName = Annotated[str | None, typer.Option(
    "--name", help="dataset name its versions are logged under in MLflow [default: OUT's folder name]")]
Track = Annotated[bool, typer.Option(
    "--track/--no-track", help="log the written dataset to MLflow as a dataset version (`sqis data versions`)")]


def track_version(out: Path, operation: str, *, name: str | None, state_dir: Path | None, track: bool,
                  parents: list[str] | None = None) -> None:
    """Log OUT as a dataset version (MLflow under the state dir) and say which version it is."""
    if not track:
        return
    from training.dataset_versions import log_dataset_version

    v, new = log_dataset_version(build_settings(state_dir=state_dir), out, name, operation=operation, parents=parents)
    typer.echo(f"  dataset version: {v.name} v{v.version} digest {v.digest}"
               + ("" if new else " (same content as before: no new version)"))


@data_app.command("import")
def import_cmd(
    fmt: Annotated[
        str,
        typer.Argument(metavar="FORMAT", help=(
            "neu-det | kolektor | ksdd2 | mvtec-ad | dagm | voc | yolo | coco | pixel-boxes | mask-folders; the layout each "
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
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help=(
            "import the valid samples and list the dropped ones (file and reason) in the card; by default "
            "every problem found is reported and nothing is imported"))
    ] = False,
    name: DatasetName = None,
    state_dir: StateDir = None,
    track: Track = True,
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
        skip_invalid=skip_invalid,
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
    if card.skipped:
        typer.echo(f"  skipped {len(card.skipped)} invalid file(s) (listed in {Path(out) / 'CARD.md'}):")
        for p in card.skipped[:20]:
            typer.echo(f"    {p['file']}: {p['reason']}")
        if len(card.skipped) > 20:
            typer.echo(f"    ... and {len(card.skipped) - 20} more")
    track_version(out, "import", name=name, state_dir=state_dir, track=track)


@data_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="output directory (internal format, with card)")],
    images: Annotated[int, typer.Option("--images", min=3, help="number of images")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the synthetic camera")] = 0,
    size: Annotated[int, typer.Option(min=64, max=2048, help="square image size in pixels")] = 320,
    defect_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of parts with defects")] = 0.85,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset at OUT")] = False,
    name: DatasetName = None,
    state_dir: StateDir = None,
    track: Track = True,
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
    track_version(out, "synth", name=name, state_dir=state_dir, track=track)


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
    name: DatasetName = None,
    state_dir: StateDir = None,
    track: Track = True,
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
    if track:
        from training.dataset_versions import content_digest

        track_version(out, "tile", name=name, state_dir=state_dir, track=track, parents=[content_digest(src)])


@data_app.command("versions")
def versions_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="dataset name (`--name` of the command that wrote it)")],
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per version")] = False,
) -> None:
    """List NAME's versions logged in MLflow: version, content digest, when, by what, images per split."""
    import json

    from training.dataset_versions import list_dataset_versions
    from training.registry import client_for

    versions = list_dataset_versions(client_for(build_settings(state_dir=state_dir)), name)
    if not versions:
        raise UserError(f"no dataset named {name!r} has been logged (import, synth, tile, merge or "
                        "export-reviewed log one; see --name)")
    for v in versions:
        if as_json:
            typer.echo(json.dumps(v.to_dict()))
            continue
        imgs = " ".join(f"{sp}={n}" for sp, n in v.images.items())
        extra = f"  skipped={v.skipped}" if v.skipped else ""
        typer.echo(f"v{v.version:<3} {v.digest}  {v.created_at}  {v.operation:<15} {imgs}{extra}  {v.path}")


@data_app.command("merge")
def merge_cmd(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="the dataset to extend (internal format)")],
    reviewed: Annotated[Path, typer.Argument(metavar="REVIEWED", help="reviewed frames (`sqis data export-reviewed`)")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="output directory for the merged dataset")],
    seed: Annotated[int, typer.Option("--seed", help="seed of the reviewed frames' train/val split")] = 0,
    val_frac: Annotated[float, typer.Option("--val-frac", min=0.0, max=0.9, help="share of reviewed frames for val")] = 0.15,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset at OUT")] = False,
    name: DatasetName = None,
    state_dir: StateDir = None,
    track: Track = True,
) -> None:
    """BASE + REVIEWED -> OUT, a new dataset version: reviewed frames already in BASE (same bytes) are
    dropped, the rest go to train/val only (BASE's test split stays frozen), BASE's splits are kept."""
    from training.merge import merge_reviewed

    card, st = merge_reviewed(base, reviewed, out, seed=seed, val_frac=val_frac, force=force)
    typer.echo(f"merged {card.total_images} images ({st['added']} reviewed frames added, {st['added_to_val']} to val; "
               f"{st['duplicates_dropped']} duplicates dropped) -> {out}")
    for sp, s in card.splits.items():
        typer.echo(f"  {sp:<5} images={s.images:<6} defect_free={s.defect_free_images:<5} boxes={s.boxes}")
    if track:
        from training.dataset_versions import content_digest

        track_version(out, "merge", name=name, state_dir=state_dir, track=track,
                      parents=[content_digest(base), content_digest(reviewed)])


# ---- sqis data export-reviewed ----------------------------------------------------------------


@data_app.command("export-reviewed")
def export_reviewed(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="output directory (internal dataset format)")],
    state_dir: StateDir = None,
    since: Annotated[str | None, typer.Option("--since", help="only reviews at/after this ISO time")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the stratified split")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing dataset at OUT")] = False,
    name: DatasetName = None,
    track: Track = True,
) -> None:
    """Reviewed frames as a labelled set for retraining: confirmed defects keep their boxes, false
    rejects become defect-free images, missed defects get the candidate boxes they were queued for review
    with (the internal YOLO format with card, as `sqis data import`)."""
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
    track_version(out, "export-reviewed", name=name, state_dir=state_dir, track=track)
