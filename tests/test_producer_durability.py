"""Producer durability (#8 items 8, 10, 11, 13): the in-flight journal survives kill -9 and is recovered
(and counted) by the next producer; the spool is per deployment; frames of a camera that never comes
back are replayed by `sqis spool replay`; an unreachable broker makes `sqis produce` say so and exit 1."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from infra.objectstore import open_store
from infra.stack import free_port
from producers import run_producer
from producers.journal import InFlightJournal, recover
from producers.spool import Spool, spool_root
from sqis.cli import run
from tests.test_producers_kafka import _consume

ROOT = Path(__file__).resolve().parents[1]


def _meta(cam: str, seq: int) -> dict[str, Any]:
    return {"frame_id": str(uuid.uuid4()), "line_id": "line-1", "camera_id": cam, "seq": seq,
            "captured_at": 1_764_000_000_000_000 + seq, "width": 16, "height": 16, "encoding": "jpeg",
            "content_sha256": "", "part_id": None, "trigger_id": None, "size_bytes": 0, "truth": None}


def _jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 77, np.uint8))
    assert ok
    return buf.tobytes()


def test_journal_survives_kill_9_and_names_exactly_the_unacknowledged(tmp_path: Path) -> None:
    code = f"""
import os, signal
from producers.journal import InFlightJournal
j = InFlightJournal({str(tmp_path)!r}, "victim", segment_records=2)
for i in range(5):
    j.record({{"frame_id": f"f{{i}}", "uri": f"file:///x/{{i}}.jpg"}})
j.done("f0"); j.done("f1"); j.done("f3")
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == -signal.SIGKILL
    refs, files = recover(tmp_path)
    assert sorted(r["frame_id"] for r in refs) == ["f2", "f4"]
    assert files and all(f.exists() for f in files)
    # f0 and f1's segment was complete: deleted at rotation, nothing to recover there
    assert len(files) == 2


def test_a_live_journal_is_not_recovered(tmp_path: Path) -> None:
    j = InFlightJournal(tmp_path, "alive")
    j.record({"frame_id": "a", "uri": "u"})
    assert recover(tmp_path) == ([], [])  # its owner holds the lock
    j.done("a")
    j.close()
    assert list(tmp_path.iterdir()) == []  # clean shutdown leaves nothing


def test_next_producer_recovers_a_crashed_runs_in_flight_frames(settings_factory: Any, tmp_path: Path) -> None:
    s = settings_factory(state_dir=tmp_path)
    store = open_store(s)
    kept, acked, gone = _meta("cam-01", 1), _meta("cam-01", 2), _meta("cam-01", 3)
    refs = []
    for m in (kept, acked, gone):
        uri = store.put(f"frames/line-1/cam-01/2026/01/01/{m['frame_id']}.jpg", _jpeg())
        refs.append(m | {"uri": uri})
    store.delete(refs[2]["uri"])  # its object is gone too: lost, and counted
    jdir = spool_root(s) / ".journal"
    jdir.mkdir(parents=True)
    lines = [b"+" + json.dumps(r).encode() for r in refs] + [b"-" + acked["frame_id"].encode()]
    (jdir / "dead-1-1-0001.jrnl").write_bytes(b"\n".join(lines) + b"\n" + b'+{"frame_id": "torn')  # torn last line

    stats = run_producer(s, "synthetic", cameras=1, frames=2, seed=1, install_signal_handlers=False)
    assert stats.recovered == 1 and stats.lost_after_crash == 1
    assert stats.spool_pending == 0 and not list(jdir.glob("*.jrnl"))
    got = {r["frame_id"] for _, r in _consume(s, 3)}
    assert kept["frame_id"] in got and acked["frame_id"] not in got and len(got) == 3


