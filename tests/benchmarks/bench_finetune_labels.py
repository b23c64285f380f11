"""Early stopping on a label task: wall time and held-out accuracy of the default
``%%finetune`` (``--keep best`` and, for labels, ``--patience 2``) and of ``--patience 0``
(the best adapter, every step) against the same run with ``--keep last --patience 0``
(every planned step, the last adapter: the behaviour before evaluation during training),
in one run. It decided the label default of ``--patience``: it must save time at no loss of
accuracy.

    .venv/bin/python tests/benchmarks/bench_finetune_labels.py [--rows 200] [--epochs 2]
    .venv/bin/python tests/benchmarks/bench_finetune_labels.py --sweep 2e-4 1e-3 3e-3 [--epochs 3]

``--sweep`` instead runs ``%%finetune`` with its defaults (``--keep best``, ``--patience`` 2
for labels) at each learning rate, plus one run with no ``--lr`` at all (what a user gets),
and prints each one's wall time, training seconds, steps and held-out accuracy.

The data is tests/label_task.py's ticket set (five teams, learnable from keywords). Both
runs use the same split, seed and options, in this process, after one warm-up load of the
model, so none pays for loading it. Wall time is the whole ``nbcustom.finetune`` call
(before/after scoring, evaluations during training, saving).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import label_task  # noqa: E402


def run(frame, store: str, **options) -> dict:
    import nbcustom

    started = time.monotonic()
    version = nbcustom.finetune("tickets", frame, store=store, ui="none", system=label_task.SYSTEM, device="cpu", **options)
    seconds = time.monotonic() - started
    m = version.manifest
    return {
        "seconds": seconds, "accuracy": m["metrics"]["after"]["accuracy"], "before": m["metrics"]["before"]["accuracy"],
        "macro_f1": m["metrics"]["after"]["macro_f1"], "steps": m["llm"]["steps"], "planned": m["llm"]["planned_steps"],
        "best_step": m["llm"]["best_step"], "kept_step": m["llm"]["kept_step"], "train_seconds": m["llm"].get("train_seconds"),
        "lr": m["llm"]["lr"],
    }


def sweep(frame, rates: list[float], epochs: float) -> None:
    for rate in [None, *rates]:
        with tempfile.TemporaryDirectory() as store:
            r = run(frame, store, epochs=epochs, eval_frac=0.1, **({"lr": rate} if rate else {}))
        name = f"lr {r['lr']:g}" + (" (no --lr: the default)" if rate is None else "")
        print(f"{name:32s} {r['seconds']:7.1f} s (training {r['train_seconds'] or 0:6.1f} s)  accuracy {r['accuracy']:.3f} "
              f"(before {r['before']:.3f})  macro-F1 {r['macro_f1']:.3f}  steps {r['steps']}/{r['planned']}  kept {r['kept_step']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sweep", type=float, nargs="+", help="learning rates to compare with the default options")
    args = parser.parse_args()

    from nbcustom import models

    models.load_llm(models.resolve_llm(None), "cpu", "float32")  # warm-up: no run pays for the load
    frame = label_task.rows(args.rows)
    if args.sweep:
        print(f"label set: {args.rows} tickets, 5 labels; epochs {args.epochs}, holdout 10%; tickets of {frame['prompt'].str.split().str.len().min()}-{frame['prompt'].str.split().str.len().max()} words; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return sweep(frame, args.sweep, args.epochs)
    common = {"epochs": args.epochs, "lr": args.lr, "eval_frac": 0.1}
    print(f"label set: {args.rows} tickets, 5 labels; epochs {args.epochs}, lr {args.lr}, holdout 10%; CPU, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {}
    variants = (("default (--keep best --patience 2)", {}), ("--patience 0", {"patience": 0}), ("--keep last --patience 0", {"keep": "last", "patience": 0}))
    for name, options in variants:
        with tempfile.TemporaryDirectory() as store:
            r = results[name] = run(frame, store, **common, **options)
        print(f"{name:34s} {r['seconds']:7.1f} s  accuracy {r['accuracy']:.3f} (before {r['before']:.3f})  macro-F1 {r['macro_f1']:.3f}  "
              f"steps {r['steps']}/{r['planned']}  best at {r['best_step']}, kept {r['kept_step']}")
    full = results["--keep last --patience 0"]
    for name in ("default (--keep best --patience 2)", "--patience 0"):
        r = results[name]
        print(f"{name}: saved {full['seconds'] - r['seconds']:.1f} s ({1 - r['seconds'] / full['seconds']:.0%}) against --keep last --patience 0; "
              f"accuracy {r['accuracy']:.3f} vs {full['accuracy']:.3f}: {'not less accurate' if r['accuracy'] >= full['accuracy'] else 'LESS ACCURATE'}")


if __name__ == "__main__":
    main()
