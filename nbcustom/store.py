"""The versioned artifact store: ``NAME/vN`` folders plus ``catalog.duckdb``.

A version is built in a staging folder, renamed into place and recorded in the catalog in
one transaction, all under a file lock, so concurrent kernels get distinct numbers and an
interrupted build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import NbCustomError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
MANIFEST = "manifest.json"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name VARCHAR PRIMARY KEY, kind VARCHAR, active INTEGER, created TIMESTAMP, updated TIMESTAMP);
CREATE TABLE IF NOT EXISTS versions (
    name VARCHAR, version INTEGER, kind VARCHAR, status VARCHAR, created TIMESTAMP,
    rows_trained BIGINT, metrics JSON, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY, name VARCHAR, magic VARCHAR, started TIMESTAMP, ended TIMESTAMP,
    status VARCHAR, rows_read BIGINT, version INTEGER, error VARCHAR);
CREATE TABLE IF NOT EXISTS jobs (
    name VARCHAR PRIMARY KEY, every_seconds DOUBLE, track VARCHAR, last_value JSON,
    database VARCHAR, status VARCHAR, next_due TIMESTAMP, created TIMESTAMP);
ALTER TABLE versions ADD COLUMN IF NOT EXISTS promotion VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS promotion VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS promote VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS min_rows BIGINT;
"""


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, by relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


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


