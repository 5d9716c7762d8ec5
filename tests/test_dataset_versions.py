"""Dataset versions in MLflow (issue #21, part 1): content digests, versions per name, the digest a
model version was trained on, `sqis data versions` (sqlite MLflow store in tmp)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from infra.settings import Settings
from tests.dataset_fixtures import build_mvtec_ad
from training.dataset_versions import content_digest, list_dataset_versions, log_dataset_version
from training.importers import import_dataset
from training.registry import DATASET_DIGEST_TAG, client_for, ensure_experiment, register_onnx


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One MLflow store for the module (creating its tables takes seconds); tests use their own names."""
    tmp = tmp_path_factory.mktemp("mlflow")
    return Settings(state_dir=tmp / "state", onnx_providers="cpu", onnx_threads=1)


@pytest.fixture()
def imported(tmp_path: Path) -> Path:
    build_mvtec_ad(tmp_path / "src")
    import_dataset("mvtec-ad", tmp_path / "src", tmp_path / "a", seed=1)
    return tmp_path / "a"


def test_same_content_same_digest_whatever_the_path_or_time(tmp_path: Path, imported: Path) -> None:
    time.sleep(1.1)  # the second card gets another created_at
    import_dataset("mvtec-ad", tmp_path / "src", tmp_path / "b", seed=1)
    assert (imported / "card.json").read_text() != (tmp_path / "b/card.json").read_text()
    assert content_digest(imported) == content_digest(tmp_path / "b")
    import_dataset("mvtec-ad", tmp_path / "src", tmp_path / "c", seed=2)  # another split: other content
    assert content_digest(tmp_path / "c") != content_digest(imported)
    label = next((imported / "labels/train").glob("*.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")
    assert content_digest(tmp_path / "b") != content_digest(imported)


def test_versions_per_name_logged_with_mlflow_data(settings: Settings, imported: Path) -> None:
    v1, new = log_dataset_version(settings, imported, "tiles", operation="import")
    assert new and v1.version == 1 and v1.digest == content_digest(imported)
    assert v1.classes == {"crack": 4, "scratch": 4} and sum(v1.images.values()) == 19
    again, new = log_dataset_version(settings, imported, "tiles", operation="import")
    assert not new and again.version == 1 and again.run_id == v1.run_id
    label = next((imported / "labels/val").glob("*.txt"))
    label.write_text("0 0.5 0.5 0.2 0.2\n")
    v2, new = log_dataset_version(settings, imported, "tiles", operation="merge", parents=[v1.digest])
    assert new and v2.version == 2 and v2.parents == [v1.digest] and v2.digest != v1.digest
    client = client_for(settings)
    assert [(v.version, v.digest) for v in list_dataset_versions(client, "tiles")] == [(1, v1.digest), (2, v2.digest)]
    assert list_dataset_versions(client, "other") == []
    run = client.get_run(v2.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == v2.digest and inp.dataset.name == "tiles"
    assert '"classes"' in inp.dataset.profile and v2.images["train"] + v2.images["val"] + v2.images["test"] == 19
    assert {f.path for f in client.list_artifacts(v2.run_id, "dataset")} == {"dataset/card.json", "dataset/CARD.md"}


def test_model_version_records_the_digest_its_run_trained_on(settings: Settings, imported: Path,
                                                              tmp_path: Path) -> None:
    from tests.test_registry import make_onnx
    from training.dataset_versions import record_input

    client = client_for(settings)
    run = client.create_run(ensure_experiment(client, settings))
    digest = record_input(client, run.info.run_id, imported / "data.yaml", "training", DATASET_DIGEST_TAG)
    assert digest == content_digest(imported)
    version = register_onnx(client, run.info.run_id, make_onnx(tmp_path / "m.onnx"), "det")
    assert client.get_model_version("det", version).tags[DATASET_DIGEST_TAG] == digest


def test_cli_data_versions(settings: Settings, imported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sqis.cli import run

    state = str(settings.state_dir)
    assert run(["data", "versions", "nope", "--state-dir", state]) == 2
    assert "no dataset named 'nope'" in capsys.readouterr().err
    log_dataset_version(settings, imported, "steel", operation="import")
    assert run(["data", "versions", "steel", "--state-dir", state]) == 0
    out = capsys.readouterr().out
    assert out.startswith("v1 ") and content_digest(imported) in out and "import" in out


def _reviewed(root: Path, base: Path) -> None:
    """An exported-reviews dataset: 6 new frames (crack and a new class dent, one defect-free) and one
    frame byte-identical to a base test image."""
    from tests.dataset_fixtures import texture, write_image
    from training.datasets import Box, Sample, SourceDataset, write_dataset

    raw = root.parent / "reviewed-raw"
    samples = []
    for i in range(6):
        img = write_image(raw / f"f{i}.png", texture(96, 96, 9000 + i))
        boxes = [] if i == 5 else [Box(i % 2, 10.0 + i, 10.0, 40.0 + i, 30.0)]
        samples.append(Sample(key=f"f{i}", name=f"f{i}", image=img, width=96, height=96, boxes=boxes))
    dup = raw / "dup.png"
    dup.write_bytes(next((base / "images/test").glob("*.png")).read_bytes())
    samples.append(Sample(key="dup", name="dup", image=dup, width=96, height=96))
    write_dataset(SourceDataset(format="sqis-reviews", source=raw, classes=["crack", "dent"], samples=samples), root)


def test_merge_dedups_and_keeps_reviewed_frames_out_of_the_frozen_test_split(
        settings: Settings, imported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sqis.cli import run
    from training.datasets import read_card

    _reviewed(tmp_path / "rev", imported)
    out = tmp_path / "merged"
    assert run(["data", "merge", str(imported), str(tmp_path / "rev"), str(out), "--val-frac", "0.34",
                "--name", "merged", "--state-dir", str(settings.state_dir)]) == 0
    said = capsys.readouterr().out
    assert "6 reviewed frames added" in said and "1 duplicates dropped" in said and "merged v1" in said
    card = read_card(out)
    assert card.classes == ["crack", "scratch", "dent"]
    base_test = sorted(p.name for p in (imported / "images/test").iterdir())
    assert sorted(p.name for p in (out / "images/test").iterdir()) == base_test
    reviewed = {sp: sorted(p.name for p in (out / "images" / sp).glob("reviewed_*")) for sp in ("train", "val", "test")}
    assert reviewed["test"] == [] and len(reviewed["train"]) + len(reviewed["val"]) == 6 and reviewed["val"]
    assert card.total_images == read_card(imported).total_images + 6
    dent = [ln for p in (out / "labels").rglob("reviewed_*.txt") for ln in p.read_text().splitlines()
            if ln.startswith("2 ")]
    assert len(dent) == 2  # reviewed class 1 (dent, frames 1 and 3) -> merged class 2
    (v,) = list_dataset_versions(client_for(settings), "merged")
    assert v.operation == "merge" and v.parents == [content_digest(imported), content_digest(tmp_path / "rev")]


def test_calibration_records_the_digest_it_was_calibrated_on(settings: Settings, tmp_path: Path) -> None:
    from tests.test_registry import _tiny_split_dataset, make_onnx
    from training.calibrate import calibrate
    from training.registry import CALIBRATION_DIGEST_TAG

    client = client_for(settings)
    run = client.create_run(ensure_experiment(client, settings))
    version = register_onnx(client, run.info.run_id, make_onnx(tmp_path / "m.onnx", bias=0.3), "det-cal")
    data = _tiny_split_dataset(tmp_path / "data")
    calibrate(f"models:/det-cal/{version}", data, "val", max_fpr=None, target_recall=1.0, settings=settings)
    assert client.get_model_version("det-cal", version).tags[CALIBRATION_DIGEST_TAG] == content_digest(data)
    (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert inp.dataset.digest == content_digest(data) and inp.tags[0].value == "calibration"
