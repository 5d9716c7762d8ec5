"""`sqis retrain` (issue #21 §3): the whole loop on the synthetic camera's data on CPU.

One PostgreSQL of the module's own (the local stack without Kafka) holds reviewed inspections whose
frames the synthetic camera rendered (images in the object store); the committed demo model is
NAME@production with its best.pt as the run's checkpoint; the base dataset is a small `sqis data synth`
set. Fine-tuning is tiny (1 epoch, imgsz 64-128) so that a retrain takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sqis.bench.retrain import open_drift_alert, register_demo_production, seed_reviews, synth_base
from training.retrain import RetrainError, check_gate, resolve_base, retrain

pytest.importorskip("ultralytics")

NAME = "det"
LINE = "line-retrain"
REVIEWED = 12


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from infra.stack import LocalStack

    tmp = tmp_path_factory.mktemp("retrain")
    stack = LocalStack(tmp / "stack")
    try:
        stack.up(kafka=False, postgres=True, mqtt=False, registry=False)  # PostgreSQL only
        settings = stack.settings(onnx_providers="cpu", onnx_threads=1, log_format="console")
        base = synth_base(tmp / "base", 36, size=128, settings=settings, name="synthetic")
        version = register_demo_production(settings, NAME)
        frames = seed_reviews(settings, REVIEWED, size=128, line_id=LINE)
        yield {"settings": settings, "base": base, "production": version, "frames": frames, "tmp": tmp,
               "state": str(stack.state_dir)}
    finally:
        stack.down(purge=True)


def _client(s: dict[str, Any]) -> Any:
    from training.registry import client_for

    return client_for(s["settings"])


def _alias(client: Any, alias: str) -> str | None:
    v = client.get_registered_model(NAME).aliases.get(alias)
    return None if v is None else str(v)


def test_if_drift_skips_without_an_open_alert_then_a_pass_sets_challenger(
        scenario: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from sqis.cli import run
    from training.dataset_versions import content_digest, list_dataset_versions

    s, state = scenario["settings"], scenario["state"]
    open_drift_alert(s, LINE, state="acknowledged")  # seen by a person already: no trigger
    open_drift_alert(s, "another-line")  # open, but on a line this retrain does not watch
    cmd = ["retrain", "--base", "synthetic", "--name", NAME, "--epochs", "1", "--imgsz", "128", "--batch", "8",
           "--if-drift", "--line", LINE, "--state-dir", state]
    assert run(cmd) == 0
    assert "skipped: no open drift alert" in capsys.readouterr().out
    assert _alias(_client(scenario), "challenger") is None

    alert = open_drift_alert(s, LINE)
    assert run([*cmd, "--margin", "1", "--recall-slack", "1", "--json", "--out", str(scenario["tmp"] / "pass")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # stdout holds only the JSON
    assert res["status"] == "registered" and res["gate"]["passed"] and res["gate"]["drift_alerts"] == [alert]
    assert set(res["timings"]) == {"export", "merge", "train", "calibrate", "gate", "register"}
    client = _client(scenario)
    assert _alias(client, "challenger") == res["version"] != scenario["production"]
    assert _alias(client, "production") == scenario["production"]
    mv = client.get_model_version(NAME, res["version"])
    assert mv.tags["sqis.retrain.status"] == "passed" and "sqis.retrain.refused" not in mv.tags
    assert mv.tags["dataset_digest"] == res["dataset_digest"]
    gate = json.loads(mv.tags["sqis.retrain.gate"])
    for where in ("test", "reviewed"):
        assert set(gate[where]) == {"champion", "challenger"} and gate[where]["champion"]["ap50"]
    assert gate["reviewed"]["champion"]["images"] == REVIEWED
    assert client.get_run(mv.run_id).data.metrics["gate/passed"] == 1.0

    # the new dataset version: the base plus every reviewed frame, none of them in the frozen test split
    base = scenario["base"]
    versions = list_dataset_versions(client, "synthetic")
    assert [v.version for v in versions] == [1, 2] and versions[1].digest == res["dataset_digest"]
    assert versions[1].operation == "merge" and versions[1].parents[0] == content_digest(base)
    merged = Path(res["dataset"]["path"])
    assert sorted(p.name for p in (merged / "images/test").iterdir()) == \
        sorted(p.name for p in (base / "images/test").iterdir())
    added = [p for sp in ("train", "val") for p in (merged / "images" / sp).glob("reviewed_*")]
    assert len(added) == res["dataset"]["added"] == REVIEWED and not list((merged / "images/test").glob("reviewed_*"))

    # the same alert does not trigger the next scheduled run: it is older than this retrain
    assert run(cmd) == 0
    assert "skipped: no open drift alert since the last retrain" in capsys.readouterr().out


def test_refusal_leaves_no_alias_and_lists_the_figures(scenario: dict[str, Any],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A challenger fine-tuned for one epoch at 96 px is far worse than the demo model at 256 px."""
    from sqis.cli import run

    client = _client(scenario)
    before = _alias(client, "challenger")
    rc = run(["retrain", "--base", str(scenario["base"]), "--name", NAME, "--epochs", "1", "--imgsz", "96",
              "--batch", "8", "--margin", "0", "--since", "2000-01-01T00:00:00", "--state-dir", scenario["state"],
              "--out", str(scenario["tmp"] / "refused")])
    out, err = capsys.readouterr()
    assert rc == 1
    line = err.strip().splitlines()[-1]  # one line, no traceback (training's own logs come before it)
    assert "Traceback" not in err and sum(ln.startswith("error:") for ln in err.splitlines()) == 1
    assert line.startswith("error: RetrainRefused: det v") and "AP@0.5" in line and "vs production" in line
    assert "refused:" in out and "timings:" in out
    version = line.split(" v", 1)[1].split()[0]
    mv = client.get_model_version(NAME, version)
    assert mv.tags["sqis.retrain.status"] == "refused" and "AP@0.5" in mv.tags["sqis.retrain.refused"]
    assert _alias(client, "challenger") == before != version
    assert client.get_run(mv.run_id).data.metrics["gate/passed"] == 0.0


