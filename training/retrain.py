"""`sqis retrain`: reviewed frames -> a new dataset version -> a fine-tuned challenger, gated against production.

The loop (issue #21 §3), each step through the project's own code:

1. export the frames reviewed on the dashboard since ``since`` (default: since the @production version was
   registered) — training/reviewed.py;
2. merge them into the base dataset (content-hash dedup, reviewed frames in train/val only, so the base's
   test split stays frozen) and log the result as a new version of the base's dataset name —
   training/merge.py, training/dataset_versions.py;
3. fine-tune from the @production version's checkpoint (its run's ``weights/*.pt`` artifact), export,
   parity-check and register a new version, *without* an alias — training/train.py;
4. calibrate the new version's operating point on the merged val split — training/calibrate.py;
5. gate it against @production (training/evaluate.py, both at their own operating points) on the frozen
   test split and on the reviewed frames: no class's AP@0.5 lower by more than ``margin`` and the image
   recall at the operating point not lower (by more than ``recall_slack``);
6. pass: alias @challenger (settings.challenger_alias; shadow / canary pick it up). Refused: the version is
   tagged ``sqis.retrain.refused`` with the reasons, and no alias moves.

The figures are tags (``sqis.retrain.*``) on the new version and metrics (``gate/...``) on its run.

``base`` names the dataset to extend: a dataset directory (internal format), a dataset NAME logged with
`sqis data ...` (its newest version), ``NAME@vN`` (version N) or ``NAME@DIGEST-PREFIX``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.errors import ParityBlocked, TrainingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["FINE_TUNE_ARGS", "RetrainError", "RetrainRefused", "RetrainResult", "check_gate", "open_drift_alerts",
           "resolve_base", "retrain"]

PRODUCTION_ALIAS = "production"
TAG = "sqis.retrain"  # tag prefix on the new model version
STEPS = ("export", "merge", "train", "calibrate", "gate", "register")
# A fine-tune, not a training from scratch: a small fixed learning rate, no warm-up (its bias lr of 0.1
# would undo a good checkpoint in a short run), no mosaic switch-off phase.
FINE_TUNE_ARGS: dict[str, Any] = {"optimizer": "AdamW", "lr0": 0.0001, "warmup_epochs": 0.0, "close_mosaic": 0}


class RetrainError(TrainingError):
    """The retrain cannot run as asked (no production version, no checkpoint, unknown base, new classes)."""


class RetrainRefused(ParityBlocked):  # noqa: N818 - a refusal, like QuantizeRefused: exit 1
    """The challenger missed the gate against production; the message carries the figures."""


@dataclass
class RetrainResult:
    """What one retrain did. status: 'registered' (alias @challenger set), 'refused' (gate failed; the
    version exists, tagged refused, no alias) or 'skipped' (no open drift alert, too few reviewed frames)."""

    status: str
    version: str | None = None
    dataset_digest: str | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    name: str = ""
    production_version: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)  # name, version, path, parents, merge stats
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- inputs ---------------------------------------------------------------------------------------
def resolve_base(settings: Settings, base: str) -> tuple[Path, str, str]:
    """(dataset dir, dataset name, digest) of BASE: a directory, NAME, NAME@vN or NAME@DIGEST-PREFIX."""
    from training.dataset_versions import content_digest, list_dataset_versions
    from training.datasets import DatasetError
    from training.registry import client_for

    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "data.yaml").is_file():
            raise RetrainError(f"--base {base}: not a dataset in the internal format (no data.yaml)")
        try:
            return p.resolve(), p.resolve().name, content_digest(p)
        except DatasetError as exc:
            raise RetrainError(f"--base {base}: {exc}") from None
    name, _, sel = base.partition("@")
    versions = list_dataset_versions(client_for(settings), name)
    if not versions:
        raise RetrainError(f"--base {base}: no such directory and no dataset named {name!r} has been logged "
                           "(`sqis data versions NAME`)")
    if not sel:
        v = versions[-1]
    elif sel.lower().startswith("v") and sel[1:].isdigit():
        v = next((x for x in versions if x.version == int(sel[1:])), None)  # type: ignore[assignment]
        if v is None:
            raise RetrainError(f"--base {base}: {name} has versions 1..{versions[-1].version}")
    else:
        hits = [x for x in versions if x.digest.startswith(sel)]
        if len(hits) != 1:
            raise RetrainError(f"--base {base}: {len(hits)} versions of {name} have a digest starting with {sel!r}")
        v = hits[0]
    root = Path(v.path)
    if not (root / "data.yaml").is_file():
        raise RetrainError(f"--base {base}: {name} v{v.version} was written to {root}, which is no longer there")
    if content_digest(root) != v.digest:
        raise RetrainError(f"--base {base}: {root} has changed since it was logged as {name} v{v.version} "
                           f"(digest {v.digest}); log it again or name the directory")
    return root, name, v.digest


def _production(client: MlflowClient, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
    except MlflowException:
        raise RetrainError(f"model {name!r} has no @{PRODUCTION_ALIAS} version to fine-tune from "
                           f"(`sqis model promote {name} VERSION`)") from None


def production_checkpoint(client: MlflowClient, mv: Any, dst: Path) -> Path:
    """The @production version's training checkpoint: its run's ``weights/*.pt`` artifact, downloaded to DST."""
    import mlflow.artifacts

    where = f"{mv.name} v{mv.version}"
    if not mv.run_id:
        raise RetrainError(f"{where} has no source run, so no checkpoint to fine-tune from")
    dst.mkdir(parents=True, exist_ok=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="weights", dst_path=str(dst),
                                                       tracking_uri=client.tracking_uri))
    except Exception as exc:  # mlflow raises several types for a missing artifact
        raise RetrainError(f"{where} has no checkpoint (run {mv.run_id} artifact weights/*.pt): "
                           f"{' '.join(str(exc).split())[:200]}") from None
    pts = sorted(got.rglob("*.pt")) if got.is_dir() else ([got] if got.suffix == ".pt" else [])
    best = [p for p in pts if p.name == "best.pt"] or pts
    if not best:
        raise RetrainError(f"{where} has no checkpoint (run {mv.run_id} has no weights/*.pt artifact)")
    return best[0]


def _checkpoint_args(pt: Path, state_dir: Path) -> dict[str, Any]:
    from training.offline import import_ultralytics

    import_ultralytics(state_dir)  # unpickling the checkpoint imports ultralytics: offline settings first
    import torch

    ckpt = torch.load(str(pt), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        return {}
    out = dict(ckpt.get("train_args") or {})
    names = getattr(ckpt.get("model"), "names", None)  # {id: name} of the trained model
    if isinstance(names, dict):
        out["names"] = [str(names[k]) for k in sorted(names)]
    return out


_OPEN_DRIFT = (
    "SELECT alert_id, line_id, camera_id, class_name, rule, opened_at, message FROM alerts"
    " WHERE kind = 'drift' AND state = 'open' AND acknowledged_at IS NULL AND opened_at >= %(since)s"
    " AND (cardinality(%(lines)s::text[]) = 0 OR line_id = ANY(%(lines)s::text[]))"
    " ORDER BY opened_at DESC")


def open_drift_alerts(settings: Settings, since: datetime, lines: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Drift alerts still open (not acknowledged, not resolved) opened at/after SINCE, on LINES (all when empty)."""
    from psycopg.rows import dict_row

    from infra.db import connect

    with connect(settings.dsn()) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_OPEN_DRIFT, {"since": since, "lines": list(lines)})
        return list(cur.fetchall())


def _last_retrain(client: MlflowClient, name: str) -> datetime | None:
    """When the newest retrain of NAME that reached a decision (passed or refused) started: an alert opened
    while it trained is newer than it and triggers the next one; a retrain that failed midway (status
    pending/failed) triggers nothing, so the same alert is tried again."""
    ms = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        if tags.get(f"{TAG}.status") in ("passed", "refused"):
            started = tags.get(f"{TAG}.started_at_ms", "")
            ms.append(int(started) if started.isdigit() else int(mv.creation_timestamp or 0))
    return datetime.fromtimestamp(max(ms) / 1000, UTC) if ms else None


# ---- the gate -------------------------------------------------------------------------------------
def figures(ev: dict[str, Any]) -> dict[str, Any]:
    """The gate's figures of one evaluate() result: AP@0.5 per class (classes with ground truth), mAP@0.5,
    image recall / false-reject rate at the model's operating point."""
    op = ev["image_level"].get("at_operating") or {}
    return {"ap50": {c: _r(v["ap50"]) for c, v in ev["per_class"].items() if v.get("ap50") is not None},
            "map50": _r(ev["map50"]), "image_recall": _r(op.get("recall")), "image_frr": _r(op.get("fpr")),
            "thresholds_source": ev["thresholds"]["source"], "images": ev["images"]}


def _r(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else round(float(v), 4)


def check_gate(sets: dict[str, dict[str, dict[str, Any]]], margin: float, recall_slack: float = 0.0) -> list[str]:
    """Reasons to refuse (empty: pass). SETS: {set name: {'champion': figures, 'challenger': figures}}.

    Per set: no class's AP@0.5 below the champion's by more than MARGIN, and the image recall at the
    operating point not below the champion's by more than RECALL_SLACK (where the champion's is defined)."""
    reasons = []
    for where, f in sets.items():
        champ, chal = f["champion"], f["challenger"]
        for cls, a in champ["ap50"].items():
            b = chal["ap50"].get(cls)
            if b is None or b < a - margin - 1e-9:
                reasons.append(f"{where}: {cls} AP@0.5 {0.0 if b is None else b:.3f} vs production {a:.3f} "
                               f"(drop {a - (b or 0.0):.3f} > margin {margin:g})")
        r0, r1 = champ.get("image_recall"), chal.get("image_recall")
        if r0 is not None and (r1 is None or r1 < r0 - recall_slack - 1e-9):
            reasons.append(f"{where}: image recall at the operating point {0.0 if r1 is None else r1:.3f} "
                           f"vs production {r0:.3f}")
    return reasons


def reviewed_view(merged: Path, out: Path) -> Path | None:
    """A dataset at OUT holding only the merged dataset's reviewed frames (their labels as merged), all in
    the test split: the 'recent reviewed frames' set of the gate. None when there are none."""
    import yaml

    from training.merge import REVIEWED_PREFIX

    shutil.rmtree(out, ignore_errors=True)
    n = 0
    for sp in ("train", "val", "test"):
        for img in sorted((merged / "images" / sp).glob(f"{REVIEWED_PREFIX}*")):
            for kind, src in (("images", img), ("labels", merged / "labels" / sp / f"{img.stem}.txt")):
                if src.is_file():
                    (out / kind / "test").mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, out / kind / "test" / src.name)
            n += 1
    if not n:
        return None
    cfg = yaml.safe_load((merged / "data.yaml").read_text()) or {}
    (out / "data.yaml").write_text(yaml.safe_dump({"path": str(out.resolve()), "train": "images/test",
                                                   "val": "images/test", "test": "images/test",
                                                   "nc": cfg.get("nc"), "names": cfg.get("names")}, sort_keys=False))
    return out


@contextmanager
def output_to_stderr(state_dir: Path) -> Iterator[None]:
    """Send what training prints (Ultralytics' logger and progress bars) to stderr, so that stdout holds
    only a command's JSON."""
    import contextlib
    import logging as _logging
    import sys

    from training.offline import import_ultralytics

    import_ultralytics(state_dir)
    handlers = [h for h in _logging.getLogger("ultralytics").handlers if isinstance(h, _logging.StreamHandler)]
    saved = [h.setStream(sys.stderr) for h in handlers]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h, st in zip(handlers, saved, strict=True):
            if st is not None:
                h.setStream(st)


# ---- the loop -------------------------------------------------------------------------------------
class _Clock:
    def __init__(self, progress: bool, echo: Callable[[str], None] | None) -> None:
        self.timings: dict[str, float] = {}
        self.progress, self.echo = progress, echo

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        if self.progress and self.echo is not None:
            self.echo(f"[{STEPS.index(name) + 1}/{len(STEPS)}] {what} ...")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 2)
            log.info("retrain step done", extra={"step": name, "seconds": self.timings[name]})


def retrain(
    settings: Settings,
    *,
    name: str,
    base: str,
    since: datetime | None = None,
    epochs: int,
    imgsz: int | None = None,
    batch: int = 16,
    margin: float = 0.05,
    recall_slack: float = 0.0,
    min_reviewed: int = 1,
    if_drift: bool = False,
    lr0: float | None = None,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = True,
    drift_lines: Sequence[str] = (),
    max_fpr: float = 0.05,
    device: str = "cpu",
    echo: Callable[[str], None] | None = None,
) -> RetrainResult:
    """Run the retrain loop for registered model NAME (see the module docstring); returns the result.

    since: reviews at/after this time (default: the @production version's registration). imgsz: default
    the production checkpoint's. if_drift: only run when a drift alert is open (not acknowledged) that was
    opened since the last retrain of NAME (on drift_lines, when given); else status 'skipped'.
    min_reviewed: fewer new reviewed frames -> 'skipped'. out: working folder (reviewed export, merged
    dataset, runs, calibration) [default: STATE_DIR/retrain/NAME-TIME]. echo: where progress lines go.
    lr0: the fine-tune's learning rate instead of FINE_TUNE_ARGS' (None or 0: FINE_TUNE_ARGS').
    A refusal is returned (status 'refused'), not raised; the CLI turns it into RetrainRefused."""
    from training.registry import client_for

    if epochs < 1 or batch < 1 or min_reviewed < 0 or not 0 <= margin <= 1 or not 0 <= recall_slack <= 1:
        raise RetrainError("--epochs and --batch must be >= 1, --min-reviewed >= 0, --margin and --recall-slack "
                           "within [0, 1]")
    if imgsz is not None and (imgsz < 32 or imgsz % 32):
        raise RetrainError(f"--imgsz {imgsz}: must be a positive multiple of 32")
    started_ms = int(time.time() * 1000)  # the drift cutoff of the next --if-drift run (see _last_retrain)
    client = client_for(settings)
    prod = _production(client, name)
    result = RetrainResult(status="skipped", name=name, production_version=str(prod.version))
    clock = _Clock(progress, echo or (lambda s: log.info(s)))
    result.timings = clock.timings
    if if_drift:
        cutoff = _last_retrain(client, name) or datetime(1970, 1, 1, tzinfo=UTC)
        alerts = open_drift_alerts(settings, cutoff, drift_lines)
        if not alerts:
            result.reason = "no open drift alert" + (f" since the last retrain ({cutoff:%Y-%m-%d %H:%M} UTC)"
                                                    if cutoff.year > 1970 else "")
            log.info("retrain skipped", extra={"model_name": name, "reason": result.reason})
            return result
        result.gate["drift_alerts"] = [str(a["alert_id"]) for a in alerts[:20]]
    base_dir, ds_name, base_digest = resolve_base(settings, base)
    since = since or datetime.fromtimestamp(int(prod.creation_timestamp or 0) / 1000, UTC)
    work = Path(out or settings.state_dir / "retrain" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    result.out = str(work.resolve())
    ckpt = production_checkpoint(client, prod, work / "production")  # before any work: refuse early
    targs = _checkpoint_args(ckpt, settings.state_dir.resolve())

    from training.datasets import DatasetError

    with clock.step("export", f"exporting frames reviewed since {since:%Y-%m-%d %H:%M:%S} UTC"):
        from training.reviewed import export_reviewed

        try:
            rcard = export_reviewed(settings, work / "reviewed", since=since, seed=seed, force=True)
        except DatasetError as exc:
            rcard = None
            result.reason = f"no reviewed frames to learn from: {exc}"
    n_reviewed = rcard.total_images if rcard is not None else 0
    if n_reviewed < max(min_reviewed, 1):
        result.reason = result.reason or f"{n_reviewed} reviewed frame(s) since {since.isoformat(timespec='seconds')}" \
                                         f" (< --min-reviewed {min_reviewed})"
        log.info("retrain skipped", extra={"model_name": name, "reason": result.reason})
        return result

    with clock.step("merge", f"merging {n_reviewed} reviewed frames into {ds_name}"):
        from training.dataset_versions import content_digest, log_dataset_version
        from training.merge import merge_reviewed

        merged = work / "dataset"
        card, stats = merge_reviewed(base_dir, work / "reviewed", merged, seed=seed, force=True)
        known = targs.get("names")
        if stats["new_classes"] or (known and list(card.classes) != list(known)):
            raise RetrainError(f"{name} v{prod.version} knows the classes {known}, the merged dataset has "
                               f"{card.classes}: the gate cannot compare them; train a new model (`sqis train`)")
        if stats["added"] == 0:
            result.reason = "every reviewed frame is already in the base dataset (same bytes)"
            return result
        dv, new = log_dataset_version(settings, merged, ds_name, operation="merge",
                                      parents=[base_digest, content_digest(work / "reviewed")])
        result.dataset_digest = dv.digest
        result.dataset = {"name": ds_name, "version": dv.version, "new_version": new, "path": str(merged.resolve()),
                          "base_digest": base_digest, "images": dv.images, **stats}

    with clock.step("train", f"fine-tuning {name} v{prod.version} for {epochs} epoch(s)"):
        from training.train import train

        model = str(targs.get("model") or "yolov8n")
        model = Path(model).stem if model.endswith((".yaml", ".yml", ".pt")) else model
        if not re.fullmatch(r"(yolov8[nsmlx](-seg)?|rtdetr-[lx])", model):
            raise RetrainError(f"{name} v{prod.version} was trained from {targs.get('model')!r}: cannot tell which "
                               "architecture to fine-tune (expected yolov8n|s|m|l|x[-seg] or rtdetr-l|x)")
        trained = train(merged, model=model, imgsz=imgsz or int(targs.get("imgsz", 256)), epochs=epochs, batch=batch,
                        weights=ckpt, device=device, workers=0 if device == "cpu" else 8, seed=seed,
                        register_name=name, settings=settings, project_dir=work / "runs", run_name=f"retrain-{name}",
                        progress=progress, extra_args=FINE_TUNE_ARGS | ({"lr0": lr0} if lr0 else {}), task=str(targs.get("task") or "detect"))
        if trained.model_version is None:
            raise ParityBlocked("the fine-tuned model was not registered: its ONNX/PyTorch parity check "
                                f"{trained.parity.status if trained.parity else 'did not run'}")
        result.version = trained.model_version
        client.set_model_version_tag(name, result.version, f"{TAG}.status", "pending")
        client.set_model_version_tag(name, result.version, f"{TAG}.started_at_ms", str(started_ms))
    try:
        return _judge_and_record(settings, client, name, result, trained, prod, merged, work, clock, max_fpr=max_fpr,
                                 margin=margin, recall_slack=recall_slack)
    except BaseException as exc:  # the version must not stay "pending": say it failed (no alias was set)
        try:
            client.set_model_version_tag(name, result.version, f"{TAG}.status", "failed")
            client.set_model_version_tag(name, result.version, f"{TAG}.error", f"{type(exc).__name__}: {exc}"[:5000])
        except Exception:
            log.warning("retrain failure not tagged", extra={"model_name": name, "model_version": result.version})
        raise


def _judge_and_record(settings: Settings, client: MlflowClient, name: str, result: RetrainResult, trained: Any,
                      prod: Any, merged: Path, work: Path, clock: Any, *, max_fpr: float, margin: float,
                      recall_slack: float) -> RetrainResult:
    """Calibrate the new version, gate it against production, record the figures (and the alias on a pass)."""
    uri, prod_uri = f"models:/{name}/{result.version}", f"models:/{name}/{prod.version}"

    with clock.step("calibrate", f"calibrating v{result.version} on val"):
        from training.calibrate import calibrate

        cal = calibrate(uri, merged, "val", max_fpr=max_fpr, settings=settings, out_dir=work / "calibration",
                        store=True)
        result.gate["challenger_operating_point"] = cal.point.to_dict() if cal.point else None

    with clock.step("gate", f"gating v{result.version} against production v{prod.version}"):
        from training.evaluate import evaluate

        eval_settings = settings.model_copy(update={"onnx_providers": "cpu"})
        sets = {"test": merged}
        view = reviewed_view(merged, work / "reviewed-eval")
        if view is not None:
            sets["reviewed"] = view
        for where, data in sets.items():
            split = "test"
            result.gate[where] = {side: figures(evaluate(u, data, split, settings=eval_settings))
                                  for side, u in (("champion", prod_uri), ("challenger", uri))}
        reasons = check_gate({k: result.gate[k] for k in sets}, margin, recall_slack)
        result.gate.update(margin=margin, recall_slack=recall_slack, passed=not reasons, reasons=reasons)

    with clock.step("register", "recording the figures" + ("" if reasons else f" and setting @{settings.challenger_alias}")):
        _record(client, name, result, trained.run_id, reasons, settings.challenger_alias)
    result.status = "refused" if reasons else "registered"
    result.reason = "; ".join(reasons) if reasons else f"{name} v{result.version} is @{settings.challenger_alias}"
    (work / "retrain.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    log.info("retrain done", extra={"model_name": name, "model_version": result.version, "status": result.status,
                                    "dataset_digest": result.dataset_digest, "reasons": reasons})
    return result


def _record(client: MlflowClient, name: str, result: RetrainResult, run_id: str | None, reasons: list[str],
            alias: str) -> None:
    """Tags on the new version, gate metrics on its run; the alias on a pass."""
    from mlflow.entities import Metric

    from training.registry import promote

    assert result.version is not None
    tags = {f"{TAG}.status": "refused" if reasons else "passed", f"{TAG}.gate": json.dumps(result.gate)[:5000],
            f"{TAG}.production_version": str(result.production_version), f"{TAG}.dataset": json.dumps(
                {k: result.dataset.get(k) for k in ("name", "version", "base_digest")})}
    if reasons:
        tags[f"{TAG}.refused"] = " | ".join(reasons)[:5000]
    else:
        promote(client, name, result.version, alias)  # before the "passed" tag: a pass always has its alias
    for k, v in tags.items():
        client.set_model_version_tag(name, result.version, k, v)
    if run_id:
        ts = int(time.time() * 1000)
        ms = []
        for where in ("test", "reviewed"):
            for side, f in (result.gate.get(where) or {}).items():
                vals = {"map50": f.get("map50"), "image_recall": f.get("image_recall"),
                        **{f"ap50.{c}": v for c, v in f["ap50"].items()}}
                ms += [Metric(f"gate/{where}/{side}/{k}", float(v), ts, 0) for k, v in vals.items() if v is not None]
        ms.append(Metric("gate/passed", float(not reasons), ts, 0))
        for i in range(0, len(ms), 500):
            client.log_batch(run_id, metrics=ms[i:i + 500])
        client.set_tag(run_id, f"{TAG}.status", tags[f"{TAG}.status"])
