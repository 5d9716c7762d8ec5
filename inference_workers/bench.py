"""`sqis bench pipeline`: the bare model versus producer -> Kafka -> worker processes -> inspections.

Also the harness the end-to-end tests use: a synthetic frame publisher, a pool of ``sqis worker``
subprocesses (RSS polled with psutil), and a collector of Inspection records.

Frames are rendered, JPEG-encoded and uploaded to the object store *before* the clock starts;
the timed part is: FrameRef produced -> consumed by a worker -> fetched, decoded, detected ->
Inspection produced -> consumed by the bench.
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
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.settings import Settings

log = logging.getLogger(__name__)

CLASS_NAMES = ("scratch", "dent", "spot")


class BenchError(RuntimeError):
    """The benchmark could not run (no model, workers did not start, frames never came back)."""


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
                 distinct: int = 16, seed: int = 0) -> None:
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
            self.send_raw(rec["camera_id"].encode(), value, headers, on_delivery)
        self.producer.flush(30)
        return start

    def send_raw(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None,
                 on_delivery: Callable[[Any, Any], None] | None = None) -> None:
        """Produce any bytes to the frames topic (tests use it for garbage messages)."""
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
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

    def __init__(self, settings: Settings, key: str = "inspections", schema: str | None = None) -> None:
        from infra import kafka
        from schemas.catalog import TOPICS, TopicCatalog

        cat = TopicCatalog(settings.topic_prefix)
        self.topic = cat.name(key)
        self.schema = schema or TOPICS[key].schema
        md = kafka.admin_client(settings).list_topics(self.topic, timeout=10).topics[self.topic]
        self.consumer = kafka.consumer(settings, group_id=f"bench-collect-{uuid.uuid4().hex[:8]}",
                                       client_id="bench-collector", **{"enable.auto.commit": False,
                                                                      "fetch.wait.max.ms": 20})
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
                 extra_args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.model = model
        self.group = group or f"inference-workers-{uuid.uuid4().hex[:8]}"
        self.log_dir = log_dir
        self.args = ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                     "--fetch-threads", str(fetch_threads), *extra_args]
        self.env = os.environ | settings_env(settings) | {
            "SQIS_LOG_FORMAT": "json", "SQIS_LOG_LEVEL": "INFO", "SQIS_ONNX_THREADS": str(onnx_threads),
            "OMP_NUM_THREADS": str(max(1, onnx_threads))}
        self.env.pop("SQIS_METRICS_PORT", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ids: list[str] = []
        self.rss_peak_mb: list[float] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            self.start_one()

    def start_one(self) -> int:
        i = len(self.procs)
        wid = f"w{i}-{uuid.uuid4().hex[:4]}"
        cmd = [sys.executable, "-m", "infra.cli", "worker", "--model", self.model, "--group", self.group,
               "--worker-id", wid, *self.args]
        with open(self.log_dir / f"{wid}.log", "wb") as logf:
            proc = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
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


# ---- the benchmark ----------------------------------------------------------------------------


@dataclass
class BenchParams:
    frames: int = 500
    workers: int = 2
    cameras: int = 4
    size: int = 256
    max_batch: int = 8
    max_wait_ms: float = 10.0
    fetch_threads: int = 2
    onnx_threads: int = 1
    model: str | None = None
    imgsz: int = 256
    run_70pct: bool = True
    warmup_frames: int = 0  # 0: 2 batches per worker
    timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 2) if len(values) else None


def _latency_ms(recs: Sequence[dict[str, Any]]) -> list[float]:
    return [(r["inspected_at"] - r["captured_at"]) / 1000.0 for r in recs]


def bare_model_fps(settings: Settings, model: str, jpegs: Sequence[bytes], batch: int, *,
                   min_seconds: float = 3.0, min_batches: int = 10) -> dict[str, Any]:
    """The same ONNX model in a tight loop on decoded frames, ``batch`` images per call."""
    import cv2

    from inference_workers.detector import Thresholds, load_detector

    det = load_detector(settings, model, Thresholds())
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    batches = [[images[(i * batch + k) % len(images)] for k in range(batch)] for i in range(len(images))]
    det.detect(batches[0])  # warm-up
    times: list[float] = []
    t_start = time.perf_counter()
    i = 0
    while len(times) < min_batches or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        det.detect(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
        i += 1
    total = time.perf_counter() - t_start
    ms = [t * 1000 for t in times]
    return {"bare_fps": round(len(times) * batch / total, 2), "bare_batch_latency_ms_p50": _pct(ms, 50),
            "bare_batch_latency_ms_p95": _pct(ms, 95), "bare_batches": len(times),
            "model_name": det.name, "model_version": det.version, "model_imgsz": list(det.imgsz)}


def _timed_run(pub: FramePublisher, coll: TopicCollector, n: int, rate: float | None, timeout: float) -> dict[str, Any]:
    refs = pub.prepare(n)
    ids = {r["frame_id"] for r in refs}
    t_start = pub.publish(refs, rate_fps=rate)
    if not coll.wait_frames(ids, timeout):
        got = len(ids & {r["frame_id"] for r in coll.snapshot()})
        raise BenchError(f"only {got}/{n} inspections arrived within {timeout:.0f} s")
    recs, arrived = [], []
    seen: set[str] = set()
    with coll._cond:
        for r, t in zip(coll.records, coll.received_at, strict=True):
            if r["frame_id"] in ids and r["frame_id"] not in seen:
                seen.add(r["frame_id"])
                recs.append(r)
                arrived.append(t)
    elapsed = max(arrived) - t_start
    lat = _latency_ms(recs)
    share: dict[str, int] = {}
    for r in recs:
        share[r["worker_id"]] = share.get(r["worker_id"], 0) + 1
    return {"frames_per_worker": sorted(share.values(), reverse=True), "fps": round(n / elapsed, 2), "elapsed_s": round(elapsed, 3), "p50": _pct(lat, 50), "p95": _pct(lat, 95),
            "p99": _pct(lat, 99), "mean_batch": round(float(np.mean([r["batch_size"] for r in recs])), 2)}


def run_pipeline_bench(p: BenchParams, *, state_dir: Path | None = None, bootstrap: str | None = None,
                       topic_prefix: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result as a JSON-able dict (see the module docstring)."""
    from infra import kafka
    from infra.cli_common import build_settings
    from schemas.catalog import TopicCatalog

    with contextlib.ExitStack() as es:
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="sqis-bench-")))
        prefix = topic_prefix or f"bench{uuid.uuid4().hex[:6]}."
        common = {"topic_prefix": prefix, "kafka_session_timeout_ms": 2000, "kafka_heartbeat_interval_ms": 500,
                  "onnx_threads": p.onnx_threads, "log_level": "WARNING"}
        if bootstrap is None:
            from infra.stack import LocalStack

            stack = LocalStack(state_dir or tmp / "stack")
            stack.up(kafka=True, postgres=False)
            es.callback(stack.down, purge=state_dir is None)
            s = stack.settings(**common)
        else:
            s = build_settings(state_dir=state_dir or tmp, bootstrap=bootstrap, **common)
            if s.object_store_url is None and not s.stack_info():
                s = build_settings(state_dir=state_dir or tmp, bootstrap=bootstrap,
                                   object_store_url=(tmp / "objects").as_uri(), **common)
        model = p.model
        if model is None:
            from inference_workers.cli import DEMO_MODEL_DIR

            found = sorted(DEMO_MODEL_DIR.glob("*.onnx")) if DEMO_MODEL_DIR.is_dir() else []
            if found:
                model = str(found[0].resolve())
            else:
                with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints; stdout is for the result
                    model = str(export_untrained_detector(tmp / "model", p.imgsz))
        cat = TopicCatalog(prefix)
        kafka.create_topics(s, cat)
        es.callback(lambda: kafka.delete_topics(s, [n for n, _ in cat.all()]))

        pub = FramePublisher(s, cameras=p.cameras, size=p.size, distinct=16)
        es.callback(pub.close)
        result: dict[str, Any] = bare_model_fps(s, model, pub.images, p.max_batch)
        coll = TopicCollector(s)
        es.callback(coll.close)
        pool = WorkerPool(s, model, p.workers, tmp / "logs", max_batch=p.max_batch, max_wait_ms=p.max_wait_ms,
                          fetch_threads=p.fetch_threads, onnx_threads=p.onnx_threads)
        es.callback(pool.stop)
        pool.wait_ready()
        warm = p.warmup_frames or 2 * p.workers * p.max_batch
        _timed_run(pub, coll, warm, None, p.timeout_s)
        sat = _timed_run(pub, coll, p.frames, None, p.timeout_s)
        result.update({"pipeline_fps": sat["fps"], "latency_ms_p50": sat["p50"], "latency_ms_p95": sat["p95"],
                       "latency_ms_p99": sat["p99"], "pipeline_elapsed_s": sat["elapsed_s"],
                       "mean_batch_size": sat["mean_batch"], "frames_per_worker": sat["frames_per_worker"]})
        if p.run_70pct:
            rate = 0.7 * sat["fps"]
            r70 = _timed_run(pub, coll, p.frames, rate, p.timeout_s)
            result.update({"load_70pct_fps_target": round(rate, 2), "fps_at_70pct": r70["fps"],
                           "latency_at_70pct_ms_p50": r70["p50"], "latency_at_70pct_ms_p95": r70["p95"],
                           "latency_at_70pct_ms_p99": r70["p99"], "mean_batch_size_at_70pct": r70["mean_batch"],
                           "frames_per_worker_at_70pct": r70["frames_per_worker"]})
        pool.stop()
        result["worker_rss_mb"] = [round(x, 1) for x in pool.rss_peak_mb]
        result["worker_rss_mb_max"] = round(max(pool.rss_peak_mb), 1) if pool.rss_peak_mb else None
        params = asdict(p)
        params.pop("extra")
        params["model"] = model if p.model else f"{model} (default)"
        result["params"] = params
        result["cpu_count"] = os.cpu_count()
        return result
    raise AssertionError("unreachable")
