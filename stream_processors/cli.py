"""`sqis stream ...` (the processors), `sqis spc baseline`, `sqis bench alerts|rates`."""

from __future__ import annotations

import json
import logging
import signal
import threading
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings, check_endpoints

log = logging.getLogger(__name__)

stream_app = typer.Typer(help="Stream processors: defect rates, SPC alerts, part verdicts, drift.",
                         no_args_is_help=True)
spc_app = typer.Typer(help="Statistical process control: p-chart baselines.", no_args_is_help=True)

WindowS = Annotated[int, typer.Option("--window-s", min=1, help="tumbling window length (event time)")]
GraceS = Annotated[int, typer.Option("--grace-s", min=0, help="how long a window waits for late frames")]
Rules = Annotated[str, typer.Option("--rules", help="SPC rules: we1..we4, all, or K/M>Z (e.g. 2/2>3), comma list")]
Side = Annotated[str, typer.Option("--side", help="upper | lower | both")]
Warmup = Annotated[int, typer.Option("--warmup-points", min=1, help="points that estimate p̄ before a baseline exists")]
Threshold = Annotated[list[str] | None, typer.Option("--threshold", help="LINE[:CLASS]=RATE plain threshold (repeatable)")]
ExpectedViews = Annotated[int, typer.Option("--expected-views", min=1, help="camera views per part")]
PartTimeout = Annotated[float, typer.Option("--part-timeout-s", min=0.1, help="wait for a part's views, then INCOMPLETE")]
DriftRef = Annotated[int, typer.Option("--drift-ref-points", min=2, help="reference windows per camera statistic")]
MinN = Annotated[int, typer.Option("--min-n", min=1, help="SPC: fewest inspections for a window to be a chart point")]
DriftMinN = Annotated[int, typer.Option("--drift-min-n", min=1, help="drift: fewest frames for a camera window to count")]


def _thresholds(values: list[str] | None) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for v in values or []:
        key, sep, rate = v.partition("=")
        line, _, cls = key.partition(":")
        try:
            r = float(rate)
        except ValueError:
            sep = ""
        if not sep or not line or not 0 < r <= 1:
            raise UserError(f"--threshold {v!r}: expected LINE[:CLASS]=RATE with 0 < RATE <= 1, e.g. line-1=0.05")
        out[(line, cls)] = r
    return out


def _build(names: list[str], *, window_s: int, grace_s: int, rules: str, side: str, warmup_points: int,
           per_class: bool, thresholds: list[str] | None, expected_views: int, part_timeout_s: float,
           drift_ref_points: int, settings: Any, min_n: int = 50, drift_min_n: int = 20,
           laney: bool = True) -> list[Any]:
    from infra.settings import ConfigError
    from stream_processors.app import load_baselines
    from stream_processors.processors import (
        DriftConfig,
        DriftProcessor,
        PartsProcessor,
        RatesProcessor,
        SpcConfig,
        SpcProcessor,
    )
    from stream_processors.spc import parse_rules

    if side not in ("upper", "lower", "both"):
        raise UserError(f"--side {side!r}: use upper, lower or both")
    try:
        parse_rules(rules)
    except ValueError as exc:
        raise UserError(f"--rules: {exc}") from None
    try:
        settings.dsn()
        has_db = True
    except ConfigError:  # no database: SPC warms up from the stream alone
        has_db = False
    check_endpoints(settings, postgres=has_db)  # options first, then one line within seconds
    out: list[Any] = []
    for n in names:
        if n == "rates":
            out.append(RatesProcessor(window_s=window_s, grace_s=grace_s))
        elif n == "spc":
            cfg = SpcConfig(window_s=window_s, grace_s=grace_s, rules=rules, side=side,  # type: ignore[arg-type]
                            warmup_points=warmup_points, min_n=min_n, laney=laney, per_class=per_class, thresholds=_thresholds(thresholds))
            has_db = True
            try:
                settings.dsn()
            except Exception:  # noqa: BLE001 - no database: warm-up only
                has_db = False
            out.append(SpcProcessor(cfg, baselines=load_baselines(settings),
                                    baseline_loader=(lambda: load_baselines(settings)) if has_db else None))
        elif n == "parts":
            out.append(PartsProcessor(expected_views=expected_views, timeout_s=part_timeout_s))
        elif n == "drift":
            out.append(DriftProcessor(DriftConfig(window_s=window_s, ref_points=drift_ref_points, min_n=drift_min_n)))
        else:
            raise UserError(f"unknown processor {n!r}: choose from rates, spc, parts, drift")
    return out


