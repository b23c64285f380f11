"""MLflow tracking: every committed version (and every RAG ``--eval``) as an MLflow run,
logged from the committed manifest once the version is safely in the store.

On with ``%config NbCustom.tracking = "mlflow"`` or ``NBCUSTOM_TRACKING=mlflow``. The run
goes to ``MLFLOW_TRACKING_URI``, else to a local SQLite store beside the artifact store
(``<store>/../mlruns/mlflow.db``, artifacts in ``mlruns/artifacts``), in an experiment
named after the model. Logged: the spec as params, ``before_*`` / ``after_*`` metrics,
the manifest's training curves as step metrics, the manifest, ``eval.parquet`` and the
charts as artifacts, and tags with the store path, version and data sha256.

Logging reads the committed files instead of hooking into training (MLflow's autologging
breaks AutoGluon's pickling), and a tracking failure never costs the version: it is one
warning line. MLflow is imported only when a run is logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from . import settings
from .logs import quiet_loggers

MODES = ("none", "mlflow")
# MLflow retries an unreachable server for minutes by default; tracking gives up sooner
# unless the user has set these.
PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PARAM_CHARS, _TAG_CHARS = 6000, 8000  # MLflow's limits on a param and a tag value
BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def mode() -> str:
    """``NbCustom.tracking`` of the kernel with the extension loaded, else
    ``$NBCUSTOM_TRACKING``, else ``none``."""
    return settings.get("tracking") or "none"


def tracking_uri(store_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_folder(store_root) / 'mlflow.db'}"


def local_folder(store_root: Path) -> Path:
    return Path(store_root).parent / "mlruns"


def log_version(version, store_root: Path, evaluation: bool = False) -> str | None:
    """Log ``version`` as an MLflow run if tracking is on; the run id, or None. Never
    raises: a failure is one warning line on stderr."""
    if mode() != "mlflow":
        return None
    try:
        import mlflow  # noqa: F401  (importing it configures its loggers: quieten them after)

        with _quiet(), _patient():
            return _log(version, Path(store_root), evaluation)
    except Exception as e:  # the version is committed: tracking must not undo the cell
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"nbcustom: {version.name}@{version.version} is saved, but MLflow tracking failed: {reason}", file=sys.stderr)
        return None


def _log(version, store_root: Path, evaluation: bool) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    manifest = version.manifest
    client = MlflowClient(tracking_uri=tracking_uri(store_root))
    experiment = client.get_experiment_by_name(version.name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else (local_folder(store_root) / "artifacts").as_uri()
        experiment_id = client.create_experiment(version.name, artifact_location=local)
    tags = {
        "nbcustom.store": str(store_root), "nbcustom.name": version.name, "nbcustom.version": str(version.version),
        "nbcustom.kind": version.kind, "nbcustom.magic": "rag --eval" if evaluation else str(manifest.get("magic")),
        "nbcustom.data_sha256": str((manifest.get("data") or {}).get("sha256")),
        **({"nbcustom.sql": manifest["sql"][:_TAG_CHARS]} if manifest.get("sql") else {}),
    }
    run = client.create_run(experiment_id, run_name=f"v{version.version}" + (" --eval" if evaluation else ""), tags=tags)
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params(manifest).items()])
        points = [Metric(k, v, 0, s) for k, v, s in metrics(manifest)]
        for start in range(0, len(points), BATCH):
            client.log_batch(run_id, metrics=points[start:start + BATCH])
        for path in sorted(version.path.iterdir()):
            if path.name in ("manifest.json", "eval.parquet") or path.suffix == ".png":
                client.log_artifact(run_id, str(path))
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def params(manifest: dict) -> dict[str, str]:
    """The run's options (the spec as stored), plus the base model, as MLflow params."""
    values = dict(manifest.get("options") or {})
    base = manifest.get("base")
    if base:
        values["base"] = base.get("name") if isinstance(base, dict) else base
    return {_key(k): str(v)[:_PARAM_CHARS] for k, v in values.items() if v is not None}


def metrics(manifest: dict) -> list[tuple[str, float, int]]:
    """(key, value, step): ``before_*`` / ``after_*`` and ``count_*`` (rows read, trained, ...) at step 0, and each
    curve in the manifest's ``history`` (e.g. ``loss``, ``eval_loss``) step by step."""
    out = []
    for side in ("before", "after"):
        for key, value in ((manifest.get("metrics") or {}).get(side) or {}).items():
            if _number(value):
                out.append((_key(f"{side}_{key}"), float(value), 0))
    for key, value in (manifest.get("counts") or {}).items():
        if _number(value):
            out.append((_key(f"count_{key}"), float(value), 0))
    for key, points in (manifest.get("history") or {}).items():
        out.extend((_key(key), float(value), int(step)) for step, value in points if _number(value))
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _key(name: str) -> str:
    # MLflow keys allow letters, digits and _ - . / and space (``hit_rate@4`` -> ``hit_rate_4``)
    return re.sub(r"[^\w\-./ ]", "_", str(name))


@contextlib.contextmanager
def _patient():
    added = {k: v for k, v in PATIENCE.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _quiet():
    """MLflow's and its database migrations' info logs stay out of the cell."""
    return quiet_loggers("mlflow", "alembic", "urllib3")
