"""The sentiment task's comparison architectures for docs/model-zoo.md, trained and measured on the
same split as the served model (`training/text.py`): TF-IDF + logistic regression, a word-piece CNN
from scratch, and logistic regression on frozen all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.bert import SentenceClassifier, load_minilm, minilm_config
from training.export import cpu_session
from training.nets import parameter_count
from training.text import (
    LABELS,
    export_text_model,
    latencies,
    linear_probe,
    onnx_outputs,
    train_classifier,
)
from training.zoo import ZooRow


class WordPieceCNN(nn.Module):
    """Kim-style CNN trained from scratch: word-piece embeddings → 1-D convolutions of widths 3/5/7
    → max over the real tokens → dropout → linear. Padded embeddings are zeroed and padded positions
    excluded from the max, so padding never changes a result."""

    def __init__(self, vocab_size: int, dim: int = 128, filters: int = 128,
                 widths: tuple[int, ...] = (3, 5, 7), dropout: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, w, padding=w // 2) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(filters * len(widths), len(LABELS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        x = (self.embed(input_ids) * mask.unsqueeze(-1)).transpose(1, 2)  # (batch, dim, tokens)
        bias = ((1.0 - mask) * -1e4).unsqueeze(1)
        pooled = [(F.relu(conv(x)) + bias).max(dim=-1).values for conv in self.convs]
        return self.head(self.dropout(torch.cat(pooled, dim=-1)))


def tfidf_row(texts: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> ZooRow:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform(texts["train"])
    best = None
    for c in (1.0, 3.0, 10.0, 30.0):  # regularisation chosen on the validation split
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, labels["train"])
        acc = clf.score(vectorizer.transform(texts["validation"]), labels["validation"])
        print(f"tf-idf + LR, C={c}: validation accuracy {acc:.4f}")
        if best is None or acc > best[0]:
            best = (acc, clf)
    clf = best[1]
    seconds = time.perf_counter() - started
    acc = clf.score(vectorizer.transform(texts["test"]), labels["test"])
    print(f"tf-idf + LR: test accuracy {acc:.4f} ({len(vectorizer.vocabulary_):,} n-grams, {seconds:.0f} s)")
    return ZooRow(f"TF-IDF word 1–2-grams + logistic regression (scikit-learn, C={clf.C:g})",
                  int(clf.coef_.size + clf.intercept_.size), float(acc), seconds, None, None, None)


def cnn_row(seqs: dict[str, list[np.ndarray]], labels: dict[str, np.ndarray], vocab_size: int, seed: int,
            workdir: Path) -> ZooRow:
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = WordPieceCNN(vocab_size)
    model, _ = train_classifier(model, (seqs["train"], labels["train"]),
                                (seqs["validation"], labels["validation"]),
                                param_groups=[{"params": list(model.parameters()), "lr": 1e-3}],
                                epochs=8, seed=seed)
    seconds = time.perf_counter() - started
    path = workdir / "cnn.onnx"
    export_text_model(model, path)
    acc = float((onnx_outputs(cpu_session(path), seqs["test"], "logits").argmax(-1) == labels["test"]).mean())
    print(f"word-piece CNN: test accuracy {acc:.4f} ({parameter_count(model):,} parameters, {seconds:.0f} s)")
    return ZooRow("Word-piece CNN from scratch (embedding 128, convolutions 3/5/7 × 128, max pool)",
                  parameter_count(model), acc, seconds, path.stat().st_size, *latencies(path, seqs["test"]))


def frozen_minilm_row(seqs: dict[str, list[np.ndarray]], labels: dict[str, np.ndarray], wheel: Path,
                      workdir: Path) -> ZooRow:
    started = time.perf_counter()
    model = SentenceClassifier(minilm_config(wheel), len(LABELS))
    load_minilm(model.encoder, wheel)
    c = linear_probe(model, seqs, labels)
    seconds = time.perf_counter() - started
    path = workdir / "frozen.onnx"
    export_text_model(model, path)
    acc = float((onnx_outputs(cpu_session(path), seqs["test"], "logits").argmax(-1) == labels["test"]).mean())
    print(f"frozen MiniLM + LR: test accuracy {acc:.4f} ({seconds:.0f} s)")
    return ZooRow(f"all-MiniLM-L6-v2 frozen, mean pooled + logistic regression (C={c:g}), FP32",
                  parameter_count(model.encoder) + model.encoder.cfg.hidden + 1, acc, seconds,
                  path.stat().st_size, *latencies(path, seqs["test"]))