class Store:
    """The artifact store at ``root`` (created on the first commit)."""

    def __init__(self, root: str | os.PathLike = "nbcustom_store"):
        self.root = Path(root).expanduser().absolute()

    # --- locking and the catalog -------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            lock_file(lock)
            try:
                yield
            finally:
                unlock_file(lock)

    @contextlib.contextmanager
    def _catalog(self, write: bool = False) -> Iterator[Any]:
        """A short-lived catalog connection, under the store lock."""
        import duckdb

        if not write and not (self.root / "catalog.duckdb").exists():
            yield None
            return
        with self._locked():
            con = duckdb.connect(str(self.root / "catalog.duckdb"))
            try:
                con.execute(_SCHEMA)  # also on reads: brings an older catalog's tables up to date
                yield con
            finally:
                con.close()

    def _rows(self, sql: str, params: list | None = None, write: bool = False) -> list[dict]:
        with self._catalog(write=write) as con:
            if con is None:
                return []
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    # --- reading ------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """One row per model: name, kind, active version, number of versions, updated."""
        return self._rows(
            """SELECT m.name, m.kind, m.active, count(v.version) AS versions, m.updated
               FROM models m LEFT JOIN versions v USING (name)
               GROUP BY ALL ORDER BY m.name"""
        )

    def versions(self, name: str) -> list[dict]:
        """One row per version of ``name``, oldest first."""
        check_name(name)
        rows = self._rows(
            """SELECT v.version, v.kind, v.status, v.version = m.active AS active, v.created,
                      v.rows_trained, v.promotion, v.metrics
               FROM versions v JOIN models m USING (name) WHERE name = ? ORDER BY v.version""",
            [name],
        )
        for row in rows:
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
        return rows

    def kind(self, name: str) -> str | None:
        rows = self._rows("SELECT kind FROM models WHERE name = ?", [check_name(name)])
        return rows[0]["kind"] if rows else None

    def active_version(self, name: str) -> int | None:
        rows = self._rows("SELECT active FROM models WHERE name = ?", [check_name(name)])
        return rows[0]["active"] if rows else None

    def get(self, name: str, version: int | None = None, verify: bool = True) -> Version:
        """Version ``version`` (default: the active one) of ``name``, checksums verified."""
        check_name(name)
        known = [row["version"] for row in self.versions(name)]
        if not known:
            have = ", ".join(m["name"] for m in self.models()) or "none yet"
            raise NbCustomError(f"unknown model {name!r} (models in {self.root}: {have})")
        version = self.active_version(name) if version is None else parse_version(version)
        if version not in known:
            raise NbCustomError(
                f"{name} has no version {version} (versions: {', '.join(map(str, known))}); see %nbc versions {name}"
            )
        path = self.root / name / f"v{version}"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise NbCustomError(f"{name}@{version}: manifest.json is missing or unreadable; remove it with %nbc rm {name}@{version}") from None
        if verify:
            self._verify(name, version, path, manifest)
        return Version(name, version, path, manifest)

    def active(self, name: str) -> Version | None:
        """The active version of ``name``, or None if there is no such model."""
        return self.get(name) if self.active_version(name) is not None else None

    @staticmethod
    def _verify(name: str, version: int, path: Path, manifest: dict) -> None:
        expected = manifest.get("files", {})
        actual = checksums(path)
        for rel, digest in expected.items():
            if actual.get(rel) != digest:
                state = "is missing" if rel not in actual else "failed its sha256 checksum"
                raise NbCustomError(
                    f"{name}@{version}: file {rel} {state}, so the version is refused; "
                    f"retrain it or remove it with %nbc rm {name}@{version}"
                )
        extra = sorted(set(actual) - set(expected))
        if extra:
            raise NbCustomError(f"{name}@{version}: unexpected file {extra[0]} is not in the manifest; remove it or the version")

    # --- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def build(self, name: str, kind: str, activate: bool = True) -> Iterator[Build]:
        """Build a version in staging; on success number, rename and record it atomically.

        Any exception, KeyboardInterrupt included, removes the staging folder and writes
        nothing else.
        """
        check_name(name)
        existed = self.root.exists()
        staging = self.root / ".staging" / f"{name}-{uuid.uuid4().hex[:12]}"
        staging.mkdir(parents=True)
        build = Build(name, kind, staging, activate=activate)
        try:
            yield build
            self._commit(build)
        except BaseException:
            for undo in reversed(build.on_abort):
                with contextlib.suppress(Exception):  # the build's own error is the one to show
                    undo()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / ".staging").rmdir()
            if not existed:
                with contextlib.suppress(OSError):
                    self.root.rmdir()

    def _commit(self, build: Build) -> None:
        now = _dt.datetime.now()
        with self._catalog(write=True) as con:
            kind = con.execute("SELECT kind FROM models WHERE name = ?", [build.name]).fetchone()
            if kind and kind[0] != build.kind:
                raise NbCustomError(
                    f"{build.name} is a {kind[0]} model, not {build.kind}: choose another name or %nbc rm {build.name}"
                )
            latest = con.execute("SELECT max(version) FROM versions WHERE name = ?", [build.name]).fetchone()[0] or 0
            on_disk = [int(p.name[1:]) for p in (self.root / build.name).glob("v*") if p.name[1:].isdigit()]
            version = max([latest, *on_disk]) + 1
            manifest = {**build.manifest, "name": build.name, "version": version, "kind": build.kind}
            manifest.setdefault("created", now.isoformat(timespec="seconds"))
            manifest["files"] = checksums(build.path)
            (build.path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            target = self.root / build.name / f"v{version}"
            target.parent.mkdir(exist_ok=True)
            os.rename(build.path, target)
            try:
                con.execute("BEGIN TRANSACTION")
                promotion = manifest.get("promotion", {}).get("reason")
                con.execute(
                    """INSERT INTO versions (name, version, kind, status, created, rows_trained, metrics, promotion)
                       VALUES (?, ?, ?, 'ready', ?, ?, ?, ?)""",
                    [build.name, version, build.kind, now, manifest.get("counts", {}).get("trained"),
                     json.dumps(manifest.get("metrics", {}), default=str), promotion],
                )
                if kind:
                    if build.activate:
                        con.execute("UPDATE models SET active = ?, updated = ? WHERE name = ?", [version, now, build.name])
                else:
                    con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?)", [build.name, build.kind, version, now, now])
                run = manifest.get("run")
                if run:
                    con.execute(
                        """INSERT INTO runs (id, name, magic, started, ended, status, rows_read, version, error, promotion)
                           VALUES (?, ?, ?, ?, ?, 'ok', ?, ?, NULL, ?)""",
                        [run["id"], build.name, run["magic"], run["started"], now, manifest.get("counts", {}).get("read"), version, promotion],
                    )
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    con.execute("ROLLBACK")
                shutil.rmtree(target, ignore_errors=True)
                raise
        build.version = version
        build.manifest = manifest

    def update(self, name: str, version: int, metrics: dict | None = None, write=None) -> Version:
        """Rewrite a committed version's manifest: new metrics and/or files; checksums renewed.

        ``write(folder)`` writes the new files into the version folder under the store lock.
        """
        current = self.get(name, version)
        with self._catalog(write=True) as con:
            if write is not None:
                write(current.path)
            manifest = dict(current.manifest)
            if metrics is not None:
                manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
            manifest["files"] = checksums(current.path)
            tmp = current.path / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
            os.replace(tmp, current.path / MANIFEST)
            con.execute(
                "UPDATE versions SET metrics = ? WHERE name = ? AND version = ?",
                [json.dumps(manifest.get("metrics", {}), default=str), name, current.version],
            )
        return Version(name, current.version, current.path, manifest)

    def activate(self, name: str, version: int) -> None:
        """Make ``version`` the active version of ``name``."""
        self.get(name, version)
        with self._catalog(write=True) as con:
            con.execute("UPDATE models SET active = ?, updated = ? WHERE name = ?", [parse_version(version), _dt.datetime.now(), name])

    def remove(self, name: str, version: int | None = None, on_remove=None) -> None:
        """Remove one version (the newest remaining becomes active) or the whole model.

        ``on_remove(version)`` is called for each version first (its engine freeing what the
        version keeps outside its folder); if it raises, no folder or catalog row is removed."""
        known = [row["version"] for row in self.versions(check_name(name))]
        if not known:
            raise NbCustomError(f"unknown model {name!r}: see %nbc list")
        if version is not None and parse_version(version) not in known:
            raise NbCustomError(f"{name} has no version {version} (versions: {', '.join(map(str, known))})")
        if on_remove is not None:
            for number in known if version is None else [parse_version(version)]:
                try:
                    doomed_version = self.get(name, number, verify=False)
                except NbCustomError:  # no readable manifest: nothing known outside the folder
                    continue
                on_remove(doomed_version)
        with self._catalog(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            if version is None or known == [parse_version(version)]:
                con.execute("DELETE FROM versions WHERE name = ?", [name])
                con.execute("DELETE FROM models WHERE name = ?", [name])
                doomed = self.root / name
            else:
                version = parse_version(version)
                con.execute("DELETE FROM versions WHERE name = ? AND version = ?", [name, version])
                con.execute(
                    """UPDATE models SET active = (SELECT max(version) FROM versions WHERE name = ?)
                       WHERE name = ? AND active = ?""",
                    [name, name, version],
                )
                doomed = self.root / name / f"v{version}"
            con.execute("COMMIT")
            # Rename first so a crash mid-delete never leaves a half folder under a live name.
            trash = self.root / ".staging" / f"rm-{uuid.uuid4().hex[:12]}"
            trash.parent.mkdir(exist_ok=True)
            os.rename(doomed, trash)
            shutil.rmtree(trash, ignore_errors=True)
            with contextlib.suppress(OSError):
                trash.parent.rmdir()

    def record_run(self, name: str, magic: str, started, status: str, rows_read=None, version=None, error=None, promotion=None) -> None:
        """Add a row to the catalog's ``runs`` table (for runs that made no version)."""
        with self._catalog(write=True) as con:
            con.execute(
                """INSERT INTO runs (id, name, magic, started, ended, status, rows_read, version, error, promotion)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [uuid.uuid4().hex, name, magic, started, _dt.datetime.now(), status, rows_read, version, error, promotion],
            )

    def runs(self, name: str | None = None, limit: int = 20) -> list[dict]:
        where, params = ("WHERE name = ?", [name]) if name else ("", [])
        return self._rows(f"SELECT * FROM runs {where} ORDER BY started DESC LIMIT {int(limit)}", params)

    # --- jobs -----------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Every scheduled job (see ``nbcustom.jobs``)."""
        rows = self._rows("SELECT * FROM jobs ORDER BY name")
        for row in rows:
            row["last_value"] = json.loads(row["last_value"]) if row["last_value"] else None
        return rows

    def save_job(self, job: dict) -> None:
        """Insert or replace a job row."""
        job = {**job, "last_value": json.dumps(job.get("last_value"), default=str)}
        cols = ["name", "every_seconds", "track", "last_value", "database", "status", "next_due", "created", "promote", "min_rows"]
        with self._catalog(write=True) as con:
            con.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [job.get(c) for c in cols])


def lock_file(f, blocking: bool = True) -> bool:
    """An exclusive lock on an open file; False if ``blocking`` is off and it is held."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        f.seek(0)
        while True:
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def unlock_file(f) -> None:
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except ImportError:
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
