"""The public API: the one path the magics, the Python API and the CLI all take.

magic -> api -> data (rows) -> engine (train, evaluate; reports to a display) -> store
(commit) -> display (summary).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import shutil
import time
import uuid
from importlib import metadata
from typing import Any, Mapping

from . import data as _data, promotion, settings, tracking, worker
from .display import Summary, make_display
from .engines import EXPORTS, Outcome, engine, exporter
from .errors import NbCustomError
from .hashing import frame_sha256
from .specs import AnswerSpec, ExportSpec, FinetuneSpec, PredictSpec, RagSpec, RetrainSpec
from .store import NAME, Store, Version, check_name, parse_ref
from .catalog import known

LIBRARIES = {
    "llm": ("torch", "transformers", "peft"),
    "automl": ("autogluon.tabular", "autogluon.timeseries"),
    "rag": ("llama-index-core", "sentence-transformers", "transformers", "torch"),
}


STREAM_ROWS = 256  # rows an LLM or a RAG index predicts at a time for --into
KEEP, PREVIEW = 10_000, 10  # %%predict --into returns the rows it wrote up to KEEP of them, else the first PREVIEW


def default_store() -> str:
    return settings.get("store")


def default_ui() -> str:
    return settings.get("ui")


def default_vector_store() -> str | None:
    return settings.get("vector_store") or None


def default_launcher() -> str | None:
    return settings.get("launcher") or None


def _store(store: str | os.PathLike | Store | None) -> Store:
    return store if isinstance(store, Store) else Store(store or default_store())


def rows_of(data: Any, namespace: Mapping[str, Any] | None = None, con=None, params=None):
    """SQL text or a DataFrame -> a non-empty ``pandas.DataFrame``."""
    namespace = namespace if namespace is not None else settings.namespace()
    frame = _data.to_pandas(data, namespace=namespace, con=con, params=params)
    if frame.empty:
        raise NbCustomError(_data.NO_ROWS)
    return frame


def finetune(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, params=None, **options) -> Version:
    """Fine-tune ``name`` on ``data`` (SQL text or a DataFrame).

    A new NAME or an LLM: LoRA fine-tuning of ``base``. An AutoML NAME (made by
    ``retrain``): an update on the new rows only, with the previous version's model types.
    """
    check_name(name)
    if options.get("launcher") is None:
        options["launcher"] = default_launcher()
    spec = FinetuneSpec.from_options(**options)
    store = _store(store)
    kind = store.kind(name) or "llm"
    if kind == "rag":
        raise NbCustomError(f"{name} is a RAG index: refresh it with %%rag {name}")
    if kind == "automl" and spec.method not in ("auto", "sft"):
        raise NbCustomError(f"--method {spec.method} is for LLMs; {name} is an AutoML model: leave --method out")
    rows = rows_of(data, namespace, con, params)
    previous = _previous(store, name, spec.from_version)
    train = engine("llm").train if kind == "llm" else functools.partial(engine("automl").update, rows_from=_newest(store, previous))
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
    train = functools.partial(engine("automl").train, rows_from=_newest(store, previous))
    return _commit("retrain", name, "automl", spec, data, rows, previous, train, store, ui, params)


def rag(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, params=None, **options) -> Version:
    """Build or incrementally refresh the retrieval index ``name`` from the rows of ``data``."""
    check_name(name)
    if options.get("vector_store") is None:
        options["vector_store"] = default_vector_store()
    spec = RagSpec.from_options(**options)
    store = _store(store)
    kind = store.kind(name)
    if kind not in (None, "rag"):
        raise NbCustomError(f"{name} is a {kind} model, not a RAG index: choose another name")
    if spec.where:
        raise NbCustomError("--where filters answers: use it with --ask, --eval or %%predict, not when building an index")
    namespace = namespace if namespace is not None else settings.namespace()
    # the rows go to the version's train.parquet as they are read; the build reads them back
    rows = functools.partial(_data.spool, data, namespace=namespace, con=con, params=params)
    return _commit("rag", name, "rag", spec, data, rows, store.active(name), engine("rag").build, store, ui, params)


def ask(name: str, questions: str | list[str], *, top_k: int | None = None, version=None, store=None,
        search: str | None = None, where: str | None = None, llm: str | None = None, answers: str | None = None):
    """Answer each question from the index ``name``: a DataFrame with ``question``,
    ``answer`` and ``sources`` (id, score, snippet, metadata of each retrieved chunk).

    ``search``: vector, keyword or hybrid (default: the index's); ``where``: a SQL predicate
    on the metadata columns, applied before ranking; ``llm``: the reader, a ``%%finetune``d
    LLM in the store (or a model name) instead of the index's answering model; ``answers``:
    grounded (the default: the answer's sentences the sources support, else the source
    sentence that best matches the question), generated (the model's answer as it is) or
    extractive (that source sentence, no model). ``faithfulness`` is the share of the
    answer's sentences the sources support."""
    answering = AnswerSpec.from_options(top_k=top_k, search=search, where=where, llm=llm, answers=answers)
    questions = _questions(questions, "--ask")
    store = _store(store)
    index = load(name, version=version, store=store, kind="rag")
    return index.ask(questions, top_k=answering.top_k, search=answering.search, where=answering.where,
                     llm=_reader(store, answering.llm), answers=answering.answers)


def retrieve(name: str, questions: str | list[str], *, top_k: int | None = None, version=None, store=None,
             search: str | None = None, where: str | None = None):
    """The chunks of the index ``name`` that answer each question, ranked, and nothing
    generated (for your own reader, or to measure retrieval alone): a DataFrame with one row
    per question and rank: ``question``, ``rank``, ``id``, ``score`` (``vector_score`` and
    ``keyword_score`` beside it in hybrid search), ``snippet``, ``metadata``. ``top_k``,
    ``search`` and ``where`` as for ``ask``."""
    import pandas as pd

    answering = AnswerSpec.from_options(top_k=top_k, search=search, where=where)
    questions = _questions(questions, "--retrieve")
    index = load(name, version=version, store=_store(store), kind="rag")
    found = index.retrieve(questions, answering.top_k, answering.search, answering.where)
    rows = [{"question": q, "rank": rank, **{k: v for k, v in source.items() if k != "text"}}
            for q, sources in zip(questions, found) for rank, source in enumerate(sources, 1)]
    columns = ["question", "rank", "id", "score", "vector_score", "keyword_score", "snippet", "metadata"]
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[c for c in columns if c in frame.columns or not c.endswith("_score")])


def _questions(questions: str | list[str], flag: str) -> list[str]:
    """The non-blank questions, stripped; one line if there is none."""
    questions = [questions] if isinstance(questions, str) else list(questions)
    questions = [q.strip() for q in questions if q and q.strip()]
    if not questions:
        raise NbCustomError(f"no question given: write one question per line under %%rag NAME {flag}")
    return questions


def rag_prompts(name: str, qa_rows: Any, *, version=None, store=None, namespace=None, con=None,
                top_k: int | None = None, search: str | None = None, where: str | None = None):
    """Question/answer rows -> fine-tuning rows for a reader of the index ``name``:
    ``question``, ``system``, ``prompt`` (exactly what ``ask`` gives the model, retrieved
    context included) and ``response`` (the reference ``answer``). ``%%finetune`` them, then
    answer with ``ask(..., llm=READER)`` or ``%%rag NAME --ask --llm READER``."""
    AnswerSpec.from_options(top_k=top_k, search=search, where=where)
    rows = rows_of(qa_rows, namespace, con)
    return load(name, version=version, store=store, kind="rag").prompts(rows, top_k=top_k, search=search, where=where)


def _reader(store: Store, llm: str | None):
    """``--llm`` at answer time: a ``%%finetune``d LLM of the store (its generator), else
    the name of an answering model (a path or Hugging Face id), found now so an unknown one
    fails before any model loads, and passed on as it is."""
    if llm is None:
        return llm
    if not NAME.fullmatch(llm) or store.kind(llm) is None:
        from . import models

        models.resolve_llm(llm)
        return llm
    if store.kind(llm) != "llm":
        raise NbCustomError(f"--llm {llm}: that is a {store.kind(llm)} model; name an LLM made by %%finetune or a model")
    return engine("llm").load(store.get(llm))


def rag_eval(name: str, data: Any, *, namespace=None, con=None, store=None, ui=None, top_k: int | None = None,
             search: str | None = None, where: str | None = None, llm: str | None = None, answers: str | None = None) -> Version:
    """RAG evaluation: the LLM alone (before) vs with retrieval (after), recorded with the
    active version (``metrics.before/after`` in its manifest and ``eval.parquet``).
    ``search``, ``where``, ``llm`` and ``answers`` as for ``ask``; both sides use the same reader."""
    AnswerSpec.from_options(top_k=top_k, search=search, where=where, llm=llm, answers=answers)
    store = _store(store)
    current = store.get(known(store, name))
    if current.kind != "rag":
        raise NbCustomError(f"{name} is a {current.kind} model: --eval is for RAG indexes; name an index made by %%rag")
    rows = rows_of(data, namespace, con)
    reader = _reader(store, llm)
    display = make_display(ui or default_ui(), f"%%rag {name} --eval")
    try:
        index = engine("rag").load(current)
        outcome = index.evaluate(rows, display, top_k=top_k, search=search, where=where, llm=reader, answers=answers)
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
    """The rows of ``data`` with the model's output appended, as a ``pandas.DataFrame``.

    With ``into``, the result goes to that DuckDB table as it is made: an LLM or a RAG index
    predicts ``STREAM_ROWS`` rows at a time, read from the query in Arrow batches, and the
    table replaces any old one only once every row is in. The rows are returned when they
    are at most ``KEEP``, else the first ``PREVIEW`` (``attrs``: ``rows``, ``into``)."""
    spec = PredictSpec.from_options(**options)
    blank = isinstance(data, str) and not data.strip()  # a forecaster without a query: the steps after its own rows
    rows = None if blank or spec.into else rows_of(data, namespace, con)
    store = _store(store)
    current = store.get(known(store, name), spec.version)
    if current.kind != "rag" and (spec.where or spec.search or spec.answers):
        raise NbCustomError(f"--where, --search and --answers are for RAG indexes; {name} is a {current.kind} model: leave them out")
    model = engine(current.kind).load(current)
    chosen = (("max_new_tokens", spec.max_new_tokens), ("top_k", spec.top_k), ("search", spec.search), ("where", spec.where),
              ("answers", spec.answers))
    kwargs = {k: v for k, v in chosen if v}
    if blank and hasattr(model, "forecast"):
        parts = [(model.forecast(), None)]
    elif spec.into and getattr(model, "rowwise", False):
        parts = ((model.predict(part, **kwargs), total) for part, total in _data.batches(data, STREAM_ROWS, namespace, con))
    else:
        rows = rows if rows is not None else rows_of(data, namespace, con)
        parts = [(model.predict(rows, **kwargs), len(rows))]
    if not spec.into:
        return parts[0][0]
    target = con if con is not None else _data.default_session().con
    display = make_display(ui or default_ui(), f"%%predict {name} --into {spec.into}")
    try:
        display.phase("predicting")
        result, written = _data.write_parts(target, spec.into, parts, KEEP, PREVIEW, lambda done, total: display.step(done, total))
    except BaseException as e:
        display.fail(e)
        raise
    seconds = time.monotonic() - display.started
    display.finish(Summary(f"%%predict {name} --into {spec.into}", facts={
        "rows": written, "table": spec.into, "seconds": round(seconds, 1), "rows/s": round(written / max(seconds, 1e-9), 1)}))
    result.attrs.update(rows=written, into=spec.into)
    return result


def forecast(name: str, *, version: int | None = None, store=None):
    """The next ``--horizon`` steps of every series of the time-series model ``name`` after
    its own rows (``%%predict NAME`` with an empty body); a model with known covariates needs
    their planned values: ``predict(name, planned_rows)``."""
    model = load(name, version, store=store)
    if not hasattr(model, "forecast"):
        raise NbCustomError(f"{name} is not a time-series model: forecast() is for models made by %%retrain --timestamp; use predict(name, rows)")
    return model.forecast()


def load(name: str, version: int | None = None, *, store=None, kind: str | None = None):
    """The model ``name`` (active version or ``version``) ready to use: an LLM generator,
    an AutoML predictor or a RAG index, each with ``.predict(rows)``."""
    store = _store(store)
    current = store.get(known(store, name), version)
    if kind and current.kind != kind:
        raise NbCustomError(f"{name} is a {current.kind} model, not {kind}: choose a {kind} model (see %nbc list)")
    return engine(current.kind).load(current)


def drift(name: str, data: Any = None, *, version: int | None = None, namespace=None, con=None, store=None):
    """Per-column drift of the rows of ``data`` against the training rows of ``name`` (active
    version or ``version``), without training: a DataFrame with each column's PSI, share of
    unseen categories and of nulls, the largest PSI first. Without ``data``: the figures the
    version recorded when it was trained."""
    import pandas as pd

    store = _store(store)
    current = store.get(known(store, name), version, verify=data is not None)
    if current.kind != "automl":
        raise NbCustomError(f"{name} is a {current.kind} model: drift is measured for tabular and time-series models; choose one made by %%retrain")
    if data is None:
        figures = current.manifest.get("drift")
        if figures is None:
            raise NbCustomError(f"{name}@{current.version} recorded no drift (it read no new rows of an earlier version): give a query, e.g. %nbc drift {name} SELECT * FROM new_rows")
    else:
        figures = engine("automl").drift_of(current, rows_of(data, namespace, con))
        if figures is None:
            raise NbCustomError(f"every row of the query is already among {name}@{current.version}'s training rows: there is nothing new to compare")
    return pd.DataFrame(figures["columns"], columns=["column", "type", "psi", "unseen", "old_nulls", "new_nulls"])


def _previous(store: Store, name: str, version: int | None) -> Version | None:
    if version is not None:
        return store.get(known(store, name), version)
    return store.active(name)


def _newest(store: Store, previous: Version | None) -> Version | None:
    """The newest version when it is newer than ``previous`` (it was not promoted): AutoML
    runs build on its rows, so rows read into a version left inactive are not lost."""
    newest = max((row["version"] for row in store.versions(previous.name)), default=None) if previous else None
    return store.get(previous.name, newest) if previous and newest != previous.version else None


def _commit(magic, name, kind, spec, data, rows, previous, train, store: Store, ui, params=None) -> Version:
    """Run ``train`` inside a staging build and commit the version; show the summary.
    ``rows``: a DataFrame, or a function that writes them to the build's ``train.parquet``
    and returns that ``data.RowFile``."""
    started = _dt.datetime.now()
    display = make_display(ui or default_ui(), f"%%{magic} {name}")
    try:
        with store.build(name, kind) as build:
            if callable(rows):
                display.phase("reading rows")
                rows = rows(build.path / "train.parquet")
            if worker.enabled():
                outcome: Outcome = worker.run(train, spec, rows, previous, build, display, kind)
            else:
                outcome = train(spec, rows, previous, build, display)
            decision = promotion.decide(spec.promote, outcome, previous)
            build.activate = decision.promote
            display.phase("saving")
            _write_outcome(build.path, outcome)
            build.manifest.update(
                {
                    "magic": magic,
                    "options": spec.to_dict(),
                    "sql": data if isinstance(data, str) else None,
                    **({"params": params} if params else {}),
                    "data": {"rows": len(rows), "columns": list(map(str, rows.columns)), "sha256": rows.sha256 if isinstance(rows, _data.RowFile) else frame_sha256(rows)},
                    "parent": previous.version if previous else None,
                    "metrics": {"before": outcome.before, "after": outcome.after},
                    "counts": {"read": len(rows), **outcome.counts},
                    "libraries": libraries(kind),
                    "run": {"id": uuid.uuid4().hex, "magic": magic, "started": started.isoformat(timespec="seconds")},
                    "promotion": decision.to_dict(),
                    **outcome.info,
                }
            )
    except BaseException as e:
        display.fail(e)
        raise
    facts = {"version": build.version, "active": decision.promote, **{k: v for k, v in build.manifest["counts"].items()}}
    outcome.after_label = outcome.after_label or f"v{build.version}"
    warning = decision.line(name, build.version)
    if warning:
        outcome.notes.insert(0, warning)
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
    current = store.get(known(store, name), version or at)
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
