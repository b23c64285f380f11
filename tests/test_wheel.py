"""The package as users get it: a wheel built from the source (not the editable checkout),
installed into a fresh virtualenv, runs ``%load_ext nbcustom`` and a ``%%retrain`` in a
notebook through nbclient, on a kernel of that virtualenv.

The heavy dependencies are not installed again: the new virtualenv reads this
environment's site-packages after its own (a ``.pth`` file), so the ``nbcustom`` it imports
is the wheel's, and everything else is what ``pip install nbcustom`` would have brought.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

import nbcustom

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CELLS = [
    "%load_ext nbcustom",
    "import sys, nbcustom\nprint(nbcustom.__file__)\nprint(sys.executable)",
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    "houses = pd.DataFrame({'rooms': rng.integers(1, 6, 120), 'area': rng.normal(80, 20, 120)})\n"
    "houses['price'] = 50 * houses.rooms + 2 * houses.area + rng.normal(0, 10, 120)",
    "%%retrain houses --target price --time-limit 5\nSELECT * FROM houses",
]
RUN = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[1])
"""


def test_built_wheel_in_a_fresh_venv_runs_a_notebook(tmp_path):
    # build from a copy, so the build leaves nothing in the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "examples", "tests", "binder", "build", "dist", "*.egg-info", "__pycache__", "nbcustom_store"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source], check=True)
    wheel = next((tmp_path / "dist").glob("nbcustom-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], check=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "reuse_dependencies.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "NBCUSTOM_WORKER")}
    env.update(NBCUSTOM_STORE=str(tmp_path / "store"), NBCUSTOM_UI="static", HF_HUB_OFFLINE="1")
    version = subprocess.run([venv / "bin" / "nbcustom", "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"nbcustom {nbcustom.__version__}", version.stderr

    notebook = tmp_path / "work" / "wheel.ipynb"
    notebook.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS]), notebook)
    run = subprocess.run([python, "-c", RUN, notebook, notebook.parent], capture_output=True, text=True, env=env, cwd=notebook.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    nb = nbformat.read(notebook, as_version=4)
    assert not [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    imported, executable = nb.cells[1].outputs[0]["text"].split()
    assert Path(imported) == Path(site) / "nbcustom" / "__init__.py"  # the wheel's, not the checkout's
    assert Path(executable) == python
    summary = [o for o in nb.cells[3].outputs if "image/png" in o.get("data", {})]
    assert summary and "houses -&gt; v1" in summary[-1]["data"]["text/html"]
    assert (tmp_path / "store" / "houses" / "v1" / "manifest.json").exists()
