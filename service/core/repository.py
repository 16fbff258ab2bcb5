"""The model repository: scan `models/`, validate, load and warm up versions, track their state.

Each `models/<name>/` holds `config.toml` and integer version directories with `model.onnx`. A model
or version that cannot be served is UNAVAILABLE with a reason; the others serve regardless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.codecs.text import TextEncoder, TextModel
from service.core.batching import Batcher, BatchPolicy, InputLayout
from service.core.model_config import V2_TO_NUMPY, ModelConfig, TensorSpec, load_model_config
from service.core.runtime import CUDA, LoadError, Runtime
from service.errors import ModelNotFound, ModelNotReady
from service.observability import metrics
from service.observability.monitoring import batch_observer
from service.observability.stats import Stats
from service.settings import Settings

log = logging.getLogger("neuroserve.repository")

MODEL_FILE = "model.onnx"


class State(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


@dataclass(eq=False)
class ModelVersion:
    model: Model
    version: int
    path: Path
    state: State = State.LOADING
    reason: str = ""
    provider: str = ""
    runtime: Runtime | None = None
    batcher: Batcher | None = None
    metrics: metrics.ModelMetrics | None = None
    stats: Stats = field(default_factory=Stats)
    load_seconds: float = 0.0
    # The model's config with the batching knobs of the provider this version runs on; set on load.
    served_config: ModelConfig | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def config(self) -> ModelConfig:
        if self.served_config is not None:
            return self.served_config
        assert self.model.config is not None
        return self.model.config

    def serving_batcher(self) -> Batcher:
        """The batcher to queue a request on. A request is admitted before its body is read, and
        an unload can close the version in between: it then gets 503, like any request for a
        version that is not ready."""
        if self.batcher is None:
            raise ModelNotReady(f"model {self.name!r} version {self.version} was unloaded")
        return self.batcher

    def set_state(self, state: State, reason: str = "") -> None:
        self.state, self.reason = state, reason
        metrics.set_model_state(self.name, str(self.version), state.value.lower())

    async def close(self, replaced_by: ModelVersion | None = None) -> None:
        """Finish what was admitted and stop serving. `replaced_by` is the version of the same number
        that a reload has just brought up: the metric series of this (model, version) are its now,
        so closing this one must not mark them unloaded."""
        if self.batcher is not None:
            await self.batcher.close()
        if self.provider and (replaced_by is None or replaced_by.provider != self.provider):
            metrics.MODEL_INFO.labels(self.name, str(self.version), self.provider).set(0)
        self.batcher = None
        self.runtime = None
        if replaced_by is None:
            self.set_state(State.UNLOADED)
        else:
            self.state = State.UNLOADED


@dataclass(eq=False)
class Model:
    name: str
    directory: Path
    config: ModelConfig | None = None
    error: str = ""  # why the model as a whole cannot load (bad config, no versions)
    labels: list[str] = field(default_factory=list)
    text: TextModel | None = None  # tokenizer and input roles of a text model
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    unloaded: bool = False

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.versions.items()) if v.state is State.READY]

    def fail(self, reason: str) -> None:
        self.error = reason
        metrics.set_model_state(self.name, "", "unavailable")
        log.error("model unavailable: %s", reason, extra={"model": self.name})


class Repository:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.model_repository
        self.models: dict[str, Model] = {}
        self.loading = True  # until the first `load_all` has finished: not ready before that
        self._lock = asyncio.Lock()

    # -- queries ------------------------------------------------------------------------------------

    def scan(self) -> list[str]:
        if not self.root.is_dir():
            log.error("model repository %s is not a directory", self.root)
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The version to serve: the one asked for, else the newest READY one."""
        model = self.models.get(name)
        if model is None:
            raise self._unknown(name)
        if version is None:
            for mv in reversed(model.versions.values()):  # versions are kept in ascending order
                if mv.state is State.READY:
                    return mv
            raise ModelNotReady(f"model {name!r} is not ready: {self._why_not(model)}")
        try:
            mv = model.versions.get(int(version))
        except ValueError:
            mv = None
        if mv is None:
            raise ModelNotFound(f"model {name!r} has no version {version!r} being served")
        if mv.state is not State.READY:
            reason = f": {mv.reason}" if mv.reason else ""
            raise ModelNotReady(f"model {name!r} version {version} is {mv.state.value}{reason}")
        return mv

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise self._unknown(name)
        return model

    def _unknown(self, name: str) -> ModelNotFound | ModelNotReady:
        # During the first load a model further down the list is not registered yet: it exists and
        # will serve soon, so the answer is "not ready" (503, retry), not "no such model" (404).
        if self.loading and name in self.scan():
            return ModelNotReady(f"model {name!r} is loading")
        return ModelNotFound(f"unknown model {name!r}")

    @staticmethod
    def _why_not(model: Model) -> str:
        if model.unloaded:
            return "it was unloaded"
        if model.error:
            return model.error
        states = [f"version {v.version} {v.state.value}" + (f" ({v.reason})" if v.reason else "")
                  for _, v in sorted(model.versions.items())]
        return "; ".join(states) or "no versions"

    def ready(self, *, strict: bool) -> bool:
        if self.loading:
            return False
        wanted = [m for m in self.models.values() if not m.unloaded]
        if strict:
            return all(
                not m.error and m.versions and all(v.state is State.READY for v in m.versions.values())
                for m in wanted
            )
        return any(m.ready_versions() for m in wanted)

    def index(self, *, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one entry per model version (per model if it has none)."""
        out = []
        for name in sorted(set(self.scan()) | set(self.models)):
            model = self.models.get(name)
            if model is None:
                if not ready_only:
                    out.append({"name": name, "state": State.UNLOADED.value, "reason": "not loaded"})
                continue
            if model.error and not model.versions:
                if not ready_only:
                    out.append({"name": name, "state": State.UNAVAILABLE.value, "reason": model.error})
                continue
            for v, mv in sorted(model.versions.items()):
                if ready_only and mv.state is not State.READY:
                    continue
                out.append({"name": name, "version": str(v), "state": mv.state.value, "reason": mv.reason})
        return out

    # -- loading ------------------------------------------------------------------------------------

    async def load_all(self) -> None:
        self.loading = True
        try:
            for name in self.scan():
                await self.load(name)
        finally:
            self.loading = False

    async def load(self, name: str) -> Model:
        """(Re)load a model from disk; the old versions serve until the new ones are loaded."""
        directory = self.root / name
        if name not in self.scan():
            raise ModelNotFound(f"no model directory {name!r} in the repository")
        async with self._lock:
            model = Model(name, directory)
            old = self.models.get(name)
            if old is None or old.unloaded:
                self.models[name] = model  # show LOADING in the index while it loads
            self._prepare(model)
            for mv in model.versions.values():
                await self._load_version(mv)
            self.models[name] = model
            if old is not None and old is not model:
                for mv in old.versions.values():
                    await mv.close(replaced_by=model.versions.get(mv.version))
        return model

    async def unload(self, name: str) -> None:
        model = self.model(name)
        async with self._lock:
            model.unloaded = True
            for mv in model.versions.values():
                await mv.close()
        log.info("model unloaded", extra={"model": name})

    async def close(self) -> None:
        for model in list(self.models.values()):
            for mv in model.versions.values():
                if mv.state is State.READY:
                    await mv.close()

    def _prepare(self, model: Model) -> None:
        """Read the config, labels and tokenizer, and pick the versions the policy serves."""
        try:
            config = load_model_config(model.directory)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
                                 for err in e.errors())
            return model.fail(f"invalid config.toml: {problems}")
        except (OSError, ValueError) as e:  # missing file, TOML syntax
            return model.fail(f"cannot read config.toml: {e}")
        if config.name != model.name:
            return model.fail(
                f"config.toml names the model {config.name!r} but its directory is {model.name!r}"
            )
        try:
            model.labels = config.label_list(model.directory)
        except OSError as e:
            return model.fail(f"cannot read labels: {e}")
        if config.text is not None and config.task == "text":
            try:
                encoder = TextEncoder(model.directory / config.text.tokenizer, config.text.max_tokens)
            except Exception as e:  # tokenizers raises plain Exception for unreadable files
                return model.fail(f"cannot load tokenizer {config.text.tokenizer!r}: {e}")
            dtypes = {t.name: V2_TO_NUMPY[t.datatype] for t in config.inputs}
            model.text = TextModel.for_inputs(encoder, dtypes, self.settings.max_text_chars)
        model.config = config
        on_disk = sorted(int(p.name) for p in model.directory.iterdir() if p.is_dir() and p.name.isdigit())
        policy = config.version_policy
        wanted = sorted(policy.specific) if policy.specific is not None else on_disk[-(policy.latest or 1):]
        if not wanted:
            return model.fail("no integer version directories (e.g. 1/model.onnx)")
        for v in wanted:
            mv = ModelVersion(model, v, model.directory / str(v) / MODEL_FILE)
            model.versions[v] = mv
            mv.set_state(State.LOADING)

    async def _load_version(self, mv: ModelVersion) -> None:
        start = time.perf_counter()
        try:
            runtime, served_config, warm_runs = await asyncio.to_thread(self._build_runtime, mv)
        except LoadError as e:
            mv.set_state(State.UNAVAILABLE, str(e))
            log.error("model version unavailable: %s", e, extra={"model": mv.name, "version": mv.version})
            return
        mv.runtime = runtime
        mv.provider = runtime.provider
        mv.served_config = served_config
        mv.load_seconds = time.perf_counter() - start
        mv.metrics = metrics.ModelMetrics(mv.name, str(mv.version), runtime.provider, mv.model.labels)
        mv.batcher = _batcher(mv, self.settings.cuda_static_batch)
        mv.batcher.start()
        metrics.MODEL_LOAD_DURATION.labels(mv.name, str(mv.version)).set(mv.load_seconds)
        metrics.MODEL_INFO.labels(mv.name, str(mv.version), runtime.provider).set(1)
        metrics.count_from_zero(mv.name, str(mv.version), mv.config.task)
        mv.set_state(State.READY)
        log.info("model version ready", extra={
            "model": mv.name, "version": mv.version, "provider": runtime.provider,
            "threads": runtime.threads, "load_s": round(mv.load_seconds, 3), "warmup_runs": warm_runs})

    def _build_runtime(self, mv: ModelVersion) -> tuple[Runtime, ModelConfig, int]:
        """Runs in a thread: session creation, graph checks and warm-up are CPU-bound."""
        if not mv.path.is_file():
            raise LoadError(f"{mv.path.parent.name}/{MODEL_FILE} does not exist")
        config = mv.config
        runtime = Runtime(mv.path, self.settings, config.batching.instances)
        check_signature(config, runtime, len(mv.model.labels))
        served = config.on_provider(runtime.provider == CUDA)
        runs = 0
        if self.settings.warmup:
            try:
                runs = runtime.warm_up(warmup_feeds(mv.model, served), [o.name for o in config.outputs])
            except Exception as e:
                raise LoadError(f"warm-up failed: {e}") from e
        return runtime, served, runs


def _batcher(mv: ModelVersion, cuda_static_batch: bool) -> Batcher:
    config, model = mv.config, mv.model
    layouts = []
    for spec in config.inputs:
        variable = tuple(i for i, d in enumerate(spec.shape) if i > 0 and d == -1)
        pad = model.text.pad_id if model.text and spec.name == model.text.ids else 0
        layouts.append(InputLayout(spec.name, variable, pad))
    b = config.batching
    runtime = mv.runtime
    assert runtime is not None and mv.metrics is not None
    static = cuda_static_batch and runtime.provider == CUDA
    policy = BatchPolicy(b.max_batch_size, b.max_queue_delay_ms / 1000, b.max_queue_size, b.instances,
                         b.max_padding_ratio, fixed_rows=b.max_batch_size if static else 0)
    output_names = [o.name for o in config.outputs]

    def run(instance: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return runtime.run(instance, feeds, output_names)

    observe = batch_observer(config, model.text, mv.metrics)
    return Batcher(run, output_names, layouts, policy, mv.metrics, mv.stats, observe)


def check_signature(config: ModelConfig, runtime: Runtime, n_labels: int) -> None:
    """Compare config.toml with the graph; raise LoadError listing every mismatch."""
    problems: list[str] = []
    graph_in = {t.name: t for t in runtime.inputs}
    graph_out = {t.name: t for t in runtime.outputs}
    cfg_in = {t.name for t in config.inputs}
    if set(graph_in) != cfg_in:
        problems.append(f"config inputs {sorted(cfg_in)} != graph inputs {sorted(graph_in)}")
    for spec in config.outputs:
        if spec.name not in graph_out:
            problems.append(f"output {spec.name!r} is not a graph output (graph has {sorted(graph_out)})")
    for spec, graph in [(s, graph_in.get(s.name)) for s in config.inputs] + [
        (s, graph_out.get(s.name)) for s in config.outputs
    ]:
        if graph is None:
            continue
        if spec.datatype != graph.datatype:
            problems.append(f"{spec.name!r}: config datatype {spec.datatype}, graph {graph.datatype}")
        if len(spec.shape) != len(graph.shape):
            problems.append(f"{spec.name!r}: config rank {len(spec.shape)} ({spec.shape}), "
                            f"graph rank {len(graph.shape)} ({_fmt(graph.shape)})")
            continue
        if graph.shape[0] is not None:
            problems.append(f"{spec.name!r}: the graph fixes the batch axis to {graph.shape[0]}; "
                            "export it with a dynamic batch axis")
        for axis, (c, g) in enumerate(zip(spec.shape[1:], graph.shape[1:], strict=True), start=1):
            if g is not None and c != g:
                problems.append(f"{spec.name!r} axis {axis}: config {c}, graph {g}")
    scores = next(o for o in config.outputs if o.name == config.scores_output)
    width = scores.shape[-1] if len(scores.shape) == 2 else None
    if width is None or width < 1:
        problems.append(f"scores output {scores.name!r} must be [-1, classes] with a static class count")
    elif width != n_labels:
        problems.append(f"{n_labels} labels but {scores.name!r} has {width} classes")
    problems += _task_problems(config)
    if problems:
        raise LoadError("config.toml does not match the graph: " + "; ".join(problems))


def _task_problems(config: ModelConfig) -> list[str]:
    first = config.inputs[0]
    if config.task == "image" and config.image is not None:
        channels = 1 if config.image.color == "L" else 3
        want = [-1, channels, config.image.height, config.image.width]
        if len(config.inputs) != 1 or first.datatype != "UINT8" or first.shape != want:
            return [f"an image model takes one UINT8 input shaped {want}"]
    if config.task == "speech" and config.audio is not None:
        want = [-1, round(config.audio.sample_rate * config.audio.duration_s)]
        if len(config.inputs) != 1 or first.datatype not in ("FP32", "FP16") or first.shape != want:
            return [f"a speech model takes one FP32 input shaped {want}"]
    if config.task == "text":
        bad = [t.name for t in config.inputs if t.datatype not in ("INT64", "INT32") or len(t.shape) != 2]
        if bad:
            return [f"text model inputs must be INT64/INT32 [-1, -1]: {bad}"]
    return []


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to the largest batch, and the largest itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) <= max_batch_size]
    return sorted({*sizes, max_batch_size})


def warmup_feeds(model: Model, config: ModelConfig) -> list[dict[str, np.ndarray]]:
    """Every batch shape the batcher will produce (and a spread of lengths for variable ones)."""
    max_tokens = config.text.max_tokens if config.text else 128
    lengths = sorted({*(1 << i for i in range(3, max_tokens.bit_length()) if (1 << i) <= max_tokens),
                      max_tokens})
    has_variable = any(-1 in spec.shape[1:] for spec in config.inputs)
    feeds = []
    for b in batch_sizes(config.batching.max_batch_size):
        for length in lengths if has_variable else [0]:
            feeds.append({spec.name: _zeros(spec, b, length, model) for spec in config.inputs})
    return feeds


def _zeros(spec: TensorSpec, rows: int, length: int, model: Model) -> np.ndarray:
    shape = (rows, *(length if d == -1 else d for d in spec.shape[1:]))
    dtype = V2_TO_NUMPY[spec.datatype]
    ti = model.text
    if ti is not None and spec.name == ti.mask:
        return np.ones(shape, dtype=dtype)
    if ti is not None and spec.name == ti.ids:
        return np.full(shape, ti.pad_id, dtype=dtype)
    return np.zeros(shape, dtype=dtype)
