"""The harness the benchmarks, the demo and the end-to-end tests share: child-process settings, a
synthetic frame publisher, a pool of ``sqis worker`` subprocesses (RSS polled with psutil), and a
collector of records from any topic. It sits at the top floor because it wires every package together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infra.settings import Settings
from sqis.errors import HarnessError

log = logging.getLogger(__name__)

CLASS_NAMES = ("scratch", "dent", "spot")


BenchError = HarnessError  # the name the benchmarks raise


# ---- settings for subprocesses ----------------------------------------------------------------


def settings_env(s: Settings) -> dict[str, str]:
    """SQIS_* environment variables that reproduce ``s`` in a child process."""
    env: dict[str, str] = {}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"SQIS_{name.upper()}"] = str(value)
    # the resolved endpoints, so the child does not depend on stack.json
    with contextlib.suppress(Exception):
        env["SQIS_KAFKA_BOOTSTRAP"] = s.bootstrap()
    env["SQIS_OBJECT_STORE_URL"] = s.store_url()
    env["SQIS_SCHEMA_REGISTRY_URL"] = s.registry_url() or "none"  # the parent's wire format (#19)
    return env


# ---- a model when none is given ---------------------------------------------------------------


def export_untrained_detector(out_dir: Path, imgsz: int = 128, names: Sequence[str] = CLASS_NAMES, *,
                              seed: int = 0, spread_scores: bool = True) -> Path:
    """An untrained YOLOv8n (``yolov8n.yaml``) exported to ONNX; needs the ``train`` extra.

    With ``spread_scores`` the class head is perturbed so scores spread over (0, 1) and the
    pipeline sees real detections (an untrained head otherwise scores ~0 everywhere).
    """
    from training.export import export_onnx
    from training.offline import import_ultralytics

    out_dir.mkdir(parents=True, exist_ok=True)
    import_ultralytics(out_dir / "state")
    import torch
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    if spread_scores:
        head = model.model[-1]
        with torch.no_grad():
            for seq in head.cv3:
                seq[-1].bias.uniform_(-3.5, -0.5)
                seq[-1].weight.mul_(20.0)
    model.eval()
    pt = out_dir / "untrained.pt"
    torch.save({"model": model, "train_args": {"imgsz": imgsz, "task": "detect"}, "epoch": -1, "date": None}, pt)
    return export_onnx(pt, out_dir / "untrained-yolov8n.onnx", imgsz=imgsz, name="untrained-yolov8n",
                       version="0", state_dir=out_dir / "state")


# ---- synthetic frames -------------------------------------------------------------------------


def render_jpegs(n: int, size: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` distinct synthetic part images (JPEG) of ``size`` x ``size``."""
    import cv2

    rng = np.random.default_rng(seed)
    try:
        from producers.synthetic import render_part
    except ImportError:  # the producers package is optional here
        render_part = None
    out = []
    for _ in range(n):
        if render_part is not None:
            img, _truth = render_part(rng, size, size, defect_rate=0.5)
        else:
            img = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        out.append(buf.tobytes())
    return out


@dataclass
class Camera:
    camera_id: str
    line_id: str
    seq: int = 0


class FramePublisher:
    """Uploads frames to the object store and produces FrameRefs keyed by camera (like a producer)."""

    def __init__(self, settings: Settings, cameras: int = 4, lines: int = 2, *, size: int = 128,
                 distinct: int = 16, seed: int = 0, spread: int | None = None) -> None:
        """``spread``: produce camera i to partition i % spread instead of by key hash, so N workers on a
        topic of ``spread`` partitions get equal shares (the scaling benchmark); ordering per camera holds."""
        from infra import kafka
        from infra.objectstore import open_store
        from schemas.catalog import TopicCatalog

        self.settings = settings
        self.topic = TopicCatalog(settings.topic_prefix).frames
        self.store = open_store(settings)
        self.cameras = [Camera(f"cam-{i + 1:02d}", f"line-{i % lines + 1}") for i in range(cameras)]
        self.size = size
        self.images = render_jpegs(distinct, size, seed)
        self.producer = kafka.producer(settings, client_id=f"bench-publisher-{uuid.uuid4().hex[:6]}")
        self.failed: list[str] = []
        self._n = 0
        self._partition = {c.camera_id: i % spread for i, c in enumerate(self.cameras)} if spread else {}

    def prepare(self, n: int) -> list[dict[str, Any]]:
        """Upload ``n`` frames round-robin over the cameras; FrameRefs without captured_at yet."""
        refs = []
        for _ in range(n):
            cam = self.cameras[self._n % len(self.cameras)]
            data = self.images[self._n % len(self.images)]
            self._n += 1
            frame_id = str(uuid.uuid4())
            uri = self.store.put(f"frames/{cam.line_id}/{cam.camera_id}/{frame_id}.jpg", data, "image/jpeg")
            refs.append({
                "frame_id": frame_id, "line_id": cam.line_id, "camera_id": cam.camera_id, "seq": cam.seq,
                "captured_at": 0, "uri": uri, "width": self.size, "height": self.size, "encoding": "jpeg",
                "content_sha256": hashlib.sha256(data).hexdigest(), "part_id": None, "trigger_id": None,
                "size_bytes": len(data), "truth": None,
            })
            cam.seq += 1
        return refs

    def publish(self, refs: Sequence[dict[str, Any]], *, rate_fps: float | None = None,
                stop: threading.Event | None = None) -> float:
        """Produce the FrameRefs (captured_at = now), throttled to ``rate_fps``; returns the start time."""
        from schemas.serde import serialize

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                self.failed.append(str(err))

        start = time.time()
        for i, ref in enumerate(refs):
            if stop is not None and stop.is_set():
                break
            if rate_fps:
                delay = start + i / rate_fps - time.time()
                if delay > 0:
                    time.sleep(delay)
            rec = dict(ref, captured_at=time.time_ns() // 1000)
            value, headers = serialize("frame_ref", rec)
            self.send_raw(rec["camera_id"].encode(), value, headers, on_delivery,
                          partition=self._partition.get(rec["camera_id"]))
        self.producer.flush(30)
        return start

    def send_raw(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None,
                 on_delivery: Callable[[Any, Any], None] | None = None, *, partition: int | None = None) -> None:
        """Produce any bytes to the frames topic (tests use it for garbage messages)."""
        where = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=on_delivery,
                                      **where)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> None:
        self.producer.flush(30)

    def close(self) -> None:
        self.producer.flush(30)
        self.producer.close()

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- collecting results -----------------------------------------------------------------------


