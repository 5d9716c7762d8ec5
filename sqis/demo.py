"""`sqis demo`: the whole line on one machine, with live counts.

Local stack (Apache Kafka + PostgreSQL + file:// object store) -> synthetic cameras (in this process) ->
``sqis worker`` subprocesses -> ``sqis sink postgres`` subprocess -> PostgreSQL. The counts shown
are read back from PostgreSQL (inspections, verdicts, latency) and from the DLQ topic, so they show
what the pipeline really did. Children log to ``<state_dir>/logs/<name>.log``; every child is
stopped on the way out, whatever happened (and gets SIGTERM from the kernel if the demo is killed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from inference_workers.model_loader import DEMO_MODEL, demo_model_path
from infra.cli_common import UserError, build_settings
from infra.settings import Settings
from sqis.errors import DemoError

log = logging.getLogger(__name__)

TRAIN_HINT = ("the demo model is committed as models/demo/model.onnx; to rebuild it: `sqis data synth "
              ".sqis/datasets/synthetic --images 1000 --seed 7 --size 320 && sqis train --data "
              ".sqis/datasets/synthetic --model yolov8n --imgsz 256 --epochs 30 --name demo-synthetic`, then "
              "`sqis demo --model models:/demo-synthetic/latest`")
LATENCY_WINDOW_S = 30
READY_TIMEOUT_S = 180.0
CATCH_UP_TIMEOUT_S = 90.0
CATCH_UP_STALL_S = 20.0
STOP_TIMEOUT_S = 30.0


# ---- options and model -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    state_dir: Path
    cameras: int = 4
    lines: int = 2
    workers: int = 2
    fps: float = 2.0
    duration: float = 0.0
    frames: int = 0
    defect_rate: float = 0.3
    model: str | None = None
    keep_stack: bool = False
    edge: bool = False  # one more camera through `sqis edge` and MQTT (#20)


@dataclass(frozen=True)
class DemoModel:
    """What the workers are told to load (``uri``) and how to show it."""

    uri: str
    label: str


def resolve_demo_model(settings: Settings, model: str | None) -> DemoModel:
    """--model, else SQIS_MODEL_URI, else the committed demo model (next to the package); UserError if absent."""
    uri = model or settings.model_uri
    if uri and uri.startswith("models:/"):
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no mlflow INFO lines on the terminal
        from inference_workers.detector import DetectorError
        from inference_workers.model_loader import resolve_model

        try:
            r = resolve_model(settings, uri)
        except DetectorError as exc:
            raise UserError(f"{exc}; {TRAIN_HINT}") from None
        return DemoModel(uri=uri, label=f"{r.name} v{r.version} ({uri})")
    if uri:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise UserError(f"no model file at {path}: pass --model PATH.onnx or models:/NAME@alias, or {TRAIN_HINT}")
    else:
        found = demo_model_path()
        if found is None:
            raise UserError(f"no demo model at {DEMO_MODEL}: pass --model PATH.onnx or models:/NAME@alias, "
                            f"or {TRAIN_HINT}")
        path = found
    return DemoModel(uri=str(path.resolve()), label=str(path))


# ---- child processes ---------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the demo dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec


class Child:
    """One long-running ``sqis`` subprocess whose output goes to ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "sqis", *args]
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_exit = False
        self.reported = False
        self._log_start = 0  # where this run's output starts in the (appended) log file

    def start(self) -> None:
        with open(self.log_path, "ab") as logf:
            logf.write(f"---- {datetime.now(UTC).isoformat()} {' '.join(self.cmd)}\n".encode())
            logf.flush()
            self._log_start = logf.tell()
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent())
        log.info("child started", extra={"child": self.name, "pid": self.proc.pid, "log": str(self.log_path)})

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def died(self) -> bool:
        """Exited without being asked to."""
        return self.proc is not None and not self.expected_exit and self.proc.poll() is not None

    def log_text(self) -> str:
        """This run's output."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        """The consumer joined its group (the worker and the sink both log this)."""
        return "partitions assigned" in self.log_text()

    def tail(self, n: int = 8) -> list[str]:
        return self.log_text().rstrip().splitlines()[-n:]

    def terminate(self) -> None:
        self.expected_exit = True
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s, then SIGKILL."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            log.warning("child did not stop on SIGTERM, killing", extra={"child": self.name, "pid": self.proc.pid})
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def stop_children(children: list[Child], timeout: float) -> None:
    """SIGTERM all of ``children`` at once, wait for them together, SIGKILL the stragglers."""
    for c in children:
        c.terminate()
    deadline = time.monotonic() + timeout
    for c in children:
        c.wait(deadline - time.monotonic())


def child_env(settings: Settings, workers: int) -> dict[str, str]:
    """Environment of the children: these settings, and ONNX threads that share the cores."""
    from sqis.bench.harness import settings_env

    env = os.environ | settings_env(settings)
    env.pop("SQIS_METRICS_PORT", None)
    if not settings.onnx_threads:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        env["SQIS_ONNX_THREADS"] = str(threads)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


# ---- counting --------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What PostgreSQL and the DLQ say about this run."""

    inspected: int = 0
    failed: int = 0
    per_line: dict[str, tuple[int, int]] = field(default_factory=dict)  # line -> (inspected, FAIL)
    p50_ms: float | None = None
    p95_ms: float | None = None
    model: str | None = None
    dlq: int = 0
    db_error: str | None = None