def test_spool_is_per_deployment_and_spool_replay_sends_an_absent_cameras_frames(
        settings_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = settings_factory(state_dir=tmp_path)
    b = settings_factory(state_dir=tmp_path)
    sp = Spool(spool_root(a), cameras=["cam-09"], fsync=False)  # a camera of deployment A that never returns
    stranded = [_meta("cam-09", i) for i in range(3)]
    for m in stranded:
        sp.put(m, _jpeg())
    sp.close()

    stats = run_producer(b, "synthetic", cameras=1, frames=2, install_signal_handlers=False)
    assert stats.replayed == 0 and stats.produced == 2  # B never replays A's frames into B's topic
    assert run(["spool", "show", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert a.topic_prefix in out and "cam-09" in out and "sqis spool replay" in out

    flags = ["--state-dir", str(tmp_path), "--topic-prefix", a.topic_prefix, "--bootstrap", a.bootstrap()]
    os.environ["SQIS_OBJECT_STORE_URL"] = a.object_store_url or ""
    try:
        assert run(["spool", "replay", *flags, "--drain-timeout", "30"]) == 0
    finally:
        os.environ.pop("SQIS_OBJECT_STORE_URL", None)
    out = capsys.readouterr().out
    assert "replayed=3" in out and "left=0" in out, out
    got = {r["frame_id"] for _, r in _consume(a, 3)}
    assert got == {m["frame_id"] for m in stranded}


def test_produce_with_unreachable_broker_says_so_and_exits_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")} | {
        "PYTHONPATH": str(ROOT), "SQIS_OBJECT_STORE_URL": (tmp_path / "objects").as_uri()}
    r = subprocess.run([sys.executable, "-m", "sqis", "produce", "--frames", "3", "--drain-timeout", "1",
                        "--bootstrap", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "nothing was published: 3 frames wait in" in err[0], r.stderr
    assert "rdkafka" not in r.stderr and r.stderr.count("\n") < 12, r.stderr


# ---- the pre-deployment spool layout (<state_dir>/spool/<camera>/) ---------------------------------------


def _write_legacy_spool(state_dir: Path, cam: str, metas: list[dict[str, Any]], data: bytes) -> Path:
    """Spool files byte-for-byte as the per-camera Spool.put wrote them before the spool was kept per
    deployment (897953e^:producers/spool.py): magic, header length, compact JSON FrameRef meta, image;
    plus the camera's .lock and a half-written temp file of a crashed run."""
    d = state_dir / "spool" / cam
    d.mkdir(parents=True)
    (d / ".lock").touch()
    for m in metas:
        header = json.dumps(m, separators=(",", ":")).encode()
        name = f"{int(m['captured_at']):017d}-{int(m['seq']):012d}-{m['frame_id']}.spool"
        (d / name).write_bytes(b"SQSPOOL1" + struct.pack(">I", len(header)) + header + data)
    (d / ".tmp-abc123").write_bytes(b"SQSPOOL1\x00\x00")
    return d


def test_legacy_spool_is_never_replayed_by_a_starting_producer_and_is_adopted_into_a_named_deployment(
        settings_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = settings_factory(state_dir=tmp_path)  # the deployment the legacy frames belong to
    b = settings_factory(state_dir=tmp_path)  # another deployment, which starts first
    legacy = [_meta("cam-07", i) for i in range(3)]
    legacy_dir = _write_legacy_spool(tmp_path, "cam-07", legacy, _jpeg())

    os.environ["SQIS_OBJECT_STORE_URL"] = b.object_store_url or ""
    try:
        assert run(["produce", "--frames", "2", "--cameras", "1", "--state-dir", str(tmp_path),
                    "--topic-prefix", b.topic_prefix, "--bootstrap", b.bootstrap()]) == 0
    finally:
        os.environ.pop("SQIS_OBJECT_STORE_URL", None)
    cap = capsys.readouterr()
    assert "produced=2" in cap.out and "replayed=0" in cap.out, cap.out  # not replayed into B's topic
    warned = [ln for ln in cap.err.splitlines() if "old spool layout" in ln]  # the producer's log, once
    assert len(warned) == 2 and "3 frames" in warned[0] and "sqis spool adopt --deployment" in warned[0], cap.err
    assert warned[1].startswith("warning: 3 frames wait in the old spool layout"), cap.err  # and the summary
    assert len(list(legacy_dir.glob("*.spool"))) == 3

    assert run(["spool", "show", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "cam-07" in ln)
    assert row.startswith("legacy (deployment unknown)") and " 3 " in row and "sqis spool adopt" in row, out

    assert run(["spool", "adopt", "--deployment", a.topic_prefix, "--camera", "cam-99",
                "--state-dir", str(tmp_path)]) == 2  # no such legacy camera: one line, nothing moved
    assert len(list(legacy_dir.glob("*.spool"))) == 3
    assert run(["spool", "adopt", "--deployment", a.topic_prefix, "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cam-07: moved 3 frames" in out and f"sqis spool replay --topic-prefix {a.topic_prefix}" in out, out
    assert not legacy_dir.exists()  # emptied (its temp file of a crashed run too) and removed
    assert run(["spool", "show", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "legacy" not in out and any(a.topic_prefix in ln and "cam-07" in ln for ln in out.splitlines()), out

    flags = ["--state-dir", str(tmp_path), "--topic-prefix", a.topic_prefix, "--bootstrap", a.bootstrap()]
    os.environ["SQIS_OBJECT_STORE_URL"] = a.object_store_url or ""
    try:
        assert run(["spool", "replay", *flags, "--drain-timeout", "30"]) == 0
    finally:
        os.environ.pop("SQIS_OBJECT_STORE_URL", None)
    out = capsys.readouterr().out
    assert "replayed=3" in out and "left=0" in out, out
    got_a = _consume(a, 3)
    assert {r["frame_id"] for _, r in got_a} == {m["frame_id"] for m in legacy} and len(got_a) == 3
    assert all(r["camera_id"] == "cam-07" and open_store(a).get(r["uri"]) == _jpeg() for _, r in got_a)
    got_b = _consume(b, 2)
    assert len(got_b) == 2 and not {r["frame_id"] for _, r in got_b} & {m["frame_id"] for m in legacy}


def test_adopt_skips_a_camera_a_running_producer_owns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _write_legacy_spool(tmp_path, "cam-01", [_meta("cam-01", 1)], _jpeg())
    live = Spool(tmp_path / "spool" / "plant-a", cameras=["cam-01"], fsync=False)  # a producer of plant-a runs
    try:
        assert run(["spool", "adopt", "--deployment", "plant-a", "--state-dir", str(tmp_path)]) == 1
    finally:
        live.close()
    assert "cam-01: skipped (a running producer owns" in capsys.readouterr().out
    assert len(list(d.glob("*.spool"))) == 1  # nothing moved
    with open(d / ".lock", "ab") as f:  # an older-version producer still owns the legacy directory
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(["spool", "adopt", "--deployment", "plant-a", "--state-dir", str(tmp_path)]) == 1
    assert "older version" in capsys.readouterr().out and len(list(d.glob("*.spool"))) == 1
    assert run(["spool", "adopt", "--deployment", "plant-a", "--state-dir", str(tmp_path)]) == 0
    assert [e.camera_dir for e in Spool(tmp_path / "spool" / "plant-a", fsync=False).oldest(5)] == ["cam-01"]
    assert run(["spool", "adopt", "--deployment", "plant-a", "--state-dir", str(tmp_path)]) == 0
    assert "no legacy spooled frames" in capsys.readouterr().out
