"""MLflow registry helpers, models:/ URI resolution and ModelWatcher hot-swap (sqlite store in tmp)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from inference_workers.detector import DetectorError, Thresholds
from inference_workers.model_loader import ModelWatcher, load_detector, parse_model_uri, resolve_model
from infra.settings import Settings
from training.errors import TrainingError
from training.registry import client_for, ensure_experiment, list_versions, promote, register_onnx

NAMES = {0: "scratch", 1: "patch"}


def make_onnx(path: Path, imgsz: int = 64, bias: float = 0.0) -> Path:
    """A tiny hand-built ONNX with a YOLOv8-shaped output [b, 4+nc, N] and Ultralytics' metadata."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nc = len(NAMES)
    rng = np.random.default_rng(int(bias * 100))
    w = rng.normal(0, 0.1, (4 + nc, 3, 16, 16)).astype(np.float32)
    b = np.full(4 + nc, bias, np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["c"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + nc, "anchors"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(np.array([0, 4 + nc, -1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for k, v in {"imgsz": [imgsz, imgsz], "names": NAMES, "stride": 32}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    onnx_providers="cpu", onnx_threads=1)


def _register(settings: Settings, onnx_path: Path, name: str, **tags: Any) -> str:
    client = client_for(settings)
    run = client.create_run(ensure_experiment(client, settings, "test"))
    version = register_onnx(client, run, onnx_path, name, tags=tags)
    client.set_terminated(run.info.run_id)
    return version


def test_parse_model_uri() -> None:
    assert parse_model_uri("models:/det@production") == ("det", "production", None)
    assert parse_model_uri("models:/det/3") == ("det", None, "3")
    with pytest.raises(DetectorError):
        parse_model_uri("models:/det")


def test_register_promote_resolve(settings: Settings, tmp_path: Path) -> None:
    v1 = _register(settings, make_onnx(tmp_path / "a.onnx"), "det", imgsz=64)
    v2 = _register(settings, make_onnx(tmp_path / "b.onnx", bias=0.5), "det")
    assert (v1, v2) == ("1", "2")
    client = client_for(settings)
    promote(client, "det", v1, "production")
    versions = list_versions(client, "det")
    assert [(v.version, v.aliases) for v in versions] == [("2", []), ("1", ["production"])]
    assert versions[1].tags["imgsz"] == "64"

    r = resolve_model(settings, "models:/det@production")
    assert (r.name, r.version) == ("det", "1") and r.path.is_file()
    det = load_detector(settings, "models:/det@production", Thresholds())
    assert (det.name, det.version, det.class_names) == ("det", "1", ["scratch", "patch"])
    # the registered file carries its registry name/version in its metadata
    import onnxruntime as ort

    meta = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert (meta["sqis_model_name"], meta["sqis_model_version"]) == ("det", "1")
    assert resolve_model(settings, "models:/det/2").version == "2"
    with pytest.raises(DetectorError):
        resolve_model(settings, "models:/det@staging")


def test_watcher_swaps_on_promotion_and_survives_registry_outage(settings: Settings, tmp_path: Path) -> None:
    _register(settings, make_onnx(tmp_path / "a.onnx"), "det")
    _register(settings, make_onnx(tmp_path / "b.onnx", bias=0.5), "det")
    client = client_for(settings)
    promote(client, "det", "1")
    watcher = ModelWatcher(settings, "models:/det@production", Thresholds(default_score=0.1), poll_s=3600)
    assert watcher.current.version == "1"
    assert watcher.maybe_reload() is False  # not due yet
    assert watcher.maybe_reload(force=True) is False  # due, but the alias has not moved
    promote(client, "det", "2")
    assert watcher.maybe_reload(force=True) is True
    assert watcher.current.version == "2"
    assert watcher.current.thresholds.default_score == 0.1
    img = np.zeros((80, 120, 3), np.uint8)
    assert len(watcher.current.detect([img])) == 1

    class DownClient:
        def __getattr__(self, name: str) -> Any:
            def fail(*a: Any, **k: Any) -> Any:
                raise ConnectionError("registry unreachable")
            return fail

    watcher._client = DownClient()  # type: ignore[assignment]
    promote(client, "det", "1")
    assert watcher.maybe_reload(force=True) is False
    assert watcher.current.version == "2" and watcher.failures == 1


def test_watcher_background_thread(settings: Settings, tmp_path: Path) -> None:
    _register(settings, make_onnx(tmp_path / "a.onnx"), "det")
    _register(settings, make_onnx(tmp_path / "b.onnx", bias=0.5), "det")
    client = client_for(settings)
    promote(client, "det", "1")
    with ModelWatcher(settings, "models:/det@production", poll_s=0.2).start() as watcher:
        promote(client, "det", "2")
        done = threading.Event()
        for _ in range(300):  # up to ~60 s on a busy machine
            if watcher.maybe_reload():
                done.set()
                break
            done.wait(0.2)
        assert done.is_set() and watcher.current.version == "2"


def test_model_cli(settings: Settings, tmp_path: Path) -> None:
    from sqis.cli import app

    _register(settings, make_onnx(tmp_path / "a.onnx"), "det", **{"metric.map50": 0.5})
    args = ["--state-dir", str(settings.state_dir), "--tracking-uri", settings.tracking_uri()]
    runner = CliRunner()
    res = runner.invoke(app, ["model", "promote", "det", "1", "--alias", "production", *args])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["model", "list", "det", "--json", *args])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert rows[0]["version"] == "1" and rows[0]["aliases"] == ["production"]
    res = runner.invoke(app, ["model", "promote", "det", "9", *args])
    assert res.exit_code != 0


def test_export_version_writes_run_metrics_history_and_artifact_hash(settings: Settings, tmp_path: Path) -> None:
    import hashlib

    from sqis.cli import app
    from training.registry import export_version

    client = client_for(settings)
    run = client.create_run(ensure_experiment(client, settings, "test"), run_name="r1")
    rid = run.info.run_id
    client.log_param(rid, "imgsz", "64")
    for step, v in ((1, 0.2), (2, 0.35), (3, 0.5)):
        client.log_metric(rid, "metrics/mAP50_B", v, step=step)
    client.log_metric(rid, "final/map50", 0.5, step=3)
    onnx_file = make_onnx(tmp_path / "a.onnx")
    version = register_onnx(client, run, onnx_file, "det", tags={"metric.map50": 0.5})
    client.set_terminated(rid)
    promote(client, "det", version, "production")
    # one ONNX copy per version: the registered (stamped) file under the run's model/ folder
    assert [a.path for a in client.list_artifacts(rid)] == ["model"]
    assert [a.path for a in client.list_artifacts(rid, "model")] == ["model/model.onnx"]

    out = export_version(settings, "det", version, tmp_path / "out")
    assert out == tmp_path / "out" / "mlflow_export.json"
    doc = json.loads(out.read_text())
    assert (doc["name"], doc["version"], doc["aliases"], doc["run_id"]) == ("det", "1", ["production"], rid)
    assert doc["tags"]["metric.map50"] == "0.5" and doc["params"] == {"imgsz": "64"}
    assert doc["metrics"] == {"final/map50": 0.5, "metrics/mAP50_B": 0.5}
    assert [(h["step"], h["value"]) for h in doc["metric_history"]["metrics/mAP50_B"]] == [(1, 0.2), (2, 0.35), (3, 0.5)]
    registered = resolve_model(settings, "models:/det/1").path
    assert doc["artifact"]["sha256"] == hashlib.sha256(registered.read_bytes()).hexdigest()
    assert doc["artifact"]["sha256"] != hashlib.sha256(onnx_file.read_bytes()).hexdigest()  # stamped copy

    args = ["--state-dir", str(settings.state_dir), "--tracking-uri", settings.tracking_uri()]
    res = CliRunner().invoke(app, ["model", "export", "det", "1", str(tmp_path / "cli"), *args])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli" / "mlflow_export.json").read_text()) == doc
    res = CliRunner().invoke(app, ["model", "export", "det", "7", str(tmp_path / "cli"), *args])
    assert isinstance(res.exception, TrainingError) and "no version 7" in str(res.exception)


def test_workers_sharing_a_state_dir_download_a_version_concurrently(settings: Settings, tmp_path: Path) -> None:
    """Several workers on one host resolve a just-promoted version at once into the shared model cache."""
    _register(settings, make_onnx(tmp_path / "a.onnx"), "det")
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def resolve() -> None:
        barrier.wait()
        try:
            results.append(resolve_model(settings, "models:/det/1").path.read_bytes())
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r for r in results if isinstance(r, Exception)] == [] and len(results) == 4
    assert len(set(results)) == 1
    assert [p.name for p in (settings.state_dir / "model_cache" / "det").iterdir()] == ["1"]  # no leftovers


def _tiny_split_dataset(root: Path, n: int = 8) -> Path:
    """val/test images (64 px), every other one defect-free, classes scratch/patch."""
    import cv2
    import yaml

    rng = np.random.default_rng(1)
    for sp in ("train", "val", "test"):
        (root / "images" / sp).mkdir(parents=True)
        (root / "labels" / sp).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / sp / f"{sp}{i}.png"), rng.integers(0, 255, (64, 64, 3), np.uint8))
            (root / "labels" / sp / f"{sp}{i}.txt").write_text("" if i % 2 else f"{i % 2} 0.5 0.5 0.4 0.3\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                                    "test": "images/test",
                                                    "names": NAMES}))
    return root


