"""The RAG engine: build or refresh an index over rows (``build``) and answer from a
version (``load``).

Parts: ``index`` (documents, refresh, ``RagIndex``), ``models`` (embedding and answering
models for llama-index), ``stores/`` (where the vectors live: ``duckdb``, ``pgvector``);
``release`` frees a version's server table before ``%nbc rm`` removes it.
"""

from .index import RagIndex, build, load
from .stores import release

__all__ = ["RagIndex", "build", "load", "release"]
