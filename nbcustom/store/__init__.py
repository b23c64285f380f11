"""The versioned artifact store and its catalog (see ``store`` for the crash-safety rules).

``store``       Store, Version, Build, names; commit, update, remove, reads
``layout``      where things are in the store folder; .active/NAME; manifests
``staging``     work in progress owned by live processes; leftovers of dead ones
``catalog_db``  catalog.duckdb: schema, read-only reads, rebuild from the folders
``repair``      the sweep after a crash and ``check``
``files``       checksums, fsync, atomic writes and swaps, locks
"""

from .files import MANIFEST, checksums, lock_file, sha256, unlock_file
from .repair import Finding
from .store import NAME, Build, ReadOnlyStore, Store, Version, check_name, parse_ref, parse_version

__all__ = ["MANIFEST", "NAME", "Build", "Finding", "ReadOnlyStore", "Store", "Version", "check_name", "checksums",
           "lock_file", "parse_ref", "parse_version", "sha256", "unlock_file"]
