"""ONNX Runtime sessions: provider choice, session options, graph signature, warm-up and `run`.

Knows nothing of HTTP or of batching; it is handed complete feeds and returns the outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.core.model_config import CUDA
from service.settings import Settings

log = logging.getLogger("neuroserve.runtime")

CPU = "CPUExecutionProvider"

# onnxruntime's type strings → V2 datatypes.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class LoadError(Exception):
    """A model version cannot be served; the message is the reason users see."""


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output as ONNX declares it; a dimension is None when symbolic or unknown."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def session_options(settings: Settings, instances: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads_for(instances)
    so.inter_op_num_threads = settings.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    # The event loop (HTTP parsing, JSON) shares the cores with ORT's pool: threads that spin while
    # waiting for work would steal those cycles between batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def provider_chain(settings: Settings) -> list[str | tuple[str, dict[str, str]]]:
    if settings.providers == "cpu" or (settings.providers == "auto" and not cuda_available()):
        return [CPU]
    cuda_options = {"device_id": str(settings.cuda_device_id), "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": settings.cudnn_conv_algo_search.upper()}
    if settings.gpu_mem_limit_mb:
        cuda_options["gpu_mem_limit"] = str(settings.gpu_mem_limit_mb * 1024 * 1024)
    return [(CUDA, cuda_options), CPU]


def cuda_binds(model_path: Path | None, settings: Settings) -> str | None:
    """None when a CUDA session on `model_path` really runs on CUDA (or, without a model, when the
    CUDA provider is at least available), else the reason it does not."""
    if not cuda_available():
        return "this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)"
    if model_path is None:
        return None
    try:
        session = ort.InferenceSession(str(model_path), sess_options=session_options(settings, 1),
                                       providers=provider_chain(settings))
    except Exception as e:  # ORT raises its own exception types
        return f"a CUDA session cannot be created: {e}"
    bound = session.get_providers()[0]
    if bound != CUDA:
        return f"the CUDA execution provider did not bind (the session fell back to {bound}); " \
               "check the CUDA and cuDNN libraries and the driver"
    return None


class Runtime:
    """The ORT sessions of one model version: one per instance, so instances run concurrently."""

    def __init__(self, path: Path, settings: Settings, instances: int) -> None:
        options = session_options(settings, instances)
        chain = provider_chain(settings)
        self.sessions: list[ort.InferenceSession] = []
        for _ in range(instances):
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=chain)
            except Exception as e:  # ORT raises its own exception types for corrupt or unsupported graphs
                raise LoadError(f"ONNX Runtime cannot load {path.name}: {e}") from e
            self.sessions.append(session)
        bound = self.sessions[0].get_providers()[0]
        wanted_cuda = any(p[0] == CUDA for p in chain if isinstance(p, tuple))
        if wanted_cuda and bound != CUDA:
            # onnxruntime-gpu falls back to CPU with only a log line when CUDA/cuDNN libraries are
            # missing; `cuda` promises a GPU, so that fallback must be an error.
            if settings.providers == "cuda":
                raise LoadError(f"the CUDA execution provider did not bind (session uses {bound})")
            log.warning("CUDA provider did not bind; running on %s", bound, extra={"model_path": str(path)})
        self.provider = bound
        self.threads = options.intra_op_num_threads
        s = self.sessions[0]
        self.inputs = [_graph_tensor(t) for t in s.get_inputs()]
        self.outputs = [_graph_tensor(t) for t in s.get_outputs()]

    def run(
        self, instance: int, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        return self.sessions[instance].run(output_names, feeds)

    def warm_up(self, feeds: Iterable[dict[str, np.ndarray]], output_names: Sequence[str]) -> int:
        """Run every feed on every instance so first requests meet no allocation or tuning cost."""
        n = 0
        for feed in feeds:
            for i in range(len(self.sessions)):
                self.run(i, feed, output_names)
                n += 1
        return n


def _graph_tensor(arg: ort.NodeArg) -> GraphTensor:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in (arg.shape or ()))
    return GraphTensor(arg.name, ORT_TO_V2.get(arg.type, arg.type), shape)
