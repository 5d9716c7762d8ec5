"""INT8 quantization on the committed demo model and a small synthetic dataset: the quantized file runs
through the workers' model path, the parity report, the accuracy gate (refusal included, through the
CLI), and the OpenVINO provider (skipped with the reason when the `openvino` extra is missing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="INT8 quantization needs onnx (the `train` extra)")

from inference_workers.detector import Detector, make_session  # noqa: E402
from infra.settings import Settings  # noqa: E402
from training.quantize import check_gate, fp32_nodes, parity_report, quantize, quantize_onnx  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.onnx"
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the OpenVINO runtime is not installed (pip install 'sqis[openvino]')")


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 frames of the synthetic camera the demo model was trained on (its classes), imported."""
    from producers.synthetic import generate_dataset
    from training.importers import import_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "raw", 60, seed=11, size=256, defect_rate=0.85)
    import_dataset("yolo", root / "raw", root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(state_dir=tmp_path_factory.mktemp("state"), onnx_providers="cpu", onnx_threads=1)


@pytest.fixture(scope="module")
def int8_model(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.evaluate import split_images

    out = tmp_path_factory.mktemp("int8") / "model-int8.onnx"
    info = quantize_onnx(DEMO, out, split_images(synth_data, "val")[:8], keep_fp32="decode")
    assert info["quantize_linear_nodes"] > 50 and info["dst_bytes"] < info["src_bytes"] / 2
    return out


def test_fp32_policies_pick_the_detect_head() -> None:
    import onnx

    m = onnx.load(str(DEMO))
    ops = {n.name: n.op_type for n in m.graph.node}
    decode, head, whole = (fp32_nodes(m, k) for k in ("decode", "head", "head-all"))
    assert fp32_nodes(m, "none") == []
    assert set(decode) < set(head) < set(whole)
    assert all(n.startswith("/model.22/") for n in whole)  # YOLOv8n's Detect module
    assert not any(ops[n] == "Conv" for n in head) and any(ops[n] == "Conv" for n in whole)
    assert any(ops[n] == "Softmax" for n in decode)  # the DFL
    assert not any(n.endswith("/act/Sigmoid") for n in decode)  # the head's SiLU runs INT8


def test_int8_model_runs_through_the_worker_model_path(int8_model: Path, settings: Settings) -> None:
    from inference_workers.model_loader import load_detector

    fp32 = load_detector(settings, str(DEMO))
    det = load_detector(settings, str(int8_model))
    assert det.class_names == fp32.class_names and det.imgsz == fp32.imgsz
    assert det.name == fp32.name and det.version == f"{fp32.version}-int8"  # never passes for its FP32 source
    det.warmup(2)
    img = np.full((240, 320, 3), 90, np.uint8)
    assert len(det.detect([img, img])) == 2


def test_parity_report_has_score_and_box_differences(int8_model: Path, synth_data: Path) -> None:
    from training.evaluate import split_images

    ref = Detector(make_session(DEMO, "cpu", 1), path=str(DEMO))
    q = Detector(make_session(int8_model, "cpu", 1), path=str(int8_model))
    images = split_images(synth_data, "val")[:6]
    p = parity_report(ref, q, images)
    assert p["images"] == 6
    assert 0 < p["raw_score_abs_diff"]["max"] < 0.5 and p["raw_score_abs_diff"]["mean"] < 0.01
    b = p["boxes"]
    assert b["fp32"] > 0 and b["matched"] + b["fp32_only"] == b["fp32"] and b["matched"] + b["int8_only"] == b["int8"]
    assert b["matched_share"] >= 0.5 and p["matched_iou"]["min"] >= 0.5
    assert p["matched_score_abs_diff"]["max"] is not None
    same = parity_report(ref, ref, images[:2])
    assert same["raw_score_abs_diff"]["max"] == 0 and same["boxes"]["fp32_only"] == 0


def test_gate_figures() -> None:
    fp32 = {"map50": 0.754, "image_score": None, "image_recall_at_operating": 0.98}
    assert check_gate(fp32, {"map50": 0.745}).passed  # drop 0.009
    g = check_gate(fp32, {"map50": 0.740})
    assert not g.passed and "drop 0.014 > 0.01" in g.reasons[0]
    kol = {"map50": 0.215, "image_score": 0.027, "image_recall_at_operating": 1.0}
    g = check_gate(kol, {"map50": 0.215, "image_recall_at_operating": 0.9})
    assert not g.passed and g.reasons == ["image recall at the calibrated operating point 0.900 vs FP32 1.000"]
    assert check_gate(kol, {"map50": 0.22, "image_recall_at_operating": 1.0}).passed


def test_gate_refuses_a_destroyed_decode_via_the_cli(synth_data: Path, settings: Settings, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from sqis.cli import run

    out = tmp_path / "whole-int8.onnx"
    # 'none': the box decode and concat quantized too -> every box collapses (mAP 0 on NEU-DET)
    rc = run(["model", "quantize", "--model", str(DEMO), "--data", str(synth_data), "--out", str(out),
              "--keep-fp32", "none", "--calib-images", "8", "--state-dir", str(settings.state_dir)])
    err = capsys.readouterr().err
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: QuantizeRefused: INT8 model refused by the accuracy gate: keep-fp32 none: mAP@0.5 0.")
    assert "> 0.01)" in line and "Traceback" not in err
    assert not out.exists()  # nothing left to serve by mistake


def test_quantize_passes_the_gate_and_reports(synth_data: Path, settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "model-int8.onnx"
    r = quantize(str(DEMO), synth_data, out, settings=settings, calib_images=8, keep_fp32="decode",
                 max_map_drop=0.05, parity_images=4)
    d = r.to_dict()
    assert out.is_file() and d["gate"]["passed"] and d["quantization"]["keep_fp32"] == "decode"
    assert d["gate"]["fp32"]["map50"] > 0.3 and d["gate"]["int8"]["map50"] >= d["gate"]["fp32"]["map50"] - 0.05
    assert d["parity"]["images"] == 4
    json.dumps(d)  # the report is what the CLI writes next to the model


@needs_openvino
def test_openvino_provider_runs_fp32_and_int8(int8_model: Path, settings: Settings) -> None:
    from inference_workers.model_loader import load_detector

    ov_settings = settings.model_copy(update={"onnx_providers": "openvino"})
    img = np.full((256, 256, 3), 100, np.uint8)
    img[100:140, 60:200] = 30
    ort_det = load_detector(settings, str(DEMO))
    ov_det = load_detector(ov_settings, str(DEMO))
    assert ov_det.providers == ["OpenVINO"] and ov_det.class_names == ort_det.class_names
    batch, _ = ort_det.preprocess([img, img])
    a, b = ort_det.infer(batch), ov_det.infer(batch)
    assert a.shape == b.shape and float(np.abs(a[:, 4:] - b[:, 4:]).max()) < 1e-3  # FP32 means FP32 (no bf16)
    ov8 = load_detector(ov_settings, str(int8_model))
    assert ov8.version.endswith("-int8") and len(ov8.detect([img] * 3)) == 3


def test_openvino_provider_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from inference_workers.detector import DetectorError

    real = builtins.__import__

    def no_openvino(name: str, *a: object, **k: object) -> object:
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(DetectorError, match=r"pip install 'sqis\[openvino\]'"):
        make_session(DEMO, "openvino", 1)


def test_bench_providers_side_by_side(int8_model: Path) -> None:
    from sqis.bench.providers import bench_providers, parse_providers

    assert parse_providers("cpu, openvino-int8") == [("cpu", "cpu", False), ("openvino-int8", "openvino", True)]
    with pytest.raises(ValueError, match="choose from"):
        parse_providers("cpu,npu")
    provs = "cpu,cpu-int8" + (",openvino-int8" if importlib.util.find_spec("openvino") else "")
    out = bench_providers([str(DEMO)], provs, int8=[str(int8_model)], batches=(1, 2), runs=2, warmup=1, threads=1,
                          repeat=2)
    rows = {r["provider"]: r for r in out["results"]}
    assert set(rows) == set(provs.split(","))
    assert rows["cpu-int8"]["file"] == str(int8_model) and len(rows["cpu"]["rounds"]) == 2
    s = rows["cpu-int8"]["summary"]["2"]
    assert s["fps_worst"] <= s["fps_median"] and s["p95_ms_worst"] >= s["p95_ms_median"]
    assert rows["cpu"]["speedup_vs_cpu"]["1"] == 1.0
