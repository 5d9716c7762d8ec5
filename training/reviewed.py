"""Reviewed frames (marked on the dashboard) -> the internal dataset format (training/datasets.py), for retraining.

A confirmed defect keeps the model's boxes (and masks as polygons in labels-seg) as labels; a false reject becomes
a defect-free image, so the next model learns not to fire on it; a missed defect (a frame the model passed) is
labelled with its record's boxes plus the candidate boxes it was queued with (review_queue.candidates: the
sub-threshold detections, or the challenger's boxes), and skipped when it has none (labels would be a guess). Classes are the ones seen in the
reviewed set, ordered by the model's class ids."""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from psycopg.rows import dict_row

from inference_workers.detections import rle_decode
from infra.db import connect
from infra.objectstore import ObjectNotFound, open_store
from infra.settings import Settings
from training.datasets import Box, DatasetCard, DatasetError, Sample, SourceDataset, write_dataset

log = logging.getLogger(__name__)


_REVIEWED = (
    "SELECT i.frame_id, i.line_id, i.camera_id, i.image_uri, i.width, i.height, r.decision, r.reviewed_at,"
    " (SELECT coalesce(json_agg(json_build_object('class_id', d.class_id, 'class_name', d.class_name,"
    "  'x1', d.x1, 'y1', d.y1, 'x2', d.x2, 'y2', d.y2, 'mask_rle', d.mask_rle) ORDER BY d.idx), '[]'::json)"
    "  FROM defects d WHERE d.frame_id = i.frame_id) AS defects,"
    " coalesce(q.candidates, '[]'::jsonb) AS candidates"
    " FROM inspection_reviews r JOIN inspections i ON i.frame_id = r.frame_id"
    " LEFT JOIN review_queue q ON q.frame_id = r.frame_id"
    " WHERE r.reviewed_at >= %(since)s ORDER BY r.reviewed_at, i.frame_id")


def reviewed(conn: Any, since: datetime | None = None) -> list[dict[str, Any]]:
    """Every reviewed frame (oldest first) with its image URI, size, decision, boxes and queued candidates."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_REVIEWED, {"since": since or datetime(1970, 1, 1, tzinfo=UTC)})
        return list(cur.fetchall())


def export_reviewed(settings: Settings, out: Path, *, since: datetime | None = None, seed: int = 0,
                    force: bool = False) -> DatasetCard:
    store = open_store(settings)
    with connect(settings.dsn()) as conn:
        rows = reviewed(conn, since)
    if not rows:
        raise DatasetError("no reviewed frames yet (mark frames on the dashboard's Defects page)")
    ids = sorted({(d["class_id"], d["class_name"]) for r in rows for d in _labels(r, boxes_only=False)})
    classes = [name for _, name in ids] or ["defect"]
    index = {cid: i for i, (cid, _) in enumerate(ids)}
    with tempfile.TemporaryDirectory(prefix="sqis-reviewed-") as tmp:
        samples, missing, unlabelled = [], 0, 0
        for r in rows:
            if r["decision"] == "missed_defect" and not _labels(r):
                unlabelled += 1
                continue
            ext = Path(r["image_uri"]).suffix.lower() or ".jpg"
            p = Path(tmp) / f"{r['frame_id']}{ext}"
            try:
                p.write_bytes(store.get(r["image_uri"]))
            except ObjectNotFound:
                missing += 1
                continue
            confirmed = _labels(r)
            boxes = [Box(index[d["class_id"]], max(0.0, d["x1"]), max(0.0, d["y1"]), min(r["width"], d["x2"]),
                         min(r["height"], d["y2"])) for d in confirmed]
            polygons = [(index[d["class_id"]], poly) for d in confirmed if d.get("mask_rle")
                        for poly in [_outline(d["mask_rle"])] if poly is not None]
            samples.append(Sample(key=str(r["frame_id"]), name=str(r["frame_id"]), image=p, width=r["width"],
                                  height=r["height"], boxes=boxes, polygons=polygons))
        if not samples:
            raise DatasetError(f"none of the {len(rows)} reviewed frames can be exported ({missing} no longer in the "
                               f"object store, {unlabelled} missed defects without candidate boxes)")
        notes = [f"exported from dashboard reviews: {sum(r['decision'] == 'confirmed' for r in rows)} confirmed, "
                 f"{sum(r['decision'] == 'false_reject' for r in rows)} false rejects (as defect-free images)"]
        missed = sum(r["decision"] == "missed_defect" for r in rows)
        if missed:
            notes.append(f"{missed - unlabelled} missed defects (labelled with their candidate boxes)")
        if unlabelled:
            notes.append(f"{unlabelled} missed defect(s) without candidate boxes skipped (label them by hand)")
        if missing:
            notes.append(f"{missing} reviewed frame(s) no longer in the object store were skipped")
        ds = SourceDataset(format="sqis-reviews", source=Path(tmp), classes=classes, samples=samples, notes=notes)
        card = write_dataset(ds, out, seed=seed, force=force)
    log.info("reviewed frames exported", extra={"out": str(out), "images": card.total_images})
    return card


def _labels(r: dict[str, Any], *, boxes_only: bool = True) -> list[dict[str, Any]]:
    """The boxes a reviewed frame is labelled with: its record's for a confirmed defect, those plus its
    queued candidates for a missed defect, none for a false reject (``boxes_only`` False: every box the
    row has, for the class list)."""
    cands = [c for c in r.get("candidates") or [] if isinstance(c, dict) and {"class_id", "x1", "y1", "x2", "y2"} <= c.keys()]
    cands = [{"class_name": str(c.get("class_name", c["class_id"])), "mask_rle": None} | c for c in cands]
    if not boxes_only:
        return [*r["defects"], *cands]
    if r["decision"] == "confirmed":
        return list(r["defects"])
    if r["decision"] == "missed_defect":
        return [*r["defects"], *cands]
    return []


def _outline(rle: dict[str, Any]) -> np.ndarray | None:
    """The largest outer contour of a COCO-RLE mask as an Nx2 float polygon (labels-seg), or None."""
    import cv2

    try:
        m = rle_decode(rle).astype(np.uint8)
    except (KeyError, TypeError, ValueError):
        return None
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    return c if len(c) >= 3 else None