def _run(names: list[str], **kw: Any) -> None:
    from stream_processors.app import run_processors

    s = build_settings(state_dir=kw.pop("state_dir"), bootstrap=kw.pop("bootstrap"), topic_prefix=kw.pop("topic_prefix"),
                       metrics_port=kw.pop("metrics_port"))
    from infra.settings import ConfigError

    try:
        s.bootstrap()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    procs = _build(names, settings=s, **kw)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("stream processors starting", extra={"processors": names})
    from infra.metrics import lag_exporter
    from schemas.catalog import TopicCatalog

    # each processor consumes inspections in its own group, stream-<name> (stream_processors.app)
    lag = lag_exporter(s, {f"stream-{p.name}": [TopicCatalog(s.topic_prefix).inspections] for p in procs})
    try:
        runners = run_processors(s, procs, stop)
    finally:
        if lag is not None:
            lag.close()
    for r in runners:
        log.info("stream processor stopped", extra={"processor": r.processor.name, "published": r.published,
                                                    **r.processor.metrics()})


def _command(names: list[str] | None, doc: str) -> Any:
    def cmd(
        only: Annotated[str, typer.Option("--only", help="processors to host: rates,spc,parts,drift")] = ",".join(
            names or ["rates", "spc", "parts", "drift"]),
        window_s: WindowS = 60, grace_s: GraceS = 30, rules: Rules = "2/2>3", side: Side = "upper",
        warmup_points: Warmup = 60,
        per_class: Annotated[bool, typer.Option("--per-class", help="also chart each defect class")] = False,
        laney: Annotated[bool, typer.Option("--laney/--no-laney", help="Laney p' limits from the warm-up")] = True,
        threshold: Threshold = None, expected_views: ExpectedViews = 2, part_timeout_s: PartTimeout = 10.0,
        drift_ref_points: DriftRef = 60, min_n: MinN = 50, drift_min_n: DriftMinN = 20,
        metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="serve /metrics [env SQIS_METRICS_PORT]")] = None,
        state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
    ) -> None:
        chosen = [x.strip() for x in only.split(",") if x.strip()] if names is None else names
        _run(chosen, window_s=window_s, grace_s=grace_s, rules=rules, side=side, warmup_points=warmup_points,
             per_class=per_class, laney=laney, thresholds=threshold, expected_views=expected_views, part_timeout_s=part_timeout_s,
             drift_ref_points=drift_ref_points, min_n=min_n, drift_min_n=drift_min_n, metrics_port=metrics_port,
             state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)

    cmd.__doc__ = doc
    if names is not None:  # a single-processor command has no --only
        import inspect

        sig = inspect.signature(cmd, eval_str=True)  # typer must see the Annotated options, not their names
        cmd.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "only"])  # type: ignore[attr-defined]
    return cmd


stream_app.command("run")(_command(None, "Host several processors in one process (a thread and a consumer group each) until Ctrl-C."))
stream_app.command("rates")(_command(["rates"], "Defect rates per line/camera/class -> defect-rates."))
stream_app.command("spc")(_command(["spc"], "p-charts and rules per line -> alerts."))
stream_app.command("parts")(_command(["parts"], "One verdict per part over its camera views -> part-verdicts."))
stream_app.command("drift")(_command(["drift"], "Per-camera image-statistic drift -> alerts."))


def _when(v: str, flag: str) -> datetime:
    try:
        d = datetime.fromisoformat(v)
    except ValueError:
        raise UserError(f"{flag} {v!r}: expected an ISO date or time, e.g. 2026-11-30 or 2026-11-30T06:00") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