class DlqCounter:
    """Counts dead letters of this run (failed_at >= start) in a thread.

    Each partition is read from the first record written at or after the run's start (the broker's
    time index, ``offsets_for_times``), not from the beginning: older dead letters are never fetched.
    """

    def __init__(self, settings: Settings, since_us: int) -> None:
        self.settings = settings
        self.since_us = since_us
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-dlq", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from infra.kafka import TopicPartition, admin_client
        from infra.kafka import consumer as make_consumer
        from schemas.catalog import TopicCatalog
        from schemas.serde import deserialize

        try:
            topic = TopicCatalog(self.settings.topic_prefix).frames_dlq
            md = admin_client(self.settings).list_topics(topic, timeout=10).topics.get(topic)
            if md is None or md.error is not None:
                return
            c = make_consumer(self.settings, group_id=f"sqis-demo-dlq-{uuid.uuid4().hex[:8]}",
                              client_id="sqis-demo-dlq",
                              **{"enable.auto.commit": False, "isolation.level": "read_committed"})
        except Exception as exc:
            log.warning("DLQ counter not started", extra={"error": str(exc)})
            return
        try:
            since_ms = self.since_us // 1000
            try:
                starts = c.offsets_for_times([TopicPartition(topic, p, since_ms) for p in md.partitions], timeout=10)
                # no record at/after the start yet: from the end (-1: OFFSET_END)
                c.assign([TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else -1) for tp in starts])
            except Exception as exc:  # the time index not answering: read it all (failed_at still filters)
                log.warning("DLQ counter reads from the beginning", extra={"error": str(exc)})
                c.assign([TopicPartition(topic, p, -2) for p in md.partitions])  # -2: OFFSET_BEGINNING
            while not self._stop.is_set():
                msg = c.poll(0.5)
                if msg is None or msg.error():
                    continue
                try:
                    failed_at = int(deserialize("frame_dlq", msg.value(), msg.headers())["failed_at"] or 0)
                except Exception:
                    failed_at = self.since_us  # unreadable record written now: count it
                if failed_at >= self.since_us:
                    self.count += 1
        finally:
            c.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Counter:
    """Reads this run's inspections (captured_at >= start) from PostgreSQL."""

    def __init__(self, dsn: str, since: datetime) -> None:
        self.dsn = dsn
        self.since = since
        self._conn: Any = None

    def _connection(self) -> Any:
        from infra.db import connect

        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=True, connect_timeout=3)
        return self._conn

    def snapshot(self, window_s: float | None = LATENCY_WINDOW_S) -> Snapshot:
        """Counts since the start; latency over the last ``window_s`` s (None: the whole run)."""
        snap = Snapshot()
        try:
            conn = self._connection()
            for line_id, n, n_fail in conn.execute(
                    "SELECT line_id, count(*), count(*) FILTER (WHERE verdict = 'FAIL') FROM inspections "
                    "WHERE captured_at >= %s GROUP BY line_id ORDER BY line_id", (self.since,)):
                snap.per_line[line_id] = (int(n), int(n_fail))
            snap.inspected = sum(n for n, _ in snap.per_line.values())
            snap.failed = sum(f for _, f in snap.per_line.values())
            window = "" if window_s is None else f"AND inspected_at >= now() - interval '{int(window_s)} seconds'"
            row = conn.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) "
                "FROM (SELECT extract(epoch FROM inspected_at - captured_at) * 1000 AS ms FROM inspections "
                f"WHERE captured_at >= %s {window}) t", (self.since,)).fetchone()
            if row is not None and row[0] is not None:
                snap.p50_ms, snap.p95_ms = float(row[0]), float(row[1])
            row = conn.execute("SELECT model_name, model_version FROM inspections WHERE captured_at >= %s "
                               "ORDER BY inspected_at DESC LIMIT 1", (self.since,)).fetchone()
            if row is not None:
                snap.model = f"{row[0]} v{row[1]}"
        except Exception as exc:  # the database restarting must not end the demo
            snap.db_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            with contextlib.suppress(Exception):
                if self._conn is not None:
                    self._conn.close()
            self._conn = None
        return snap

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()


