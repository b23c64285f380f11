"""Scheduled jobs: keep a model current by re-running its latest training step on a timer.

A job remembers the SQL, magic and options of the version it was made from. Every
``every_seconds`` it runs them again (``%%retrain``, ``%%finetune`` or a ``%%rag`` refresh).
With ``track=COL`` only rows whose COL is above the largest value seen so far are read:
``{{last}}`` in the SQL is that value, or the query is filtered on COL when it has no
``{{last}}``. A run that finds no new rows records "nothing new" and makes no version; with
``min_rows`` one that finds fewer waits for more (the rows stay unread). A job's versions
are promoted by its own ``promote`` policy, ``if-better`` by default: unattended, a worse
version is kept but never made the active one.

In a kernel, jobs run on one background thread per store (``Scheduler``) so the notebook
stays responsive; whatever they print goes to a log file, never into a cell. ``nbcustom
jobs run`` runs every due job once from the command line; both record each run in the
catalog's ``runs`` table with magic ``job``. ``cron_line`` gives the crontab line that runs a
job with ``nbcustom jobs run NAME`` instead of a kernel thread.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import re
import shlex
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Mapping

from . import api, data
from .errors import NbCustomError
from .promotion import JOB_DEFAULT, POLICIES
from .store import Store, check_name, lock_file, unlock_file

_EVERY = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?", re.I)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_LAST = re.compile(r"\{\{\s*last\s*\}\}")
_RUNNERS = {"retrain": api.retrain, "finetune": api.finetune, "rag": api.rag}


def parse_every(text: str | float) -> float:
    """``"10m"``, ``"30s"``, ``"2h"``, ``"1d"`` or a number of seconds -> seconds."""
    match = _EVERY.fullmatch(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise NbCustomError(f"--every {text!r}: use an interval such as 30s, 10m, 2h or 1d")
    return float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]


def schedule(store: Store, name: str, every: str | float, track: str | None = None, database: str = ":memory:",
             namespace: Mapping[str, Any] | None = None, con=None, promote: str = JOB_DEFAULT,
             min_rows: int | None = None, cron: bool = False) -> dict:
    """Create or replace the job of ``name``: the first run is due one interval from now.
    With ``cron`` the job is left to cron (``cron_line``), not to a kernel thread."""
    version = store.get(check_name(name))
    if promote not in POLICIES:
        raise NbCustomError(f"--promote must be one of {', '.join(POLICIES)}, not {promote!r}")
    if min_rows is not None and (not track or min_rows < 1):
        raise NbCustomError("--min-rows N needs --track COL (new rows are counted by it) and N of at least 1")
    if cron:
        cron_schedule(every)  # checked before anything is saved
        if database in (None, ":memory:"):
            raise NbCustomError("a cron job cannot read the kernel's in-memory database: %config NbCustom.database = 'shop.duckdb' first")
        database = str(Path(database).absolute())
    manifest = version.manifest
    if not manifest.get("sql") or manifest.get("magic") not in _RUNNERS:
        raise NbCustomError(f"{name}@{version.version} was not made from a SQL query by a magic: run %%retrain/%%finetune/%%rag with SQL first")
    last = None
    if track:
        last = _initial_last(version, manifest["sql"], track, namespace, con)
    now = _dt.datetime.now()
    seconds = parse_every(every)
    job = {
        "name": name, "every_seconds": seconds, "track": track, "last_value": last, "database": database,
        "status": "cron" if cron else "active", "next_due": now + _dt.timedelta(seconds=seconds), "created": now,
        "promote": promote, "min_rows": min_rows,
    }
    store.save_job(job)
    return job


def stop(store: Store, name: str) -> None:
    job = _job(store, name)
    store.save_job({**job, "status": "stopped"})


def due(store: Store, now: _dt.datetime | None = None) -> list[dict]:
    now = now or _dt.datetime.now()
    return [j for j in store.jobs() if j["status"] == "active" and j["next_due"] <= now]


def run(store: Store, name: str, namespace: Mapping[str, Any] | None = None, con=None) -> dict:
    """Run the job of ``name`` once; returns its ``runs`` row. Never raises for a failed run:
    the error is recorded and the job stays scheduled. Two runs of one job never overlap."""
    job = _job(store, name)
    lock_path = store.root / ".jobs" / f"{name}.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with open(lock_path, "a+") as lock:
        if not lock_file(lock, blocking=False):
            return {"name": name, "status": "skipped: already running"}
        started = _dt.datetime.now()
        record = {"id": uuid.uuid4().hex, "name": name, "magic": "job", "started": started, "rows_read": None, "version": None, "error": None, "promotion": None}
        last = job["last_value"]
        try:
            manifest = store.get(name, verify=False).manifest
            sql, params = _tracked_sql(manifest["sql"], job["track"], last)
            rows = data.to_pandas(sql, namespace=namespace, con=con, params=params)
            record["rows_read"] = len(rows)
            if rows.empty:
                record["status"] = "nothing new"
            elif len(rows) < (job.get("min_rows") or 0):
                record["status"] = f"waiting: {len(rows)} of {job['min_rows']} new rows"
            else:
                options = {**_options(manifest, job["track"]), "promote": job.get("promote") or JOB_DEFAULT}
                version = _RUNNERS[manifest["magic"]](name, sql, namespace=namespace, con=con, store=store, ui="none", params=params, **options)
                record.update(status="ok", version=version.version, promotion=version.manifest["promotion"]["reason"])
                if job["track"]:
                    last = _max(rows[job["track"]], last)
        except Exception as e:  # recorded, not raised: a job's failure must not stop later runs
            record.update(status="error", error=f"{type(e).__name__}: {e}" if not isinstance(e, NbCustomError) else str(e))
        finally:
            unlock_file(lock)
        store.record_run(name, "job", started, record["status"], record["rows_read"], record["version"], record["error"], record["promotion"])
        current = _job(store, name)  # may have been stopped meanwhile
        store.save_job({**current, "last_value": last, "next_due": _dt.datetime.now() + _dt.timedelta(seconds=current["every_seconds"])})
        return record


def run_due(store: Store, namespace=None, con=None, names=()) -> list[dict]:
    """Run every due job once (``nbcustom jobs run``), or the jobs ``names`` now (cron)."""
    results = []
    for job in [_job(store, name) for name in names] or due(store):
        if con is None and job["database"] in (None, ":memory:"):
            store.record_run(job["name"], "job", _dt.datetime.now(), "error", error="the job reads the kernel's in-memory database; use %config NbCustom.database = 'file.duckdb' to run it outside the kernel")
            store.save_job({**job, "next_due": _dt.datetime.now() + _dt.timedelta(seconds=job["every_seconds"])})
            results.append({"name": job["name"], "status": "error"})
            continue
        import duckdb

        connection = con if con is not None else duckdb.connect(job["database"], read_only=True)  # a job only reads
        try:
            results.append(run(store, job["name"], namespace, connection))
        finally:
            if con is None:
                connection.close()
    return results


def table(store: Store, runs_per_job: int = 5):
    """Jobs and their recent runs, as one DataFrame (``%nbc jobs``), with the promotion
    decision and the largest drift of the last run that made a version."""
    import pandas as pd

    columns = ["name", "status", "every_seconds", "track", "last_value", "next_due", "promote", "min_rows",
               "recent_runs", "last_promotion", "largest_drift"]
    rows = []
    for job in store.jobs():
        recent = [r for r in store.runs(job["name"], limit=50) if r["magic"] == "job"]
        made = next((r for r in recent if r["version"]), None)
        rows.append({
            **{k: job.get(k) for k in columns[:8]}, "promote": job.get("promote") or JOB_DEFAULT,
            "recent_runs": "; ".join(f"{r['started']:%H:%M:%S} {r['status']}" + (f" v{r['version']}" if r["version"] else "") for r in recent[:runs_per_job]),
            "last_promotion": f"v{made['version']}: {made['promotion']}" if made and made.get("promotion") else None,
            "largest_drift": _largest_drift(store, job["name"], made["version"]) if made else None,
        })
    return pd.DataFrame(rows, columns=columns)


def cron_schedule(every: str | float) -> str:
    """The crontab schedule fields for an interval: whole minutes below an hour, whole hours
    below a day, or whole days."""
    seconds = parse_every(every)
    for unit, most, field in ((86400, 31, "0 0 */{} * *"), (3600, 23, "0 */{} * * *"), (60, 59, "*/{} * * * *")):
        if seconds % unit == 0 and 1 <= seconds // unit <= most:
            return field.format(int(seconds // unit)).replace("*/1 ", "* ")
    raise NbCustomError(f"--every {every}: for cron use whole minutes (1m-59m), hours (1h-23h) or days (1d-31d)")


def cron_line(store: Store, name: str) -> str:
    """The crontab line that runs the job of ``name`` with ``nbcustom jobs run NAME``: every
    path absolute, its output appended to the store's ``.jobs/cron.log``."""
    job = _job(store, name)
    every = job["every_seconds"]
    command = Path(sys.executable).with_name("nbcustom")
    program = [str(command)] if command.exists() else [sys.executable, "-m", "nbcustom.cli"]
    words = [*program, "--store", str(store.root), "jobs", "run", name, "--database", job["database"]]
    log = store.root / ".jobs" / "cron.log"
    log.parent.mkdir(parents=True, exist_ok=True)  # the shell opens the log before nbcustom runs
    return f"{cron_schedule(every)} cd {shlex.quote(str(Path.cwd()))} && {shlex.join(words)} >> {shlex.quote(str(log))} 2>&1"


