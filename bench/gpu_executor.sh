#!/usr/bin/env bash
# The executor on a GPU, in one run of a few minutes: install, check, measure.
#
#   OUT=results bash bench/gpu_executor.sh
#
# Installs onnxruntime-gpu and the service into .venv-gpu (pinned by constraints.txt), runs the CUDA
# tests, then `python -m bench.executor gpu`: sentiment and spoken-digits through V2 binary at
# c=256 against ONNX Runtime's own CUDA ceiling at batch 128 measured in the same run, with the
# processes that hold a CUDA context while the service runs (the goal: only the executor), and
# `python -m bench.cuda_options`: plain `run` against IO binding, CUDA graphs and two sessions per
# model, to choose how the executor should call ONNX Runtime on a GPU. Every result lands in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu-out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt"
if ! command -v wrk > /dev/null; then
  (apt-get install -y -qq wrk || sudo apt-get install -y -qq wrk) > "$OUT/apt.log" 2>&1
fi
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q --upgrade pip
.venv-gpu/bin/pip install -q -c constraints.txt -e '.[gpu,dev]' > "$OUT/pip.log" 2>&1
.venv-gpu/bin/python -c "import onnxruntime as ort; print(ort.__version__, ort.get_available_providers())" \
  | tee "$OUT/onnxruntime.txt"
timeout 240 .venv-gpu/bin/python -m pytest -q -p no:cacheprovider tests/service/test_cuda.py \
  tests/service/test_executor.py > "$OUT/tests.txt" 2>&1 || true
timeout 300 .venv-gpu/bin/python -m bench.executor gpu --workers 4 --concurrency 256 --duration 10 \
  --out "$OUT/executor-gpu.json" > "$OUT/executor-gpu.log" 2>&1
tail -40 "$OUT/executor-gpu.json"
timeout 120 .venv-gpu/bin/python -m bench.cuda_options --provider cuda --duration 2 \
  --out "$OUT/cuda-options.json" > "$OUT/cuda-options.log" 2>&1 || true
tail -60 "$OUT/cuda-options.json" || true
