"""Benchmark pieces without a long run: targets from medians, the offered-load plot, GPU provider options
(and the model on CUDA/TensorRT where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_workers.detector import provider_options
from sqis.bench.pipeline import plot_offered_load, steady_fps, targets


def test_targets_are_medians_of_the_runs() -> None:
    runs = [{"ratio_pipeline_to_bare": r, "p95_at_70pct_minus_bare_batch_p95_ms": m}
            for r, m in [(0.90, 80.0), (0.97, 30.0), (0.96, 40.0), (0.99, 20.0), (0.50, 300.0)]]
    t = targets(runs)
    assert t["median_ratio_pipeline_to_bare"] == 0.96 and t["ratio_met"]
    assert t["median_p95_at_70pct_minus_bare_batch_p95_ms"] == 40.0 and t["latency_met"]
    assert not targets(runs[:1])["ratio_met"] and not targets(runs[4:])["latency_met"]


def test_steady_fps_leaves_out_the_pipeline_fill() -> None:
    # first batch of 4 lands at t=1.0 (the fill), then 4 batches of 4 every 0.1 s: 16 frames in 0.4 s
    arrived = [1.0] * 4 + [1.1] * 4 + [1.2] * 4 + [1.3] * 4 + [1.4] * 4
    assert steady_fps(list(reversed(arrived)), [4] * 20) == 40.0  # order of arrival, not of the list
    assert steady_fps([2.0, 2.0], [8, 8]) is None and steady_fps([], []) is None


def test_targets_also_report_the_steady_state_ratio() -> None:
    t = targets([{"ratio_pipeline_to_bare": 0.93, "ratio_steady_to_bare": 0.99}])
    assert t["median_ratio_steady_to_bare"] == 0.99 and t["ratios_steady"] == [0.99]
    assert not t["ratio_met"]  # the target is judged on the end-to-end ratio


def test_offered_load_plot_is_a_png(tmp_path: Path) -> None:
    rows = [{"offered_pct": p, "offered_fps": p / 10, "throughput_fps": min(p, 100) / 10, "p95_ms": 50 + p}
            for p in (20, 60, 100, 120)]
    out = plot_offered_load(rows, tmp_path / "docs" / "load.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_gpu_provider_options(tmp_path: Path) -> None:
    (trt, trt_opts), (cuda, cuda_opts), (cpu, cpu_opts) = provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], fp16=True,
        engine_cache_dir=tmp_path / "cache", device_id=1)
    assert trt_opts["trt_fp16_enable"] and trt_opts["trt_engine_cache_enable"]
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert trt_opts["device_id"] == 1 and cuda_opts["device_id"] == 1 and cpu_opts == {}
    (_, no_cache), = provider_options(["TensorrtExecutionProvider"])
    assert "trt_engine_cache_enable" not in no_cache and no_cache["trt_fp16_enable"] is False


@pytest.mark.parametrize("provider, ep", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_model_runs_on_the_gpu_provider(provider: str, ep: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if ep not in ort.get_available_providers():
        pytest.skip(f"{ep} not in this onnxruntime build (no GPU here; install the gpu extra on a GPU host)")
    from inference_workers.model_loader import demo_model_path
    from sqis.bench.pipeline import bench_model

    model = demo_model_path()
    assert model is not None
    out = bench_model(str(model), provider=provider, batches=(1, 4), runs=5, warmup=2, fp16=provider == "tensorrt",
                      engine_cache_dir=tmp_path / "trt")
    assert out["providers"][0] == ep and out["batches"]["4"]["fps"] > 0
    if provider == "tensorrt":
        assert any((tmp_path / "trt").iterdir())  # the engine was cached
