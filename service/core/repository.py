"""The model repository: scan `models/`, validate, load and warm up versions, switch them live.

Each `models/<name>/` holds `config.toml` and integer version directories with `model.onnx`. A model
or version that cannot be served is UNAVAILABLE with a reason; the others serve regardless. A
reload brings the new versions up beside the serving ones and switches only once they are warm; if
none comes up, the old ones keep serving and the index shows why (see `Repository.load`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
from pydantic import ValidationError

from service.core.batching import Batcher, BatchPolicy, InputLayout
from service.core.catalog import MODEL_FILE, Catalog, Model, ModelVersion, State, text_model
from service.core.model_config import V2_TO_NUMPY, ModelConfig, TensorSpec, load_model_config
from service.core.runtime import CUDA, LoadError, Runtime
from service.errors import ModelLoadFailed, ModelNotFound
from service.observability import metrics
from service.observability.monitoring import batch_observer
from service.settings import Settings

log = logging.getLogger("neuroserve.repository")


def fail(model: Model, reason: str) -> None:
    model.error = reason
    metrics.set_model_state(model.name, "", "unavailable")
    log.error("model unavailable: %s", reason, extra={"model": model.name})


async def close_version(mv: ModelVersion, replaced_by: ModelVersion | None = None) -> None:
    """Finish what was admitted and stop serving. `replaced_by` is the version of the same number
    that a reload has just brought up: the metric series of this (model, version) are its now,
    so closing this one must not mark them unloaded."""
    if isinstance(mv.batcher, Batcher):
        await mv.batcher.close()
    if mv.provider and (replaced_by is None or replaced_by.provider != mv.provider):
        metrics.MODEL_INFO.labels(mv.name, str(mv.version), mv.provider).set(0)
    mv.batcher = None
    mv.runtime = None
    if replaced_by is None:
        mv.set_state(State.UNLOADED)
    else:
        mv.state = State.UNLOADED


class Repository(Catalog):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.model_repository)
        self.settings = settings
        self._lock = asyncio.Lock()
        self._loaded_fingerprints: dict[str, tuple[object, ...]] = {}

    def batcher_for(self, name: str, version: int | None, pinned: bool) -> Batcher:
        """The batcher for a request a front-end resolved to `version` with its own (maybe a moment
        old) view: a pinned request gets exactly that version; an unpinned one the newest ready
        version if that one has been switched away meanwhile."""
        if pinned:
            mv = self.get(name, str(version))
        else:
            mv = self.model(name).versions.get(version) if version is not None else None
            if mv is None or mv.state is not State.READY:
                mv = self.get(name, None)
        submitter = mv.serving_batcher(pinned)
        assert isinstance(submitter, Batcher)
        return submitter

    # -- loading ------------------------------------------------------------------------------------

    async def load_all(self) -> None:
        self.loading = True
        try:
            for name in self.scan():
                await self.load(name)
        finally:
            self.loading = False

    async def load(self, name: str) -> Model:
        """(Re)load a model from disk. New versions load and warm up beside the serving ones, then
        traffic switches to them at once and the old versions drain and close. If none of the new
        versions comes up, nothing that serves changes: the old versions keep serving and the
        failed ones show in the index with their reason. Returns the model now in the catalog."""
        directory = self.root / name
        if name not in self.scan():
            raise ModelNotFound(f"no model directory {name!r} in the repository")
        async with self._lock:
            fingerprint = model_fingerprint(directory)
            model = Model(name, directory)
            old = self.models.get(name)
            serving = old is not None and not old.unloaded and bool(old.ready_versions())
            if not serving:
                self.models[name] = model  # show LOADING in the index while it loads
            self._prepare(model)
            for mv in model.versions.values():
                await self._load_version(mv)
            self._loaded_fingerprints[name] = fingerprint
            if serving and not model.ready_versions():
                assert old is not None
                self._keep_serving(old, model)
            self.models[name] = model
            if old is not None and old is not model:
                for mv in old.versions.values():
                    mv.successor = model
                for mv in old.versions.values():
                    if mv.state is State.READY:
                        await close_version(mv, replaced_by=model.versions.get(mv.version))
            log.info("model switched", extra={"model": name, "versions": [
                mv.version for mv in model.ready_versions()]})
        return model

    @staticmethod
    def _keep_serving(old: Model, failed: Model) -> NoReturn:
        """A reload that brought no version up: record why beside the versions that keep serving,
        and say so to the caller."""
        reason = failed.error or "; ".join(f"version {mv.version}: {mv.reason}"
                                           for mv in failed.versions.values())
        log.error("reload failed; the serving versions stay: %s", reason, extra={"model": old.name})
        versions = {v: mv for v, mv in old.versions.items() if not mv.failed_update}
        for v, mv in failed.versions.items():
            if v in versions:  # the same number serves its earlier files
                versions[v].reason = f"reload failed, serving the earlier files: {mv.reason}"
                continue
            mv.model, mv.failed_update = old, True
            versions[v] = mv
        if failed.error:
            for mv in versions.values():
                if mv.state is State.READY:
                    mv.reason = f"reload failed, serving the earlier files: {failed.error}"
        old.versions = dict(sorted(versions.items()))
        raise ModelLoadFailed(f"failed to load {old.name!r}: {reason}; the serving versions "
                              f"{[mv.version for mv in old.ready_versions()]} keep serving")

    async def unload(self, name: str) -> None:
        model = self.model(name)
        async with self._lock:
            model.unloaded = True
            for mv in model.versions.values():
                await close_version(mv)
        log.info("model unloaded", extra={"model": name})

    async def close(self) -> None:
        for model in list(self.models.values()):
            for mv in model.versions.values():
                if mv.state is State.READY:
                    await close_version(mv)

    async def poll(self, interval_s: float) -> None:
        """`--model-control-mode poll`: load a model whose files changed, a new model, and unload a
        removed one, as Triton's poll mode does. A change is acted on only once the files have stayed
        the same for one whole interval, so a version still being copied is never loaded half-written
        (writing it elsewhere and renaming its directory into place is the safe way to publish)."""
        seen: dict[str, tuple[object, ...]] = {}
        while True:
            await asyncio.sleep(interval_s)
            on_disk = set(self.scan())
            for name in sorted(on_disk):
                fingerprint = model_fingerprint(self.root / name)
                stable = seen.get(name) == fingerprint
                seen[name] = fingerprint
                if stable and fingerprint != self._loaded_fingerprints.get(name):
                    log.info("model files changed; loading", extra={"model": name})
                    try:
                        await self.load(name)
                    except Exception:  # the next change of its files tries again
                        log.exception("poll: loading %s failed", name)
            for name in sorted(set(self.models) - on_disk):
                if not self.models[name].unloaded:
                    log.info("model directory removed; unloading", extra={"model": name})
                    await self.unload(name)
                self._loaded_fingerprints.pop(name, None)
                seen.pop(name, None)

    def _prepare(self, model: Model) -> None:
        """Read the config, labels and tokenizer, and pick the versions the policy serves."""
        try:
            config = load_model_config(model.directory)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
                                 for err in e.errors())
            return fail(model, f"invalid config.toml: {problems}")
        except (OSError, ValueError) as e:  # missing file, TOML syntax
            return fail(model, f"cannot read config.toml: {e}")
        if config.name != model.name:
            return fail(model,
                f"config.toml names the model {config.name!r} but its directory is {model.name!r}"
            )
        try:
            model.labels = config.label_list(model.directory)
        except OSError as e:
            return fail(model, f"cannot read labels: {e}")
        try:
            model.text = text_model(config, model.directory, self.settings.max_text_chars)
        except Exception as e:  # tokenizers raises plain Exception for unreadable files
            return fail(model, f"cannot load tokenizer {config.text.tokenizer if config.text else ''!r}: {e}")
        model.config = config
        on_disk = sorted(int(p.name) for p in model.directory.iterdir() if p.is_dir() and p.name.isdigit())
        policy = config.version_policy
        wanted = sorted(policy.specific) if policy.specific is not None else on_disk[-(policy.latest or 1):]
        if not wanted:
            return fail(model, "no integer version directories (e.g. 1/model.onnx)")
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
        runtime = runtime_class()(mv.path, self.settings, config.batching.instances)
        check_signature(config, runtime, len(mv.model.labels))
        served = config.on_provider(runtime.provider == CUDA)
        runs = 0
        if self.settings.warmup:
            try:
                runs = runtime.warm_up(warmup_feeds(mv.model, served), [o.name for o in config.outputs])
            except Exception as e:
                raise LoadError(f"warm-up failed: {e}") from e
        return runtime, served, runs


RUNTIME_FACTORY_ENV = "NEUROSERVE_RUNTIME_FACTORY"


def runtime_class() -> type[Runtime]:
    """ONNX Runtime, unless a benchmark swaps in a simulated device (bench/simulated_device.py) with
    NEUROSERVE_RUNTIME_FACTORY=module:class; nothing in production sets it."""
    spec = os.environ.get(RUNTIME_FACTORY_ENV)
    if not spec:
        return Runtime
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


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
                         b.max_padding_ratio, fixed_rows=b.max_batch_size if static else 0,
                         max_queue_wait_s=b.max_queue_wait_ms / 1000)
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


def model_fingerprint(directory: Path) -> tuple[object, ...]:
    """Names, sizes and modification times of a model's files (config, labels, tokenizer, versions)."""
    entries: list[object] = []
    try:
        for path in sorted(directory.iterdir()):
            if path.name.startswith("."):
                continue
            files = sorted(path.iterdir()) if path.is_dir() else [path]
            for f in files:
                st = f.stat()
                entries.append((path.name, f.name, st.st_size, st.st_mtime_ns))
    except OSError:  # removed or rewritten while we looked: differs from any complete state
        entries.append(("unreadable",))
    return tuple(entries)


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
