"""OPC UA for the plant floor: the last Result of every line and station, live, for PLCs and MES.

An asyncua server whose address space follows the shape of OPC 40100 (Machine Vision: ResultType with
ResultId, PartId, ResultState, IsPartial, timestamps) and OPC 40001-101 (Machinery Result Transfer:
a ResultReady event per result, the OK / NOT_OK ``ResultEvaluation``). It reads ``inspections`` (one
station per camera) and ``part-verdicts`` (the line's ``PartStation``) through the shared consume loop
(read_committed, a group of its own). It is a best-effort output: the line never waits for it, and a
server without clients only writes values. Node ids are strings in the namespace ``NAMESPACE_URI``
and documented in docs/opcua.md, so a PLC program can hard-code them.

Threads: the consume loop runs in a thread of its own and hands results over through a bounded queue
(oldest dropped, counted) to the asyncio loop that owns the address space.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import User, UserRole
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("the OPC UA server needs the opcua extra: pip install 'sqis[opcua]' (asyncua)") from exc

from infra.consume_loop import ConsumeLoop
from infra.kafka import Message, TopicPartition
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import source_label
from schemas.serde import SchemaError, deserialize
from sinks.errors import SinkError

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:sqis:opcua:results"
DEFAULT_ENDPOINT = "opc.tcp://0.0.0.0:4840/sqis/"
PART_STATION = "PartStation"

# OPC UA companion specs: ResultEvaluation (40001-101) and ResultState (40100-1)
EVAL_UNDEFINED, EVAL_OK, EVAL_NOT_OK = 0, 1, 2
STATE_UNDEFINED, STATE_COMPLETED = 0, 1
STATE_INCOMPLETE = -1  # application-specific (negative values allowed): a part whose views did not all arrive

SECURITY_MODES: dict[str, ua.SecurityPolicyType] = {
    "none": ua.SecurityPolicyType.NoSecurity,
    "sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "sign-encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


class OpcUaError(SinkError):
    """The OPC UA server cannot start or go on (bad configuration, port taken)."""


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One result as the address space shows it (OPC 40100 ResultType fields, plus the verdict)."""

    line_id: str
    station_id: str
    result_id: str
    part_id: str
    evaluation: int  # EVAL_*
    verdict: str  # OK | NOT_OK
    result_state: int  # STATE_*
    is_partial: bool
    defect_count: int
    defect_classes: tuple[str, ...]
    model_version: str
    acquired_us: int  # when the frame was captured (a part: its first view)
    created_us: int  # when the verdict was made
    reason: str = ""
    topic_ts_ms: int = 0  # the Kafka record's timestamp (latency figures)
    recovered: bool = False  # replayed at start to show the last result: no event, no handshake

    @property
    def path(self) -> str:
        return f"{self.line_id}/{self.station_id}"

    @classmethod
    def from_inspection(cls, rec: dict[str, Any], **kw: Any) -> Result:
        dets = rec.get("detections") or []
        fail = rec["verdict"] == "FAIL"
        return cls(line_id=rec["line_id"], station_id=rec["camera_id"], result_id=rec["frame_id"],
                   part_id=rec.get("part_id") or "", evaluation=EVAL_NOT_OK if fail else EVAL_OK,
                   verdict="NOT_OK" if fail else "OK", result_state=STATE_COMPLETED, is_partial=False,
                   defect_count=len(dets), defect_classes=tuple(sorted({d["class_name"] for d in dets})),
                   model_version=f"{rec['model_name']}@{rec['model_version']}", acquired_us=rec["captured_at"],
                   created_us=rec["inspected_at"], reason=", ".join(rec.get("verdict_rules") or []), **kw)

    @classmethod
    def from_part_verdict(cls, rec: dict[str, Any], **kw: Any) -> Result:
        """OK / NG / INCOMPLETE over all camera views; INCOMPLETE is NOT_OK (never a silent OK), partial."""
        v = rec["verdict"]
        ng_views = [x for x in rec.get("views") or [] if x.get("verdict") not in ("PASS", "OK")]
        classes = {x["worst_class"] for x in ng_views if x.get("worst_class")}
        if rec.get("worst_class"):
            classes.add(rec["worst_class"])
        reason = rec.get("reason") or ""
        if rec.get("missing_cameras"):
            reason = (reason + "; " if reason else "") + "missing " + ",".join(rec["missing_cameras"])
        return cls(line_id=rec["line_id"], station_id=PART_STATION, result_id=rec["part_id"], part_id=rec["part_id"],
                   evaluation=EVAL_OK if v == "OK" else EVAL_NOT_OK, verdict="OK" if v == "OK" else "NOT_OK",
                   result_state=STATE_INCOMPLETE if v == "INCOMPLETE" else STATE_COMPLETED,
                   is_partial=v == "INCOMPLETE", defect_count=len(ng_views), defect_classes=tuple(sorted(classes)),
                   model_version="", acquired_us=rec["first_seen_at"], created_us=rec["decided_at"], reason=reason,
                   **kw)


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


