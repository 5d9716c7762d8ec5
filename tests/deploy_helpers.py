"""Helpers of the deployment tests: compose interpolation, the sqis services of a compose file,
resolving a command line with the real CLI (click's own parser), and the metric names the code exports."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"

_VAR = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class CliUsageError(ValueError):
    """A command line the CLI would refuse."""


class MissingVariable(ValueError):
    """A required ``${VAR:?message}`` is unset, as `docker compose` would report it."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""

    def sub(m: re.Match[str]) -> str:
        if m.group("esc"):
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        val = env.get(name)
        empty = val is None or (op is not None and op.startswith(":") and val == "")
        if op in (":-", "-"):
            return arg if empty else str(val)
        if op in (":?", "?"):
            if empty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return str(val)
        if op in (":+", "+"):
            return "" if empty else arg
        return "" if val is None else val

    return _VAR.sub(sub, text)


def env_example(**overrides: str) -> dict[str, str]:
    """The variables of .env.example with each empty secret given a dummy value."""
    out: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        out[k.strip()] = v.strip() or f"dummy-{k.strip().lower()}-secret"
    out.update(overrides)
    return out


def load_compose(path: Path = COMPOSE, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose sees it: variables interpolated (when ``env`` is given), merge keys applied."""
    doc = yaml.safe_load(path.read_text())
    return doc if env is None else interpolate_doc(doc, env)


def interpolate_doc(obj: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed compose document (comments are never interpolated)."""
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [interpolate_doc(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: interpolate_doc(v, env) for k, v in obj.items()}
    return obj


def string_values(obj: Any) -> list[str]:
    """Every string value of a parsed document."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, list):
        return [s for x in obj for s in string_values(x)]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in string_values(v)]
    return []


def sqis_services(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the sqis entry point (the project's image, no other entrypoint)."""
    out = {}
    for name, svc in doc["services"].items():
        image = str(svc.get("image", ""))
        if "sqis" in image and "entrypoint" not in svc:
            out[name] = svc
    return out


def resolve_cli(args: list[str]) -> list[str]:
    """Parse ``sqis ARGS`` with the real typer app, as far as the leaf command's options; returns the
    command path. Raises click.UsageError (unknown command / option, bad value) like the CLI would."""
    import typer

    app = cli_app()
    cmd: Any = typer.main.get_command(app)  # typer >= 0.2x vendors click: duck-type the group
    ctx = cmd.make_context("sqis", list(args), resilient_parsing=False)
    path: list[str] = []
    while hasattr(cmd, "resolve_command"):
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if not rest:
            if getattr(cmd, "invoke_without_command", False):  # a group that runs by itself (sqis dashboard)
                break
            raise CliUsageError(f"{' '.join(['sqis', *path])}: a subcommand is required")
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub
    return path


def cli_app() -> Any:
    """The typer app of `sqis`."""
    from sqis.cli import app

    return app


def sqis_cmd() -> list[str]:
    """argv prefix that runs the `sqis` CLI of this checkout in a child process."""
    import sys

    return [sys.executable, "-m", "sqis"]


def exported_metric_names() -> set[str]:
    """Every metric family name (and sample name) the project's processes can export.

    Importing the modules registers their module-level metrics; the collectors registered at run
    time (producers, lag exporter) are instantiated here the way the processes do it.
    """
    from prometheus_client import REGISTRY, CollectorRegistry

    import inference_workers.worker  # noqa: F401  (registers the worker metrics)
    import infra.metrics as m
    import sinks.postgres  # noqa: F401
    from inference_workers.worker import WorkerMetrics

    reg = CollectorRegistry()
    WorkerMetrics(reg)  # each worker has its own registry
    reg.register(m.ProducerCollector("synthetic"))
    reg.register(_FixedLag())
    families = list(REGISTRY.collect()) + list(reg.collect())
    names: set[str] = set()
    for fam in families:
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        # families without samples yet (labelled, never observed) still expose their sample names
        names.update(_declared_suffixes(fam))
    return names


def _declared_suffixes(fam: Any) -> set[str]:
    name = fam.name
    if fam.type == "counter":
        return {f"{name}_total"}
    if fam.type == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if fam.type == "info":
        return {f"{name}_info"}
    return set()


class _FixedLag:
    """The lag exporter's families with one sample (no broker needed to know the names)."""

    def collect(self) -> Any:
        from infra.metrics import LagCollector, PartitionLag

        return LagCollector._families([PartitionLag("g", "t", 0, 1, 2, 1)])


def clean_env() -> dict[str, str]:
    """os.environ without SQIS_* (a developer's settings must not leak into a settings check)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}
