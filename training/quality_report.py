"""`python -m training evaluate <model> --quality [--write]`: calibration and out-of-domain figures of a
served graph (the measurements are in `training/quality.py`), printed and, with `--write`, folded
into the graph and written into the model's card."""

from __future__ import annotations

import argparse

import numpy as np

from service.codecs.text import TextEncoder
from service.core.model_config import load_model_config
from training import evaluate, quality, report

COMMAND = "python -m training evaluate {name} --quality --write"


def _pct(x: float) -> str:
    return f"{x:.2%}"


def main(args: argparse.Namespace) -> int:
    name, models = args.model, args.models
    config = load_model_config(models / name)
    path = evaluate.served_graph(name, models, args.version)
    model_dir = models / name
    folded = quality.graph_temperature(path)
    sess = evaluate.session(path, args.optimization)
    test, val = evaluate.test_set(name, models), evaluate.validation_set(name, models)
    test_logits, val_logits = evaluate.logits(sess, test), evaluate.logits(sess, val)
    temperature = quality.fit_temperature(val_logits, val.labels)
    raw = quality.softmax_t(test_logits, 1.0)
    scaled = quality.softmax_t(test_logits, temperature)
    ece_raw, ece_scaled = quality.ece(raw, test.labels), quality.ece(scaled, test.labels)
    val_raw = quality.ece(quality.softmax_t(val_logits, 1.0), val.labels)
    val_scaled = quality.ece(quality.softmax_t(val_logits, temperature), val.labels)
    nll = {t: quality.nll(quality.softmax_t(test_logits, t), test.labels) for t in (1.0, temperature)}
    print(f"{name}: temperature fitted on {len(val):,} validation samples: T = {temperature:.3f} "
          f"(folded in the graph now: {folded:.3f})")
    print(f"  validation ECE {val_raw:.4f} → {val_scaled:.4f}; test ECE {ece_raw:.4f} → {ece_scaled:.4f}; "
          f"test NLL {nll[1.0]:.4f} → {nll[temperature]:.4f}")
    fold = ece_scaled < ece_raw
    served_t = temperature if fold else 1.0
    if args.write:
        quality.fold_temperature(path, served_t, config.scores_output or "probabilities")
        sess = evaluate.session(path, args.optimization)
        quality.plot_reliability(
            {"softmax(logits)": (raw, test.labels),
             f"softmax(logits / {temperature:.2f})": (scaled, test.labels)},
            model_dir / "reliability_diagram.png", f"{name}: test split, {len(test):,} samples")

    telephone = ""
    if config.task == "speech":
        feeds = {name_: quality.telephone_band(x) for name_, x in val.inputs.items()}
        narrow = float((evaluate.logits(sess, evaluate.TestSet(feeds, val.labels)).argmax(1)
                        == val.labels).mean())
        plain = float((val_logits.argmax(1) == val.labels).mean())
        print(f"  validation {plain:.2%}; through a telephone band {narrow:.2%}")
        telephone = (f"On the {len(val):,} validation clips it scores {_pct(plain)}, and "
                     f"{_pct(narrow)} on the same clips through a telephone band (resampled to 8 kHz, "
                     "band-passed 300-3,400 Hz, back to 16 kHz: `quality.telephone_band`), the "
                     "channel both speakers were recorded on.")
    rows = []
    encoder = (TextEncoder(model_dir / config.text.tokenizer, config.text.max_tokens)
               if config.task == "text" else None)
    for s in quality.evaluation_sets(name, config):
        if encoder is not None:
            scores = quality.text_scores(sess, encoder, s)
            served = scores["served"]
            acc = float((served.argmax(1) == s.labels).mean())
            windows = scores["windows"]
            alternatives = ", ".join(f"{k} {_pct(float((v.argmax(1) == s.labels).mean()))}"
                                     for k, v in scores.items() if k not in ("served", "windows"))
            print(f"  {s.key}: {acc:.2%} on {len(s):,} (windows per text: mean {windows.mean():.2f}, "
                  f"max {windows.max()}); {alternatives}")
            first = float((scores["first window only"].argmax(1) == s.labels).mean())
            rows.append(f"| {s.title} | {len(s):,} | {np.bincount(s.labels, minlength=2).tolist()} | "
                        f"**{_pct(acc)}** | {_pct(first)} | {windows.mean():.2f} | "
                        f"{quality.ece(served, s.labels):.3f} |")
        else:
            inputs = evaluate.TestSet({config.inputs[0].name: s.inputs}, s.labels)
            probs = quality.softmax_t(evaluate.logits(sess, inputs), served_t)
            acc = float((probs.argmax(1) == s.labels).mean())
            labels = config_labels(model_dir)
            ece = quality.ece(probs, s.labels)
            if s.names is None:
                ev = report.evaluate(s.labels, probs.argmax(1), len(labels))
                worst = int(np.argmin(ev.recall))
                print(f"  {s.key}: {acc:.2%} on {len(s):,}; ECE {ece:.4f}; "
                      f"lowest recall {labels[worst]} {ev.recall[worst]:.3f}")
                rows.append(f"| {s.title} | {len(s):,} | **{_pct(acc)}** | {ece:.3f} | "
                            f"{labels[worst]} ({ev.recall[worst]:.3f}) |")
            else:
                wrong = ", ".join(f"{n} → {labels[p]} ({probs[i, p]:.2f})"
                                  for i, (n, p) in enumerate(zip(s.names, probs.argmax(1), strict=True))
                                  if p != s.labels[i]) or "none"
                print(f"  {s.key}: {acc:.2%} on {len(s):,}; ECE {ece:.4f}; wrong: {wrong}")
                rows.append(f"| {s.title} | {len(s):,} | **{_pct(acc)}** | {ece:.3f} | {wrong} |")

    if not args.write:
        return 0
    where = report.measured_with(args.optimization.upper())
    verdict = ("lowered", "is folded into the graph (a Div before the Softmax of `probabilities`; "
               "`logits` are unchanged)") if fold else ("did not lower", "is not used")
    calibration = (
        f"Probabilities are {'softmax(logits / T)' if fold else 'softmax(logits)'}: a temperature T "
        f"fitted on the {len(val):,} validation samples (minimum negative log-likelihood) gave "
        f"T = {temperature:.3f}, and it {verdict[0]} the expected calibration error (ECE) of the test "
        f"split ({quality.BINS} equal-width bins of the top probability), so it {verdict[1]}.\n\n"
        f"| | validation ECE | test ECE | test NLL |\n|---|---|---|---|\n"
        f"| softmax(logits) | {val_raw:.4f} | {ece_raw:.4f} | {nll[1.0]:.4f} |\n"
        f"| softmax(logits / {temperature:.3f}) | {val_scaled:.4f} | {ece_scaled:.4f} | "
        f"{nll[temperature]:.4f} |\n\n"
        f"![reliability diagram](reliability_diagram.png)\n\n"
        f"Measured with {where}: `{COMMAND.format(name=name)}`.")
    lines = quality.licence_lines()
    if not rows:
        out_of_domain = ("No out-of-domain evaluation set for this model yet: no registry package we found "
                         "ships labelled data of this task from another source.")
    elif encoder is not None:
        out_of_domain = (
            "Evaluation only: no model trains or selects on these sets. Texts longer than the "
            f"{config.text.max_tokens}-token window are read whole, as the service reads them: "
            "overlapping windows (half a window apart), each a row, combined as the softmax of their "
            "mean logits (the column *first window* is what reading the first window alone gives). "
            "That combination was chosen on the whole NYT editorials with an earlier model (fine-tuned "
            "from a random head) before its temperature was folded in (`python -m training evaluate "
            "sentiment --quality`): mean of logits 88.96 %, "
            "mean of probabilities 87.01 %, first window 79.87 %, last window 73.38 %. A "
            "vaderSentiment text is labelled by the sign of its mean human rating, kept when |mean| ≥ "
            f"{quality.POLAR}; a Pang & Lee review by its writer's rating, as the data set labels it.\n\n"
            "| set | texts | [negative, positive] | accuracy | first window | windows per text | ECE |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nSources: {lines['pang-lee']}; {lines['vader']}. Measured with {where}: "
            f"`{COMMAND.format(name=name)}`.")
    elif config.task == "speech":
        out_of_domain = (
            "Evaluation only: no model trains or selects on these recordings, and no training voice "
            "is either speaker's. Real human voices, each word recorded once: Asterisk's US English "
            "prompts (telephone band, 8 kHz) and saytime's words (8 kHz μ-law, written here as the "
            "16-bit WAV a client would send); each file goes through the service's audio codec as an "
            "upload. Their \"oh\" recordings are left out (zero or a word?). With 20 digits, one "
            "answer is 5 points.\n\n"
            "| set | recordings | accuracy | ECE | wrong answers (probability) |\n|---|---|---|---|---|\n"
            + "\n".join(rows)
            + f"\n\n{telephone}\n\nSources: {lines['human-speech']}. Measured with {where}: "
            f"`{COMMAND.format(name=name)}`.")
    else:
        out_of_domain = (
            "Evaluation only: no model trains or selects on these sets. Each 8×8 digit's ink is scaled "
            "to fit 20×20 and centred by its mass in a 28×28 frame, as MNIST was prepared, then goes "
            "through the "
            "service's image codec (black on white is inverted back by its automatic inversion).\n\n"
            "| set | images | accuracy | ECE | lowest recall |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nSource: {lines['uci']}. Measured with {where}: `{COMMAND.format(name=name)}`.")
    quality.write_card_section(model_dir / "README.md", quality.card_section(calibration, out_of_domain))
    print(f"wrote {model_dir / 'README.md'}, {model_dir / 'reliability_diagram.png'}; temperature in "
          f"{path}: {quality.graph_temperature(path):.3f}")
    return 0


def refresh(models, name: str) -> int:
    """Measure and write a freshly trained model's calibration and out-of-domain sections."""
    return main(argparse.Namespace(model=name, models=models, version=None, optimization="all",
                                   write=True))


def config_labels(model_dir) -> list[str]:
    return [line.strip() for line in (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()]