def test_calibrated_thresholds_travel_with_the_model_version(settings: Settings, tmp_path: Path) -> None:
    """sqis calibrate stores the operating point on the version; models:/NAME@alias serves it by default,
    explicit thresholds still win, eval reports at it, and model list (no name) lists every model."""
    from training.calibrate import calibrate
    from training.evaluate import evaluate

    _register(settings, make_onnx(tmp_path / "a.onnx", bias=0.3), "det")
    _register(settings, make_onnx(tmp_path / "b.onnx"), "other")
    promote(client_for(settings), "det", "1", "production")
    data = _tiny_split_dataset(tmp_path / "data")
    cal = calibrate("models:/det@production", data, "val", max_fpr=None, target_recall=1.0, settings=settings,
                    out_dir=tmp_path / "cal")
    assert cal.point is not None and cal.point.recall == 1.0 and cal.point.threshold <= 1.0
    assert cal.stored[0] == "models:/det/1 tag sqis.thresholds"
    assert (tmp_path / "cal" / "calibration.png").stat().st_size > 1000
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["chosen"]["threshold"] == cal.point.threshold

    det = load_detector(settings, "models:/det@production")
    assert det.thresholds.source == "calibrated:models:/det/1"
    assert det.thresholds.image_score == pytest.approx(cal.point.threshold)
    assert load_detector(settings, "models:/det@production", Thresholds(0.5)).thresholds.image_score is None
    assert load_detector(settings, "models:/other/1").thresholds.source == "settings"
    with ModelWatcher(settings, "models:/det@production", poll_s=3600) as w:
        assert w.current.thresholds.source == "calibrated:models:/det/1"

    out = evaluate("models:/det@production", data, "val", settings=settings)
    assert out["thresholds"]["source"] == "calibrated:models:/det/1"
    assert out["image_level"]["at_operating"]["fpr"] == pytest.approx(cal.point.frr)
    assert out["image_level"]["at_operating"]["recall"] == pytest.approx(cal.point.recall)

    args = ["--state-dir", str(settings.state_dir), "--tracking-uri", settings.tracking_uri()]
    res = CliRunner().invoke(__import__("sqis.cli", fromlist=["app"]).app, ["model", "list", "--json", *args])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(r["name"] for r in rows) == ["det", "other"]
    assert "sqis.thresholds" in next(r for r in rows if r["name"] == "det")["tags"]


