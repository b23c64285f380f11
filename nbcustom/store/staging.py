"""Work in progress in ``.staging/``: each entry is owned by a live process, or swept.

An entry ``ID`` is a folder ``.staging/ID/`` (a version being built, an update's new copy,
the folders a removal is deleting) and ``.staging/ID.lock``, a file its process holds
locked and in which it notes what it is doing (the intent, as JSON). The lock is released
when the process dies, however it dies, so an entry whose lock anyone can take is a
leftover: the next write to the store finishes or undoes its intent and deletes it.

Entries are created and swept only under the store lock, so a sweep never sees an entry
between the creation of its lock file and the taking of the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .files import fsync_dir, lock_file, remove_tree, unlock_file

FOLDER = ".staging"


@dataclass
class Work:
    """One ``.staging`` entry: ``path`` (its folder) and the intent noted in its lock file."""

    path: Path
    intent: dict = field(default_factory=dict)
    _lock: object = field(default=None, repr=False)  # the open lock file while this process owns the entry

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @classmethod
    def begin(cls, root: Path, op: str, **intent) -> "Work":
        """A new entry owned by this process (call under the store lock)."""
        staging = root / FOLDER
        name = intent.get("name", "")
        work = cls(staging / f"{op}-{name}-{os.getpid()}-{uuid.uuid4().hex[:10]}", {"op": op, "pid": os.getpid(), **intent})
        while work._lock is None:
            staging.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # another entry's end() removed the empty folder just now
                work._lock = open(work.lock_path, "w+")
        lock_file(work._lock)
        work.path.mkdir()
        work._write_intent()
        fsync_dir(staging)
        return work

    def note(self, **more) -> None:
        """Add to the intent (what a sweep needs to finish the work if this process dies)."""
        self.intent.update(more)
        self._write_intent()

    def _write_intent(self) -> None:
        f = self._lock
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self.intent, default=str))
        f.flush()
        os.fsync(f.fileno())

    def end(self) -> None:
        """Delete the entry: its folder first, the lock last, so a kill in between leaves a
        leftover that the next sweep still sees."""
        remove_tree(self.path)
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        self.release()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()

    def release(self) -> None:
        """Let go of the lock but keep the entry: the next write's sweep finishes the work."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                unlock_file(self._lock)
            self._lock.close()
            self._lock = None


def leftovers(root: Path) -> list[Work]:
    """Entries whose process is gone, each holding its lock until ``end()``."""
    staging = root / FOLDER
    if not staging.is_dir():
        return []
    found = []
    for stem in sorted({p.name.removesuffix(".lock") for p in staging.iterdir()}):
        work = Work(staging / stem)
        if work.lock_path.exists():
            try:
                f = open(work.lock_path)  # read-only: `check` by a user who cannot write
            except FileNotFoundError:  # its owner ended it just now
                continue
            if not lock_file(f, blocking=False):
                f.close()  # its owner is alive
                continue
            work._lock = f
            with contextlib.suppress(ValueError):  # killed while noting: an unknown intent
                work.intent = json.loads(f.read() or "{}")
        found.append(work)
    return found