class TopicCollector:
    """Reads a topic from the beginning of every partition in a thread (assign, no group join)."""

    def __init__(self, settings: Settings, key: str = "inspections", schema: str | None = None, *,
                 fetch_wait_ms: int = 20) -> None:
        from infra import kafka
        from schemas.catalog import TOPICS, TopicCatalog

        cat = TopicCatalog(settings.topic_prefix)
        self.topic = cat.name(key)
        self.schema = schema or TOPICS[key].schema
        md = kafka.admin_client(settings).list_topics(self.topic, timeout=10).topics[self.topic]
        self.consumer = kafka.consumer(settings, group_id=f"bench-collect-{uuid.uuid4().hex[:8]}",
                                       client_id="bench-collector", **{"enable.auto.commit": False,
                                                                      "fetch.wait.max.ms": fetch_wait_ms})
        self.consumer.assign([kafka.TopicPartition(self.topic, p, -2) for p in md.partitions])
        self.records: list[dict[str, Any]] = []
        self.received_at: list[float] = []
        self.meta: list[dict[str, Any]] = []  # key, headers, partition, offset of each record
        self.undecodable = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"collect-{key}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from schemas.serde import deserialize

        try:
            while not self._stop.is_set():
                for msg in self.consumer.consume(num_messages=500, timeout=0.2):
                    if msg.error():
                        continue
                    now = time.time()
                    try:
                        rec = deserialize(self.schema, msg.value(), msg.headers())
                    except Exception:
                        self.undecodable += 1
                        continue
                    with self._cond:
                        self.records.append(rec)
                        self.received_at.append(now)
                        self.meta.append({"key": msg.key(), "headers": dict(msg.headers() or []),
                                          "partition": msg.partition(), "offset": msg.offset()})
                        self._cond.notify_all()
        finally:
            self.consumer.close()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.records):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def wait_frames(self, frame_ids: set[str], timeout: float) -> bool:
        """True once a record for every frame id has arrived."""
        return self.wait_for(lambda recs: frame_ids <= {r["frame_id"] for r in recs}, timeout)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.records)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---- worker subprocesses ----------------------------------------------------------------------


