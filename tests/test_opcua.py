"""`sqis opcua` (issue #19 s.3): results over OPC UA, live, to authenticated clients only.

The live test runs the real chain: records on Apache Kafka (the session stack) -> the consume loop
(read_committed) -> the asyncua server -> an asyncua client over Basic256Sha256 Sign&Encrypt with a
username, subscribed to a station's Evaluation and its ResultReady events.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("asyncua", reason="the opcua extra (asyncua) is not installed")

from asyncua import Client, ua  # noqa: E402
from asyncua.crypto.cert_gen import setup_self_signed_certificate  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from infra.stack import free_port  # noqa: E402
from sinks.opcua import (  # noqa: E402
    EVAL_NOT_OK,
    EVAL_OK,
    NAMESPACE_URI,
    PART_STATION,
    STATE_INCOMPLETE,
    OpcUaBridge,
    OpcUaConfig,
    OpcUaError,
    Result,
    hash_password,
    parse_users,
)
from tests.stream_fixtures import inspection  # noqa: E402

USER, PASSWORD = "plc-1", "s3cret-pw"


@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("opcua-client")
    cert, key = d / "client.der", d / "client-key.pem"
    asyncio.run(setup_self_signed_certificate(key, cert, "urn:sqis:test:client", "localhost",
                                              [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "sqis test"}))
    return cert, key


async def _client(url: str, cert: tuple[Path, Path] | None, user: str | None = USER,
                  password: str | None = PASSWORD) -> Client:
    c = Client(url, timeout=10)
    c.application_uri = "urn:sqis:test:client"
    if user is not None:
        c.set_user(user)
        c.set_password(password or "")
    if cert is not None:
        await c.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert[0]},{cert[1]}")
    return c


def _nid(ns: int, path: str) -> ua.NodeId:
    return ua.NodeId(path, ns)


class _Handler:
    def __init__(self) -> None:
        self.changes: list[tuple[float, Any]] = []
        self.events: list[tuple[float, Any]] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.changes.append((time.time(), val))

    def event_notification(self, ev: Any) -> None:
        self.events.append((time.time(), ev))


async def _until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


def _produce(s: Any, topic_key: str, schema: str, recs: list[dict[str, Any]], key_field: str) -> list[float]:
    """Produce and return, per record, the wall time its delivery was acknowledged (it is on the topic)."""
    from infra.kafka import producer
    from schemas.catalog import TopicCatalog
    from schemas.serde import serialize

    p = producer(s, client_id=f"opcua-test-{uuid.uuid4().hex[:6]}")
    acked: list[float] = [0.0] * len(recs)
    for i, rec in enumerate(recs):
        value, headers = serialize(schema, rec)

        def on_delivery(err: Any, _msg: Any, i: int = i) -> None:
            assert err is None, err
            acked[i] = time.time()

        p.produce(TopicCatalog(s.topic_prefix).name(topic_key), value=value, key=rec[key_field].encode(),
                  headers=headers, on_delivery=on_delivery)
    assert p.flush(15) == 0
    return acked


def _part_verdict(line: str, part: str, verdict: str) -> dict[str, Any]:
    now = int(time.time() * 1e6)
    return {"part_id": part, "line_id": line, "verdict": verdict, "expected_views": 2,
            "views": [{"camera_id": "cam-1", "frame_id": "f-a", "verdict": "FAIL", "worst_class": "dent",
                       "worst_score": 0.8}],
            "missing_cameras": ["cam-2"] if verdict == "INCOMPLETE" else [], "worst_class": "dent",
            "worst_score": 0.8, "worst_camera": "cam-1", "first_seen_at": now - 50_000, "decided_at": now,
            "reason": "timeout" if verdict == "INCOMPLETE" else ""}


# -- pure logic -------------------------------------------------------------------------------------


def test_result_mapping_follows_the_companion_specs() -> None:
    fail = inspection(line="L1", cam="cam-3", captured_at=1_000_000, fail=True, cls="dent", part_id="P-9")
    r = Result.from_inspection(fail)
    assert (r.line_id, r.station_id, r.result_id, r.part_id) == ("L1", "cam-3", fail["frame_id"], "P-9")
    assert (r.evaluation, r.verdict, r.result_state, r.is_partial) == (EVAL_NOT_OK, "NOT_OK", 1, False)
    assert (r.defect_count, r.defect_classes, r.model_version) == (1, ("dent",), "demo@1")
    ok = Result.from_inspection(inspection(line="L1", cam="cam-3", captured_at=1_000_000))
    assert (ok.evaluation, ok.verdict, ok.defect_count, ok.part_id) == (EVAL_OK, "OK", 0, "")
    inc = Result.from_part_verdict(_part_verdict("L2", "P-7", "INCOMPLETE"))
    assert (inc.station_id, inc.result_id, inc.verdict, inc.is_partial, inc.result_state) == \
        (PART_STATION, "P-7", "NOT_OK", True, STATE_INCOMPLETE)  # never a silent OK
    assert "missing cam-2" in inc.reason
    assert Result.from_part_verdict(_part_verdict("L2", "P-8", "OK")).evaluation == EVAL_OK


def test_users_and_the_no_anonymous_default() -> None:
    users = parse_users(f"# plant floor\n{USER}:{PASSWORD}\nmes:{hash_password('other', iterations=1000)}\n")
    from sinks.opcua import PasswordUserManager

    um = PasswordUserManager(users)
    assert um.get_user(None, USER, PASSWORD) is not None
    assert um.get_user(None, "mes", "other") is not None
    assert um.get_user(None, "mes", "wrong") is None and um.get_user(None, USER, "") is None
    assert um.get_user(None) is None  # anonymous
    with pytest.raises(OpcUaError, match="no way in"):
        OpcUaConfig()  # neither users nor anonymous: refused, not silently open
    with pytest.raises(OpcUaError, match="security"):
        OpcUaConfig(users=users, security=("basic128",))


# -- against the server (one for the module: an asyncua server takes seconds to build its address space) ----


@pytest.fixture(scope="module")
def served(local_stack: Any, tmp_path_factory: pytest.TempPathFactory,
           client_cert: tuple[Path, Path]) -> Iterator[tuple[Any, OpcUaBridge, dict]]:
    """The session stack's Kafka with topics of the module's own, one record already on `inspections`
    (the last result to recover), and the bridge on it: Sign&Encrypt and None endpoints, one user,
    a trust list of one client certificate, the ResultsAck handshake on (buffer 2)."""
    from infra.kafka import create_topics, delete_topics
    from schemas.catalog import TopicCatalog

    s = local_stack.settings(topic_prefix=f"t{uuid.uuid4().hex[:8]}.", kafka_session_timeout_ms=2000,
                             kafka_heartbeat_interval_ms=500, log_format="console")
    create_topics(s, TopicCatalog(s.topic_prefix))
    earlier = inspection(line="L1", cam="cam-2", captured_at=int(time.time() * 1e6), part_id="P-0")
    _produce(s, "inspections", "inspection", [earlier], "camera_id")
    url = f"opc.tcp://127.0.0.1:{free_port()}/sqis/"
    cfg = OpcUaConfig(endpoint=url, security=("sign-encrypt", "none"), users={USER: PASSWORD},
                      cert_dir=tmp_path_factory.mktemp("opcua-pki"), stations=(("L1", "cam-1"),), handshake=True,
                      handshake_buffer=2, client_certs=(client_cert[0],))
    bridge = OpcUaBridge(s, cfg, group_id=f"opcua-{uuid.uuid4().hex[:8]}").start_in_thread()
    try:
        assert bridge.wait_assigned(20), "the feed got no partitions"
        yield s, bridge, earlier
    finally:
        bridge.close()
        with contextlib.suppress(Exception):
            delete_topics(s, [name for name, _ in TopicCatalog(s.topic_prefix).all()])
    assert bridge.error is None


def test_client_without_credentials_is_refused(served: Any, client_cert: tuple[Path, Path]) -> None:
    _, bridge, _ = served
    url = bridge.cfg.endpoint
    refused = bridge.server.users.refused

    async def main() -> None:
        # no user token over the secure channel (anonymous), a wrong password, an unknown user
        for c in (await _client(url, client_cert, user=None), await _client(url, client_cert, password="guess"),
                  await _client(url, client_cert, user="intruder"), await _client(url, None, user=None)):
            with pytest.raises((ua.UaError, ua.UaStatusCodeError)):
                async with c:
                    pass
        async with await _client(url, client_cert) as c:  # the same client with credentials gets in
            assert await c.get_namespace_index(NAMESPACE_URI) >= 1

    asyncio.run(main())
    assert bridge.server.users.refused - refused >= 2  # the password checks (the others fail before them)


def test_only_trusted_client_certificates_get_a_session(served: Any, client_cert: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    _, bridge, _ = served
    other = tmp_path / "other.der", tmp_path / "other-key.pem"
    asyncio.run(setup_self_signed_certificate(other[1], other[0], "urn:sqis:test:client", "localhost",
                                              [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "stranger"}))

    async def main() -> None:
        with pytest.raises(ua.UaStatusCodeError, match="Untrusted"):  # right password, unknown certificate
            async with await _client(bridge.cfg.endpoint, other):
                pass
        c = await _client(bridge.cfg.endpoint, client_cert, user=None)  # the trusted certificate as identity
        await c.load_client_certificate(str(client_cert[0]))
        await c.load_private_key(str(client_cert[1]))
        async with c:
            assert await c.get_namespace_index(NAMESPACE_URI) == 2

    asyncio.run(main())


def test_fail_arrives_at_a_subscribed_client_within_1s(served: Any, client_cert: tuple[Path, Path]) -> None:
    s, bridge, earlier = served

    async def main() -> None:
        async with await _client(bridge.cfg.endpoint, client_cert) as c:
            ns = await c.get_namespace_index(NAMESPACE_URI)
            # on the topic before the server started: shown as the station's last result, without an event
            assert await _until(lambda: bridge.stats.recovered >= 1, 10)
            got = await c.get_node(_nid(ns, "Lines/L1/cam-2/Result/ResultId")).read_value()
            assert got == earlier["frame_id"]
            h = _Handler()
            sub = await c.create_subscription(50, h)
            await sub.subscribe_data_change(c.get_node(_nid(ns, "Lines/L1/cam-1/Result/Evaluation")))
            await sub.subscribe_events(c.get_node(_nid(ns, "Lines/L1/cam-1")),
                                       c.get_node(_nid(ns, "Types/ResultReadyEventType")))
            assert await _until(lambda: len(h.changes) >= 1, 5)  # the initial value (UNDEFINED)
            fail = inspection(line="L1", cam="cam-1", captured_at=int(time.time() * 1e6), fail=True,
                              cls="scratch", part_id="P-1")
            on_topic = (await asyncio.to_thread(_produce, s, "inspections", "inspection", [fail], "camera_id"))[0]
            assert await _until(lambda: any(v == EVAL_NOT_OK for _, v in h.changes), 5), h.changes
            seen = next(t for t, v in h.changes if v == EVAL_NOT_OK)
            assert seen - on_topic < 1.0, f"FAIL seen {seen - on_topic:.3f} s after it was on the topic"
            assert await _until(lambda: len(h.events) >= 1, 2)
            ev = h.events[0][1]
            assert (ev.ResultId, ev.Verdict, ev.Evaluation, ev.PartId, ev.DefectClasses) == \
                (fail["frame_id"], "NOT_OK", EVAL_NOT_OK, "P-1", "scratch")
            assert await c.get_node(_nid(ns, "Lines/L1/cam-1/Result/ResultId")).read_value() == fail["frame_id"]
            # a part verdict over several cameras shows under the line's part station
            await asyncio.to_thread(_produce, s, "part_verdicts", "part_verdict",
                                    [_part_verdict("L1", "P-1", "NG")], "part_id")
            part = c.get_node(_nid(ns, f"Lines/L1/{PART_STATION}/Result/PartId"))
            assert await _until_async(part.read_value, "P-1", 5)
            assert await c.get_node(_nid(ns, f"Lines/L1/{PART_STATION}/Result/Verdict")).read_value() == "NOT_OK"
            await sub.delete()

    asyncio.run(main())
    assert bridge.stats.recovered == 1


async def _until_async(read: Any, want: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await read() == want:
                return True
        except ua.UaStatusCodeError:  # the node is not there yet
            pass
        await asyncio.sleep(0.05)
    return False


def test_results_ack_handshake_releases_one_result_at_a_time(served: Any, client_cert: tuple[Path, Path]) -> None:
    _, bridge, _ = served
    t0 = int(time.time() * 1e6)
    results = [Result("L9", "cam-1", f"r{i}", f"P{i}", EVAL_OK, "OK", 1, False, 0, (), "m@1", t0, t0 + i)
               for i in range(4)]
    acks, dropped = bridge.stats.acks, bridge.stats.dropped_handshake

    async def main() -> None:
        async with await _client(bridge.cfg.endpoint, client_cert) as c:
            ns = await c.get_namespace_index(NAMESPACE_URI)
            bridge.server.offer(results)  # r0 released; r1, r2 held; r3 pushes r1 out (buffer 2)
            base = "Lines/L9/cam-1"
            rid, ready, ack = (c.get_node(_nid(ns, f"{base}/{n}")) for n in
                               ("Result/ResultId", "ResultsReady", "ResultsAck"))
            assert await _until_async(rid.read_value, "r0", 5)
            assert await ready.read_value() is True
            assert await _until_async(c.get_node(_nid(ns, f"{base}/DroppedResults")).read_value, 1, 5)
            for want in ("r2", "r3"):
                await ack.write_value(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
                assert await _until_async(rid.read_value, want, 5)
                assert await ready.read_value() is True and await ack.read_value() is False
            await ack.write_value(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
            assert await _until_async(ready.read_value, False, 5)  # nothing left to release
            # the result variables are read-only for clients
            with pytest.raises(ua.UaStatusCodeError):
                await rid.write_value(ua.DataValue(ua.Variant("forged", ua.VariantType.String)))

    asyncio.run(main())
    assert bridge.stats.acks - acks == 3 and bridge.stats.dropped_handshake - dropped == 1
