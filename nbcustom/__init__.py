"""nbcustom: fine-tune, retrain and RAG over the notebook's DuckDB tables.

``%load_ext nbcustom`` registers ``%%finetune``, ``%%retrain``, ``%%rag``, ``%%predict`` and
``%nbc``. The same operations are plain functions here. Nothing heavy (torch, transformers,
autogluon, llama_index) is imported until a run needs it.
"""

from .api import ask, drift, export, finetune, forecast, load, predict, rag, rag_eval, rag_prompts, retrain, retrieve
from .data import default_session
from .errors import NbCustomError
from .store import Store

__version__ = "0.1.0"
__all__ = ["NbCustomError", "Store", "ask", "check", "connection", "drift", "export", "finetune", "forecast", "load", "predict", "rag", "rag_eval", "rag_prompts", "retrain", "retrieve"]


def connection():
    """The DuckDB connection the magics and the API query by default."""
    return default_session().con


def check(name: str | None = None, repair: bool = False, store=None) -> list:
    """What is wrong in the store (or with model ``name``): one ``Finding`` each, empty if
    nothing. ``repair=True`` fixes what the version folders say how to fix (``.repaired``
    says what it did); a version that fails its checksums is reported, never deleted."""
    from .api import _store

    return _store(store).check(name, repair=repair)


def load_ipython_extension(shell) -> None:
    """``%load_ext nbcustom``."""
    from .magics import load_ipython_extension as load

    load(shell)
