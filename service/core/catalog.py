"""What is served: models, their versions and states, and the questions front-ends ask about them.

The executor's `Repository` is a `Catalog` that loads from disk and owns the sessions. A front-end
in another process keeps a `Catalog` rebuilt from the executor's snapshots (`snapshot` and
`from_snapshot`): the same objects and queries, with versions whose batcher is the executor client.
Every front-end therefore answers index, metadata and readiness from the executor's one state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.codecs.text import TextEncoder, TextModel
from service.core.model_config import V2_TO_NUMPY, ModelConfig
from service.errors import ModelNotFound, ModelNotReady, ServiceError
from service.observability import metrics
from service.observability.stats import Stats

if TYPE_CHECKING:
    from service.core.batching import BatchResult
    from service.core.runtime import Runtime

log = logging.getLogger("neuroserve.repository")

MODEL_FILE = "model.onnx"


class State(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


class Submitter(Protocol):
    """Where a version's requests go: its `Batcher` in the executor, the executor client elsewhere."""

    @property
    def closing(self) -> bool: ...

    def pin(self) -> Submitter:
        """This submitter for requests that named their version: never served by another."""
        ...

    async def submit(self, inputs: dict[str, Any], rows: int, deadline: float | None = None, *,
                     priority: int = 0, arrived: float | None = None) -> BatchResult: ...

    async def submit_many(self, inputs: dict[str, Any], rows: int, deadline: float | None = None, *,
                          priority: int = 0) -> BatchResult: ...

    def refusal(self, rows: int = 1, priority: int = 0) -> ServiceError | None:
        """What the queue would answer a request of `rows` rows in class `priority` now, if it
        would refuse it (None where that is known only once it arrives)."""
        ...

    def reserve(self, rows: int = 1) -> None:
        """Count `rows` that a request's head was admitted with as queued, until they are."""
        ...


@dataclass(eq=False)
class ModelVersion:
    model: Model
    version: int
    path: Path
    state: State = State.LOADING
    reason: str = ""
    provider: str = ""
    runtime: Runtime | None = None
    batcher: Submitter | None = None
    metrics: metrics.ModelMetrics | None = None
    stats: Stats = field(default_factory=Stats)
    load_seconds: float = 0.0
    # The model's config with the batching knobs of the provider this version runs on; set on load.
    served_config: ModelConfig | None = None
    # The model that took this version's place on a reload; requests that reach this version after
    # the switch go there instead of failing.
    successor: Model | None = None
    # A version a reload could not bring up while older versions kept serving: shown in the index
    # with its reason, and not counted against readiness.
    failed_update: bool = False

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def config(self) -> ModelConfig:
        if self.served_config is not None:
            return self.served_config
        assert self.model.config is not None
        return self.model.config

    def serving_batcher(self, pinned: bool = False) -> Submitter:
        """Where to queue a request for this version.

        A request picks its version before its body is read; a reload can switch versions in
        between. An unpinned request (no version named) then goes to the newest ready version of the
        successor; a pinned one to the same version number there, else it gets 503 like any request
        for a version that is not ready."""
        if self.batcher is not None and not self.batcher.closing:
            return self.batcher.pin() if pinned else self.batcher
        if self.successor is not None:
            target = self.successor.versions.get(self.version) if pinned else None
            if target is None and not pinned:
                ready = self.successor.ready_versions()
                target = ready[-1] if ready else None
            if target is not None and target is not self:
                return target.serving_batcher(pinned)
        raise ModelNotReady(f"model {self.name!r} version {self.version} was unloaded",
                            headers={"Retry-After": "1"})

    def set_state(self, state: State, reason: str = "") -> None:
        self.state, self.reason = state, reason
        metrics.set_model_state(self.name, str(self.version), state.value.lower())


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


