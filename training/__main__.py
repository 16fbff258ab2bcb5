"""`python -m training <command>`: fetch data, train, evaluate and export the served models.

Commands: fetch, fashion-mnist, mnist, sentiment, spoken-digits, all. Each training command also
trains the comparison architectures of its task for docs/model-zoo.md unless `--no-zoo` is given.
`python -m training evaluate <model>` measures a shipped model's test accuracy on this machine
against its card, and with `--quality` its calibration and out-of-domain figures
(`python -m training evaluate --help`). A training command (not `--fast`) ends with
`evaluate <model> --quality --write`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from training.data_cache import DataMissing

# command → module whose `main(args)` runs it; imported lazily so `fetch` needs no torch.
COMMANDS = {
    "fetch": "training.fetch",
    "fashion-mnist": "training.images",
    "mnist": "training.images",
    "sentiment": "training.text",
    "spoken-digits": "training.speech",
}
ALL = ["fashion-mnist", "mnist", "sentiment", "spoken-digits"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository to write")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: the shipped model's, its module's SEED, else 0)")
    parser.add_argument("--fast", action="store_true",
                        help="tiny subset and one short epoch: a smoke test of the whole pipeline")
    parser.add_argument("--no-zoo", action="store_true", help="skip the comparison architectures")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        from training import evaluate

        parser = argparse.ArgumentParser(prog="python -m training evaluate", description=evaluate.__doc__)
        evaluate.add_arguments(parser)
        try:
            return evaluate.main(parser.parse_args(argv[1:]))
        except DataMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = parse_args(argv)
    commands = ALL if args.command == "all" else [args.command]
    started = time.perf_counter()
    try:
        for command in commands:
            module = importlib.import_module(COMMANDS[command])
            seed = getattr(module, "SEED", 0) if args.seed is None else args.seed
            module.main(argparse.Namespace(**{**vars(args), "command": command, "seed": seed}))
            if command != "fetch" and not args.fast:
                # The card's Calibration and Out of domain sections, and the temperature in the graph.
                from training import quality_report

                quality_report.refresh(args.models, command)
    except DataMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
