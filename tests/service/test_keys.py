"""`neuroserve keys create|list|revoke` and the keys file a server reads."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.auth.keys import KeyFileError, KeyStore, create_key, hash_secret, parse_scopes, read_keys
from tests.service.servers import ROOT


def _keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", "keys", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_create_prints_the_secret_once_and_stores_only_its_hash(tmp_path: Path):
    keys_file = tmp_path / "keys.toml"
    made = _keys("create", "--file", str(keys_file), "--name", "ci", "--scopes", "infer,admin",
                 "--rate", "20", "--rows", "500", "--priority", "2")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("ns_") and len(secret) > 40
    text = keys_file.read_text()
    assert secret not in text and hash_secret(secret) in text
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    key = read_keys(keys_file)["ci"]
    assert (key.scopes, key.rate, key.rows, key.priority) == (frozenset({"infer", "admin"}), 20.0, 500.0, 2)
    listed = _keys("list", "--file", str(keys_file))
    assert listed.returncode == 0 and listed.stdout.startswith("ci\tscopes=admin,infer\trate=20\trows=500")
    assert secret not in listed.stdout
    assert _keys("create", "--file", str(keys_file), "--name", "ci").returncode == 2  # names are unique
    assert _keys("create", "--file", str(keys_file), "--name", "x", "--scopes", "root").returncode == 2
    assert _keys("revoke", "--file", str(keys_file), "ci").returncode == 0
    assert read_keys(keys_file) == {}
    assert _keys("revoke", "--file", str(keys_file), "ci").returncode == 2


def test_a_server_refuses_to_start_on_a_bad_keys_file(tmp_path: Path):
    bad = tmp_path / "keys.toml"
    bad.write_text("[keys.x]\nsha256 = 'nothex'\nscopes = ['infer']\n")
    served = subprocess.run([sys.executable, "-m", "service", "serve", "--api-keys-file", str(bad),
                             "--port", "0", "--grpc-port", "0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert served.returncode == 2 and "sha256" in served.stderr


def test_the_store_follows_the_file_and_keeps_the_last_good_keys(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("service.auth.keys.RELOAD_CHECK_S", 0.0)
    keys_file = tmp_path / "keys.toml"
    first = create_key(keys_file, "a", parse_scopes("infer"))
    store = KeyStore.open(keys_file)
    assert store.find(first).name == "a"  # type: ignore[union-attr]
    assert store.find("ns_wrong") is None
    second = create_key(keys_file, "b", parse_scopes("admin"))
    time.sleep(0.01)
    assert store.find(second).name == "b"  # type: ignore[union-attr]
    keys_file.write_text("not toml [")
    assert store.find(second).name == "b"  # type: ignore[union-attr]
    with pytest.raises(KeyFileError):
        KeyStore.open(keys_file)
