"""`sqis bench edge`: the full-size runs behind issue #20 §2-3 (the tests run smaller versions).

- ``bridge``: N frames published over MQTT (QoS 1) while ``sqis bridge mqtt`` is SIGKILLed and restarted
  every few seconds, a worker inspecting: missing / duplicated frames on the frames and inspections topics.
- ``outage``: the edge gateway with a camera at F fps and the uplink (mosquitto) stopped for S seconds,
  once with a queue that holds the outage and once with one that does not: delivered, evicted, lost.
- ``gate``: the stats gate at the edge, the full model behind it: the gate's miss rate on its sampled
  good frames (against the model and against the synthetic ground truth), and the share forwarded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from infra.settings import Settings
from sqis.bench.harness import HarnessError, TopicCollector, WorkerPool, render_jpegs, settings_env
from sqis.bench.pipeline import _emit, _say, bench_app


class _Mosquitto:
    def __init__(self, root: Path) -> None:
        from infra.stack import free_port

        self.root, self.port = root, free_port()
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.info: dict[str, Any] | None = None

    def start(self) -> None:
        from infra import mqtt_server

        self.info = mqtt_server.up(self.root / "mqtt", self.port, None, self.root / "logs")

    def stop(self) -> None:
        from infra import mqtt_server

        mqtt_server.down(self.info)

    @property
    def url(self) -> str:
        assert self.info is not None
        return str(self.info["url"])


@contextlib.contextmanager
def _env(state_dir: Path | None) -> Iterator[tuple[Settings, _Mosquitto, str, Path]]:
    """Kafka (a local stack), a private mosquitto, the demo model, a temp dir."""
    from inference_workers.model_loader import demo_model_path
    from infra import kafka
    from infra.stack import LocalStack
    from schemas.catalog import TopicCatalog

    with contextlib.ExitStack() as es:
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="sqis-bench-edge-")))
        stack = LocalStack(state_dir or tmp / "stack")
        stack.up(kafka=True, postgres=False, mqtt=False)
        es.callback(stack.down, purge=state_dir is None)
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        s = stack.settings(topic_prefix=prefix, kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500,
                           log_level="WARNING", object_store_url=(tmp / "objects").as_uri())
        cat = TopicCatalog(prefix)
        kafka.create_topics(s, cat)
        es.callback(lambda: kafka.delete_topics(s, [n for n, _ in cat.all()]))
        mq = _Mosquitto(tmp / "mosq")
        mq.start()
        es.callback(mq.stop)
        model = demo_model_path()
        if model is None:
            raise HarnessError("no demo model (models/demo/model.onnx)")
        yield s, mq, str(model), tmp


class _Sub:
    """A persistent QoS 1 subscriber counting distinct (device, seq) of edge frames."""

    def __init__(self, url: str, topic: str) -> None:
        from infra.mqtt import make_client
        from producers.edge_wire import decode

        self.seqs: set[int] = set()
        self.last_at = 0.0
        ready = threading.Event()

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_message(_c: Any, _u: Any, m: Any) -> None:
            self.seqs.add(decode(m.payload)[0]["seq"])
            self.last_at = time.monotonic()

        self.client = make_client(url, f"bench-sub-{uuid.uuid4().hex[:6]}", clean_session=False,
                                  on_connect=on_connect, on_message=on_message,
                                  on_subscribe=lambda *_a: ready.set())
        if not ready.wait(10):
            raise HarnessError("subscriber not ready")

    def close(self) -> None:
        from infra.mqtt import close

        close(self.client)


def run_bridge_chaos(s: Settings, mq: _Mosquitto, model: str, tmp: Path, *, frames: int, rate: float,
                     kill_every_s: float) -> dict[str, Any]:
    from infra.mqtt import frames_topic, make_client
    from producers.edge_wire import encode, frame_id_for

    device, cid = f"bench-{uuid.uuid4().hex[:6]}", f"bridge-{uuid.uuid4().hex[:6]}"
    log = tmp / f"{cid}.log"
    env = os.environ | settings_env(s) | {"SQIS_MQTT_URL": mq.url, "SQIS_LOG_FORMAT": "json", "SQIS_LOG_LEVEL": "INFO"}

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            return subprocess.Popen([sys.executable, "-m", "sqis", "bridge", "mqtt", "--no-verdicts",
                                     "--client-id", cid], env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    bridge = start()
    end = time.monotonic() + 30
    while '"mqtt connected"' not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > end:
            bridge.kill()  # never leave it running
            bridge.wait(10)
            raise HarnessError(f"bridge did not connect; see {log}")
        time.sleep(0.05)
    pool = WorkerPool(s, model, 1, tmp / f"logs-{cid}", max_batch=16, max_wait_ms=20, fetch_threads=1)
    insp = TopicCollector(s, "inspections")
    images = render_jpegs(16, 128)
    pub = make_client(mq.url, f"{device}-pub", clean_session=False)
    kills = 0
    t0 = time.monotonic()
    try:
        pool.wait_ready(timeout=120, settle_s=1)
        while not pub.is_connected():
            time.sleep(0.02)
        t0 = next_kill = time.monotonic()
        next_kill += kill_every_s
        infos = []
        for i in range(frames):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            hdr = {"device": device, "seq": i, "captured_at": time.time_ns() // 1000, "width": 128, "height": 128}
            infos.append(pub.publish(frames_topic("line-1", f"cam-{i % 4 + 1:02d}"), encode(hdr, images[i % 16]), qos=1))
            if time.monotonic() >= next_kill:
                os.killpg(bridge.pid, signal.SIGKILL)
                bridge.wait(10)
                kills += 1
                bridge = start()
                next_kill = time.monotonic() + kill_every_s
        expected = {frame_id_for(device, i) for i in range(frames)}
        complete = insp.wait_frames(expected, 180)
        elapsed = time.monotonic() - t0
        time.sleep(2.0)
        recs = insp.snapshot()
        refs_c = TopicCollector(s, "frames")
        refs_c.wait_for(lambda r: len(r) >= frames, 20)
        time.sleep(1.0)
        refs = refs_c.snapshot()
        refs_c.close()
    finally:
        pub.disconnect()
        pub.loop_stop()
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            bridge.wait(30)
        pool.stop()
        insp.close()
    per = Counter(r["frame_id"] for r in recs if r["frame_id"] in expected)
    ref_ids = Counter(r["frame_id"] for r in refs if r["frame_id"] in expected)
    return {"frames": frames, "rate_fps": rate, "bridge_sigkills": kills, "complete": complete,
            "elapsed_s": round(elapsed, 1), "missing": len(expected - set(per)),
            "frame_refs": sum(ref_ids.values()), "duplicate_frame_refs": sum(ref_ids.values()) - len(ref_ids),
            "inspections": sum(per.values()), "frames_inspected_twice": sum(1 for c in per.values() if c > 1)}


def run_outage(mq: _Mosquitto, tmp: Path, *, fps: float, outage_s: float, queue_bytes: int,
               size: int = 160, lead_s: float = 5.0, tail_s: float = 5.0) -> dict[str, Any]:
    from producers.edge import EdgeConfig, EdgeGateway, MqttUplink
    from producers.preprocess import Preprocessor
    from producers.synthetic import SyntheticSource

    device = f"bench-{uuid.uuid4().hex[:6]}"
    sub = _Sub(mq.url, "sqis/v1/+/+/frames")
    n = int(fps * (lead_s + outage_s + tail_s))
    src = SyntheticSource("cam-01", "line-1", size=(size, size), count=n, seed=3)
    gw = EdgeGateway([src], Preprocessor(), MqttUplink(mq.url, f"edge-{device}"),
                     EdgeConfig(device_id=device, queue_dir=tmp / device, queue_max_bytes=queue_bytes, fps=fps,
                                drain_s=120))
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(gw.run(threading.Event()).snapshot()), daemon=True)
    t.start()
    peak = {"frames": 0, "bytes": 0}
    marks: dict[str, float] = {}

    def watch() -> None:
        while t.is_alive():
            n_q = len(gw.queue)
            peak["frames"] = max(peak["frames"], n_q)
            peak["bytes"] = max(peak["bytes"], gw.queue.total_bytes)
            if "back" in marks and "drained" not in marks and n_q <= 1:
                marks["drained"] = time.monotonic()
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(lead_s)
    mq.stop()
    time.sleep(outage_s)
    mq.start()
    back = marks["back"] = time.monotonic()
    t.join(outage_s + tail_s + 180)
    end = time.monotonic() + 30
    want = result.get("queued", 0) - result.get("evicted", 0)
    while len(sub.seqs) < want and time.monotonic() < end:
        time.sleep(0.1)
    catch_up = marks.get("drained", float("nan")) - back  # broker back -> the backlog sent
    sub.close()
    delivered = len(sub.seqs)
    return {"fps": fps, "outage_s": outage_s, "queue_bytes": queue_bytes, "captured": result.get("captured"),
            "queued": result.get("queued"), "delivered": delivered, "evicted": result.get("evicted"),
            "lost_beyond_evicted": result.get("queued", 0) - result.get("evicted", 0) - delivered,
            "pending": result.get("pending"), "queue_peak_frames": peak["frames"],
            "queue_peak_mb": round(peak["bytes"] / 2**20, 2), "catch_up_s": round(catch_up, 1)}


def run_gate(s: Settings, mq: _Mosquitto, model: str, tmp: Path, *, frames: int, sample: float,
             fps: float) -> dict[str, Any]:
    from producers.edge import EdgeConfig, EdgeGateway, MqttUplink
    from producers.edge_gate import StatsGate, miss_rate, parse_gate_headers
    from producers.mqtt_bridge import MqttBridge
    from producers.preprocess import Preprocessor
    from producers.synthetic import SyntheticSource

    device = f"bench-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    bridge = MqttBridge(s, client_id=f"bridge-{device}", url=mq.url)
    if not bridge.connected.wait(10):
        raise HarnessError("bridge did not connect")
    bt = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    bt.start()
    pool = WorkerPool(s, model, 1, tmp / f"logs-{device}", max_batch=16, max_wait_ms=20, fetch_threads=1)
    insp = TopicCollector(s, "inspections")
    refs = TopicCollector(s, "frames")
    try:
        pool.wait_ready(timeout=120, settle_s=1)
        src = SyntheticSource("cam-01", "line-1", size=(320, 320), count=frames, seed=11, defect_rate=0.3)
        gw = EdgeGateway([src], Preprocessor(), MqttUplink(mq.url, f"edge-{device}"),
                         EdgeConfig(device_id=device, queue_dir=tmp / device, fps=fps,
                                    gate=StatsGate(sample_rate=sample)))
        st = gw.run(threading.Event()).snapshot()
        forwarded = st["queued"]
        refs.wait_for(lambda r: len(r) >= forwarded, 60)
        ids = {r["frame_id"] for r in refs.snapshot()}
        insp.wait_frames(ids, 120)
        time.sleep(1.0)
        gates = {r["frame_id"]: parse_gate_headers(list(m["headers"].items())) or {}
                 for r, m in zip(refs.snapshot(), refs.meta, strict=True)}
        truth = {r["frame_id"]: bool(r["truth"]) for r in refs.snapshot()}
        model_ng = {r["frame_id"]: r["verdict"] == "FAIL" for r in insp.snapshot()}
    finally:
        stop.set()
        bt.join(20)
        pool.stop()
        insp.close()
        refs.close()
    return {"frames": frames, "sample_rate": sample, "captured": st["captured"], "called_good": st["gated_good"],
            "forwarded": forwarded, "forwarded_share": round(forwarded / max(1, st["captured"]), 3),
            "vs_model": miss_rate(gates, model_ng), "vs_truth": miss_rate(gates, truth)}


def _summary(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            worst = max(vals) if k not in ("delivered",) else min(vals)
            out[k] = {"median": float(np.median(vals)), "worst": worst}
    return out


@bench_app.command("edge")
def bench_edge(
    scenario: Annotated[str, typer.Option("--scenario", help="all | bridge | outage | gate")] = "all",
    runs: Annotated[int, typer.Option("--runs", min=1, help="repeats of bridge and outage")] = 3,
    frames: Annotated[int, typer.Option("--frames", min=10, help="bridge: frames published over MQTT")] = 1000,
    rate: Annotated[float, typer.Option("--rate", min=1.0, help="bridge: frames per second")] = 100.0,
    kill_every_s: Annotated[float, typer.Option("--kill-every-s", min=0.5, help="bridge: SIGKILL period")] = 2.0,
    fps: Annotated[float, typer.Option("--fps", min=1.0, help="outage: camera frames per second")] = 20.0,
    outage_s: Annotated[float, typer.Option("--outage-s", min=1.0, help="outage: seconds the uplink is cut")] = 60.0,
    small_queue_mb: Annotated[float, typer.Option("--small-queue-mb", min=0.05, help="outage: the queue that cannot hold it")] = 2.0,
    gate_frames: Annotated[int, typer.Option("--gate-frames", min=10, help="gate: frames")] = 600,
    gate_sample: Annotated[float, typer.Option("--gate-sample", min=0.0, max=1.0, help="gate: sample of good frames")] = 0.3,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="keep the stack here (default: a temp dir)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="also write the JSON here")] = None,
) -> None:
    """Bridge SIGKILL chaos, uplink outage and edge-gate miss rate against a private stack and mosquitto."""
    result: dict[str, Any] = {"cpu_count": os.cpu_count()}
    with _env(state_dir) as (s, mq, model, tmp):
        if scenario in ("all", "bridge"):
            rows = []
            for i in range(runs):
                _say(f"bridge chaos run {i + 1}/{runs}: {frames} frames at {rate:g}/s, SIGKILL every {kill_every_s:g} s")
                rows.append(run_bridge_chaos(s, mq, model, tmp, frames=frames, rate=rate, kill_every_s=kill_every_s))
            result["bridge"] = {"runs": rows, "summary": _summary(rows, ("elapsed_s", "missing", "duplicate_frame_refs",
                                                                        "frames_inspected_twice", "bridge_sigkills"))}
        if scenario in ("all", "outage"):
            big = int(fps * (outage_s + 10) * 40_000)  # ~40 KB a frame at 160x160 is generous: holds the outage
            for name, qb in (("holds_outage", big), ("smaller_than_outage", int(small_queue_mb * 2**20))):
                rows = []
                for i in range(runs):
                    _say(f"outage run {i + 1}/{runs} ({name}): {outage_s:g} s at {fps:g} fps, queue {qb / 2**20:.1f} MB")
                    rows.append(run_outage(mq, tmp, fps=fps, outage_s=outage_s, queue_bytes=qb))
                result[f"outage_{name}"] = {"runs": rows, "summary": _summary(
                    rows, ("evicted", "lost_beyond_evicted", "catch_up_s", "queue_peak_mb"))}
        if scenario in ("all", "gate"):
            _say(f"gate: {gate_frames} frames, sample {gate_sample:g} of good ones")
            result["gate"] = run_gate(s, mq, model, tmp, frames=gate_frames, sample=gate_sample, fps=25.0)
    _emit(result, json_out, out)
    if json_out is False and out is None:
        typer.echo(json.dumps(result))
