"""The API's pure parts, no server: token buckets, key format and hashing, problem details, the spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the api extra: pip install 'sqis[api]'")

ROOT = Path(__file__).resolve().parents[1]


def test_token_bucket_refills_at_the_rate() -> None:
    from api.ratelimit import TokenBuckets, retry_after

    now = [0.0]
    b = TokenBuckets(clock=lambda: now[0])
    assert [b.take("k", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take("k", 2.0, 3)
    assert wait == pytest.approx(0.5) and retry_after(wait) == "1"
    assert b.take("other", 2.0, 3) == 0.0  # per key
    now[0] += 0.5
    assert b.take("k", 2.0, 3) == 0.0 and b.take("k", 2.0, 3) > 0


def test_key_format_hash_and_scopes() -> None:
    from api.keys import KeyRequestError, check_scopes, hash_secret, parse_key

    assert parse_key("sqis_0123abcd4567_" + "A" * 43) == ("0123abcd4567", "A" * 43)
    for bad in ("", "sqis_x_y", "Bearer sqis_0123abcd4567_" + "A" * 43, "sqis_0123abcd4567_short"):
        assert parse_key(bad) is None
    assert hash_secret("s") == hash_secret("s") != hash_secret("t") and len(hash_secret("s")) == 64
    assert check_scopes(["read", "ingest", "read"]) == ["ingest", "read"]
    with pytest.raises(KeyRequestError):
        check_scopes(["admin"])


def test_windows_and_ids_are_checked() -> None:
    from api.errors import ApiError
    from api.ingest import check_id, frame_key
    from api.queries import parse_window

    assert parse_window("15m") == 900 and parse_window("1d") == 86400
    for bad in ("0s", "8d", "1w", "-1h", ""):
        with pytest.raises(ApiError):
            parse_window(bad)
    for bad in ("../x", "a/b", "", "x" * 65, "a b"):
        with pytest.raises(ApiError):
            check_id("camera", bad)
    assert frame_key("l", "c", 0, "f", "png") == "frames/l/c/1970/01/01/f.png"


def test_committed_openapi_is_what_the_app_serves() -> None:
    """docs/openapi.json is generated from the app; regenerate with `sqis api openapi`."""
    from api.app import create_app, openapi_json
    from infra.settings import Settings

    live = openapi_json(create_app(Settings()))
    assert json.loads(live) == json.loads((ROOT / "docs" / "openapi.json").read_text()), \
        "docs/openapi.json is stale: run `sqis api openapi`"
    spec = json.loads(live)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):
                assert op.get("security"), f"{method} {path} has no security requirement"
                assert "429" in op["responses"] and "401" in op["responses"]


class _SlowDetector:
    """Stands in for inference_workers.detector.Detector: sleeps in detect(), finds nothing."""

    name, version = "slow", "1"

    def __init__(self, delay_s: float) -> None:
        from inference_workers.detector import Thresholds

        self.delay_s, self.thresholds = delay_s, Thresholds()

    def detect(self, images):  # type: ignore[no-untyped-def]
        import time

        time.sleep(self.delay_s)
        return [[] for _ in images]


def _fake_services(tmp_path: Path, delay_s: float, queue: int) -> object:
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from api.inspect import InspectModel
    from api.keys import ApiKey
    from inference_workers.inference import OnnxDetector, VerdictPolicy
    from infra.objectstore import open_store
    from infra.settings import Settings
    from schemas.catalog import TopicCatalog

    s = Settings(object_store_url=(tmp_path / "objects").as_uri())
    sent: list[str] = []
    return SimpleNamespace(
        settings=s, catalog=TopicCatalog("t."), store=open_store(s),
        keys=SimpleNamespace(verify=lambda k: ApiKey("kid", "t", frozenset({"inspect"})) if k == "good" else None),
        delivery=SimpleNamespace(send=lambda topic, *a, **kw: sent.append(topic), sent=sent),
        model=InspectModel(OnnxDetector(_SlowDetector(delay_s)), VerdictPolicy(), "slow.onnx", 50_000_000, ("jpeg", "png"),
                           "api:test"),
        model_error="", executor=ThreadPoolExecutor(1), inspect_slots=threading.BoundedSemaphore(queue))


def test_inspect_answers_504_past_its_timeout_and_503_when_the_queue_is_full(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.config import ApiSettings
    from infra.settings import Settings
    from sqis.bench.harness import render_jpegs

    img = render_jpegs(1, 64)[0]
    fake = _fake_services(tmp_path, 0.6, 1)
    app = create_app(Settings(), ApiSettings(inspect_timeout_s=0.2, rate_per_s=1000), services=fake)  # type: ignore[arg-type]
    with TestClient(app) as c:
        def post() -> object:
            return c.post("/v1/inspect", files={"image": ("x.jpg", img, "image/jpeg")},
                          headers={"Authorization": "Bearer good"})

        r = post()
        assert r.status_code == 504 and r.json()["type"].endswith("/inspect-timeout")
        busy = post()  # the first is still on the model (0.6 s), the queue holds 1
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        import time

        time.sleep(0.8)
        fast = create_app(Settings(), ApiSettings(rate_per_s=1000),
                          services=_fake_services(tmp_path, 0.0, 1))  # type: ignore[arg-type]
        with TestClient(fast) as c2:
            ok = c2.post("/v1/inspect", files={"image": ("x.jpg", img, "image/jpeg")},
                         headers={"Authorization": "Bearer good"})
            assert ok.status_code == 200 and ok.json()["verdict"] == "PASS" and ok.json()["source"] == "api"
            assert fast.state.services.delivery.sent == ["t.inspections"]
            assert c2.post("/v1/inspect", files={"image": ("x.jpg", img, "image/jpeg")},
                           headers={"Authorization": "Bearer bad"}).status_code == 401
