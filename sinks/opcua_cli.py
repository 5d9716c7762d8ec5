"""`sqis opcua`: the OPC UA server of the last results per line and station (docs/opcua.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings


def opcua(
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
    endpoint: Annotated[str, typer.Option("--endpoint", envvar="SQIS_OPCUA_ENDPOINT", help="listen URL")] = "opc.tcp://0.0.0.0:4840/sqis/",
    security: Annotated[str, typer.Option("--security", envvar="SQIS_OPCUA_SECURITY", help="endpoints offered, comma-separated: sign-encrypt (Basic256Sha256 Sign&Encrypt), sign, none")] = "sign-encrypt",
    allow_anonymous: Annotated[bool, typer.Option("--allow-anonymous", envvar="SQIS_OPCUA_ALLOW_ANONYMOUS", help="let clients in without credentials (off by default)")] = False,
    users_file: Annotated[Path | None, typer.Option("--users-file", envvar="SQIS_OPCUA_USERS_FILE", help="name:password or name:pbkdf2_sha256$... per line; env SQIS_OPCUA_USERS='name:pw,...' adds users")] = None,
    cert: Annotated[Path | None, typer.Option("--cert", envvar="SQIS_OPCUA_CERT", help="server certificate (DER or PEM); default: a self-signed one in STATE_DIR/opcua")] = None,
    key: Annotated[Path | None, typer.Option("--key", envvar="SQIS_OPCUA_KEY", help="its private key (PEM)")] = None,
    client_cert: Annotated[list[Path] | None, typer.Option("--client-cert", help="a trusted client certificate (repeat): only these may open a secure channel, and each is a user identity")] = None,
    handshake: Annotated[bool, typer.Option("--handshake/--no-handshake", envvar="SQIS_OPCUA_HANDSHAKE", help="hold each station's next result until the client writes ResultsAck=true")] = False,
    handshake_buffer: Annotated[int, typer.Option("--handshake-buffer", min=1, max=1000, help="results held per station while waiting for the ack (oldest dropped past it)")] = 8,
    recover: Annotated[int, typer.Option("--recover", min=0, help="records read back per partition at start, to show the last result of each station")] = 500,
    station: Annotated[list[str] | None, typer.Option("--station", help="LINE/STATION created at start, before its first result (repeat)")] = None,
    group: Annotated[str | None, typer.Option("--group", help="consumer group id (default opcua-HOSTNAME: one per replica)")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="serve /metrics /healthz /readyz [env SQIS_METRICS_PORT]")] = None,
) -> None:
    """Serve the last result of every line and station over OPC UA (OPC 40100 / 40001-101 shape) from
    `inspections` and `part-verdicts`, with a ResultReady event per result, until SIGINT/SIGTERM."""
    from infra.settings import ConfigError
    from sinks.cli import _run_served, _stop_on_signals
    from sinks.opcua import OpcUaBridge, OpcUaConfig, OpcUaError, default_group, parse_users

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix, metrics_port=metrics_port)
    try:
        s.bootstrap()
        users = parse_users(users_file.read_text()) if users_file else {}
        users |= parse_users(os.environ.get("SQIS_OPCUA_USERS", ""))
        stations = []
        for x in station or []:
            line, sep, st = x.partition("/")
            if not sep or not line or not st or "/" in st:
                raise UserError(f"--station {x!r}: expected LINE/STATION")
            stations.append((line, st))
        if (cert is None) != (key is None):
            raise UserError("--cert and --key go together")
        cfg = OpcUaConfig(endpoint=endpoint, security=tuple(m.strip() for m in security.split(",") if m.strip()),
                          allow_anonymous=allow_anonymous, users=users, cert_file=cert, key_file=key,
                          cert_dir=Path(s.state_dir) / "opcua", client_certs=tuple(client_cert or ()),
                          handshake=handshake, handshake_buffer=handshake_buffer, recover_per_partition=recover,
                          stations=tuple(stations))
    except (ConfigError, OpcUaError, OSError) as exc:
        raise UserError(str(exc)) from exc
    g = group or default_group()
    bridge = OpcUaBridge(s, cfg, group_id=g)
    _stop_on_signals(bridge.stop)
    try:
        _run_served(s, bridge, {g: list(bridge.feed.topics)})
    except OpcUaError as exc:
        raise UserError(str(exc)) from exc
