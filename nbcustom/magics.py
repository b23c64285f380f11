"""``NbCustom``: the cell magics and ``%nbc``. Each magic parses its flags and calls ``api``."""

from __future__ import annotations

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display
from traitlets import Enum, Unicode, default, observe

from . import api, credentials, data, flags, settings, store as _store, worker
from .display import Summary, summary_bundle
from .errors import NbCustomError
from .promotion import JOB_DEFAULT
from .specs import PROMOTE, FinetuneSpec, PredictSpec, RagSpec, RetrainSpec

_PARSERS = {
    "finetune": flags.parser("finetune", FinetuneSpec),
    "retrain": flags.parser("retrain", RetrainSpec),
    "rag": flags.parser(
        "rag", RagSpec,
        switches=[("ask", "answer each line of the body"), ("retrieve", "rank the chunks for each line of the body, answer nothing"),
                  ("eval", "evaluate on question/answer rows")],
    ),
    "predict": flags.parser("predict", PredictSpec),
}


@magics_class
class NbCustom(Magics):
    """Customize AI models on the notebook's DuckDB tables: ``%%finetune``, ``%%retrain``,
    ``%%rag``, ``%%predict`` and ``%nbc``."""

    store = Unicode(settings.environment("store"), help="artifact store folder").tag(config=True)
    database = Unicode(":memory:", help="DuckDB database file (default: in-memory)").tag(config=True)
    ui = Enum(("auto", "widgets", "static", "text", "none"), settings.environment("ui"), help="how runs are shown").tag(config=True)
    vector_store = Unicode(help="where %%rag keeps vectors: duckdb or postgresql://USER@HOST:PORT/DB").tag(config=True)
    launcher = Unicode(
        settings.environment("launcher"),
        help="torchrun command line that starts %%finetune's workers on several machines, e.g. "
        "'torchrun --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400'",
    ).tag(config=True)
    tracking = Enum(("none", "mlflow"), settings.environment("tracking"), help="log every new version as an MLflow run").tag(config=True)
    worker = Enum(("on", "off"), settings.environment("worker"), help="train in a worker process (on) or in the kernel (off)").tag(config=True)
    memory_limit = Unicode(settings.environment("memory_limit"), help="most memory a training worker may use, e.g. 8GB").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.session = data.default_session()
        self.session.use(self.database)

    @observe("database")
    def _database_changed(self, change) -> None:
        self.session.use(change["new"])

    @default("vector_store")
    def _vector_store_default(self) -> str:
        return self._without_password(settings.environment("vector_store"))

    @observe("vector_store")
    def _vector_store_changed(self, change) -> None:
        self.vector_store = self._without_password(change["new"])

    @staticmethod
    def _without_password(url: str) -> str:
        """The setting as %config shows it; a password in it is kept in memory only."""
        return credentials.strip(url) if url not in ("", "duckdb") else url

    # --- helpers -----------------------------------------------------------------------
    def _args(self, magic: str, line: str) -> dict:
        return flags.parse(_PARSERS[magic], line)

    def _context(self, args: dict) -> dict:
        """Keyword arguments every api call takes: namespace, connection, store, ui."""
        namespace = self.shell.user_ns
        con = args.pop("con", None)
        if con is not None:
            if con not in namespace:
                raise NbCustomError(f"--con {con}: no such variable in the notebook; pass the name of a duckdb connection")
            con = namespace[con]
        else:
            con = self.session.con
        return {"namespace": namespace, "con": con, "store": self.store, "ui": self.ui}

    # --- magics --------------------------------------------------------------------------
    @cell_magic
    def finetune(self, line: str, cell: str):
        """%%finetune NAME [--base MODEL] [--epochs N] ... + SQL: LoRA fine-tune an LLM, or
        update an AutoML model on new rows."""
        args = self._args("finetune", line)
        name = args.pop("name")
        api.finetune(name, cell, **self._context(args), **args)

    @cell_magic
    def retrain(self, line: str, cell: str):
        """%%retrain NAME --target COL [--timestamp COL ...] + SQL: train an AutoGluon model
        again from scratch on the previous rows plus these."""
        args = self._args("retrain", line)
        name = args.pop("name")
        api.retrain(name, cell, **self._context(args), **args)

    @cell_magic
    def rag(self, line: str, cell: str):
        """%%rag NAME [--text COL] [--id COL] ... + SQL: build or refresh an index.
        %%rag NAME --ask + questions; %%rag NAME --retrieve + questions (ranked chunks, no
        answers); %%rag NAME --eval + SQL with question, answer."""
        args = self._args("rag", line)
        name = args.pop("name")
        if sum(bool(args.get(k)) for k in ("ask", "retrieve", "eval")) > 1:
            raise NbCustomError("use one of --ask or --retrieve (questions, one a line) or --eval (SQL with question and answer)")
        if args.pop("retrieve", False):
            return api.retrieve(name, cell.splitlines(), store=self.store, **{k: args.get(k) for k in ("top_k", "search", "where")})
        if args.pop("ask", False):
            from .display.answers import show_answers

            answers = api.ask(name, cell.splitlines(), store=self.store, **_answering(args))
            show_answers(answers)
            return None
        if args.pop("eval", False):
            context = self._context(args)
            api.rag_eval(name, cell, **context, **_answering(args))
            return None
        api.rag(name, cell, **self._context(args), **args)

    @cell_magic
    def predict(self, line: str, cell: str):
        """%%predict NAME [--version V] [--into TABLE] + SQL: the rows with predictions."""
        args = self._args("predict", line)
        name = args.pop("name")
        return api.predict(name, cell, **self._context(args), **args)

    @line_magic
    def nbc(self, line: str):
        """%nbc list | show NAME[@V] | versions NAME | activate NAME V | rm NAME[@V] | check [NAME] [--repair] |
        compare NAME V1 V2 | runs [NAME] | drift NAME[@V] [SQL] | export NAME[@V] --format F --to DIR | jobs |
        job NAME --every 10m [--track COL] [--min-rows N] [--promote if-better] [--cron] | job NAME --stop |
        serve [NAME[@V] ...] [--host H] [--port P] [--api-key KEY] | serve --stop [--port P]"""
        from . import catalog

        if line.split()[:1] in (["job"], ["jobs"]):
            return self._jobs(line)
        if line.split()[:1] == ["serve"]:
            return self._serve(line)
        if line.split()[:1] == ["drift"]:
            return self._drift(line)
        result = catalog.command(_store.Store(self.store), line)
        if isinstance(result, str):
            print(result)
        elif isinstance(result, Summary):
            display(summary_bundle(result), raw=True)
        else:
            return result


    def _serve(self, line: str):
        from . import serve

        args = flags.parse(_SERVE_PARSER, line)
        port = args.get("port")
        if args.get("stop"):
            print(serve.stop(port))
            return None
        print(serve.start(self.store, args.get("names") or [], args.get("host") or "127.0.0.1", port or serve.DEFAULT_PORT, args.get("api_key")))
        return None

    def _drift(self, line: str):
        words = line.split(maxsplit=2)
        if len(words) < 2:
            raise NbCustomError("use %nbc drift NAME [SQL]: the drift of the query's rows (or the recorded one) against NAME's training rows")
        name, version = _store.parse_ref(words[1])
        context = self._context({})
        return api.drift(name, words[2] if len(words) > 2 else None, version=version, namespace=context["namespace"], con=context["con"], store=self.store)

    def _jobs(self, line: str):
        from . import catalog, jobs

        store = _store.Store(self.store)
        args = flags.parse(_JOB_PARSER, line)
        if args["command"] == "jobs":
            return jobs.table(store)
        if not args.get("name"):
            raise NbCustomError("use %nbc job NAME --every 10m [--track COL] or %nbc job NAME --stop")
        if args.get("stop"):
            jobs.stop(store, args["name"])
            print(f"{args['name']}: job stopped")
            return None
        if not args.get("every"):
            raise NbCustomError(f"%nbc job {args['name']} needs --every, e.g. --every 10m")
        catalog.known(store, args["name"])
        context = self._context(args)
        job = jobs.schedule(store, args["name"], args["every"], args.get("track"), self.database, context["namespace"], context["con"],
                            promote=args["promote"], min_rows=args.get("min_rows"), cron=args["cron"])
        if args["cron"]:
            print(f"# add this line to your crontab (crontab -e); {job['name']} then runs outside the kernel:\n{jobs.cron_line(store, job['name'])}")
            return None
        jobs.Scheduler.ensure(store, self.shell.user_ns, self.session)
        print(f"{job['name']}: runs every {job['every_seconds']:g}s, next at {job['next_due']:%H:%M:%S}"
              + (f", reading rows with {job['track']} > {job['last_value']!r}" if job["track"] else ""))
        return None


