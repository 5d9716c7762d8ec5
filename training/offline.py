"""Make Ultralytics (and matplotlib / onnxruntime caches) work with no network, before it is imported.

Ultralytics reads YOLO_OFFLINE, YOLO_AUTOINSTALL and YOLO_CONFIG_DIR at import time, and asks for
`Arial.ttf` during the dataset check; both are settled here (see ../shared/OFFLINE-ML.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

__all__ = ["INTEGRATIONS_OFF", "TRAIN_EXTRA_HINT", "configure_offline", "import_ultralytics", "require_train_extra"]

TRAIN_EXTRA_HINT = "install the training extra: pip install 'sqis[train]' (torch, torchvision, ultralytics, onnx, onnxslim)"
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")
_ASSETS = Path(__file__).with_name("assets")
INTEGRATIONS_OFF = {
    "sync": False, "mlflow": False, "clearml": False, "comet": False, "dvc": False, "raytune": False,
    "tensorboard": False, "wandb": False, "vscode_msg": False, "openvino_msg": False, "api_key": "",
}
_configured: Path | None = None


def require_train_extra(*modules: str) -> None:
    """Raise ImportError naming the `train` extra when any of these modules is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: {TRAIN_EXTRA_HINT}")


def _font_source() -> Path | None:
    local = _ASSETS / "DejaVuSans.ttf"
    if local.is_file():
        return local
    try:
        import matplotlib

        p = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        return p if p.is_file() else None
    except ImportError:
        return None


def configure_offline(state_dir: Path | str) -> Path:
    """Set the offline environment (config, caches, font) under state_dir; returns the YOLO config dir.

    Must run before `import ultralytics`; calling it again with the same directory is a no-op.
    """
    global _configured
    state = Path(state_dir).expanduser().resolve()
    cfg = state / "ultralytics"
    if _configured == cfg:
        return cfg
    if "ultralytics" in sys.modules and os.environ.get("YOLO_OFFLINE") != "1":
        log.warning("ultralytics was imported before the offline settings; they may not all apply",
                    extra={"yolo_config_dir": str(cfg)})
    (cfg / "Ultralytics").mkdir(parents=True, exist_ok=True)
    env = {
        "YOLO_OFFLINE": "1",  # no DNS online check, no analytics, no auto-update
        "YOLO_AUTOINSTALL": "0",  # never pip install missing requirements
        "YOLO_VERBOSE": os.environ.get("YOLO_VERBOSE", "True"),
        "YOLO_CONFIG_DIR": str(cfg),
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for its latest version at import
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(state / "cache" / "matplotlib"),
        "XDG_CACHE_HOME": str(state / "cache"),
    }
    os.environ.update(env)
    Path(env["MPLCONFIGDIR"]).mkdir(parents=True, exist_ok=True)
    _copy_fonts(cfg / "Ultralytics")
    _configured = cfg
    return cfg


def _copy_fonts(directory: Path) -> None:
    """DejaVuSans as Arial(.Unicode).ttf, so Ultralytics' font check never downloads."""
    src = _font_source()
    directory.mkdir(parents=True, exist_ok=True)
    for name in FONTS:
        dst = directory / name
        if not dst.exists():
            if src is None:
                log.warning("no local font to stand in for %s: Ultralytics may try to download it", name)
                continue
            shutil.copyfile(src, dst)


def import_ultralytics(state_dir: Path | str) -> ModuleType:
    """Configure offline mode, import ultralytics, and turn off its sync and logging integrations."""
    require_train_extra("torch", "ultralytics")
    cfg = configure_offline(state_dir)
    import ultralytics
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    if Path(USER_CONFIG_DIR) != cfg / "Ultralytics":  # imported earlier elsewhere: font where it looks
        _copy_fonts(Path(USER_CONFIG_DIR))

    state = cfg.parent
    wanted = dict(INTEGRATIONS_OFF)
    wanted.update({
        "runs_dir": str(state / "runs"), "weights_dir": str(state / "weights"), "datasets_dir": str(state / "datasets"),
    })
    if any(SETTINGS.get(k) != v for k, v in wanted.items()):
        SETTINGS.update(wanted)
    return ultralytics