# -- users ------------------------------------------------------------------------------------------


def hash_password(password: str, *, iterations: int = 200_000, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>``, the form the users file may hold."""
    salt = salt or os.urandom(16)
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def _check(stored: str, password: str) -> bool:
    if stored.startswith("pbkdf2_sha256$"):
        try:
            _, it, salt, want = stored.split("$", 3)
            dk = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(it))
        except ValueError:
            return False
        return hmac.compare_digest(base64.b64encode(dk).decode(), want)
    return hmac.compare_digest(stored.encode(), password.encode())


def parse_users(text: str) -> dict[str, str]:
    """``name:password`` or ``name:pbkdf2_sha256$...`` per line (or comma-separated); ``#`` comments."""
    users: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name.strip() or not secret:
            raise OpcUaError(f"users: expected name:password, got {line.split(':')[0]!r}...")
        users[name.strip()] = secret.strip()
    return users


class PasswordUserManager:
    """Username/password from a table (plain or PBKDF2); anonymous only when allowed; a client
    certificate (X509 identity token) only when its thumbprint is listed."""

    def __init__(self, users: dict[str, str], *, allow_anonymous: bool = False,
                 cert_users: dict[bytes, str] | None = None) -> None:
        self.users = users
        self.allow_anonymous = allow_anonymous
        self.cert_users = cert_users or {}
        self.refused = 0

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is not None:
            stored = self.users.get(username)
            if stored is not None and _check(stored, password or ""):
                return User(role=UserRole.User, name=username)
            self.refused += 1
            log.warning("OPC UA login refused", extra={"user": username})
            return None
        # asyncua passes the secure channel's client certificate here for anonymous tokens too
        name = self.cert_users.get(hashlib.sha256(_der(certificate)).digest()) if certificate else None
        if name is not None:
            return User(role=UserRole.User, name=name)
        if self.allow_anonymous:
            return User(role=UserRole.User, name="anonymous")
        self.refused += 1
        return None


def _der(certificate: Any) -> bytes:
    if isinstance(certificate, bytes):
        return certificate
    from cryptography.hazmat.primitives import serialization

    return certificate.public_bytes(serialization.Encoding.DER)  # an x509.Certificate


# -- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpcUaConfig:
    endpoint: str = DEFAULT_ENDPOINT
    security: tuple[str, ...] = ("sign-encrypt",)  # of SECURITY_MODES
    allow_anonymous: bool = False
    users: dict[str, str] = field(default_factory=dict)
    cert_file: Path | None = None  # DER or PEM; None: a self-signed one in cert_dir
    key_file: Path | None = None
    cert_dir: Path = Path(".sqis/opcua")
    client_certs: tuple[Path, ...] = ()  # X509 user identities (and a trust list) when given
    handshake: bool = False  # ResultsAck before the next result per station
    handshake_buffer: int = 8  # results held per station while waiting for the ack
    queue_size: int = 10_000  # Kafka thread -> server hand-over
    recover_per_partition: int = 500  # records read back per partition at start (last result per station)
    stations: tuple[tuple[str, str], ...] = ()  # (line, station) created at start, before any result
    publish_interval_ms: int = 50  # the fastest a client's subscription may ask for

    def __post_init__(self) -> None:
        bad = [m for m in self.security if m not in SECURITY_MODES]
        if bad or not self.security:
            raise OpcUaError(f"security: {bad or 'empty'}; use any of {', '.join(SECURITY_MODES)}")
        if not self.allow_anonymous and not self.users and not self.client_certs:
            raise OpcUaError("no way in: give users (SQIS_OPCUA_USERS or --users-file), client certificates, "
                             "or allow anonymous access explicitly (--allow-anonymous)")


def ensure_certificate(cfg: OpcUaConfig, app_uri: str) -> tuple[Path, Path]:
    """The configured server certificate and key, or a self-signed pair (RSA 2048, SHA-256, one year,
    the application URI and host name as SANs) generated once into ``cert_dir``."""
    if cfg.cert_file and cfg.key_file:
        return cfg.cert_file, cfg.key_file
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert, key = cfg.cert_dir / "server-cert.der", cfg.cert_dir / "server-key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    cfg.cert_dir.mkdir(parents=True, exist_ok=True)
    pk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SQIS OPC UA server"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SQIS")])
    now = datetime.now(UTC)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(app_uri), x509.DNSName(host),
                                                     x509.DNSName("localhost")]), critical=False)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                      data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
         .sign(pk, hashes.SHA256()))
    key.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()))
    key.chmod(0o600)
    cert.write_bytes(c.public_bytes(serialization.Encoding.DER))
    log.info("self-signed OPC UA server certificate generated", extra={"cert": str(cert)})
    return cert, key