class Scheduler(threading.Thread):
    """The kernel's job thread for one store: runs due jobs one after another."""

    _running: dict[Path, "Scheduler"] = {}
    _guard = threading.Lock()  # a thread deciding to exit vs a new job being scheduled
    tick = 1.0

    def __init__(self, store: Store, namespace, session: data.Session):
        super().__init__(name=f"nbcustom-jobs-{store.root.name}", daemon=True)
        self.store, self.namespace, self.session = store, namespace, session
        self.stopped = threading.Event()
        self.exiting = False
        self.log = store.root / ".jobs" / "jobs.log"

    @classmethod
    def ensure(cls, store: Store, namespace, session: data.Session) -> "Scheduler":
        with cls._guard:
            current = cls._running.get(store.root)
            if current is None or not current.is_alive() or current.exiting:
                current = cls._running[store.root] = cls(store, namespace, session)
                _route_job_output()
                current.start()
        return current

    @classmethod
    def stop_all(cls, timeout: float = 30.0) -> None:
        """Stop every job thread and wait for it (at exit: a thread killed inside DuckDB or
        torch during interpreter shutdown aborts the process)."""
        for scheduler in list(cls._running.values()):
            scheduler.stopped.set()
        for scheduler in list(cls._running.values()):
            scheduler.join(timeout)
        cls._running.clear()

    def run(self) -> None:
        """Run due jobs until stopped, or until the store has no active job left."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", buffering=1) as log:
            _thread_logs[threading.get_ident()] = log
            try:
                while not self.stopped.wait(self.tick):
                    try:
                        scheduled = [j for j in self.store.jobs() if j["status"] == "active"]
                    except Exception as e:  # a busy or damaged catalog: try again next tick
                        print(f"{_dt.datetime.now():%H:%M:%S} cannot read jobs: {e}", file=log)
                        continue
                    if not scheduled and self._nothing_left():
                        break
                    for job in scheduled:
                        if self.stopped.is_set() or job["next_due"] > _dt.datetime.now():
                            continue
                        # A cursor: its own connection to the kernel's database, safe on this thread.
                        result = run(self.store, job["name"], self.namespace, self.session.con.cursor())
                        print(f"{_dt.datetime.now():%H:%M:%S} {job['name']}: {result}", file=log)
            finally:
                _thread_logs.pop(threading.get_ident(), None)

    def _nothing_left(self) -> bool:
        with self._guard:  # re-read under the guard: a job saved just now is seen here
            if any(j["status"] == "active" for j in self.store.jobs()):
                return False
            self.exiting = True
            return True


atexit.register(Scheduler.stop_all)


# --- output routing: whatever a job thread prints goes to the jobs log, not a cell ----------
_thread_logs: dict[int, Any] = {}


class _Router:
    """Stands in for sys.stdout/sys.stderr: job threads write to their log, others through."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        log = _thread_logs.get(threading.get_ident())
        return log.write(text) if log is not None else self._stream.write(text)

    def flush(self):
        log = _thread_logs.get(threading.get_ident())
        return log.flush() if log is not None else self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _route_job_output() -> None:
    if not isinstance(sys.stdout, _Router):
        sys.stdout = _Router(sys.stdout)
    if not isinstance(sys.stderr, _Router):
        sys.stderr = _Router(sys.stderr)


