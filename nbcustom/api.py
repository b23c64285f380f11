"""The public API: the one path the magics, the Python API and the CLI all take.

magic -> api -> data (rows) -> engine (train, evaluate; reports to a display) -> store
(commit) -> display (summary).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import uuid
from importlib import metadata
from typing import Any, Mapping

from . import data as _data, tracking
from .display import Summary, make_display
from .engines import EXPORTS, Outcome, engine, exporter
from .errors import NbCustomError
from .hashing import frame_sha256
from .specs import ExportSpec, FinetuneSpec, PredictSpec, RagSpec, RetrainSpec
from .store import Store, Version, check_name, parse_ref

LIBRARIES = {
    "llm": ("torch", "transformers", "peft"),
    "automl": ("autogluon.tabular", "autogluon.timeseries"),
    "rag": ("llama-index-core", "sentence-transformers", "transformers", "torch"),
}


def default_store() -> str:
    return os.environ.get("NBCUSTOM_STORE", "nbcustom_store")


def default_ui() -> str:
    return os.environ.get("NBCUSTOM_UI", "auto")


def _store(store: str | os.PathLike | Store | None) -> Store:
    return store if isinstance(store, Store) else Store(store or default_store())


def rows_of(data: Any, namespace: Mapping[str, Any] | None = None, con=None, params=None):
    """SQL text or a DataFrame -> a non-empty ``pandas.DataFrame``."""
    frame = _data.to_pandas(data, namespace=namespace, con=con, params=params)
    if frame.empty:
        raise NbCustomError("the query returned no rows: check its WHERE clause and the table's contents")
    return frame


def finetune(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, params=None, **options) -> Version:
    """Fine-tune ``name`` on ``data`` (SQL text or a DataFrame).

    A new NAME or an LLM: LoRA fine-tuning of ``base``. An AutoML NAME (made by
    ``retrain``): an update on the new rows only, with the previous version's model types.
    """
    check_name(name)
    spec = FinetuneSpec.from_options(**options)
    store = _store(store)
    kind = store.kind(name) or "llm"
    if kind == "rag":
        raise NbCustomError(f"{name} is a RAG index: refresh it with %%rag {name}")
    rows = rows_of(data, namespace, con, params)
    previous = _previous(store, name, spec.from_version)
    train = engine("llm").train if kind == "llm" else engine("automl").update
    return _commit("finetune", name, kind, spec, data, rows, previous, train, store, ui, params)


def retrain(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, params=None, **options) -> Version:
    """Train an AutoGluon model from scratch on the previous version's rows plus ``data``."""
    check_name(name)
    spec = RetrainSpec.from_options(**options)
    store = _store(store)
    kind = store.kind(name)
    if kind not in (None, "automl"):
        raise NbCustomError(f"{name} is a {kind} model; %%retrain makes AutoML models: choose another name")
    previous = store.active(name)
    spec.inherit((previous.manifest.get("schema") or previous.manifest.get("options")) if previous else None)
    rows = rows_of(data, namespace, con, params)
    return _commit("retrain", name, "automl", spec, data, rows, previous, engine("automl").train, store, ui, params)


def rag(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, params=None, **options) -> Version:
    """Build or incrementally refresh the retrieval index ``name`` from the rows of ``data``."""
    check_name(name)
    spec = RagSpec.from_options(**options)
    store = _store(store)
    kind = store.kind(name)
    if kind not in (None, "rag"):
        raise NbCustomError(f"{name} is a {kind} model, not a RAG index: choose another name")
    rows = rows_of(data, namespace, con, params)
    return _commit("rag", name, "rag", spec, data, rows, store.active(name), engine("rag").build, store, ui, params)


def ask(name: str, questions: str | list[str], *, top_k: int | None = None, version=None, store=None):
    """Answer each question from the index ``name``: a DataFrame with ``question``,
    ``answer`` and ``sources`` (id, score, snippet, metadata of each retrieved chunk)."""
    questions = [questions] if isinstance(questions, str) else list(questions)
    questions = [q.strip() for q in questions if q and q.strip()]
    if not questions:
        raise NbCustomError("no question given: write one question per line under %%rag NAME --ask")
    return load(name, version=version, store=store, kind="rag").ask(questions, top_k=top_k)


def rag_eval(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, top_k: int | None = None) -> Version:
    """RAG evaluation: the LLM alone (before) vs with retrieval (after), recorded with the
    active version (``metrics.before/after`` in its manifest and ``eval.parquet``)."""
    store = _store(store)
    current = store.get(check_name(name))
    if current.kind != "rag":
        raise NbCustomError(f"{name} is a {current.kind} model: --eval is for RAG indexes")
    rows = rows_of(data, namespace, con)
    display = make_display(ui or default_ui(), f"%%rag {name} --eval")
    try:
        index = engine("rag").load(current)
        outcome = index.evaluate(rows, display, top_k=top_k)
        updated = store.update(
            name, current.version, metrics={"before": outcome.before, "after": outcome.after},
            write=lambda folder: outcome.examples.to_parquet(folder / "eval.parquet", index=False),
        )
    except BaseException as e:
        display.fail(e)
        raise
    display.finish(_summary(f"%%rag {name} --eval  (v{current.version})", outcome, {"questions": len(rows)}))
    tracking.log_version(updated, store.root, evaluation=True)
    return updated


