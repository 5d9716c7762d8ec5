"""Dataset versions: every dataset the project writes is logged to MLflow as a versioned dataset.

A version is identified by its *content digest*: the sha256 of the class names and of every file under
images/, labels/, masks/ and labels-seg/ (split, name and bytes), so the same content always gets the
same digest whatever its path or creation time, and the card (which records both) is left out. Each
new digest of a dataset NAME becomes version N+1: one MLflow run in the ``sqis-datasets`` experiment
with the dataset logged as an input (``mlflow.data``: digest, source, a profile of splits and class
counts) and the card as artifacts. Logging content that is already a version returns that version.
Model versions record the digest they were trained on (tag ``dataset_digest``) and calibrated on
(``calibration_dataset_digest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.datasets import SPLITS, DatasetError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from infra.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENT = "sqis-datasets"
CONTENT_DIRS = ("images", "labels", "masks", "labels-seg")
DIGEST_CHARS = 32  # MLflow's datasets.digest column holds 36 characters
TAG = "sqis.dataset"  # tag prefix of a dataset-version run


@dataclass(frozen=True)
class DatasetVersion:
    """One version of a dataset, as `sqis data versions NAME` lists it."""

    name: str
    version: int
    digest: str
    operation: str  # import | synth | tile | export-reviewed | merge
    path: str
    source: str
    created_at: str
    images: dict[str, int]
    classes: dict[str, int]  # boxes per class, all splits
    skipped: int
    parents: list[str]  # digests this version was made from (tile, merge)
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _classes(root: Path) -> list[str]:
    import yaml

    p = root / "data.yaml"
    if not p.is_file():
        raise DatasetError(f"{root}: not an imported dataset (no data.yaml)")
    names = (yaml.safe_load(p.read_text()) or {}).get("names", {})
    return [str(v) for _, v in sorted(names.items())] if isinstance(names, dict) else [str(v) for v in names]


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_digest(root: Path | str) -> str:
    """The dataset's content digest (class names + every data file's split, name and bytes)."""
    root = Path(root)
    h = hashlib.sha256(json.dumps(_classes(root)).encode())
    for kind in CONTENT_DIRS:
        for sp in SPLITS:
            d = root / kind / sp
            if not d.is_dir():
                continue
            for f in sorted(x for x in d.iterdir() if x.is_file() and not x.name.endswith(".cache")):
                h.update(f"{kind}/{sp}/{f.name}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()[:DIGEST_CHARS]


def _card(root: Path) -> dict[str, Any]:
    p = root / "card.json"
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, ValueError):
        return {}


def _profile(root: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Images per split and boxes per class, counted from the files (every writer's card differs)."""
    names = _classes(root)
    images: dict[str, int] = {}
    boxes = dict.fromkeys(names, 0)
    for sp in SPLITS:
        d = root / "images" / sp
        images[sp] = sum(1 for x in d.iterdir() if x.is_file()) if d.is_dir() else 0
        for lbl in (root / "labels" / sp).glob("*.txt"):
            for line in lbl.read_text().splitlines():
                parts = line.split()
                if parts and parts[0].isdigit() and int(parts[0]) < len(names):
                    boxes[names[int(parts[0])]] += 1
    return {"images": images, "classes": boxes, "skipped": len(card.get("skipped", []))}


def _from_run(run: Any) -> DatasetVersion:
    t = run.data.tags
    profile = json.loads(t.get(f"{TAG}.profile", "{}"))
    return DatasetVersion(
        name=t[f"{TAG}.name"], version=int(t[f"{TAG}.version"]), digest=t[f"{TAG}.digest"],
        operation=t.get(f"{TAG}.operation", ""), path=t.get(f"{TAG}.path", ""), source=t.get(f"{TAG}.source", ""),
        created_at=datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(timespec="seconds"),
        images=profile.get("images", {}), classes=profile.get("classes", {}), skipped=int(profile.get("skipped", 0)),
        parents=[p for p in t.get(f"{TAG}.parents", "").split(",") if p], run_id=run.info.run_id)


