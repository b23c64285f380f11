"""Overhead of ``%%retrain`` (via ``nbcustom.retrain``) over calling ``TabularPredictor.fit``
directly on the same training rows with the same time limit and presets, and both scores on
the same holdout. Not collected by pytest; run it by hand:

    .venv/bin/python tests/benchmarks/bench_retrain.py [--time-limit 60] [--repeat 1]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path


def digits():
    from sklearn.datasets import load_digits

    frame = load_digits(as_frame=True).frame
    frame.columns = [str(c) for c in frame.columns]
    frame["digit"] = frame.pop("target").astype(str)
    return frame, "digit"


def direct(train, holdout, target, time_limit, presets, folder):
    from autogluon.tabular import TabularPredictor

    started = time.perf_counter()
    predictor = TabularPredictor(label=target, path=folder, verbosity=0).fit(train, time_limit=time_limit, presets=presets)
    seconds = time.perf_counter() - started
    score = predictor.evaluate(holdout, silent=True)[predictor.eval_metric.name]
    return seconds, score, predictor.eval_metric.name


def through_nbcustom(frame, target, time_limit, presets, store):
    import nbcustom

    started = time.perf_counter()
    version = nbcustom.retrain("bench", frame, store=store, ui="none", target=target, time_limit=time_limit, presets=presets)
    seconds = time.perf_counter() - started
    return seconds, version.manifest["metrics"]["after"][version.manifest["eval_metric"]], version.manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=int, default=60)
    parser.add_argument("--presets", default="medium_quality")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    from nbcustom.engines.automl.common import in_holdout

    frame, target = digits()
    mask = in_holdout(frame, 0.2)  # the rows nbcustom holds out, so both fit the same rows
    train, holdout = frame[~mask], frame[mask]
    print(f"dataset: sklearn digits, {len(frame)} rows x {frame.shape[1] - 1} features; {len(train)} train, {len(holdout)} holdout")
    print(f"time limit {args.time_limit}s, presets {args.presets}, machine: {platform.machine()}, {platform.python_version()}")
    rows = []
    for run in range(args.repeat):
        with tempfile.TemporaryDirectory() as scratch:
            d_seconds, d_score, metric = direct(train, holdout, target, args.time_limit, args.presets, str(Path(scratch) / "direct"))
            n_seconds, n_score, manifest = through_nbcustom(frame, target, args.time_limit, args.presets, Path(scratch) / "store")
        overhead = (n_seconds - d_seconds) / d_seconds
        rows.append(overhead)
        print(
            f"run {run + 1}: TabularPredictor.fit {d_seconds:6.1f}s  {metric} {d_score:.4f} | "
            f"nbcustom.retrain {n_seconds:6.1f}s (of which fit {manifest['fit_seconds']:.1f}s)  {metric} {n_score:.4f} | "
            f"overhead {overhead:+.1%}"
        )
    print(f"overhead: {sum(rows) / len(rows):+.1%} (target under 5%)")


if __name__ == "__main__":
    main()
