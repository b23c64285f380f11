"""``%%finetune`` end to end on CUDA: the magic itself in an IPython shell, rows from the
kernel's DuckDB, the embedded model; eager, with ``--compile``, and ``--devices 2`` on two
GPUs. Skipped where no CUDA GPU is visible.

    .venv/bin/python -m pytest -s tests/gpu/test_finetune_gpu.py

``-s`` prints one line per run (steps, tokens/s, before/after exact_match) for RESULTS.md.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.slow,
]

import llm_task  # noqa: E402

OPTIONS = f'--device cuda --max-steps 30 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 12 --system "{llm_task.SYSTEM}"'


def _run(ip, store_dir, name: str, extra: str) -> dict:
    from nbcustom import Store

    ip.user_ns["products_df"] = llm_task.rows(200)
    ip.run_cell("import duckdb\nduckdb.sql('CREATE OR REPLACE TABLE products AS SELECT * FROM products_df')")
    ip.run_cell_magic("finetune", f"{name} {OPTIONS} {extra}", "SELECT prompt, response FROM products")
    manifest = Store(store_dir).get(name).manifest
    llm, metrics = manifest["llm"], manifest["metrics"]
    print(f"\n{torch.cuda.get_device_name()} %%finetune {extra or '(eager)'}: {llm['steps']} steps, "
          f"{llm['tokens_per_s']:.0f} tokens/s, exact_match {metrics['before']['exact_match']:.2f} -> {metrics['after']['exact_match']:.2f}")
    assert llm["device"] == "cuda" and llm["dtype"] in ("bfloat16", "float16")
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert metrics["after"]["exact_match"] > metrics["before"]["exact_match"]
    return manifest


def test_finetune_magic_on_cuda(ip, store_dir):
    manifest = _run(ip, store_dir, "gpu_eager", "")
    assert "world_size" not in manifest["llm"]


def test_finetune_magic_on_cuda_compiled(ip, store_dir):
    manifest = _run(ip, store_dir, "gpu_compiled", "--compile")
    assert manifest["options"]["compile"] is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_finetune_magic_on_two_gpus(ip, store_dir):
    manifest = _run(ip, store_dir, "gpu_ddp", "--devices 2")
    assert manifest["llm"]["world_size"] == 2 and "--nproc-per-node 2" in manifest["llm"]["launcher"]
