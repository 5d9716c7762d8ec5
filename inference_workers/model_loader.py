"""Resolve MLflow model URIs to local ONNX files, and hot-swap the detector when an alias moves.

Needs mlflow (imported lazily) but never torch or ultralytics.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from inference_workers.detector import Detector, DetectorError, Thresholds, make_session

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_MODEL", "THRESHOLDS_TAG", "ModelWatcher", "ResolvedModel", "calibrated_thresholds", "demo_model_path",
    "load_detector", "mlflow_client", "parse_model_uri", "resolve_model", "resolve_version", "sidecar_thresholds",
]

# The committed demo model, found relative to this package (not the working directory), so a worker
# started by systemd from / finds it too.
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.onnx"


def demo_model_path() -> Path | None:
    """The demo model file when it is present (a source checkout), else None."""
    return DEMO_MODEL if DEMO_MODEL.is_file() else None


THRESHOLDS_TAG = "sqis.thresholds"  # model-version tag: the calibrated operating point (JSON, `sqis calibrate`)
SIDECAR_SUFFIX = ".thresholds.json"  # next to a plain .onnx file: model.onnx -> model.thresholds.json

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


@dataclass(frozen=True)
class ResolvedModel:
    """A registry model version available as a local ONNX file."""

    uri: str
    name: str
    version: str
    path: Path


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@alias -> (NAME, alias, None); models:/NAME/VERSION -> (NAME, None, VERSION)."""
    m = _URI.match(uri)
    if not m:
        raise DetectorError(f"{uri!r} is not models:/NAME@alias or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def mlflow_client(settings: Settings, tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient on the tracking/registry store of these settings (sqlite under the state dir by default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from factory machines
    from mlflow import MlflowClient

    uri = tracking_uri or settings.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(name, version) that a models:/ URI points at now; asks the registry."""
    name, alias, version = parse_model_uri(uri)
    if alias is not None:
        mv = client.get_model_version_by_alias(name, alias)
        return name, str(mv.version)
    if version is not None and version.lower() == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise DetectorError(f"registered model {name!r} has no versions")
        return name, str(max(int(v.version) for v in versions))
    return name, str(version)


def cache_dir(settings: Settings) -> Path:
    return settings.state_dir / "model_cache"


def _cached_onnx(dest: Path) -> Path | None:
    found = sorted(dest.rglob("*.onnx")) if dest.is_dir() else []
    return found[0] if found else None


def download_version(settings: Settings, client: MlflowClient, name: str, version: str) -> Path:
    """The ONNX file of NAME/VERSION in the local cache (downloaded once; a version never changes).

    Safe when several workers on one host share the state dir: each downloads into its own temporary
    directory and the first atomic rename wins; the others use the winner's copy.
    """
    import tempfile

    import mlflow.artifacts

    dest = cache_dir(settings) / name / version
    found = _cached_onnx(dest)
    if found is not None:
        return found
    mv = client.get_model_version(name, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=dest.parent))
    try:
        # the version's source (run artifacts), through the client's own store: not the global registry URI
        mlflow.artifacts.download_artifacts(
            artifact_uri=str(mv.source), dst_path=str(tmp), tracking_uri=client.tracking_uri,
        )
        if not list(tmp.rglob("*.onnx")):
            raise DetectorError(f"model {name}/{version} (source {mv.source}) has no .onnx file")
        try:
            tmp.rename(dest)
        except OSError:  # dest exists: another process finished first, or a broken leftover
            if _cached_onnx(dest) is None:
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _cached_onnx(dest)
    if found is None:
        raise DetectorError(f"model {name}/{version}: cache {dest} has no .onnx file")
    return found


def resolve_model(settings: Settings, uri: str, client: MlflowClient | None = None) -> ResolvedModel:
    """models:/NAME@alias or models:/NAME/VERSION -> the local ONNX file, name and version."""
    client = client or mlflow_client(settings)
    try:
        name, version = resolve_version(client, uri)
        path = download_version(settings, client, name, version)
    except DetectorError:
        raise
    except Exception as exc:  # mlflow raises MlflowException / RestException / OSError
        raise DetectorError(f"cannot resolve {uri}: {exc}") from exc
    return ResolvedModel(uri=uri, name=name, version=version, path=path)


def calibrated_thresholds(client: MlflowClient, name: str, version: str) -> Thresholds | None:
    """The operating point `sqis calibrate` stored with NAME/VERSION (tag THRESHOLDS_TAG), or None."""
    import json

    mv = client.get_model_version(name, str(version))
    raw = (mv.tags or {}).get(THRESHOLDS_TAG)
    if not raw:
        return None
    try:
        return Thresholds.from_dict(json.loads(raw), source=f"calibrated:models:/{name}/{version}")
    except (ValueError, TypeError, AttributeError) as exc:
        raise DetectorError(f"model {name}/{version}: unreadable {THRESHOLDS_TAG} tag: {exc}") from exc


def sidecar_path(model_path: Path | str) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def sidecar_thresholds(model_path: Path | str) -> Thresholds | None:
    """The operating point stored next to a plain .onnx file (model.thresholds.json), or None."""
    import json

    side = sidecar_path(model_path)
    if not side.is_file():
        return None
    try:
        return Thresholds.from_dict(json.loads(side.read_text()), source=f"calibrated:file:{side}")
    except (ValueError, TypeError, AttributeError) as exc:
        raise DetectorError(f"{side}: unreadable thresholds file: {exc}") from exc


def default_thresholds(settings: Settings, model_uri: str, name: str | None, version: str | None,
                       path: Path | str, client: MlflowClient | None = None) -> Thresholds:
    """What a model is served at when the user set no thresholds: its calibrated operating point if it has
    one (registry tag, or a sidecar file next to a plain .onnx), else the defaults."""
    if name is not None and version is not None and model_uri.startswith("models:/"):
        found = calibrated_thresholds(client or mlflow_client(settings), name, version)
    else:
        found = sidecar_thresholds(path)
    return found or Thresholds()


class ModelWatcher:
    """Holds the current Detector; maybe_reload() swaps it when the URI's alias points to a new version.

    Call maybe_reload() between batches (it polls the registry at most every poll_s), or start()
    a background thread that prepares the new model so the swap in maybe_reload() is instant.
    A registry that is down is logged and the current model is kept.
    """

    def __init__(self, settings: Settings, model_uri: str, thresholds: Thresholds | None = None, poll_s: float = 30.0,
                 *, check: Callable[[Detector], object] | None = None) -> None:
        self.settings = settings
        self.check = check  # also must accept a new version (the worker: its segmenter can be built from it)
        self.model_uri = model_uri
        # None: each version is served at its own calibrated operating point (or the defaults)
        self.calibrated = thresholds is None
        self.thresholds = thresholds or Thresholds()
        self.poll_s = poll_s
        self._watch = model_uri.startswith("models:/") and parse_model_uri(model_uri)[1] is not None
        self._current = load_detector(settings, model_uri, thresholds)
        self._pending: Detector | None = None
        self._lock = threading.Lock()
        self._last_poll = time.monotonic()
        self._client: MlflowClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.rejected: tuple[str, str] | None = None  # (name, version) that failed to load: skipped until the alias moves

    @property
    def current(self) -> Detector:
        return self._current

    def _check(self) -> Detector | None:
        """A Detector for a newer version than the current one, or None; never raises.

        A version that cannot be served (no ONNX file, per-class thresholds it lacks, warmup fails)
        is rejected once and skipped until the alias points elsewhere.
        """
        try:
            if self._client is None:
                self._client = mlflow_client(self.settings)
            name, version = resolve_version(self._client, self.model_uri)
        except Exception as exc:
            return self._registry_failed(exc)
        with self._lock:
            have = self._pending or self._current
        if version == have.version and name == have.name:
            return None
        if (name, version) == self.rejected:
            return None
        self.rejected = None  # the alias moved
        try:
            path = download_version(self.settings, self._client, name, version)
            thr = self.thresholds
            if self.calibrated:  # the new version's own operating point
                thr = default_thresholds(self.settings, self.model_uri, name, version, path, self._client)
        except DetectorError as exc:  # the version itself is unusable (no .onnx file, unreadable thresholds tag)
            return self._reject(name, version, exc)
        except Exception as exc:
            return self._registry_failed(exc)
        try:
            from inference_workers.detector import make_session

            session = make_session(path, self.settings.onnx_providers, self.settings.onnx_threads)
            det = Detector(session, thr, name=name, version=version, max_det=self._current.max_det,
                           path=str(path))
            det.warmup()
            if self.check is not None:
                self.check(det)
            return det
        except Exception as exc:
            return self._reject(name, version, exc)

    def _registry_failed(self, exc: Exception) -> None:
        self.failures += 1
        log.warning("model registry check failed; keeping the current model",
                    extra={"model_uri": self.model_uri, "model_version": self._current.version, "error": str(exc)})

    def _reject(self, name: str, version: str, exc: Exception) -> None:
        self.rejected = (name, version)
        log.error(f"model v{version} rejected: {exc}; keeping the current model", extra={
            "model_uri": self.model_uri, "model_name": name, "rejected_version": version,
            "model_version": self._current.version, "error": str(exc)})

    def maybe_reload(self, force: bool = False) -> bool:
        """Swap to a newer version if one is ready (background) or due to be polled (foreground)."""
        if not self._watch:
            return False
        new: Detector | None = None
        if self._thread is not None:
            new = self._pending
        elif force or time.monotonic() - self._last_poll >= self.poll_s:
            self._last_poll = time.monotonic()
            new = self._check()
        if new is None:
            return False
        with self._lock:  # swap atomically: the thread's _check must never see neither old nor new
            if self._pending is new:
                self._pending = None
            old, self._current = self._current, new
        log.info("model swapped", extra={"model_uri": self.model_uri, "model_name": new.name,
                                         "old_version": old.version, "model_version": new.version})
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            det = self._check()
            if det is not None:
                with self._lock:
                    self._pending = det

    def start(self) -> ModelWatcher:
        """Poll in a daemon thread; maybe_reload() then only swaps what the thread prepared."""
        if self._watch and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ModelWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_detector(
    settings: Settings, model_uri: str, thresholds: Thresholds | None = None, *, max_det: int = 300,
) -> Detector:
    """A Detector for a local .onnx path or an MLflow URI (models:/NAME@alias, models:/NAME/VERSION).

    thresholds None: the model's calibrated operating point (`sqis calibrate`) if it has one, else defaults.
    """
    name = version = None
    if model_uri.startswith(("models:/", "runs:/")):
        resolved = resolve_model(settings, model_uri)
        path, name, version = resolved.path, resolved.name, resolved.version
    else:
        path = Path(model_uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise DetectorError(f"model file {path} does not exist")
    if thresholds is None:
        try:
            thresholds = default_thresholds(settings, model_uri, name, version, path)
        except DetectorError:
            raise
        except Exception as exc:  # registry errors
            raise DetectorError(f"cannot read the calibrated thresholds of {model_uri}: {exc}") from exc
    t0 = time.perf_counter()
    session = make_session(path, settings.onnx_providers, settings.onnx_threads, fp16=settings.onnx_fp16,
                           engine_cache_dir=settings.onnx_engine_cache_dir or settings.state_dir / "trt-cache",
                           device_id=settings.onnx_device_id)
    det = Detector(session, thresholds, name=name, version=version, max_det=max_det, path=str(path))
    log.info(
        "detector loaded",
        extra={"model_uri": model_uri, "model_name": det.name, "model_version": det.version, "imgsz": det.imgsz,
               "providers": det.providers, "thresholds_source": thresholds.source,
               "load_ms": round((time.perf_counter() - t0) * 1000, 1)},
    )
    return det
