"""`sqis dlq replay` (#8 item 3) against the real broker: by reason, time and offsets, with a dry run;
replayed frames keep their bytes (so their frame_id); truncated records are skipped, never half-sent."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from inference_workers.dlq import ReplayFilter
from infra.kafka import producer
from schemas.catalog import TopicCatalog
from schemas.deadletter import dead_letter
from schemas.serde import serialize
from sqis.bench.harness import TopicCollector
from sqis.cli import run


def _frame_ref(i: int) -> dict[str, Any]:
    return {"frame_id": str(uuid.uuid4()), "line_id": "line-1", "camera_id": "cam-01", "seq": i,
            "captured_at": 1_764_000_000_000_000 + i, "uri": f"file:///nowhere/{i}.jpg", "width": 32, "height": 32,
            "encoding": "jpeg", "content_sha256": "0" * 64, "part_id": None, "trigger_id": None, "size_bytes": 0,
            "truth": None}


def _seed_dlq(s: Any) -> list[dict[str, Any]]:
    """Three dead letters: two store_unavailable (offsets 10, 11), one corrupt_image (12), one truncated (13)."""
    cat = TopicCatalog(s.topic_prefix)
    p = producer(s, client_id="seed")
    refs = [_frame_ref(i) for i in range(4)]
    reasons = ["store_unavailable", "store_unavailable", "corrupt_image", "store_unavailable"]
    for i, (ref, reason) in enumerate(zip(refs, reasons, strict=True)):
        value, headers = serialize("frame_ref", ref)
        if i == 3:
            value = value + b"\x00" * 300_000  # too big to keep whole: the DLQ truncates it
        dv, dh = dead_letter(source_topic=cat.frames, source_partition=0, source_offset=10 + i, key=b"cam-01",
                             value=value, headers=headers, error_type=reason, error_message="x", worker_id="w",
                             frame_id=ref["frame_id"], failed_at_us=int(time.time() * 1e6) - (3 - i) * 1000)
        p.produce(cat.frames_dlq, value=dv, key=b"cam-01", headers=dh)
    assert p.flush(30) == 0
    return refs


def _flags(s: Any) -> list[str]:
    return ["--bootstrap", s.bootstrap(), "--topic-prefix", s.topic_prefix, "--state-dir", str(s.state_dir),
            "--idle-s", "1.5"]


def test_replay_by_reason_keeps_frame_ids_and_skips_truncated(settings_factory: Any,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_factory()
    refs = _seed_dlq(s)
    assert run(["dlq", "replay", "--reason", "store_unavailable", "--dry-run", *_flags(s)]) == 0
    out = capsys.readouterr()
    assert out.out.count("would replay frames") == 0 and out.out.count("would replay ") == 3  # 2 lines + summary
    assert "would replay 2, skipped 1" in out.out and "truncated" in out.err
    frames = TopicCollector(s, "frames")
    try:
        time.sleep(1.0)
        assert frames.records == []  # the dry run sent nothing

        assert run(["dlq", "replay", "--reason", "store_unavailable", *_flags(s)]) == 0
        assert "replayed 2, skipped 1" in capsys.readouterr().out
        deadline = time.monotonic() + 30
        while len(frames.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert sorted(r["frame_id"] for r in frames.records) == sorted([refs[0]["frame_id"], refs[1]["frame_id"]])
        assert frames.records[0] in (refs[0], refs[1])  # byte-identical FrameRefs
    finally:
        frames.close()


def test_replay_by_offsets_and_time(settings_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_factory()
    _seed_dlq(s)
    assert run(["dlq", "replay", "--partition", "0", "--from-offset", "12", "--to-offset", "12", "--dry-run",
                *_flags(s)]) == 0
    out = capsys.readouterr().out
    assert "@12 -> " in out and "reason=corrupt_image" in out and "would replay 1, skipped 0" in out
    assert run(["dlq", "replay", "--since", "2099-01-01", "--dry-run", *_flags(s)]) == 0
    assert "would replay 0, skipped 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--from-offset", "3"], ["--partition", "0", "--from-offset", "5", "--to-offset", "4"],
                                  ["--since", "last tuesday"]])
def test_replay_bad_options_are_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["dlq", "replay", *argv, "--bootstrap", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_filter_is_a_conjunction() -> None:
    rec = {"error_type": "store_unavailable", "failed_at": 100, "source_partition": 1, "source_offset": 7}
    assert ReplayFilter().match(rec)
    assert ReplayFilter(reasons=("store_unavailable",), since_us=100, until_us=101, partition=1, from_offset=7,
                        to_offset=7).match(rec)
    assert not ReplayFilter(reasons=("corrupt_image",)).match(rec)
    assert not ReplayFilter(until_us=100).match(rec)
    assert not ReplayFilter(partition=1, from_offset=8).match(rec)
