"""The local Apache Kafka broker: one KRaft node (broker + controller) as a plain JVM process.

The jars come from Maven Central through the pom beside this module (``infra/broker/pom.xml``),
copied once into a per-machine cache by ``mvn dependency:copy-dependencies``; ``make`` does it, and
``sqis stack up`` does it itself when the cache is empty. The storage is formatted once and kept
under the stack's state directory, so topics, offsets and transactions outlive a restart.

``secure=True`` adds what production has: a TLS listener with a CA generated at first start,
SASL/SCRAM-SHA-512 users created at format time (one per role) and ACLs enforced by the
StandardAuthorizer (see :mod:`infra.kafka_security`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.errors import InfraError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
# one combined node on a 2-core laptop: 512 MiB is the figure stated in the README; the log
# cleaner's dedupe buffer (128 MiB by default, on the heap) is lowered to fit it
HEAP = os.environ.get("SQIS_KAFKA_HEAP", "512m")
BROKER_DIR = Path(__file__).parent / "broker"


class BrokerSetupError(InfraError):
    """Java, Maven or the broker's jars are missing: one clear line that says how to get them."""


@functools.cache
def machine_cache() -> Path:
    """``~/.cache/sqis`` (or under ``XDG_CACHE_HOME``), resolved once per process: offline training points
    XDG_CACHE_HOME at its own state dir for Ultralytics, and a broker or registry started later in the
    same process must still find the per-machine jars instead of fetching them again."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sqis"


def jars_dir() -> Path:
    """Where the broker's jars live: ``SQIS_KAFKA_LIB``, else a per-machine cache."""
    env = os.environ.get("SQIS_KAFKA_LIB")
    if env:
        return Path(env)
    return machine_cache() / f"kafka-{KAFKA_VERSION}" / "lib"


@functools.cache
def _java() -> str:
    """The java binary, checked once per process (``java -version`` starts a JVM)."""
    java = shutil.which("java")
    if not java:
        raise BrokerSetupError("no `java` on PATH: the local Kafka needs Java 17+ "
                               "(apt install openjdk-17-jre-headless, or `make sysdeps`)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    m = re.search(r'version "(\d+)', out)
    if m and int(m.group(1)) < 17:
        raise BrokerSetupError(f"Java {m.group(1)} found; Apache Kafka {KAFKA_VERSION} needs Java 17+")
    return java


def ensure_jars() -> Path:
    """The jar directory, resolved from Maven Central first if it is empty."""
    lib = jars_dir()
    marker = lib / f"kafka_2.13-{KAFKA_VERSION}.jar"
    if marker.is_file():
        return lib
    mvn = shutil.which("mvn")
    if not mvn:
        raise BrokerSetupError(f"the Kafka {KAFKA_VERSION} jars are not in {lib} and there is no `mvn` to "
                               "fetch them (apt install maven, or `make sysdeps`)")
    lib.mkdir(parents=True, exist_ok=True)
    log.info("resolving Apache Kafka from Maven Central", extra={"version": KAFKA_VERSION, "dir": str(lib)})
    r = subprocess.run([mvn, "-q", "-B", "-f", str(BROKER_DIR / "pom.xml"), "dependency:copy-dependencies",
                        f"-DoutputDirectory={lib}", "-DincludeScope=runtime"],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not marker.is_file():
        tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
        raise BrokerSetupError(f"mvn could not resolve the Kafka jars (exit {r.returncode}): " + " | ".join(tail))
    return lib


@dataclass(frozen=True)
class BrokerPorts:
    client: int  # PLAINTEXT, or SASL_SSL in secure mode
    controller: int


def server_properties(data_dir: Path, ports: BrokerPorts, *, host: str, security: dict[str, str] | None) -> str:
    """The node's server.properties: KRaft, one node, local-friendly group and log settings."""
    client_proto = "SASL_SSL" if security else "PLAINTEXT"
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{ports.controller}",
        "listeners": f"CLIENT://{host}:{ports.client},CONTROLLER://{host}:{ports.controller}",
        "advertised.listeners": f"CLIENT://{host}:{ports.client}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "CLIENT",
        "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,CLIENT:{client_proto}",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "10",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # local: a group forms at once; tests use 2 s sessions
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        "group.consumer.min.session.timeout.ms": "1000",
        "group.consumer.min.heartbeat.interval.ms": "500",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.cleaner.threads": "1",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "log.retention.check.interval.ms": "60000",
        "log.segment.bytes": str(64 * 1024 * 1024),
        # a producer's transaction that its owner abandoned (SIGKILL) is aborted after this
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "5000",
        "transaction.max.timeout.ms": "900000",
    }
    if security:
        lines.update(security)
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def java_command(lib: Path, config: Path, logfile: Path) -> list[str]:
    return [
        _java(), f"-Xmx{HEAP}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={BROKER_DIR / 'log4j2.properties'}", f"-Dsqis.kafka.log={logfile}",
        "-Dsqis.local.kafka=1",  # a marker: `down` and `status` recognise the process by it
        "-cp", f"{lib}/*", "kafka.Kafka", str(config),
    ]


def format_storage(lib: Path, config: Path, cluster_id: str, scram_users: dict[str, str] | None,
                   logfile: Path) -> None:
    """``kafka-storage format`` once per data directory (SCRAM users are created here, in KRaft)."""
    cmd = [_java(), "-Xmx256m", f"-Dlog4j2.configurationFile={BROKER_DIR / 'log4j2.properties'}",
           f"-Dsqis.kafka.log={logfile}", "-cp", f"{lib}/*", "kafka.tools.StorageTool", "format",
           "-t", cluster_id, "-c", str(config), "--ignore-formatted"]
    for name, password in (scram_users or {}).items():
        cmd += ["--add-scram", f'SCRAM-SHA-512=[name="{name}",password="{password}"]']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        raise BrokerSetupError(f"formatting the Kafka storage failed (exit {r.returncode})"
                               + (f": {why[-1]}" if why else ""))


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512  # on disk (indexes are sparse)
            except OSError:
                pass
    return total
