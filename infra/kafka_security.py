"""The local Kafka's secure mode: a CA and a TLS certificate, SCRAM users per role, ACLs per role.

Made once under ``<state>/kafka/secure`` (0700; keys and passwords 0600) and kept across restarts.
Each process of the line authenticates as its *role*'s principal, and the StandardAuthorizer lets
a role touch only what it needs (see :data:`ROLES` and :func:`role_acls`). ``admin`` is the super
user the stack itself uses (topic creation, ACLs, the broker's own inter-broker connection).

Clients: ``LocalStack.settings(role=...)``, or ``sqis stack env --role ROLE`` for a shell. The
helpers :func:`denial` and :func:`denied_message` turn Kafka's authentication and authorization
errors into one line that names the principal and the topic or group.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import InfraError
from infra.settings import Settings
from schemas.catalog import TopicCatalog

log = logging.getLogger(__name__)

MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"
# role -> what it is for (`sqis stack env --role` lists these)
ROLES: dict[str, str] = {
    ADMIN: "super user: the stack itself, topic and ACL administration",
    "producer": "cameras: write frames",
    "worker": "inference workers: read frames, write inspections, inspections.shadow and frames.dlq, transactions",
    "sink": "sinks: read inspections, frames.dlq and the stream topics, write frames.dlq",
    "stream": "stream processors (canary and shadow too): read inspections and inspections.shadow, write "
              "defect-rates, alerts, part-verdicts",
    "mes": "MES integration: read the result topics only",
}
# consumer group id prefixes each role may use (the components' defaults start with these)
GROUP_PREFIXES: dict[str, tuple[str, ...]] = {
    "producer": (),
    "worker": ("inference-workers",),
    "sink": ("sink-", "notify-"),
    "stream": ("stream-",),
    "mes": ("mes-",),
}
# role -> (topics it reads, topics it writes), logical catalog keys
TOPIC_ACCESS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "producer": ((), ("frames",)),
    "worker": (("frames",), ("inspections", "inspections_shadow", "frames_dlq")),
    "sink": (("inspections", "frames_dlq", "defect_rates", "alerts", "part_verdicts"), ("frames_dlq",)),
    "stream": (("inspections", "inspections_shadow"), ("defect_rates", "alerts", "part_verdicts")),
    "mes": (("inspections", "defect_rates", "alerts", "part_verdicts"), ()),
}
CERT_DAYS = 825


class SecurityError(InfraError):
    """The secure mode's material or ACLs could not be made."""


@dataclass(frozen=True)
class Material:
    """What the secure broker and its clients need, all files under ``dir``."""

    dir: Path
    ca_cert: Path  # PEM: the clients' trust anchor (ssl.ca.location) and the broker's truststore
    keystore: Path  # PEM: the broker's private key (PKCS#8) followed by its certificate chain
    passwords: dict[str, str]  # SCRAM user -> password, one user per role


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_material(sdir: Path, host: str) -> Material:
    """The CA, the broker's certificate (for ``host`` and localhost) and the users' passwords;
    made at the first start and reused afterwards (a restart keeps them, so clients keep working)."""
    sdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sdir, 0o700)
    ca, ks, users = sdir / "ca.pem", sdir / "broker.pem", sdir / "users.json"
    if not (ca.is_file() and ks.is_file()):
        _make_certs(ca, ks, host)
        log.info("kafka TLS material made", extra={"ca": str(ca)})
    try:
        passwords = {str(k): str(v) for k, v in json.loads(users.read_text()).items()}
    except (OSError, ValueError):
        passwords = {}
    if set(passwords) != set(ROLES):
        # a new role gets a password; existing ones stay (they are in the formatted metadata)
        passwords = {r: passwords.get(r) or secrets.token_urlsafe(24) for r in ROLES}
        _write_private(users, json.dumps(passwords, indent=2).encode())
    return Material(dir=sdir, ca_cert=ca, keystore=ks, passwords=passwords)


