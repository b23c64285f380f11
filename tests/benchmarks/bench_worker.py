"""What training in a worker process costs: the quickstart, cell by cell, with
``NbCustom.worker`` on (the default) and off (training in the kernel), in fresh kernels.

    .venv/bin/python tests/benchmarks/bench_worker.py [--rounds 2]

Prints each training cell's seconds on both sides and the difference, the whole notebook's,
and the CPU the figures come from. Rounds alternate the two sides.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ("%%finetune", "%%retrain", "%%rag")


def run(worker: str) -> list[tuple[str, float]]:
    """(first line, seconds) of each code cell of the quickstart in a fresh kernel."""
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "NBCUSTOM_STORE": f"{folder}/store", "NBCUSTOM_UI": "static", "HF_HUB_OFFLINE": "1", "NBCUSTOM_WORKER": worker}
        client = NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=True, resources={"metadata": {"path": folder}})
        client.km = client.kernel_manager_class(kernel_name="python3", env=env)
        client.execute(env=env)
    times = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        stamps = cell.metadata["execution"]
        took = dt.datetime.fromisoformat(stamps["shell.execute_reply"].rstrip("Z")) - dt.datetime.fromisoformat(stamps["iopub.execute_input"].rstrip("Z"))
        times.append((cell.source.splitlines()[0][:60], took.total_seconds()))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    sides = {"on": [], "off": []}
    for _ in range(rounds):
        for side in ("off", "on"):
            sides[side].append(run(side))
    best = {side: [min(r[i][1] for r in runs) for i in range(len(runs[0]))] for side, runs in sides.items()}
    names = [name for name, _ in sides["on"][0]]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; best of {rounds} round(s) per side, seconds")
    print(f"{'cell':62} {'kernel':>8} {'worker':>8} {'cost':>7}")
    runs = []
    for name, off, on in zip(names, best["off"], best["on"]):
        training = name.startswith(TRAINING) and "--ask" not in name and "--eval" not in name
        if training or max(off, on) > 1.0:
            print(f"{name:62} {off:8.2f} {on:8.2f} {on - off:+7.2f}{'  (training)' if training else ''}")
        if training:
            runs.append(on - off)
    print(f"{'whole notebook':62} {sum(best['off']):8.2f} {sum(best['on']):8.2f} {sum(best['on']) - sum(best['off']):+7.2f}")
    print(f"training cells: {len(runs)}, worker cost per run: mean {sum(runs) / len(runs):+.2f} s, largest {max(runs):+.2f} s")


if __name__ == "__main__":
    sys.exit(main())
