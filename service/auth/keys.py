"""API keys: a TOML file of named keys, each stored as the SHA-256 of its secret with its scopes and
limits, and the store a server reads it through (re-read when the file changes, or on SIGHUP).

    [keys.ci]
    sha256 = "9f86d081..."          # of the secret; the secret itself is shown once, never stored
    scopes = ["infer"]
    rate = 20.0                     # requests per second (0: no limit)
    rows = 0.0                      # rows (inputs) per second (0: no limit)
    priority = 0
    created = "2026-12-06T19:40:00Z"

Secrets are 256 random bits, so a plain SHA-256 is enough to keep the file harmless if read (no
slow password hash is needed against guessing); a presented secret is hashed and compared with every
stored hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("neuroserve.auth")

SCOPES = ("infer", "admin")
SECRET_PREFIX = "ns_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RELOAD_CHECK_S = 1.0  # how often a request may look at the file's modification time


class KeyFileError(ValueError):
    """The keys file is missing, unreadable or not in the expected shape."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str
    scopes: frozenset[str]
    rate: float = 0.0  # requests per second; 0: unlimited
    rows: float = 0.0  # rows per second; 0: unlimited
    priority: int = 0
    created: str = ""

    def allows(self, scope: str) -> bool:
        # admin implies infer: whoever may change the models may also use them.
        return scope in self.scopes or "admin" in self.scopes


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise KeyFileError(f"scopes must be a comma-separated subset of {', '.join(SCOPES)}; "
                           f"got {text!r}")
    return scopes


def read_keys(path: Path) -> dict[str, ApiKey]:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise KeyFileError(f"keys file {path}: {e}") from None
    table = doc.get("keys", {})
    if not isinstance(table, dict) or set(doc) - {"keys"}:
        raise KeyFileError(f"keys file {path}: expected only [keys.<name>] tables")
    keys = {}
    for name, entry in table.items():
        if not NAME_PATTERN.match(name) or not isinstance(entry, dict):
            raise KeyFileError(f"keys file {path}: bad key entry {name!r}")
        try:
            digest = entry["sha256"]
            scopes = frozenset(entry["scopes"])
            rate = float(entry.get("rate", 0.0))
            rows = float(entry.get("rows", 0.0))
            priority = int(entry.get("priority", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise KeyFileError(f"keys file {path}: key {name!r}: {e!r}") from None
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)) \
                or not scopes or scopes - set(SCOPES) or rate < 0 or rows < 0:
            raise KeyFileError(f"keys file {path}: key {name!r} needs a sha256 hex digest, scopes "
                               f"within {list(SCOPES)}, and a rate and rows ≥ 0")
        keys[name] = ApiKey(name, digest, scopes, rate, rows, priority, str(entry.get("created", "")))
    return keys


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_keys(path: Path, keys: dict[str, ApiKey]) -> None:
    """Write atomically (a reader never sees half a file) and readable by the owner only."""
    lines = ["# neuroserve API keys: `neuroserve keys create|list|revoke`. Secrets are not stored,",
             "# only their SHA-256.", ""]
    for key in sorted(keys.values(), key=lambda k: k.name):
        lines += [f"[keys.{key.name}]", f"sha256 = {_toml_string(key.sha256)}",
                  "scopes = [" + ", ".join(_toml_string(s) for s in sorted(key.scopes)) + "]",
                  f"rate = {key.rate!r}", f"rows = {key.rows!r}", f"priority = {key.priority}",
                  f"created = {_toml_string(key.created)}", ""]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def create_key(path: Path, name: str, scopes: frozenset[str], rate: float = 0.0,
               priority: int = 0, rows: float = 0.0) -> str:
    """Add a key to the file (created if absent) and return its secret, which is stored nowhere."""
    if not NAME_PATTERN.match(name):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if rate < 0 or rows < 0:
        raise KeyFileError("rate and rows must be ≥ 0")
    keys = read_keys(path) if path.exists() else {}
    if name in keys:
        raise KeyFileError(f"a key named {name!r} exists; revoke it first")
    secret = new_secret()
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    keys[name] = ApiKey(name, hash_secret(secret), scopes, rate, rows, priority, created)
    write_keys(path, keys)
    return secret


def revoke_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    if name not in keys:
        raise KeyFileError(f"no key named {name!r} in {path}")
    del keys[name]
    write_keys(path, keys)


@dataclass(slots=True)
class KeyStore:
    """The keys a server accepts, re-read when the file changes (checked at most once a second, on
    the requests themselves) or when `reload()` is called (SIGHUP). A file that turns invalid keeps
    the last good keys and logs why."""

    path: Path
    keys: dict[str, ApiKey] = field(default_factory=dict)
    _stamp: tuple[int, int, int] | None = None
    _next_check: float = 0.0

    @classmethod
    def open(cls, path: Path) -> KeyStore:
        store = cls(path)
        store.keys = read_keys(path)  # at start-up a bad file is fatal, not silently keyless
        store._stamp = store._file_stamp()
        store._next_check = time.monotonic() + RELOAD_CHECK_S
        return store

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> None:
        try:
            keys = read_keys(self.path)
        except KeyFileError as e:
            log.error("keeping the previous API keys: %s", e)
            return
        added, removed = keys.keys() - self.keys.keys(), self.keys.keys() - keys.keys()
        self.keys = keys
        log.info("API keys reloaded", extra={"keys": len(keys), "added": sorted(added),
                                             "removed": sorted(removed)})

    def refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_S
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()

    def find(self, secret: str) -> ApiKey | None:
        self.refresh()
        digest = hash_secret(secret)
        found = None
        for key in self.keys.values():  # every hash compared, in constant time each
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found
