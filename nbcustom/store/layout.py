"""Where things are in a store folder, and the small files that make the folders the truth.

```
catalog.duckdb      models, versions, runs, jobs: an index of the folders (rebuilt from them)
.lock               the store lock: shared by readers, exclusive for writers
.staging/           work of live processes (see ``staging``); leftovers are swept
.trash/             version folders set aside by a repair (never deleted by the store)
.active/NAME        NAME's active version number, kept with the catalog's
NAME/vN/            a version: manifest.json (with every file's sha256) and its files
```
The active version lives beside the model folders, not in them: ``NAME/`` holds versions only.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .files import MANIFEST, checksums, fsync_dir, write_atomic

ACTIVE = ".active"
TRASH = ".trash"
_VERSION = re.compile(r"v([1-9][0-9]*)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def version_folders(root: Path, name: str | None = None) -> dict[str, dict[int, Path]]:
    """Every ``NAME/vN`` folder on disk: name -> version -> path (only ``name``'s if given)."""
    found: dict[str, dict[int, Path]] = {}
    models = [root / name] if name else (sorted(root.iterdir()) if root.is_dir() else [])
    for model in models:
        if not model.is_dir() or not _NAME.fullmatch(model.name):
            continue
        numbers = {int(m.group(1)): p for p in model.iterdir() if p.is_dir() and (m := _VERSION.fullmatch(p.name))}
        if numbers:
            found[model.name] = dict(sorted(numbers.items()))
    return found


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None if it is missing or not JSON."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_active(root: Path, name: str) -> int | None:
    try:
        return int((root / ACTIVE / name).read_text().strip())
    except (OSError, ValueError):
        return None


def write_active(root: Path, name: str, version: int | None) -> None:
    """Record the active version on disk (None: the model is gone, and so is its file)."""
    path = root / ACTIVE / name
    if version is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    if not path.parent.exists():
        path.parent.mkdir()
        fsync_dir(root)
    write_atomic(path, f"{version}\n")


def verify(folder: Path, manifest: dict) -> str | None:
    """What is wrong with the files of a version against its manifest's checksums, or None."""
    expected = manifest.get("files", {})
    actual = checksums(folder)
    for rel, digest in expected.items():
        if actual.get(rel) != digest:
            return f"file {rel} " + ("is missing" if rel not in actual else "failed its sha256 checksum")
    extra = sorted(set(actual) - set(expected))
    return f"unexpected file {extra[0]} is not in the manifest" if extra else None