def test_two_versions_from_one_run_keep_their_own_files(settings: Settings, tmp_path: Path) -> None:
    """A second registration from one run (another version, or another name) does not overwrite the first
    version's model.onnx: each version resolves to its own file, stamped with its own version."""
    import hashlib

    import onnxruntime as ort

    client = client_for(settings)
    run = client.create_run(ensure_experiment(client, settings, "test"))
    rid = run.info.run_id
    a, b = make_onnx(tmp_path / "a.onnx"), make_onnx(tmp_path / "b.onnx", bias=0.5)
    assert (register_onnx(client, run, a, "det"), register_onnx(client, run, b, "det")) == ("1", "2")
    assert register_onnx(client, rid, a, "other") == "1"
    client.set_terminated(rid)
    assert sorted(x.path for x in client.list_artifacts(rid)) == ["model", "model-2", "model-3"]

    def weights(p: Path) -> str:  # the graph without the metadata stamp
        import onnx

        return hashlib.sha256(onnx.load(str(p)).graph.SerializeToString()).hexdigest()

    for uri, src, version in (("models:/det/1", a, "1"), ("models:/det/2", b, "2"), ("models:/other/1", a, "1")):
        r = resolve_model(settings, uri)
        assert weights(r.path) == weights(src), uri
        meta = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        assert (meta["sqis_model_name"], meta["sqis_model_version"]) == (r.name, version)
