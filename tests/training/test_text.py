"""The served sentiment model meets its bar on the real test split through the service's tokenizer, its
answers do not depend on padding or batch neighbours, and `python -m training sentiment --fast` runs the
whole pipeline (train → export → parity → int8 weights → config) end to end."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.codecs.text import TextEncoder
from service.core.model_config import load_model_config
from training import text, text_data, zoo
from training.__main__ import main as training_main
from training.export import cpu_session

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "sentiment"
BAR = 0.85


@pytest.fixture(scope="module")
def shipped():
    config = load_model_config(MODEL_DIR)
    encoder = TextEncoder(MODEL_DIR / config.text.tokenizer, config.text.max_tokens)
    return config, encoder, cpu_session(MODEL_DIR / "1" / "model.onnx")


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    data = text_data.load_sentences()
    index = text_data.split(data["label"])["test"]
    return data["text"][index], data["label"][index]


def padded(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pad (ids, mask) pairs from the codec with zeros, as the service's batcher does."""
    width = max(len(ids) for ids, _ in pairs)
    feeds = {"input_ids": np.zeros((len(pairs), width), np.int64),
             "attention_mask": np.zeros((len(pairs), width), np.int64)}
    for row, (ids, mask) in enumerate(pairs):
        feeds["input_ids"][row, :len(ids)] = ids
        feeds["attention_mask"][row, :len(mask)] = mask
    return feeds


def test_split_is_stratified_and_disjoint():
    data = text_data.load_sentences()
    parts = text_data.split(data["label"])
    assert {k: len(v) for k, v in parts.items()} == {"train": 8454, "validation": 1057, "test": 1057}
    assert len(np.unique(np.concatenate(list(parts.values())))) == len(data["label"])
    assert np.bincount(data["label"][parts["test"]]).tolist() == [533, 524]


def test_added_sources_never_train_on_a_held_out_sentence():
    from training import quality

    texts, labels = text_data.corpus()
    assert {k: len(v) for k, v in labels.items()} == {
        "train": 8454 + 2360, "validation": 1057 + 297, "test": 1057, "added test": 297}
    # The movie test split, the card's figure, is unchanged by the added sources.
    movie = text_data.load_sentences()
    assert texts["test"].tolist() == movie["text"][text_data.split(movie["label"])["test"]].tolist()
    trained = {text_data.normalized(t) for t in texts["train"]}
    held_out = [t for k in ("validation", "test", "added test") for t in texts[k]]
    held_out += [t for domain in quality.VADER_FILES for t in quality.vader_sentences(domain).inputs]
    # Two movie sentences are written twice in their source, once in train and once in validation.
    assert sum(text_data.normalized(t) in trained for t in held_out) == 2
    added = text_data.load_added_sentences()
    assert np.bincount(added["label"]).tolist() == [1488, 1486]
    assert sorted(set(added["source"])) == ["amazon", "imdb", "yelp"]


def test_neutral_sentences_use_no_opinion_word_and_follow_the_seed():
    """WordNet's examples that the neutral-sentence option trains on: at least four words, none of
    them an entry of VADER's lexicon rated 1 or more from 0; the same draw for the same seed."""
    neutral = text_data.load_neutral_sentences(300, seed=0)
    opinion = set(text_data.load_lexicon(text_data.NEUTRAL_MAX_RATING)[0].tolist())
    assert len(set(neutral.tolist())) == 300
    for sentence in neutral:
        assert len(sentence.split()) >= 4
        assert not set(re.findall(r"[a-z']+", sentence.lower())) & opinion, sentence
    assert neutral.tolist() == text_data.load_neutral_sentences(300, seed=0).tolist()
    assert neutral.tolist() != text_data.load_neutral_sentences(300, seed=1).tolist()


def test_the_chat_lexicon_holds_emoticons_and_acronyms_alone_and_beside_neutral_sentences():
    """The chat-lexicon option's texts: VADER entries rated 1 or more from 0 that no dictionary has
    (":)" and "lol" in, "good" and "loved" out), each alone with the sign of its rating, then once
    more before or after a neutral sentence with the same label; the same draw for the same seed."""
    alone, composed, labels = (a.tolist() for a in text_data.load_chat_lexicon(1.0, seed=0))
    rated = set(zip(*(a.tolist() for a in text_data.load_lexicon(1.0)), strict=True))
    assert {":)", ":(", "<3", "lol", "smh"} <= set(alone)
    assert not {"good", "loved", "terrible", "happily"} & set(alone)
    assert set(zip(alone, labels, strict=True)) <= rated
    assert (":)", 1) in rated and (":(", 0) in rated
    pool = set(text_data._neutral_pool())
    for entry, sentence in zip(alone, composed, strict=True):
        before = sentence.startswith(entry + " ") and sentence[len(entry) + 1:] in pool
        after = sentence.endswith(" " + entry) and sentence[:-len(entry) - 1] in pool
        assert before or after, (entry, sentence)
    assert composed == text_data.load_chat_lexicon(1.0, seed=0)[1].tolist()
    assert composed != text_data.load_chat_lexicon(1.0, seed=1)[1].tolist()


