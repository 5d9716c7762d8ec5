"""`sqis edge`: the gateway at the cell. Capture (producers' sources) -> resize/denoise (Preprocessor)
-> optional gate (producers/edge_gate.py) -> a bounded on-disk queue -> the uplink (MQTT or HTTP).

Store-and-forward: every frame is written to the queue (producers/spool.py: one fsynced file per
frame, bounded by bytes, the oldest evicted and counted when full) before it is sent; it leaves the
queue only when the uplink acknowledged it (MQTT PUBACK, HTTP 2xx). An uplink outage only grows the
queue; a restart resends what is queued. Each frame's id is derived from the device id and a
persistent per-device sequence (producers/edge_wire.py), so a resend is the same frame downstream.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from producers.base import Backoff, Counters, Frame, FrameSource
from producers.edge_gate import StatsGate
from producers.edge_wire import encode, frame_id_for
from producers.preprocess import Preprocessor
from producers.spool import Spool, SpoolCorrupt, SpoolEntry, SpoolEntryGone

log = logging.getLogger(__name__)

Done = Callable[[bool | None], None]  # True: delivered; False: retry later; None: refused for good


@dataclass
class EdgeStats(Counters):
    captured: int = 0
    skipped_duplicates: int = 0
    gated_good: int = 0  # called good by the gate
    gated_out: int = 0  # ... and not forwarded (not in the sample): by design, not lost
    queued: int = 0  # written to the on-disk queue
    sent: int = 0  # acknowledged by the uplink
    evicted: int = 0  # dropped from a full queue before they could be sent
    rejected: int = 0  # refused by the uplink for good (HTTP 4xx other than auth/throttling)
    resent: int = 0  # sent again after an unacknowledged attempt
    failed: int = 0  # capture/encode errors, corrupt queue files
    outages: int = 0  # times the uplink went from ready to not ready
    pending: int = 0  # frames left in the queue at the end (sent by the next run)


class SeqCounter:
    """The device's frame sequence, persistent across restarts: blocks of ``block`` numbers are
    reserved on disk before use, so a crash skips at most the rest of a block, never reuses one."""

    def __init__(self, path: Path, block: int = 1000) -> None:
        self.path, self.block = path, block
        try:
            self._next = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            self._next = 0
        self._limit = self._next
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            if self._next >= self._limit:
                self._limit = self._next + self.block
                tmp = self.path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    f.write(str(self._limit))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            n = self._next
            self._next += 1
            return n


# ---- uplinks ---------------------------------------------------------------------------------------------


class Uplink(Protocol):
    name: str

    def ready(self) -> bool: ...

    def submit(self, meta: dict[str, Any], image: bytes, done: Done) -> None: ...

    def poll(self) -> None: ...

    def close(self) -> None: ...


class MqttUplink:
    """QoS 1 publishes to ``sqis/v1/{line}/{camera}/frames``; a frame is done at its PUBACK."""

    name = "mqtt"

    def __init__(self, url: str, client_id: str, *, max_inflight: int = 50) -> None:
        from infra.mqtt import make_client

        self._waiting: list[tuple[Any, Done]] = []
        self.client = make_client(url, client_id, clean_session=False, max_inflight=max_inflight)

    def ready(self) -> bool:
        return bool(self.client.is_connected())

    def submit(self, meta: dict[str, Any], image: bytes, done: Done) -> None:
        from infra.mqtt import frames_topic

        info = self.client.publish(frames_topic(meta["line_id"], meta["camera_id"]), encode(meta, image), qos=1)
        self._waiting.append((info, done))

    def poll(self) -> None:
        still = []
        for info, done in self._waiting:
            try:
                published = info.is_published()
            except (RuntimeError, ValueError):  # published while the connection dropped: send it again
                done(False)
                continue
            if published:
                done(True)
            else:
                still.append((info, done))
        self._waiting = still

    def close(self) -> None:
        from infra.mqtt import close

        close(self.client)


class HttpUplink:
    """``POST {base}/v1/frames`` as multipart/form-data (image file, line, camera, part, trigger,
    captured_at, plus device, seq and gate), ``Idempotency-Key: <frame_id>``, ``Authorization: Bearer``;
    202 (or 200/201) is done; 5xx, 429, 409 (same key in progress), 401/403 and connection errors are retried
    with backoff; any other 4xx refuses the frame for good (counted)."""

    name = "http"

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 10.0,
                 backoff: Backoff | None = None) -> None:
        self.url = base_url.rstrip("/") + "/v1/frames"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._backoff = backoff or Backoff(0.2, 2.0, 10.0, None)
        self._not_before = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._not_before

    def _retry_later(self, why: str, delay: float | None = None) -> None:
        d = delay if delay is not None else (self._backoff.next_delay() or self._backoff.cap_s)
        self._not_before = time.monotonic() + d
        log.info("http uplink: retrying later", extra={"reason": why, "delay_s": round(d, 2)})

    @staticmethod
    def multipart(fields_: dict[str, str], image: bytes, filename: str, content_type: str) -> tuple[bytes, str]:
        boundary = "sqis-" + secrets.token_hex(12)
        out = []
        for k, v in fields_.items():
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                   f"Content-Type: {content_type}\r\n\r\n".encode() + image + b"\r\n")
        out.append(f"--{boundary}--\r\n".encode())
        return b"".join(out), f"multipart/form-data; boundary={boundary}"

    def submit(self, meta: dict[str, Any], image: bytes, done: Done) -> None:
        form = {"line": meta["line_id"], "camera": meta["camera_id"], "captured_at": str(meta["captured_at"]),
                "device": str(meta["device"]), "seq": str(meta["seq"])}
        for src, dst in (("part", "part"), ("trigger", "trigger")):
            if meta.get(src):
                form[dst] = str(meta[src])
        if meta.get("gate"):
            form["gate"] = json.dumps(meta["gate"], separators=(",", ":"))
        enc = str(meta.get("encoding", "jpeg"))
        body, ctype = self.multipart(form, image, f"{meta['frame_id']}.{enc}", f"image/{enc}")
        headers = {"Content-Type": ctype, "Idempotency-Key": meta["frame_id"]}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            code = exc.code
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            if code in (401, 403):
                log.error("http uplink refused the API key; frames stay queued", extra={"status": code})
                self._retry_later(f"HTTP {code}")
                done(False)
            elif code == 429 or code >= 500:
                delay = float(retry_after) if retry_after and retry_after.isdigit() else None
                self._retry_later(f"HTTP {code}", delay)
                done(False)
            elif code == 409:  # the first request with this key still runs: ask again later
                self._retry_later("HTTP 409 (the same Idempotency-Key in progress)", 1.0)
                done(False)
            else:
                log.error("http uplink refused a frame", extra={"frame_id": meta["frame_id"], "status": code})
                done(None)
            return
        except (urllib.error.URLError, OSError) as exc:
            self._retry_later(f"{type(exc).__name__}: {exc}")
            done(False)
            return
        if 200 <= code < 300:
            self._backoff.reset()
            done(True)
        else:
            self._retry_later(f"HTTP {code}")
            done(False)

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---- the queue's sender -----------------------------------------------------------------------------------


class Forwarder:
    """Sends the queue's frames, oldest first, through ``uplink`` with up to ``window`` in flight; removes
    each only when acknowledged; resends what stays unacknowledged for ``resend_s``."""

    def __init__(self, queue: Spool, uplink: Uplink, stats: EdgeStats, *, window: int = 32,
                 resend_s: float = 15.0) -> None:
        self.queue, self.uplink, self.stats = queue, uplink, stats
        self.window, self.resend_s = window, resend_s
        self._inflight: dict[SpoolEntry, float] = {}
        self._was_ready: bool | None = None  # None: not connected yet (not an outage)

    def _done(self, entry: SpoolEntry, ok: bool | None) -> None:
        if entry not in self._inflight:
            return  # a second acknowledgement of a resent frame
        if ok is False:
            self._inflight.pop(entry)
            return
        self._inflight.pop(entry)
        if not entry.path(self.queue.root).exists():
            self.stats.add("evicted", -1)  # evicted by a full queue while in flight, yet delivered
        self.queue.remove(entry)
        self.stats.add("sent" if ok else "rejected")

    def step(self) -> int:
        """One round: collect acknowledgements, fill the window; returns frames submitted."""
        self.uplink.poll()
        ready = self.uplink.ready()
        if ready != self._was_ready:
            if self._was_ready is None and not ready:
                return 0
            self._was_ready = ready
            if not ready:
                self.stats.add("outages")
            log.log(logging.INFO if ready else logging.WARNING, "uplink %s", "up" if ready else "down",
                    extra={"uplink": self.uplink.name, "queued": len(self.queue)})
        if not ready:
            return 0
        now = time.monotonic()
        submitted = 0
        for entry in self.queue.oldest(self.window + len(self._inflight)):
            if submitted + sum(1 for t in self._inflight.values() if now - t < self.resend_s) >= self.window:
                break
            sent_at = self._inflight.get(entry)
            if sent_at is not None and now - sent_at < self.resend_s:
                continue
            try:
                meta, image = self.queue.read(entry)
            except SpoolEntryGone:
                self._inflight.pop(entry, None)
                self.queue.remove(entry)
                continue
            except SpoolCorrupt as exc:
                self.stats.add("failed")
                log.error("corrupt queue file removed", extra={"file": entry.name, "error": str(exc)})
                self._inflight.pop(entry, None)
                self.queue.remove(entry)
                continue
            if sent_at is not None:
                self.stats.add("resent")
            self._inflight[entry] = now
            submitted += 1
            self.uplink.submit(meta, image, lambda ok, e=entry: self._done(e, ok))
            if not self.uplink.ready():
                break
        return submitted

    @property
    def in_flight(self) -> int:
        return len(self._inflight)


# ---- the gateway ------------------------------------------------------------------------------------------


@dataclass
class EdgeConfig:
    device_id: str
    queue_dir: Path
    queue_max_bytes: int = 256 << 20
    fps: float = 0.0
    gate: StatsGate | None = None
    window: int = 32
    drain_s: float = 10.0  # at shutdown: how long to keep sending what is queued


def _capture(source: FrameSource, out: list[Frame], cond: threading.Condition, stop: threading.Event,
             fps: float, stats: EdgeStats, max_buffer: int) -> None:
    interval = 1.0 / fps if fps > 0 else 0.0
    next_t = time.monotonic()
    try:
        for frame in source.frames(stop):
            stats.add("captured")
            with cond:
                while len(out) >= max_buffer and not stop.is_set():
                    cond.wait(0.2)
                out.append(frame)
                cond.notify_all()
            if interval:
                next_t += interval
                stop.wait(max(0.0, next_t - time.monotonic()))
            if stop.is_set():
                break
    except Exception:
        stats.add("failed")
        log.exception("camera thread failed", extra={"camera_id": source.camera_id})
    finally:
        source.close()


class EdgeGateway:
    """Runs capture -> preprocess -> gate -> queue in the caller's thread, the forwarder in another."""

    def __init__(self, sources: Sequence[FrameSource], pre: Preprocessor, uplink: Uplink, cfg: EdgeConfig) -> None:
        self.sources, self.pre, self.uplink, self.cfg = list(sources), pre, uplink, cfg
        self.stats = EdgeStats()
        cfg.queue_dir.mkdir(parents=True, exist_ok=True)
        self.seq = SeqCounter(cfg.queue_dir / "seq")
        self.queue = Spool(cfg.queue_dir / "queue", cfg.queue_max_bytes, cameras=[s.camera_id for s in sources])
        self.forwarder = Forwarder(self.queue, uplink, self.stats, window=cfg.window)

    def enqueue(self, frame: Frame) -> None:
        image, truth = self.pre.resize(frame.image, frame.truth)
        if self.pre.is_duplicate(frame.camera_id, image):
            self.stats.add("skipped_duplicates")
            return
        image = self.pre.apply_denoise(image)
        seq = self.seq.next()
        fid = frame_id_for(self.cfg.device_id, seq)
        meta: dict[str, Any] = {
            "device": self.cfg.device_id, "seq": seq, "captured_at": frame.captured_at_us, "frame_id": fid,
            "line_id": frame.line_id, "camera_id": frame.camera_id, "part": frame.part_id,
            "trigger": frame.trigger_id, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "encoding": "jpeg",
            "truth": None if truth is None else [
                {"class_name": c, "x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}
                for c, x1, y1, x2, y2 in truth],
        }
        if self.cfg.gate is not None:
            d = self.cfg.gate.decide(image, fid)
            meta["gate"] = d.as_header()
            if d.decision == "good":
                self.stats.add("gated_good")
            if not d.forward:
                self.stats.add("gated_out")
                return
        data = self.pre.encode(image)
        _entry, evicted = self.queue.put(meta, data)
        self.stats.add("queued")
        if evicted:
            self.stats.add("evicted", evicted)
            log.warning("edge queue full: oldest frames evicted", extra={"evicted_total": self.stats.evicted})

    def _forward(self, stop: threading.Event, done_capturing: threading.Event) -> None:
        deadline: float | None = None
        while True:
            if stop.is_set() and done_capturing.is_set():
                deadline = deadline or time.monotonic() + self.cfg.drain_s
                if (len(self.queue) == 0 and self.forwarder.in_flight == 0) or time.monotonic() > deadline:
                    break
            try:
                n = self.forwarder.step()
            except Exception:
                log.exception("forwarder step failed")
                n = 0
            if n == 0:
                time.sleep(0.02)

    def run(self, stop: threading.Event, progress: Callable[[dict[str, int]], None] | None = None) -> EdgeStats:
        """Until the sources end (then the queue is drained for up to ``drain_s``) or ``stop`` is set."""
        buf: list[Frame] = []
        cond = threading.Condition()
        cam_stop = threading.Event()
        done_capturing = threading.Event()
        fwd_stop = threading.Event()
        caps = [threading.Thread(target=_capture, args=(s, buf, cond, cam_stop, self.cfg.fps, self.stats, 64),
                                 name=f"edge-capture-{s.camera_id}", daemon=True) for s in self.sources]
        fwd = threading.Thread(target=self._forward, args=(fwd_stop, done_capturing), name="edge-forward",
                               daemon=True)
        fwd.start()
        for t in caps:
            t.start()
        log.info("edge gateway started", extra={"device": self.cfg.device_id, "uplink": self.uplink.name,
                                                "queued": len(self.queue), "cameras": len(self.sources)})
        last = 0.0
        try:
            while True:
                if stop.is_set():
                    cam_stop.set()
                with cond:
                    if not buf:
                        if not any(t.is_alive() for t in caps):
                            break
                        cond.wait(0.1)
                        frame = None
                    else:
                        frame = buf.pop(0)
                        cond.notify_all()
                if frame is not None:
                    try:
                        self.enqueue(frame)
                    except Exception:
                        self.stats.add("failed")
                        log.exception("edge: frame not queued", extra={"camera_id": frame.camera_id})
                if progress is not None and time.monotonic() - last > 0.5:
                    last = time.monotonic()
                    progress(self.stats.snapshot() | {"queue": len(self.queue)})
        finally:
            cam_stop.set()
            done_capturing.set()
            fwd_stop.set()
            fwd.join()
            self.uplink.close()
            self.stats.pending = len(self.queue)
            self.queue.close()
        log.info("edge gateway finished", extra=self.stats.snapshot())
        return self.stats
