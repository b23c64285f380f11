"""Fine-tuning throughput on a GPU: nbcustom's training step (packed rows, chunked LM-head
loss, optional compiled decoder layers) against a transformers ``Trainer`` + peft run with
padded batches, for LoRA r=16 on every linear layer of a SmolLM2-135M-shaped model
(random weights built from its config: throughput does not depend on the values).

    python tests/benchmarks/bench_finetune_gpu.py [--steps 10] [--variants trainer,eager,compiled,flex,flex-noautocast]

Variants: eager (sdpa attention with a block-diagonal mask), compiled (the same with every
decoder layer compiled), flex (compiled layers and flex attention, which skips the masked
blocks); -noautocast: without autocast, so peft runs the float32 adapters in float32.

Needs only torch, transformers and peft (it loads nbcustom/engines/llm/pack.py by path,
so the rest of nbcustom need not be installed on the GPU machine). Prints one line per
variant: real (non-padding) tokens per second, peak GPU memory; and a loss check of the
packed step against the padded computation. Target (issue 7): at least 150,000 tokens/s on
an H100.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M-Instruct's config.json
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a dry run of the script's logic
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llm_pack():
    spec = importlib.util.spec_from_file_location("llm_pack", HERE.parents[2] / "nbcustom" / "engines" / "llm" / "pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Example:
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)


def examples(n: int, seed: int = 0, low: int = 20, high: int = 400) -> list[Example]:
    """Ragged prompt+response examples: lengths uniform in [low, high], the first two
    thirds a prompt (no loss)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(low, high)
        ids = [rng.randrange(3, SMOLLM2_135M["vocab_size"]) for _ in range(length)]
        prompt = (2 * length) // 3
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def model(attn: str = "sdpa", dtype=None, init: float = 0.02):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, initializer_range=init)
    config._attn_implementation = attn
    base = LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype or torch.bfloat16)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))


def peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_trainer(args) -> dict:
    """transformers Trainer, bf16, padded batches of ``--trainer-batch`` examples."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    peft_model = model()
    data = [{"input_ids": e.ids, "labels": e.labels} for e in examples(args.trainer_batch * (args.steps + 3), seed=1)]
    tokens = []

    def collate(features):  # what DataCollatorForSeq2Seq does: pad to the longest in the batch
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]),
            "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features]),
        }
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            sync()
            marks.append(time.perf_counter())

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_trainer"
    training = TrainingArguments(
        output_dir=str(out), max_steps=args.steps + 2, per_device_train_batch_size=args.trainer_batch, learning_rate=2e-4,
        bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", report_to=[], save_strategy="no", logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0,
    )
    Trainer(model=peft_model, args=training, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    timed = sum(tokens[2:len(marks)])  # steps 3.. (the first two warm up)
    return {"tokens_per_s": timed / (marks[-1] - marks[1]), "peak_gb": peak_gb(), "tokens_per_step": timed / (len(marks) - 2)}


def run_nbcustom(args, compiled: bool, attn: str, autocast: bool = True) -> dict:
    """nbcustom's step: packed fixed-width rows, chunked loss, AdamW over the adapter."""
    import torch

    pack = llm_pack()
    pack.AUTOCAST = autocast
    peft_model = model()
    peft_model.train()
    if compiled:  # what %%finetune --compile does, for the whole run (a with block in the engine)
        speedup = contextlib.ExitStack()
        speedup.enter_context(pack.accelerated(peft_model, None if attn == "sdpa" else attn))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=DEVICE == "cuda")
    pool = examples(args.rows * 8 * (args.steps + args.warmup), seed=1)
    per_step = []
    stream = iter(pool)
    for _ in range(args.steps + args.warmup):  # about rows x width tokens of examples per step
        items, size = [], 0
        while size < args.rows * args.width * 0.97:
            e = next(stream)
            items.append(e)
            size += len(e)
        per_step.append(items)
    times, tokens = [], []
    batch = pack.pack(per_step[0], args.width, 0, width=args.width)
    for step in range(len(per_step)):
        loss = pack.backward(peft_model, batch, max_tokens=1 << 30)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens.append(batch["tokens"])
        if step + 1 < len(per_step):  # the engine packs the next step while the GPU works
            batch = pack.pack(per_step[step + 1], args.width, 0, width=args.width)
        loss.item()
        times.append(time.perf_counter())
        if step == args.warmup - 1 and DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
    timed = sum(tokens[args.warmup:])
    return {
        "tokens_per_s": timed / (times[-1] - times[args.warmup - 1]), "peak_gb": peak_gb(),
        "tokens_per_step": timed / args.steps, "rows_per_step": batch["input_ids"].shape[0],
    }


