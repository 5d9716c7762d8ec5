"""Object-store sink on the moto S3 server (and file://): overlays and crops for every FAIL, an
hourly Parquet archive that a redelivered batch rewrites identically (no duplicates)."""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from infra.objectstore import open_store
from sinks.objects import decode_rle, merge_parquet, render_overlay
from tests.stream_fixtures import inspection, produce_inspections

MASK = {"height": 96, "width": 128, "counts": [96 * 20 + 10, 20, 76, 20, 96 * 128], "area": 40}


def _frame(store: Any, name: str) -> str:
    img = np.full((96, 128, 3), 90, np.uint8)
    cv2.circle(img, (40, 30), 10, (200, 200, 200), -1)
    ok, jpg = cv2.imencode(".jpg", img)
    assert ok
    return store.put(f"frames/{name}.jpg", jpg.tobytes(), "image/jpeg")


def _records(uri: str) -> list[dict[str, Any]]:
    t0 = 1_795_000_000_000_000
    return [
        inspection(line="L1", cam="C1", captured_at=t0, fail=True, image_uri=uri, boxes=[(20, 15, 60, 45), (70, 50, 90, 80)]),
        inspection(line="L1", cam="C1", captured_at=t0 + 1000, fail=True, image_uri=uri, mask=MASK, cls="dent"),
        inspection(line="L1", cam="C1", captured_at=t0 + 2000, image_uri=uri),
        inspection(line="L1", cam="C1", captured_at=t0 + 3000, fail=True, image_uri="s3://nowhere/missing.jpg"),
    ]


def _run(s: Any, group: str) -> Any:
    from sinks.objects import ObjectSink

    sink = ObjectSink(s, group_id=group, flush_s=0.0)
    stats = sink.run(max_idle_s=3)
    return sink, stats


def test_s3_overlays_crops_and_archive_survive_redelivery(settings_factory: Any, s3_endpoint: str, unique_id: str) -> None:
    s = settings_factory(object_store_url=f"s3://b-{unique_id}/sqis", s3_endpoint_url=s3_endpoint,
                         aws_access_key_id="testing", aws_secret_access_key="testing")
    store = open_store(s)
    store.ensure_bucket()  # type: ignore[union-attr]
    recs = _records(_frame(store, "f1"))
    produce_inspections(s, recs)
    _, stats = _run(s, f"o1-{unique_id}")
    assert (stats.overlays, stats.crops, stats.image_missing) == (2, 3, 1)
    keys = store.list("")
    overlays = [k for k in keys if "/overlays/" in k]
    assert sorted(k.rsplit("/", 1)[1] for k in overlays) == sorted(f"{r['frame_id']}.jpg" for r in recs[:2])
    assert len([k for k in keys if "/crops/" in k]) == 3
    archive = [k for k in keys if "/archive/inspections/date=2026-11-18/hour=" in k]
    assert len(archive) == 1
    first = {k: store.get(k) for k in keys if "/frames/" not in k}
    table = pq.read_table(io.BytesIO(first[archive[0]]))
    assert sorted(table.column("frame_id").to_pylist()) == sorted(r["frame_id"] for r in recs)

    # redelivery: the same records again on the topic, and a second group re-reading everything
    produce_inspections(s, recs)
    _run(s, f"o2-{unique_id}")
    again = {k: store.get(k) for k in store.list("") if "/frames/" not in k}
    assert again.keys() == first.keys()
    assert again == first  # same objects, same bytes: no duplicate row in the archive
    assert pq.read_table(io.BytesIO(again[archive[0]])).num_rows == 4


def test_file_store_and_overlay_pixels(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory()
    store = open_store(s)
    recs = _records(_frame(store, "f2"))[1:2]
    produce_inspections(s, recs)
    _, stats = _run(s, f"o-{unique_id}")
    assert stats.overlays == 1
    ov = [k for k in store.list("overlays")]
    img = cv2.imdecode(np.frombuffer(store.get(ov[0]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (96, 128, 3)


def test_mask_decoding_and_overlay_tint() -> None:
    m = decode_rle(MASK)
    assert m.shape == (96, 128) and m.sum() == 40 and m[10:30, 20:22].all()
    rec = inspection(line="L", cam="C", captured_at=0, fail=True, mask=MASK, boxes=[(0, 0, 5, 5)])
    img = np.full((96, 128, 3), 100, np.uint8)
    out = render_overlay(img, rec)
    assert (out[20, 21] != img[20, 21]).any() and (out[90, 120] == img[90, 120]).all()


def test_archive_merge_is_deterministic_and_deduplicates() -> None:
    from sinks.objects import archive_row

    rows = [archive_row(inspection(line="L", cam="C", captured_at=1_000_000 + i)) for i in range(5)]
    a, n = merge_parquet(None, rows[:3])
    b, _ = merge_parquet(a, rows[1:])
    c, _ = merge_parquet(None, list(reversed(rows)))
    assert n == 3 and b == c
