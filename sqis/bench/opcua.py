"""`sqis bench opcua`: how long a result takes from Kafka to an OPC UA client (issue #19 s.3).

`sqis opcua` runs as its own process (as deployed) on a broker: the given one, or a local Apache Kafka
started for the run. This process subscribes as a PLC would (asyncua client, Basic256Sha256
Sign&Encrypt, username/password) to the ResultReady events of the Server object and to each station's
Result/ResultId, then produces Inspection records at ``--rate`` over ``--stations`` cameras. Latency:
from the record being on the topic (the producer's delivery acknowledgement) to the client's
notification, both clocks of this process. Prints one JSON object: per run and over the runs, the
median, p95 and max in ms, plus counts (missed events must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.cli_common import Bootstrap, StateDir
from sqis.bench.pipeline import bench_app

USER, PASSWORD = "bench", "bench-pw"


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _summary(xs: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1) if ms else None,
            "p95_ms": round(_pct(ms, 0.95), 1) if ms else None, "max_ms": round(max(ms), 1) if ms else None}


def _free_port() -> int:
    from infra.stack import free_port

    return free_port()


async def _connect(url: str, cert: Path, key: Path, deadline: float) -> Any:
    from asyncua import Client

    last: Exception | None = None
    while time.monotonic() < deadline:
        c = Client(url, timeout=10)
        c.application_uri = "urn:sqis:bench:client"
        c.set_user(USER)
        c.set_password(PASSWORD)
        try:  # the security set-up fetches the server's certificate: it connects too
            await c.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert},{key}")
            await c.connect()
            return c
        except Exception as exc:  # noqa: BLE001 - the server is starting
            last = exc
            await asyncio.sleep(0.5)
    raise RuntimeError(f"OPC UA server did not come up: {last}")


def _records(n: int, stations: int, run: int) -> list[dict[str, Any]]:
    from schemas.serde import serialize

    out = []
    for i in range(n):
        now = int(time.time() * 1e6)
        cam = f"cam-{i % stations}"
        fail = i % 5 == 0
        rec = {
            "frame_id": str(uuid.uuid4()), "line_id": "line-1", "camera_id": cam, "seq": i, "part_id": f"P-{run}-{i}",
            "captured_at": now, "inspected_at": now + 30_000, "image_uri": f"s3://frames/{cam}/{i}.jpg", "width": 640,
            "height": 480, "model_name": "sqis-detector", "model_version": "12",
            "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {}, "source": "settings", "image_score": None},
            "verdict": "FAIL" if fail else "PASS", "verdict_rules": ["score>=0.25:scratch"] if fail else [],
            "detections": [{"class_id": 0, "class_name": "scratch", "score": 0.8, "x1": 1.0, "y1": 1.0, "x2": 9.0,
                            "y2": 9.0, "mask": None, "polygon": [], "area_mm2": None, "length_mm": None}] if fail else [],
            "mask_uri": None, "segmenter": None, "image_stats": None,
            "timings": {"queue_ms": 1.0, "fetch_ms": 1.0, "decode_ms": 1.0, "infer_ms": 20.0, "postprocess_ms": 1.0,
                        "segment_ms": 0.0, "total_ms": 24.0},
            "batch_size": 1, "worker_id": "bench", "source_partition": 0, "source_offset": i,
        }
        out.append((rec, serialize("inspection", rec)))
    return out  # type: ignore[return-value]


def _produce(s: Any, records: list[Any], rate: float, acked: dict[str, float]) -> None:
    from infra.kafka import producer
    from schemas.catalog import TopicCatalog

    p = producer(s, client_id=f"bench-opcua-{uuid.uuid4().hex[:6]}")
    topic = TopicCatalog(s.topic_prefix).inspections
    t0 = time.monotonic()
    for i, (rec, (value, headers)) in enumerate(records):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            p.poll(wait)

        def on_delivery(err: Any, _m: Any, fid: str = rec["frame_id"]) -> None:
            if err is None:
                acked[fid] = time.time()

        p.produce(topic, value=value, key=rec["camera_id"].encode(), headers=headers, on_delivery=on_delivery)
        p.poll(0)
    p.flush(30)


async def _measure(s: Any, url: str, cert: Path, key: Path, *, results: int, runs: int, rate: float,
                   stations: int, start_timeout_s: float) -> dict[str, Any]:
    from asyncua import ua

    from sinks.opcua import NAMESPACE_URI

    c = await _connect(url, cert, key, time.monotonic() + start_timeout_s)
    try:
        ns = await c.get_namespace_index(NAMESPACE_URI)
        events: dict[str, float] = {}
        changes: dict[str, float] = {}

        class Handler:
            def event_notification(self, ev: Any) -> None:
                events.setdefault(ev.ResultId, time.time())

            def datachange_notification(self, _node: Any, val: Any, _data: Any) -> None:
                if val:
                    changes.setdefault(val, time.time())

        sub = await c.create_subscription(50, Handler())
        await sub.subscribe_events(c.nodes.server, c.get_node(ua.NodeId("Types/ResultReadyEventType", ns)))
        await sub.subscribe_data_change([c.get_node(ua.NodeId(f"Lines/line-1/cam-{k}/Result/ResultId", ns))
                                         for k in range(stations)])
        # warm-up: the server's feed has its partitions once a record makes it through
        warm = _records(stations, stations, -1)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and not all(r["frame_id"] in events for r, _ in warm):
            await asyncio.to_thread(_produce, s, warm, 1000.0, {})
            await asyncio.sleep(1.0)
        if not all(r["frame_id"] in events for r, _ in warm):
            raise RuntimeError("no ResultReady event for the warm-up records")
        out_runs = []
        for run in range(runs):
            recs = _records(results, stations, run)
            acked: dict[str, float] = {}
            await asyncio.to_thread(_produce, s, recs, rate, acked)
            ids = [r["frame_id"] for r, _ in recs]
            end = time.monotonic() + 10
            while time.monotonic() < end and not all(i in events for i in ids):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # the last data changes
            ev = [events[i] - acked[i] for i in ids if i in events and i in acked]
            dc = [changes[i] - acked[i] for i in ids if i in changes and i in acked]
            out_runs.append({"events": _summary(ev), "data_changes": _summary(dc),
                             "missed_events": sum(1 for i in ids if i not in events),
                             "not_acked": sum(1 for i in ids if i not in acked)})
        await sub.delete()
    finally:
        with contextlib.suppress(Exception):
            await c.disconnect()
    ev_med = [r["events"]["median_ms"] for r in out_runs if r["events"]["median_ms"] is not None]
    ev_p95 = [r["events"]["p95_ms"] for r in out_runs if r["events"]["p95_ms"] is not None]
    return {"runs": out_runs, "events_median_ms": statistics.median(ev_med) if ev_med else None,
            "events_p95_ms_worst_run": max(ev_p95) if ev_p95 else None}


@bench_app.command("opcua")
def bench_opcua(
    results: Annotated[int, typer.Option("--results", min=10, help="results per run")] = 300,
    runs: Annotated[int, typer.Option("--runs", min=1, max=20)] = 3,
    rate: Annotated[float, typer.Option("--rate", min=1, max=5000, help="records per second produced")] = 50.0,
    stations: Annotated[int, typer.Option("--stations", min=1, max=64, help="cameras (stations) on line-1")] = 4,
    state_dir: StateDir = None, bootstrap: Bootstrap = None,
    start_timeout_s: Annotated[float, typer.Option("--start-timeout-s", min=5)] = 120.0,
) -> None:
    """Result latency Kafka -> `sqis opcua` (its own process) -> a subscribed OPC UA client, as JSON."""
    import logging

    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from infra import kafka
    from infra.cli_common import build_settings
    from schemas.catalog import TopicCatalog

    with contextlib.ExitStack() as es:
        logging.getLogger("asyncua").setLevel(logging.ERROR)  # session chatter of the client
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="sqis-bench-opcua-")))
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        common = {"topic_prefix": prefix, "log_level": "WARNING"}
        if bootstrap is None and not build_settings(state_dir=state_dir, **common).stack_info():
            from infra.stack import LocalStack

            stack = LocalStack(tmp / "stack")
            stack.up(kafka=True, postgres=False)
            es.callback(stack.down, purge=True)
            s = stack.settings(**common)
        else:
            s = build_settings(state_dir=state_dir, bootstrap=bootstrap, **common)
        cat = TopicCatalog(prefix)
        kafka.create_topics(s, cat)
        es.callback(lambda: kafka.delete_topics(s, [n for n, _ in cat.all()]))
        cert, key = tmp / "client.der", tmp / "client-key.pem"
        asyncio.run(setup_self_signed_certificate(key, cert, "urn:sqis:bench:client", "localhost",
                                                  [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "sqis bench"}))
        port = _free_port()
        url = f"opc.tcp://127.0.0.1:{port}/sqis/"
        env = os.environ | {"SQIS_OPCUA_USERS": f"{USER}:{PASSWORD}", "SQIS_LOG_LEVEL": "WARNING",
                            "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "sqis", "opcua", "--endpoint", url, "--bootstrap", s.bootstrap(),
               "--topic-prefix", prefix, "--state-dir", str(tmp / "server"), "--group", f"bench-opcua-{prefix}",
               "--recover", "0", *[a for k in range(stations) for a in ("--station", f"line-1/cam-{k}")]]
        log = (tmp / "server.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

        def _stop() -> None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

        es.callback(_stop)
        try:
            r = asyncio.run(_measure(s, url, cert, key, results=results, runs=runs, rate=rate, stations=stations,
                                     start_timeout_s=start_timeout_s))
        except RuntimeError:
            log.flush()
            sys.stderr.write((tmp / "server.log").read_text()[-3000:])
            raise
        import asyncua

        r = {"bench": "opcua", "results_per_run": results, "runs_n": runs, "rate_per_s": rate, "stations": stations,
             "security": "Basic256Sha256 SignAndEncrypt, username/password", "publishing_interval_ms": 50,
             "from": "producer delivery ack (record on the topic)", "to": "client notification",
             "asyncua": asyncua.__version__ if hasattr(asyncua, "__version__") else "?",
             "python": platform.python_version(), "cpus": os.cpu_count(),
             "load_avg_1m_at_end": round(os.getloadavg()[0], 2), **r}
    typer.echo(json.dumps(r))
