"""``%%finetune --devices N`` and ``NbCustom.launcher``: the training loop in torchrun workers.

The kernel prepares a run folder, starts ``torchrun`` (``python -m torch.distributed.run``,
or the configured launcher line) as a subprocess in its own process group, and replays the
progress rank 0 writes there on the live display. The workers (``worker.py``) train from
the adapter the kernel saved, so their start is exactly the one-process run's; rank 0
writes the trained adapter and the run's state back, and the kernel loads the adapter for
the after-evaluation and commits the version as usual.

Run folder (``cache_dir()/runs/KEY``, reused per store and model name)::

    job.json        base model path, device, dtype, options, tokenized examples (or feedback items), schedule, state
    start/          the adapter to start from (new LoRA or the previous version's)
    progress.jsonl  rank 0's display calls, one JSON object a line
    adapter/        the trained adapter (rank 0)
    result.json     the run's figures and state (rank 0, written last)
    workers.log     the launcher's and the workers' output

A failed run keeps its folder (the error names ``workers.log``); the next run clears it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ... import models
from ...errors import NbCustomError

WORKER = "nbcustom.engines.llm.worker"
POLL = 0.2  # seconds between reads of the progress file
GRACE = 10  # seconds the workers get to stop after SIGTERM
REPLAYED = ("phase", "step", "log")  # display calls rank 0 may make


def distributed(spec) -> bool:
    """Whether ``spec`` asks for torchrun workers."""
    return spec.devices > 1 or bool(spec.launcher)


def run_folder(checkpoint) -> Path:
    """The run folder of the run whose checkpoints live in ``checkpoint`` (same key)."""
    return models.cache_dir() / "runs" / checkpoint.folder.name


def train(model, tokenizer, train_set, held_set, steps, spec, state, checkpoint, display, objective) -> dict:
    """``train._train_loop`` in torchrun workers: same arguments, same result, plus
    ``world_size`` and ``launcher``; ``model`` ends with the trained adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    causal = model.get_base_model()
    device = next(model.parameters()).device.type
    launcher = launcher_words(spec, device)
    folder = prepare(run_folder(checkpoint), model, train_set, held_set, steps, spec, state, checkpoint, causal, device, objective)
    display.phase("starting workers")
    display.log(f"run folder {folder}; workers: {shlex.join(launcher)}")
    result = run(launcher + ["-m", WORKER, str(folder)], folder, display, env=worker_env(spec, device))
    set_peft_model_state_dict(model, load_file(folder / "adapter" / "adapter_model.safetensors", device=str(causal.device)))
    state.update(result["state"])
    shutil.rmtree(folder, ignore_errors=True)
    return {**result["run"], "world_size": result["world_size"], "launcher": shlex.join(launcher)}


def launcher_words(spec, device: str) -> list[str]:
    """The launcher command line without the worker: ``spec.launcher`` (its program looked
    up on PATH and next to this Python), else a standalone torchrun on this machine."""
    if not spec.launcher:
        if device == "cuda":
            import torch

            if spec.devices > torch.cuda.device_count():
                raise NbCustomError(f"--devices {spec.devices}: only {torch.cuda.device_count()} GPU(s) are visible; use fewer or --device cpu")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(spec.devices)]
    try:
        words = shlex.split(spec.launcher)
    except ValueError as e:
        raise NbCustomError(f"cannot read the launcher line {spec.launcher!r} ({e}): check its quotes") from None
    program = shutil.which(words[0]) or shutil.which(words[0], path=str(Path(sys.executable).parent))
    if program is None:
        raise NbCustomError(f"launcher {words[0]!r} not found on PATH or next to {sys.executable}: give its full path in NbCustom.launcher")
    if not any(w.split("=")[0] in ("--nproc-per-node", "--nproc_per_node") for w in words):
        words += ["--nproc-per-node", str(spec.devices)]
    return [program, *words[1:]]


def worker_env(spec, device: str) -> dict:
    """The kernel's environment, plus: this ``nbcustom`` first on the path; on CPU one
    thread per worker; the loopback interface for gloo when every worker is local."""
    import nbcustom

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(nbcustom.__file__).parents[1]), env.get("PYTHONPATH")) if p)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    if not spec.launcher:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def prepare(folder: Path, model, train_set, held_set, steps, spec, state, checkpoint, causal, device: str, objective) -> Path:
    """A fresh run folder with everything the workers read."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.save_pretrained(folder / "start")
    job = {
        "base": causal.config.name_or_path, "device": device, "dtype": str(causal.dtype).removeprefix("torch."),
        "spec": spec.to_dict(), "train": [dataclasses.asdict(e) for e in train_set], "held": [dataclasses.asdict(e) for e in held_set],
        "likelihood": getattr(objective, "likelihood", False), "steps": steps, "state": state, "checkpoint": {"folder": str(checkpoint.folder), "fingerprint": checkpoint.fingerprint},
    }
    (folder / "job.json").write_text(json.dumps(job))
    return folder


def run(command: list[str], folder: Path, display, env: dict) -> dict:
    """Start ``command`` in its own process group, replay rank 0's progress on ``display``
    until it ends, and return rank 0's result. Any failure or interrupt stops the group."""
    log = folder / "workers.log"
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as e:
            raise NbCustomError(f"cannot start the launcher {command[0]!r}: {e.strerror}") from None
    try:
        offset = 0
        while proc.poll() is None:
            time.sleep(POLL)
            offset = replay(folder / "progress.jsonl", offset, display)
        replay(folder / "progress.jsonl", offset, display)
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise NbCustomError(f"the training workers failed: {cause(log.read_text(errors='replace'))} (log: {log})")
    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        raise NbCustomError(f"the workers ended without a result in {folder}: on several machines it must be on storage they share (log: {log})") from None


def replay(path: Path, offset: int, display) -> int:
    """Call ``display`` for each complete line of ``path`` after byte ``offset``; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        call = json.loads(line)
        if call["call"] in REPLAYED:
            getattr(display, call["call"])(*call["args"], **call["kwargs"])
    return offset + len(complete)


def stop(proc: subprocess.Popen) -> None:
    """End the launcher's whole process group (workers a dead launcher left included)."""
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            break
        time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def cause(log: str) -> str:
    """The workers' failure in one line, read from the launcher's log."""
    port = re.search(r"EADDRINUSE|[Aa]ddress already in use", log)
    if port:
        number = re.search(r"port:? (\d+)", log[max(0, port.start() - 400): port.end() + 400])
        where = f"port {number.group(1)}" if number else "the rendezvous port"
        return f"{where} is already in use: choose another port in the launcher line"
    # torchrun lists each failed worker, the first observed failure last; a worker killed
    # by a signal other than the SIGTERM torchrun sends the rest is the cause
    failures = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log, re.S)]
    killed = [(r, c) for r, c in failures if c < 0 and -c != signal.SIGTERM]
    if killed:
        rank, code = killed[0]
        return f"worker rank {rank} was killed by {signal.Signals(-code).name}"
    if failures:
        rank, code = failures[-1]
        error = re.search(rf"^\[rank{rank}\]:\s*([\w.]*(?:Error|Exception)\b.*)$", log, re.M)
        return f"worker rank {rank} exited with code {code}" + (f": {error.group(1)}" if error else "")
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "the launcher exited without output"
