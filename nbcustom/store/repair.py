"""Bringing the catalog and the folders together: after a crash (``sweep``, run by every
write under the store lock) and on request (``examine``, behind ``check``).

The rules, the same for both, follow from "the folders are the truth":
- a version folder with a valid manifest and no catalog row was committed by a process
  that died before recording it: it is recorded (rolled forward); one that does not verify
  is moved to ``.trash/`` (kept, never deleted by the store);
- a removal that was started is finished (its intent lies in ``.staging``);
- an update keeps whichever complete folder holds the version's name, and the catalog's
  metrics are set from its manifest;
- ``.active/NAME`` is set to the catalog's active version;
- a version whose files fail their checksums is reported, never deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import catalog_db as db
from .files import exchange, fsync_dir
from .layout import ACTIVE, TRASH, read_active, read_manifest, verify, version_folders, write_active
from .staging import FOLDER, Work, leftovers


@dataclass
class Finding:
    """One thing ``check`` found: ``problem``, ``what`` it is about (``NAME@V``, a model or
    a path in the store), ``detail``, and ``repaired``: what a repair did, else None."""

    problem: str
    what: str
    detail: str
    repaired: str | None = None
    quiet: bool = field(default=False, repr=False)  # routine cleanup a write does without a word (check still lists it)

    def line(self) -> str:
        return f"{self.what}: {self.problem}: {self.detail}" + (f" -> {self.repaired}" if self.repaired else "")


def sweep(con, root: Path) -> list[Finding]:
    """Finish or undo the work of processes that died, record orphan version folders and
    set every ``.active/NAME``. Runs at the start of every write, under the store lock."""
    works = leftovers(root)
    try:
        findings, activate = [], {}
        for work in works:
            findings.append(_finish(con, root, work))
            intent = work.intent
            if intent.get("op") == "build" and "version" in intent:
                activate[(intent.get("name"), intent["version"])] = bool(intent.get("activate", True))
        findings += orphans(con, root, adopt=True, activate=activate)
        findings += active_files(con, root, repair=True)
    except BaseException:
        for work in works:
            work.release()  # left for the next sweep: every step here can be done again
        raise
    for work in works:
        work.end()
    return findings


def examine(con, root: Path, name: str | None = None, repair: bool = False) -> list[Finding]:
    """Every version of the catalog against its folder (checksums, kind, metrics), every
    version folder against the catalog, every ``.active/NAME``; with ``repair``, fixed."""
    where, params = ("WHERE name = ?", [name]) if name else ("", [])
    findings = []
    for model, version, kind, metrics in con.execute(f"SELECT name, version, kind, metrics FROM versions {where} ORDER BY ALL", params).fetchall():
        ref, folder = f"{model}@{version}", root / model / f"v{version}"
        if not folder.is_dir():
            finding = Finding("missing folder", ref, f"the catalog lists {ref} but its folder {model}/v{version} is gone")
            if repair:
                delete_rows(con, root, model, [version])
                finding.repaired = "removed its catalog row"
            findings.append(finding)
            continue
        manifest = read_manifest(folder)
        problem = "manifest.json is missing or unreadable" if manifest is None else verify(folder, manifest)
        if problem:
            findings.append(Finding("bad version", ref, f"{problem}: the version is refused; retrain it or remove it with %nbc rm {ref}"))
            continue
        differs = [column for column, ours, theirs in (("kind", kind, manifest.get("kind")), ("metrics", _json(metrics), _json(manifest.get("metrics", {})))) if ours != theirs]
        if differs:
            finding = Finding("manifest mismatch", ref, f"the catalog's {' and '.join(differs)} differ from manifest.json")
            if repair:
                sync_version(con, model, version, manifest)
                finding.repaired = "set the catalog's row from the manifest"
            findings.append(finding)
    findings += orphans(con, root, adopt=repair, name=name)
    findings += active_files(con, root, repair=repair, name=name)
    return findings


def leftover_findings(root: Path) -> list[Finding]:
    """``.staging`` entries whose process is gone, described (nothing is changed)."""
    found = []
    for work in leftovers(root):
        found.append(Finding("staging leftover", f"{FOLDER}/{work.path.name}", _describe(work.intent)))
        work.release()
    return found


# --- the steps -------------------------------------------------------------------------------
def _finish(con, root: Path, work: Work) -> Finding:
    op = work.intent.get("op")
    # a dead build or an entry killed before its intent was written changed nothing: no word
    finding = Finding("staging leftover", f"{FOLDER}/{work.path.name}", _describe(work.intent), "deleted it", quiet=op not in ("remove", "update"))
    if op == "remove":
        finish_remove(con, root, work)
        finding.repaired = "finished the removal"
    elif op == "update":
        finish_update(con, root, work)
        finding.repaired = "kept the complete folder now at the version's place and recorded its manifest"
    return finding


def finish_remove(con, root: Path, work: Work) -> None:
    """Remove ``work.intent``'s versions: catalog rows first, then the folders (moved into
    the staging entry, deleted with it). Safe to run again after a kill at any step."""
    name, versions = work.intent["name"], work.intent["versions"]
    work.path.mkdir(exist_ok=True)  # its process may have died before making it
    active = delete_rows(con, root, name, versions)
    if active is None:  # no version left: the whole model goes
        if (root / name).exists():
            os.rename(root / name, work.path / name)
    else:
        for version in versions:
            if (root / name / f"v{version}").exists():
                os.rename(root / name / f"v{version}", work.path / f"v{version}")
        fsync_dir(root / name)
    fsync_dir(root)
    fsync_dir(work.path)


def delete_rows(con, root: Path, name: str, versions: list[int]) -> int | None:
    """Delete versions' rows; the newest remaining becomes active if the active one went.
    Returns the active version, None if the model has no version left (its row is deleted)."""
    con.execute("BEGIN TRANSACTION")
    for version in versions:
        con.execute("DELETE FROM versions WHERE name = ? AND version = ?", [name, version])
    newest = con.execute("SELECT max(version) FROM versions WHERE name = ?", [name]).fetchone()[0]
    if newest is None:
        con.execute("DELETE FROM models WHERE name = ?", [name])
    else:
        con.execute("UPDATE models SET active = ?, updated = ? WHERE name = ? AND active NOT IN (SELECT version FROM versions WHERE name = ?)",
                    [newest, _dt.datetime.now(), name, name])
    con.execute("COMMIT")
    active = None if newest is None else con.execute("SELECT active FROM models WHERE name = ?", [name]).fetchone()[0]
    write_active(root, name, active)
    return active


def swap(new: Path, target: Path, old: Path) -> None:
    """Put the complete folder ``new`` at ``target`` (the old one ends up at ``new`` or
    ``old``). One atomic exchange where the system has it; else two renames, and a kill
    between them leaves ``target`` missing, which ``finish_update`` puts right."""
    if not exchange(new, target):
        os.rename(target, old)
        os.rename(new, target)
    fsync_dir(target.parent)
    fsync_dir(new.parent)


def finish_update(con, root: Path, work: Work) -> None:
    """After a kill during an update: the new copy is complete before the old folder is
    moved out, so a missing version folder is the new copy's place; then the catalog row
    is set from whichever manifest the version's folder holds."""
    name, version = work.intent["name"], work.intent["version"]
    target = root / name / f"v{version}"
    if not target.exists():
        for part in ("new", "old"):
            if (work.path / part).is_dir():
                os.rename(work.path / part, target)
                fsync_dir(target.parent)
                break
    manifest = read_manifest(target)
    if manifest is not None:
        sync_version(con, name, version, manifest)


