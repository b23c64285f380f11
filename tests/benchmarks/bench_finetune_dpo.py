"""DPO on CPU: ``nbcustom.finetune(..., method="dpo")`` against the TRL ``DPOTrainer`` script a
user would write, on the same preference rows (tests/feedback_task.py), at the same LoRA
settings (r=16, alpha=32, dropout 0, q/k/v/o/gate/up/down: nbcustom's ``lora_config``
defaults), batch size (pairs per step), number of steps and learning rate (2e-4), in float32,
with TRL's default DPO settings (sigmoid loss, beta 0.1, no ``precompute_ref_log_probs``).

    .venv/bin/python tests/benchmarks/bench_finetune_dpo.py [--rows 64] [--steps 8] [--batch-size 8]
        [--sides trl trl-no-gc nbcustom] [--precision fp32|auto]

Each side runs in a fresh subprocess (each loads the model once; its peak RSS, ``ru_maxrss``
at its end, is its own), with ``NBCUSTOM_WORKER=off`` so nbcustom trains in that process.
Tokens are real (non-padding) tokens: prompt + answer of the chosen and of the rejected
sequence of every pair a step trains on.

What each figure includes:

- ``trl``: the time of ``trainer.train()`` alone, with TRL's defaults (gradient checkpointing
  on, which recomputes activations in the backward pass to save memory); each step runs the
  policy forward and backward on the padded chosen+rejected batch and the reference forward
  (the same model with the LoRA adapter disabled), then the optimizer; ``train()`` also
  prepares the model, optimizer and data loader. Model load, tokenization and the trainer's
  construction are not timed. Tokens: the attention mask of the batches trained on.
- ``trl-no-gc``: the same with ``gradient_checkpointing=False`` (nbcustom does not
  checkpoint): the same arithmetic as nbcustom's step, plus the reference forward.
- ``nbcustom (train)``: ``version.manifest["llm"]["tokens_per_s"]``, the training loop alone
  (``train_seconds``: policy forward and backward on packed rows, optimizer); it excludes
  the before/after evaluation (holdout preference metrics and greedy generation, timed apart
  below as "scoring"), the holdout evaluations during training (``eval_seconds``), the
  reference scoring, model load and saving.
- ``nbcustom (train + reference)``: the same tokens over ``train_seconds`` plus the one-off
  scoring by the reference model before training (``Objective.reference``, timed here by
  wrapping it; the training rows the run uses and the holdout rows): the counterpart of
  TRL's reference forward in every step. With about one epoch (the default 64 rows, 8 steps
  of 8) each pair is scored by the reference once on both sides (nbcustom also scores its
  holdout); over more epochs nbcustom's one-off scoring weighs less.

Both sides train on the same rows: TRL gets nbcustom's training split (``--eval-frac`` 0.1,
seed 0), nbcustom holds the rest out for its before/after scores. Small differences that
do not change the comparison: nbcustom's run from the base model adds a likelihood term on
the chosen answers (RPO; no extra pass), and TRL's sequences keep the newline after the
end-of-turn token (one token more per sequence, counted in its tokens).
Targets: none yet; the output is a measurement (tests/benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import feedback_task  # noqa: E402

SIDES = ("trl", "trl-no-gc", "nbcustom")
LR = 2e-4
EVAL_FRAC, SEED = 0.1, 0  # nbcustom's defaults (FinetuneSpec): its holdout split
MAX_NEW_TOKENS = 16  # nbcustom's before/after generation (not timed in its training figure)


def training_rows(n: int) -> list[int]:
    """The rows nbcustom trains on (its seeded split), which the TRL script gets too."""
    from nbcustom.engines.llm import data as llm_data

    return llm_data.split(n, EVAL_FRAC, SEED)[0]


def run_nbcustom(frame, steps: int, batch_size: int, precision: str) -> dict:
    import nbcustom
    from nbcustom.engines.llm import preference

    timed = {"reference_seconds": 0.0, "reference_tokens": 0, "score_seconds": 0.0}
    reference, score = preference.Objective.reference, preference.Objective.score

    def timed_reference(self, model, found, *args, **kwargs):
        started = time.monotonic()
        reference(self, model, found, *args, **kwargs)
        timed["reference_seconds"] += time.monotonic() - started
        timed["reference_tokens"] += sum(len(item) for item in found)

    def timed_score(self, *args, **kwargs):
        started = time.monotonic()
        try:
            return score(self, *args, **kwargs)
        finally:
            timed["score_seconds"] += time.monotonic() - started

    preference.Objective.reference, preference.Objective.score = timed_reference, timed_score
    with tempfile.TemporaryDirectory() as store:
        started = time.monotonic()
        version = nbcustom.finetune(
            "bench", frame, store=nbcustom.Store(store), ui="none", method="dpo", max_steps=steps, batch_size=batch_size,
            max_new_tokens=MAX_NEW_TOKENS, device="cpu", precision=precision, eval_frac=EVAL_FRAC, seed=SEED, lr=LR,
        )
        wall = time.monotonic() - started
    info = version.manifest["llm"]
    return {
        "tokens": version.manifest["counts"]["train_tokens"], "seconds": info["train_seconds"], "tokens_per_s": info["tokens_per_s"],
        "steps": info["steps"], "eval_seconds": info["eval_seconds"], "wall_seconds": wall, "precision": info["precision"]["name"],
        "trained_rows": version.manifest["counts"]["trained"], **timed,
    }


def run_trl(frame, steps: int, batch_size: int, checkpointing: bool) -> dict:
    """The script a user would write: conversational rows, the model and a peft LoraConfig
    handed to DPOTrainer, default DPO settings, float32 on the CPU."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from nbcustom import models
    from nbcustom.engines.llm.generate import TARGETS

    path = models.resolve_llm(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS["llama"], task_type="CAUSAL_LM")
    rows = frame.iloc[training_rows(len(frame))]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"])
    ])
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=LR, bf16=False,
            use_cpu=True, gradient_checkpointing=checkpointing, report_to=[], save_strategy="no", logging_steps=steps,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
        counted = []  # real tokens of each batch, in the order the trainer draws them
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            counted.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting  # read when train() builds its data loader
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
    # the data loader may prepare a batch ahead: only the first ``steps`` were trained on
    tokens = sum(counted[:steps])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": trainer.state.global_step, "trained_rows": len(rows)}


