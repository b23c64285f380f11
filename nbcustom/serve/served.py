"""What the server answers with: the store's LLM and RAG versions by OpenAI model id.

``NAME`` is the active version, looked up at every request, so ``%nbc activate`` and
promotions take effect without a restart; ``NAME@V`` is version V. LLM versions share their
base model (one per base, ``batching.Base``), each version a LoRA adapter on it; a RAG
version is its ``RagIndex``. Everything loads on first use.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .. import models
from ..errors import NbCustomError
from ..store import Store
from .batching import Base

KINDS = ("llm", "rag")


class NotServed(LookupError):
    """A model id this server does not serve (HTTP 404)."""


class Served:
    def __init__(self, store: Store, names: list[str] | None = None):
        self.store = store
        self.names = names or None  # None: every LLM and RAG model of the store
        self._lock = threading.Lock()
        self._bases: dict[tuple, Base] = {}
        self._versions: dict[tuple, object] = {}  # (name, version) -> Version, checksums verified once
        self._indexes: dict[tuple, object] = {}
        self._ids: tuple | None = None  # (the store's file stamps, ids)

    def _models(self) -> list[str]:
        names = [m["name"] for m in self.store.models() if m["kind"] in KINDS]
        return names if self.names is None else [n for n in names if n in {w.split("@")[0] for w in self.names}]

    def ids(self) -> list[dict]:
        """Every id served: NAME (the active version) and NAME@V of each version; read again
        from the catalog only after the store changed (a query per request slows batches)."""
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (
            self.store.root / "catalog.duckdb", self.store.root / "catalog.duckdb.wal", self.store.root / ".active"))
        with self._lock:
            if self._ids and self._ids[0] == stamp:
                return self._ids[1]
        out = self._read_ids()
        with self._lock:
            self._ids = (stamp, out)
        return out

    def _read_ids(self) -> list[dict]:
        out = []
        for name in self._models():
            versions = self.store.versions(name)
            active = self.store.active_version(name)
            if self.names is None or name in self.names:
                out.append({"id": name, "kind": self.store.kind(name), "version": active, "created": versions[-1]["created"] if versions else None})
            for v in versions:
                if self.names is None or name in self.names or f"{name}@{v['version']}" in self.names:
                    out.append({"id": f"{name}@{v['version']}", "kind": v["kind"], "version": v["version"], "created": v["created"]})
        return out

    def version(self, model_id: str):
        """The version behind ``model_id``, or ``NotServed``."""
        name, _, number = model_id.partition("@")
        if not any(i["id"] == model_id for i in self.ids()):
            raise NotServed(f"The model `{model_id}` does not exist or is not served here; GET /v1/models lists what is")
        try:
            version = int(number) if number else next(i["version"] for i in self.ids() if i["id"] == name)
        except ValueError:
            raise NotServed(f"The model `{model_id}` does not exist") from None
        key = (name, version)
        with self._lock:
            if key not in self._versions:
                self._versions[key] = self.store.get(name, version)
            return self._versions[key]

    def base(self, version) -> Base:
        """The base model of an LLM version in the precision ``%%predict`` computes it in
        (loaded once, shared by the versions computed alike)."""
        from ..engines.llm.generator import Generator

        info = version.manifest.get("base", {})
        path = Path(info["path"]) if info.get("path") and Path(info["path"]).is_dir() else models.resolve_llm(info.get("name"))
        run_on = Generator(version).run_on
        key = (str(path), run_on.device, run_on.compute)
        with self._lock:
            if key not in self._bases:
                self._bases[key] = Base(path, run_on)
            return self._bases[key]

    def bases(self) -> list[Base]:
        with self._lock:
            return list(self._bases.values())

    def index(self, version):
        """The ``RagIndex`` of a RAG version."""
        from ..engines.rag import load

        key = (version.name, version.version)
        with self._lock:
            if key not in self._indexes:
                self._indexes[key] = load(version)
            return self._indexes[key]


def check_names(store: Store, names: list[str]) -> None:
    """One line for a name that is not an LLM or RAG model of the store."""
    for given in names:
        name, _, number = given.partition("@")
        kind = store.kind(name)
        if kind is None:
            have = ", ".join(m["name"] for m in store.models() if m["kind"] in KINDS) or "none"
            raise NbCustomError(f"serve {given}: no such model in {store.root} (LLM and RAG models: {have})")
        if kind not in KINDS:
            raise NbCustomError(f"serve {given}: {name} is a {kind} model; the server answers with LLM and RAG models (use %%predict for it)")
        if number:
            store.get(name, number, verify=False)
