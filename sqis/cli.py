"""`sqis`: the CLI root. Each package contributes its sub-app; this module registers them and is the one
place that maps each package's exception root to an exit code (:func:`exit_codes`: 2 the user's input was
refused, 1 the environment or the run failed, 3 a check found a difference), so no package below the app
raises typer.Exit or calls sys.exit."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, build_settings

app = typer.Typer(
    name="sqis",
    help="Smart Quality Inspection System: cameras -> Kafka -> inference -> verdicts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help strings are plain text: "[env SQIS_STATE_DIR]" hints must not be read as markup
)

LOCAL_COMMANDS = ("stack", "demo", "bench")  # the local stack stands in for missing endpoints under these


@app.callback()
def _root(
    ctx: typer.Context,
    local: Annotated[bool, typer.Option(
        "--local", help="let the local stack (stack.json, file:// under the state dir) stand in for missing "
        "Kafka, PostgreSQL and object-store URLs; on for stack, demo and bench [env SQIS_LOCAL]")] = False,
) -> None:
    if local or ctx.invoked_subcommand in LOCAL_COMMANDS:
        os.environ["SQIS_LOCAL"] = "1"  # read by every Settings built below, and inherited by children


topics_app = typer.Typer(help="Kafka topics from the catalog in schemas/.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
from sqis.schemas_cli import schemas_app  # noqa: E402 - the contract commands (#19)

app.add_typer(schemas_app, name="schemas")


@topics_app.command("create")
def topics_create(
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Create every topic of the catalog (name, partitions) that does not exist yet."""
    from infra.kafka import create_topics
    from schemas.catalog import TopicCatalog

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    cat = TopicCatalog(s.topic_prefix)
    created = create_topics(s, cat)
    for name, t in cat.all():
        mark = "created" if name in created else "exists"
        typer.echo(f"{name:<32} partitions={t.partitions:<3} key={t.key_field:<10} schema={t.schema:<12} {mark}")


