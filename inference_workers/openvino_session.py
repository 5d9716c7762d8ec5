"""The OpenVINO runtime behind the slice of ``onnxruntime.InferenceSession`` the detector uses.

Selected by the provider setting (``SQIS_ONNX_PROVIDERS=openvino``, ``--provider openvino``) like
cpu|cuda|tensorrt; the model file is the same ONNX file: an FP32 export runs FP32 (the CPU plugin's
default bf16 on AVX-512 BF16 cores is turned off, so FP32 means FP32), a QDQ INT8 file from
`sqis model quantize` runs on OpenVINO's INT8 kernels (VNNI). Needs the ``openvino`` extra.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OPENVINO_PROVIDER", "OpenVINOSession", "openvino_available"]

OPENVINO_PROVIDER = "OpenVINO"  # what get_providers() reports (not an ONNX Runtime provider name)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Arg:
    """An input/output description shaped like onnxruntime's NodeArg (name, shape, type)."""

    name: str
    shape: list[int | str | None]
    type: str


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict[str, str]


_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)",
          "u8": "tensor(uint8)"}


def _arg(port: Any, i: int) -> _Arg:
    dims: list[int | str | None] = []
    for k, d in enumerate(port.get_partial_shape()):
        dims.append(d.get_length() if d.is_static else f"d{i}_{k}")
    try:
        name = port.get_any_name()
    except RuntimeError:
        name = f"output{i}"
    return _Arg(name, dims, _TYPES.get(port.get_element_type().get_type_name(), "tensor(float)"))


class OpenVINOSession:
    """Compiles an ONNX file for OpenVINO's CPU plugin; run() has onnxruntime's signature."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0, *, precision: str = "f32") -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ImportError("the openvino provider needs the OpenVINO runtime: pip install 'sqis[openvino]'") from exc
        core = ov.Core()
        model = core.read_model(str(path))
        meta: dict[str, str] = {}
        if model.has_rt_info(["framework"]):  # the ONNX metadata_props (names, imgsz, stride, registry name)
            meta = {str(k): str(v) for k, v in model.get_rt_info(["framework"]).value.items()}
        # no thread pinning: the worker's fetch/decode threads and the Kafka client share these cores, and so
        # may other processes; pinned inference threads then wait for their core (2x slower measured here)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                                  "ENABLE_CPU_PINNING": False}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(model, "CPU", config)
        self._inputs = [_arg(p, i) for i, p in enumerate(self._compiled.inputs)]
        self._outputs = [_arg(p, i) for i, p in enumerate(self._compiled.outputs)]
        self._meta = _Meta(meta)
        self._local = threading.local()  # an infer request per thread: one request is not reentrant
        self.path = str(path)

    def _request(self) -> Any:
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self._compiled.create_infer_request()
        return req

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def get_providers(self) -> list[str]:
        return [OPENVINO_PROVIDER]

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        req = self._request()
        req.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        outs = [np.array(req.get_output_tensor(i).data, copy=True) for i in range(len(self._outputs))]
        if output_names is None:
            return outs
        by_name = {a.name: o for a, o in zip(self._outputs, outs, strict=True)}
        return [by_name[n] for n in output_names]