def list_dataset_versions(client: MlflowClient, name: str) -> list[DatasetVersion]:
    """NAME's versions, oldest first (none when the experiment or the name is unknown)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}.name` = '{_quote(name)}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return sorted((_from_run(r) for r in runs), key=lambda v: v.version)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def dataset_input(root: Path, digest: str, name: str, context: str) -> Any:
    """The `mlflow.data` record of a dataset directory, for ``client.log_inputs``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    card = _card(root)
    ds = Dataset(name=name, digest=digest, source_type="local",
                 source=json.dumps({"uri": root.resolve().as_uri(), "card_source": card.get("source", "")}),
                 schema=json.dumps({"classes": card.get("classes", [])}), profile=json.dumps(_profile(root, card)))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def log_dataset_version(settings: Settings, root: Path | str, name: str | None = None, *, operation: str,
                        parents: list[str] | None = None, tracking_uri: str | None = None) -> tuple[DatasetVersion, bool]:
    """Log the dataset at ROOT as a version of NAME (default: the folder's name); returns the version and
    whether it is new (False: this content already was a version of NAME)."""
    from mlflow.entities import Param, RunStatus

    from training.registry import client_for, ensure_experiment

    root = Path(root).resolve()
    name = name or root.name
    digest = content_digest(root)
    client = client_for(settings, tracking_uri)
    versions = list_dataset_versions(client, name)
    same = next((v for v in versions if v.digest == digest), None)
    if same is not None:
        return same, False
    card = _card(root)
    profile = _profile(root, card)
    version = max((v.version for v in versions), default=0) + 1
    exp_id = ensure_experiment(client, settings, EXPERIMENT)
    tags = {"sqis.kind": "dataset-version", f"{TAG}.name": name, f"{TAG}.version": str(version),
            f"{TAG}.digest": digest, f"{TAG}.operation": operation, f"{TAG}.path": str(root),
            f"{TAG}.source": str(card.get("source", "")), f"{TAG}.parents": ",".join(parents or []),
            f"{TAG}.profile": json.dumps(profile)}
    run = client.create_run(exp_id, run_name=f"{name}-v{version}", tags=tags)
    try:
        client.log_inputs(run.info.run_id, datasets=[dataset_input(root, digest, name, operation)])
        params = [Param(f"images.{sp}", str(n)) for sp, n in profile["images"].items()]
        params += [Param(f"boxes.{c}"[:250], str(n)) for c, n in profile["classes"].items()]
        if params:
            client.log_batch(run.info.run_id, params=params[:100])
        for f in ("card.json", "CARD.md"):
            if (root / f).is_file():
                client.log_artifact(run.info.run_id, str(root / f), "dataset")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        client.delete_run(run.info.run_id)
        raise
    log.info("dataset version logged", extra={"dataset": name, "version": version, "digest": digest})
    return _from_run(client.get_run(run.info.run_id)), True


def dataset_root_of(data_yaml: Path) -> Path:
    """The dataset directory of a (possibly rewritten) data.yaml: its `path`, else its folder."""
    import yaml

    cfg = yaml.safe_load(Path(data_yaml).read_text()) or {}
    root = Path(cfg.get("path") or Path(data_yaml).parent)
    return root if (root / "data.yaml").is_file() else Path(data_yaml).parent


def record_input(client: MlflowClient, run_id: str, data: Path | str, context: str, tag: str | None = None) -> str | None:
    """Log the dataset behind DATA (a dataset dir or its data.yaml) as an input of a run, with its
    digest as tag ``tag``; returns the digest (None, logged, when the dataset cannot be read)."""
    p = Path(data)
    root = p if p.is_dir() else dataset_root_of(p)
    try:
        digest = content_digest(root)
    except (OSError, DatasetError) as exc:
        log.warning("dataset digest unavailable", extra={"data": str(data), "error": str(exc)})
        return None
    client.log_inputs(run_id, datasets=[dataset_input(root, digest, root.name, context)])
    if tag:
        client.set_tag(run_id, tag, digest)
    return digest
