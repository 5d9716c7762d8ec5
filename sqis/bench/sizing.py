"""Retention and sizing arithmetic from measured record sizes (docs/RUNBOOK.md, `sqis metrics sizing`).

Measured here, not guessed: the JPEG size of synthetic frames at the camera resolution, the Avro
size of a FrameRef and of an Inspection (with and without defects), and, given a PostgreSQL, the
on-disk bytes per inspection row including its indexes (a temporary copy of the real table).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from schemas.catalog import TOPICS
from schemas.serde import serialize

_US = 1_764_000_000_000_000


def _payload(out: Any) -> bytes:
    return out[0] if isinstance(out, tuple) else out


def frame_ref(i: int, width: int, height: int, size: int) -> dict[str, Any]:
    return {"frame_id": str(uuid.uuid4()), "line_id": "line-1", "camera_id": f"cam-{i % 24:02d}", "seq": i,
            "captured_at": _US + i, "uri": f"s3://frames/line-1/cam-{i % 24:02d}/2026/12/01/{uuid.uuid4()}.jpg",
            "width": width, "height": height, "encoding": "jpeg", "content_sha256": "ab" * 32,
            "part_id": f"P-{i}", "trigger_id": None, "size_bytes": size, "truth": []}


def inspection(i: int, n_defects: int, width: int, height: int) -> dict[str, Any]:
    dets = [{"class_id": k % 3, "class_name": ("scratch", "dent", "spot")[k % 3], "score": 0.61 + k / 100,
             "x1": 10.0 + k, "y1": 20.0, "x2": 60.0, "y2": 90.0, "mask": None} for k in range(n_defects)]
    return {
        "frame_id": str(uuid.uuid4()), "line_id": "line-1", "camera_id": f"cam-{i % 24:02d}", "seq": i,
        "part_id": f"P-{i}", "captured_at": _US + i, "inspected_at": _US + i + 40_000,
        "image_uri": f"s3://frames/line-1/cam-{i % 24:02d}/2026/12/01/{uuid.uuid4()}.jpg",
        "width": width, "height": height, "model_name": "sqis-detector", "model_version": "12",
        "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {"scratch": 0.4}},
        "verdict": "FAIL" if dets else "PASS", "detections": dets,
        "timings": {"queue_ms": 3.1, "fetch_ms": 4.2, "decode_ms": 2.5, "infer_ms": 18.7, "postprocess_ms": 0.9,
                    "segment_ms": 0.0, "total_ms": 31.4},
        "batch_size": 8, "worker_id": "worker-7f9c-1", "source_partition": i % 12, "source_offset": 10_000_000 + i,
    }


@dataclass
class Sizing:
    cameras: int
    fps_per_camera: float
    width: int
    height: int
    jpeg_quality: int
    defect_share: float
    jpeg_bytes: float  # measured mean
    frame_ref_bytes: float
    inspection_bytes: float  # mean over the defect share
    pg_bytes_per_row: float | None  # with indexes and defects rows; None without a database
    frames_per_day: float
    object_store_gb_per_day: float
    kafka_frames_gb_per_day: float  # before replication, before compression
    kafka_inspections_gb_per_day: float
    postgres_gb_per_day: float | None

    def as_json(self) -> str:
        return json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()})


def measure(cameras: int, fps: float, width: int, height: int, *, jpeg_quality: int = 90,
            defect_share: float = 0.1, samples: int = 20, dsn: str | None = None, rows: int = 2000) -> Sizing:
    """Measure the record sizes and scale them to a day of ``cameras`` x ``fps``."""
    import cv2

    from producers.synthetic import render_part

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(samples):
        img, _ = render_part(rng, width, height, defect_rate=defect_share)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok
        jpegs.append(len(buf))
    jpeg = float(np.mean(jpegs))
    ref = float(np.mean([len(_payload(serialize("frame_ref", frame_ref(i, width, height, int(jpeg)))))
                         for i in range(samples)]))
    n_fail = max(1, int(samples * defect_share))
    insp_pass = np.mean([len(_payload(serialize("inspection", inspection(i, 0, width, height)))) for i in range(samples)])
    insp_fail = np.mean([len(_payload(serialize("inspection", inspection(i, 2, width, height)))) for i in range(n_fail)])
    insp = float((1 - defect_share) * insp_pass + defect_share * insp_fail)
    per_day = cameras * fps * 86_400
    pg_row = pg_bytes_per_row(dsn, rows, defect_share, width, height) if dsn else None
    gb = 1e9
    return Sizing(cameras, fps, width, height, jpeg_quality, defect_share, jpeg, ref, insp, pg_row, per_day,
                  per_day * jpeg / gb, per_day * ref / gb, per_day * insp / gb,
                  None if pg_row is None else per_day * pg_row / gb)


def pg_bytes_per_row(dsn: str, rows: int, defect_share: float, width: int, height: int) -> float:
    """Bytes per inspection on disk (heap + indexes + TOAST, defects included), in temporary copies of
    the real tables so nothing of the production schema is touched."""
    from infra.db import connect
    from sinks.postgres import DEFECT_COLS, INSPECTION_COLS, to_rows

    with connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE sz_inspections (LIKE inspections INCLUDING ALL)")
        conn.execute("CREATE TEMP TABLE sz_defects (LIKE defects INCLUDING ALL)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY sz_inspections ({', '.join(INSPECTION_COLS)}) FROM STDIN") as cp_i:
                defects = []
                for i in range(rows):
                    row, d = to_rows(inspection(i, 2 if (i % 100) < defect_share * 100 else 0, width, height))
                    cp_i.write_row(row)
                    defects += d
            with cur.copy(f"COPY sz_defects ({', '.join(DEFECT_COLS)}) FROM STDIN") as cp_d:
                for d in defects:
                    cp_d.write_row(d)
            cur.execute("ANALYZE sz_inspections")
            cur.execute("SELECT pg_total_relation_size('sz_inspections') + pg_total_relation_size('sz_defects')")
            total = cur.fetchone()[0]  # type: ignore[index]
        conn.rollback()
    return total / rows


def retention_days(topic_key: str) -> float:
    return TOPICS[topic_key].retention_ms / 86_400_000
