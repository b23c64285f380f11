"""CPU fine-tuning throughput: 2 torchrun worker processes x 1 thread (``--devices 2``)
against 1 process x 2 threads (the kernel's own loop), side by side in one run.

    .venv/bin/python tests/benchmarks/bench_finetune_ddp.py [--steps 8] [--batch-size 8]

Both train the embedded SmolLM2-135M with the same options on the same ragged examples
(20-400 tokens, see bench_finetune_cpu.py). tokens/s are real (non-padding) training tokens
per second of the training loop; "wall" is the whole ``nbcustom.finetune`` call, which for
the workers includes starting torchrun and loading the model in each worker. Each
configuration runs in a fresh subprocess. No target: on a 2-core machine this compares how
the two ways split the same two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def run(devices: int, threads: int, steps: int, batch_size: int) -> dict:
    sys.path.insert(0, str(HERE))
    import torch

    import nbcustom
    from bench_finetune_cpu import SYSTEM, rows

    torch.set_num_threads(threads)
    frame = rows("ragged", 4 * batch_size, seed=1)
    with tempfile.TemporaryDirectory() as store:
        started = time.monotonic()
        version = nbcustom.finetune(
            "bench", frame, store=store, ui="none", max_steps=steps, batch_size=batch_size, system=SYSTEM,
            eval_frac=0.05, max_new_tokens=1, device="cpu", devices=devices,
        )
        info = version.manifest["llm"]
        return {"tokens_per_s": info["tokens_per_s"], "train_seconds": info["train_seconds"],
                "tokens": version.manifest["counts"]["train_tokens"], "wall": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--one", nargs=2, type=int, metavar=("DEVICES", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run(*args.one, args.steps, args.batch_size)))
        return
    results = {}
    for label, devices, threads in (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)):
        out = subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--one", str(devices), str(threads)],
            check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label}: {results[label]}", flush=True)  # kept if the next one does not finish
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {' '.join(load)}; "
          f"{args.steps} steps of {args.batch_size} ragged examples, SmolLM2-135M, LoRA r=16")
    print(f"{'':24}{'tokens/s':>10}{'train s':>10}{'wall s':>10}{'tokens':>9}")
    for label, r in results.items():
        print(f"{label:24}{r['tokens_per_s']:10.0f}{r['train_seconds']:10.1f}{r['wall']:10.1f}{r['tokens']:9d}")
    base, ddp = results["1 process x 2 threads"], results["2 processes x 1 thread"]
    print(f"2 processes x 1 thread: {ddp['tokens_per_s'] / base['tokens_per_s']:.2f}x the tokens/s of 1 process x 2 threads")


if __name__ == "__main__":
    main()