def sync_version(con, name: str, version: int, manifest: dict) -> None:
    con.execute("UPDATE versions SET kind = ?, metrics = ? WHERE name = ? AND version = ?",
                [manifest.get("kind"), json.dumps(manifest.get("metrics", {}), default=str), name, version])


def orphans(con, root: Path, adopt: bool, activate: dict | None = None, name: str | None = None) -> list[Finding]:
    """Version folders the catalog does not list; with ``adopt`` each is recorded if it
    verifies (active if its build meant it to be: ``activate[(name, version)]``), else moved
    to ``.trash/``."""
    known = set(con.execute("SELECT name, version FROM versions").fetchall())
    kinds = dict(con.execute("SELECT name, kind FROM models").fetchall())
    findings = []
    for model, numbers in version_folders(root, name).items():
        for version, folder in numbers.items():
            if (model, version) in known:
                continue
            ref = f"{model}@{version}"
            manifest = read_manifest(folder)
            problem = _not_a_version(folder, manifest, model, version, kinds.get(model))
            finding = Finding("orphan folder", ref, f"the catalog does not list {model}/v{version}: "
                              + (problem if problem else "a complete version whose commit stopped before recording it"))
            if adopt and problem:
                trash = root / TRASH / f"{model}-v{version}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
                trash.parent.mkdir(exist_ok=True)
                os.rename(folder, trash)
                fsync_dir(folder.parent)
                fsync_dir(trash.parent)
                finding.repaired = f"moved it to {TRASH}/{trash.name}"
            elif adopt:
                first = model not in kinds
                active = first or (activate or {}).get((model, version), False)
                con.execute("BEGIN TRANSACTION")
                db.record_version(con, manifest, activate=active)
                con.execute("COMMIT")
                kinds[model] = manifest["kind"]
                if active:
                    write_active(root, model, version)
                finding.repaired = "recorded it in the catalog" + (" as the active version" if active else "")
            findings.append(finding)
    return findings