# ---- the producer in a thread ------------------------------------------------------------------------


class ProducerThread:
    """run_producer (synthetic cameras) in a thread, stopped through its stop_event."""

    def __init__(self, settings: Settings, opts: DemoOptions) -> None:
        self.settings = settings
        self.opts = opts
        self.stop_event = threading.Event()
        self.counts: dict[str, int] = {}
        self.stats: dict[str, int] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from producers.run import run_producer
        from sqis.demo_stream import scenario  # the stream processors' demo scenario (#9)

        o = self.opts
        try:
            stats = run_producer(self.settings, "synthetic", cameras=o.cameras, lines=o.lines, fps=o.fps,
                                 frames=o.frames, defect_rate=o.defect_rate, stop_event=self.stop_event,
                                 progress=self._on_progress, install_signal_handlers=False,
                                 scenario=scenario(o.lines, o.cameras))
            self.stats = stats.snapshot()
        except BaseException as exc:
            self.error = exc
            log.exception("producer failed")

    def _on_progress(self, counts: dict[str, int]) -> None:
        self.counts = counts

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def produced(self) -> int:
        c = self.stats or self.counts
        return int(c.get("produced", 0))

    @property
    def replayed(self) -> int:
        c = self.stats or self.counts
        return int(c.get("replayed", 0))

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout)


# ---- rendering -------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "-"


def status_lines(elapsed: float, produced: int, snap: Snapshot, model: str, workers_alive: int, workers: int,
                 sink_alive: bool) -> list[str]:
    lines_ = "  ".join(f"{ln} {_pct(f, n)} of {n}" for ln, (n, f) in snap.per_line.items()) or "-"
    out = [
        f"[{elapsed:5.0f}s] produced {produced}  inspected {snap.inspected}  "
        f"FAIL {snap.failed} ({_pct(snap.failed, snap.inspected)})  DLQ {snap.dlq}",
        f"         defect rate per line: {lines_}",
        f"         latency p50 {_ms(snap.p50_ms)}  p95 {_ms(snap.p95_ms)} (last {LATENCY_WINDOW_S} s)",
        f"         model {snap.model or model}  workers {workers_alive}/{workers}  sink {'up' if sink_alive else 'DOWN'}",
    ]
    if snap.db_error:
        out.append(f"         PostgreSQL not answering: {snap.db_error}")
    return out


# ---- the run -----------------------------------------------------------------------------------------