# -- the address space ------------------------------------------------------------------------------

# Result variables: browse name -> (variant type, initial value). Node id: "<line>/<station>/Result/<name>".
RESULT_VARS: dict[str, tuple[ua.VariantType, Any]] = {
    "ResultId": (ua.VariantType.String, ""),
    "PartId": (ua.VariantType.String, ""),
    "Evaluation": (ua.VariantType.Int32, EVAL_UNDEFINED),
    "Verdict": (ua.VariantType.String, ""),
    "ResultState": (ua.VariantType.Int32, STATE_UNDEFINED),
    "IsPartial": (ua.VariantType.Boolean, False),
    "IsSimulated": (ua.VariantType.Boolean, False),
    "DefectCount": (ua.VariantType.Int32, 0),
    "DefectClasses": (ua.VariantType.String, []),  # array
    "ModelVersion": (ua.VariantType.String, ""),
    "Reason": (ua.VariantType.String, ""),
    "AcquisitionTime": (ua.VariantType.DateTime, datetime(1970, 1, 1, tzinfo=UTC)),
    "CreationTime": (ua.VariantType.DateTime, datetime(1970, 1, 1, tzinfo=UTC)),
}
# Station variables: "<line>/<station>/<name>"
STATION_VARS: dict[str, tuple[ua.VariantType, Any]] = {
    "ResultCount": (ua.VariantType.UInt64, 0),
    "ResultsReady": (ua.VariantType.Boolean, False),
    "ResultsAck": (ua.VariantType.Boolean, False),
    "PendingResults": (ua.VariantType.UInt32, 0),
    "DroppedResults": (ua.VariantType.UInt64, 0),
}
EVENT_FIELDS: list[tuple[str, ua.VariantType]] = [
    ("LineId", ua.VariantType.String), ("StationId", ua.VariantType.String), ("ResultId", ua.VariantType.String),
    ("PartId", ua.VariantType.String), ("Evaluation", ua.VariantType.Int32), ("Verdict", ua.VariantType.String),
    ("ResultState", ua.VariantType.Int32), ("IsPartial", ua.VariantType.Boolean),
    ("DefectCount", ua.VariantType.Int32), ("DefectClasses", ua.VariantType.String),
    ("ModelVersion", ua.VariantType.String), ("CreationTime", ua.VariantType.DateTime),
]


@dataclass
class _Station:
    line_id: str
    station_id: str
    node: Any
    result_ids: dict[str, ua.NodeId]
    station_ids: dict[str, ua.NodeId]
    events: list[Any]  # generators: the station, the Server object
    count: int = 0
    last_created_us: int = 0
    dropped: int = 0
    waiting_ack: bool = False
    pending: deque[Result] = field(default_factory=deque)


