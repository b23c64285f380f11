"""Document embedding in a build: autocast alone against ``Precision.inferring`` (autocast and
each linear layer's bf16 weight packed once for oneDNN, where the CPU can), in one process,
interleaved, over bench_rag.py's rows.

    python tests/benchmarks/bench_rag_embed.py [--rows 3000] [--repeat 3]

Prints each run's seconds, the ratio of the medians and the lowest cosine between the two
sides' vectors. On a CPU without native bf16 both sides are float32 and equal.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rag import frame  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from nbcustom.engines.llm import precision
    from nbcustom.engines.rag import index as rag_index, models as rag_models

    embed_model = rag_models.embedder(None)
    texts = frame(args.rows)["text"].tolist()
    run_on = precision.choose("cpu")

    class AutocastAlone:
        """``run_on`` as builds used it before: autocast, the weights reordered at every call."""

        def __getattr__(self, name):
            return getattr(run_on, name)

        @contextlib.contextmanager
        def inferring(self, model):
            with run_on.autocast():
                yield model

    sides = {"autocast alone": AutocastAlone(), "packed": run_on}
    for side in sides.values():  # warm-up
        rag_index.embed(embed_model, texts[:200], run_on=side)
    times, vectors = {name: [] for name in sides}, {}
    for _ in range(args.repeat):
        for name, side in sides.items():
            started = time.perf_counter()
            vectors[name] = rag_index.embed(embed_model, texts, run_on=side)
            times[name].append(time.perf_counter() - started)
    print(f"{precision.cpu_features()}; {run_on.name}; {args.rows} rows")
    for name, seconds in times.items():
        print(f"{name:15s} " + " ".join(f"{s:6.2f}" for s in seconds) + " s")
    ratio = statistics.median(times["autocast alone"]) / statistics.median(times["packed"])
    cosine = float((vectors["autocast alone"] * vectors["packed"]).sum(1).min())
    print(f"packed: {ratio:.3f}x autocast alone (ratio of medians); lowest cosine between the sides {cosine:.7f}")


if __name__ == "__main__":
    main()