@spc_app.command("baseline")
def baseline(
    line: Annotated[str, typer.Option("--line", help="line id")],
    since: Annotated[str, typer.Option("--since", help="start of an in-control period (ISO, UTC)")],
    until: Annotated[str, typer.Option("--until", help="end of the period (ISO, UTC)")],
    class_name: Annotated[str, typer.Option("--class", help="a defect class ('' = any)")] = "",
    window_s: WindowS = 60,
    min_points: Annotated[int, typer.Option("--min-points", min=2, help="windows required")] = 20,
    laney: Annotated[bool, typer.Option("--laney/--no-laney", help="Laney p' overdispersion correction")] = True,
    state_dir: StateDir = None,
) -> None:
    """Compute a p-chart centre line from PostgreSQL and store it (the spc processor loads it at start)."""
    from infra.db import connect
    from infra.settings import ConfigError
    from stream_processors.baseline import BaselineError, compute_baseline

    s = build_settings(state_dir=state_dir)
    t0, t1 = _when(since, "--since"), _when(until, "--until")
    if t1 <= t0:
        raise UserError("--until must be after --since")
    try:
        dsn = s.dsn()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    with connect(dsn, autocommit=True) as conn:
        try:
            b, n = compute_baseline(conn, line, t0, t1, class_name=class_name, window_s=window_s,
                                    min_points=min_points, laney=laney)
        except BaselineError as exc:
            raise UserError(str(exc)) from None
    typer.echo(json.dumps({"line_id": line, "class_name": class_name, "p_bar": b.p_bar, "frames": b.frames,
                           "fails": b.fails, "sigma_z": b.sigma_z, "points": n, "window_s": window_s}))


def bench_alerts_cmd(
    weeks: Annotated[float, typer.Option("--weeks", min=0.01, max=52, help="simulated in-control weeks")] = 1.0,
    lines: Annotated[int, typer.Option("--lines", min=1, max=64)] = 4,
    cameras: Annotated[int, typer.Option("--cameras", min=1, max=64, help="cameras per line")] = 4,
    fps: Annotated[float, typer.Option("--fps", min=0.1, max=1000)] = 10.0,
    p: Annotated[float, typer.Option("--p", min=0.0001, max=0.5, help="in-control defect rate")] = 0.02,
    overdispersion: Annotated[float, typer.Option("--overdispersion", min=0.0, max=2.0, help="sd of the per-minute rate as a fraction of p (0 = binomial)")] = 0.0,
    laney: Annotated[bool, typer.Option("--laney/--no-laney", help="Laney p' limits in the warm-up")] = True,
    shifts: Annotated[int, typer.Option("--shifts", min=1, max=100, help="injected shifts of each kind")] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    rules: Rules = "2/2>3",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (the default output)")] = True,
) -> None:
    """False alerts per simulated week and detection delays, with the processors' rule code (no broker)."""
    from stream_processors.bench import Plant, bench_alerts
    from stream_processors.processors import SpcConfig
    from stream_processors.spc import parse_rules

    try:
        parse_rules(rules)
    except ValueError as exc:
        raise UserError(f"--rules: {exc}") from None
    r = bench_alerts(weeks, Plant(lines, cameras, fps, p, overdispersion), seed, SpcConfig(rules=rules, laney=laney),
                     shifts=shifts)
    typer.echo(json.dumps(r, indent=None if as_json else 2, default=str))


def bench_rates_cmd(
    n: Annotated[int, typer.Option("--n", min=1000, help="inspections for the throughput measurement")] = 200_000,
    sim_minutes: Annotated[int, typer.Option("--sim-minutes", min=1, help="simulated traffic for the RSS curve")] = 60,
    lines: Annotated[int, typer.Option("--lines", min=1, max=64)] = 4,
    cameras: Annotated[int, typer.Option("--cameras", min=1, max=64)] = 4,
    fps: Annotated[float, typer.Option("--fps", min=0.1, max=1000)] = 10.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    broker: Annotated[bool, typer.Option("--broker", help="instead: the rates app on the running Kafka (decode, window, publish)")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None,
) -> None:
    """Inspections/s through the rates processor and its RSS over simulated traffic (no broker), or
    with --broker the whole rates app on the local stack's Kafka."""
    from stream_processors.bench import Plant, bench_rates, bench_rates_broker

    if broker:
        from infra.settings import ConfigError

        s = build_settings(state_dir=state_dir, bootstrap=bootstrap)
        try:
            s.bootstrap()
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        typer.echo(json.dumps(bench_rates_broker(s, n, seed)))
        return
    typer.echo(json.dumps(bench_rates(n, Plant(lines, cameras, fps), seed, sim_minutes=sim_minutes)))


def register(app: typer.Typer) -> None:
    """Add `stream`, `spc` and the `bench alerts|rates` commands to the CLI root."""
    app.add_typer(stream_app, name="stream")
    app.add_typer(spc_app, name="spc")
    bench = next((g.typer_instance for g in app.registered_groups if g.name == "bench"), None)
    if bench is None:
        bench = typer.Typer(help="Benchmarks.", no_args_is_help=True)
        app.add_typer(bench, name="bench")
    bench.command("alerts")(bench_alerts_cmd)
    bench.command("rates")(bench_rates_cmd)
