"""The local stack's MQTT broker: Debian's mosquitto 2.0 on 127.0.0.1, persistence on, a password file.

Edge devices publish frames to it (``sqis bridge mqtt`` turns them into FrameRefs) and PLCs/HMIs
subscribe to the verdicts the bridge publishes. ``LocalStack`` calls :func:`up`, :func:`down` and
:func:`status`; the state lives in ``<state_dir>/mqtt/`` (config, password file, persistence DB) and
the endpoint in stack.json under ``"mqtt"`` (``url`` with the credentials, like the Postgres DSN).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from infra.errors import InfraError
from infra.procs import pid_alive, port_open

log = logging.getLogger(__name__)

USER = "sqis"
AUTOSAVE_S = 2  # the persistence DB is written this often (and at a clean shutdown)


class MqttServerError(InfraError):
    """mosquitto is missing, or did not start."""


def mosquitto_binary() -> Path | None:
    """The mosquitto executable (PATH, then Debian's /usr/sbin), or None when not installed."""
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
    return Path(found) if found else None


def installed() -> bool:
    return mosquitto_binary() is not None and shutil.which("mosquitto_passwd") is not None


def _password(mdir: Path) -> str:
    f = mdir / "secret.json"
    try:
        return str(json.loads(f.read_text())["password"])
    except (OSError, ValueError, KeyError):
        pw = secrets.token_urlsafe(18)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"password": pw}, out)
        return pw


def config_text(port: int, mdir: Path, host: str = "127.0.0.1") -> str:
    """mosquitto.conf: one loopback listener, no anonymous clients, persistent sessions and queues."""
    user = "root" if os.geteuid() == 0 else getpass.getuser()  # as root, do not drop to 'mosquitto'
    return "\n".join([
        f"listener {port} {host}",
        "allow_anonymous false",
        f"password_file {mdir / 'passwd'}",
        "persistence true",
        f"persistence_location {mdir / 'data'}/",
        f"autosave_interval {AUTOSAVE_S}",
        "max_queued_messages 100000",  # per offline persistent client (default 100): a bridge restart
        "max_inflight_messages 100",
        "persistent_client_expiration 7d",
        f"log_dest file {mdir / 'mosquitto.log'}",
        "log_type error", "log_type warning", "log_type notice",
        "connection_messages true",
        f"user {user}",
        "",
    ])


def terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM (mosquitto writes its persistence DB on the way out), wait, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def healthy(info: dict[str, Any] | None) -> bool:
    return bool(info) and pid_alive(info.get("pid")) and port_open(int(info["port"]))  # type: ignore[index]


def up(mdir: Path, port: int, prev: dict[str, Any] | None, logs_dir: Path) -> dict[str, Any]:
    """Start mosquitto (or keep the healthy one) on ``port``; returns its stack.json entry."""
    if prev and healthy(prev):
        return prev
    binary = mosquitto_binary()
    if binary is None or not installed():
        raise MqttServerError("mosquitto is not installed (apt-get install mosquitto, or `make sysdeps`)")
    if prev and prev.get("pid"):
        terminate(int(prev["pid"]), timeout=10)
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "data").mkdir(exist_ok=True)
    pw = _password(mdir)
    passwd = mdir / "passwd"
    passwd.unlink(missing_ok=True)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), USER, pw], check=True, capture_output=True,
                   timeout=30)
    os.chmod(passwd, 0o600)
    conf = mdir / "mosquitto.conf"
    conf.write_text(config_text(port, mdir))
    out = open(logs_dir / "mosquitto.out", "ab")  # noqa: SIM115 - inherited by the child
    try:
        proc = subprocess.Popen([str(binary), "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=mdir)
    finally:
        out.close()
    deadline = time.monotonic() + 15
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            terminate(proc.pid, timeout=5)
            raise MqttServerError(f"mosquitto did not listen on 127.0.0.1:{port}; see {mdir / 'mosquitto.log'}")
        time.sleep(0.05)
    url = f"mqtt://{USER}:{quote(pw, safe='')}@127.0.0.1:{port}"
    log.info("mosquitto up", extra={"port": port, "pid": proc.pid})
    return {"url": url, "port": port, "pid": proc.pid, "config": str(conf), "log": str(mdir / "mosquitto.log"),
            "version": _version(binary)}


def _version(binary: Path) -> str:
    with contextlib.suppress(Exception):
        r = subprocess.run([str(binary), "-h"], capture_output=True, text=True, timeout=5)
        first = (r.stdout or r.stderr).splitlines()[0]
        return first.split("version", 1)[1].strip()
    return "?"


def down(info: dict[str, Any] | None) -> None:
    """SIGTERM (mosquitto writes its persistence DB on the way out), then SIGKILL."""
    if info and info.get("pid"):
        terminate(int(info["pid"]), timeout=10)


def status(info: dict[str, Any] | None) -> dict[str, Any]:
    """Up/down with the endpoint; the password is never shown."""
    from urllib.parse import urlsplit

    out: dict[str, Any] = {"up": healthy(info), **(info or {})}
    if info and info.get("url"):
        u = urlsplit(info["url"])
        out["url"] = f"mqtt://{u.username}:***@{u.hostname}:{u.port}"
    return out
