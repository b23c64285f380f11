"""One torchrun worker of ``%%finetune --devices N``: ``python -m nbcustom.engines.llm.worker RUN_DIR``.

Every worker loads the base model and the start adapter from the run folder the kernel
prepared (see ``launch``), and runs the kernel's own training loop (``train._train_loop``)
on the same schedule, so all take the same steps. Each packs the step's whole batch and
trains its share of the packed rows; the LoRA gradients are then summed across workers
with each one weighted by its share of the step's targets, which is the gradient of the
step's mean loss a one-process run computes (what DDP's all-reduce does, with the weighting
packing needs). Rank 0 writes the display calls, the trained adapter and the result.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from ... import models
from .data import Example
from .preference import Item
from .train import Checkpoint, _train_loop, objective_for


class Progress:
    """Rank 0's display: each call is one JSON line the kernel replays; silent elsewhere."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", buffering=1) if path else None

    def _write(self, call: str, *args, **kwargs) -> None:
        if self.file:
            self.file.write(json.dumps({"call": call, "args": args, "kwargs": kwargs}) + "\n")

    def phase(self, name: str) -> None:
        self._write("phase", name)

    def step(self, step: int, total: int | None = None, **metrics: float) -> None:
        self._write("step", step, total, **metrics)

    def log(self, line: str) -> None:
        self._write("log", line)


def averaged_backward(objective, rank: int, world: int):
    """A ``backward(model, batch, max_tokens, streams)`` for ``_train_loop`` that leaves every
    worker with the gradient of the whole batch's mean loss, and returns that loss: each
    computes its share of the batch (``objective.share``), weighted by that share."""
    import torch
    import torch.distributed as dist

    def backward(model, batch, max_tokens, streams=1):
        params = [p for p in model.parameters() if p.requires_grad]
        mine, weight = objective.share(batch, rank, world)
        loss = objective.backward(model, mine, max_tokens, streams) if mine else torch.zeros((), device=params[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params] + [loss.detach().reshape(1).to(params[0].dtype)])
        flat.mul_(weight)
        dist.all_reduce(flat)
        start = 0
        for p in params:
            p.grad = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        return flat[-1]

    return backward


def main(folder: Path) -> None:
    import torch
    import torch.distributed as dist

    from .generate import adapted
    from . import precision
    from .pack import accelerated

    job = json.loads((folder / "job.json").read_text())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = job["device"]
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    spec = SimpleNamespace(**job["spec"])
    torch.manual_seed(spec.seed)
    checkpoint = (Checkpoint if rank == 0 else _Restoring)(folder, "", job["checkpoint"]["fingerprint"])
    checkpoint.folder = Path(job["checkpoint"]["folder"])  # the kernel's, so --resume finds it
    with models.quiet():
        model, tokenizer = models.load_llm(Path(job["base"]), device, job["dtype"])
        item = (lambda e: Example(**e)) if spec.method == "sft" else Item.from_dict
        train_set, held_set = ([item(e) for e in job[k]] for k in ("train", "held"))
        objective = objective_for(spec.method, spec.beta, job["likelihood"], tokenizer.pad_token_id)
        with adapted(model, adapter_dir=folder / "start", trainable=True) as peft_model:
            display = Progress(folder / "progress.jsonl" if rank == 0 else None)
            fast = accelerated(peft_model, "flex_attention" if device.startswith("cuda") else None) if spec.compile else contextlib.nullcontext()
            with fast, precision.choose(device.split(":")[0], spec.precision).computing(peft_model):
                run = _train_loop(peft_model, tokenizer, train_set, held_set, job["steps"], spec, job["state"], checkpoint, display,
                                  objective, backward=averaged_backward(objective, rank, world))
            if rank == 0:
                peft_model.save_pretrained(folder / "adapter")
                result = {"run": run, "state": job["state"], "world_size": world}
                (folder / "result.json.tmp").write_text(json.dumps(result))
                os.replace(folder / "result.json.tmp", folder / "result.json")
    dist.barrier()  # no launcher ends before rank 0's result is written
    dist.destroy_process_group()


class _Restoring(Checkpoint):
    """The checkpoint as ranks other than 0 see it: they restore from it, rank 0 saves."""

    def save(self, *args, **kwargs) -> None:
        pass


if __name__ == "__main__":
    main(Path(sys.argv[1]))
