"""One tiny training run (8 images, imgsz 64, 1 epoch): MLflow logging, ONNX export, parity, registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infra.cli_common import UserError
from infra.settings import Settings
from training.errors import TrainingError

pytestmark = pytest.mark.train
pytest.importorskip("ultralytics", reason="needs the train extra")

NAMES = ["scratch", "patch"]


def build_tiny_dataset(root: Path, n_train: int = 8, n_val: int = 4, n_test: int = 4, size: int = 64) -> Path:
    """A YOLO-layout dataset of grey textures with drawn dark streaks / bright patches (+ card.json)."""
    import cv2
    import yaml

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = cv2.cvtColor(rng.normal(128, 10, (size, size)).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            lines = []
            if i % 4 != 3:  # every fourth image is defect-free
                c = i % 2
                w, h = (int(rng.integers(20, 40)), int(rng.integers(4, 8))) if c == 0 else \
                    (int(rng.integers(12, 24)), int(rng.integers(12, 24)))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                cv2.rectangle(img, (x, y), (x + w, y + h), (40, 40, 40) if c == 0 else (220, 220, 220), -1)
                lines.append(f"{c} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{split}_{i}.png"), img)
            (root / "labels" / split / f"{split}_{i}.txt").write_text("\n".join(lines))
    (root / "data.yaml").write_text(yaml.safe_dump({
        "path": str(root), "train": "images/train", "val": "images/val", "test": "images/test",
        "nc": len(NAMES), "names": dict(enumerate(NAMES)),
    }, sort_keys=False))
    (root / "card.json").write_text(json.dumps({"format": "synthetic", "classes": NAMES}))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, object]:
    from training.train import train

    tmp = tmp_path_factory.mktemp("train")
    data = build_tiny_dataset(tmp / "data")
    settings = Settings(state_dir=tmp / "state", mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                        onnx_providers="cpu", onnx_threads=1)
    # one epoch scores everything far below the default parity conf (0.05): compare at 0.001 instead
    result = train(data, model="yolov8n", imgsz=64, epochs=1, batch=4, workers=0, device="cpu",
                   settings=settings, experiment="test", register_name="tiny-det", conf=0.001, torchscript=True)
    return settings, data, result


def test_train_logs_exports_and_registers(trained: tuple[Settings, Path, object]) -> None:
    from training.registry import client_for, list_versions

    settings, data, result = trained
    assert result.best_pt.is_file() and result.onnx_path is not None and result.onnx_path.is_file()
    assert result.epochs_run == 1
    assert result.parity is not None and result.parity.passed and result.parity.matched > 0
    assert (result.model_name, result.model_version) == ("tiny-det", "1")

    client = client_for(settings)
    run = client.get_run(result.run_id)
    assert run.data.params["imgsz"] == "64"
    assert "max_score_diff" in run.data.tags["parity_tolerance"]
    history = client.get_metric_history(result.run_id, "metrics/mAP50_B")
    assert [m.step for m in history] == [1]  # the final best.pt validation is not a second epoch
    assert "final/map50" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"dataset", "weights", "results.csv", "model", "torchscript"} <= artifacts
    assert "onnx" not in artifacts  # one ONNX per version: the registered copy under model/
    assert [a.path for a in client.list_artifacts(result.run_id, "model")] == ["model/model.onnx"]
    (v,) = list_versions(client, "tiny-det")
    assert len(v.tags["dataset_card_hash"]) == 64 and v.tags["imgsz"] == "[64, 64]"
    from training.dataset_versions import content_digest

    assert v.tags["dataset_digest"] == run.data.tags["dataset_digest"] == content_digest(data)  # the data version
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [content_digest(data)]


def test_torchscript_export_runs_like_the_onnx_model(trained: tuple[Settings, Path, object]) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    _, _, result = trained
    assert result.torchscript_path is not None and result.torchscript_path.is_file()
    ts = torch.jit.load(str(result.torchscript_path), map_location="cpu")
    x = torch.rand(1, 3, 64, 64)
    out = ts(x)
    out = (out[0] if isinstance(out, list | tuple) else out).detach().numpy()
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref.shape == (1, 4 + len(NAMES), ref.shape[2])
    np.testing.assert_allclose(out, ref, atol=1e-2)


def test_evaluate_through_detector(trained: tuple[Settings, Path, object]) -> None:
    from training.evaluate import evaluate

    settings, data, result = trained
    out = evaluate("models:/tiny-det/1", data, "test", settings=settings, latency=True)
    assert out["model"]["version"] == "1" and out["images"] == 4 and out["gt_boxes"] == 3
    assert out["defect_free_images"] == 1
    assert 0.0 <= out["map50"] <= 1.0 and 0.0 <= out["map50_95"] <= out["map50"] + 1e-9
    assert set(out["per_class"]) == set(NAMES)
    assert set(out["latency_ms_per_image"]) >= {"batch1", "batch8"}
    assert out["image_level"]["fpr"] is not None and out["image_level"]["fpr"] <= 0.05


def test_fine_tune_starts_from_the_given_weights(trained: tuple[Settings, Path, object],
                                                 tmp_path: Path) -> None:
    """--weights must carry the checkpoint into training (Ultralytics drops it when pretrained=False).

    With a learning rate of 0 the fine-tuned convolutions equal the checkpoint's; a model rebuilt
    from its yaml would have fresh random ones."""
    import torch

    from training.train import train

    settings, data, first = trained
    tuned = train(data, model="yolov8n", imgsz=64, epochs=1, batch=4, workers=0, device="cpu",
                  weights=first.best_pt, settings=settings, mlflow=False, export=False, parity=False,
                  augment=False, project_dir=tmp_path / "runs",
                  extra_args={"optimizer": "SGD", "lr0": 0.0, "warmup_epochs": 0, "weight_decay": 0.0})

    def first_conv(pt: Path) -> torch.Tensor:
        ckpt = torch.load(str(pt), map_location="cpu", weights_only=False)
        return ckpt["model"].state_dict()["model.0.conv.weight"].float()

    assert torch.allclose(first_conv(tuned.best_pt), first_conv(first.best_pt), atol=1e-3)


def test_average_checkpoints_is_the_mean_and_refuses_other_architectures(
        trained: tuple[Settings, Path, object], tmp_path: Path) -> None:
    import torch

    from training.soup import average_checkpoints

    settings, _, result = trained
    src = torch.load(str(result.best_pt), map_location="cpu", weights_only=False)
    shifted = dict(src)
    net = (src.get("ema") or src["model"]).float()
    other = type(net)(net.yaml, verbose=False)  # same architecture, fresh weights
    other.load_state_dict({k: v + 1.0 if v.dtype.is_floating_point else v for k, v in net.state_dict().items()})
    shifted.update(model=other.half(), ema=None)
    b = tmp_path / "b.pt"
    torch.save(shifted, b)
    soup = average_checkpoints([result.best_pt, b], tmp_path / "soup.pt", state_dir=settings.state_dir)
    out = torch.load(str(soup), map_location="cpu", weights_only=False)
    k = "model.0.conv.weight"
    expected = (net.state_dict()[k] + other.float().state_dict()[k]) / 2
    assert torch.allclose(out["model"].float().state_dict()[k], expected, atol=1e-2)
    assert out["optimizer"] is None and len(out["sqis_average_of"]) == 2

    bigger = dict(src)
    bigger.update(model=type(net)(dict(net.yaml, nc=net.yaml["nc"] + 2), verbose=False).half(), ema=None)
    torch.save(bigger, tmp_path / "c.pt")
    with pytest.raises(TrainingError, match="different architecture"):
        average_checkpoints([result.best_pt, tmp_path / "c.pt"], tmp_path / "x.pt", state_dir=settings.state_dir)
    (tmp_path / "notes.txt").write_text("# not a checkpoint\n")
    with pytest.raises(TrainingError, match="not a PyTorch checkpoint"):
        average_checkpoints([result.best_pt, tmp_path / "notes.txt"], tmp_path / "x.pt", state_dir=settings.state_dir)
    with pytest.raises(TrainingError, match="at least two"):
        average_checkpoints([result.best_pt], tmp_path / "x.pt", state_dir=settings.state_dir)


def test_register_checkpoint(trained: tuple[Settings, Path, object]) -> None:
    from training.train import register_checkpoint

    settings, data, result = trained
    # at the default parity conf the undertrained model yields nothing to compare: not registered ...
    r1 = register_checkpoint(result.best_pt, result.results_csv, data, "tiny-det", settings=settings,
                             experiment="test")
    assert r1.parity is not None and r1.parity.status == "unverified" and r1.parity.matched == 0
    assert r1.model_version is None
    # ... unless forced
    r2 = register_checkpoint(result.best_pt, result.results_csv, data, "tiny-det", settings=settings,
                             experiment="test", allow_unverified_parity=True)
    assert r2.model_version == "2" and r2.parity is not None and r2.parity.status == "unverified"
    from training.registry import client_for

    history = client_for(settings).get_metric_history(r2.run_id, "metrics/mAP50_B")
    assert [m.step for m in history] == [1]


def test_bad_arguments(tmp_path: Path) -> None:
    from training.train import train

    settings = Settings(state_dir=tmp_path / "state")
    with pytest.raises(TrainingError):
        train(tmp_path / "missing", settings=settings, mlflow=False)
    data = build_tiny_dataset(tmp_path / "data", 1, 1, 1)
    with pytest.raises(TrainingError):
        train(data, imgsz=100, settings=settings, mlflow=False)
    with pytest.raises(TrainingError):
        train(data, weights=tmp_path / "nope.pt", settings=settings, mlflow=False)


def test_cli_bad_arguments(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sqis.cli import app

    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing"), "--state-dir", str(tmp_path)])
    assert isinstance(res.exception, TrainingError)
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path),
                                   "--conf", "2", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--conf" in res.output  # refused by the option's range, before any work
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path),
                                   "--class-conf", "scratch=1.5", "--state-dir", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "within [0, 1]" in str(res.exception)


def test_parity_without_images_is_unverified_and_blocks_registration() -> None:
    from training.export import parity_check
    from training.train import parity_blocks_registration

    report = parity_check("unused.pt", "unused.onnx", [])
    assert report.status == "unverified" and not report.passed and report.images == 0
    assert parity_blocks_registration(report)
    assert not parity_blocks_registration(report, allow_unverified=True)
    report.status = "failed"
    assert parity_blocks_registration(report, allow_unverified=True)  # a failed check is never forced
    assert not parity_blocks_registration(None)


def test_golden_images_fall_back_when_val_is_empty(tmp_path: Path) -> None:
    import yaml

    from training.train import golden_images

    data = build_tiny_dataset(tmp_path / "data", 2, 1, 3)
    cfg = yaml.safe_load((data / "data.yaml").read_text())
    (data / "data.yaml").write_text(yaml.safe_dump(cfg | {"val": "images/none"}))
    assert [p.name for p in golden_images(data / "data.yaml")] == [f"test_{i}.png" for i in range(3)]
    (data / "data.yaml").write_text(yaml.safe_dump(cfg | {"val": "images/none", "test": None}))
    assert [p.name for p in golden_images(data / "data.yaml")] == ["train_0.png", "train_1.png"]
