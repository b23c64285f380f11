"""The ``nbcustom`` console command: store commands and batch predictions."""

from __future__ import annotations

import argparse
import shlex
import sys

from . import __version__, api, catalog
from .display import Summary
from .display.render import summary_text
from .errors import NbCustomError
from .store import Store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nbcustom", description="nbcustom's model store from the command line")
    p.add_argument("--version", action="version", version=f"nbcustom {__version__}")
    p.add_argument("--store", default=api.default_store(), help="store folder (default $NBCUSTOM_STORE or ./nbcustom_store)")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in ("list", "show", "versions", "activate", "rm", "compare", "runs"):
        sp = sub.add_parser(verb, help=f"%%nbc {verb}")  # argparse %-formats help: %% is a literal %
        sp.add_argument("args", nargs="*")
    sp = sub.add_parser("check", help="%%nbc check: checksums of every version, orphan folders, leftovers, the catalog; exit 1 if something is wrong")
    sp.add_argument("name", nargs="?", help="only this model (store-wide problems are still shown)")
    sp.add_argument("--repair", action="store_true", help="fix what the folders say how to fix; a version that fails its checksums is only reported")
    sp = sub.add_parser("export", help="%%nbc export NAME[@V] --format F --to DIR: a version in a format other tools load")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp = sub.add_parser("predict", help="predict with NAME on the rows of a SQL query")
    sp.add_argument("name")
    sp.add_argument("sql", help="a DuckDB query (read_csv('x.csv') works)")
    sp.add_argument("--database", default=":memory:", help="DuckDB database file to query")
    sp.add_argument("--version", type=int)
    sp.add_argument("--into", help="also write the result to this table of --database")
    sp.add_argument("--output", help="write the result to this .csv or .parquet file")
    sp = sub.add_parser("drift", help="per-column drift of a query's rows against NAME's training rows (or the recorded one)")
    sp.add_argument("name", help="NAME or NAME@V")
    sp.add_argument("sql", nargs="?", help="a DuckDB query; without it, the drift NAME recorded when it was trained")
    sp.add_argument("--database", default=":memory:", help="DuckDB database file to query")
    sp = sub.add_parser("jobs", help="show jobs, or `jobs run [NAME ...]`: run every due job (or the named ones) once, for cron")
    sp.add_argument("action", nargs="?", choices=["list", "run"], default="list")
    sp.add_argument("names", nargs="*", help="with run: these jobs now, due or not (what `%%nbc job NAME --cron` schedules)")
    sp.add_argument("--database", help="DuckDB database file the jobs read (default: the one each job recorded)")
    sp = sub.add_parser("serve", help="serve LLM and RAG models over the OpenAI HTTP API (needs nbcustom[serve])")
    sp.add_argument("names", nargs="*", help="NAME or NAME@V (default: every LLM and RAG model of the store)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", help="require `Authorization: Bearer KEY` (or set NBCUSTOM_API_KEY); needed on any host but 127.0.0.1")
    args = p.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    store = Store(args.store)
    try:
        if args.command == "predict":
            return _predict(args, store)
        if args.command == "jobs":
            return _jobs(args, store)
        if args.command == "drift":
            return _drift(args, store)
        if args.command == "check":
            return _check(args, store)
        result = catalog.command(store, shlex.join([args.command, *args.args]))
    except NbCustomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, Summary):
        print(summary_text(result))
    elif isinstance(result, str):
        print(result)
    else:
        print(result.to_string(index=False) if len(result) else "(none)")
    return 0


def _serve(args) -> int:
    import os

    from . import serve

    if args.api_key:  # start again with the key in the environment, so the process title never shows it
        env = {**os.environ, serve.KEY_VARIABLE: args.api_key}
        os.execve(sys.executable, [sys.executable, "-m", "nbcustom.serve", "--store", args.store, "--host", args.host,
                                   "--port", str(args.port), *args.names], env)
    try:
        serve.run(args.store, args.names, args.host, args.port)
    except NbCustomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _predict(args, store: Store) -> int:
    import duckdb

    con = duckdb.connect(args.database)
    try:
        result = api.predict(args.name, args.sql, con=con, store=store, version=args.version, into=args.into)
    finally:
        con.close()
    if args.output:
        (result.to_parquet if args.output.endswith(".parquet") else result.to_csv)(args.output, index=False)
    else:
        print(result.to_string(index=False))
    return 0


def _check(args, store: Store) -> int:
    """One line a finding (with what --repair did); 1 if anything is left wrong."""
    findings = store.check(args.name, repair=args.repair)
    for finding in findings:
        print(finding.line())
    if not findings:
        print(catalog.no_problems(store, args.name))
    left = [f for f in findings if f.repaired is None]
    if left and not args.repair:
        print("nbcustom check --repair fixes what the version folders say how to fix")
    return 1 if left else 0


def _drift(args, store: Store) -> int:
    import duckdb

    from .store import parse_ref

    name, version = parse_ref(args.name)
    con = duckdb.connect(args.database)
    try:
        result = api.drift(name, args.sql, version=version, con=con, store=store)
    finally:
        con.close()
    print(result.to_string(index=False))
    return 0


def _jobs(args, store: Store) -> int:
    from . import jobs

    if args.action == "list":
        table = jobs.table(store)
        print(table.to_string(index=False) if len(table) else "(no jobs)")
        return 0
    con = None
    if args.database:
        import duckdb

        con = duckdb.connect(args.database, read_only=True)
    try:
        results = jobs.run_due(store, con=con, names=args.names)
    finally:
        if con is not None:
            con.close()
    for result in results:
        print(f"{result['name']}: {result['status']}" + (f" -> v{result['version']}" if result.get("version") else "")
              + (f" ({result['error']})" if result.get("error") else "")
              + (f" ({result['promotion']})" if (result.get("promotion") or "").startswith("not promoted") else ""))
    if not results:
        print("no job is due")
    return 0


if __name__ == "__main__":
    sys.exit(main())
