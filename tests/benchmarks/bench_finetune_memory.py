"""Peak memory of a CPU ``%%finetune`` of SmolLM2-135M: the magic run in a fresh IPython
shell process on ragged data (20-400 tokens per example) with the default options (8
examples per step, --max-length 512), against the plain transformers ``Trainer`` + peft
script on the same examples; each process's peak RSS (``ru_maxrss``).

    .venv/bin/python tests/benchmarks/bench_finetune_memory.py [--steps 4]

Target (issue 7): under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_finetune_cpu as cpu  # noqa: E402

LIMIT_GB = 4.0


def child(which: str, steps: int) -> None:
    from nbcustom import models

    frame = cpu.rows("ragged", 120)
    with models.quiet():
        if which == "trainer":
            cpu.run_trainer(frame, steps, 8)
        else:
            finetune_magic(frame, steps)
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def finetune_magic(frame, steps: int) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from nbcustom import Store

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbcustom")
    with tempfile.TemporaryDirectory() as store:
        shell.run_line_magic("config", f"NbCustom.store = {store!r}")
        shell.run_line_magic("config", "NbCustom.ui = 'text'")
        shell.user_ns["examples"] = frame
        shell.run_cell_magic("finetune", f'mem --max-steps {steps} --max-new-tokens 16 --system "{cpu.SYSTEM}"', "SELECT * FROM examples")
        if Store(store).get("mem").version != 1:
            raise SystemExit("the %%finetune cell made no version")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", choices=("nbcustom", "trainer"))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    peaks = {}
    for which in ("trainer", "nbcustom"):
        out = subprocess.run([sys.executable, __file__, "--child", which, "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{which} failed:\n{out.stderr[-3000:]}")
        peaks[which] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    print(f"{args.steps} steps of 8 ragged examples (20-400 tokens), --max-length 512, CPU, %%finetune --precision auto (Trainer float32), SmolLM2-135M-Instruct")
    print(f"peak RSS: %%finetune {peaks['nbcustom']:.2f} GB | Trainer + peft script {peaks['trainer']:.2f} GB")
    ok = peaks["nbcustom"] < LIMIT_GB
    print(f"%%finetune peak RSS under {LIMIT_GB:.0f} GB: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
