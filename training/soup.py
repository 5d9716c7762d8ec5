"""Uniform weight averaging ("model soup") of YOLOv8 checkpoints that share one architecture.

Checkpoints from one training trajectory (a run and its fine-tune, or the last epochs of a run)
sit in one loss basin; their average is often better than any of them. Pick the members on the
validation split, never on test.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.errors import TrainingError
from training.offline import import_ultralytics, require_train_extra

log = logging.getLogger(__name__)

__all__ = ["average_checkpoints"]


def _network(ckpt: dict[str, Any], path: Path) -> Any:
    """The weights Ultralytics itself would load: the EMA when the checkpoint has one."""
    net = ckpt.get("ema") or ckpt.get("model")
    if net is None or not hasattr(net, "state_dict"):
        raise TrainingError(f"{path}: not an Ultralytics checkpoint (no model or ema)")
    return net.float()


def _load(torch: Any, path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip or torch errors: the file is not a checkpoint
        raise TrainingError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise TrainingError(f"{path}: not an Ultralytics checkpoint")
    return ckpt


def average_checkpoints(
    checkpoints: Sequence[Path | str], out: Path | str, *, state_dir: Path | str = ".sqis",
) -> Path:
    """Write OUT: the first checkpoint with every floating-point tensor (weights, biases, BatchNorm
    statistics) replaced by the mean over all checkpoints. Stored in half precision like Ultralytics'
    own stripped checkpoints; training state (optimizer, EMA) is dropped."""
    require_train_extra("torch", "ultralytics")
    import_ultralytics(state_dir)
    import torch

    paths = [Path(p) for p in checkpoints]
    if len(paths) < 2:
        raise TrainingError("give at least two checkpoints to average")
    for p in paths:
        if not p.is_file():
            raise TrainingError(f"{p}: no such checkpoint")
    ckpts = [_load(torch, p) for p in paths]
    nets = [_network(c, p) for c, p in zip(ckpts, paths, strict=True)]
    states = [n.state_dict() for n in nets]
    ref = states[0]
    for p, s in zip(paths[1:], states[1:], strict=True):
        if s.keys() != ref.keys() or any(s[k].shape != ref[k].shape for k in ref):
            raise TrainingError(f"{p}: a different architecture from {paths[0]}; only one model's checkpoints average")
    merged = {k: (sum(s[k] for s in states) / len(states)) if v.dtype.is_floating_point else v
              for k, v in ref.items()}
    net = copy.deepcopy(nets[0])
    net.load_state_dict(merged)
    out_ckpt = {k: v for k, v in ckpts[0].items() if k not in ("model", "ema", "optimizer", "updates", "scaler")}
    out_ckpt.update(model=net.half(), ema=None, optimizer=None, updates=None, scaler=None,
                    date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    sqis_average_of=[str(p) for p in paths])
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out_ckpt, target)
    log.info("averaged checkpoints", extra={"members": [str(p) for p in paths], "out": str(target)})
    return target
