"""Detector.infer on a model exported with a fixed batch size (not 1): chunks padded to that size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference_workers.detector import Detector, Thresholds, make_session

FIXED = 4
IMGSZ = 32
NC = 4  # output rows 4 + NC = 8; 3 * 32 * 32 = 8 * 384 anchors


def _fixed_batch_model(path: Path) -> Path:
    """A one-op ONNX model: input [4, 3, 32, 32] reshaped to the YOLOv8 output layout [4, 8, 384]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [FIXED, 3, IMGSZ, IMGSZ])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [FIXED, 4 + NC, 384])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [FIXED, 4 + NC, 384])
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["output0"])], "fixed", [x], [y],
                              initializer=[shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in {"imgsz": str([IMGSZ, IMGSZ]), "stride": "32", "names": str({i: f"c{i}" for i in range(NC)})}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_fixed_batch_model_runs_any_batch_size(tmp_path: Path, n: int) -> None:
    det = Detector(make_session(_fixed_batch_model(tmp_path / "fixed.onnx"), "cpu", 1), Thresholds())
    batch = np.random.default_rng(n).random((n, 3, IMGSZ, IMGSZ), dtype=np.float32)
    out = det.infer(batch)
    assert out.shape == (n, 4 + NC, 384)
    assert np.array_equal(out, batch.reshape(n, 4 + NC, 384))  # row i is image i's output, padding dropped
    images = [np.full((20 + i, 30, 3), 10 * i, np.uint8) for i in range(n)]
    together = det.detect(images)
    assert len(together) == n and together == [det.detect([im])[0] for im in images]


def test_frames_prepared_in_the_fetch_stage_equal_the_batch_preprocess(tmp_path: Path) -> None:
    """The worker letterboxes each frame in its fetch pool (prepare_one) and the infer stage only stacks
    them: the tensors must be bit-identical to preprocess() of the whole batch, for any image shape;
    a frame prepared for another input size or missing is refused (the infer stage then preprocesses)."""
    det = Detector(make_session(_fixed_batch_model(tmp_path / "m.onnx"), providers="cpu"), Thresholds())
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 255, shape, np.uint8) for shape in [(32, 32, 3), (20, 50, 3), (61, 17, 3), (40, 40)]]
    want, want_metas = det.preprocess(images)
    ready = det.batch_prepared([det.prepare_one(im) for im in images])
    assert ready is not None
    got, metas = ready
    assert got.dtype == want.dtype and got.shape == want.shape == (4, 3, IMGSZ, IMGSZ)
    assert np.array_equal(got, want) and metas == want_metas
    np.testing.assert_allclose(det.infer(got), det.infer(want))
    other = det.prepare_one(images[0])
    stale = type(other)(other.tensor, other.meta, (64, 64, "float32"))
    assert det.batch_prepared([det.prepare_one(images[1]), stale]) is None
    assert det.batch_prepared([det.prepare_one(images[1]), None]) is None
    assert det.batch_prepared([]) is None
