"""Throughput of ``nbcustom serve`` under concurrent clients against the same requests one at
a time (issue 28). Not collected by pytest; run it by hand:

    .venv/bin/python tests/benchmarks/bench_serve.py [--clients 16] [--requests 4] [--max-tokens 32]

Trains two short versions of one LLM (SmolLM2-135M-Instruct + LoRA), starts ``nbcustom
serve`` as its own process, and sends ticket-like prompts with the ``openai`` client: first
every request one at a time, then ``--clients`` threads each sending ``--requests`` requests,
alternating the two versions (so batches mix adapters). Prints requests/s, generated
tokens/s and p50/p95 latency of both, and the ratio. Goal: >= 3x on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import label_task  # noqa: E402
import llm_task  # noqa: E402


def prompts(n: int) -> list[str]:
    tickets = label_task.rows(n, seed=3)["prompt"].tolist()
    return [f"Answer this support ticket in one friendly sentence: {t}" for t in tickets]


def run(api, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    def one(job):
        started = time.perf_counter()
        reply = api.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}], max_tokens=max_tokens)
        return time.perf_counter() - started, reply.usage.completion_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "requests/s": len(jobs) / wall, "tokens/s": sum(r[1] for r in results) / wall,
        "p50 s": statistics.median(latencies), "p95 s": latencies[max(0, int(round(0.95 * len(latencies))) - 1)], "wall s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    import nbcustom
    import openai

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.machine())
    print(f"{cpu}, {os.cpu_count()} CPUs; {args.clients} clients x {args.requests} requests, at most {args.max_tokens} new tokens")
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        common = dict(store=store, ui="none", max_steps=4, batch_size=4, eval_frac=0.1, max_new_tokens=8, system=llm_task.SYSTEM)
        nbcustom.finetune("bot", llm_task.rows(40), **common)
        nbcustom.finetune("bot", llm_task.rows(40, seed=1), promote="never", **common)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "nbcustom.serve", "--store", str(store), "--port", str(port)])
        try:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.2)
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
            texts = prompts(args.clients * args.requests)
            jobs = [("bot@1" if i % 2 else "bot@2", t) for i, t in enumerate(texts)]
            run(api, jobs[:2], 1, 4)  # load the base and both adapters
            import httpx

            health = lambda: httpx.get(f"http://127.0.0.1:{port}/health").json()  # noqa: E731
            alone = run(api, jobs, 1, args.max_tokens)
            first = health()["prompt_reads"]
            together = run(api, jobs, args.clients, args.max_tokens)
            reads, largest = health()["prompt_reads"] - first, health()["largest_batch"]
        finally:
            server.terminate()
            server.wait(30)
    for label, figures in (("one at a time", alone), (f"{args.clients} concurrent clients", together)):
        print(f"{label:24s} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    print(f"concurrent: {reads} prompt reads for {len(jobs)} requests ({len(jobs) / reads:.1f} prompts per read), at most {largest} rows decoded together")
    ratio = together["requests/s"] / alone["requests/s"]
    print(f"throughput {ratio:.2f}x one at a time (goal >= 3x): {'PASS' if ratio >= 3 else 'FAIL'}")


if __name__ == "__main__":
    main()
