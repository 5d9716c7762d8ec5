"""`sqis model canary` and `sqis model shadow`: the challenger on chosen lines with automatic rollback or
promotion, and the champion/challenger agreement table (sqis/canary.py, shadow.py)."""

from __future__ import annotations

import json
import signal
import threading
from typing import Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings
from sqis.errors import RolledBack


def model_canary(
    name: Annotated[str, typer.Argument(help="registered model name (workers serve models:/NAME@production)")],
    lines: Annotated[str, typer.Option("--lines", help="comma list of line ids the challenger serves")] = "",
    share: Annotated[float, typer.Option("--share", min=0.0, max=1.0, help="share of cameras (0..1) the challenger serves")] = 0.0,
    version: Annotated[str | None, typer.Option("--version", help="the version to canary [default: @challenger]")] = None,
    sigma: Annotated[float, typer.Option("--sigma", min=0.5, max=10.0, help="rollback: FAIL rate outside production's p̄ ± k·σ")] = 3.0,
    min_frames: Annotated[int, typer.Option("--min-frames", min=1, help="canary verdicts before the rules judge")] = 30,
    latency_budget_ms: Annotated[float, typer.Option("--latency-budget-ms", min=1.0, help="rollback: p95 total_ms above")] = 500.0,
    min_agreement: Annotated[float, typer.Option("--min-agreement", min=0.0, max=1.0, help="rollback: shadow agreement below")] = 0.9,
    min_pairs: Annotated[int, typer.Option("--min-pairs", min=1, help="shadow pairs before the agreement rule judges")] = 30,
    clean_s: Annotated[float, typer.Option("--clean-s", min=0.0, help="promotion after this clean period (s)")] = 3600.0,
    require_shadow: Annotated[bool, typer.Option("--require-shadow", help="promotion needs --min-pairs pairs")] = False,
    poll_s: Annotated[float, typer.Option("--poll-s", min=0.05, max=3600.0, help="how often the rules are judged (s)")] = 5.0,
    lease_s: Annotated[float, typer.Option("--lease-s", min=0.0, help=(
        "workers stop routing when this controller has not renewed the route this long (s); 0: no lease"))] = 120.0,
    no_db: Annotated[bool, typer.Option("--no-db", help="do not write shadow_agreement / model_switches")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    state_dir: StateDir = None,
) -> None:
    """Serve --lines (or a --share of cameras) with NAME@challenger; roll back or promote automatically.
    A canary of NAME still open (its controller stopped or died) is resumed while its lease runs, and rolled
    back (rule controller_lost) when it expired."""
    from sqis.canary import CanaryBusy, CanaryController, CanaryPolicy

    line_list = [x.strip() for x in lines.split(",") if x.strip()]
    if not line_list and share <= 0:
        raise UserError("give --lines L1,L2 and/or --share P (0 < P <= 1)")
    if not 0 <= share <= 1 or not 0 <= min_agreement <= 1:
        raise UserError("--share and --min-agreement must be within [0, 1]")
    settings = build_settings(state_dir=state_dir)
    dsn = None if no_db else settings.dsn()
    policy = CanaryPolicy(sigma=sigma, min_frames=min_frames, latency_budget_ms=latency_budget_ms,
                          min_agreement=min_agreement, min_pairs=min_pairs, clean_s=clean_s,
                          require_shadow=require_shadow)
    try:
        ctl = CanaryController(settings, name, lines=line_list, share=share, policy=policy, version=version,
                               dsn=dsn, poll_s=poll_s, lease_s=lease_s)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        out = ctl.run(stop)
    except CanaryBusy as exc:
        raise UserError(str(exc)) from None
    summary = f"{name} v{out.version}: {out.action} after {out.decided_after_s:.1f} s ({out.rule}: {out.message})"
    if as_json:
        typer.echo(json.dumps(out.__dict__, default=str))
    elif out.action != "rollback":
        typer.echo(summary)
    if out.action == "rollback":
        raise RolledBack(summary)


def model_shadow(
    since_s: Annotated[float, typer.Option("--since-s", min=0.0, help="rebuild the agreement from this far back (s)")] = 3600.0,
    window_s: Annotated[float, typer.Option("--window-s", min=1.0, max=86400.0, help="agreement window (s)")] = 60.0,
    state_dir: StateDir = None,
) -> None:
    """The shadow agreement processor: inspections x inspections.shadow -> PostgreSQL shadow_agreement."""
    from stream_processors.shadow import run_agreement

    settings = build_settings(state_dir=state_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    join = run_agreement(settings, settings.dsn(), since_s=since_s, window_s=window_s, stop=stop)
    typer.echo(f"{len(join.windows)} agreement windows written")


def register(model_app: typer.Typer, bench_app: typer.Typer) -> None:
    from sqis.bench.canary import bench_canary
    from sqis.bench.lifecycle import bench_lifecycle

    model_app.command("canary")(model_canary)
    model_app.command("shadow")(model_shadow)
    bench_app.command("canary")(bench_canary)
    bench_app.command("lifecycle")(bench_lifecycle)
