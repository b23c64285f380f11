"""Where a RAG version's chunks and vectors live, behind one small interface. The backend is
chosen here and nowhere else: from a ``--vector-store`` value when writing, from the
manifest's ``index.store`` entry when reading.

- ``duckdb``: a DuckDB file in the version folder (the default).
- ``pgvector``: a table per version in PostgreSQL with pgvector (``postgresql://...``).

Each backend module offers the same things, given a version's entry (its manifest
``index.store`` plus ``folder``, the version folder, and ``label``, ``NAME@V``):

- ``Writer(location, name, model_dir, dim, previous)``: a new version's vectors, ``previous``
  the entry of the version it refreshes. ``insert(chunks, vectors)``; ``can_copy`` and
  ``copy(row_ids)``: the unchanged rows' vectors copied where they are, never through
  Python; ``finish() -> (entry, chunks)``; ``discard()`` when the build fails.
- ``open(entry)``: the chunks of a committed version: ``chunk_ids``, ``row_ids``, ``texts``
  (lists in a stable order), ``metadata(i)``, ``len()``, ``search(query, k, among=None) ->
  [(position, cosine similarity)]`` best first (``among``: chunk positions to search
  within), and ``vector_store()``, a llama-index vector store over them.
- ``row_hashes(entry)``: row id -> content hash.
- ``drop(entry)``: remove what the version keeps outside its folder.
"""

from __future__ import annotations

import importlib

DEFAULT = "duckdb"


def create(location: str | None, previous, name: str, model_dir, dim: int):
    """The writer of a new version's vectors: at ``location`` (``duckdb`` or
    ``postgresql://USER@HOST:PORT/DB``), or where the previous version's are when None."""
    source = _entry(previous) if previous is not None else None
    if location is None:
        location = source.get("url", DEFAULT) if source else DEFAULT
    return _backend(DEFAULT if location == DEFAULT else "pgvector").Writer(location, name, model_dir, dim, source)


def check(location: str | None) -> None:
    """A one-line error now if the vectors cannot be written at ``location`` (a server that
    cannot be reached, no pgvector there), before a build loads any model."""
    if location not in (None, DEFAULT):
        _backend("pgvector").check(location)


def open(version):
    """The chunks of a committed version (what ``RagIndex`` searches)."""
    entry = _entry(version)
    return _backend(entry["backend"]).open(entry)


def row_hashes(version) -> dict[str, str]:
    """row id -> content hash of every row in a committed version."""
    entry = _entry(version)
    return _backend(entry["backend"]).row_hashes(entry)


def release(version) -> None:
    """Remove what ``version`` keeps outside its folder (a server table), before it is removed."""
    entry = _entry(version)
    _backend(entry["backend"]).drop(entry)


def vector_store(vectors):
    """A committed version's chunks as a llama-index vector store."""
    return vectors.vector_store()


def _entry(version) -> dict:
    stored = version.manifest.get("index", {}).get("store", "model/index.duckdb")
    if isinstance(stored, str):  # versions made before the store interface name their DuckDB file
        stored = {"backend": DEFAULT, "file": stored}
    return {**stored, "folder": version.path, "label": f"{version.name}@{version.version}"}


def _backend(name: str):
    return importlib.import_module(f"{__name__}.{name}")
