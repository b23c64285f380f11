"""AutoGluon engine: ``%%retrain`` (tabular and time series), the AutoML branch of
``%%finetune`` and ``%%predict`` for AutoML models.

This module holds the entry points ``api`` calls. The tasks live in ``tabular`` and
``timeseries``; what both share (rows across versions, the stable hash holdout, keeping
AutoGluon quiet) in ``common``.
"""

from __future__ import annotations

from ...errors import NbCustomError


def train(spec, rows, previous, build, display, rows_from=None):
    """``%%retrain``: a new version trained from scratch on the previous rows plus ``rows``.

    ``rows_from``: a later version than ``previous`` (one left inactive) whose rows to build
    on instead, so rows a job read into it are not lost; ``previous`` stays the version the
    new one is compared with."""
    task = "timeseries" if spec.timestamp else "tabular"
    if previous is not None and previous.manifest.get("task", task) != task:
        raise NbCustomError(
            f"{previous.name} is a {previous.manifest.get('task')} model; "
            + ("add --timestamp COL" if task == "tabular" else "drop --timestamp")
            + " or choose another name"
        )
    return _task(task).train(spec, rows, previous, build, display, rows_from)


def update(spec, rows, previous, build, display, rows_from=None):
    """``%%finetune`` on an AutoML model: fit on ``rows`` only, reusing the previous
    version's model type and hyperparameters (no search)."""
    return _task(previous.manifest.get("task", "tabular")).update(spec, rows, previous, build, display, rows_from)


def drift_of(version, rows):
    """Per-column drift of ``rows`` against ``version``'s training rows (see ``drift``)."""
    return _task(version.manifest.get("task", "tabular")).drift(version, rows)


def load(version):
    """The version's predictor, with ``.predict(rows) -> DataFrame``."""
    return _task(version.manifest.get("task", "tabular")).load(version)


def _task(task: str):
    if task == "timeseries":
        from . import timeseries

        return timeseries
    from . import tabular

    return tabular