@dataclass
class OpcUaStats:
    received: int = 0  # results decoded from Kafka
    recovered: int = 0  # of them replayed at start
    published: int = 0  # shown in the address space
    events: int = 0  # ResultReady events fired
    dropped_queue: int = 0  # the hand-over queue was full (oldest dropped)
    dropped_handshake: int = 0  # a station's ack buffer was full (oldest dropped)
    undecodable: int = 0
    acks: int = 0


def _nid(ns: int, path: str) -> ua.NodeId:
    return ua.NodeId(path, ns)


class ResultServer:
    """The address space and the server (asyncio). ``offer(result)`` may be called from any thread."""

    def __init__(self, cfg: OpcUaConfig) -> None:
        self.cfg = cfg
        self.stats = OpcUaStats()
        self.users = PasswordUserManager(cfg.users, allow_anonymous=cfg.allow_anonymous,
                                         cert_users=_cert_users(cfg.client_certs))
        self.server = Server(user_manager=self.users)
        self.ns = 0
        self.stations: dict[tuple[str, str], _Station] = {}
        self._queue: deque[Result] = deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lines: dict[str, Any] = {}
        self._event_type: Any = None
        self.on_published: Callable[[Result], None] | None = None  # hook (bench, tests)
        self.ready = threading.Event()

    # -- set-up ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):  # asyncua logs every session and revision at INFO/WARNING
            logging.getLogger("asyncua").setLevel(logging.ERROR)
        s = self.server
        await s.init()
        s.set_endpoint(self.cfg.endpoint)
        s.set_server_name("SQIS inspection results")
        app_uri = "urn:sqis:opcua:server"
        await s.set_application_uri(app_uri)
        policies = [SECURITY_MODES[m] for m in self.cfg.security]
        s.set_security_policy(policies)
        tokens: list[type] = [ua.UserNameIdentityToken]
        if self.cfg.client_certs:
            tokens.append(ua.X509IdentityToken)
        if self.cfg.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        s.set_identity_tokens(tokens)
        if any(m != "none" for m in self.cfg.security):
            cert, key = ensure_certificate(self.cfg, app_uri)
            await s.load_certificate(str(cert))
            await s.load_private_key(str(key))
            if self.cfg.client_certs:
                s.set_certificate_validator(_trust_list(self.cfg.client_certs))
        s.limits.max_send_buffer = s.limits.max_recv_buffer = 65535
        self.ns = await s.register_namespace(NAMESPACE_URI)
        et = await s.get_node(ua.ObjectIds.BaseEventType).add_object_type(
            _nid(self.ns, "Types/ResultReadyEventType"), f"{self.ns}:ResultReadyEventType")
        for name, vt in EVENT_FIELDS:  # plain browse names, as asyncua gives custom event fields
            await et.add_property(_nid(self.ns, f"Types/ResultReadyEventType/{name}"), name,
                                  ua.get_default_value(vt), varianttype=vt)
        self._event_type = et
        self._root = await s.nodes.objects.add_folder(_nid(self.ns, "Lines"), f"{self.ns}:Lines")
        self.server_events = await s.get_event_generator(self._event_type, ua.ObjectIds.Server)
        for line, station in self.cfg.stations:
            await self._station(line, station)
        try:
            await s.start()
        except OSError as exc:
            raise OpcUaError(f"cannot listen on {self.cfg.endpoint}: {exc}") from None
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.ready.set()
        log.info("OPC UA server listening", extra={"endpoint": self.cfg.endpoint, "security": list(self.cfg.security),
                                                   "anonymous": self.cfg.allow_anonymous, "namespace": NAMESPACE_URI})

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.stop()

    async def _station(self, line_id: str, station_id: str) -> _Station:
        key = (line_id, station_id)
        st = self.stations.get(key)
        if st is not None:
            return st
        ns = self.ns
        line = self._lines.get(line_id)
        if line is None:
            line = await self._root.add_object(_nid(ns, f"Lines/{line_id}"), f"{ns}:{line_id}")
            self._lines[line_id] = line
        base = f"Lines/{line_id}/{station_id}"
        node = await line.add_object(_nid(ns, base), f"{ns}:{station_id}")
        result = await node.add_object(_nid(ns, f"{base}/Result"), f"{ns}:Result")
        result_ids: dict[str, ua.NodeId] = {}
        for name, (vt, init) in RESULT_VARS.items():
            v = await result.add_variable(_nid(ns, f"{base}/Result/{name}"), f"{ns}:{name}", init, varianttype=vt)
            if isinstance(init, list):
                await v.write_value_rank(1)
            result_ids[name] = v.nodeid
        station_ids: dict[str, ua.NodeId] = {}
        for name, (vt, init) in STATION_VARS.items():
            v = await node.add_variable(_nid(ns, f"{base}/{name}"), f"{ns}:{name}", init, varianttype=vt)
            if name == "ResultsAck":
                await v.set_writable()
            station_ids[name] = v.nodeid
        gen = await self.server.get_event_generator(self._event_type, node.nodeid)
        st = _Station(line_id, station_id, node, result_ids, station_ids, [gen],
                      pending=deque(maxlen=max(1, self.cfg.handshake_buffer)))
        self.stations[key] = st
        log.info("station added", extra={"line": line_id, "station": station_id, "node": f"ns={ns};s={base}"})
        return st

    # -- hand-over from the Kafka thread -----------------------------------------------------------------

    def offer(self, results: Iterable[Result]) -> None:
        """Queue results for the server (thread-safe, never blocks: a full queue drops its oldest)."""
        n = 0
        for r in results:
            if len(self._queue) >= self.cfg.queue_size:
                self._queue.popleft()
                self.stats.dropped_queue += 1
            self._queue.append(r)
            n += 1
        if n and self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: threading.Event) -> None:
        """Publish queued results until ``stop``; with the handshake, watch the acks."""
        assert self._wake is not None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.02 if self._awaiting() else 0.5)
            self._wake.clear()
            while self._queue:
                await self.handle(self._queue.popleft())
            if self.cfg.handshake:
                await self._check_acks()

    def _awaiting(self) -> bool:
        return self.cfg.handshake and any(st.waiting_ack for st in self.stations.values())

    async def handle(self, r: Result) -> None:
        st = await self._station(r.line_id, r.station_id)
        if r.recovered:
            self.stats.recovered += 1
            if r.created_us >= st.last_created_us:  # partitions replay in any order: keep the newest
                await self._show(st, r, event=False)
            return
        if not self.cfg.handshake:
            await self._show(st, r)
            return
        if st.waiting_ack:
            if len(st.pending) == st.pending.maxlen:
                st.dropped += 1
                self.stats.dropped_handshake += 1
                await self._write(st.station_ids["DroppedResults"], st.dropped, ua.VariantType.UInt64)
            st.pending.append(r)
            await self._write(st.station_ids["PendingResults"], len(st.pending), ua.VariantType.UInt32)
            return
        await self._release(st, r)

    async def _release(self, st: _Station, r: Result) -> None:
        st.waiting_ack = True
        await self._write(st.station_ids["ResultsAck"], False, ua.VariantType.Boolean)
        await self._show(st, r)
        await self._write(st.station_ids["ResultsReady"], True, ua.VariantType.Boolean)

    async def _check_acks(self) -> None:
        for st in self.stations.values():
            if not st.waiting_ack:
                continue
            if not self.server.read_attribute_value(st.station_ids["ResultsAck"]).Value.Value:
                continue
            self.stats.acks += 1
            st.waiting_ack = False
            await self._write(st.station_ids["ResultsReady"], False, ua.VariantType.Boolean)
            await self._write(st.station_ids["ResultsAck"], False, ua.VariantType.Boolean)
            if st.pending:
                nxt = st.pending.popleft()
                await self._write(st.station_ids["PendingResults"], len(st.pending), ua.VariantType.UInt32)
                await self._release(st, nxt)

    async def _write(self, nid: ua.NodeId, value: Any, vt: ua.VariantType, ts: datetime | None = None) -> None:
        now = datetime.now(UTC)
        dv = ua.DataValue(ua.Variant(value, vt), SourceTimestamp=ts or now, ServerTimestamp=now)
        sc = await self.server.iserver.aspace.write_attribute_value(nid, ua.AttributeIds.Value, dv)
        if sc is not None and not sc.is_good():
            log.warning("value not written", extra={"node": nid.to_string(), "status": sc.name})

    async def _show(self, st: _Station, r: Result, *, event: bool = True) -> None:
        created = _dt(r.created_us)
        ids = st.result_ids
        values: list[tuple[str, Any]] = [
            ("PartId", r.part_id), ("Evaluation", r.evaluation), ("Verdict", r.verdict),
            ("ResultState", r.result_state), ("IsPartial", r.is_partial), ("DefectCount", r.defect_count),
            ("DefectClasses", list(r.defect_classes)), ("ModelVersion", r.model_version), ("Reason", r.reason),
            ("AcquisitionTime", _dt(r.acquired_us)), ("CreationTime", created),
            ("ResultId", r.result_id),  # last: a client watching ResultId finds the rest written
        ]
        for name, value in values:
            await self._write(ids[name], value, RESULT_VARS[name][0], created)
        st.count += 1
        st.last_created_us = max(st.last_created_us, r.created_us)
        await self._write(st.station_ids["ResultCount"], st.count, ua.VariantType.UInt64, created)
        self.stats.published += 1
        if event:
            for gen in (st.events[0], self.server_events):
                ev = gen.event
                ev.LineId, ev.StationId, ev.ResultId, ev.PartId = r.line_id, r.station_id, r.result_id, r.part_id
                ev.Evaluation, ev.Verdict, ev.ResultState = r.evaluation, r.verdict, r.result_state
                ev.IsPartial, ev.DefectCount, ev.DefectClasses = r.is_partial, r.defect_count, ",".join(r.defect_classes)
                ev.ModelVersion, ev.CreationTime = r.model_version, created
                ev.SourceNode, ev.SourceName = st.node.nodeid, r.path
                ev.Severity = 500 if r.evaluation == EVAL_NOT_OK else 100
                await gen.trigger(message=f"{r.path} {r.verdict} {r.result_id}")
            self.stats.events += 1
        if self.on_published is not None:
            self.on_published(r)


