"""Calibration and out-of-domain measurement (training/quality.py) and the text windows it shares
with the service (service/codecs/text.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.codecs.text import TextEncoder, aggregate
from training import quality

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise():
    labels = np.array([0] * 8 + [1] * 2)
    honest = np.tile([0.8, 0.2], (10, 1))  # 80 % confident, 80 % right
    assert quality.ece(honest, labels) == pytest.approx(0.0)
    overconfident = np.tile([0.99, 0.01], (10, 1))
    assert quality.ece(overconfident, labels) == pytest.approx(0.19)


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 4))
    probs = quality.softmax_t(logits, 2.0)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    assert quality.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


def test_fold_temperature_scales_probabilities_and_leaves_logits_alone(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    quality.fold_temperature(path, 2.0)
    quality.fold_temperature(path, 0.5)  # a second fold replaces the first
    assert quality.graph_temperature(path) == 0.5
    x = np.array([[1.0, 2.0, 0.5]], dtype=np.float32)
    logits, probs = ort.InferenceSession(str(path)).run(None, {"x": x})
    assert (logits == x).all()
    np.testing.assert_allclose(probs, quality.softmax_t(x, 0.5), rtol=1e-6)


def test_windows_wrap_each_slice_in_the_tokenizers_special_tokens():
    encoder = TextEncoder(MODELS / "sentiment" / "tokenizer.json", 64)
    text = " ".join(f"word{i}" for i in range(200))
    whole = np.asarray(encoder.whole.encode(text).ids)
    windows = encoder.windows(text, max_tokens=10_000)
    assert windows.shape[1] == 64 and len(windows) > 3
    assert (windows[:, 0] == whole[0]).all() and (windows[:, -1] == whole[-1]).all()  # [CLS] … [SEP]
    assert (windows[0, 1:-1] == whole[1:63]).all() and (windows[1, 1:-1] == whole[32:94]).all()
    assert (windows[-1, 1:-1] == whole[-63:-1]).all()
    assert encoder.windows("A short one.", max_tokens=10_000).shape[0] == 1


def test_aggregate_is_the_softmax_of_the_mean_logits():
    logits = np.array([[2.0, -1.0], [-0.5, 0.3], [0.1, 0.2]])
    np.testing.assert_allclose(aggregate(quality.softmax_t(logits, 1.7)),
                               quality.softmax_t(logits.mean(0), 1.7), rtol=1e-6)


def test_uci_digits_are_drawn_mnist_style():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16  # a "1"
    drawn = quality.mnist_style(digit)
    assert drawn.shape == (28, 28) and drawn.dtype == np.uint8
    rows = np.flatnonzero(drawn.max(1) > 0)
    assert 19 <= rows[-1] - rows[0] + 1 <= 22  # the ink's longer side scaled to about 20 px
    cy, cx = np.argwhere(drawn > 0).mean(0)
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1


def test_pang_lee_reviews_are_whole_reviews_outside_every_training_source():
    from training import text_data

    reviews = quality.pang_lee_reviews()
    assert len(reviews) == 1500 and np.bincount(reviews.labels).tolist() == [750, 750]
    assert np.median([len(t.split()) for t in reviews.inputs]) > 600  # whole reviews, not snippets
    # No training sentence of ten words or more is quoted in a review, but for two Rotten
    # Tomatoes snippets (critics' quotes from their own reviews; docs/data.md).
    def shingles(words: list[str]) -> set[tuple[str, ...]]:
        return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}

    in_reviews = set().union(*(shingles(text_data.normalized(t).split()) for t in reviews.inputs))
    texts, _ = text_data.corpus()
    quoted = [t for t in texts["train"] if len(text_data.normalized(t).split()) >= 10
              and shingles(text_data.normalized(t).split()) <= in_reviews]
    assert len(quoted) <= 2, quoted


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "sentiment", "spoken-digits"])
def test_each_card_shows_the_calibration_its_graph_serves(name):
    card = (MODELS / name / "README.md").read_text(encoding="utf-8")
    assert "## Calibration" in card and "## Out of domain" in card
    assert (MODELS / name / "reliability_diagram.png").exists()
    served = quality.graph_temperature(MODELS / name / "1" / "model.onnx")
    fitted = float(re.search(r"gave T = ([\d.]+)", card).group(1))
    assert served == pytest.approx(fitted, abs=5e-4) if "is folded into the graph" in card else served == 1.0


def test_telephone_band_keeps_speech_frequencies_and_drops_the_rest():
    t = np.arange(16000) / 16000
    tones = np.stack([np.sin(2 * np.pi * f * t) for f in (100, 1000, 3000, 5000)]).astype(np.float32)
    rms = np.sqrt((quality.telephone_band(tones)[:, 2000:-2000] ** 2).mean(1)) / np.sqrt(0.5)
    assert rms[1] > 0.9 and rms[2] > 0.8  # 1 and 3 kHz pass
    assert rms[0] < 0.1 and rms[3] < 0.01  # 100 Hz and 5 kHz do not
