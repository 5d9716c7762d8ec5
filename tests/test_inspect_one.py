"""inference_workers.inspect_one: one image -> Detections -> verdict (once) -> Inspection record, no worker."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import inference_workers
from inference_workers.detector import Thresholds
from inference_workers.fetch import FrameError, ImageTooLarge, UnsupportedEncoding
from inference_workers.inference import VerdictPolicy, inspect_one, load_served
from inference_workers.verdict import decide
from infra.settings import Settings
from schemas.serde import deserialize, serialize
from schemas.verdict_rules import parse_rules

REF = {"frame_id": "00000000-0000-0000-0000-000000000001", "line_id": "l1", "camera_id": "cam-1", "seq": 3,
       "captured_at": 1_700_000_000_000_000, "uri": "file:///frame.jpg"}


def test_inspect_one_builds_a_valid_record_with_one_verdict(onnx_model_path: Path, tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, onnx_providers="cpu", onnx_threads=1)
    model = load_served(s, str(onnx_model_path), Thresholds(default_score=0.01))
    img = np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    rec = inspect_one(jpeg, REF, model)
    got = deserialize("inspection", *serialize("inspection", rec))
    assert got["frame_id"] == REF["frame_id"] and (got["width"], got["height"]) == (140, 90)
    assert got["model_name"] == model.name and got["batch_size"] == 1 and got["segmenter"] is None
    dets = model.run([cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)]).results[0]
    assert not isinstance(dets, Exception) and len(got["detections"]) == len(dets)
    assert got["verdict"] == decide(dets, model.thresholds)

    # sizes and rules: decided from the same columns, box sizes in mm, the fired rules recorded
    policy = VerdictPolicy(tuple(parse_rules("length_mm>1000")), {"cam-1": 0.5}, None, sized=True)
    sized = inspect_one(img, REF, model, policy=policy)
    assert sized["detections"], "the untrained model at 0.01 finds boxes"
    d = sized["detections"][0]
    w, h = d["x2"] - d["x1"], d["y2"] - d["y1"]
    assert d["area_mm2"] == pytest.approx(w * h * 0.25, rel=1e-5)
    assert sized["verdict"] == "PASS" and sized["verdict_rules"] == []  # no defect 1 m long

    assert inference_workers.inspect_one is inspect_one  # the package-level name the HTTP API uses
    # bytes are decoded as the worker's fetch stage decodes a frame: refused the same way
    with pytest.raises(FrameError, match="no readable image header"):
        inspect_one(b"not an image", REF, model)
    with pytest.raises(ImageTooLarge):
        inspect_one(jpeg, REF, model, max_pixels=140 * 90 - 1)
    with pytest.raises(UnsupportedEncoding):
        inspect_one(jpeg, REF, model, encodings=("png",))


def test_api_inspects_through_inspect_one(onnx_model_path: Path, tmp_path: Path) -> None:
    """POST /v1/inspect's model call is the worker's one-image path: same record (verdict, rules, sizes,
    image statistics) as inspect_one on the served model with the settings' verdict policy."""
    from api.inspect import inspect_image, load_model

    s = Settings(state_dir=tmp_path, onnx_providers="cpu", onnx_threads=1, verdict_rules="length_mm>5",
                 camera_pixel_mm={"cam-1": 0.5})
    api_model = load_model(s, str(onnx_model_path))
    img = np.random.default_rng(1).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    got = inspect_image(api_model, jpeg, REF)
    want = inspect_one(jpeg, REF, load_served(s, str(onnx_model_path)), policy=VerdictPolicy.from_settings(s),
                       worker_id=api_model.worker_id)
    volatile = ("inspected_at", "timings")
    assert {k: v for k, v in got.items() if k not in volatile} == {k: v for k, v in want.items() if k not in volatile}
    assert got["image_stats"] is not None and got["verdict_rules"] is not None  # the worker's record, in full
    deserialize("inspection", *serialize("inspection", got))
    with pytest.raises(FrameError):  # an image the worker refuses: the API answers 422 for it
        inspect_image(api_model, b"\xff\xd8 truncated", REF)
