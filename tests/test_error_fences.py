"""Issue #18: one exception root per package mapped to exit codes in sqis/cli.py only; strict production
settings (the local stack stands in only when asked); a FrameRef's declared size is checked. No servers."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from infra.errors import ConfigError, InfraError
from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "producers", "inference_workers", "sinks", "training", "stream_processors", "dashboard")


def test_every_project_exception_has_a_mapped_root() -> None:
    """Each exception class defined in a package derives from a root sqis/cli.py maps to an exit code
    (private control-flow signals such as worker._TxnHung excepted: they never leave their module)."""
    import importlib

    from sqis.cli import exit_codes

    roots = tuple(cls for cls, _ in exit_codes())
    loose = []
    for pkg in (*PACKAGES, "sqis"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text())
            names = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
            if not any(n.endswith(("Error", "Unavailable", "Denied", "Blocked", "Failed")) for n in names):
                continue
            mod = importlib.import_module(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
            for n in (n for n in names if not n.startswith("_")):
                cls = getattr(mod, n)
                if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, roots):
                    loose.append(f"{f.relative_to(ROOT)}:{n}")
    assert loose == []


def test_no_exit_below_the_app() -> None:
    """typer.Exit / sys.exit only in sqis/cli.py (and the standalone scripts' __main__: the remote trainer
    and the augmentation benchmark, both run as ``python -m``)."""
    bad = []
    for pkg in (*PACKAGES, "sqis"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.relative_to(ROOT).as_posix() in ("sqis/cli.py", "training/standalone_train.py", "training/bench_augment.py"):
                continue
            text = f.read_text()
            if "typer.Exit" in text or "sys.exit(" in text:
                bad.append(str(f.relative_to(ROOT)))
    assert bad == []


def test_exit_codes() -> None:
    from inference_workers.errors import InferenceError
    from infra.cli_common import UserError
    from infra.kafka import BrokerUnavailable
    from producers.base import InvalidSourceError, SourceUnavailable
    from sinks.postgres import RecordError, SinkError
    from sqis.cli import _exit_code
    from sqis.errors import CheckFailed, DemoError
    from training.errors import ParityBlocked, TrainingError

    assert [_exit_code(e("x")) for e in (UserError, ConfigError, InvalidSourceError, TrainingError)] == [2] * 4
    assert [_exit_code(e("x")) for e in (BrokerUnavailable, SourceUnavailable, SinkError, RecordError,
                                         InferenceError, ParityBlocked, DemoError)] == [1] * 7
    assert _exit_code(CheckFailed("x")) == 3
    assert issubclass(UserError, InfraError) and issubclass(BrokerUnavailable, InfraError)


def test_missing_endpoints_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SQIS_LOCAL", raising=False)
    (tmp_path / "stack.json").write_text(json.dumps({
        "kafka": {"bootstrap": "127.0.0.1:9"}, "postgres": {"dsn": "postgresql://u@127.0.0.1:5/d"},
        "object_store": {"url": "file:///somewhere"}}))
    strict = Settings(state_dir=tmp_path)
    for call, name in ((strict.bootstrap, "SQIS_KAFKA_BOOTSTRAP"), (strict.dsn, "SQIS_POSTGRES_DSN"),
                       (strict.store_url, "SQIS_OBJECT_STORE_URL")):
        with pytest.raises(ConfigError, match=name):
            call()
    assert "postgres_dsn" in strict.redacted()  # never resolved from the stack either
    local = Settings(state_dir=tmp_path, local=True)
    assert (local.bootstrap(), local.dsn(), local.store_url()) == (
        "127.0.0.1:9", "postgresql://u@127.0.0.1:5/d", "file:///somewhere")
    assert Settings(state_dir=tmp_path / "none", local=True).store_url().startswith("file://")
    monkeypatch.setenv("SQIS_LOCAL", "1")
    assert Settings(state_dir=tmp_path).bootstrap() == "127.0.0.1:9"


@pytest.mark.parametrize("dsn", ["notadsn", "host=h dbname"])
def test_unparseable_dsn_is_refused_when_settings_are_built(dsn: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a PostgreSQL DSN") as ei:
        Settings(postgres_dsn=dsn)
    assert "not a PostgreSQL DSN" in str(ei.value)
    assert Settings(postgres_dsn="postgresql://u:p@h:5432/d").dsn() == "postgresql://u:p@h:5432/d"


@pytest.mark.parametrize(("w", "h", "ok"), [(-320, -320, False), (320, -1, False), ("320", 320, False),
                                             (320, 240, True), (0, 0, True), (None, None, True)])
def test_frame_ref_size_is_checked_before_any_io(w: object, h: object, ok: bool) -> None:
    from inference_workers.fetch import InvalidFrameRef, validate_frame_ref

    ref = {"frame_id": "0c6a3c4e-4d0b-4a7e-9d2b-1f0f3f0b6a11", "uri": "file:///x.jpg", "width": w, "height": h}
    if ok:
        validate_frame_ref(ref)
    else:
        with pytest.raises(InvalidFrameRef, match="not a frame size"):
            validate_frame_ref(ref)


def test_sigterm_during_training_is_143(monkeypatch: pytest.MonkeyPatch) -> None:
    """typer turns a KeyboardInterrupt (TrainingStopped is one) into 130: the CLI raises RunKilled instead."""
    import typer

    import sqis.cli
    from training.errors import RunKilled

    app = typer.Typer()

    @app.command()
    def stop() -> None:
        raise RunKilled("the MLflow run is KILLED")

    @app.command()
    def ctrl_c() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sqis.cli, "app", app)
    assert sqis.cli.run(["stop"]) == 143
    assert sqis.cli.run(["ctrl-c"]) == 130