def test_shipped_model_meets_the_bar_on_the_test_split(shipped, test_split):
    _, encoder, session = shipped
    texts, labels = test_split
    pairs = encoder.encode([str(t) for t in texts], max_chars=10_000)
    order = np.argsort([len(ids) for ids, _ in pairs], kind="stable")  # little padding, fast
    predicted = np.empty(len(pairs), dtype=np.int64)
    for start in range(0, len(order), 64):
        rows = order[start:start + 64]
        probabilities = session.run(["probabilities"], padded([pairs[i] for i in rows]))[0]
        predicted[rows] = probabilities.argmax(1)
    accuracy = float((predicted == labels).mean())
    assert accuracy >= BAR, f"{accuracy:.2%} < {BAR:.0%}"
    # The model card reports what the service actually answers.
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    reported = float(re.search(r"test accuracy \| \*\*([\d.]+)%\*\*", card).group(1)) / 100
    assert abs(reported - accuracy) < 6e-5, f"card says {reported:.2%}, the graph scores {accuracy:.2%}"


def test_padding_and_batch_neighbours_do_not_change_an_answer(shipped, test_split):
    _, encoder, session = shipped
    texts, _ = test_split
    pairs = encoder.encode([str(t) for t in texts[:24]], max_chars=10_000)
    longest = max(pairs, key=lambda p: len(p[0]))
    together = session.run(["logits"], padded([*pairs, longest]))[0][:-1]
    for row, pair in enumerate(pairs):
        alone = session.run(["logits"], padded([pair]))[0][0]
        np.testing.assert_allclose(together[row], alone, atol=1e-4)
    shuffled = np.random.default_rng(0).permutation(len(pairs))
    again = session.run(["logits"], padded([pairs[i] for i in shuffled]))[0]
    np.testing.assert_allclose(again, together[shuffled], atol=1e-4)


def test_shipped_config_matches_the_graph_and_the_tokenizer(shipped):
    config, encoder, session = shipped
    assert config.task == "text"
    assert [(i.name, i.datatype, i.shape) for i in config.inputs] == [
        ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    assert [(o.name, o.datatype, o.shape) for o in config.outputs] == [
        ("logits", "FP32", [-1, 2]), ("probabilities", "FP32", [-1, 2])]
    assert config.label_list(MODEL_DIR) == ["negative", "positive"]
    for graph_input in session.get_inputs():  # batch and token axes are both dynamic
        assert graph_input.type == "tensor(int64)"
        assert not any(isinstance(d, int) for d in graph_input.shape), graph_input
    tokenizer = (MODEL_DIR / config.text.tokenizer).read_bytes()
    assert hashlib.sha256(tokenizer).hexdigest() == text.MINILM_TOKENIZER_SHA256
    graph_file = MODEL_DIR / "1" / "model.onnx"
    assert graph_file.stat().st_size <= 30 * 1024 * 1024
    graph = onnx.load(str(graph_file))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (ids, mask), = encoder.encode(["A gorgeous, witty, seductive movie."], max_chars=1000)
    assert ids[0] == 101 and ids[-1] == 102 and mask.sum() == len(ids)  # [CLS] … [SEP]
    positive = session.run(["probabilities"], padded([(ids, mask)]))[0][0]
    assert positive.argmax() == 1 and abs(positive.sum() - 1) < 1e-5


def test_fast_training_trains_exports_and_checks_parity(tmp_path: Path):
    zoo_file = zoo.DOCS / "model-zoo" / "text.json"
    zoo_before = zoo_file.read_bytes() if zoo_file.exists() else None

    assert training_main(["sentiment", "--fast", "--models", str(tmp_path)]) == 0  # parity raises on drift

    model_dir = tmp_path / "sentiment"
    config = load_model_config(model_dir)
    assert [i.name for i in config.inputs] == ["input_ids", "attention_mask"]
    assert config.label_list(model_dir) == ["negative", "positive"]
    for needed in ("README.md", "labels.txt", "tokenizer.json", "confusion_matrix.png",
                   "training_curves.png"):
        assert (model_dir / needed).exists(), needed
    # Without --seed the run takes the shipped model's seed, and the card says which.
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert f"`python -m training sentiment --seed {text.SEED} --fast`" in card
    encoder = TextEncoder(model_dir / config.text.tokenizer, config.text.max_tokens)
    session = cpu_session(model_dir / "1" / "model.onnx")
    feeds = padded(encoder.encode(["fine", "a long and rather tedious film"], max_chars=1000))
    logits, probabilities = session.run(["logits", "probabilities"], feeds)
    assert logits.shape == probabilities.shape == (2, 2)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    # The smoke test writes only into the directory it was given.
    assert (zoo_file.read_bytes() if zoo_file.exists() else None) == zoo_before
