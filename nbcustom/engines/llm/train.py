"""LLM fine-tuning: LoRA (transformers + peft) with a plain torch training loop.

``train`` checks the rows, tokenizes them with the model's chat template, scores the base
model (or the previous version) on a seeded holdout, trains the adapter, scores it again on
the same rows and writes the adapter in standard PEFT format into the build. ``load``
returns a ``Generator`` for ``%%predict`` and ``nbcustom.load``.

Checkpoints live outside the store (under the nbcustom cache), so an interrupted run leaves
the store as it was and ``--resume`` continues from the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

from ... import models
from ...errors import NbCustomError
from .. import Outcome
from . import data as llm_data, early_stop, labels as llm_labels, launch, pack as llm_pack, precision as llm_precision, preference as llm_preference
from .generate import adapted, generate, lora_config, mean_loss, score

DEFAULT_BATCH = 8
# --lr by default: a label is a few tokens and learns in few steps at a higher rate than free
# text (tests/benchmarks/RESULTS.md, label tasks: on 200 tickets 3e-3 reached accuracy 1.000
# in 43 s of training where 2e-4 reached 0.800 in 70 s; on 30-80-token tickets 1.000 in 125 s
# against 0.650 in 152 s)
LR = {"labels": 3e-3, "text": 2e-4}
WARMUP = 0.06  # fraction of the steps with a rising learning rate
CHECKPOINTS = 5  # checkpoints per run (and one at each epoch's end)
# ... but at most one per this many seconds: a resumed run repeats at most that much
# training, and a short run spends no CPU on them (a save of the 135M model's adapter and
# optimizer state took about 85 ms of CPU, tests/benchmarks/RESULTS.md)
CHECKPOINT_SECONDS = 30.0
# tokens per forward/backward pass; a step's packed rows are split into such micro-batches
# (CPU: 512 float32 or 768 bf16-autocast tokens keep a run of the 135M model under 4 GB,
# tests/benchmarks/bench_finetune_memory.py; 768 holds a step of eight 90-token rows)
MICRO_BATCH_TOKENS = {"cpu": 512, "cpu-bf16": 768, "cuda": 65536}
# threads that run a step's rows side by side (pack.backward's streams): on a CPU in bf16,
# two, each with half of torch's threads (tests/benchmarks/RESULTS.md)
STREAMS = {"cpu-bf16": 2}


def train(spec, rows, previous, build, display) -> Outcome:
    """Fine-tune a LoRA adapter on ``rows``; see the module docstring."""
    with models.quiet():
        return _train(spec, rows, previous, build, display)


def _train(spec, rows, previous, build, display) -> Outcome:
    import torch

    method, method_reason = llm_preference.choose(spec, rows.columns)
    spec = dataclasses.replace(spec, method=method)
    if method == "sft":
        llm_data.check_rows(rows, spec.prompt, spec.response)
    else:
        llm_preference.check_rows(rows, spec, method)
    base = _base_name(spec, previous)
    path = models.resolve_llm(base)
    run_on = device_for(spec.device, spec.precision)
    device, dtype = run_on.device, run_on.weights
    # a continued run keeps the previous version's system message unless given a new one
    system = spec.system if spec.system is not None or previous is None else previous.manifest.get("llm", {}).get("system")
    tokenizer = _tokenizer(path)
    if method == "sft":
        every = llm_data.examples(rows, tokenizer, spec.prompt, spec.response, system)
    else:
        every = llm_preference.items(rows, tokenizer, spec, method, system)
    train_at, held_at = llm_data.split(len(rows), spec.eval_frac, spec.seed)
    lengths = [getattr(e, "longest", None) or len(e) for e in every]
    fits = [n <= spec.max_length for n in lengths]
    if not any(fits):
        raise NbCustomError(f"every example is longer than --max-length {spec.max_length} tokens (shortest: {min(lengths)}); raise --max-length")
    train_set = [every[i] for i in train_at if fits[i]]
    held_set = [every[i] for i in held_at if fits[i]]
    if not train_set or not held_set:
        side = "training" if not train_set else "holdout"
        raise NbCustomError(f"no {side} example is within --max-length {spec.max_length} tokens; raise --max-length or add rows")
    likelihood = previous is None  # a preference run from the base model also learns the preferred answers
    if method == "sft":
        previous_labels = previous.manifest.get("llm", {}).get("labels") if previous else None
        responses = rows[spec.response].astype(str).tolist()
        labels, task_reason = llm_labels.choose(spec.task, responses, train_at, held_at, tokenizer, spec.response, previous_labels)
        task = "labels" if labels else "text"
    else:
        train_set, held_set = llm_preference.mismatched(train_set), llm_preference.mismatched(held_set)
        labels, task, task_reason = None, method, f"{method} ({method_reason})"
    objective = objective_for(method, spec.beta, likelihood, tokenizer.pad_token_id)
    if spec.patience is None:
        spec = dataclasses.replace(spec, patience=early_stop.PATIENCE.get(task, 0))
    if spec.lr is None:
        spec = dataclasses.replace(spec, lr=LR.get(task, LR["text"]))

    display.phase("loading model")
    model, tokenizer = models.load_llm(path, device, dtype)
    torch.manual_seed(spec.seed)
    checkpoint = Checkpoint(build.path.parents[1], build.name, _fingerprint(spec, rows, previous, path))
    source = {"adapter_dir": previous.model_dir, "trainable": True} if previous else {"config": lora_config(model, spec.lora_r, spec.lora_alpha)}
    batch_size = min(spec.batch_size or DEFAULT_BATCH, len(train_set))
    steps = llm_data.schedule(len(train_set), batch_size, spec.epochs, spec.max_steps, spec.seed)

    def scored(model, label):
        if method == "sft":
            return score(model, tokenizer, held_set, spec.max_new_tokens, display, label, labels)
        return objective.score(model, tokenizer, held_set, spec.max_new_tokens, display, label, start=label == "before")

    with adapted(model, **source) as peft_model, run_on.computing(peft_model):
        if method != "sft":
            display.phase("scoring the reference")
            used = sorted({i for step in steps for i in step})  # a run shorter than an epoch scores only its rows
            objective.reference(peft_model, [train_set[i] for i in used] + held_set, lambda i, n: display.step(i, n))  # the model as it starts
        state = checkpoint.load() if spec.resume else None
        if state is None:
            checkpoint.clear()
            before, before_texts = scored(peft_model, "before")
            state = {"step": 0, "history": [], "eval_history": [], "before": before, "before_texts": before_texts, "seconds": 0.0, "tokens": 0}
        fast = llm_pack.accelerated(peft_model, "flex_attention" if device == "cuda" else None) if spec.compile else contextlib.nullcontext()
        with fast:
            loop = launch.train if launch.distributed(spec) else _train_loop  # torchrun workers, or here
            run = loop(peft_model, tokenizer, train_set, held_set, steps, spec, state, checkpoint, display, objective)
        after, after_texts = scored(peft_model, "after")
        display.phase("saving")
        peft_model.save_pretrained(build.model_dir)
        tokenizer.save_pretrained(build.model_dir)
        lora = peft_model.peft_config["default"]
    checkpoint.clear()

    from ...display.charts import loss_chart

    history, evals = state["history"], state["eval_history"]
    charts = {"loss": loss_chart(*zip(*history), *(zip(*evals) if evals else ((), ())))} if len(history) > 1 else {}
    held_rows = [e.row for e in held_set]
    if method == "sft":
        examples = rows.iloc[held_rows][[spec.prompt, spec.response]].rename(columns={spec.prompt: "prompt", spec.response: "reference"})
    else:
        answers = {"dpo": {spec.chosen: "preferred", spec.rejected: "rejected"}, "kto": {spec.response: "response", spec.feedback: "good"}}[method]
        examples = rows.iloc[held_rows][[spec.prompt, *answers]].rename(columns={spec.prompt: "prompt", **answers})
    examples = examples.assign(before=state["before_texts"], after=after_texts).reset_index(drop=True)
    dropped = fits.count(False)
    notes = [f"continued from v{previous.version}'s adapter (LoRA r={lora.r} kept)"] if previous else []
    if dropped:
        notes.append(f"{dropped} example(s) longer than --max-length {spec.max_length} tokens were dropped")
    if run["resumed_from"]:
        notes.append(f"resumed from the checkpoint at step {run['resumed_from']}")
    elif spec.resume:
        notes.append(f"--resume found no checkpoint of this run (one is written at most every {CHECKPOINT_SECONDS:.0f} s of training): trained from the start")
    notes.append(f"task: {task_reason}")
    if method != "sft":
        reference = f"v{previous.version}" if previous else "the base model"
        notes.append(f"reference model: {reference} (beta {spec.beta})" + (
            f"; a likelihood term on the preferred answers (weight {llm_preference.LIKELIHOOD}) teaches them, as there is no tuned parent" if likelihood else ""))
        notes.extend(llm_preference.shown(tokenizer, train_set[0]))
    notes.extend(early_stop.notes(run))
    compiled = " with compiled layers" + (" and flex attention" if device == "cuda" else "") if spec.compile else ""
    where = f"{run['world_size']} {device} workers" if "world_size" in run else device
    notes.append(f"trained {run['steps']} steps at {run['tokens_per_s']:.0f} tokens/s on {where}{compiled} in {run_on.name} ({run_on.why})")
    # what --promote if-better compares: a preference run's holdout preference loss
    label_info, tables = ({"eval_metric": "preference_loss", "higher_is_better": False} if method != "sft" else {}), {}
    if labels:
        references = [e.response for e in held_set]
        label_info, tables, charts["confusion"] = llm_labels.report(labels, state["before_texts"], after_texts, references, f"v{previous.version}" if previous else "base")
    return Outcome(
        before=state["before"], after=after,
        counts={"trained": len(train_set), "held_out": len(held_set), "dropped_too_long": dropped, "steps": run["steps"], "train_tokens": state["tokens"]},
        train_rows=rows.iloc[[e.row for e in train_set]].reset_index(drop=True),
        examples=examples, charts=charts, notes=notes, tables=tables,
        info={
            "base": {"name": base or models.DEFAULT_LLM, "path": str(path), "id": model.config.name_or_path},
            "llm": {
                "prompt": spec.prompt, "response": spec.response, "system": system, "task": task, "labels": labels, "lr": spec.lr,
                "method": method, **({"beta": spec.beta, "likelihood": likelihood, "reference": f"v{previous.version}" if previous else "base"} if method != "sft" else {}),
                "lora": {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules)},
                "batch_size": batch_size, "device": device, "dtype": dtype, "precision": {"name": run_on.name, "compute": run_on.compute, "why": run_on.why}, **run,
            },
            "history": {"loss": history, "eval_loss": evals},  # the curves, for tracking
            **label_info,
        },
        before_label=f"v{previous.version}" if previous else "base",
    )


class SFT:
    """``--method sft``: the mean cross-entropy of the responses, on packed batches."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def batch(self, found) -> dict:
        # rows as wide as the step's longest example: little padding, and little attention
        # computed between examples only to be masked out
        return llm_pack.pack(found, 0, self.pad_id)

    def share(self, batch: dict, rank: int, world: int) -> tuple[dict | None, float]:
        """A torchrun worker's packed rows of the step, and their share of its targets."""
        mine = llm_pack.shard(batch, rank, world)
        total = int((batch["targets"] != llm_pack.IGNORE).sum())
        return mine, (int((mine["targets"] != llm_pack.IGNORE).sum()) if mine else 0) / max(total, 1)

    def backward(self, model, batch: dict, max_tokens: int, streams: int = 1):
        return llm_pack.backward(model, batch, max_tokens, streams)

    def evaluate(self, model, held) -> tuple[float, dict]:
        return mean_loss(model, held, self.pad_id), {}