class _Signals:
    """SIGINT/SIGTERM set ``stop``; a second one sets ``hurry`` (skip the catch-up wait)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()
        log.info("signal received", extra={"signal": signal.Signals(signum).name})

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _log_to_file(path: Path, fmt: str, level: str) -> None:
    """The demo's own logs go to a file: the terminal shows the live counts only."""
    from infra.logs import ConsoleFormatter, JsonFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Demo:
    """One run of the demo; :meth:`run` returns the exit code and always cleans up."""

    def __init__(self, opts: DemoOptions, console: Any) -> None:
        self.opts = opts
        self.console = console
        self.signals = _Signals()
        self.children: list[Child] = []
        self.workers: list[Child] = []
        self.sink: Child | None = None
        self.producer: ProducerThread | None = None
        self.dlq: DlqCounter | None = None
        self.counter: Counter | None = None
        self.stack: Any = None
        self.started_stack = False
        self.failed = False

    # -- output --
    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, highlight=False)

    def _report_dead(self) -> None:
        for c in self.children:
            if c.died and not c.reported:
                c.reported = True
                self.failed = True
                self.say(f"!!! {c.name} DIED (exit code {c.returncode}); log: {c.log_path}", style="bold red")
                for line in c.tail():
                    self.say(f"    | {line}", style="red")

    # -- steps --
    def run(self) -> int:
        o = self.opts
        base = build_settings(state_dir=o.state_dir)
        model = resolve_demo_model(base, o.model)  # before anything starts: a missing model is exit 2
        from infra.stack import LocalStack

        self.stack = LocalStack(base.state_dir, topic_prefix=base.topic_prefix)
        logs_dir = self.stack.logs_dir
        _log_to_file(logs_dir / "demo.log", base.log_format, base.log_level)
        self.signals.install()
        try:
            return self._run(base, model, logs_dir)
        finally:
            self._cleanup()
            self.signals.restore()

    def _run(self, base: Settings, model: DemoModel, logs_dir: Path) -> int:
        from infra.db import migrate
        from infra.kafka import create_topics
        from infra.stack import StackError
        from schemas.catalog import TopicCatalog

        o = self.opts
        already_up = self.stack.is_up()
        self.started_stack = not already_up
        self.say(f"stack: {'reusing the running' if already_up else 'starting the'} local stack in {self.stack.state_dir}")
        try:
            info = self.stack.up()
        except StackError as exc:
            raise DemoError(f"the local stack did not start: {exc}") from exc
        settings = build_settings(state_dir=self.stack.state_dir, bootstrap=info["kafka"]["bootstrap"],
                                  postgres_dsn=info["postgres"]["dsn"],
                                  object_store_url=base.object_store_url or info["object_store"]["url"])
        _log_to_file(logs_dir / "demo.log", base.log_format, base.log_level)  # build_settings reset it
        migrate(settings.dsn())
        create_topics(settings, TopicCatalog(settings.topic_prefix))
        self.say(f"       kafka {settings.bootstrap()}  postgres 127.0.0.1:{info['postgres']['port']}  "
                 f"objects {settings.store_url()}")
        if self.signals.stop.is_set():
            return 0

        env = child_env(settings, o.workers)
        sd = str(self.stack.state_dir)
        self.sink = Child("sink-postgres", ["sink", "postgres", "--state-dir", sd], env, logs_dir)
        for i in range(1, o.workers + 1):
            wid = f"demo-worker-{i}"
            self.workers.append(Child(wid, ["worker", "--state-dir", sd, "--model", model.uri, "--worker-id", wid,
                                            "--fetch-threads", "2"], env, logs_dir))
        from sqis import demo_stream as demo_hook  # stream processors + their sink (#9)
        from sqis import edge_demo  # one camera through the edge gateway and MQTT (#20)

        edge = o.edge and edge_demo.available(info)
        if o.edge and not edge:
            self.say("--edge: no mosquitto in the stack or no paho-mqtt (`make sysdeps`, pip install 'sqis[edge]'); "
                     "running without the edge camera", style="yellow")
        for c in [self.sink, *self.workers, *demo_hook.children(sd, env, logs_dir, Child),
                  *([edge_demo.bridge(sd, env, logs_dir, Child, info)] if edge else [])]:
            self.children.append(c)
            c.start()
        self.say(demo_hook.intro())
        self.say(f"model: {model.label}")
        self.say(f"started {o.workers} worker(s) and the PostgreSQL sink; logs in {logs_dir}/")
        if not self._wait_ready():
            if not self.failed:
                self.say("interrupted before the cameras started")
            return 1 if self.failed else 0

        self._start_dashboard(env, sd, logs_dir)
        since = datetime.now(UTC)
        since_us = int(since.timestamp() * 1_000_000)
        self.counter = Counter(settings.dsn(), since)
        self.dlq = DlqCounter(settings, since_us)
        self.dlq.start()
        self.producer = ProducerThread(settings, o)
        self.producer.start()
        if edge:
            gw = edge_demo.gateway(sd, env, logs_dir, Child, info, fps=o.fps, frames=o.frames)
            self.children.append(gw)
            gw.start()
            self.say(edge_demo.intro())
        limits = [f"for {o.duration:g} s" if o.duration else "", f"{o.frames} frames per camera" if o.frames else ""]
        until = " / ".join(x for x in limits if x) or "until Ctrl-C"
        self.say(f"running: {o.cameras} camera(s) on {o.lines} line(s) at {o.fps:g} fps each, {until}")
        self._live(model)
        return self._finish(settings, model)

    def _start_dashboard(self, env: dict[str, str], sd: str, logs_dir: Path) -> None:
        """The live dashboard (#10) as one more child; its address is printed."""
        import socket

        from dashboard.settings import DashboardSettings
        from infra.stack import free_port

        ds = DashboardSettings()
        port = ds.port
        with socket.socket() as sock:
            if sock.connect_ex((ds.host, port)) == 0:  # taken (another dashboard?): use a free port
                port = free_port()
        from sqis.demo_stream import STREAM_ARGS

        window_s = STREAM_ARGS[STREAM_ARGS.index("--window-s") + 1]  # the pages read the demo's windows
        dash = Child("dashboard", ["dashboard", "--state-dir", sd, "--port", str(port)],
                     env | {"SQIS_DASHBOARD_RATE_WINDOW_S": window_s}, logs_dir)
        self.children.append(dash)
        dash.start()
        self.say(f"dashboard: http://{ds.host}:{port}/  (log {dash.log_path})", style="bold")

    def _wait_ready(self) -> bool:
        """Until the workers and the sink joined their groups; False if stopped or a child died."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        text = "waiting for the workers and the sink to join their consumer groups ..."
        if not self.console.is_terminal:
            self.say(text)
        with self.console.status(text):
            while not self.signals.stop.is_set():
                self._report_dead()
                if self.failed:
                    self.say("a child died during start-up; stopping", style="bold red")
                    return False
                if all(c.ready() for c in self.children):
                    return True
                if time.monotonic() > deadline:
                    self.say(f"not every consumer joined within {READY_TIMEOUT_S:.0f} s; starting the cameras anyway",
                             style="yellow")
                    return True
                self.signals.stop.wait(0.2)
        return False

    def _snapshot(self, window_s: float | None = LATENCY_WINDOW_S) -> Snapshot:
        assert self.counter is not None
        snap = self.counter.snapshot(window_s)
        snap.dlq = self.dlq.count if self.dlq else 0
        return snap

    def _lines(self, t0: float, model: DemoModel) -> list[str]:
        assert self.producer is not None
        return status_lines(time.monotonic() - t0, self.producer.produced, self._snapshot(), model.label,
                            sum(w.alive for w in self.workers), len(self.workers),
                            self.sink is not None and self.sink.alive)

    def _live(self, model: DemoModel) -> None:
        """The live counts until Ctrl-C/SIGTERM, --duration, the producer's end or its failure."""
        from rich.live import Live
        from rich.text import Text

        assert self.producer is not None
        o = self.opts
        t0 = time.monotonic()
        tty = self.console.is_terminal
        period = 1.0 if tty else 2.0
        live: Any = Live(Text(""), console=self.console, refresh_per_second=4, transient=False) if tty else None
        next_at = t0 + period
        with live if live is not None else contextlib.nullcontext():
            while not self.signals.stop.is_set():
                self._report_dead()
                if o.duration and time.monotonic() - t0 >= o.duration:
                    break
                if not self.producer.running:
                    break
                now = time.monotonic()
                if now >= next_at:
                    next_at = now + period
                    text = "\n".join(self._lines(t0, model))
                    if live is not None:
                        live.update(Text(text, overflow="fold"))
                    else:
                        self.say(text)
                self.signals.stop.wait(0.2)
            if live is not None:
                live.update(Text("\n".join(self._lines(t0, model)), overflow="fold"))

    def _finish(self, settings: Settings, model: DemoModel) -> int:
        """Stop the cameras, let the inspections catch up, stop the children, print the summary."""
        assert self.producer is not None and self.counter is not None
        if self.signals.stop.is_set():
            why = "interrupted"
        elif not self.producer.running:
            why = "the cameras are done" if self.producer.error is None else "the producer stopped"
        else:
            why = f"{self.opts.duration:g} s are up"
        self.say(f"{why}: stopping the cameras ...")
        self.producer.stop(timeout=60)
        if self.producer.error is not None:
            self.failed = True
            self.say(f"!!! the producer failed: {self.producer.error}; see {self.stack.logs_dir / 'demo.log'}",
                     style="bold red")
        target = self.producer.produced - self.producer.replayed
        snap = self._catch_up(target)
        self.say("stopping the workers and the sink ...")
        stop_children(self.workers, 5 if self.signals.hurry.is_set() else STOP_TIMEOUT_S)
        if self.sink is not None:
            stop_children([self.sink], 5 if self.signals.hurry.is_set() else STOP_TIMEOUT_S)
        self._report_dead()
        final = self._snapshot(window_s=None)
        if final.db_error is None:
            snap = final
        self._summary(settings, model, snap)
        return 1 if self.failed else 0

    def _catch_up(self, target: int) -> Snapshot:
        """Until every produced frame is inspected or dead-lettered (bounded; a 2nd Ctrl-C skips it)."""
        snap = self._snapshot()
        if snap.inspected + snap.dlq >= target:
            return snap
        if not self.console.is_terminal:
            self.say(f"waiting for the inspections to catch up ({snap.inspected}/{target}) ...")
        with self.console.status(f"waiting for the inspections to catch up ({snap.inspected}/{target}) ...") as st:
            start = last_change = time.monotonic()
            last = snap.inspected + snap.dlq
            while not self.signals.hurry.is_set():
                self._report_dead()
                snap = self._snapshot()
                done = snap.inspected + snap.dlq
                if done >= target:
                    break
                if done != last:
                    last, last_change = done, time.monotonic()
                now = time.monotonic()
                if now - start > CATCH_UP_TIMEOUT_S or now - last_change > CATCH_UP_STALL_S:
                    self.say(f"gave up waiting: {target - done} frame(s) not inspected yet", style="yellow")
                    break
                st.update(f"waiting for the inspections to catch up ({snap.inspected}/{target}) ...")
                self.signals.hurry.wait(0.5)
        return snap

    def _summary(self, settings: Settings, model: DemoModel, snap: Snapshot) -> None:
        assert self.producer is not None
        produced = self.producer.produced
        per_line = "  ".join(f"{ln} {_pct(f, n)} of {n}" for ln, (n, f) in snap.per_line.items()) or "-"
        rows = [
            ("frames produced", str(produced) + (f" ({self.producer.replayed} replayed from the spool)"
                                                 if self.producer.replayed else "")),
            ("inspected", f"{snap.inspected} (rows in PostgreSQL)"),
            ("FAIL", f"{snap.failed} ({_pct(snap.failed, snap.inspected)})"),
            ("defect rate per line", per_line),
            ("DLQ", str(snap.dlq)),
            ("latency p50 / p95", f"{_ms(snap.p50_ms)} / {_ms(snap.p95_ms)} (captured -> inspected)"),
            ("model", snap.model or model.label),
            ("logs", f"{self.stack.logs_dir}/"),
            ("database", f"{settings.redacted()['postgres_dsn']} (data in {self.stack.state_dir / 'postgres'})"),
        ]
        self.say("summary", style="bold")
        for k, v in rows:
            self.say(f"  {k:<22} {v}")
        if self.counter is not None:  # alerts and part verdicts of the stream processors (#9)
            from sqis.demo_stream import alert_lines

            for line in alert_lines(settings, self.counter.since):
                self.say(f"  {line}")
        for c in self.children:
            if c.reported:
                self.say(f"  !!! {c.name} died during the run (exit code {c.returncode}); log: {c.log_path}",
                         style="bold red")

    # -- cleanup --
    def _cleanup(self) -> None:
        """Stop whatever is still running, in order; never raises."""
        hurry = self.signals.hurry.is_set()
        if self.producer is not None and self.producer.running:
            with contextlib.suppress(Exception):
                self.producer.stop(timeout=5 if hurry else 30)
        if self.dlq is not None:
            with contextlib.suppress(Exception):
                self.dlq.stop()
        if self.counter is not None:
            self.counter.close()
        live = [c for c in self.children if c.alive]
        if live:
            with contextlib.suppress(Exception):
                stop_children(live, 5 if hurry else STOP_TIMEOUT_S)
        for c in self.children:  # a last resort: nothing may outlive the demo
            if c.alive and c.proc is not None:
                with contextlib.suppress(Exception):
                    c.proc.kill()
                    c.proc.wait(timeout=10)
        if self.stack is None:
            return
        if self.started_stack and not self.opts.keep_stack:
            self.say("stopping the local stack ...")
            try:
                self.stack.down()
                self.say(f"stack stopped; the data stays in {self.stack.state_dir} "
                         f"(`sqis stack up --state-dir {self.stack.state_dir}` to query it again)")
            except Exception as exc:
                self.say(f"!!! stopping the stack failed: {exc}; run `sqis stack down --state-dir "
                         f"{self.stack.state_dir}`", style="bold red")
        elif self.stack.stack_file.exists():
            reason = "--keep-stack" if self.opts.keep_stack else "it was running before the demo"
            self.say(f"the local stack keeps running ({reason}); `sqis stack down --state-dir {self.stack.state_dir}` "
                     "stops it")


