"""`sqis api`: serve the HTTP API, mint and revoke API keys, write the OpenAPI spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings

api_app = typer.Typer(help="The HTTP API (FastAPI + uvicorn): uploads, synchronous inspection, reads.",
                      no_args_is_help=True)
keys_app = typer.Typer(help="API keys (hashed at rest in PostgreSQL, table api_keys).", no_args_is_help=True)
api_app.add_typer(keys_app, name="keys")

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def _need_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the API needs the api extra: pip install 'sqis[api]' ({exc.name} missing)") from None


@api_app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option("--host", help="listen address [env SQIS_API_HOST]")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="[env SQIS_API_PORT]")] = None,
    no_model: Annotated[bool, typer.Option("--no-model", help="do not load the detector (POST /v1/inspect: 503)")] = False,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Serve the API until SIGTERM/Ctrl-C (uvicorn, one process; scale with replicas)."""
    _need_extra()
    import uvicorn

    from api.app import create_app
    from api.config import ApiSettings

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    over = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if no_model:
        over["load_model"] = False
    a = ApiSettings(**over)
    app = create_app(s, a)
    # like every sqis process: /metrics /healthz /readyz on SQIS_METRICS_PORT too (Prometheus, probes)
    from api.app import readiness
    from infra.metrics import serve as serve_metrics

    def ready() -> bool:
        return all(v in ("ok", "disabled") for v in readiness(app.state.services, a).values())

    health = serve_metrics(s.metrics_port, registry=app.state.metrics.registry, ready=ready)
    typer.echo(f"sqis api on http://{a.host}:{a.port} (docs at /docs, spec at /openapi.json)", err=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_config=None, access_log=False, timeout_graceful_shutdown=10)
    finally:
        if health is not None:
            health.close()


@api_app.command("openapi")
def openapi(out: Annotated[Path, typer.Option("--out", help="where to write the spec")] = SPEC) -> None:
    """Write the OpenAPI spec the server serves (committed as docs/openapi.json)."""
    _need_extra()
    from api.app import create_app, openapi_json
    from infra.settings import Settings

    out.write_text(openapi_json(create_app(Settings())))
    typer.echo(str(out))


def _conn(state_dir: Path | None) -> object:
    from infra.db import connect

    return connect(build_settings(state_dir=state_dir).dsn(), autocommit=True)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="who or what uses the key")],
    scope: Annotated[list[str], typer.Option("--scope", help="ingest | inspect | read (repeat, or comma list)")],
    rate: Annotated[float | None, typer.Option("--rate", min=0.001, help="requests/s (default SQIS_API_RATE_PER_S)")] = None,
    burst: Annotated[int | None, typer.Option("--burst", min=1, help="bucket size (default SQIS_API_BURST)")] = None,
    state_dir: StateDir = None,
) -> None:
    """Mint a key; prints it once on stdout (only its hash is stored)."""
    from api.keys import KeyRequestError, create_key

    scopes = [x for s in scope for x in s.split(",")]
    with _conn(state_dir) as conn:  # type: ignore[attr-defined]
        try:
            key, secret = create_key(conn, name, scopes, rate_per_s=rate, burst=burst)
        except KeyRequestError as exc:
            raise UserError(str(exc)) from None
    typer.echo(f"key {key.key_id} ({', '.join(sorted(key.scopes))}) for {name}; shown once:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(state_dir: StateDir = None) -> None:
    """Keys with their scopes (never a secret)."""
    from api.keys import list_keys

    with _conn(state_dir) as conn:  # type: ignore[attr-defined]
        for k in list_keys(conn):
            state = f"revoked {k['revoked_at']:%Y-%m-%d %H:%M}" if k["revoked_at"] else "active"
            typer.echo(f"{k['key_id']}  {','.join(k['scopes']):<20} {state:<24} {k['name']}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key id (sqis_<key_id>_...)")],
                state_dir: StateDir = None) -> None:
    """Revoke a key (refused within SQIS_API_KEY_CACHE_S seconds everywhere)."""
    from api.keys import revoke_key

    with _conn(state_dir) as conn:  # type: ignore[attr-defined]
        if not revoke_key(conn, key_id):
            raise UserError(f"no active key {key_id}")
    typer.echo(f"revoked {key_id}")
