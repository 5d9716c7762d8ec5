"""The local schema registry: Apicurio Registry 3.0 (Apache-2.0) as a plain JVM, SQL storage on the stack's PostgreSQL.

Its Quarkus distribution (``io.apicurio:apicurio-registry-app:<v>:tar.gz:all``: a runner jar and
``lib/``) comes from Maven Central through ``mvn dependency:get`` and is unpacked once into a
per-machine cache, like the Kafka jars; ``make registry-jars`` does it, and ``sqis stack up`` when
the cache is empty. Its data (schemas, ids, compatibility rules) lives in its own database
(``apicurio``) of the stack's PostgreSQL, so ids survive a restart. Clients use the
Confluent-compatible API under ``/apis/ccompat/v7``. Why 3.0.x and not 3.3: docs/DESIGN.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from infra.errors import InfraError

log = logging.getLogger(__name__)

REGISTRY_VERSION = "3.0.9"  # the newest Apicurio line whose classes run on Java 17 (3.1+ need Java 21)
ARTIFACT = f"io.apicurio:apicurio-registry-app:{REGISTRY_VERSION}:tar.gz:all"
HEAP = os.environ.get("SQIS_REGISTRY_HEAP", "160m")
CCOMPAT = "/apis/ccompat/v7"
DB_NAME = "apicurio"
MARKER = "-Dsqis.local.registry=1"  # `down` and `status` recognise the process by it


class RegistrySetupError(InfraError):
    """Java, Maven or the registry's distribution is missing: one line that says how to get them."""


class RegistryRefused(InfraError):
    """The registry answered with an error (409: incompatible with the subject's compatibility rule)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def dist_dir() -> Path:
    """Where the unpacked distribution lives: ``SQIS_REGISTRY_HOME``, else a per-machine cache."""
    env = os.environ.get("SQIS_REGISTRY_HOME")
    if env:
        return Path(env)
    from infra.kafka_broker import machine_cache

    return machine_cache() / f"apicurio-registry-{REGISTRY_VERSION}"


def runner_jar(home: Path) -> Path:
    return home / f"apicurio-registry-app-{REGISTRY_VERSION}-runner.jar"


def cds_archive(home: Path) -> Path:
    """A class-data-sharing archive of the registry's classes: starts ~30% faster (see DESIGN.md)."""
    return home / "registry-cds.jsa"


def ensure_cds(home: Path, timeout: float = 120) -> Path | None:
    """Make the CDS archive once per machine: one start (in-memory storage, a free port) that dumps
    the loaded classes at exit. Best effort: None (and a plain start later) if it fails."""
    archive = cds_archive(home)
    if archive.is_file():
        return archive
    import socket

    host = "127.0.0.1"
    tmp = archive.with_name(f"{archive.name}.{os.getpid()}.tmp")
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    cmd = [c for c in java_command(home, port, host, home / "cds-training.log") if c != MARKER]
    cmd.insert(1, f"-XX:ArchiveClassesAtExit={tmp}")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "APICURIO_STORAGE_KIND": "sql",
                                                         "APICURIO_STORAGE_SQL_KIND": "h2"})
    try:
        wait_ready(proc, url_of(host, port), home / "cds-training.log", timeout=timeout)
    except RegistrySetupError as exc:
        log.warning("no CDS archive for the registry", extra={"error": str(exc)})
    finally:
        proc.terminate()  # SIGTERM: a clean exit writes the archive
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if tmp.is_file() and tmp.stat().st_size > 0:
        os.replace(tmp, archive)
        return archive
    tmp.unlink(missing_ok=True)
    return None