_JOB_PARSER = flags.parser("nbc", positionals=("command",))
_JOB_PARSER.add_argument("name", nargs="?")
_JOB_PARSER.add_argument("--every")
_JOB_PARSER.add_argument("--track")
_JOB_PARSER.add_argument("--stop", action="store_true")
_JOB_PARSER.add_argument("--promote", choices=PROMOTE, default=JOB_DEFAULT)
_JOB_PARSER.add_argument("--min-rows", type=int)
_JOB_PARSER.add_argument("--cron", action="store_true")


_SERVE_PARSER = flags.parser("nbc", positionals=("command",))
_SERVE_PARSER.add_argument("names", nargs="*")
_SERVE_PARSER.add_argument("--host")
_SERVE_PARSER.add_argument("--port", type=int)
_SERVE_PARSER.add_argument("--api-key")
_SERVE_PARSER.add_argument("--stop", action="store_true")


def _answering(args: dict) -> dict:
    """The %%rag options that apply to --ask and --eval."""
    return {k: args.get(k) for k in ("top_k", "search", "where", "llm", "answers")}


def load_ipython_extension(shell) -> None:
    magics = NbCustom(shell=shell)
    shell.register_magics(magics)
    settings.use(magics)  # the API's defaults are now this kernel's %config settings
    worker.start()
    if magics not in shell.configurables:
        shell.configurables.append(magics)