def test_refuses_clearly_without_a_checkpoint_or_production_and_skips_without_reviews(
        scenario: dict[str, Any], tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    s = scenario["settings"]
    register_demo_production(s, "no-ckpt", checkpoint=False)
    with pytest.raises(RetrainError, match="no-ckpt v1 has no checkpoint"):
        retrain(s, name="no-ckpt", base="synthetic", epochs=1, out=tmp_path / "a", progress=False)
    with pytest.raises(RetrainError, match="no @production version"):
        retrain(s, name="unknown-model", base="synthetic", epochs=1, out=tmp_path / "b", progress=False)
    import shutil

    import yaml

    other = shutil.copytree(scenario["base"], tmp_path / "other-classes")
    cfg = yaml.safe_load((other / "data.yaml").read_text())
    (other / "data.yaml").write_text(yaml.safe_dump({**cfg, "path": str(other), "names": {0: "crack", 1: "pit", 2: "rust"}}))
    with pytest.raises(RetrainError, match=r"knows the classes \['scratch', 'dent', 'spot'\], the merged dataset has"):
        retrain(s, name=NAME, base=str(other), epochs=1, out=tmp_path / "e", progress=False)
    res = retrain(s, name=NAME, base="synthetic", epochs=1, out=tmp_path / "c", progress=False,
                  since=datetime.now(UTC) + timedelta(hours=1))
    assert res.status == "skipped" and "no reviewed frames" in res.reason and res.version is None
    res = retrain(s, name=NAME, base="synthetic@v1", epochs=1, out=tmp_path / "d", progress=False,
                  min_reviewed=REVIEWED + 1, since=datetime(2000, 1, 1, tzinfo=UTC))
    assert res.status == "skipped" and f"{REVIEWED} reviewed frame(s)" in res.reason


def test_resolve_base(scenario: dict[str, Any]) -> None:
    from training.dataset_versions import content_digest

    s, base = scenario["settings"], scenario["base"]
    digest = content_digest(base)
    assert resolve_base(s, str(base)) == (base.resolve(), base.name, digest)
    assert resolve_base(s, "synthetic@v1") == (base.resolve(), "synthetic", digest)
    assert resolve_base(s, f"synthetic@{digest[:8]}")[2] == digest
    for bad, msg in (("nope", "no dataset named 'nope'"), ("synthetic@v9", "has versions 1.."),
                     ("synthetic@zzzz", "0 versions")):
        with pytest.raises(RetrainError, match=msg):
            resolve_base(s, bad)


def _f(ap: dict[str, float], recall: float | None) -> dict[str, Any]:
    return {"ap50": ap, "image_recall": recall}


def test_gate_rules() -> None:
    champ = _f({"scratch": 0.80, "dent": 0.60}, 0.90)
    ok = {"test": {"champion": champ, "challenger": _f({"scratch": 0.76, "dent": 0.70}, 0.90)}}
    assert check_gate(ok, margin=0.05) == []
    worse = {"test": {"champion": champ, "challenger": _f({"scratch": 0.74, "dent": 0.90}, 0.95)}}
    (r,) = check_gate(worse, margin=0.05)
    assert r.startswith("test: scratch AP@0.5 0.740 vs production 0.800")
    assert check_gate(worse, margin=0.1) == []
    missing = {"reviewed": {"champion": champ, "challenger": _f({"scratch": 0.9}, 0.95)}}
    assert check_gate(missing, margin=0.05) == ["reviewed: dent AP@0.5 0.000 vs production 0.600 (drop 0.600 > margin 0.05)"]
    recall = {"test": {"champion": champ, "challenger": _f({"scratch": 0.8, "dent": 0.6}, 0.85)}}
    (r,) = check_gate(recall, margin=0.05)
    assert "image recall at the operating point 0.850 vs production 0.900" in r
    assert check_gate(recall, margin=0.05, recall_slack=0.05) == []
    undefined = {"test": {"champion": _f({"dent": 0.5}, None), "challenger": _f({"dent": 0.5}, None)}}
    assert check_gate(undefined, margin=0.0) == []


def test_only_a_decided_retrain_moves_the_drift_cutoff_and_from_its_start() -> None:
    """A retrain that failed midway (pending/failed) must not swallow the alert that triggered it; a decided one
    counts from when it started, so an alert opened while it trained triggers the next one."""
    from types import SimpleNamespace

    from training.retrain import _last_retrain

    def mv(status: str, created: int, started: str = "") -> SimpleNamespace:
        tags = {"sqis.retrain.status": status} | ({"sqis.retrain.started_at_ms": started} if started else {})
        return SimpleNamespace(tags=tags, creation_timestamp=created)

    class Client:
        def __init__(self, versions: list[SimpleNamespace]) -> None:
            self.versions = versions

        def search_model_versions(self, _: str) -> list[SimpleNamespace]:
            return self.versions

    assert _last_retrain(Client([mv("pending", 5_000), mv("failed", 6_000)]), "m") is None
    got = _last_retrain(Client([mv("refused", 9_000, "4000"), mv("failed", 20_000), mv("passed", 3_000)]), "m")
    assert got is not None and got.timestamp() == 4.0
