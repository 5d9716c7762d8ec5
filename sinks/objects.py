"""Object-store sink: for every FAIL an overlay image (boxes, labels, masks when present) and one crop
per defect; and an hourly Parquet archive of all inspections. Works on file:// and s3://.

Idempotent by construction: object keys derive from the frame (overlays, crops) or from the hour and
source partition (archive), and an archive file is rewritten as the union of what it held and the new
rows, de-duplicated by frame_id and sorted, so a redelivery rewrites the same objects with the same
bytes. Offsets are committed only after the buffered archive rows are written.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np

from infra.consume_loop import ConsumeLoop, RetryLater
from infra.kafka import Message
from infra.objectstore import ObjectNotFound, ObjectStoreError, open_store
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import source_label
from schemas.serde import SchemaError, deserialize

log = logging.getLogger(__name__)

ARCHIVE_PREFIX = "archive/inspections"
COLORS = [(0, 0, 255), (0, 200, 255), (255, 0, 200), (0, 255, 0), (255, 128, 0), (128, 0, 255)]


def _day_path(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y/%m/%d")


def overlay_key(rec: dict[str, Any]) -> str:
    return f"overlays/{rec['line_id']}/{rec['camera_id']}/{_day_path(rec['captured_at'])}/{rec['frame_id']}.jpg"


def crop_key(rec: dict[str, Any], i: int, cls: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in cls)
    return f"crops/{rec['line_id']}/{rec['camera_id']}/{_day_path(rec['captured_at'])}/{rec['frame_id']}-{i}-{safe}.png"


def archive_key(hour_us: int, partition: int) -> str:
    d = datetime.fromtimestamp(hour_us / 1e6, UTC)
    return f"{ARCHIVE_PREFIX}/date={d:%Y-%m-%d}/hour={d:%H}/part-{partition:03d}.parquet"


def decode_rle(mask: dict[str, Any]) -> np.ndarray:
    """COCO uncompressed RLE (column-major, starting with zeros) -> HxW bool array."""
    h, w = int(mask["height"]), int(mask["width"])
    counts = np.asarray(mask["counts"], dtype=np.int64)
    vals = np.zeros(len(counts), dtype=bool)
    vals[1::2] = True
    flat = np.repeat(vals, counts)[: h * w]
    flat = np.pad(flat, (0, h * w - len(flat)))
    return flat.reshape((w, h)).T


def render_overlay(img: np.ndarray, rec: dict[str, Any]) -> np.ndarray:
    """The frame with each detection's mask (tinted), box and 'class score' label."""
    out = img.copy() if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    for i, d in enumerate(rec["detections"]):
        color = COLORS[d["class_id"] % len(COLORS)]
        if d.get("mask"):
            m = decode_rle(d["mask"])
            if m.shape != out.shape[:2]:
                m = cv2.resize(m.astype(np.uint8), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
            tint = np.zeros_like(out)
            tint[:] = color
            out[m] = (0.55 * out[m] + 0.45 * tint[m]).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in (d["x1"], d["y1"], d["x2"], d["y2"]))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        cv2.putText(out, f"{i}:{d['class_name']} {d['score']:.2f}", (x1, max(10, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, color, 1, cv2.LINE_AA)
    return out


def crops(img: np.ndarray, rec: dict[str, Any], pad: int = 8) -> list[tuple[int, str, np.ndarray]]:
    h, w = img.shape[:2]
    out = []
    for i, d in enumerate(rec["detections"]):
        x1, y1 = max(0, int(d["x1"]) - pad), max(0, int(d["y1"]) - pad)
        x2, y2 = min(w, int(np.ceil(d["x2"])) + pad), min(h, int(np.ceil(d["y2"])) + pad)
        if x2 > x1 and y2 > y1:
            out.append((i, d["class_name"], img[y1:y2, x1:x2]))
    return out


ARCHIVE_COLUMNS = (
    "frame_id", "line_id", "camera_id", "seq", "part_id", "captured_at", "inspected_at", "image_uri", "width",
    "height", "model_name", "model_version", "verdict", "n_defects", "detections_json", "verdict_rules",
    "thresholds_json", "timings_json", "brightness", "contrast", "sharpness", "max_score", "worker_id",
    "source_partition", "source_offset",
)


def archive_row(rec: dict[str, Any]) -> dict[str, Any]:
    st = rec.get("image_stats") or {}
    return {
        "frame_id": rec["frame_id"], "line_id": rec["line_id"], "camera_id": rec["camera_id"], "seq": rec["seq"],
        "part_id": rec.get("part_id"), "captured_at": rec["captured_at"], "inspected_at": rec["inspected_at"],
        "image_uri": rec["image_uri"], "width": rec["width"], "height": rec["height"], "model_name": rec["model_name"],
        "model_version": rec["model_version"], "verdict": rec["verdict"], "n_defects": len(rec["detections"]),
        "detections_json": json.dumps(rec["detections"], sort_keys=True),
        "verdict_rules": list(rec.get("verdict_rules") or []),
        "thresholds_json": json.dumps(rec["thresholds"], sort_keys=True),
        "timings_json": json.dumps(rec["timings"], sort_keys=True),
        "brightness": st.get("brightness"), "contrast": st.get("contrast"), "sharpness": st.get("sharpness"),
        "max_score": st.get("max_score"), "worker_id": rec["worker_id"],
        "source_partition": rec["source_partition"], "source_offset": rec["source_offset"],
    }


def _schema() -> Any:
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    types = {"seq": pa.int64(), "captured_at": ts, "inspected_at": ts, "width": pa.int32(), "height": pa.int32(),
             "n_defects": pa.int32(), "verdict_rules": pa.list_(pa.string()), "brightness": pa.float32(),
             "contrast": pa.float32(), "sharpness": pa.float32(), "max_score": pa.float32(),
             "source_partition": pa.int32(), "source_offset": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in ARCHIVE_COLUMNS])


def merge_parquet(existing: bytes | None, rows: list[dict[str, Any]]) -> tuple[bytes, int]:
    """The union of an archive file and new rows: one row per frame_id (newest inspection wins),
    sorted by (captured_at, frame_id); deterministic bytes for the same set of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    merged: dict[str, dict[str, Any]] = {}
    if existing:
        for r in pq.read_table(io.BytesIO(existing)).to_pylist():
            for c in ("captured_at", "inspected_at"):
                v = r[c]
                r[c] = int(v.timestamp() * 1e6) if isinstance(v, datetime) else v
            merged[r["frame_id"]] = r
    for r in rows:
        old = merged.get(r["frame_id"])
        if old is None or old["inspected_at"] <= r["inspected_at"]:
            merged[r["frame_id"]] = r
    ordered = sorted(merged.values(), key=lambda r: (r["captured_at"], r["frame_id"]))
    table = pa.Table.from_pylist(ordered, schema=_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True, store_schema=True)
    return buf.getvalue(), len(ordered)


@dataclass
class ObjectSinkStats:
    consumed: int = 0
    overlays: int = 0
    crops: int = 0
    image_missing: int = 0
    archive_writes: int = 0
    archived_rows: int = 0
    errors: int = 0


class ObjectSink:
    """Consumes inspections (group ``sink-objects``) into the object store."""

    def __init__(self, settings: Settings, *, group_id: str = "sink-objects", store_url: str | None = None,
                 flush_s: float = 60.0, jpeg_quality: int = 90, retries: int = 3) -> None:
        self.store = open_store(settings, store_url)
        if hasattr(self.store, "ensure_bucket"):
            self.store.ensure_bucket()
        self.flush_s = flush_s
        self.jpeg_quality = jpeg_quality
        self.retries = retries
        self.stats = ObjectSinkStats()
        self.buffer: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)  # (hour, partition) -> rows
        self._last_flush = time.monotonic()
        self.stop_event = threading.Event()
        self.loop = ConsumeLoop(settings, topics=[TopicCatalog(settings.topic_prefix).inspections], group_id=group_id,
                                client_id=f"{group_id}-{uuid.uuid4().hex[:6]}", on_batch=self._batch,
                                on_tick=self._tick, on_stop=self._stop, with_producer=False, defer_commit=True,
                                stop_event=self.stop_event, tick_s=1.0, name="sink objects")

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, max_idle_s: float | None = None) -> ObjectSinkStats:
        self.loop.run(max_idle_s=max_idle_s)
        log.info("object sink stopped", extra=self.stats.__dict__)
        return self.stats

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        delay = 0.2
        for attempt in range(1, self.retries + 1):
            try:
                self.store.put(key, data, content_type)
                return
            except ObjectStoreError as exc:
                self.stats.errors += 1
                if attempt == self.retries:
                    # the store is down: the loop rewinds the batch and retries it after a pause (the
                    # archive merge keeps one row per frame_id, images are rewritten under the same keys)
                    raise RetryLater(f"object store write failed for {key}: {exc}") from None
                time.sleep(delay)
                delay *= 2

    def _batch(self, msgs: list[Message], loop: Any) -> None:
        for m in msgs:
            where = source_label(m.topic(), m.partition(), m.offset())
            try:
                rec = deserialize("inspection", m.value(), m.headers())
            except SchemaError as exc:
                log.warning("undecodable inspection skipped", extra={"at": where, "error": str(exc)})
                continue
            self.stats.consumed += 1
            ts = int(rec["captured_at"])
            self.buffer[(ts - ts % 3_600_000_000, m.partition())].append(archive_row(rec))
            if rec["verdict"] == "FAIL" and rec["detections"]:
                self.write_images(rec, where)

    def write_images(self, rec: dict[str, Any], where: str = "") -> None:
        try:
            data = self.store.get(rec["image_uri"])
        except (ObjectNotFound, ObjectStoreError) as exc:
            self.stats.image_missing += 1
            log.warning("frame image unavailable, no overlay", extra={"frame_id": rec["frame_id"], "at": where,
                                                                      "error": str(exc)})
            return
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            self.stats.image_missing += 1
            log.warning("frame image undecodable, no overlay", extra={"frame_id": rec["frame_id"], "at": where})
            return
        ok, jpg = cv2.imencode(".jpg", render_overlay(img, rec), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if ok:
            self._put(overlay_key(rec), jpg.tobytes(), "image/jpeg")
            self.stats.overlays += 1
        for i, cls, crop in crops(img, rec):
            ok, png = cv2.imencode(".png", crop)
            if ok:
                self._put(crop_key(rec, i, cls), png.tobytes(), "image/png")
                self.stats.crops += 1

    def flush_archive(self) -> None:
        for (hour, part), rows in sorted(self.buffer.items()):
            key = archive_key(hour, part)
            try:
                existing: bytes | None = self.store.get(key)
            except ObjectNotFound:
                existing = None
            data, n = merge_parquet(existing, rows)
            self._put(key, data, "application/vnd.apache.parquet")
            self.stats.archive_writes += 1
            self.stats.archived_rows += len(rows)
            log.debug("archive written", extra={"key": key, "rows": n})
        self.buffer.clear()
        self._last_flush = time.monotonic()

    def _tick(self, loop: Any) -> None:
        if self.buffer and time.monotonic() - self._last_flush >= self.flush_s:
            self.flush_archive()
            loop.request_commit()
        elif not self.buffer:
            loop.request_commit()  # everything consumed is written (images are written inline)

    def _stop(self, loop: Any) -> None:
        self.flush_archive()
        loop.request_commit()
