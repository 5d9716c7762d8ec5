"""`sqis stack up|down|status`: the embedded local stack (Apache Kafka, PostgreSQL, file:// object store)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from infra.cli_common import StateDir, UserError, build_settings

stack_app = typer.Typer(
    help="The embedded local stack: Apache Kafka (one KRaft node), PostgreSQL and a file:// object store on 127.0.0.1.",
    no_args_is_help=True,
)


def _stack(state_dir: Any) -> Any:
    from infra.stack import LocalStack

    s = build_settings(state_dir=state_dir)
    return LocalStack(s.state_dir)


def _table(status: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sqis local stack")
    for col in ("part", "state", "endpoint", "pid", "details"):
        t.add_column(col)
    k, p, o = status["kafka"], status["postgres"], status["object_store"]
    details = ""
    if k.get("version"):
        mode = "TLS+SCRAM+ACLs" if k.get("secure") else "plaintext"
        details = (f"Apache Kafka {k['version']}, {mode}, heap {k.get('heap', '?')}, "
                   f"data {k.get('data_bytes', 0) / 1e6:.1f} MB, log {k.get('log', '')}")
    t.add_row("kafka", _state(k["up"]), k.get("bootstrap", "-"), str(k.get("pid") or "-"), details)
    t.add_row("postgres", _state(p["up"]), p.get("dsn", "-"), str(p.get("pid") or "-"), p.get("datadir", ""))
    r = status.get("registry") or {"up": False}
    if r.get("url") or r["up"]:
        t.add_row("registry", _state(r["up"]), r.get("url", "-"), str(r.get("pid") or "-"),
                  f"{r.get('version', '')}, heap {r.get('heap', '?')}, storage {r.get('storage', '')}, log {r.get('log', '')}")
    t.add_row("object store", _state(o["up"]), o.get("url", "-"), "-", "")
    if "mqtt" in status:
        m = status["mqtt"]
        t.add_row("mqtt", _state(m["up"]), m.get("url", "-"), str(m.get("pid") or "-"),
                  f"mosquitto {m.get('version', '?')}, persistence on, log {m.get('log', '')}")
    Console().print(t)


def _state(up: bool) -> str:
    return "[green]up[/green]" if up else "[red]down[/red]"


@stack_app.command("up")
def up(
    state_dir: StateDir = None,
    no_postgres: Annotated[bool, typer.Option("--no-postgres", help="do not start PostgreSQL")] = False,
    no_kafka: Annotated[bool, typer.Option("--no-kafka", help="do not start the Kafka broker")] = False,
    no_mqtt: Annotated[bool, typer.Option("--no-mqtt", help="do not start mosquitto (MQTT)")] = False,
    secure: Annotated[bool | None, typer.Option(
        "--secure/--plaintext",
        help="Kafka with TLS, SASL/SCRAM-SHA-512 users per role and ACLs (default: the mode it had)")] = None,
) -> None:
    """Start the local stack (idempotent), create the catalog topics, migrate the database."""
    from infra.kafka_broker import BrokerSetupError
    from infra.registry_server import RegistryRefused, RegistrySetupError
    from infra.stack import StackError

    stack = _stack(state_dir)
    try:
        stack.up(kafka=not no_kafka, postgres=not no_postgres, secure=secure, mqtt=False if no_mqtt else None)
    except (StackError, BrokerSetupError, RegistrySetupError, RegistryRefused) as exc:
        raise UserError(str(exc)) from exc
    st = stack.status()
    _table(st)
    typer.echo(f"state: {stack.stack_file}")
    if st["kafka"].get("secure"):
        from infra.kafka_security import ROLES

        typer.echo(f"kafka principals: {', '.join(ROLES)}; a shell takes one with "
                   '`eval "$(sqis stack env --role ROLE)"`')


@stack_app.command("env")
def env(
    state_dir: StateDir = None,
    role: Annotated[str, typer.Option("--role", help="Kafka principal: admin, producer, worker, sink, stream, mes")]
    = "admin",
) -> None:
    """Print the SQIS_KAFKA_* lines for one role of a secure stack: `eval "$(sqis stack env --role worker)"`."""
    from infra import kafka_security as ks

    stack = _stack(state_dir)
    k = stack.info.get("kafka")
    if not k:
        raise UserError(f"no local Kafka in {stack.state_dir}: start it with `sqis stack up --secure`")
    if not k.get("secure"):
        raise UserError("the local Kafka runs in plaintext mode (no principals): `sqis stack up --secure`")
    try:
        lines = ks.env_lines(k, role)
    except ks.SecurityError as exc:
        raise UserError(str(exc)) from None
    for line in lines:
        typer.echo(f"export {line}")


@stack_app.command("down")
def down(
    state_dir: StateDir = None,
    purge: Annotated[bool, typer.Option("--purge", help="also delete the database and objects")] = False,
) -> None:
    """Stop every part of the local stack (SIGTERM, then SIGKILL) and remove stack.json."""
    from infra.stack import StackError

    stack = _stack(state_dir)
    try:
        stack.down(purge=purge)
    except StackError as exc:
        raise UserError(str(exc)) from exc
    typer.echo("stack down")


@stack_app.command("status")
def status(state_dir: StateDir = None) -> None:
    """Show each part up/down with pids and endpoints; exit code 1 if a started part is down."""
    from infra.stack import StackError

    stack = _stack(state_dir)
    st = stack.status()
    _table(st)
    info = stack.info
    started = [part for part in ("kafka", "postgres", "registry", "mqtt") if part in info]
    if not started:
        raise StackError(f"the local stack in {stack.state_dir} is not running: `sqis stack up`")
    down = [part for part in started if not st[part]["up"]]
    if down:
        raise StackError(f"started but down: {', '.join(down)}; `sqis stack up` starts them again")
