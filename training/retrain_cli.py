"""`sqis retrain`: reviewed frames -> new dataset version -> fine-tuned challenger, gated (training/retrain.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import StateDir, build_settings, parse_time_us


def retrain_cmd(
    base: Annotated[str, typer.Option("--base", help=(
        "the dataset to extend: a dataset dir, a dataset NAME (its newest version), NAME@vN or NAME@DIGEST-PREFIX"))],
    name: Annotated[str, typer.Option("--name", help="registered model: fine-tuned from NAME@production")] = "sqis-detector",
    epochs: Annotated[int, typer.Option("--epochs", min=1, max=1000, help="fine-tuning epochs")] = 10,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=32, max=4096, help=(
        "training size, a multiple of 32 [default: the production checkpoint's]"))] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, max=1024)] = 16,
    since: Annotated[str | None, typer.Option("--since", help=(
        "reviews at/after this ISO time [default: when the production version was registered]"))] = None,
    margin: Annotated[float, typer.Option("--margin", min=0.0, max=1.0, help=(
        "gate: no class's AP@0.5 may be lower than production's by more than this"))] = 0.05,
    recall_slack: Annotated[float, typer.Option("--recall-slack", min=0.0, max=1.0, help=(
        "gate: image recall at the operating point may be lower than production's by at most this"))] = 0.0,
    min_reviewed: Annotated[int, typer.Option("--min-reviewed", min=0, max=1_000_000, help=(
        "skip (exit 0) with fewer new reviewed frames"))] = 1,
    max_fpr: Annotated[float, typer.Option("--max-fpr", min=0.0, max=1.0, help=(
        "false-reject budget of the challenger's calibration on val"))] = 0.05,
    if_drift: Annotated[bool, typer.Option("--if-drift", help=(
        "only run when a drift alert is open (not acknowledged) since the last retrain; else exit 0"))] = False,
    line: Annotated[list[str] | None, typer.Option("--line", help="with --if-drift: only alerts of this line (repeat)")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or a CUDA index (0)")] = "cpu",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help=(
        "working folder (reviewed export, merged dataset, runs) [default: STATE_DIR/retrain/NAME-TIME]"))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
    state_dir: StateDir = None,
) -> None:
    """Fine-tune a challenger on the reviewed frames: export reviews, merge them into BASE (a new dataset
    version; the test split stays frozen), fine-tune from NAME@production, calibrate on val, gate against
    production on the frozen test split and on the reviewed frames, and set @challenger on a pass.
    A refusal exits 1 with the figures."""
    from datetime import UTC, datetime

    from training.retrain import RetrainRefused, output_to_stderr, retrain

    settings = build_settings(state_dir=state_dir)
    t = datetime.fromtimestamp(parse_time_us(since, "--since") / 1e6, UTC) if since else None
    echo = (lambda s: typer.echo(s, err=True)) if as_json else typer.echo
    quiet = output_to_stderr(settings.state_dir.resolve()) if as_json else contextlib.nullcontext()
    with quiet:
        res = retrain(settings, name=name, base=base, since=t, epochs=epochs, imgsz=imgsz, batch=batch, margin=margin,
                      recall_slack=recall_slack, min_reviewed=min_reviewed, if_drift=if_drift, seed=seed, out=out,
                      progress=not as_json, drift_lines=line or (), max_fpr=max_fpr, device=device, echo=echo)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), default=str))
    else:
        for line_ in summary_lines(res):
            typer.echo(line_)
    if res.status == "refused":
        raise RetrainRefused(f"{name} v{res.version} refused by the gate (no alias set): {res.reason}")


def summary_lines(res: object) -> list[str]:
    """Human lines of a RetrainResult."""
    from training.retrain import RetrainResult

    assert isinstance(res, RetrainResult)
    if res.status == "skipped":
        return [f"skipped: {res.reason}"]
    ds = res.dataset
    lines = [f"dataset {ds.get('name')} v{ds.get('version')} digest {res.dataset_digest}: {ds.get('added')} reviewed "
             f"frames added ({ds.get('added_to_val')} to val, {ds.get('duplicates_dropped')} duplicates dropped)"]
    for where in ("test", "reviewed"):
        g = res.gate.get(where)
        if not g:
            continue
        c0, c1 = g["champion"], g["challenger"]
        aps = "  ".join(f"{c} {c0['ap50'][c]:.3f}->{c1['ap50'].get(c, 0.0):.3f}" for c in c0["ap50"])
        rec = "-" if c0["image_recall"] is None else f"{c0['image_recall']:.3f}"
        rec1 = "-" if c1["image_recall"] is None else f"{c1['image_recall']:.3f}"
        lines.append(f"{where:<8} ({c0['images']} images) AP@0.5 production->v{res.version}: {aps}  "
                     f"image recall {rec}->{rec1}")
    lines.append("timings: " + "  ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()))
    lines.append(f"{res.status}: {res.reason}")
    return lines