def objective_for(method: str, beta: float, likelihood: bool, pad_id: int):
    """The training objective of ``--method``."""
    return SFT(pad_id) if method == "sft" else llm_preference.Objective(method, beta, likelihood, pad_id)


def _train_loop(model, tokenizer, train_set, held_set, steps, spec, state, checkpoint, display, objective, backward=None) -> dict:
    """AdamW with linear warmup and decay, one batch of ``objective`` per step; updates
    ``state`` (step, losses, tokens) and checkpoints it as it goes. Holdout evaluations
    decide when to stop (``early_stop.Watch``); on return the model holds the adapter to
    keep. ``backward`` computes a step's gradient (default: the objective's; torchrun
    workers pass one that averages it across them)."""
    import torch

    backward = backward or objective.backward

    total = len(steps)
    warmup = max(1, round(WARMUP * total))
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    watch = early_stop.Watch(spec, state)
    resumed_from = state["step"]
    if resumed_from:
        watch.weights = checkpoint.restore(model, optimizer, scheduler)
        display.log(f"resumed from the checkpoint at step {resumed_from} of {total}")
    per_epoch = math.ceil(len(train_set) / min(spec.batch_size or DEFAULT_BATCH, len(train_set)))
    every = max(1, total // CHECKPOINTS)
    watch.plan(total, per_epoch)
    kind = "cpu-bf16" if device.type == "cpu" and torch.is_autocast_enabled("cpu") else device.type
    micro, streams = MICRO_BATCH_TOKENS[kind], min(STREAMS.get(kind, 1), torch.get_num_threads())
    display.phase("training")
    started = time.monotonic()  # of the training since the last checkpoint (evaluations are moved out)

    def packed(step):
        return objective.batch([train_set[i] for i in steps[step]])

    batch = packed(resumed_from) if resumed_from < total else None
    try:
        for step in range(resumed_from, total):
            model.train()
            loss = backward(model, batch, micro, streams)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            checkpoint.wait()  # the last checkpoint is written from the tensors the optimizer changes
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done, tokens = step + 1, batch["tokens"]
            batch = packed(done) if done < total else None  # while a GPU still works on this step
            loss = loss.item()
            state["step"], state["tokens"] = done, state["tokens"] + tokens
            state["history"].append((done, loss))
            display.step(done, total, loss=loss, lr=scheduler.get_last_lr()[0])
            if watch.due(done, total):
                paused = time.monotonic()
                eval_loss, metrics = objective.evaluate(model, held_set)
                state["eval_history"].append((done, eval_loss))
                accuracy = metrics.get("preference_accuracy")
                display.step(done, eval_loss=eval_loss, **({"preference_accuracy": accuracy} if accuracy is not None else {}))
                also = f", preference accuracy {accuracy:.3f}" if accuracy is not None else ""
                display.log(f"step {done} (epoch {math.ceil(done / per_epoch)}): eval_loss {eval_loss:.4f}{also}")
                evaluated = time.monotonic() - paused  # not training time: the throughput is the steps'
                started += evaluated
                state["eval_seconds"] = state.get("eval_seconds", 0.0) + evaluated
                if watch.record(model, done, eval_loss):
                    break
            due = done < total and (done % every == 0 or done % per_epoch == 0)
            if due and time.monotonic() - started >= CHECKPOINT_SECONDS:
                state["seconds"] += time.monotonic() - started
                started = time.monotonic()
                checkpoint.save(model, optimizer, scheduler, state, best=watch.weights)
    finally:
        checkpoint.wait()  # an interrupted run leaves its last checkpoint whole
    state["seconds"] += time.monotonic() - started
    return {
        "steps": state["step"], "planned_steps": total, "resumed_from": resumed_from, "train_seconds": round(state["seconds"], 2),
        "eval_seconds": round(state.get("eval_seconds", 0.0), 2),
        "tokens_per_s": state["tokens"] / state["seconds"] if state["seconds"] else 0.0, **watch.finish(model),
    }


class Checkpoint:
    """The latest training state of one run, under ``cache_dir()/checkpoints``, keyed by the
    store and model name; it is only used by a run with the same data and options."""

    def __init__(self, store_root: Path, name: str, fingerprint: str):
        key = hashlib.sha256(f"{Path(store_root).resolve()}\0{name}".encode()).hexdigest()[:20]
        self.folder = models.cache_dir() / "checkpoints" / key
        self.fingerprint = fingerprint

    def save(self, model, optimizer, scheduler, state: dict, best: dict | None = None) -> None:
        """Save the run; ``best``: the best adapter so far (``--keep best``). A thread writes
        the live tensors while the next step's gradient is computed (the write took as long
        as a step of short rows, and copying them first a tenth of one); the training loop
        calls ``wait``, which returns once it is on disk, before the optimizer changes them."""
        import torch
        from peft import get_peft_model_state_dict

        self.wait()
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {  # live tensors and state: nothing changes them before the optimizer step
            "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "best": best,  # the best adapter is a copy already, never changed in place
        }
        writer = _Writer(self.folder, tensors, json.dumps({**state, "fingerprint": self.fingerprint}))
        _WRITERS[self.folder] = writer
        writer.start()

    def wait(self) -> None:
        """Wait until the last ``save`` is on disk (raising its error, if it failed)."""
        writer = _WRITERS.pop(self.folder, None)
        if writer is not None:
            writer.join()
            if writer.error is not None:
                raise writer.error

    def load(self) -> dict | None:
        """The saved run state, or None if there is none for this run."""
        self.wait()
        try:
            state = json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if state.pop("fingerprint", None) != self.fingerprint or not (self.folder / "state.pt").exists():
            return None
        return state

    def restore(self, model, optimizer, scheduler) -> dict | None:
        """Load the saved run into the model, optimizer and scheduler; the best adapter saved with it."""
        import torch
        from peft import set_peft_model_state_dict

        self.wait()
        tensors = torch.load(self.folder / "state.pt", weights_only=False)
        set_peft_model_state_dict(model, tensors["adapter"])
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["rng"])
        return tensors.get("best")

    def clear(self) -> None:
        self.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_WRITERS: dict[Path, "_Writer"] = {}  # checkpoint folder -> the thread writing its last save