def check_loss(attn: str) -> float:
    """Relative difference between the packed loss and transformers' padded loss, float32."""
    import torch

    pack = llm_pack()
    peft_model = model(attn, torch.float32, init=0.2).eval()  # larger weights: outputs depend on the context
    items = examples(12, seed=2)
    width = max(map(len, items))
    ids = torch.tensor([e.ids + [0] * (width - len(e)) for e in items], device=DEVICE)
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in items], device=DEVICE)
    labels = torch.tensor([e.labels + [-100] * (width - len(e)) for e in items], device=DEVICE)
    with torch.no_grad():
        reference = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        loss, _ = pack.causal_lm_loss(peft_model, pack.pack(items, 1024, 0, width=1024))
    return abs(loss.item() - reference) / reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--trainer-batch", type=int, default=16)
    parser.add_argument("--variants", default="trainer,eager,compiled,flex,flex-noautocast")
    parser.add_argument("--child-timeout", type=int, default=240)
    parser.add_argument("--one")
    args = parser.parse_args()
    if args.one:  # a child process: one variant, a fresh CUDA context and peak memory
        name = args.one
        if name == "trainer":
            result = run_trainer(args)
        elif name.startswith("check-"):
            result = {"relative_loss_difference": check_loss(name[len("check-"):])}
        else:
            result = run_nbcustom(
                args, compiled=name.startswith(("compiled", "flex")), attn="flex_attention" if name.startswith("flex") else "sdpa",
                autocast=not name.endswith("-noautocast"),
            )
        print("RESULT " + json.dumps(result))
        return
    import subprocess

    import torch
    import transformers

    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"LoRA r=16 alpha=32 on {','.join(TARGETS)}; SmolLM2-135M shape, bf16; ragged examples of 20-400 tokens")
    print(f"nbcustom: {args.rows} rows x {args.width} tokens per step; Trainer: {args.trainer_batch} padded examples per step")
    results = {}
    for name in ["check-sdpa", "check-flex_attention"] + args.variants.split(","):
        started = time.monotonic()
        child = [sys.executable, str(HERE), "--one", name] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("one", "variants", "child_timeout")]
        try:
            out = subprocess.run(child, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired as e:
            print(f"{name}: no result within {args.child_timeout}s\n" + (e.stderr or b"")[-2000:].decode(errors="replace"))
            continue
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: FAILED after {time.monotonic() - started:.0f}s\n" + out.stderr[-3000:])
            sys.stdout.flush()
            continue
        results[name] = r = json.loads(line[len("RESULT "):])
        if name.startswith("check-"):
            print(f"{name}: packed loss vs padded loss, relative difference {r['relative_loss_difference']:.2e}")
        else:
            print(f"{name:9s} {r['tokens_per_s']:10.0f} real tokens/s  peak {r['peak_gb']:5.1f} GB  "
                  f"{r['tokens_per_step']:8.0f} real tokens/step  ({time.monotonic() - started:.0f}s with start-up)")
        sys.stdout.flush()
    best = max(((r["tokens_per_s"], n) for n, r in results.items() if not n.startswith("check-") and n != "trainer"), default=(0.0, "none"))
    if "trainer" in results:
        print(f"best: {best[1]} {best[0]:.0f} tokens/s = {best[0] / results['trainer']['tokens_per_s']:.1f}x the Trainer")
    print(f"target >= 150000 tokens/s: {'PASS' if best[0] >= 150000 else 'FAIL'}")


if __name__ == "__main__":
    main()
