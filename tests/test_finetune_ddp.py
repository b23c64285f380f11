"""``%%finetune --devices N`` and ``NbCustom.launcher``: real torchrun workers on the CPU (gloo).

A tiny model (the embedded model's config with 2 narrow layers, random weights, the embedded
tokenizer) keeps each run to seconds; the notebook test uses the embedded model itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import feedback_task
import llm_task
import nbcustom
from conftest import snapshot
from nbcustom.display.run import TextDisplay
from nbcustom.engines.llm import launch
from nbcustom.engines.llm.train import Checkpoint
from nbcustom.errors import NbCustomError

OPTIONS = {"max_steps": 3, "batch_size": 8, "max_new_tokens": 2, "eval_frac": 0.2, "seed": 3}


def _ours() -> list[psutil.Process]:
    """This test process's launcher and worker processes that are still alive."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            line = " ".join(p.cmdline())
            if ("torch.distributed.run" in line or launch.WORKER in line) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _lora(version):
    from safetensors.torch import load_file

    return load_file(version.model_dir / "adapter_model.safetensors")


def _relative(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5 / sum((b[k] ** 2).sum() for k in b) ** 0.5)


@pytest.mark.slow
def test_two_workers_train_the_same_lora_weights_as_one_process(tiny, tmp_path):
    rows = llm_task.rows(30)
    store = tmp_path / "store"
    # float32: in bf16 each worker's products round differently from the one process's
    # (relative difference about 3e-4), which would hide what this checks, the averaging
    exact = {**OPTIONS, "precision": "fp32"}
    one = nbcustom.finetune("one", rows, store=store, ui="none", base=tiny, **exact)
    two = nbcustom.finetune("two", rows, store=store, ui="none", base=tiny, devices=2, **exact)

    a, b = _lora(two), _lora(one)
    assert a.keys() == b.keys()
    assert _relative(a, b) < 1e-5  # the same global batch: the gradients really are averaged
    assert all(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # zero at the start: trained
    llm = two.manifest["llm"]
    assert llm["world_size"] == 2 and "torch.distributed.run" in llm["launcher"] and "--nproc-per-node 2" in llm["launcher"]
    assert two.manifest["options"]["devices"] == 2 and "world_size" not in one.manifest["llm"]
    assert llm["steps"] == one.manifest["llm"]["steps"] == 3
    assert two.manifest["counts"]["train_tokens"] == one.manifest["counts"]["train_tokens"]
    # the kernel evaluated both the same way: the same before, an after from the same weights
    assert two.manifest["metrics"]["before"] == one.manifest["metrics"]["before"]
    assert two.manifest["metrics"]["after"]["eval_loss"] == pytest.approx(one.manifest["metrics"]["after"]["eval_loss"], rel=1e-5)
    assert not _ours()
    assert not launch.run_folder(Checkpoint(store, "two", "")).exists()  # cleaned up after success


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_two_workers_train_the_same_preference_adapter_as_one_process(tiny, tmp_path, method):
    # DPO: each worker's pairs; KTO: each worker's rated answers, the KL estimate across both
    rows, rating = (feedback_task.pairs(24), {}) if method == "dpo" else (feedback_task.rated(24), {"feedback": "good"})
    exact = {**OPTIONS, "precision": "fp32", "method": method, **rating}
    store = tmp_path / "store"
    one = nbcustom.finetune("one", rows, store=store, ui="none", base=tiny, **exact)
    two = nbcustom.finetune("two", rows, store=store, ui="none", base=tiny, devices=2, **exact)
    a, b = _lora(two), _lora(one)
    assert a.keys() == b.keys() and _relative(a, b) < 1e-5
    assert all(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)
    assert two.manifest["llm"]["method"] == method and two.manifest["llm"]["world_size"] == 2
    after = two.manifest["metrics"]["after"]
    assert after["preference_loss"] == pytest.approx(one.manifest["metrics"]["after"]["preference_loss"], rel=1e-5)
    assert not _ours()


@pytest.mark.slow  # about a minute on a loaded 2-core machine (two launchers start)
def test_two_launchers_rendezvous_on_localhost_and_complete_a_run(tiny, tmp_path, monkeypatch):
    """Two nodes on one host: the kernel's launcher (node 0, from the launcher setting) and
    the other node's command as the README gives it, one worker each, c10d on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"
    rendezvous = f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id nbc"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NBCUSTOM_LAUNCHER", f"torchrun {rendezvous} --node-rank 0")
    folder = launch.run_folder(Checkpoint(store, "twonode", ""))
    other = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *rendezvous.split(), "--node-rank", "1", "-m", launch.WORKER, str(folder)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(nbcustom.__file__).parents[1])},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        version = nbcustom.finetune("twonode", llm_task.rows(30), store=store, ui="none", base=tiny, **OPTIONS)
        out, _ = other.communicate(timeout=120)
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGKILL)
    assert other.returncode == 0, out.decode()[-2000:]
    llm = version.manifest["llm"]
    assert llm["world_size"] == 2 and f"127.0.0.1:{port}" in llm["launcher"] and "--node-rank 0" in llm["launcher"]
    assert llm["steps"] == 3 and version.manifest["metrics"]["after"]["eval_loss"] < version.manifest["metrics"]["before"]["eval_loss"]


def _kill_one_worker_once_training(folder: Path, killed: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        progress = folder / "progress.jsonl"
        if progress.exists() and '"loss"' in progress.read_text():
            workers = [p for p in _ours() if "torch.distributed.run" not in " ".join(p.cmdline())]
            if len(workers) == 2:
                workers[-1].kill()
                killed.append(workers[-1].pid)
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_worker_is_one_line_no_version_and_no_process_left(tiny, tmp_path):
    store = tmp_path / "store"
    nbcustom.finetune("kept", llm_task.rows(12), store=store, ui="none", base=tiny, max_steps=1, max_new_tokens=1)
    before = snapshot(store)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_one_worker_once_training, args=(launch.run_folder(Checkpoint(store, "killed", "")), killed))
    killer.start()
    with pytest.raises(NbCustomError) as error:
        nbcustom.finetune("killed", llm_task.rows(30), store=store, ui="none", base=tiny, devices=2, **{**OPTIONS, "max_steps": 100000})
    killer.join()
    message = str(error.value)
    assert killed and "\n" not in message
    assert "killed by SIGKILL" in message and "workers.log" in message
    assert Path(message.rsplit("(log: ", 1)[1].rstrip(")")).is_file()
    assert snapshot(store) == before
    assert not _ours()


@pytest.mark.slow
def test_ctrl_c_in_the_kernel_stops_every_worker(ip, store_dir, tiny, monkeypatch):
    ip.user_ns["rows"] = llm_task.rows(30)
    real_step = TextDisplay.step

    def interrupting(self, step, total=None, **metrics):
        if "loss" in metrics:
            assert len(_ours()) == 3  # the launcher and its two workers are running
            raise KeyboardInterrupt
        real_step(self, step, total, **metrics)

    monkeypatch.setattr(TextDisplay, "step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("finetune", f"stopped --base {tiny} --devices 2 --max-steps 100000 --max-new-tokens 1", "SELECT * FROM rows")
    assert not _ours()
    assert snapshot(store_dir) == {}


def test_port_in_use_is_one_line_naming_the_port(tiny, tmp_path):
    store = tmp_path / "store"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NbCustomError, match=rf"port {port} is already in use.*\(log: .*workers.log\)$") as error:
            nbcustom.finetune("busy", llm_task.rows(12), store=store, ui="none", base=tiny, devices=2, launcher=f"torchrun --master-port {port}", max_steps=1, max_new_tokens=1)
    assert "\n" not in str(error.value)
    assert not store.exists() and not _ours()


def test_launcher_setting_reaches_the_engine_and_a_missing_launcher_is_one_line(ip, store_dir, tiny, monkeypatch):
    ip.user_ns["rows"] = llm_task.rows(12)
    ip.run_line_magic("config", "NbCustom.launcher = 'no-such-torchrun --nnodes 2 --node-rank 0'")
    try:
        with pytest.raises(NbCustomError, match=r"^launcher 'no-such-torchrun' not found on PATH"):
            ip.run_cell_magic("finetune", f"far --base {tiny} --max-steps 1 --max-new-tokens 1", "SELECT * FROM rows")
    finally:
        ip.run_line_magic("config", "NbCustom.launcher = ''")
    monkeypatch.setenv("NBCUSTOM_LAUNCHER", "also-missing --nnodes 2")
    with pytest.raises(NbCustomError, match="'also-missing' not found"):
        nbcustom.finetune("far", llm_task.rows(12), store=store_dir, ui="none", base=tiny, max_steps=1, max_new_tokens=1)
    assert snapshot(store_dir) == {} and not _ours()


NOTEBOOK = [
    "%load_ext nbcustom",
    "import sys; sys.path.insert(0, {tests!r})\nimport llm_task\nproducts = llm_task.rows(40)",
    # one thread in the kernel too: the workers have one each, and on a busy machine torch's
    # threads spin waiting for each other
    "import torch; torch.set_num_threads(1)",
    "%config NbCustom.store = {one!r}",
    '%%finetune fmt --max-steps 4 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 12 --system "{system}"\nSELECT * FROM products',
    "%config NbCustom.store = {two!r}",
    '%%finetune fmt --max-steps 4 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 12 --system "{system}" --devices 2\nSELECT * FROM products',
]


def _summary(outputs) -> tuple[list, str]:
    """The kinds of a cell's outputs, and its text summary with the figures masked, and the
    columns' padding with them (0.0104 and 0.01077 differ in width), without the throughput
    line, the one that names the workers."""
    import re

    kinds = [(o.output_type, sorted(o.get("data", {}))) for o in outputs]
    text = "\n".join(o.data["text/plain"] for o in outputs if o.output_type == "display_data")
    lines = [re.sub(r" +", " ", re.sub(r"\d[\d.,e+-]*", "#", line)) for line in text.splitlines() if "tokens/s" not in line]
    return kinds, "\n".join(lines)


@pytest.mark.slow
def test_notebook_with_devices_2_shows_the_one_process_summary_and_learns(tmp_path):
    from nbcustom import Store
    from notebooks import run_notebook

    one, two = tmp_path / "one", tmp_path / "two"
    cells = [c.format(tests=str(Path(__file__).parent), one=str(one), two=str(two), system=llm_task.SYSTEM) for c in NOTEBOOK]
    nb = run_notebook(cells, tmp_path / "store", ui="static", timeout=1800)

    assert not [o for cell in nb.cells for o in cell.outputs if o.output_type == "error"]
    alone, workers = _summary(nb.cells[4].outputs), _summary(nb.cells[6].outputs)
    assert alone == workers
    assert "exact_match" in workers[1] and "image/png" in str(workers[0])
    manifest = Store(two).get("fmt").manifest
    assert manifest["llm"]["world_size"] == 2
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["exact_match"] > before["exact_match"]  # a held-out gain
