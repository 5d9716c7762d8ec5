"""Challenger helpers for the canary tests and ``sqis bench canary``: a deliberately bad challenger
(a YOLOv8 ONNX detector with inverted class scores) and the time a canary takes to be rolled back or
promoted on the local stack."""

from __future__ import annotations

from pathlib import Path


def invert_scores(src: Path | str, dst: Path | str) -> Path:
    """Write a copy of the YOLOv8 detector ``src`` whose class scores are ``1 - score`` (boxes unchanged):
    a challenger that sees defects everywhere it saw none. Needs the onnx package."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    out = m.graph.output[0].name
    raw = f"{out}_raw"
    for node in m.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    consts = {"inv_0": [0], "inv_4": [4], "inv_end": [2**62], "inv_ax": [1]}
    for k, v in consts.items():
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    m.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "inv_one"))
    m.graph.node.extend([
        helper.make_node("Slice", [raw, "inv_0", "inv_4", "inv_ax"], ["inv_boxes"]),
        helper.make_node("Slice", [raw, "inv_4", "inv_end", "inv_ax"], ["inv_scores"]),
        helper.make_node("Sub", ["inv_one", "inv_scores"], ["inv_inverted"]),
        helper.make_node("Concat", ["inv_boxes", "inv_inverted"], [out], axis=1),
    ])
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return Path(dst)