@topics_app.command("verify")
def topics_verify(
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Check every catalog topic on the broker (exists, partitions, configs); exit 3 when one differs."""
    import json

    from infra.kafka import check_broker, verify_topics
    from sqis.errors import CheckFailed

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    check_broker(s)
    drift = verify_topics(s)
    if json_out:
        typer.echo(json.dumps([d.__dict__ for d in drift]))
    elif not drift:
        typer.echo("all catalog topics as declared (partitions, retention.ms, max.message.bytes, cleanup.policy)")
    for d in drift if not json_out else ():
        typer.echo(f"{d.topic:<32} {d.item:<20} expected={d.expected} actual={'missing' if d.actual is None else d.actual}")
    if drift:
        if not json_out:
            typer.echo("`sqis topics create` creates missing topics and sets drifted configs back", err=True)
        raise CheckFailed(f"{len(drift)} catalog topic setting(s) differ from the broker")


def _register() -> None:
    from inference_workers.cli import dlq_app, worker
    from inference_workers.dlq_cli import dlq_replay  # noqa: F401 (adds `dlq replay` to dlq_app)
    from infra.stack_cli import stack_app
    from producers.cli import produce
    from producers.edge_cli import edge
    from producers.spool_cli import spool_app
    from sinks.cli import sink_app
    from sinks.opcua_cli import opcua
    from sqis.bench.bomb import bench_image_bomb  # noqa: F401 (adds `bench image-bomb`)
    from sqis.bench.edge import bench_edge  # noqa: F401 (adds `bench edge`)
    from sqis.bench.opcua import bench_opcua  # noqa: F401 (adds `bench opcua`)
    from sqis.bench.pipeline import bench_app
    from sqis.bench.retrain import bench_retrain  # noqa: F401 (adds `bench retrain`)
    from sqis.bench.review import bench_review  # noqa: F401 (adds `bench review`)
    from sqis.demo import demo
    from sqis.reconcile_cli import reconcile
    from training.cli import calibrate_cmd, data_app, eval_cmd, model_app, train_cmd

    app.add_typer(stack_app, name="stack")
    app.command("produce")(produce)
    app.command("edge")(edge)
    from sqis.bridge_cli import bridge_app

    app.add_typer(bridge_app, name="bridge")
    app.add_typer(spool_app, name="spool")
    app.command("worker")(worker)
    app.add_typer(sink_app, name="sink")
    app.command("opcua")(opcua)
    app.command("reconcile")(reconcile)
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(bench_app, name="bench")
    app.add_typer(data_app, name="data")
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("calibrate")(calibrate_cmd)
    from training.retrain_cli import retrain_cmd

    app.command("retrain")(retrain_cmd)
    app.add_typer(model_app, name="model")
    from sqis.canary_cli import register as register_canary

    register_canary(model_app, bench_app)  # sqis model canary|shadow, sqis bench canary
    from dashboard.cli import register as register_dashboard
    from sqis.ops_cli import db_app, lag, metrics_app
    from stream_processors.cli import register as register_stream

    register_stream(app)  # sqis stream ..., sqis spc baseline, sqis bench alerts|rates

    register_dashboard(app, bench_app)

    from sqis.segment_cli import bench_segment, sam_app

    app.add_typer(sam_app, name="sam")
    bench_app.command("segment")(bench_segment)
    app.add_typer(db_app, name="db")
    app.add_typer(metrics_app, name="metrics")
    app.command("lag")(lag)
    app.command("demo")(demo)
    from api.cli import api_app; from sqis.bench.api import bench_api; app.add_typer(api_app, name="api")  # noqa: E702, F401, I001 (sqis api ..., sqis bench api: issue #20)


_register()


def exit_codes() -> list[tuple[type[BaseException], int]]:
    """Every package's exception root, and the refusals of input below it, with its exit code; the first
    match wins. 2: the input (command line, settings) was refused; 1: the environment or the run failed;
    3: a check ran and found a difference. No package below the app knows these numbers."""
    from confluent_kafka import KafkaException
    from psycopg import Error as DatabaseError

    from dashboard.queries import DashboardError
    from inference_workers.errors import InferenceError
    from infra.errors import ConfigError, InfraError
    from producers.base import InvalidSourceError, ProducerError
    from producers.spool import SpoolLocked
    from sinks.errors import SinkError
    from sqis.errors import AppError, CheckFailed, RolledBack
    from stream_processors.errors import StreamError
    from training.errors import ParityBlocked, RunKilled, TrainingError

    return [
        (ConfigError, 2), (InvalidSourceError, 2), (SpoolLocked, 2), (ParityBlocked, 1), (RunKilled, 143),
        (TrainingError, 2),
        (CheckFailed, 3), (RolledBack, 4),
        (InfraError, 1), (ProducerError, 1), (InferenceError, 1), (SinkError, 1), (StreamError, 1),
        (DashboardError, 1), (AppError, 1), (KafkaException, 1), (DatabaseError, 1),
    ]


def package_roots() -> tuple[type[BaseException], ...]:
    """The exception classes :func:`run` turns into one line and an exit code (evaluated on an error only)."""
    return tuple(cls for cls, _ in exit_codes())


def _exit_code(exc: BaseException) -> int:
    return next(code for cls, code in exit_codes() if isinstance(exc, cls))


def _usage_line(exc: Exception) -> tuple[str, int]:
    """One line for a click/typer usage or parameter error (either click: typer bundles its own)."""
    import click
    from typer._click import exceptions as tclick

    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    if isinstance(exc, tclick.NoArgsIsHelpError):
        return "", 2  # typer has printed the help already
    msg = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    return where + " ".join(msg.split()), 2 if isinstance(exc, (tclick.UsageError, click.UsageError)) else 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def run(argv: list[str] | None = None, command: Any = None) -> int:
    """Run the CLI (or ``command``, a click command built from it) and return the exit code.

    Every usage or validation error, from either click (typer bundles its own), becomes one line on
    stderr and exit code 2; every package's errors one line and the code of :func:`exit_codes`; no
    tracebacks.
    """
    import click
    from typer.exceptions import TyperException

    saved_local = os.environ.get("SQIS_LOCAL")
    try:
        if command is None:
            rc = app(args=argv, prog_name="sqis", standalone_mode=False)
        else:
            rc = command.main(args=argv, prog_name="sqis", standalone_mode=False)
        return rc if isinstance(rc, int) else 0  # typer.Exit(n) is returned, not raised, here
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors())
        typer.secho(f"error: invalid input: {errs}", err=True, fg="red")
        return 2
    except (typer.Exit, click.exceptions.Exit) as exc:
        return exc.exit_code
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        return 130
    except (click.ClickException, TyperException) as exc:
        line, code = _usage_line(exc)
        if line:
            typer.secho(f"error: {line}", err=True, fg="red")
        return code
    except package_roots() as exc:  # evaluated only once an exception is raised
        code = _exit_code(exc)
        # a refusal or a check names what to change; a failure also says what failed
        line = f"{type(exc).__name__}: {_one_line(exc)}" if code == 1 else _one_line(exc)
        typer.secho(f"error: {line}", err=True, fg="red")
        return code
    finally:  # in-process callers (tests) get their environment back
        if saved_local is None:
            os.environ.pop("SQIS_LOCAL", None)
        else:
            os.environ["SQIS_LOCAL"] = saved_local


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