def ensure_dist() -> Path:
    """The unpacked distribution, resolved from Maven Central first if the cache is empty.

    ``dependency:get -Dtransitive=false``: the artifact's parent POM (io.apicurio:apicurio-registry
    3.0.9) is not on Central, so a resolution that reads the descriptor (unpack, copy) fails."""
    home = dist_dir()
    if runner_jar(home).is_file():
        ensure_cds(home)
        return home
    mvn = shutil.which("mvn")
    if not mvn:
        raise RegistrySetupError(f"Apicurio Registry {REGISTRY_VERSION} is not in {home} and there is no `mvn` "
                                 "to fetch it (apt install maven, or `make sysdeps`)")
    log.info("resolving Apicurio Registry from Maven Central", extra={"version": REGISTRY_VERSION})
    r = subprocess.run([mvn, "-q", "-B", "dependency:get", f"-Dartifact={ARTIFACT}", "-Dtransitive=false"],
                       capture_output=True, text=True, timeout=900, cwd="/")
    repo = Path(os.environ.get("SQIS_M2_REPO") or Path.home() / ".m2" / "repository")
    tgz = (repo / "io" / "apicurio" / "apicurio-registry-app" / REGISTRY_VERSION
           / f"apicurio-registry-app-{REGISTRY_VERSION}-all.tar.gz")
    if r.returncode != 0 or not tgz.is_file():
        tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
        raise RegistrySetupError(f"mvn could not resolve {ARTIFACT} (exit {r.returncode}): " + " | ".join(tail))
    tmp = home.with_name(home.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    shutil.rmtree(home, ignore_errors=True)
    tmp.rename(home)
    ensure_cds(home)
    return home


def java_command(home: Path, port: int, host: str, logfile: Path) -> list[str]:
    from infra.kafka_broker import _java

    cds = cds_archive(home)
    return [
        _java(), *([f"-XX:SharedArchiveFile={cds}"] if cds.is_file() else []),
        f"-Xmx{HEAP}", "-Xms32m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
        "-Xss512k", "-XX:MaxMetaspaceSize=160m", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        MARKER, f"-Dquarkus.http.port={port}", f"-Dquarkus.http.host={host}",
        "-Dquarkus.log.file.enable=true", f"-Dquarkus.log.file.path={logfile}",
        "-Dquarkus.log.console.enable=false", "-Dquarkus.http.access-log.enabled=false",
        "-jar", str(runner_jar(home)),
    ]


def java_env(pg_host: str, pg_port: int, user: str, password: str) -> dict[str, str]:
    """The registry's storage settings (env, so the password is not on the command line)."""
    return {**os.environ,
            "APICURIO_STORAGE_KIND": "sql", "APICURIO_STORAGE_SQL_KIND": "postgresql",
            "APICURIO_DATASOURCE_URL": f"jdbc:postgresql://{pg_host}:{pg_port}/{DB_NAME}",
            "APICURIO_DATASOURCE_USERNAME": user, "APICURIO_DATASOURCE_PASSWORD": password}


def url_of(host: str, port: int) -> str:
    return f"http://{host}:{port}{CCOMPAT}"


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_ready(proc: subprocess.Popen[bytes], url: str, logfile: Path, timeout: float = 90) -> float:
    """Seconds until the ccompat API answered; raises with the log's last line if the JVM died."""
    t0 = time.monotonic()
    while not healthy(url):
        if proc.poll() is not None:
            raise RegistrySetupError(f"the schema registry exited with {proc.returncode}; see {logfile}")
        if time.monotonic() - t0 > timeout:
            raise RegistrySetupError(f"the schema registry did not answer on {url} within {timeout}s; see {logfile}")
        time.sleep(0.1)
    return time.monotonic() - t0


# ---- the contract: schema history registered in order, compatibility per subject -----------------


def _http(method: str, url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RegistryRefused(exc.code, f"{method} {url} -> HTTP {exc.code}: {detail}") from None


def register_history(url: str, compatibility: str = "BACKWARD_TRANSITIVE") -> dict[str, list[int]]:
    """Register every subject's schema history, oldest first, with ``compatibility`` on each subject.

    Idempotent: a version already registered returns its id. The subject's compatibility is set
    after its first version (Apicurio keeps rules on an existing artifact), so every later version
    is checked by the registry against all earlier ones. Returns {subject: [ids in order]}."""
    from schemas.registry import subjects_with_history

    out: dict[str, list[int]] = {}
    for subject, versions in subjects_with_history():
        ids: list[int] = []
        for i, schema in enumerate(versions):
            res = _http("POST", f"{url}/subjects/{subject}/versions", {"schema": schema, "schemaType": "AVRO"})
            ids.append(int(res["id"]))
            if i == 0:
                _http("PUT", f"{url}/config/{subject}", {"compatibility": compatibility})
        out[subject] = ids
    return out
