"""The FastAPI application: routes, API-key auth with scopes and rate limits, problem-details errors.

``create_app(settings, api_settings)`` builds the app without touching the network; the services
(PostgreSQL pool, object store, producer, model) open in the lifespan, so the OpenAPI spec can be
generated offline (``sqis api openapi``).
"""


import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import ingest, queries
from api.config import ApiSettings
from api.errors import PROBLEM_JSON, ApiError, Problem, problem, responses
from api.keys import ApiKey, KeyStore
from api.models import AlertsOut, FrameAccepted, Health, InspectionOut, PartOut, RatesOut, Ready
from api.ratelimit import TokenBuckets, retry_after
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import serialize

log = logging.getLogger(__name__)

VERSION = "1.0.0"
_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sqis_api_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("sqis_api_request_seconds", "HTTP request time by route", ["route"],
                                 buckets=_BUCKETS_S, registry=self.registry)
        self.frames = Counter("sqis_api_frames_total", "uploads by outcome (accepted, replayed)", ["outcome"],
                              registry=self.registry)
        self.inspections = Counter("sqis_api_inspections_total", "POST /v1/inspect verdicts", ["verdict"],
                                   registry=self.registry)
        self.limited = Counter("sqis_api_rate_limited_total", "requests refused with 429", registry=self.registry)
        self.inspect_waiting = Gauge("sqis_api_inspect_in_flight", "inspections queued or running on the model",
                                     registry=self.registry)


class Services:
    """What the handlers use; opened in the lifespan (or given ready-made to create_app in tests)."""

    def __init__(self, settings: Settings, api: ApiSettings) -> None:
        from psycopg_pool import ConnectionPool

        from infra.objectstore import open_store

        self.settings, self.api = settings, api
        self.catalog = TopicCatalog(settings.topic_prefix)
        self.pool = ConnectionPool(settings.dsn(), min_size=1, max_size=api.db_pool_size, open=True,
                                   kwargs={"autocommit": True, "connect_timeout": 5,
                                           "options": "-c statement_timeout=10000"})
        self.keys = KeyStore(self.pool, api.key_cache_s)
        self.store = open_store(settings)
        if hasattr(self.store, "ensure_bucket"):
            try:
                self.store.ensure_bucket()
            except Exception as exc:  # /readyz reports it
                log.warning("cannot ensure the bucket", extra={"error": str(exc)})
        self.delivery = ingest.Delivery(settings, f"sqis-api-{socket.gethostname()}")
        self.model: Any = None
        self.model_error = "disabled (SQIS_API_LOAD_MODEL=false)"
        if api.load_model:
            from api.inspect import load_model

            try:
                self.model = load_model(settings, store=self.store)
                self.model_error = ""
            except Exception as exc:  # the upload and read paths work without it; /readyz says why
                self.model_error = f"{type(exc).__name__}: {exc}"
                log.error("no model: POST /v1/inspect answers 503", extra={"error": self.model_error})
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="api-inspect")  # one detect() at a time
        self.inspect_slots = threading.BoundedSemaphore(api.inspect_queue)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.delivery.close()
        self.pool.close()


# ---- request size limit (413) and metrics, as plain ASGI middleware -----------------------------------


class _TooLarge(Exception):
    pass