# ---- the command ---------------------------------------------------------------------------------------


def demo(
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="local stack state directory (default .sqis, or env SQIS_STATE_DIR)")] = None,
    cameras: Annotated[int, typer.Option("--cameras", min=1, max=64, help="synthetic cameras")] = 4,
    lines: Annotated[int, typer.Option("--lines", min=1, max=64, help="production lines (cameras spread round-robin)")] = 2,
    workers: Annotated[int, typer.Option("--workers", min=1, max=16, help="`sqis worker` subprocesses")] = 2,
    fps: Annotated[float, typer.Option("--fps", min=0.1, max=100.0, help="frames per second per camera")] = 2.0,
    duration: Annotated[float, typer.Option("--duration", min=0, help="seconds to run; 0 = until Ctrl-C")] = 0.0,
    frames: Annotated[int, typer.Option("--frames", min=0, help="frames per camera; 0 = unlimited")] = 0,
    defect_rate: Annotated[float, typer.Option("--defect-rate", min=0.0, max=1.0, help="share of parts with defects")] = 0.3,
    model: Annotated[str | None, typer.Option("--model", help=f"PATH.onnx or models:/NAME@alias (default {DEMO_MODEL}, or env SQIS_MODEL_URI)")] = None,
    keep_stack: Annotated[bool, typer.Option("--keep-stack", help="leave the local stack running at the end")] = False,
    edge: Annotated[bool, typer.Option("--edge", help="one more camera (cam-edge) through `sqis edge` and MQTT; its frames are counted as inspected, not as produced")] = False,
) -> None:
    """Run the line: local stack, synthetic cameras, inference workers, PostgreSQL sink, live counts."""
    from rich.console import Console

    opts = DemoOptions(state_dir=state_dir or Path(os.environ.get("SQIS_STATE_DIR") or ".sqis"), cameras=cameras,
                       lines=lines, workers=workers, fps=fps, duration=duration, frames=frames,
                       defect_rate=defect_rate, model=model, keep_stack=keep_stack, edge=edge)
    console = Console(soft_wrap=True)
    try:
        rc = Demo(opts, console).run()
    except (DemoError, UserError):
        raise  # one line, exit 1 or 2 (sqis/cli.py)
    except Exception as exc:
        log.exception("demo failed")
        raise DemoError(f"the demo failed: {exc} (traceback in the demo log)") from None
    if rc:
        raise DemoError("a part of the demo failed (see above)")
