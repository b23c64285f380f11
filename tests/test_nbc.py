"""%nbc and the nbcustom console command over the same store."""

import os
import subprocess
import sys

import pandas as pd

import nbcustom

from nbcustom.store import Store
from test_store import save


def test_nbc_commands_in_the_shell(ip, store_dir, capsys):
    store = Store(store_dir)
    save(store, metrics={"before": {"acc": 0.5}, "after": {"acc": 0.7}})
    save(store, metrics={"before": {"acc": 0.7}, "after": {"acc": 0.8}})
    listing = ip.run_line_magic("nbc", "list")
    assert isinstance(listing, pd.DataFrame) and listing.to_dict("records")[0]["versions"] == 2
    versions = ip.run_line_magic("nbc", "versions m")
    assert list(versions["version"]) == [1, 2] and list(versions["active"]) == [False, True]
    assert list(versions["acc"]) == [0.7, 0.8]
    ip.run_line_magic("nbc", "activate m 1")
    assert "version 1 is active" in capsys.readouterr().out
    assert store.active_version("m") == 1
    compare = ip.run_line_magic("nbc", "compare m 1 2")
    assert compare.set_index("metric").loc["acc", "delta"] == 0.8 - 0.7
    ip.run_line_magic("nbc", "rm m@2")
    assert [r["version"] for r in store.versions("m")] == [1]


def test_cli_list_show_versions(store_dir):
    save(Store(store_dir))
    env = {**os.environ, "NBCUSTOM_STORE": str(store_dir)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "nbcustom.cli", *args], capture_output=True, text=True, env=env)
    out = run("list")
    assert out.returncode == 0 and "automl" in out.stdout
    out = run("show", "m@1")
    assert out.returncode == 0 and out.stdout.startswith("m@1") and "acc" in out.stdout
    out = run("versions", "m")
    assert out.returncode == 0 and "ready" in out.stdout
    out = run("show", "m@7")
    assert out.returncode == 2 and out.stderr.strip() == "error: m has no version 7 (versions: 1); see %nbc versions m"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nbcustom.cli", *args], capture_output=True, text=True, env=env)


def test_cli_help_for_every_command_and_version():
    out = _cli("--help")
    assert out.returncode == 0 and "%nbc show" in out.stdout, out.stderr
    commands = out.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert {"list", "show", "predict", "jobs"} <= set(commands)
    for command in commands:
        out = _cli(command, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: nbcustom {command}"), (command, out.stderr)
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"nbcustom {nbcustom.__version__}"


def test_show_summarizes_the_model_folder_instead_of_listing_files(ip, store_dir, capsys):
    store = Store(store_dir)
    with store.build("m", "automl") as build:
        for i in range(30):
            (build.model_dir / f"part{i}.pkl").write_bytes(b"x" * 1000)
        build.manifest.update({"metrics": {"before": {"acc": 0.5}, "after": {"acc": 0.7}}})
    out = _cli("show", "m", env={**os.environ, "NBCUSTOM_STORE": str(store_dir)})
    assert out.returncode == 0 and f"30 files, 30 kB, in {store_dir / 'm' / 'v1'}" in out.stdout
    assert "part0.pkl" not in out.stdout
    ip.run_line_magic("nbc", "show m")  # the same summary in the notebook
    shown = capsys.readouterr().out
    assert "30 files, 30 kB" in shown and "part0.pkl" not in shown
