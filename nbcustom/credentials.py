"""Vector-store URLs and their passwords: a password never goes further than this process.

A PostgreSQL URL in any form libpq accepts (``postgresql://USER:PASSWORD@HOST:PORT/DB``,
``postgresql://USER@/DB?host=/run/postgresql`` for a Unix socket, ``postgresql:///DB`` with
libpq's defaults) given as ``--vector-store``, ``%config NbCustom.vector_store`` or
``NBCUSTOM_VECTOR_STORE`` is kept (spec, manifest, catalog) as given minus its password
(in the user part or a ``password=`` parameter); the password stays in memory here, keyed by
user, host and port (a PostgreSQL password belongs to a role on a server, not to a database).
Without one, libpq finds it itself (``PGPASSWORD``, ``~/.pgpass``). Messages are masked with ``mask``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import NbCustomError

SCHEMES = ("postgresql", "postgres")
USAGE = ("use duckdb (a file in the version) or postgresql://USER@HOST:PORT/DB (any URL libpq accepts: "
         "postgresql://USER@/DB?host=/run/postgresql for a Unix socket)")
_PASSWORDS: dict[tuple, str] = {}
_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_IN_QUERY = re.compile(r"([?&]password=)[^&\s'\"]*", re.IGNORECASE)


def server(url: str) -> dict:
    """A PostgreSQL URL in any form libpq accepts (TCP, a Unix socket directory as ``host=``,
    defaults left out) -> host, port, database, user as libpq reads them, without the password.
    What the URL leaves out is libpq's default: ``PGHOST`` (else the local socket), ``PGPORT``
    (else 5432), ``PGUSER`` (else the login name), the database named as the user."""
    import getpass

    text = url.strip()
    if text.split(":", 1)[0] not in SCHEMES:
        raise NbCustomError(f"--vector-store {mask(url)!r} is not understood: {USAGE}")
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise NbCustomError("--vector-store postgresql://... needs psycopg: pip install 'nbcustom[pgvector]'") from None
    try:
        given = conninfo_to_dict(text)
    except Exception as e:  # libpq's own reason, without the URL
        raise NbCustomError(f"--vector-store {mask(url)!r} is not understood ({str(e).splitlines()[0].strip()}): {USAGE}") from None
    env = os.environ
    port = str(given.get("port") or env.get("PGPORT") or 5432)
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        raise NbCustomError(f"--vector-store {mask(url)!r} is not understood (port {port!r}): {USAGE}")
    user = given.get("user") or env.get("PGUSER") or getpass.getuser()
    return {
        "host": given.get("host") or given.get("hostaddr") or env.get("PGHOST") or "",  # "": libpq's default socket
        "port": int(port) if port.isdigit() else port, "database": given.get("dbname") or env.get("PGDATABASE") or user, "user": user,
    }


def strip(url: str) -> str:
    """``url`` without its password (remembered for this process); bad URLs raise here."""
    from urllib.parse import urlencode

    address = server(url)
    text = url.strip()
    parts = urlsplit(text)
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret = unquote(parts.password) if parts.password is not None else dict(query).get("password")
    if secret:
        _PASSWORDS[_key(address)] = secret
    text = re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1@", text)
    if any(k == "password" for k, _ in query):
        kept = urlencode([(k, v) for k, v in query if k != "password"], safe="/")
        text = text.split("?", 1)[0] + (f"?{kept}" if kept else "")
    return text


def where(address: dict) -> str:
    """``HOST:PORT``, or the socket directory's path, for messages."""
    host, port = address["host"], address["port"]
    if not host or host.startswith("/"):
        return f"the socket in {host} (port {port})" if host else f"the local socket (port {port})"
    return f"{host}:{port}"


def _key(address: dict) -> tuple:
    return (address["user"], address["host"], str(address["port"]))


def remember(url: str | None) -> None:
    """Keep the password of a setting's URL, if it has one (a bad URL is reported when used)."""
    if url and url.strip().split(":", 1)[0] in SCHEMES:
        try:
            strip(url)
        except NbCustomError:
            pass


def password(address: dict) -> str | None:
    """The password given in a URL for this role on this server, or None (libpq then looks
    at ``PGPASSWORD`` and ``~/.pgpass``)."""
    remember(os.environ.get("NBCUSTOM_VECTOR_STORE"))
    return _PASSWORDS.get(_key(address))


def mask(text: str) -> str:
    """``text`` with every known password, and any password inside a URL, replaced by ***."""
    text = _IN_QUERY.sub(r"\1***", _IN_URL.sub(r"\1***@", str(text)))
    for secret in _PASSWORDS.values():
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, "***")
    return text
