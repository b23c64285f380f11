"""Magic lines -> (positional args, spec options): argparse flags generated from the specs."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from .errors import NbCustomError
from .specs import flag_of


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise NbCustomError(f"{_magic(self.prog)}: {message}; see {_magic(self.prog)}? for the options")

    def exit(self, status=0, message=None):
        if message:
            raise NbCustomError(message.strip())
        raise NbCustomError(f"{_magic(self.prog)}: see {_magic(self.prog)}? for the options")


def parser(prog: str, spec_cls=None, positionals=("name",), switches=()) -> argparse.ArgumentParser:
    """An argparse parser for a magic: its positionals, each spec field as a ``--flag``,
    ``--con VAR`` and extra boolean ``switches`` such as ``--ask``."""
    p = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    for name in positionals:
        p.add_argument(name)
    p.add_argument("--con", metavar="VAR", help="a duckdb connection in the notebook to run the SQL on")
    for name, help in switches:
        p.add_argument(f"--{name}", action="store_true", help=help)
    for f in dataclasses.fields(spec_cls) if spec_cls else ():
        meta, flag = f.metadata, "--" + flag_of(f)
        if meta.get("type") is bool:
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=meta["help"])
        else:
            p.add_argument(flag, dest=f.name, type=meta.get("type") or str, default=None, help=meta["help"], metavar=flag_of(f).upper().replace("-", "_"))
    return p


def parse(p: argparse.ArgumentParser, line: str) -> dict:
    """Parse a magic line; a bad one is a one-line error."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise NbCustomError(f"{_magic(p.prog)}: cannot read the options ({e}): check the quotes") from None
    return {k: v for k, v in vars(p.parse_args(words)).items() if v is not None}


def usage(p: argparse.ArgumentParser) -> str:
    return p.format_help()


def _magic(prog: str) -> str:
    """How the user typed the magic: ``%nbc`` is a line magic, the others cell magics."""
    return f"%{prog}" if prog == "nbc" else f"%%{prog}"