class _Writer(threading.Thread):
    """Writes one checkpoint: the tensors, then the state, each staged and renamed into place."""

    def __init__(self, folder: Path, tensors: dict, state: str):
        super().__init__(name="nbcustom-checkpoint")
        self.folder, self.tensors, self.state, self.error = folder, tensors, state, None

    def run(self) -> None:
        import torch
        from torch.utils.serialization import config

        try:
            with config.patch({"save.compute_crc32": False}):  # the zip's checksums took as long as the write
                torch.save(self.tensors, self.folder / "state.pt.tmp")
            os.replace(self.folder / "state.pt.tmp", self.folder / "state.pt")
            (self.folder / "state.json.tmp").write_text(self.state)
            os.replace(self.folder / "state.json.tmp", self.folder / "state.json")
        except BaseException as error:  # raised again by Checkpoint.wait
            self.error = error


def _fingerprint(spec, rows, previous, path) -> str:
    from ...hashing import frame_sha256

    options = {k: v for k, v in spec.to_dict().items() if k not in ("resume", "max_new_tokens", "promote")}
    parent = f"{previous.name}@{previous.version}" if previous else None
    return hashlib.sha256(json.dumps([options, frame_sha256(rows), parent, str(path)], default=str).encode()).hexdigest()


def _base_name(spec, previous) -> str | None:
    if previous is None:
        return spec.base
    was = previous.manifest.get("base", {})
    if spec.base and spec.base not in (was.get("name"), was.get("path"), was.get("id")):
        raise NbCustomError(
            f"{previous.name} was tuned from {was.get('name')}; --base {spec.base} would start over: use a new NAME"
        )
    return was.get("name")


def device_for(choice: str, precision: str = "auto", strict: bool = True) -> llm_precision.Precision:
    """The device (CUDA when present or asked for, else CPU) and the precision of a run there
    (``strict``: see ``precision.choose``)."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise NbCustomError("--device cuda: no CUDA GPU is visible to this kernel; use --device cpu")
    return llm_precision.choose("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu", precision, strict)


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: Path):
    """The tokenizer alone (cheap), so bad rows fail before the model loads."""
    if str(path) not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS[str(path)] = tokenizer
    return _TOKENIZERS[str(path)]