def predict(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, **options):
    """The rows of ``data`` with the model's output appended, as a ``pandas.DataFrame``."""
    spec = PredictSpec.from_options(**options)
    rows = rows_of(data, namespace, con)
    model = load(name, version=spec.version, store=store)
    result = model.predict(rows, **{k: v for k, v in (("max_new_tokens", spec.max_new_tokens), ("top_k", spec.top_k)) if v})
    if spec.into:
        check_name(spec.into)
        target = con if con is not None else _data.default_session().con
        target.register("__nbcustom_predictions", result)
        try:
            target.execute(f'CREATE OR REPLACE TABLE "{spec.into}" AS SELECT * FROM __nbcustom_predictions')
        finally:
            target.unregister("__nbcustom_predictions")
    return result


def load(name: str, version: int | None = None, *, store=None, kind: str | None = None):
    """The model ``name`` (active version or ``version``) ready to use: an LLM generator,
    an AutoML predictor or a RAG index, each with ``.predict(rows)``."""
    current = _store(store).get(check_name(name), version)
    if kind and current.kind != kind:
        raise NbCustomError(f"{name} is a {current.kind} model, not {kind}")
    return engine(current.kind).load(current)


def _previous(store: Store, name: str, version: int | None) -> Version | None:
    if version is not None:
        return store.get(name, version)
    return store.active(name)


def _commit(magic, name, kind, spec, data, rows, previous, train, store: Store, ui, params=None) -> Version:
    """Run ``train`` inside a staging build and commit the version; show the summary."""
    started = _dt.datetime.now()
    display = make_display(ui or default_ui(), f"%%{magic} {name}")
    try:
        with store.build(name, kind) as build:
            outcome: Outcome = train(spec, rows, previous, build, display)
            display.phase("saving")
            _write_outcome(build.path, outcome)
            build.manifest.update(
                {
                    "magic": magic,
                    "options": spec.to_dict(),
                    "sql": data if isinstance(data, str) else None,
                    **({"params": params} if params else {}),
                    "data": {"rows": len(rows), "columns": list(map(str, rows.columns)), "sha256": frame_sha256(rows)},
                    "parent": previous.version if previous else None,
                    "metrics": {"before": outcome.before, "after": outcome.after},
                    "counts": {"read": len(rows), **outcome.counts},
                    "libraries": libraries(kind),
                    "run": {"id": uuid.uuid4().hex, "magic": magic, "started": started.isoformat(timespec="seconds")},
                    **outcome.info,
                }
            )
    except BaseException as e:
        display.fail(e)
        raise
    facts = {"version": build.version, **{k: v for k, v in build.manifest["counts"].items()}}
    outcome.after_label = outcome.after_label or f"v{build.version}"
    display.finish(_summary(f"%%{magic} {name} -> v{build.version}", outcome, facts))
    committed = Version(name, build.version, store.root / name / f"v{build.version}", build.manifest)
    tracking.log_version(committed, store.root)
    return committed


def _write_outcome(folder, outcome: Outcome) -> None:
    if outcome.train_rows is not None:
        outcome.train_rows.to_parquet(folder / "train.parquet", index=False)
    if outcome.examples is not None:
        outcome.examples.to_parquet(folder / "eval.parquet", index=False)
    for stem, png in outcome.charts.items():
        (folder / f"{stem}.png").write_bytes(png)


def _summary(title: str, outcome: Outcome, facts: dict) -> Summary:
    charts = dict(outcome.charts)
    if outcome.before and outcome.after:
        from .display.charts import before_after_chart

        charts.setdefault("before_after", before_after_chart(outcome.before, outcome.after, before_label=outcome.before_label, after_label=outcome.after_label))
    tables = dict(outcome.tables)
    if outcome.examples is not None and "examples" not in tables:
        tables["examples"] = outcome.examples
    return Summary(
        title, outcome.before, outcome.after, outcome.before_label, outcome.after_label,
        facts=facts, tables=tables, charts=charts, notes=list(outcome.notes),
    )


def libraries(kind: str) -> dict[str, str]:
    versions = {}
    for package in ("nbcustom", "duckdb", "pandas", *LIBRARIES.get(kind, ())):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def export(name: str, *, version: int | None = None, store=None, **options) -> list[str]:
    """Write version ``name`` (``NAME`` or ``NAME@V``; default the active version) in
    ``format`` into ``to``, a new or empty folder outside the store; returns what was written.

    The version's checksums are verified first. The export is written into a hidden
    folder beside ``to`` and renamed into place, so a failed export leaves nothing.
    """
    name, at = parse_ref(name)
    spec = ExportSpec.from_options(**options)
    store = _store(store)
    current = store.get(name, version or at)
    kind, write = exporter(spec.format)
    if current.kind != kind:
        fits = ", ".join(f for f, (k, _) in EXPORTS.items() if k == current.kind)
        raise NbCustomError(f"--format {spec.format} is for {kind} models and {name} is {current.kind}: use --format {fits}")
    target = _export_folder(spec.to, store)
    made = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        lines = write(current, staging, spec)
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # parents this export created
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return [f"{name}@{current.version} -> {spec.format}: {target}", *lines]


def _export_folder(to: str, store: Store):
    from pathlib import Path

    target = Path(to).expanduser().absolute()
    if target == store.root or store.root in target.parents:
        raise NbCustomError(f"--to {to} is inside the store {store.root}: export to a folder outside it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise NbCustomError(f"--to {to} already exists and is not empty: choose a new folder or empty it")
    return target
