"""Where a RAG version's chunks and vectors live: ``duckdb`` (a file in the version)."""
