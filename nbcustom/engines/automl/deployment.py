"""AutoML export: AutoGluon's predict-only copy of a version's predictor (``deployment``),
loadable with ``TabularPredictor.load`` / ``TimeSeriesPredictor.load``.

Tabular: ``clone_for_deployment`` keeps only the models the best one needs and drops what
only training uses. With ``--refit`` the models are first refit on all rows
(``refit_full``), in a scratch clone: refitting writes into the predictor's folder, and the
store's copy must stay as it was committed. AutoGluon has no predict-only clone for time
series, so a time-series export is a copy of the predictor (refit first with ``--refit``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .common import quiet
from .tabular import PREDICTOR


def export(version, folder: Path, spec) -> list[str]:
    source = version.model_dir / PREDICTOR
    task = version.manifest.get("task", "tabular")
    scratch = Path(tempfile.mkdtemp(prefix=".nbcustom-refit-", dir=folder.parent))
    try:
        with quiet():
            if task == "timeseries":
                from autogluon.timeseries import TimeSeriesPredictor

                predictor = TimeSeriesPredictor.load(str(source))
                if spec.refit:
                    shutil.copytree(source, scratch, dirs_exist_ok=True)
                    predictor = TimeSeriesPredictor.load(str(scratch))
                    predictor.refit_full()
                shutil.copytree(predictor.path, folder, dirs_exist_ok=True)
                model = predictor.model_best
            else:
                from autogluon.tabular import TabularPredictor

                predictor = TabularPredictor.load(str(source), verbosity=0, require_py_version_match=False)
                if spec.refit:
                    predictor = predictor.clone(path=str(scratch), return_clone=True, dirs_exist_ok=True)
                    predictor.refit_full()
                model = predictor.model_best
                predictor.clone_for_deployment(path=str(folder), dirs_exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loader = "TimeSeriesPredictor" if task == "timeseries" else "TabularPredictor"
    stored, exported = size_mib(source), size_mib(folder)
    return [
        f"{loader} with {model}" + (" refit on all rows" if spec.refit else ""),
        f"size: {exported:.1f} MiB (the version's predictor: {stored:.1f} MiB)",
        f"load it with {loader}.load({spec.to!r})",
    ]


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20
