"""The versioned artifact store: ``NAME/vN`` folders, indexed by ``catalog.duckdb``.

Every change reaches the folders before the catalog, and is announced in ``.staging``
before it starts, so a process killed at any moment leaves a store whose catalog names
only versions that load, and whose next write finishes or undoes what was cut short:
- commit: the version is built in ``.staging/ID/``; its files, manifest (written last) and
  folders are fsynced, it is renamed to ``NAME/vN``, then recorded in one transaction;
- remove: the intent is noted in ``.staging``, the rows are deleted, then the folders are
  moved into the staging entry and deleted;
- update: a copy of the version gets the new files and manifest, and is swapped in
  atomically; the committed files are never rewritten in place;
- every write, under the store lock, first sweeps ``.staging`` (``repair.sweep``).
Readers share the store lock and open the catalog read-only; writers hold it alone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import NbCustomError
from . import catalog_db as db
from . import layout
from .files import MANIFEST, checksums, fsync_dir, fsync_tree, lock_file, unlock_file
from .repair import Finding, examine, finish_remove, leftover_findings, swap, sweep, sync_version
from .staging import Work

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class ReadOnlyStore(NbCustomError):
    """The store cannot be written by this user (reading still works)."""


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else a one-line error."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise NbCustomError(
            f"invalid model name {name!r}: use letters, digits, _ and -, starting with a letter or _"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@V`` -> (name, version or None)."""
    name, _, version = ref.partition("@")
    return check_name(name), (parse_version(version) if version else None)


def parse_version(text: Any) -> int:
    """A version number from ``3``, ``"3"`` or ``"v3"``."""
    try:
        version = int(str(text).lstrip("vV"))
    except ValueError:
        version = 0
    if version < 1:
        raise NbCustomError(f"invalid version {text!r}: use a number such as 1 or v1")
    return version


@dataclass
class Version:
    """A committed, checksum-verified version: its folder and manifest."""

    name: str
    version: int
    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def __repr__(self) -> str:
        return f"Version({self.name}@{self.version}, kind={self.kind!r})"


@dataclass
class Build:
    """A version being built in a staging folder; committed by ``Store.build``."""

    name: str
    kind: str
    path: Path
    manifest: dict = field(default_factory=dict)
    version: int | None = None
    activate: bool = True
    # Called if the build fails: an engine undoing what it wrote outside the staging folder.
    on_abort: list = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        path = self.path / "model"
        path.mkdir(exist_ok=True)
        return path


QUIET_WAIT = 1.0  # seconds a process waits for the store lock before it says so
_told: set[Path] = set()  # stores whose unreadable catalog a read-only user was told about


