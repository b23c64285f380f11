"""Where the Python API's defaults come from.

Once ``%load_ext nbcustom`` ran, the kernel's ``NbCustom`` magics are the source: a call
without ``store=`` or ``ui=`` uses what ``%config NbCustom.x`` set, so magics and the API
in one notebook share one store, and SQL given to the API sees the notebook's tables as the
magics' SQL does (the DuckDB database already is one session for both).
Elsewhere (scripts, the console command) the environment variables and the defaults apply.
"""

from __future__ import annotations

import os

# setting -> (environment variable, default)
ENVIRONMENT = {
    "store": ("NBCUSTOM_STORE", "nbcustom_store"),
    "ui": ("NBCUSTOM_UI", "auto"),
    "vector_store": ("NBCUSTOM_VECTOR_STORE", ""),
    "launcher": ("NBCUSTOM_LAUNCHER", ""),
    "tracking": ("NBCUSTOM_TRACKING", "none"),
    "worker": ("NBCUSTOM_WORKER", "on"),
    "memory_limit": ("NBCUSTOM_MEMORY_LIMIT", ""),
}

_kernel = None  # the loaded NbCustom magics; their traitlets hold the kernel's settings
_given: dict = {}  # a training worker's settings, as the kernel had them (``restore``)


def use(source) -> None:
    """Make ``source`` (the kernel's ``NbCustom`` magics) the source of the API's defaults."""
    global _kernel
    _kernel = source


def get(name: str):
    """The setting ``name``: the kernel's where the extension is loaded, else the environment's."""
    value = getattr(_kernel, name) if _kernel is not None else _given.get(name)
    return value or environment(name)


def snapshot() -> dict:
    """Every setting as it is now, for a training worker (``restore`` there)."""
    return {name: get(name) for name in ENVIRONMENT}


def restore(values: dict) -> None:
    _given.update(values)


def environment(name: str) -> str:
    """The setting ``name`` from its environment variable, else its default."""
    variable, default = ENVIRONMENT[name]
    return os.environ.get(variable, default)


def namespace() -> dict | None:
    """The kernel's notebook variables, where the extension is loaded (for ``{{var}}`` and
    the DataFrames SQL names)."""
    return _kernel.shell.user_ns if _kernel is not None else None
