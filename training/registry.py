"""MLflow model registry helpers: register an ONNX model, promote an alias, list versions, resolve URIs.

Tracking and registry share one store (settings.tracking_uri(): sqlite under the state dir by
default) with artifacts under settings.artifact_root(). Needs mlflow only (no torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_workers.model_loader import ResolvedModel, download_version, mlflow_client, resolve_model
from training.errors import TrainingError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPERIMENT", "EXPORT_FILE", "MODEL_ARTIFACT_DIR", "ModelVersionInfo", "ResolvedModel",
    "ensure_experiment", "export_version", "list_models", "list_versions", "mlflow_client", "promote", "register_onnx",
    "resolve_model",
]

DEFAULT_EXPERIMENT = "sqis-detector"
MODEL_ARTIFACT_DIR = "model"  # <run artifacts>/model/model.onnx: the source of the first version registered from a run
EXPORT_FILE = "mlflow_export.json"
DATASET_DIGEST_TAG = "dataset_digest"  # content digest of the dataset a run / model version was trained on
CALIBRATION_DIGEST_TAG = "calibration_dataset_digest"


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version, as `sqis model list` shows it."""

    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    created_ms: int
    tags: dict[str, str]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "aliases": self.aliases, "run_id": self.run_id,
                "created_ms": self.created_ms, "tags": self.tags, "source": self.source}


