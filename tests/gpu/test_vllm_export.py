"""``%nbc export NAME --format vllm`` served by vLLM itself: ``serve.sh`` starts, and every
version answers through the OpenAI API as the same version answers in nbcustom (greedy).
Skipped where vLLM or a CUDA GPU is missing.

    .venv/bin/python -m pytest -s tests/gpu/test_vllm_export.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.slow]

import llm_task  # noqa: E402

import nbcustom  # noqa: E402


def test_serve_sh_serves_every_version(tmp_path):
    store = tmp_path / "store"
    common = dict(store=store, ui="none", max_steps=30, lr=2e-3, eval_frac=0.2, max_new_tokens=16, system=llm_task.SYSTEM)
    nbcustom.finetune("bot", llm_task.rows(200), **common)
    nbcustom.finetune("bot", llm_task.rows(200, seed=1), promote="never", **common)
    nbcustom.export("bot", store=store, format="vllm", to=tmp_path / "vllm")
    process = subprocess.Popen(["sh", str(tmp_path / "vllm" / "serve.sh"), "--port", "8123", "--dtype", "float32"],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                socket.create_connection(("127.0.0.1", 8123), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(2)
        client = openai.OpenAI(base_url="http://127.0.0.1:8123/v1", api_key="EMPTY", max_retries=5)
        assert {"bot", "bot@1", "bot@2"} <= {m.id for m in client.models.list().data}
        prompt = llm_task.rows(1, seed=7)["prompt"][0]
        for model, version in (("bot", 1), ("bot@1", 1), ("bot@2", 2)):
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=16,
                messages=[{"role": "system", "content": llm_task.SYSTEM}, {"role": "user", "content": prompt}],
            ).choices[0].message.content
            here = nbcustom.predict("bot", f"SELECT '{prompt}' AS prompt", store=store, version=version, max_new_tokens=16)["prediction"][0]
            print(f"\n{model}: vLLM {reply!r}, nbcustom {here!r}")
            assert reply.strip() == here
    finally:
        process.terminate()
        process.wait(60)
