"""A real browser: JupyterLab headless on localhost, Debian's Chromium driven by Playwright.

Runs a %%retrain cell and checks that the live progress widget and the before/after table
render in the page. `.ci/run` installs Chromium and sets NBCUSTOM_BROWSER_TEST=1, which
turns a missing browser into a failure instead of a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("NBCUSTOM_BROWSER_TEST") == "1"
pytestmark = pytest.mark.slow

CELLS = [
    "%load_ext nbcustom",
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    "houses = pd.DataFrame({'rooms': rng.integers(1, 6, 300), 'area': rng.normal(80, 20, 300)})\n"
    "houses['price'] = 50 * houses.rooms + 2 * houses.area + rng.normal(0, 10, 300)",
    "%%retrain prices --target price --time-limit 15\nSELECT * FROM houses",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    if not Path(CHROMIUM).exists():
        if REQUIRED:
            pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "demo.ipynb")
    port, token = _free_port(), "nbcustom-test"
    env = {**os.environ, "NBCUSTOM_STORE": str(tmp_path / "store"), "NBCUSTOM_UI": "auto", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
         "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True"],
        env=env, stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    yield f"{url}/lab/tree/demo.ipynb?token={token}", tmp_path
    server.terminate()
    server.wait(30)


def test_widget_and_summary_render_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, folder = lab
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(folder / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"],
        )
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)  # kernel ready
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            # The live panel: an ipywidgets progress bar rendered by the widget manager.
            page.wait_for_selector(".jp-OutputArea-output .widget-hprogress .progress-bar", timeout=120_000)
            page.wait_for_selector(".jp-OutputArea-output table.nbc-metrics", timeout=240_000)
        except Exception:
            page.screenshot(path=str(folder / "failed.png"), full_page=True)
            shutil.copy(folder / "failed.png", Path(os.environ.get("NBCUSTOM_TEST_OUTPUT", folder.parent)) / "failed.png")
            raise
        page.screenshot(path=str(folder / "jupyterlab.png"), full_page=True)
        shutil.copy(folder / "jupyterlab.png", Path(os.environ.get("NBCUSTOM_TEST_OUTPUT", folder.parent)) / "jupyterlab.png")
        metrics = page.locator(".jp-OutputArea-output table.nbc-metrics").first.inner_text()
        widget_tabs = page.locator(".jp-OutputArea-output .jupyter-widgets .lm-TabBar-tab").count()
        browser.close()
    assert metrics.startswith("metric") and "delta" in metrics and "r2" in metrics
    assert widget_tabs >= 1  # the panel's before/after tabs rendered too
    assert json.loads((folder / "store" / "prices" / "v1" / "manifest.json").read_text())["version"] == 1
