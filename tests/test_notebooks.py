"""The notebooks in notebooks/ run top to bottom on small inputs (nbclient), and are committed without outputs.

Each notebook's first code cell is tagged ``parameters``; the test inserts a cell after it that overrides
them (papermill's convention), so the notebooks keep the real recipe as their defaults. Like
tests/test_importers_shared.py, the shared datasets (../shared/datasets) must be present: no skip.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from tests.dataset_fixtures import SHARED_DATASETS

nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra (nbformat, nbclient, ipykernel)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["data_exploration", "model_training", "inference_demo"]

# small inputs: each notebook takes seconds; the defaults in the notebooks are the real runs
OVERRIDES: dict[str, dict[str, object]] = {
    "data_exploration": {"NEU_PER_CLASS": 3, "KOLEKTOR_ITEMS": 3, "N_EXAMPLES": 3},
    "model_training": {"PER_CLASS": 2, "MODEL": "yolov8n", "IMGSZ": 64, "EPOCHS": 1, "BATCH": 4, "TIME_H": None,
                       "DEVICE": "cpu", "MLFLOW": False},
    "inference_demo": {"N_IMAGES": 3},
}
# what each run must show: figures drawn, and words its outputs must contain
FIGURES = {"data_exploration": 4, "model_training": 1, "inference_demo": 2}
SHOWS = {
    "data_exploration": ["rolled-in_scale", "defective"],
    "model_training": ["parity:", "committed neu-det", "epoch(s) in"],
    "inference_demo": ["calibrated:file:", "FAIL", "PASS"],  # the Kolektor section shows defect-free parts
}


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _inject(nb: nbformat.NotebookNode, params: dict[str, object]) -> None:
    """Insert an `injected-parameters` cell after the cell tagged `parameters` (papermill's convention)."""
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    nb.cells.insert(idx + 1, cell)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_committed_without_outputs(name: str) -> None:
    nb = _load(name)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}.ipynb has outputs in cells {dirty}: clear them before committing"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{name}.ipynb: one code cell tagged 'parameters'"
    assert not nb.metadata.get("widgets"), f"{name}.ipynb: widget state committed"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "model_training" and importlib.util.find_spec("ultralytics") is None:
        pytest.skip("model_training needs the train extra (torch, ultralytics)")
    assert SHARED_DATASETS.is_dir(), f"shared datasets missing: {SHARED_DATASETS}"
    from nbclient import NotebookClient

    # the kernel's own files (IPython profile, connection files, matplotlib cache) stay in tmp
    for var, sub in (("IPYTHONDIR", "ipython"), ("JUPYTER_RUNTIME_DIR", "runtime"), ("MPLCONFIGDIR", "mpl")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = _load(name)
    _inject(nb, {"DATASETS": str(SHARED_DATASETS), "WORK_DIR": str(tmp_path / "work"), **OVERRIDES[name]})
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    wall = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= FIGURES[name], f"{name}: {figures} figure(s), expected {FIGURES[name]}"
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    missing = [w for w in SHOWS[name] if w not in text]
    assert not missing, f"{name}: outputs lack {missing}"
    print(f"{name}: {wall:.1f} s")
