"""Loading the extension: registered magics, traitlets config, no heavy imports."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "autogluon", "peft", "llama_index", "mlflow")


@pytest.mark.serial  # a time limit: alone, after the rest (`make test`)
def test_load_ext_imports_nothing_heavy_and_is_fast():
    code = """
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
t = time.perf_counter()
ip.run_line_magic("load_ext", "nbcustom")
elapsed = time.perf_counter() - t
print(json.dumps({"elapsed": elapsed, "modules": sorted(m.split(".")[0] for m in sys.modules),
                  "cells": sorted(ip.magics_manager.magics["cell"]), "lines": sorted(ip.magics_manager.magics["line"])}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not set(HEAVY) & set(out["modules"])
    assert out["elapsed"] < 1.0
    assert {"finetune", "retrain", "rag", "predict"} <= set(out["cells"])
    assert "nbc" in out["lines"]


def test_config_traits(shell, tmp_path):
    shell.run_line_magic("config", f"NbCustom.store = {str(tmp_path / 's')!r}")
    magics = next(c for c in shell.configurables if type(c).__name__ == "NbCustom")
    assert magics.store == str(tmp_path / "s")
    shell.run_line_magic("config", "NbCustom.ui = 'static'")
    assert magics.ui == "static"


@pytest.mark.slow
def test_environment_sets_defaults(tmp_path):
    code = """
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "nbcustom")
m = next(c for c in ip.configurables if type(c).__name__ == "NbCustom")
print(m.store, m.ui)
"""
    env = {"NBCUSTOM_STORE": str(tmp_path / "elsewhere"), "NBCUSTOM_UI": "text", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == [str(tmp_path / "elsewhere"), "text"]
