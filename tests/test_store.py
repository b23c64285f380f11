"""The versioned store: atomic builds, concurrent numbering, checksums, names, commands."""

import json
import multiprocessing as mp
from pathlib import Path

import duckdb
import pytest

from conftest import snapshot
from nbcustom import catalog
from nbcustom.errors import NbCustomError
from nbcustom.store import Store


def save(store: Store, name="m", payload=b"weights", metrics=None, kind="automl"):
    with store.build(name, kind) as build:
        (build.model_dir / "weights.bin").write_bytes(payload)
        build.manifest.update({"metrics": metrics or {"before": {"acc": 0.5}, "after": {"acc": 0.75}}, "counts": {"trained": 10}})
    return build.version


def _saver(root: str, count: int, tag: str) -> None:
    store = Store(root)
    for i in range(count):
        save(store, payload=f"{tag}-{i}".encode())


def test_concurrent_saves_get_distinct_consecutive_numbers(tmp_path):
    root = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_saver, args=(root, 12, tag)) for tag in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    store = Store(root)
    numbers = [row["version"] for row in store.versions("m")]
    assert numbers == list(range(1, 25))
    folders = sorted(int(p.name[1:]) for p in (Path(root) / "m").iterdir())
    assert folders == numbers
    payloads = {store.get("m", v).model_dir.joinpath("weights.bin").read_bytes() for v in numbers}
    assert len(payloads) == 24  # every save landed in its own version
    assert store.active_version("m") in numbers
    assert not (Path(root) / ".staging").exists()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_build_leaves_nothing(tmp_path, error):
    store = Store(tmp_path / "store")
    save(store)
    before = snapshot(store.root)
    with pytest.raises(type(error)):
        with store.build("m", "automl") as build:
            (build.model_dir / "half.bin").write_bytes(b"half")
            raise error
    assert snapshot(store.root) == before
    assert [r["version"] for r in store.versions("m")] == [1]
    assert not (store.root / ".staging").exists()


def test_failed_first_build_creates_no_store(tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        with store.build("m", "automl"):
            raise KeyboardInterrupt
    assert not store.root.exists()


def test_tampered_file_is_refused(tmp_path):
    store = Store(tmp_path / "store")
    save(store)
    (store.root / "m" / "v1" / "model" / "weights.bin").write_bytes(b"evil")
    with pytest.raises(NbCustomError, match=r"m@1: file model/weights.bin failed its sha256 checksum"):
        store.get("m")
    (store.root / "m" / "v1" / "model" / "weights.bin").unlink()
    with pytest.raises(NbCustomError, match="is missing"):
        store.get("m")


def test_manifest_lists_checksums_of_every_file(tmp_path):
    store = Store(tmp_path / "store")
    save(store)
    manifest = json.loads((store.root / "m" / "v1" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model/weights.bin"}
    assert manifest["version"] == 1 and manifest["kind"] == "automl"


@pytest.mark.parametrize("name", ["../x", "a/b", "", "1abc", "a b", "x;y"])
def test_bad_names_are_refused(tmp_path, name):
    store = Store(tmp_path / "store")
    with pytest.raises(NbCustomError, match="invalid model name"):
        with store.build(name, "automl"):
            pass
    assert not store.root.exists()


def test_activate_remove_compare(tmp_path):
    store = Store(tmp_path / "store")
    save(store, metrics={"before": {}, "after": {"acc": 0.7}})
    save(store, metrics={"before": {}, "after": {"acc": 0.9}})
    save(store, metrics={"before": {}, "after": {"acc": 0.8}})
    assert store.active_version("m") == 3
    catalog.command(store, "activate m 2")
    assert store.active_version("m") == 2
    table = catalog.command(store, "compare m 1 2")
    row = table.set_index("metric").loc["acc"]
    assert row["v1"] == 0.7 and row["v2"] == 0.9 and row["delta"] == pytest.approx(0.2)
    catalog.command(store, "rm m@2")
    assert [r["version"] for r in store.versions("m")] == [1, 3]
    assert store.active_version("m") == 3
    assert not (store.root / "m" / "v2").exists()
    assert save(store) == 4  # numbers are never reused
    catalog.command(store, "rm m")
    assert store.models() == [] and not (store.root / "m").exists()


def test_kind_of_a_name_is_fixed(tmp_path):
    store = Store(tmp_path / "store")
    save(store, kind="automl")
    with pytest.raises(NbCustomError, match="is a automl model"):
        save(store, kind="llm")


def test_catalog_matches_folders_after_commit(tmp_path):
    store = Store(tmp_path / "store")
    for _ in range(3):
        save(store)
    con = duckdb.connect(str(store.root / "catalog.duckdb"), read_only=True)
    versions = [r[0] for r in con.execute("SELECT version FROM versions WHERE name='m' ORDER BY 1").fetchall()]
    runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    con.close()
    assert versions == [1, 2, 3] and runs == 0


def test_update_rewrites_metrics_and_checksums(tmp_path):
    store = Store(tmp_path / "store")
    save(store)
    store.update("m", 1, metrics={"after": {"acc": 0.99}}, write=lambda folder: (folder / "eval.parquet").write_bytes(b"x"))
    v = store.get("m", 1)
    assert v.manifest["metrics"]["after"] == {"acc": 0.99}
    assert "eval.parquet" in v.manifest["files"]
    assert store.versions("m")[0]["metrics"]["after"] == {"acc": 0.99}
