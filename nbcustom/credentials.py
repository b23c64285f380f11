"""Vector-store URLs and their passwords: a password never goes further than this process.

``postgresql://USER:PASSWORD@HOST:PORT/DB`` given as ``--vector-store``, ``%config
NbCustom.vector_store`` or ``NBCUSTOM_VECTOR_STORE`` is kept (spec, manifest, catalog) as
``postgresql://USER@HOST:PORT/DB``; the password stays in memory here, keyed by user, host
and port (a PostgreSQL password belongs to a role on a server, not to a database). Without
one, libpq finds it itself (``PGPASSWORD``, ``~/.pgpass``). Messages are masked with ``mask``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import NbCustomError

SCHEMES = ("postgresql", "postgres")
USAGE = "use duckdb (a file in the version) or postgresql://USER@HOST:PORT/DB"
_PASSWORDS: dict[tuple, str] = {}
_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_IN_QUERY = re.compile(r"([?&]password=)[^&\s'\"]*", re.IGNORECASE)


def server(url: str) -> dict:
    """``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`` -> host, port, database, user (no password)."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port or 5432
    except ValueError:
        port = None
    if parts.scheme not in SCHEMES or not parts.hostname or not port or not parts.username or not parts.path.strip("/"):
        raise NbCustomError(f"--vector-store {mask(url)!r} is not understood: {USAGE}")
    return {"host": parts.hostname, "port": port, "database": unquote(parts.path.strip("/")), "user": unquote(parts.username)}


def strip(url: str) -> str:
    """``url`` without its password (remembered for this process); bad URLs raise here."""
    address = server(url)
    parts = urlsplit(url.strip())
    password = unquote(parts.password) if parts.password is not None else dict(parse_qsl(parts.query)).get("password")
    if password:
        _PASSWORDS[(address["user"], address["host"], address["port"])] = password
    host = f"[{address['host']}]" if ":" in address["host"] else address["host"]  # IPv6
    return f"postgresql://{quote(address['user'])}@{host}:{address['port']}/{quote(address['database'])}"


def remember(url: str | None) -> None:
    """Keep the password of a setting's URL, if it has one (a bad URL is reported when used)."""
    if url and url.strip().split(":", 1)[0] in SCHEMES:
        try:
            strip(url)
        except NbCustomError:
            pass


def password(user: str, host: str, port: int) -> str | None:
    """The password given in a URL for this role on this server, or None (libpq then looks
    at ``PGPASSWORD`` and ``~/.pgpass``)."""
    remember(os.environ.get("NBCUSTOM_VECTOR_STORE"))
    return _PASSWORDS.get((user, host, int(port)))


def mask(text: str) -> str:
    """``text`` with every known password, and any password inside a URL, replaced by ***."""
    text = _IN_QUERY.sub(r"\1***", _IN_URL.sub(r"\1***@", str(text)))
    for secret in _PASSWORDS.values():
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, "***")
    return text