def ensure_experiment(client: MlflowClient, settings: Settings, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, creating it with artifacts under the state dir (not ./mlruns)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    return str(client.create_experiment(name, artifact_location=f"{settings.artifact_root()}/{name}"))


def register_onnx(
    client: MlflowClient, run: Run | str, onnx_path: Path | str, name: str, tags: dict[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register a new version of NAME whose artifact is the run's `model/model.onnx`; returns the version.

    A run registered again (a second version, or under another name) gets a folder of its own,
    `model-2/model.onnx`, `model-3/...`: an earlier version's file is never overwritten.
    The version is created first so its number can be stamped into the ONNX metadata
    (sqis_model_name / sqis_model_version) before the file is uploaded; a failed upload deletes it.
    """
    import shutil
    import tempfile

    from mlflow.exceptions import MlflowException

    run_obj = client.get_run(run) if isinstance(run, str) else run
    run_id = run_obj.info.run_id
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="SQIS surface-defect detector (YOLOv8, ONNX)")
    artifact_dir = _free_artifact_dir(client, run_id, run_obj.info.artifact_uri.rstrip("/"))
    source = f"{run_obj.info.artifact_uri.rstrip('/')}/{artifact_dir}"
    tags = dict(tags or {})
    run_tags = client.get_run(run_id).data.tags  # fresh: tags set since the Run object was made
    if run_tags.get(DATASET_DIGEST_TAG):  # the dataset version the run trained on
        tags.setdefault(DATASET_DIGEST_TAG, run_tags[DATASET_DIGEST_TAG])
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
        description=description,
    )
    version = str(mv.version)
    try:
        with tempfile.TemporaryDirectory(prefix="sqis-register-") as tmp:
            dst = Path(tmp) / "model.onnx"
            shutil.copyfile(onnx_path, dst)
            _stamp(dst, name, version)
            client.log_artifact(run_id, str(dst), artifact_dir)
    except BaseException:
        client.delete_model_version(name, version)
        raise
    log.info("model registered", extra={"model_name": name, "model_version": version, "run_id": run_id,
                                        "artifact_path": artifact_dir})
    return version


def _free_artifact_dir(client: MlflowClient, run_id: str, artifact_uri: str) -> str:
    """The run's folder for the next registered file: `model` (MODEL_ARTIFACT_DIR) unless a version
    (of any name) already has it as its source, then `model-2`, `model-3`, ... Each version keeps its
    own file: a second registration from one run would otherwise overwrite the first one's model.onnx."""
    taken = {str(mv.source).rstrip("/") for mv in client.search_model_versions(f"run_id='{run_id}'")}
    n = 1
    while True:
        folder = MODEL_ARTIFACT_DIR if n == 1 else f"{MODEL_ARTIFACT_DIR}-{n}"
        if f"{artifact_uri}/{folder}" not in taken:
            return folder
        n += 1


def _stamp(onnx_path: Path, name: str, version: str) -> None:
    """Write the registry name/version into the ONNX metadata (needs the onnx package)."""
    try:
        from training.export import set_metadata

        set_metadata(onnx_path, sqis_model_name=name, sqis_model_version=version)
    except ImportError:
        log.warning("onnx not installed: registered file keeps its old name/version metadata")


def promote(client: MlflowClient, name: str, version: str | int, alias: str = "production") -> None:
    """Point NAME@alias at VERSION (the serving side's ModelWatcher picks it up)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise TrainingError(f"model {name!r} has no version {version}") from None
    client.set_registered_model_alias(name, alias, str(version))
    log.info("alias set", extra={"model_name": name, "alias": alias, "model_version": str(version)})


def list_models(client: MlflowClient) -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(rm.name for rm in client.search_registered_models())


def list_versions(client: MlflowClient, name: str) -> list[ModelVersionInfo]:
    """Every version of NAME, newest first, with its aliases and tags."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        raise TrainingError(f"no registered model named {name!r}") from None
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    out = [
        ModelVersionInfo(
            name=name, version=str(mv.version), aliases=sorted(by_version.get(str(mv.version), [])),
            run_id=mv.run_id, created_ms=int(mv.creation_timestamp or 0), tags=dict(mv.tags or {}),
            source=str(mv.source),
        )
        for mv in client.search_model_versions(f"name='{name}'")
    ]
    return sorted(out, key=lambda v: int(v.version), reverse=True)


def export_version(settings: Settings, name: str, version: str | int, out_dir: Path | str) -> Path:
    """Write out_dir/mlflow_export.json: NAME/VERSION's aliases, tags, its source run's params, final
    metrics and per-epoch metric history, and the registered ONNX file's sha256; returns its path."""
    import hashlib
    import json
    import os

    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    try:
        mv = client.get_model_version(name, str(version))
        rm = client.get_registered_model(name)
    except MlflowException:
        raise TrainingError(f"model {name!r} has no version {version}") from None
    version = str(mv.version)
    run_doc: dict[str, Any] | None = None
    params: dict[str, str] = {}
    metrics: dict[str, float] = {}
    history: dict[str, list[dict[str, Any]]] = {}
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
        except MlflowException:
            log.warning("source run of the model version is gone", extra={"model_name": name,
                                                                          "model_version": version, "run_id": mv.run_id})
        else:
            run_doc = {"run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
                       "status": run.info.status, "start_ms": run.info.start_time, "end_ms": run.info.end_time,
                       "tags": {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.")}}
            params = dict(sorted(run.data.params.items()))
            metrics = {k: run.data.metrics[k] for k in sorted(run.data.metrics)}
            history = {
                key: [{"step": int(m.step), "value": float(m.value), "timestamp_ms": int(m.timestamp)}
                      for m in sorted(client.get_metric_history(mv.run_id, key), key=lambda m: (m.step, m.timestamp))]
                for key in metrics
            }
    try:
        onnx_path = download_version(settings, client, name, version)
    except Exception as exc:  # mlflow / artifact store errors
        raise TrainingError(f"cannot fetch the artifact of {name}/{version}: {exc}") from None
    sha = hashlib.sha256()
    with onnx_path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    doc = {
        "name": name, "version": version,
        "aliases": sorted(a for a, v in (rm.aliases or {}).items() if str(v) == version),
        "run_id": mv.run_id, "created_ms": int(mv.creation_timestamp or 0), "description": mv.description or "",
        "tags": dict(sorted((mv.tags or {}).items())),
        "artifact": {"source": str(mv.source), "file": onnx_path.name, "size_bytes": onnx_path.stat().st_size,
                     "sha256": sha.hexdigest()},
        "run": run_doc, "params": params, "metrics": metrics, "metric_history": history,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / EXPORT_FILE
    tmp = target.with_name(f".{EXPORT_FILE}.partial")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, target)
    log.info("model version exported", extra={"model_name": name, "model_version": version, "path": str(target)})
    return target


def client_for(settings: Settings, tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient for these settings (alias of model_loader.mlflow_client)."""
    return mlflow_client(settings, tracking_uri)
