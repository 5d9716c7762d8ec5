"""Find (and repair) frames lost between the durable ends: the object store and PostgreSQL.

The local broker keeps messages in memory only, so frames acknowledged just before it stops can be
lost (#8 item 12). The object store and PostgreSQL are durable: a frame whose object exists but has
no inspection (and is not dead-lettered) was lost on the way; an inspection whose object is gone
points at nothing. ``republish`` sends a FrameRef again for each lost frame, with the same frame_id,
so the sinks stay effectively-once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from infra.db import connect
from infra.objectstore import ObjectStore
from infra.settings import Settings
from schemas.catalog import TopicCatalog

log = logging.getLogger(__name__)

# frames/<line>/<camera>/<YYYY>/<MM>/<DD>/<frame_id>.<ext>, as producers/publisher.object_key writes them
_KEY = re.compile(r"frames/(?P<line>[^/]+)/(?P<camera>[^/]+)/\d{4}/\d{2}/\d{2}/"
                  r"(?P<fid>[0-9a-fA-F-]{36})\.(?P<ext>[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class FrameObject:
    uri: str
    frame_id: str
    line_id: str
    camera_id: str
    stored_at_us: int  # the object's modification time (≈ capture time: producers upload at once)


@dataclass
class ReconcileReport:
    checked: int = 0  # frame objects in the window
    missing: list[FrameObject] = field(default_factory=list)  # no inspection, not dead-lettered
    dead_lettered: list[FrameObject] = field(default_factory=list)  # no inspection, but in the DLQ
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (frame_id, image_uri) with no object

    @property
    def clean(self) -> bool:
        return not self.missing and not self.orphans


def frame_objects(store: ObjectStore, since_us: int, until_us: int) -> tuple[list[FrameObject], set[str]]:
    """Frame objects stored in [since, until), and every frame URI of the store (for the orphan check)."""
    base = store.url.rstrip("/") + "/"
    found: list[FrameObject] = []
    every: set[str] = set()
    for uri, mtime in store.entries("frames/"):
        every.add(uri)
        m = _KEY.search(uri[len(base):] if uri.startswith(base) else uri)
        t_us = int(mtime * 1e6)
        if m and since_us <= t_us < until_us:
            found.append(FrameObject(uri, m["fid"].lower(), m["line"], m["camera"], t_us))
    return found, every


def find_gaps(settings: Settings, store: ObjectStore, *, since_us: int, until_us: int | None = None,
              grace_s: float = 60.0, dead_lettered_ids: Iterable[str] = ()) -> ReconcileReport:
    """Compare the store with the inspections table over [since, until - grace)."""
    until = min(until_us or 2**62, int((time.time() - grace_s) * 1e6))
    objs, every = frame_objects(store, since_us, until)
    report = ReconcileReport(checked=len(objs))
    dlq = {f.lower() for f in dead_lettered_ids if f}
    have: set[str] = set()
    with connect(settings.dsn(), autocommit=True) as conn:
        ids = [o.frame_id for o in objs]
        for i in range(0, len(ids), 5000):
            rows = conn.execute("SELECT frame_id::text FROM inspections WHERE frame_id = ANY(%s::uuid[])",
                                (ids[i:i + 5000],)).fetchall()
            have |= {r[0] for r in rows}
        # inspections of this deployment's store (image_uri under its URL) whose object is gone
        like = store.url.rstrip("/").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
        for fid, uri in conn.execute(
                "SELECT frame_id::text, image_uri FROM inspections WHERE captured_at >= to_timestamp(%s) "
                "AND captured_at < to_timestamp(%s) AND image_uri LIKE %s ORDER BY captured_at",
                (since_us / 1e6, until / 1e6, like)):
            if uri not in every and not store.exists(uri):
                report.orphans.append((fid, uri))
    for o in objs:
        if o.frame_id in have:
            continue
        (report.dead_lettered if o.frame_id in dlq else report.missing).append(o)
    return report


def frame_ref_for(store: ObjectStore, obj: FrameObject) -> dict[str, Any]:
    """A FrameRef rebuilt from the object itself: ids from its key, size/format/hash from its bytes,
    captured_at from its storage time; seq, part_id and truth are not recoverable (0 / None)."""
    from PIL import Image

    data = store.get(obj.uri)
    with Image.open(io.BytesIO(data)) as im:  # header only
        (w, h), fmt = im.size, (im.format or "jpeg").lower()
    return {
        "frame_id": obj.frame_id, "line_id": obj.line_id, "camera_id": obj.camera_id, "seq": 0,
        "captured_at": obj.stored_at_us, "uri": obj.uri, "width": w, "height": h,
        "encoding": "jpeg" if fmt in ("jpeg", "mpo") else fmt, "content_sha256": hashlib.sha256(data).hexdigest(),
        "part_id": None, "trigger_id": None, "size_bytes": len(data), "truth": None,
    }


def republish(settings: Settings, store: ObjectStore, objs: Iterable[FrameObject], *,
              timeout_s: float = 30.0) -> int:
    """Send a FrameRef for each object to the frames topic (key camera_id); returns the count acked."""
    from infra.kafka import BrokerUnavailable, KafkaError, Message
    from infra.kafka import producer as make_producer
    from schemas.serde import serialize

    topic = TopicCatalog(settings.topic_prefix).frames
    p = make_producer(settings, client_id="sqis-reconcile")
    acked: list[str] = []
    failed: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        (failed if err is not None else acked).append(err.str() if err is not None else "ok")

    for obj in objs:
        value, headers = serialize("frame_ref", frame_ref_for(store, obj))
        headers.append(("sqis-republished-by", b"reconcile"))
        p.produce(topic, value=value, key=obj.camera_id.encode(), headers=headers, on_delivery=on_delivery)
        p.poll(0)
    left = p.flush(timeout_s)
    if left or failed:
        raise BrokerUnavailable(f"republish: {len(acked)} sent, {left} unacknowledged, {len(failed)} failed")
    log.info("frames republished", extra={"frames": len(acked), "topic": topic})
    return len(acked)
