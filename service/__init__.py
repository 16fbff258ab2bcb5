"""neuroserve: an ONNX inference service (Open Inference Protocol V2, dynamic batching, metrics)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuroserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
