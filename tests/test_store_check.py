"""`%nbc check`, `nbcustom check` and `nbcustom.check`: what each finds, what --repair does."""

import json
import os
import shutil
import subprocess
import sys

import duckdb
import pandas as pd

import nbcustom
from conftest import snapshot
from nbcustom.store import Store
from test_store import save


def _cli(store_dir, *args):
    env = {**os.environ, "NBCUSTOM_STORE": str(store_dir)}
    return subprocess.run([sys.executable, "-m", "nbcustom.cli", "check", *args], capture_output=True, text=True, env=env)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _damage(store_dir) -> Store:
    """m@1 with a flipped byte, n@2 an orphan folder (its commit 'stopped before the catalog'),
    a staging leftover of a dead build, and m@3 (the active one) a row whose folder is gone."""
    store = Store(store_dir)
    for _ in range(3):
        save(store, "m")
    save(store, "n")
    save(store, "n")
    _flip_a_byte(store_dir / "m" / "v1" / "model" / "weights.bin")
    con = duckdb.connect(str(store_dir / "catalog.duckdb"))
    con.execute("DELETE FROM versions WHERE name = 'n' AND version = 2")
    con.execute("UPDATE models SET active = 1 WHERE name = 'n'")
    con.close()
    (store_dir / ".active" / "n").write_text("1\n")
    leftover = store_dir / ".staging" / "build-m-99999-0123456789"
    (leftover / "model").mkdir(parents=True)
    (leftover / "model" / "half.bin").write_bytes(b"half")
    leftover.with_name(leftover.name + ".lock").write_text(json.dumps({"op": "build", "name": "m", "pid": 99999}))
    shutil.rmtree(store_dir / "m" / "v3")
    return store


def test_check_finds_each_problem_and_changes_nothing(ip, store_dir):
    store = _damage(store_dir)
    before = snapshot(store_dir)
    table = ip.run_line_magic("nbc", "check")
    assert isinstance(table, pd.DataFrame)
    found = dict(zip(table["what"], table["problem"]))
    assert found == {"m@1": "bad version", "n@2": "orphan folder", ".staging/build-m-99999-0123456789": "staging leftover", "m@3": "missing folder"}
    assert table["repaired"].isna().all()
    assert "model/weights.bin failed its sha256 checksum" in table.set_index("what").loc["m@1", "detail"]
    out = _cli(store_dir)
    assert out.returncode == 1, out.stderr
    assert "m@1: bad version: file model/weights.bin failed its sha256 checksum" in out.stdout
    assert "m@3: missing folder" in out.stdout and "n@2: orphan folder" in out.stdout and "staging leftover" in out.stdout
    assert snapshot(store_dir) == before  # check without --repair writes nothing
    assert [f.what for f in nbcustom.check("n", store=store)] == [".staging/build-m-99999-0123456789", "n@2"]


def test_repair_fixes_all_but_a_bad_checksum_and_says_what_it_did(store_dir):
    store = _damage(store_dir)
    out = _cli(store_dir, "--repair")
    lines = out.stdout.splitlines()
    assert out.returncode == 1, out.stdout + out.stderr  # m@1 is still wrong: reported, not deleted
    assert any(line.startswith(".staging/build-m-99999-0123456789: staging leftover") and line.endswith("-> deleted it") for line in lines), lines
    assert any(line.startswith("n@2: orphan folder") and line.endswith("-> recorded it in the catalog") for line in lines), lines
    assert any(line.startswith("m@3: missing folder") and line.endswith("-> removed its catalog row") for line in lines), lines
    assert any(line.startswith("m@1: bad version") and "->" not in line for line in lines), lines
    assert not (store_dir / ".staging").exists()
    assert [r["version"] for r in store.versions("m")] == [1, 2] and store.active_version("m") == 2
    assert [r["version"] for r in store.versions("n")] == [1, 2] and store.active_version("n") == 1
    assert (store_dir / "m" / "v1").exists()
    _flip_a_byte(store_dir / "m" / "v1" / "model" / "weights.bin")  # flipped back
    out = _cli(store_dir)
    assert out.returncode == 0 and out.stdout.strip() == f"no problems in {store_dir}: 4 versions, every checksum verified", out.stdout


def test_repair_from_the_notebook_and_the_api(ip, store_dir, capsys):
    store = Store(store_dir)
    save(store, "m")
    save(store, "m")
    shutil.rmtree(store_dir / "m" / "v2")
    con = duckdb.connect(str(store_dir / "catalog.duckdb"))
    con.execute("""UPDATE versions SET metrics = '{"after": {"acc": 0.1}}' WHERE version = 1""")
    con.close()
    table = ip.run_line_magic("nbc", "check m --repair")
    assert list(table["problem"]) == ["manifest mismatch", "missing folder"]
    assert list(table["repaired"]) == ["set the catalog's row from the manifest", "removed its catalog row"]
    assert store.versions("m")[0]["metrics"]["after"] == {"acc": 0.75}
    assert nbcustom.check(store=store_dir) == []
    ip.run_line_magic("nbc", "check")
    assert capsys.readouterr().out.strip() == f"no problems in {store_dir}: 1 version, every checksum verified"
    assert _cli(store_dir, "--repair").returncode == 0


def test_a_clean_repair_exits_zero(store_dir):
    store = Store(store_dir)
    save(store, "m")
    shutil.rmtree(store_dir / "m" / "v1")
    save(store, "n")
    out = _cli(store_dir, "--repair")
    assert out.returncode == 0 and out.stdout.startswith("m@1: missing folder"), out.stdout + out.stderr
    assert store.models()[0]["name"] == "n" and len(store.models()) == 1
    assert _cli(store_dir).returncode == 0


def test_check_reports_a_broken_catalog_and_repair_rebuilds_it(store_dir):
    store = Store(store_dir)
    save(store, "m")
    save(store, "m")
    (store_dir / "catalog.duckdb").write_bytes(b"not a catalog")
    out = _cli(store_dir)
    assert out.returncode == 1 and out.stdout.startswith("catalog.duckdb: broken catalog: does not open ("), out.stdout
    assert (store_dir / "catalog.duckdb").read_bytes() == b"not a catalog"  # check alone changes nothing
    out = _cli(store_dir, "--repair")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-> moved it aside as catalog.duckdb.broken-" in out.stdout and "rebuilt it from the version folders: 1 models, 2 versions" in out.stdout
    assert [r["version"] for r in store.versions("m")] == [1, 2] and _cli(store_dir).returncode == 0