class LimitsAndMetrics:
    """Refuses a body over ``max_bytes`` (Content-Length or counted while streaming) with 413, and counts
    every request by route template and status; logs one line per request, never its headers."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise _TooLarge
            seen = 0

            async def receive_wrapper() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        raise _TooLarge
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        except _TooLarge:
            if status["started"]:
                raise
            body = problem(413, "request-too-large", f"request body above {self.max_bytes} B", scope.get("path"))
            await JSONResponse(body, 413, media_type=PROBLEM_JSON, headers={"Connection": "close"})(
                scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(scope.get("method", ""), route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(dt)
            if route not in ("/healthz", "/readyz", "/metrics"):
                log.info("request", extra={"method": scope.get("method"), "route": route, "status": status["code"],
                                           "ms": round(dt * 1000, 2), "key_id": scope.get("state", {}).get("key_id")})


# ---- the app ---------------------------------------------------------------------------------------


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer sqis_<id>_<secret>")
_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, as an alternative header")

AUTH_ERRORS = (401, 403, 429)
IMAGE_DOC = "JPEG, PNG or BMP (the worker's allow-list); size and pixel budget checked from the header"


def _now_us() -> int:
    return int(time.time() * 1e6)


def _parse_captured_at(value: str | None) -> int:
    """RFC 3339 time or integer microseconds since the epoch -> µs; now when absent."""
    if value is None or value == "":
        return _now_us()
    v = value.strip()
    if v.isdigit():
        us = int(v)
    else:
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(422, "invalid-field", "captured_at: expected RFC 3339 (2026-12-07T10:00:00Z) "
                           "or microseconds since the epoch") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        try:
            us = int(dt.timestamp() * 1e6)
        except (OverflowError, OSError, ValueError):
            us = -1
    if not 0 < us < 2**62 or us > _now_us() + 86400 * 1e6:
        raise ApiError(422, "invalid-field", "captured_at out of range (after 1970, at most a day ahead)")
    return us


def create_app(settings: Settings, api: ApiSettings | None = None, *, services: Services | None = None) -> FastAPI:
    api = api or ApiSettings()
    metrics = Metrics()
    buckets = TokenBuckets()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = app.state.services is None
        if own:
            app.state.services = await asyncio.to_thread(Services, settings, api)
        try:
            yield
        finally:
            if own:
                await asyncio.to_thread(app.state.services.close)
                app.state.services = None

    app = FastAPI(
        title="SQIS API", version=VERSION, lifespan=lifespan,
        description="The HTTP door of the Smart Quality Inspection System: upload frames to the line, inspect "
                    "one image synchronously, read inspections, part verdicts, defect rates and alerts. "
                    "Errors are RFC 9457 problem details.",
        responses=responses(500),
    )
    app.state.services = services
    app.state.metrics = metrics

    def svc(request: Request) -> Services:
        s = request.app.state.services
        if s is None:
            raise ApiError(503, "starting", "the API is starting", headers={"Retry-After": "1"})
        return s  # type: ignore[no-any-return]

    def require(scope: str) -> Callable[..., ApiKey]:
        def dependency(request: Request,
                       bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
                       header_key: Annotated[str | None, Security(_header_key)] = None) -> ApiKey:
            presented = bearer.credentials if bearer is not None else header_key
            if not presented:
                raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer ...)",
                               headers={"WWW-Authenticate": "Bearer"})
            key = svc(request).keys.verify(presented)
            if key is None:
                raise ApiError(401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
            request.scope.setdefault("state", {})["key_id"] = key.key_id
            if scope not in key.scopes:
                raise ApiError(403, "forbidden", f"this key lacks the {scope!r} scope")
            wait = buckets.take(key.key_id, key.rate_per_s or api.rate_per_s, key.burst or api.burst)
            if wait > 0:
                metrics.limited.inc()
                raise ApiError(429, "rate-limited", f"rate limit of this key exceeded; retry in {wait:.2f} s",
                               headers={"Retry-After": retry_after(wait)})
            return key

        return dependency

    # -- errors as problem details
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.problem(request.url.path), exc.status, media_type=PROBLEM_JSON, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errs = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errs)[:500]
        return JSONResponse(problem(422, "invalid-request", detail, request.url.path, errs), 422, media_type=PROBLEM_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return JSONResponse(problem(exc.status_code, kind, str(exc.detail), request.url.path), exc.status_code,
                            media_type=PROBLEM_JSON, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"})
        return JSONResponse(problem(500, "internal", "internal error", request.url.path), 500, media_type=PROBLEM_JSON)

    # -- uploads
    @app.post("/v1/frames", status_code=202, response_model=FrameAccepted, tags=["ingest"],
              summary="Upload a frame to the line (stored, FrameRef published on `frames`)",
              responses=responses(401, 403, 409, 413, 415, 422, 429, 503))
    def post_frame(
        request: Request,
        image: Annotated[UploadFile, File(description=IMAGE_DOC)],
        line: Annotated[str, Form(pattern=ingest.ID_PATTERN, description="line id")],
        camera: Annotated[str, Form(pattern=ingest.ID_PATTERN, description="camera id")],
        key: Annotated[ApiKey, Depends(require("ingest"))],
        part: Annotated[str | None, Form(pattern=ingest.ID_PATTERN,
                                         description="part id (several views of one part share it)")] = None,
        trigger: Annotated[str | None, Form(pattern=ingest.ID_PATTERN, description="PLC trigger id")] = None,
        captured_at: Annotated[str | None, Form(description="RFC 3339 or µs since the epoch; default: now")] = None,
        seq: Annotated[int | None, Form(ge=0, le=2**62, description="per-camera sequence; default: captured_at in µs")] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200,
                                                       description="a retry with the same key returns the first "
                                                                   "frame_id and publishes nothing")] = None,
    ) -> Any:
        s = svc(request)
        data = image.file.read(api.max_image_bytes + 1)
        meta: dict[str, Any] = {"line_id": ingest.check_id("line", line), "camera_id": ingest.check_id("camera", camera),
                                "part_id": ingest.check_id("part", part, required=False),
                                "trigger_id": ingest.check_id("trigger", trigger, required=False),
                                "captured_at": _parse_captured_at(captured_at)}
        meta["seq"] = seq if seq is not None else meta["captured_at"]
        header = ingest.validate_image(data, max_bytes=api.max_image_bytes, max_pixels=s.settings.worker_max_pixels,
                                       encodings=_encodings(s.settings))
        if idempotency_key:
            digest = ingest.request_digest(data, meta)
            state, fid = _read(s, ingest.claim, key.key_id, idempotency_key, digest, api.idempotency_stale_s)
            if state == "replay":
                metrics.frames.labels("replayed").inc()
                return _accepted(fid, True)
        else:
            fid = str(uuid.uuid4())
        ok = False
        try:
            ingest.publish_frame(s.store, s.delivery, s.catalog.frames, meta | {"frame_id": fid}, header, data,
                                 api.publish_timeout_s)
            ok = True
        finally:
            if idempotency_key:
                _read(s, ingest.settle, key.key_id, idempotency_key, ok)
        metrics.frames.labels("accepted").inc()
        return _accepted(fid, False)

    def _accepted(fid: str, replayed: bool) -> JSONResponse:
        url = f"/v1/inspections/{fid}"
        return JSONResponse({"frame_id": fid, "replayed": replayed, "inspection_url": url}, 202, headers={"Location": url})

    # -- synchronous inspection
    @app.post("/v1/inspect", response_model=InspectionOut, tags=["inspect"],
              summary="Inspect one image now: the line's model, thresholds and verdict; recorded (source=api)",
              responses=responses(401, 403, 413, 415, 422, 429, 503, 504))
    def post_inspect(
        request: Request,
        image: Annotated[UploadFile, File(description=IMAGE_DOC)],
        key: Annotated[ApiKey, Depends(require("inspect"))],
        line: Annotated[str | None, Form(pattern=ingest.ID_PATTERN, description="line id (default 'api')")] = None,
        camera: Annotated[str | None, Form(pattern=ingest.ID_PATTERN, description="camera id (default 'api')")] = None,
        part: Annotated[str | None, Form(pattern=ingest.ID_PATTERN, description="part id")] = None,
    ) -> Any:
        t0 = time.monotonic()
        s = svc(request)
        if s.model is None:
            raise ApiError(503, "no-model", f"no model loaded: {s.model_error}", headers={"Retry-After": "30"})
        data = image.file.read(api.max_image_bytes + 1)
        now = _now_us()
        meta: dict[str, Any] = {"frame_id": str(uuid.uuid4()), "line_id": ingest.check_id("line", line or "api"),
                                "camera_id": ingest.check_id("camera", camera or "api"),
                                "part_id": ingest.check_id("part", part, required=False), "captured_at": now, "seq": now}
        header = ingest.validate_image(data, max_bytes=api.max_image_bytes, max_pixels=s.settings.worker_max_pixels,
                                       encodings=_encodings(s.settings))
        if not s.inspect_slots.acquire(blocking=False):
            raise ApiError(503, "busy", "too many inspections waiting for the model", headers={"Retry-After": "1"})
        metrics.inspect_waiting.inc()
        try:
            meta["uri"] = ingest.store_put(s.store, ingest.frame_key(meta["line_id"], meta["camera_id"], now,
                                                                     meta["frame_id"], header.encoding),
                                           data, ingest.mime(header.encoding), meta["frame_id"])
            from api.inspect import inspect_image

            fut = s.executor.submit(inspect_image, s.model, data, meta)
        except BaseException:
            s.inspect_slots.release()
            metrics.inspect_waiting.dec()
            raise

        def _release(_f: Any) -> None:
            s.inspect_slots.release()
            metrics.inspect_waiting.dec()

        fut.add_done_callback(_release)
        left = api.inspect_timeout_s - (time.monotonic() - t0)
        try:
            rec = fut.result(max(0.0, left))
        except FutureTimeout:
            raise ApiError(504, "inspect-timeout", f"no verdict within {api.inspect_timeout_s:g} s") from None
        except ApiError:
            raise
        except Exception as exc:
            from inference_workers.fetch import FrameError

            if isinstance(exc, FrameError):
                raise ApiError(422, "corrupt-image", str(exc)) from None
            log.error("inspection failed", extra={"frame_id": meta["frame_id"], "error": f"{type(exc).__name__}: {exc}"})
            raise ApiError(503, "model-failed", "the model failed on this image", headers={"Retry-After": "1"}) from None
        value, headers = serialize("inspection", rec)
        left = max(0.5, api.inspect_timeout_s - (time.monotonic() - t0))
        s.delivery.send(s.catalog.inspections, rec["camera_id"].encode(), value, headers + [ingest.SOURCE_HEADER],
                        min(left, api.publish_timeout_s), meta["frame_id"])
        metrics.inspections.labels(rec["verdict"]).inc()
        return rec | {"source": "api"}

    # -- reads from PostgreSQL
    @app.get("/v1/inspections/{frame_id}", response_model=InspectionOut, tags=["read"],
             summary="The inspection of a frame; ?wait=S long-polls until the line has inspected it",
             responses=responses(401, 403, 404, 422, 429, 503))
    async def get_inspection(
        request: Request,
        frame_id: Annotated[uuid.UUID, Path(description="the frame_id POST /v1/frames returned")],
        key: Annotated[ApiKey, Depends(require("read"))],
        wait: Annotated[float, Query(ge=0, le=300, description="seconds to wait for it (capped by SQIS_API_MAX_WAIT_S)")] = 0,
    ) -> Any:
        s = svc(request)
        deadline = time.monotonic() + min(wait, api.max_wait_s)
        fid = str(frame_id)
        while True:
            row = await asyncio.to_thread(_read, s, queries.inspection, fid)
            if row is not None:
                return row
            if time.monotonic() >= deadline or await request.is_disconnected():
                raise ApiError(404, "not-found", f"no inspection of frame {fid} (yet)")
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    @app.get("/v1/parts/{part_id}", response_model=PartOut, tags=["read"], summary="A part's verdict over its views",
             responses=responses(401, 403, 404, 422, 429, 503))
    def get_part(request: Request, part_id: Annotated[str, Path(max_length=200)],
                 key: Annotated[ApiKey, Depends(require("read"))]) -> Any:
        row = _read(svc(request), queries.part, part_id)
        if row is None:
            raise ApiError(404, "not-found", "no verdict for this part (yet)")
        return row

    @app.get("/v1/lines/{line_id}/rates", response_model=RatesOut, tags=["read"],
             summary="Defect rates of a line per window over a look-back",
             responses=responses(401, 403, 422, 429, 503))
    def get_rates(request: Request, line_id: Annotated[str, Path(max_length=200)],
                  key: Annotated[ApiKey, Depends(require("read"))],
                  window: Annotated[str, Query(max_length=20, description="look-back: 30s, 15m, 1h, 7d")] = "1h",
                  bucket_s: Annotated[int, Query(ge=1, le=86400, description="window length")] = 60) -> Any:
        return _read(svc(request), queries.rates, line_id, queries.parse_window(window), bucket_s)

    @app.get("/v1/alerts", response_model=AlertsOut, tags=["read"], summary="Alerts, newest first",
             responses=responses(401, 403, 422, 429, 503))
    def get_alerts(request: Request, key: Annotated[ApiKey, Depends(require("read"))],
                   state: Annotated[str | None, Query(pattern="^(open|acknowledged|resolved)$")] = None,
                   line: Annotated[str | None, Query(max_length=200)] = None,
                   limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Any:
        return {"alerts": _read(svc(request), queries.alerts, state, line, limit)}

    # -- operations
    @app.get("/healthz", response_model=Health, tags=["ops"], summary="The process is alive")
    def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, tags=["ops"], summary="Broker, database, store and model answer",
             responses={503: {"model": Ready, "description": "not ready"}})
    def readyz(request: Request) -> Any:
        checks = readiness(request.app.state.services, api)
        ok = all(v in ("ok", "disabled") for v in checks.values())
        return JSONResponse({"status": "ready" if ok else "unready", "checks": checks}, 200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(LimitsAndMetrics, max_bytes=api.max_request_bytes, metrics=metrics)  # type: ignore[arg-type]
    _ = Problem  # in the spec through responses()
    return app


def readiness(s: Services | None, api: ApiSettings) -> dict[str, str]:
    """broker, database, store, model: 'ok' or why not ('disabled' for a model not asked for)."""
    if s is None:
        return {"startup": "starting"}
    checks = {"broker": s.delivery.ready(s.catalog.frames) or "ok", "database": "ok", "store": "ok",
              "model": "ok" if s.model is not None else ("disabled" if not api.load_model else s.model_error)}
    try:
        with s.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        checks["database"] = f"{type(exc).__name__}"
    try:
        s.store.put(f"_health/api-{socket.gethostname()}", b"ok", "text/plain")
    except Exception as exc:
        checks["store"] = f"{type(exc).__name__}"
    return checks


def _encodings(settings: Settings) -> tuple[str, ...]:
    return tuple(e.strip().lower() for e in settings.worker_image_encodings.split(",") if e.strip())


def _read(s: Services, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        with s.pool.connection(timeout=5) as conn:
            return fn(conn, *args)
    except ApiError:
        raise
    except Exception as exc:
        log.warning("database read failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise ApiError(503, "database-unavailable", "the database did not answer; retry later",
                       headers={"Retry-After": "2"}) from None


def openapi_json(app: FastAPI) -> str:
    """The spec as committed in docs/openapi.json (sorted keys, 2-space indent, trailing newline)."""
    import json

    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