# --- helpers ------------------------------------------------------------------------------
def _largest_drift(store: Store, name: str, version: int) -> str | None:
    try:
        drift = store.get(name, version, verify=False).manifest.get("drift")
    except NbCustomError:  # the version was removed since
        return None
    top = drift["columns"][0] if drift and drift["columns"] else None
    return f"{top['column']} PSI {top['psi']:.2f}" if top else None


def _job(store: Store, name: str) -> dict:
    for job in store.jobs():
        if job["name"] == name:
            return job
    raise NbCustomError(f"{name} has no job: schedule one with %nbc job {name} --every 10m")


def _tracked_sql(sql: str, track: str | None, last) -> tuple[str, dict]:
    if not track:
        return sql, {}
    if _LAST.search(sql):
        return sql, {"last": last}
    if last is None:
        return sql, {}
    column = '"' + track.replace('"', '""') + '"'
    return f"SELECT * FROM ({sql.strip().rstrip(';')}) AS _nbcustom_rows WHERE {column} > {{{{last}}}}", {"last": last}


def _initial_last(version, sql: str, track: str, namespace, con):
    """The largest ``track`` value the version was made from."""
    import pandas as pd

    train = version.path / "train.parquet"
    if train.exists():
        rows = pd.read_parquet(train)
        if track in rows.columns:
            return _max(rows[track], None)
    rows = data.to_pandas(sql, namespace=namespace, con=con, params={"last": None})
    if track not in rows.columns:
        raise NbCustomError(f"--track {track}: the model's SQL has no column {track!r}; choose one of its columns: {', '.join(map(str, rows.columns))}")
    return _max(rows[track], None)


def _max(column, last):
    value = column.max()
    if hasattr(value, "item"):
        value = value.item()
    if hasattr(value, "isoformat"):
        value = value.isoformat(sep=" ") if isinstance(value, _dt.datetime) else value.isoformat()
    return value if last is None or value > last else last


def _options(manifest: dict, track: str | None) -> dict:
    options = {k: v for k, v in manifest.get("options", {}).items() if v is not None and v is not False}
    options.pop("from_version", None)
    options.pop("resume", None)
    if manifest["magic"] == "rag" and track:
        options["append"] = True  # only new rows are read: keep the others
    return options
