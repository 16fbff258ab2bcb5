"""`python -m tests.support.run_graph MODEL INPUTS OUTPUTS`: run an ONNX graph on the arrays of an
.npz file (one per graph input, batched by --batch rows) and save the first output to a .npy file.

Only numpy and onnxruntime are imported, so it starts quickly under `qemu-x86_64 -cpu Haswell`,
where the tests run it to get ONNX Runtime's AVX2 kernels on any x86-64 machine.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--optimization", choices=LEVELS, default="all")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[args.optimization]
    options.log_severity_level = 3
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(args.inputs))
    rows = len(next(iter(feeds.values())))
    out = [session.run(None, {k: v[i:i + args.batch] for k, v in feeds.items()})[0]
           for i in range(0, rows, args.batch)]
    np.save(args.outputs, np.concatenate(out))


if __name__ == "__main__":
    main()
