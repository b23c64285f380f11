"""A real browser: JupyterLab headless on localhost, Debian's Chromium driven by Playwright.

Runs a %%retrain, a %%rag build and a %%rag --eval, and counts what the page shows: the live
progress widget while a run goes, then each cell's result once (one summary, one before/after
table where the run has one, no empty or twice-named tab), and the saved .ipynb holds each
magic's static HTML + PNG. `.ci/run` installs Chromium and sets NBCUSTOM_BROWSER_TEST=1,
which turns a missing browser into a failure instead of a skip.
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

from rag_facts import FACTS, QUESTIONS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("NBCUSTOM_BROWSER_TEST") == "1"
pytestmark = pytest.mark.slow

CELLS = [
    "%load_ext nbcustom",
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    "houses = pd.DataFrame({'rooms': rng.integers(1, 6, 300), 'area': rng.normal(80, 20, 300)})\n"
    "houses['price'] = 50 * houses.rooms + 2 * houses.area + rng.normal(0, 10, 300)\n"
    f"facts = pd.DataFrame({FACTS[:10]!r}, columns=['id', 'fact', 'topic'])\n"
    f"questions = pd.DataFrame({QUESTIONS[:2]!r}, columns=['question', 'answer', 'source_id'])",
    "%%retrain prices --target price --time-limit 15\nSELECT * FROM houses",
    "%%rag facts --metadata topic --top-k 2 --max-new-tokens 16\nSELECT * FROM facts",
    "%%rag facts --eval\nSELECT * FROM questions",
]
MAGICS = {2: "retrain", 3: "rag build", 4: "rag eval"}  # cell index -> what it runs
METRIC_TABLES = {2: 1, 3: 0, 4: 1}  # a build reports counts, it has no before/after

# what the page shows in each cell's output area: summaries, metric tables, widgets, tabs
COUNT = """cell => {
  const out = cell.querySelector('.jp-OutputArea');
  const tabs = [...out.querySelectorAll('.lm-TabBar-tab')].map(t => t.innerText.trim());
  const panels = [...out.querySelectorAll('.lm-TabPanel-stackedPanel > .lm-Widget, .widget-tab-contents > .lm-Widget')];
  return {summaries: out.querySelectorAll('.nbc-summary').length,
          metrics: out.querySelectorAll('table.nbc-metrics').length,
          widgets: out.querySelectorAll('.jupyter-widgets').length,
          tabs: tabs, empty_panels: panels.filter(p => !p.innerText.trim() && !p.querySelector('img')).length};
}"""


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
    # every cell stays in the page (no windowed rendering), so the counts see them all
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), "nbcustom-test"
    env = {**os.environ, "NBCUSTOM_STORE": str(tmp_path / "store"), "NBCUSTOM_UI": "auto", "HF_HUB_OFFLINE": "1", "NBCUSTOM_WORKER": "on"}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
         "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True",
         f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
        env=env, stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # minutes on a busy machine
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    yield f"{url}/lab/tree/demo.ipynb?token={token}", tmp_path
    server.terminate()
    server.wait(30)


def _keep(folder: Path, name: str) -> None:
    """Copy a screenshot where a person can look at it (NBCUSTOM_TEST_OUTPUT or the tmp root)."""
    shutil.copy(folder / name, Path(os.environ.get("NBCUSTOM_TEST_OUTPUT", folder.parent)) / name)


def test_each_result_shows_once_in_jupyterlab_and_the_saved_notebook_keeps_it(lab):
    from playwright.sync_api import sync_playwright

    url, folder = lab
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(folder / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 2000},
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"],
        )
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=600_000)
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=600_000)  # kernel ready
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            # The live panel: an ipywidgets progress bar rendered by the widget manager. Its
            # track, not the filled part: a bar at 0 (AutoGluon's runs have no step total) has
            # zero width, and Playwright counts a zero-size element as hidden.
            page.wait_for_selector(".jp-OutputArea-output .widget-hprogress", timeout=600_000)
            page.wait_for_function("document.querySelectorAll('.jp-OutputArea-output .nbc-summary').length >= 3", timeout=900_000)
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=600_000)
        except Exception:
            page.screenshot(path=str(folder / "failed.png"))
            _keep(folder, "failed.png")
            raise
        cells = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell")
        shown = {i: cells.nth(i).evaluate(COUNT) for i in MAGICS}
        for i, magic in MAGICS.items():
            cells.nth(i).screenshot(path=str(folder / f"jupyterlab-{magic.replace(' ', '-')}.png"))
            _keep(folder, f"jupyterlab-{magic.replace(' ', '-')}.png")
        metrics = cells.nth(2).locator("table.nbc-metrics").inner_text()
        page.locator(".jp-Notebook").click()
        page.keyboard.press("Escape")
        page.keyboard.press("Control+s")
        for _ in range(300):  # the save reaches the disk (an autosave during the run held the live panel)
            saved = nbformat.read(folder / "demo.ipynb", as_version=4)
            outputs = [saved.cells[i].outputs for i in MAGICS]
            if all(outputs) and all("text/html" in out.get("data", {}) for cell in outputs for out in cell):
                break
            time.sleep(0.5)
        browser.close()

    for i, magic in MAGICS.items():
        counts = shown[i]
        assert counts["summaries"] == 1, (magic, counts)  # the result once, not panel + summary
        assert counts["metrics"] == METRIC_TABLES[i], (magic, counts)
        assert counts["widgets"] == 0, (magic, counts)  # the live panel gave way to the summary
        assert all(counts["tabs"]) and len(set(counts["tabs"])) == len(counts["tabs"]) and not counts["empty_panels"], (magic, counts)
        mimes = {mime for out in saved.cells[i].outputs for mime in out.get("data", {})}
        assert {"text/html", "image/png", "text/plain"} <= mimes, (magic, mimes)
    assert metrics.startswith("metric") and "delta" in metrics and "r2" in metrics
    assert json.loads((folder / "store" / "prices" / "v1" / "manifest.json").read_text())["version"] == 1