class Store:
    """The artifact store at ``root`` (created on the first commit)."""

    def __init__(self, root: str | os.PathLike = "nbcustom_store"):
        self.root = Path(root).expanduser().absolute()

    @property
    def _file(self) -> Path:
        return self.root / db.FILE

    # --- locking and the catalog -------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        """The store lock: shared among readers, exclusive for a writer. A reader that cannot
        open the lock file (a read-only store nobody wrote since) reads without it."""
        if shared:
            lock = None
            for mode in ("a+", "r"):
                with contextlib.suppress(OSError):
                    lock = open(self.root / ".lock", mode)
                    break
            if lock is None:
                yield
                return
        else:
            with self._refusing_writes():
                self.root.mkdir(parents=True, exist_ok=True)
                lock = open(self.root / ".lock", "a+")
        with lock:
            self._wait_for(lock, shared)
            try:
                yield
            finally:
                unlock_file(lock)

    def _wait_for(self, lock, shared: bool) -> None:
        """Take the store lock; when another process holds it for more than ``QUIET_WAIT``
        seconds (a long commit, a copy into the store), say so in one line and wait. A
        writer leaves its pid and program in the lock file for that line."""
        waited = 0.0
        while not lock_file(lock, blocking=False, shared=shared):
            if waited >= QUIET_WAIT:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                print(f"nbcustom: waiting for the store {self.root}: {holder} is writing it", file=sys.stderr, flush=True)
                lock_file(lock, shared=shared)
                break
            time.sleep(0.01)
            waited += 0.01
        if not shared:
            with contextlib.suppress(OSError):
                lock.seek(0)
                lock.truncate()
                lock.write(f"process {os.getpid()} ({Path(sys.argv[0]).name or 'python'})")
                lock.flush()

    @contextlib.contextmanager
    def _writing(self, findings: list | None = None) -> Iterator[Any]:
        """A read-write catalog connection under the exclusive lock, after the sweep of what
        dead processes left. What the sweep did goes to ``findings``, else (if worth a word)
        to stderr."""
        with self._locked():
            with self._refusing_writes():
                con = self._open(findings)
            try:
                self._tell(sweep(con, self.root), findings)
                yield con
            finally:
                con.close()

    def _open(self, findings: list | None):
        """The catalog, read-write: rebuilt from the folders if it does not open."""
        import duckdb

        if not self._file.exists() and layout.version_folders(self.root):
            return self._rebuild("is missing beside version folders", findings)
        try:
            return db.connect(self._file)
        except duckdb.Error as e:
            if db.is_broken(e):
                return self._rebuild(e, findings)
            raise self._refused(e) from None

    def _rebuild(self, why, findings: list | None):
        broken = db.move_aside(self._file) if self._file.exists() else None
        con = db.connect(self._file)
        models, versions, runs = db.rebuild(con, self.root)
        reason = why if isinstance(why, str) else _does_not_open(why)
        done = (f"moved it aside as {broken.name} and " if broken else "") + \
            f"rebuilt it from the version folders: {models} models, {versions} versions; " + \
            (db.lost(broken, runs) if broken else "jobs and runs that made no version are not in the folders")
        self._tell([Finding("broken catalog" if broken else "missing catalog", db.FILE, reason, done)], findings)
        return con

    @staticmethod
    def _tell(found: list, findings: list | None) -> None:
        if findings is not None:
            findings.extend(found)
            return
        for finding in found:
            if not finding.quiet:
                print(f"nbcustom: {finding.line()}", file=sys.stderr)

    def _read(self, sql: str, params: list | None = None) -> list[dict]:
        """Rows from the catalog opened read-only (no DDL, no write). A catalog that does
        not open is rebuilt first, under the exclusive lock; a user who cannot write reads
        a catalog rebuilt in memory from the folders."""
        import duckdb

        params = params or []
        if not self.root.exists():
            return []
        with self._locked(shared=True):
            if self._file.exists():
                try:
                    return db.read(self._file, sql, params)
                except duckdb.Error as e:
                    if not db.is_broken(e):
                        raise self._refused(e) from None
            elif not layout.version_folders(self.root):
                return []
        try:
            with self._writing() as con:
                return db.rows(con, sql, params)
        except ReadOnlyStore:
            con = db.in_memory()
            try:
                models, versions, _ = db.rebuild(con, self.root)
                if self.root not in _told:
                    _told.add(self.root)
                    print(f"nbcustom: {self._file} does not open and the store is read-only for you: read {models} models, "
                          f"{versions} versions from the version folders (jobs and runs are not shown)", file=sys.stderr)
                return db.rows(con, sql, params)
            finally:
                con.close()

    def _refused(self, error: Exception) -> Exception:
        """A DuckDB error that is not about the file's bytes, in the user's words."""
        message = str(error).splitlines()[0]
        if db.in_use(error):
            return NbCustomError(f"the catalog {self._file} is open in another program ({message}); close it there and try again")
        if any(words in message.lower() for words in ("permission denied", "not permitted", "read-only")):
            return self._read_only(error)
        return error

    @contextlib.contextmanager
    def _refusing_writes(self) -> Iterator[None]:
        """A file system's 'no' to a write, as the store's one line."""
        try:
            yield
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise self._read_only(e) from None
            raise

    def _read_only(self, error: Exception) -> ReadOnlyStore:
        return ReadOnlyStore(f"the store {self.root} is read-only for you ({error}): listing and loading work, changes need write permission")

    # --- reading ------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """One row per model: name, kind, active version, number of versions, updated."""
        return self._read(
            """SELECT m.name, m.kind, m.active, count(v.version) AS versions, m.updated
               FROM models m LEFT JOIN versions v USING (name)
               GROUP BY ALL ORDER BY m.name"""
        )

    def versions(self, name: str) -> list[dict]:
        """One row per version of ``name``, oldest first."""
        check_name(name)
        rows = self._read(
            """SELECT v.version, v.kind, v.status, v.version = m.active AS active, v.created,
                      v.rows_trained, v.promotion, v.metrics
               FROM versions v JOIN models m USING (name) WHERE name = ? ORDER BY v.version""",
            [name],
        )
        for row in rows:
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
        return rows

    def kind(self, name: str) -> str | None:
        rows = self._read("SELECT kind FROM models WHERE name = ?", [check_name(name)])
        return rows[0]["kind"] if rows else None

    def active_version(self, name: str) -> int | None:
        rows = self._read("SELECT active FROM models WHERE name = ?", [check_name(name)])
        return rows[0]["active"] if rows else None

    def get(self, name: str, version: int | None = None, verify: bool = True) -> Version:
        """Version ``version`` (default: the active one) of ``name``, checksums verified."""
        check_name(name)
        rows = self.versions(name)  # versions and the active one from one read: a commit between two reads could split them
        known = [row["version"] for row in rows]
        if not known:
            have = ", ".join(m["name"] for m in self.models()) or "none yet"
            raise NbCustomError(f"unknown model {name!r} (models in {self.root}: {have})")
        version = next((row["version"] for row in rows if row["active"]), None) if version is None else parse_version(version)
        if version not in known:
            raise NbCustomError(
                f"{name} has no version {version} (versions: {', '.join(map(str, known))}); see %nbc versions {name}"
            )
        path = self.root / name / f"v{version}"
        manifest = layout.read_manifest(path)
        if manifest is None:
            raise NbCustomError(f"{name}@{version}: manifest.json is missing or unreadable; remove it with %nbc rm {name}@{version}")
        if verify:
            self._verify(name, version, path, manifest)
        return Version(name, version, path, manifest)

    def active(self, name: str) -> Version | None:
        """The active version of ``name``, or None if there is no such model."""
        return self.get(name) if self.active_version(name) is not None else None

    @staticmethod
    def _verify(name: str, version: int, path: Path, manifest: dict) -> None:
        problem = layout.verify(path, manifest)
        if problem is None:
            return
        if problem.startswith("unexpected"):
            raise NbCustomError(f"{name}@{version}: {problem}; remove it or the version")
        raise NbCustomError(f"{name}@{version}: {problem}, so the version is refused; retrain it or remove it with %nbc rm {name}@{version}")

    def check(self, name: str | None = None, repair: bool = False) -> list[Finding]:
        """What is wrong in the store (or with ``name``): checksums of every version, folders
        the catalog does not list, catalog rows without a folder, manifests that differ from
        the catalog, ``.staging`` leftovers, a catalog that does not open. With ``repair``
        each is fixed where the folders say how (``Finding.repaired``); a version that fails
        its checksums is reported, never deleted."""
        import duckdb

        if name is not None:
            check_name(name)
        if not self.root.exists():
            return []
        findings: list = []
        if repair:
            with self._writing(findings) as con:
                findings += examine(con, self.root, name, repair=True)
            return findings
        with self._locked(shared=True):
            findings += leftover_findings(self.root)
            try:
                con = db.open_read(self._file) if self._file.exists() else None
            except duckdb.Error as e:
                if not db.is_broken(e):
                    raise self._refused(e) from None
                findings.append(Finding("broken catalog", db.FILE, _does_not_open(e)))
                con = None
            if con is None:
                if self._file.exists() or layout.version_folders(self.root):
                    if not self._file.exists():
                        findings.append(Finding("missing catalog", db.FILE, "is missing beside version folders"))
                    con = db.in_memory()
                    db.rebuild(con, self.root)  # so the versions' checksums are still checked
                else:
                    return findings
            try:
                findings += examine(con, self.root, name)
            finally:
                con.close()
        return findings

    # --- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def build(self, name: str, kind: str, activate: bool = True) -> Iterator[Build]:
        """Build a version in staging; on success number, rename and record it atomically.

        Any exception, KeyboardInterrupt included, removes the staging folder and writes
        nothing else; a kill leaves it to the next write's sweep.
        """
        check_name(name)
        existed = self.root.exists()
        with self._locked(), self._refusing_writes():  # a sweep never sees an entry half made
            work = Work.begin(self.root, "build", name=name)
        build = Build(name, kind, work.path, activate=activate)
        try:
            yield build
            self._commit(build, work)
        except BaseException:
            for undo in reversed(build.on_abort):
                with contextlib.suppress(Exception):  # the build's own error is the one to show
                    undo()
            raise
        finally:
            work.end()
            if not existed:  # a failed first build leaves no store behind
                with contextlib.suppress(OSError):
                    if {p.name for p in self.root.iterdir()} == {".lock"}:
                        (self.root / ".lock").unlink()
                        self.root.rmdir()

    def _commit(self, build: Build, work: Work) -> None:
        now = _dt.datetime.now()
        with self._writing() as con:
            kind = con.execute("SELECT kind FROM models WHERE name = ?", [build.name]).fetchone()
            if kind and kind[0] != build.kind:
                raise NbCustomError(
                    f"{build.name} is a {kind[0]} model, not {build.kind}: choose another name or %nbc rm {build.name}"
                )
            latest = con.execute("SELECT max(version) FROM versions WHERE name = ?", [build.name]).fetchone()[0] or 0
            on_disk = layout.version_folders(self.root, build.name).get(build.name, {})
            version = max([latest, *on_disk]) + 1
            manifest = {**build.manifest, "name": build.name, "version": version, "kind": build.kind}
            manifest.setdefault("created", now.isoformat(timespec="seconds"))
            manifest["files"] = checksums(build.path)
            (build.path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            fsync_tree(build.path)  # durable before the rename makes it a version
            work.note(version=version, activate=build.activate)  # a sweep rolls it forward as meant
            target = self.root / build.name / f"v{version}"
            if not target.parent.exists():
                target.parent.mkdir()
                fsync_dir(self.root)
            os.rename(build.path, target)
            fsync_dir(target.parent)
            fsync_dir(build.path.parent)
            recorded = False
            try:
                con.execute("BEGIN TRANSACTION")
                db.record_version(con, manifest, activate=build.activate, when=now)
                con.execute("COMMIT")
                recorded = True
            finally:
                if not recorded:
                    with contextlib.suppress(Exception):
                        con.execute("ROLLBACK")
                    os.rename(target, build.path)  # back into staging, which the build deletes
            if build.activate or not kind:
                layout.write_active(self.root, build.name, version)
        build.version = version
        build.manifest = manifest

    def update(self, name: str, version: int, metrics: dict | None = None, write=None) -> Version:
        """A committed version with new metrics and/or files; checksums renewed.

        ``write(folder)`` writes the new files into a copy of the version folder, which then
        replaces the version in one atomic swap: a kill leaves the old or the new version,
        both complete. A copy, not hard links: ``write`` may rewrite a file in place (a
        parquet file, a DuckDB index), which through a shared inode would change the
        committed version before the swap.
        """
        current = self.get(name, version)
        with self._writing() as con:
            if con.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?", [name, current.version]).fetchone() is None:
                raise NbCustomError(f"{name}@{current.version} was removed meanwhile")
            work = Work.begin(self.root, "update", name=name, version=current.version)
            new = work.path / "new"
            try:
                shutil.copytree(current.path, new)
                if write is not None:
                    write(new)
                manifest = layout.read_manifest(new) or dict(current.manifest)  # as it is now, under the lock
                if metrics is not None:
                    manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
                manifest["files"] = checksums(new)
                (new / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
                fsync_tree(new)
            except BaseException:
                work.end()
                raise
            try:
                swap(new, current.path, work.path / "old")
                sync_version(con, name, current.version, manifest)
            except BaseException:
                work.release()  # the next write's sweep finishes the swap from the intent
                raise
            work.end()
        return Version(name, current.version, current.path, manifest)

    def activate(self, name: str, version: int) -> None:
        """Make ``version`` the active version of ``name``."""
        version = parse_version(version)
        self.get(name, version)
        with self._writing() as con:
            con.execute("UPDATE models SET active = ?, updated = ? WHERE name = ?", [version, _dt.datetime.now(), name])
            layout.write_active(self.root, name, version)  # a kill before this: the next sweep writes it

    def remove(self, name: str, version: int | None = None, on_remove=None) -> None:
        """Remove one version (the newest remaining becomes active) or the whole model.

        ``on_remove(version)`` is called for each version first (its engine freeing what the
        version keeps outside its folder); if it raises, no folder or catalog row is removed."""
        known = [row["version"] for row in self.versions(check_name(name))]
        if not known:
            raise NbCustomError(f"unknown model {name!r}: see %nbc list")
        if version is not None and parse_version(version) not in known:
            raise NbCustomError(f"{name} has no version {version} (versions: {', '.join(map(str, known))})")
        doomed = known if version is None else [parse_version(version)]
        if on_remove is not None:
            for number in doomed:
                try:
                    doomed_version = self.get(name, number, verify=False)
                except NbCustomError:  # no readable manifest: nothing known outside the folder
                    continue
                on_remove(doomed_version)
        with self._writing() as con:
            if version is None:  # versions committed since are part of "the whole model" too
                doomed = [v for (v,) in con.execute("SELECT version FROM versions WHERE name = ?", [name]).fetchall()]
            work = Work.begin(self.root, "remove", name=name, versions=doomed)
            try:
                finish_remove(con, self.root, work)
            except BaseException:
                work.release()  # the removal has begun: the next write's sweep finishes it
                raise
            work.end()

    def record_run(self, name: str, magic: str, started, status: str, rows_read=None, version=None, error=None, promotion=None) -> None:
        """Add a row to the catalog's ``runs`` table (for runs that made no version)."""
        import uuid

        with self._writing() as con:
            con.execute(
                """INSERT INTO runs (id, name, magic, started, ended, status, rows_read, version, error, promotion)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [uuid.uuid4().hex, name, magic, started, _dt.datetime.now(), status, rows_read, version, error, promotion],
            )

    def runs(self, name: str | None = None, limit: int = 20) -> list[dict]:
        where, params = ("WHERE name = ?", [name]) if name else ("", [])
        return self._read(f"SELECT * FROM runs {where} ORDER BY started DESC LIMIT {int(limit)}", params)

    # --- jobs -----------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Every scheduled job (see ``nbcustom.jobs``)."""
        rows = self._read("SELECT * FROM jobs ORDER BY name")
        for row in rows:
            row["last_value"] = json.loads(row["last_value"]) if row["last_value"] else None
        return rows

    def save_job(self, job: dict) -> None:
        """Insert or replace a job row."""
        job = {**job, "last_value": json.dumps(job.get("last_value"), default=str)}
        cols = ["name", "every_seconds", "track", "last_value", "database", "status", "next_due", "created", "promote", "min_rows"]
        with self._writing() as con:
            con.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [job.get(c) for c in cols])


def _does_not_open(error: Exception) -> str:
    return f"does not open ({str(error).splitlines()[0][:120]})"