def _cert_users(paths: Iterable[Path]) -> dict[bytes, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out: dict[bytes, str] = {}
    for p in paths:
        data = Path(p).read_bytes()
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        out[hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()] = Path(p).stem
    return out


def _trust_list(paths: Iterable[Path]) -> Callable[..., Any]:
    """Only the listed client application certificates may create a session (over a secure endpoint)."""
    from asyncua.common.utils import ServiceError

    trusted = set(_cert_users(paths))

    async def validate(cert: Any, _app: Any) -> None:
        if hashlib.sha256(_der(cert)).digest() not in trusted:
            log.warning("OPC UA client certificate not trusted", extra={"subject": cert.subject.rfc4514_string()})
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    return validate


# -- Kafka side -------------------------------------------------------------------------------------


class ResultFeed:
    """The consume loop on ``inspections`` and ``part-verdicts`` that feeds a :class:`ResultServer`.

    Offsets: an OPC UA server shows "the last result", so on every assignment each partition is read
    back from ``high watermark - recover_per_partition``; records below the watermark seen at
    assignment only set the last result (no event, no handshake), later ones are live. The group's
    committed offsets are not used for the start position (each replica has a group of its own)."""

    def __init__(self, settings: Settings, server: ResultServer, *, group_id: str,
                 stop_event: threading.Event | None = None, poll_s: float = 0.05) -> None:
        cat = TopicCatalog(settings.topic_prefix)
        self.topics = {cat.inspections: "inspection", cat.part_verdicts: "part_verdict"}
        self.server = server
        self.recover = max(0, server.cfg.recover_per_partition)
        self.live_from: dict[tuple[str, int], int] = {}
        self.stop_event = stop_event or threading.Event()
        self.loop = ConsumeLoop(settings, topics=list(self.topics), group_id=group_id,
                                client_id=f"{group_id}-{uuid.uuid4().hex[:6]}", on_batch=self._batch,
                                on_assign=self._on_assign, with_producer=False, batch_size=500, poll_s=poll_s,
                                stop_event=self.stop_event, name="opcua")

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        cons = self.loop.consumer
        start = []
        for tp in partitions:
            try:
                low, high = cons.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except Exception as exc:  # noqa: BLE001 - fall back to the committed offset
                log.warning("watermarks unavailable: no recovery", extra={"partition": tp.partition, "error": str(exc)})
                start.append(tp)
                continue
            self.live_from[(tp.topic, tp.partition)] = high
            start.append(TopicPartition(tp.topic, tp.partition, max(low, high - self.recover)))
        cons.incremental_assign(start)

    def _batch(self, msgs: list[Message], _loop: Any) -> None:
        out: list[Result] = []
        for m in msgs:
            schema = self.topics.get(m.topic())
            if schema is None:
                continue
            try:
                rec = deserialize(schema, m.value(), m.headers())
            except SchemaError as exc:
                self.server.stats.undecodable += 1
                log.warning("undecodable record skipped", extra={
                    "at": source_label(m.topic(), m.partition(), m.offset()), "error": str(exc)})
                continue
            kw = {"topic_ts_ms": m.timestamp()[1],
                  "recovered": m.offset() < self.live_from.get((m.topic(), m.partition()), 0)}
            try:
                out.append(Result.from_inspection(rec, **kw) if schema == "inspection"
                           else Result.from_part_verdict(rec, **kw))
            except (KeyError, TypeError, ValueError) as exc:
                self.server.stats.undecodable += 1
                log.warning("record without the fields of a result", extra={
                    "at": source_label(m.topic(), m.partition(), m.offset()), "error": str(exc)})
        self.server.stats.received += len(out)
        self.server.offer(out)

    def run(self) -> Any:
        return self.loop.run()


class OpcUaBridge:
    """The whole service: the server on an asyncio loop, the feed in a thread. ``run()`` blocks until
    ``stop()``; ``start_in_thread()`` runs it all in the background (tests, bench)."""

    def __init__(self, settings: Settings, cfg: OpcUaConfig, *, group_id: str | None = None) -> None:
        self.settings = settings
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.server = ResultServer(cfg)
        self.feed = ResultFeed(settings, self.server, group_id=group_id or default_group(), stop_event=self.stop_event)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> OpcUaStats:
        return self.server.stats

    @property
    def loop(self) -> ConsumeLoop:
        """The consume loop (health endpoints)."""
        return self.feed.loop

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> OpcUaStats:
        asyncio.run(self._main())
        if self.error is not None:
            raise self.error
        return self.stats

    async def _main(self) -> None:
        # the feed joins its group while the server builds its address space (seconds, both)
        feed = threading.Thread(target=self._feed, name="opcua-feed", daemon=True)
        feed.start()
        try:
            await self.server.start()
            await self.server.run(self.stop_event)
        finally:
            self.stop_event.set()
            await asyncio.get_running_loop().run_in_executor(None, feed.join, 15.0)
            await self.server.stop()
            log.info("OPC UA server stopped", extra=self.stats.__dict__)

    def _feed(self) -> None:
        try:
            self.feed.run()
        except BaseException as exc:  # noqa: BLE001 - reported by run() in the caller's thread
            self.error = exc
            log.error("OPC UA feed stopped", extra={"error": str(exc)})
        finally:
            self.stop_event.set()

    def start_in_thread(self, timeout_s: float = 30.0) -> OpcUaBridge:
        def target() -> None:
            try:
                asyncio.run(self._main())
            except BaseException as exc:  # noqa: BLE001
                self.error = exc
                self.server.ready.set()

        self._thread = threading.Thread(target=target, name="opcua-server", daemon=True)
        self._thread.start()
        if not self.server.ready.wait(timeout_s) or self.error is not None:
            raise OpcUaError(f"OPC UA server did not start: {self.error}")
        return self

    def close(self, timeout_s: float = 20.0) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait_assigned(self, timeout_s: float = 30.0) -> bool:
        """True once the feed holds its partitions and has read back to the watermarks (tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.feed.live_from) >= sum(_partitions(self.settings, t) for t in self.feed.topics):
                return True
            time.sleep(0.05)
        return False


def _partitions(settings: Settings, topic: str) -> int:
    from schemas.catalog import TOPICS

    prefix = settings.topic_prefix
    for t in TOPICS.values():
        if t.full_name(prefix) == topic:
            return t.partitions
    return 1


def default_group() -> str:
    """A group per replica: every replica serves every station, so each reads all partitions."""
    return f"opcua-{socket.gethostname()}"
