"""`sqis`: one CLI whose subcommands map to the packages of the project."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings
from infra.settings import ConfigError

app = typer.Typer(
    name="sqis",
    help="Smart Quality Inspection System: cameras -> Kafka -> inference -> verdicts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

topics_app = typer.Typer(help="Kafka topics from the catalog in schemas/.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


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


def _register() -> None:
    from inference_workers.cli import bench_app, dlq_app, worker
    from infra.stack_cli import stack_app
    from producers.cli import produce
    from sinks.cli import sink_app
    from training.cli import data_app, eval_cmd, model_app, train_cmd

    app.add_typer(stack_app, name="stack")
    app.command("produce")(produce)
    app.command("worker")(worker)
    app.add_typer(sink_app, name="sink")
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(bench_app, name="bench")
    app.add_typer(data_app, name="data")
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.add_typer(model_app, name="model")
    from stream_processors.cli import register as register_stream

    register_stream(app)  # sqis stream ..., sqis spc baseline, sqis bench alerts|rates (#9)

    from infra.demo import demo

    app.command("demo")(demo)


_register()


def operational_errors() -> tuple[type[BaseException], ...]:
    """Failures of the environment (broker or database down) shown as one line, exit 1, no traceback."""
    from infra.kafka import KafkaException
    from sinks.postgres import SinkError

    return (KafkaException, SinkError)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer.Exit(n) is returned, not raised, without standalone mode
            sys.exit(rc)
    except (UserError, ConfigError) as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(2)
    except ValidationError as exc:
        typer.secho(f"error: invalid input: {exc}", err=True, fg="red")
        sys.exit(2)
    except operational_errors() as exc:  # evaluated only once an exception is raised
        typer.secho(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", err=True, fg="red")
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