def active_files(con, root: Path, repair: bool, name: str | None = None) -> list[Finding]:
    """``.active/NAME`` against the catalog's active version (the catalog wins)."""
    where, params = ("WHERE name = ?", [name]) if name else ("", [])
    findings = []
    for model, active in con.execute(f"SELECT name, active FROM models {where} ORDER BY name", params).fetchall():
        on_disk = read_active(root, model)
        if on_disk == active or active is None or not (root / model).is_dir():
            continue
        finding = Finding("active not on disk", model, f".active/{model} says {on_disk or 'nothing'}, the catalog v{active}", quiet=True)
        if repair:
            write_active(root, model, active)
            finding.repaired = f"wrote .active/{model}"
        findings.append(finding)
    if repair and name is None and (root / ACTIVE).is_dir():
        models = {model for (model,) in con.execute("SELECT name FROM models").fetchall()}
        for stale in (root / ACTIVE).iterdir():  # a removed model's, or a write cut short (.NAME.tmp)
            if stale.name not in models:
                stale.unlink()
    return findings


def _not_a_version(folder: Path, manifest: dict | None, name: str, version: int, kind: str | None) -> str | None:
    if manifest is None or manifest.get("name") != name or manifest.get("version") != version or "kind" not in manifest:
        return f"no manifest.json of {name}@{version}"
    if kind is not None and manifest["kind"] != kind:
        return f"a {manifest['kind']} version of a {kind} model"
    problem = verify(folder, manifest)
    return f"{problem}" if problem else None


def _describe(intent: dict) -> str:
    name, op = intent.get("name"), intent.get("op")
    if op == "build":
        return f"a version of {name} being built by a process that died"
    if op == "update":
        return f"an update of {name}@{intent.get('version')} by a process that died"
    if op == "remove":
        return f"a removal of {name}@{','.join(map(str, intent.get('versions', [])))} by a process that died"
    return "work of a process that died"


def _json(value) -> object:
    """JSON text or an object -> the same plain object, so the two compare equal."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.loads(json.dumps(value, default=str))