class WorkerPool:
    """``sqis worker`` subprocesses in one group; logs (JSON) under ``log_dir``; RSS polled with psutil."""

    def __init__(self, settings: Settings, model: str, n: int, log_dir: Path, *, group: str | None = None,
                 max_batch: int = 8, max_wait_ms: float = 10, fetch_threads: int = 2, onnx_threads: int = 1,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.settings = settings
        self.cwd = cwd  # `python -m sqis` imports from here first (another checkout: its code)
        self.model = model
        self.group = group or f"inference-workers-{uuid.uuid4().hex[:8]}"
        self.log_dir = log_dir
        self.args = ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                     "--fetch-threads", str(fetch_threads), *extra_args]
        self.env = os.environ | settings_env(settings) | {
            "SQIS_LOG_FORMAT": "json", "SQIS_LOG_LEVEL": "INFO", "SQIS_ONNX_THREADS": str(onnx_threads),
            "OMP_NUM_THREADS": str(max(1, onnx_threads))} | dict(env or {})
        self.env.pop("SQIS_METRICS_PORT", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ids: list[str] = []
        self.rss_peak_mb: list[float] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            self.start_one()

    def start_one(self, worker_id: str | None = None) -> int:
        """Start a worker (index returned); ``worker_id`` of an earlier one restarts it under the same id
        (its transactional.id too: the new instance fences the old one and aborts what it left open)."""
        i = len(self.procs)
        wid = worker_id or f"w{i}-{uuid.uuid4().hex[:4]}"
        cmd = [sys.executable, "-m", "sqis", "worker", "--model", self.model, "--group", self.group,
               "--worker-id", wid, *self.args]
        with open(self.log_dir / f"{wid}.log", "ab") as logf:
            proc = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.cwd)
        self.procs.append(proc)
        self.ids.append(wid)
        self.rss_peak_mb.append(0.0)
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_rss, name="rss-poller", daemon=True)
            self._poller.start()
        return i

    def _poll_rss(self) -> None:
        import psutil

        handles: dict[int, psutil.Process] = {}
        while not self._stop.wait(0.2):
            for i, p in enumerate(list(self.procs)):
                if p.poll() is not None:
                    continue
                try:
                    h = handles.get(p.pid) or handles.setdefault(p.pid, psutil.Process(p.pid))
                    self.rss_peak_mb[i] = max(self.rss_peak_mb[i], h.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    def log_lines(self, i: int) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in (self.log_dir / f"{self.ids[i]}.log").read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 120.0, settle_s: float = 3.0) -> None:
        """Until every live worker logged a partition assignment and no rebalance happened for ``settle_s``."""
        deadline = time.monotonic() + timeout
        last_change, last_count = time.monotonic(), -1
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None and p.returncode not in (0, -9):
                    tail = (self.log_dir / f"{self.ids[i]}.log").read_text(errors="replace")[-2000:]
                    raise BenchError(f"worker {self.ids[i]} exited with {p.returncode}:\n{tail}")
            live = [i for i, p in enumerate(self.procs) if p.poll() is None]
            events = [[ln for ln in self.log_lines(i) if ln.get("msg") in ("partitions assigned", "partitions revoked")]
                      for i in live]
            count = sum(len(e) for e in events)
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            if all(any(ln["msg"] == "partitions assigned" for ln in e) for e in events) and \
                    time.monotonic() - last_change >= settle_s:
                return
            time.sleep(0.2)
        raise BenchError(f"workers not ready after {timeout:.0f} s (logs in {self.log_dir})")

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.procs[i].pid, sig)

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """SIGTERM every worker (they finish the batch, flush, commit), SIGKILL stragglers."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2)
        return [p.returncode for p in self.procs]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- chaos: workers SIGKILLed and restarted under load -------------------------------------------


def run_worker_chaos(settings: Settings, model: str, frames: int, log_dir: Path, *, workers: int = 2,
                     publish_s: float = 20.0, kill_every_s: float = 3.0, seed: int = 17,
                     timeout_s: float = 240.0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Publish ``frames`` frames over ``publish_s`` while, every ``kill_every_s``, a random worker is
    SIGKILLed and restarted under its id; then read the inspections topic (read_committed) and count
    per frame_id. Returns the counts (``missing``, ``doubled``) and the run's figures as a dict."""
    import random
    from collections import Counter

    say = progress or (lambda _m: None)
    pub = FramePublisher(settings, cameras=6, lines=2, size=96)
    refs = pub.prepare(frames)
    ids = {r["frame_id"] for r in refs}
    coll = TopicCollector(settings, "inspections")
    pool = WorkerPool(settings, model, workers, log_dir, max_batch=16, max_wait_ms=20, fetch_threads=1)
    rng = random.Random(seed)
    kills = 0
    stop = threading.Event()
    try:
        pool.wait_ready(timeout=120, settle_s=1)
        t0 = time.monotonic()
        feeder = threading.Thread(target=pub.publish, args=(refs,),
                                  kwargs={"rate_fps": frames / publish_s, "stop": stop}, daemon=True)
        feeder.start()
        deadline = t0 + timeout_s
        live: dict[str, int] = dict(zip(pool.ids, range(len(pool.ids)), strict=True))  # worker id -> proc index
        while time.monotonic() < deadline and not coll.wait_frames(ids, kill_every_s):
            if not feeder.is_alive():
                continue  # all published: let the workers finish
            wid = rng.choice(sorted(live))
            pool.kill(live[wid], signal.SIGKILL)
            pool.procs[live[wid]].wait(10)
            kills += 1
            live[wid] = pool.start_one(wid)
            say(f"SIGKILLed and restarted {wid} ({kills})")
        feeder.join(30)
        complete = coll.wait_frames(ids, max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        time.sleep(2.0)  # anything published twice late would show now
        recs = [r for r in coll.snapshot() if r["frame_id"] in ids]
    finally:
        stop.set()
        codes = pool.stop()
        coll.close()
        pub.close()
    counts = Counter(r["frame_id"] for r in recs)
    doubled = {f: c for f, c in counts.items() if c > 1}
    return {"delivery": settings.worker_delivery, "frames": frames, "workers": workers, "kills": kills,
            "complete": complete, "elapsed_s": round(elapsed, 1), "records": len(recs),
            "missing": len(ids - set(counts)), "frames_doubled": len(doubled),
            "extra_records": sum(c - 1 for c in doubled.values()), "publish_failures": len(pub.failed),
            "exit_codes": codes}