def _make_certs(ca_path: Path, ks_path: Path, host: str) -> None:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise SecurityError("the secure mode needs the `cryptography` package (pip install cryptography)") from exc

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sqis local CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sqis-kafka")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # the CA's key is not kept: nothing else is ever signed with it (a new CA comes with --purge)
    _write_private(ks_path, key_pem + cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    _write_private(ca_path, ca_cert.public_bytes(pem))
    os.chmod(ca_path, 0o644)


def broker_properties(m: Material) -> dict[str, str]:
    """server.properties entries for a SASL_SSL ``CLIENT`` listener with SCRAM and the StandardAuthorizer."""
    jaas = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN}" password="{m.passwords[ADMIN]}";')
    return {
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "listener.name.client.scram-sha-512.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(m.keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(m.ca_cert),
        "ssl.client.auth": "none",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        # the controller listener is PLAINTEXT, so the broker's own controller requests are ANONYMOUS
        "super.users": f"User:{ADMIN};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }


def client_info(m: Material) -> dict[str, Any]:
    """What stack.json's ``kafka`` entry carries for clients (stack.json is 0600)."""
    return {"ca": str(m.ca_cert), "users": dict(m.passwords), "sasl_mechanism": MECHANISM,
            "security_protocol": "SASL_SSL"}


def client_settings(kafka_info: dict[str, Any], role: str) -> dict[str, Any]:
    """Settings fields for ``role`` on a secure stack (``kafka_info`` is stack.json's kafka entry)."""
    users = kafka_info.get("users") or {}
    if role not in users:
        raise SecurityError(f"unknown Kafka role {role!r}; one of: {', '.join(sorted(users) or ROLES)}")
    return {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": MECHANISM,
            "kafka_sasl_username": role, "kafka_sasl_password": users[role],
            "kafka_ssl_ca_location": kafka_info["ca"]}


def role_acls(topic_prefix: str) -> list[Any]:
    """Every ACL binding of the non-admin roles for the topics of ``topic_prefix``."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    cat = TopicCatalog(topic_prefix)
    allow = AclPermissionType.ALLOW
    out: list[Any] = []

    def add(rtype: Any, name: str, pattern: Any, principal: str, *ops: Any) -> None:
        for op in ops:
            b = AclBinding(rtype, name, pattern, f"User:{principal}", "*", op, allow)
            if b not in out:  # e.g. DESCRIBE of a topic a role both reads and writes
                out.append(b)

    for role, (reads, writes) in TOPIC_ACCESS.items():
        for key in reads:
            add(ResourceType.TOPIC, cat.name(key), ResourcePatternType.LITERAL, role,
                AclOperation.READ, AclOperation.DESCRIBE)
        for key in writes:
            add(ResourceType.TOPIC, cat.name(key), ResourcePatternType.LITERAL, role,
                AclOperation.WRITE, AclOperation.DESCRIBE)
        for gp in GROUP_PREFIXES[role]:
            add(ResourceType.GROUP, gp, ResourcePatternType.PREFIXED, role, AclOperation.READ)
    # worker transactions: transactional.id starts with the topic prefix (any id on an unprefixed stack)
    tx_name, tx_pattern = (topic_prefix, ResourcePatternType.PREFIXED) if topic_prefix else ("*", ResourcePatternType.LITERAL)
    add(ResourceType.TRANSACTIONAL_ID, tx_name, tx_pattern, "worker", AclOperation.WRITE, AclOperation.DESCRIBE)
    return out


def apply_acls(admin_settings: Settings, topic_prefix: str, timeout: float = 15.0) -> int:
    """Create the roles' ACLs for ``topic_prefix`` (idempotent: the broker ignores duplicates)."""
    from confluent_kafka import KafkaException

    from infra.kafka import admin_client

    admin = admin_client(admin_settings)
    bindings = role_acls(topic_prefix)
    for binding, fut in admin.create_acls(bindings, request_timeout=timeout).items():
        try:
            fut.result()
        except KafkaException as exc:
            raise SecurityError(f"creating ACL {binding} failed: {exc.args[0].str()}") from None
    log.info("kafka ACLs applied", extra={"topic_prefix": topic_prefix, "bindings": len(bindings)})
    return len(bindings)


# ---- clear client-side errors: in infra.kafka (the one module clients use), re-exported here -------------------

from infra.kafka import denial, denied_message  # noqa: E402,F401


def env_lines(kafka_info: dict[str, Any], role: str) -> list[str]:
    """``SQIS_KAFKA_*=value`` lines that make a process of the shell authenticate as ``role``."""
    import shlex

    kw = client_settings(kafka_info, role)
    out = [f"SQIS_KAFKA_BOOTSTRAP={shlex.quote(kafka_info['bootstrap'])}"]
    out += [f"SQIS_{k.upper()}={shlex.quote(str(v))}" for k, v in kw.items()]
    return out
