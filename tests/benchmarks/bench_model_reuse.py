"""Base-model loading through nbcustom (``models.resolve_llm`` + ``models.load_llm``, the path
``%%finetune``, ``%%predict`` and ``%%rag`` answers take) against plain transformers
(``AutoTokenizer.from_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` of the same
folder, each time), measured side by side in fresh processes. Not collected by pytest; run
it by hand (about 2-3 minutes on 2 CPU cores):

    .venv/bin/python tests/benchmarks/bench_model_reuse.py [--repeat 2] [--no-finetune] [--fresh-cache]

``--fresh-cache`` points ``NBCUSTOM_CACHE`` at an empty temporary folder first, so the
one-time GGUF conversion is measured too (and the later loads read the folder it wrote).

Targets (issue 7):
  (a) a second ``%%finetune`` / ``%%predict`` on the same base model in one kernel adds under
      1 s of model loading: the second ``load_llm`` call in a process, and the time spent in
      ``load_llm`` during a second real ``nbcustom.finetune`` (``--max-steps 1``) and a
      ``nbcustom.predict`` after it (``models.LOADS`` stays at 1).
  (b) the first load in a new process, after the one-time GGUF conversion, takes under 5 s,
      Python imports excluded (torch, transformers and nbcustom are imported, and timed,
      before the clock starts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- children: each runs in a fresh process and prints one JSON line ------------------------
def _imports() -> float:
    started = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import nbcustom  # noqa: F401
    from nbcustom import models  # noqa: F401

    return time.perf_counter() - started


def child_nbcustom(path: str) -> dict:
    imports = _imports()
    from nbcustom import models

    times, objects = [], []
    for _ in range(2):
        started = time.perf_counter()
        objects.append(models.load_llm(models.resolve_llm(None)))
        times.append(time.perf_counter() - started)
    assert str(models.resolve_llm(None)) == path
    return {"imports": imports, "first": times[0], "second": times[1], "loads": models.LOADS["count"],
            "same": objects[0][0] is objects[1][0] and objects[0][1] is objects[1][1]}


def child_plain(path: str) -> dict:
    imports = _imports()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    times = []
    for _ in range(2):
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        times.append(time.perf_counter() - started)
    del tokenizer, model
    return {"imports": imports, "first": times[0], "second": times[1]}


def child_finetune(path: str) -> dict:
    """Two real ``nbcustom.finetune`` runs (the second continues the first) and a
    ``nbcustom.predict``, timing what each spends in ``load_llm`` and the LLM tokenizer load."""
    import random
    import tempfile

    imports = _imports()
    import pandas as pd

    import nbcustom
    from nbcustom import models
    from nbcustom.engines.llm import train as llm

    spent = {"load": 0.0}

    def timed(function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent["load"] += time.perf_counter() - started
        return wrapper

    models.load_llm = timed(models.load_llm)
    llm._tokenizer = timed(llm._tokenizer)
    rng = random.Random(0)
    colours, things = ["red", "blue", "green", "black"], ["lamp", "mug", "chair", "kettle", "scarf"]
    rows = []
    for i in range(12):
        thing, colour, price = rng.choice(things), rng.choice(colours), rng.randint(5, 99)
        rows.append({"prompt": f"The {colour} {thing} number {i} sells for {price} dollars.", "response": f"{thing} | ${price} | {colour}"})
    frame = pd.DataFrame(rows)
    options = {"max_steps": 1, "eval_frac": 0.25, "max_new_tokens": 8}
    runs = []
    with tempfile.TemporaryDirectory() as store:
        for label, call in (
            ("finetune v1", lambda: nbcustom.finetune("reuse", frame, store=store, ui="none", **options)),
            ("finetune v2", lambda: nbcustom.finetune("reuse", frame, store=store, ui="none", **options)),
            ("predict", lambda: nbcustom.predict("reuse", frame.head(2), store=store, max_new_tokens=8)),
        ):
            spent["load"], started = 0.0, time.perf_counter()
            call()
            runs.append({"run": label, "seconds": time.perf_counter() - started, "loading": spent["load"], "loads": models.LOADS["count"]})
    return {"imports": imports, "runs": runs}


CHILDREN = {"nbcustom": child_nbcustom, "plain": child_plain, "finetune": child_finetune}


def run_child(kind: str, path: str, timeout: int = 600) -> dict:
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--path", path], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the parent ----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="fresh-process pairs (nbcustom, plain); medians count")
    parser.add_argument("--no-finetune", action="store_true", help="skip the two real nbcustom.finetune runs")
    parser.add_argument("--fresh-cache", action="store_true", help="convert the GGUF again into a temporary cache (timed)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ.update(ENV)
        print(json.dumps(CHILDREN[args.child](args.path)))
        return

    import statistics
    import tempfile

    os.environ.update(ENV)
    if args.fresh_cache:
        scratch = tempfile.TemporaryDirectory()
        os.environ["NBCUSTOM_CACHE"] = scratch.name  # the children inherit it
    from nbcustom import models

    converted = (models.cache_dir() / "models" / models.DEFAULT_LLM / "config.json").exists()
    started = time.perf_counter()
    path = str(models.resolve_llm(None))
    resolve_s = time.perf_counter() - started
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"base model: {path} ({'converted earlier' if converted else f'one-time GGUF conversion just now into a fresh cache: {resolve_s:.1f}s, torch and transformers imports included'})")

    rows = {"nbcustom": [], "plain": []}
    for run in range(args.repeat):
        order = ("nbcustom", "plain") if run % 2 == 0 else ("plain", "nbcustom")
        for kind in order:
            rows[kind].append(run_child(kind, path))
        n, p = rows["nbcustom"][-1], rows["plain"][-1]
        print(
            f"run {run + 1} (fresh processes): imports {n['imports']:.1f}s / {p['imports']:.1f}s | "
            f"first load: nbcustom load_llm {n['first']:.2f}s, plain from_pretrained {p['first']:.2f}s | "
            f"second load: nbcustom {n['second'] * 1000:.3f} ms (same objects: {n['same']}, disk loads {n['loads']}), "
            f"plain {p['second']:.2f}s"
        )
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("first", "second")} for k, v in rows.items()}
    ok_first = med["nbcustom"]["first"] < 5.0
    ok_second = med["nbcustom"]["second"] < 1.0 and all(r["loads"] == 1 and r["same"] for r in rows["nbcustom"])
    print(f"first load in a new process (imports excluded): nbcustom {med['nbcustom']['first']:.2f}s, plain "
          f"{med['plain']['first']:.2f}s, ratio {med['nbcustom']['first'] / med['plain']['first']:.2f}x (target < 5 s): "
          f"{'PASS' if ok_first else 'FAIL'}")
    print(f"second load in the same process: nbcustom {med['nbcustom']['second'] * 1000:.3f} ms, plain "
          f"{med['plain']['second']:.2f}s (target < 1 s): {'PASS' if ok_second else 'FAIL'}")

    ok_runs = True
    if not args.no_finetune:
        started = time.perf_counter()
        try:
            result = run_child("finetune", path)
        except Exception as e:  # the LLM engine is being worked on; report, do not hide the rest
            ok_runs = False
            print(f"finetune runs: FAILED to run ({str(e).splitlines()[0]}; see stderr)")
            print(str(e), file=sys.stderr)
        else:
            for r in result["runs"]:
                print(f"  {r['run']:<12} {r['seconds']:6.1f}s, of which base model + tokenizer loading {r['loading']:6.3f}s "
                      f"({r['loading'] / r['seconds']:.1%}); base-model disk loads so far {r['loads']}")
            later = result["runs"][1:]
            ok_runs = all(r["loading"] < 1.0 and r["loads"] == 1 for r in later)
            print(f"second finetune and predict in one process (child {time.perf_counter() - started:.0f}s): loading "
                  f"{', '.join('%.3fs' % r['loading'] for r in later)}, one disk load (target < 1 s): {'PASS' if ok_runs else 'FAIL'}")
    print("summary: " + ", ".join([
        f"first load {'PASS' if ok_first else 'FAIL'}", f"second load {'PASS' if ok_second else 'FAIL'}",
        *([] if args.no_finetune else [f"second finetune/predict {'PASS' if ok_runs else 'FAIL'}"]),
    ]) + f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
