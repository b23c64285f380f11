"""The front page and the documentation: README.md stays short and links to every docs
page, and the MkDocs site builds in strict mode (every link between pages resolves)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_readme_is_a_short_front_page_linking_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    quickstart = [line for line in readme.splitlines() if re.match(r"#+ .*Quickstart", line)]
    assert quickstart and "make demo" in quickstart[0] and "make test" in quickstart[0]
    assert "make test-quick" in readme
    index = (ROOT / "docs" / "index.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages
    unlinked = [name for name in pages if f"docs/{name}" not in readme and f"({name}" not in index]
    assert not unlinked, f"docs pages linked from neither README.md nor docs/index.md: {unlinked}"
