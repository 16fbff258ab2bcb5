"""A small reader of the Dockerfile: its stages and, per stage, the ENV, CMD and HEALTHCHECK the
image ends up with, so tests can run the image's own start and health commands on this machine."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None
    healthcheck: list[str] | None = None
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    user: str | None = None


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments and blank lines."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def _exec_form(value: str) -> list[str]:
    args = json.loads(value)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args), value
    return args


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


def parse(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            base = _expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            parent = next((s for s in stages if s.name == base), None)
            stage = Stage(name=name, base=base)
            if parent is not None:  # FROM an earlier stage inherits its image configuration
                stage.env = dict(parent.env)
                stage.cmd, stage.healthcheck, stage.user = parent.cmd, parent.healthcheck, parent.user
            stages.append(stage)
            continue
        stage = stages[-1]
        stage.instructions.append((keyword, rest))
        if keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                stage.env[key] = _expand(value, stage.env)
        elif keyword == "CMD":
            stage.cmd = _exec_form(rest)
        elif keyword == "USER":
            stage.user = rest
        elif keyword == "HEALTHCHECK":
            options = {}
            while rest.startswith("--"):
                option, _, rest = rest.partition(" ")
                key, _, value = option[2:].partition("=")
                options[key] = value
                rest = rest.strip()
            assert rest.startswith("CMD "), "HEALTHCHECK must use the exec form: CMD [...]"
            stage.healthcheck = _exec_form(rest[4:])
            stage.healthcheck_options = options
    return stages
