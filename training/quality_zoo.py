"""`python -m training evaluate <model> --quality --alternatives`: the out-of-domain sets scored by
alternatives to the served graph, for docs/model-zoo.md.

- sentiment: the served int8 graph, its FP32 source graph (kept in the data cache by
  `python -m training sentiment`), both reading long texts in windows as the service does, and the
  zoo's TF-IDF + logistic-regression baseline retrained here on the same training split (C chosen on
  validation), which reads every text whole;
- mnist: the served int8 graph, its FP32 source graph, and the zoo's MLP (784→128→10) and row-GRU
  retrained here with their zoo recipes (checkpoints chosen on validation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service.codecs.text import TextEncoder, aggregate
from service.core.model_config import load_model_config
from training import evaluate, quality
from training.data_cache import DataMissing, fp32_graph


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def sentiment(models: Path, seed: int = 0) -> dict[str, dict[str, float]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from training import text_data

    config = load_model_config(models / "sentiment")
    encoder = TextEncoder(models / "sentiment" / config.text.tokenizer, config.text.max_tokens)
    sets = quality.evaluation_sets("sentiment", config)
    graphs = {"served (int8 weights)": evaluate.served_graph("sentiment", models)}
    if fp32_graph("sentiment", seed).exists():
        graphs["FP32 graph (not served)"] = fp32_graph("sentiment", seed)
    out: dict[str, dict[str, float]] = {}
    for name, path in graphs.items():
        sess = evaluate.session(path)
        out[name] = {}
        for s in sets:
            windows = quality.window_probabilities(sess, encoder, list(s.inputs))
            out[name][s.key] = _accuracy(np.stack([aggregate(w) for w in windows]), s.labels)
            print(f"{name}: {s.key} {out[name][s.key]:.2%}")
    texts, labels = text_data.corpus()  # the sentences the served model was trained and selected on
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform(texts["train"])
    best = None
    for c in (1.0, 3.0, 10.0, 30.0):  # as text_zoo.tfidf_row: C chosen on the validation split
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, labels["train"])
        acc = clf.score(vectorizer.transform(texts["validation"]), labels["validation"])
        if best is None or acc > best[0]:
            best = (acc, clf)
    clf = best[1]
    name = f"TF-IDF + logistic regression (C={clf.C:g}), whole texts"
    out[name] = {}
    for s in sets:
        out[name][s.key] = float(clf.score(vectorizer.transform(list(s.inputs)), s.labels))
        print(f"{name}: {s.key} {out[name][s.key]:.2%}")
    return out


def mnist(models: Path, seed: int = 0) -> dict[str, dict[str, float]]:
    import torch

    from training import images

    config = load_model_config(models / "mnist")
    sets = quality.evaluation_sets("mnist", config)
    out: dict[str, dict[str, float]] = {}
    graphs = {"served CNN (int8)": evaluate.served_graph("mnist", models)}
    if fp32_graph("mnist", seed).exists():
        graphs["CNN, FP32 graph (not served)"] = fp32_graph("mnist", seed)
    for name, path in graphs.items():
        sess = evaluate.session(path)
        out[name] = {s.key: _accuracy(evaluate.logits(sess, evaluate.TestSet({"pixels": s.inputs}, s.labels)),
                                      s.labels) for s in sets}
        print(name, out[name])
    spec, data = images.SPECS["mnist"], images.load_digits()
    pixels = images.Pixels(*spec.pixels)
    alternatives = (("MLP 784→128→Dropout 0.2→10 (zoo recipe)", images.MLP(pixels, 128, 0.2), spec.mlp),
                    ("GRU 128 reading the 28 rows (zoo recipe)", images.RowGRU(pixels), spec.rnn))
    for name, model, recipe in alternatives:
        torch.manual_seed(seed)
        model, _, _ = images.train(model, data, recipe, spec.augment, seed, name.split()[0])
        out[name] = {s.key: float((images.predict(model, s.inputs[:, 0]) == s.labels).mean()) for s in sets}
        print(name, out[name])
    return out


def main(args: argparse.Namespace) -> int:
    runs = {"sentiment": sentiment, "mnist": mnist}
    if args.model not in runs:
        raise DataMissing(f"no out-of-domain alternatives for {args.model}")
    results = runs[args.model](args.models)
    keys = list(next(iter(results.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, accs in results.items():
        print(f"| {name} | " + " | ".join(f"{accs[k]:.2%}" for k in keys) + " |")
    return 0