def text_model(config: ModelConfig, directory: Path, max_chars: int) -> TextModel | None:
    """The tokenizer and input roles of a text model (None for other tasks); raises on a bad file."""
    if config.text is None or config.task != "text":
        return None
    encoder = TextEncoder(directory / config.text.tokenizer, config.text.max_tokens)
    dtypes = {t.name: V2_TO_NUMPY[t.datatype] for t in config.inputs}
    return TextModel.for_inputs(encoder, dtypes, max_chars, config.text.window_stride)


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, Model] = {}
        self.loading = True  # until the first load of the repository has finished: not ready before

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
            raise ModelNotReady(f"model {name!r} is not ready: {self._why_not(model)}",
                                headers={"Retry-After": "1"})
        try:
            mv = model.versions.get(int(version))
        except ValueError:
            mv = None
        if mv is None:
            raise ModelNotFound(f"model {name!r} has no version {version!r} being served")
        if mv.state is not State.READY:
            reason = f": {mv.reason}" if mv.reason else ""
            raise ModelNotReady(f"model {name!r} version {version} is {mv.state.value}{reason}",
                                headers={"Retry-After": "1"})
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
            return ModelNotReady(f"model {name!r} is loading", headers={"Retry-After": "1"})
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
            # A version that a reload failed to bring up beside serving ones changes nothing that
            # serves, so it does not count against readiness.
            return all(
                (not m.error or m.ready_versions()) and m.versions
                and all(v.state is State.READY or v.failed_update for v in m.versions.values())
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

    def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's statistics: of one model (every version, or the one asked for), or of every model
        version that is ready or has served."""
        if name is None:
            return [mv.stats.json(m.name, str(v)) for m in self.models.values()
                    for v, mv in sorted(m.versions.items())
                    if mv.state is State.READY or mv.stats.execution_count]
        versions = sorted(self.model(name).versions.items())
        if version is not None:
            versions = [(v, mv) for v, mv in versions if str(v) == version]
            if not versions:
                raise ModelNotFound(f"model {name!r} has no version {version!r}")
        return [mv.stats.json(name, str(v)) for v, mv in versions]

    # -- snapshots: the executor's state as plain data for front-ends in other processes ------------

    def snapshot(self) -> dict[str, Any]:
        return {"loading": self.loading, "models": [_model_doc(m) for m in self.models.values()]}

    @classmethod
    def from_snapshot(cls, root: Path, doc: dict[str, Any], batcher: Any, max_text_chars: int,
                      previous: Catalog | None = None) -> Catalog:
        """A catalog mirroring `doc`; `batcher(name, version)` makes each ready version's submitter.
        Tokenizers and metric children of unchanged models are taken over from `previous`."""
        catalog = cls(root)
        catalog.loading = doc["loading"]
        for m in doc["models"]:
            old = previous.models.get(m["name"]) if previous is not None else None
            model = Model(m["name"], root / m["name"], error=m["error"], labels=m["labels"],
                          unloaded=m["unloaded"])
            if m["config"] is not None:
                model.config = ModelConfig.model_validate(m["config"])
                if old is not None and old.config == model.config and old.text is not None:
                    model.text = old.text
                else:
                    try:
                        model.text = text_model(model.config, model.directory, max_text_chars)
                    except Exception as e:  # tokenizers raises plain Exception for unreadable files
                        model.error = f"cannot load tokenizer: {e}"
            for v in m["versions"]:
                mv = ModelVersion(model, v["version"], model.directory / str(v["version"]) / MODEL_FILE,
                                  State(v["state"]), v["reason"], v["provider"],
                                  load_seconds=v["load_seconds"], failed_update=v["failed_update"])
                if v["served_config"] is not None:
                    mv.served_config = ModelConfig.model_validate(v["served_config"])
                if mv.state is State.READY:
                    before = old.versions.get(mv.version) if old is not None else None
                    reuse = before is not None and before.provider == mv.provider
                    mv.metrics = before.metrics if reuse and before.metrics else metrics.ModelMetrics(
                        model.name, str(mv.version), mv.provider, model.labels)
                    mv.batcher = batcher(model.name, mv.version)
                model.versions[mv.version] = mv
            catalog.models[model.name] = model
        return catalog


def _model_doc(m: Model) -> dict[str, Any]:
    return {
        "name": m.name, "error": m.error, "unloaded": m.unloaded, "labels": m.labels,
        "config": m.config.model_dump(mode="json") if m.config is not None else None,
        "versions": [
            {"version": v, "state": mv.state.value, "reason": mv.reason, "provider": mv.provider,
             "load_seconds": mv.load_seconds, "failed_update": mv.failed_update,
             "served_config": mv.served_config.model_dump(mode="json") if mv.served_config else None}
            for v, mv in sorted(m.versions.items())
        ],
    }