def child(which: str, n: int, steps: int, batch_size: int, precision: str) -> None:
    from nbcustom import models

    frame = feedback_task.pairs(n)
    with models.quiet():
        if which == "nbcustom":
            result = run_nbcustom(frame, steps, batch_size, precision)
        else:
            result = run_trl(frame, steps, batch_size, checkpointing=which == "trl")
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def measure(which: str, args) -> dict:
    env = {**os.environ, "NBCUSTOM_WORKER": "off", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", which, "--rows", str(args.rows), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--precision", args.precision]
    started = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{which} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - started
    return result


def lengths(n: int) -> str:
    """The rows' chat-formatted sequence lengths, as nbcustom tokenizes them."""
    from transformers import AutoTokenizer

    from nbcustom import models
    from nbcustom.engines.llm import data as llm_data

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_llm(None))
    frame = feedback_task.pairs(n)
    sizes = sorted(len(llm_data.encode(tokenizer, llm_data.Example(i, p, a, None)))
                   for i, (p, c, r) in enumerate(zip(frame.prompt, frame.chosen, frame.rejected)) for a in (c, r))
    return f"{len(sizes)} sequences of {sizes[0]}-{sizes[-1]} tokens (median {sizes[len(sizes) // 2]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="preference pairs (feedback_task.pairs)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--sides", nargs="*", choices=SIDES, default=list(SIDES))
    parser.add_argument("--precision", choices=("fp32", "auto"), default="fp32", help="nbcustom's --precision (TRL runs float32)")
    parser.add_argument("--child", choices=SIDES)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rows, args.steps, args.batch_size, args.precision)
    import torch
    import trl

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, trl {trl.__version__}")
    trained = len(training_rows(args.rows))
    print(f"DPO, SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, beta 0.1, lr {LR:g}, "
          f"{args.steps} steps of {args.batch_size} pairs; {args.rows} rows of tests/feedback_task.py ({trained} trained, "
          f"{args.rows - trained} held out by nbcustom): {lengths(args.rows)}")
    got = {}
    for which in args.sides:
        got[which] = measure(which, args)
        print(f"  ran {which} ({got[which]['process_seconds']:.0f} s with start-up)", flush=True)

    print(f"\n{'side':30s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS':>9s}")
    rows = []
    if "trl" in got:
        rows.append(("TRL DPOTrainer (defaults)", got["trl"]["tokens"], got["trl"]["seconds"], got["trl"]["peak_rss_gb"]))
    if "trl-no-gc" in got:
        rows.append(("TRL, no gradient checkpointing", got["trl-no-gc"]["tokens"], got["trl-no-gc"]["seconds"], got["trl-no-gc"]["peak_rss_gb"]))
    if "nbcustom" in got:
        nb = got["nbcustom"]
        rows.append(("nbcustom (train)", nb["tokens"], nb["seconds"], nb["peak_rss_gb"]))
        rows.append(("nbcustom (train + reference)", nb["tokens"], nb["seconds"] + nb["reference_seconds"], nb["peak_rss_gb"]))
    speeds = {}
    for name, tokens, seconds, peak in rows:
        speeds[name] = tokens / seconds
        print(f"{name:30s} {tokens:7d} {seconds:8.1f} {speeds[name]:9.1f} {peak:7.2f} GB")
    if "nbcustom" in got:
        print(f"\nnbcustom ({nb['precision']}, {nb['steps']} steps): the training figure is the manifest's tokens_per_s "
              f"({nb['tokens_per_s']:.1f}) and excludes its before/after evaluation (scoring {nb['score_seconds']:.1f} s), "
              f"holdout evaluations during training ({nb['eval_seconds']:.1f} s) and the reference scoring "
              f"({nb['reference_seconds']:.1f} s for {nb['reference_tokens']} tokens, each scored row once, added in the second line); "
              f"whole finetune() call {nb['wall_seconds']:.1f} s")
        for base in [name for name in speeds if name.startswith("TRL")]:
            for ours in ("nbcustom (train)", "nbcustom (train + reference)"):
                print(f"{ours} / {base}: {speeds[ours] / speeds[base]:.2f}x tokens/s", end="; ")
            peak = nb["peak_rss_gb"] / next(p for n, _, _, p in rows if n == base)
            print(f"peak RSS {peak:.2f}x")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
