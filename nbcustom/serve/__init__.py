"""Serve what the store holds over the OpenAI HTTP API: ``nbcustom serve`` in a terminal,
``%nbc serve`` in a kernel (a background process that stops with the kernel).

The server binds 127.0.0.1 unless told otherwise; any other host needs an API key
(``--api-key`` or ``NBCUSTOM_API_KEY``). The key reaches the server process through its
environment only: never its command line (the process title), the store, a log or a cell's
output. Needs the extra ``nbcustom[serve]`` (FastAPI, uvicorn).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import NbCustomError

KEY_VARIABLE = "NBCUSTOM_API_KEY"
LOCAL = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8000
STARTUP = 60.0  # seconds %nbc serve waits for the server to listen
_RUNNING: dict[int, subprocess.Popen] = {}  # port -> the kernel's background servers


def check(host: str, port: int, api_key: str | None) -> None:
    """One line for a setting the server cannot start with."""
    if host not in LOCAL and not api_key:
        raise NbCustomError(f"serving on {host} (not this machine only) needs an API key: add --api-key KEY or set {KEY_VARIABLE}")
    if not 0 < port < 65536:
        raise NbCustomError(f"--port {port}: give a port between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise NbCustomError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port") from None


def run(store_root, names: list[str], host: str = "127.0.0.1", port: int = DEFAULT_PORT, parent: int | None = None) -> None:
    """Serve in this process until stopped (Ctrl-C), or until ``parent`` ends."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise NbCustomError(f"serving needs the extra nbcustom[serve] ({e.name} is missing): pip install 'nbcustom[serve]'") from None
    from ..store import Store
    from .served import Served, check_names

    api_key = os.environ.get(KEY_VARIABLE) or None
    check(host, port, api_key)
    store = Store(store_root)
    check_names(store, names)
    server = uvicorn.Server(uvicorn.Config(create_app(Served(store, names), api_key), host=host, port=port, log_level="warning"))
    if parent:
        _stop_with(parent, server)
    print(f"nbcustom: serving {', '.join(names) or 'every LLM and RAG model'} of {store.root} at http://{host}:{port}/v1", flush=True)
    server.run()


def _stop_with(parent: int, server) -> None:
    """Stop ``server`` when the process ``parent`` (the kernel) ends, however it ends."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()


# --- a background server for the kernel -------------------------------------------------------
def start(store_root, names: list[str], host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None) -> str:
    """Start ``run`` in a child process and return once it listens (the models load on the
    first request); the line to show."""
    from ..store import Store
    from .served import check_names

    api_key = api_key or os.environ.get(KEY_VARIABLE) or None
    check(host, port, api_key)
    check_names(Store(store_root), names)
    env = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE} | ({KEY_VARIABLE: api_key} if api_key else {})
    log = Path(tempfile.gettempdir()) / f"nbcustom-serve-{port}.log"
    command = [sys.executable, "-m", "nbcustom.serve", "--store", str(store_root), "--host", host, "--port", str(port),
               "--parent", str(os.getpid()), *names]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _RUNNING[port] = process
    deadline = time.monotonic() + STARTUP
    while not _listening(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(port)
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            raise NbCustomError(f"the server did not start: {lines[-1] if lines else 'no output'} (log: {log})")
        time.sleep(0.2)
    what = ", ".join(names) or "every LLM and RAG model"
    return (f"serving {what} at http://{host}:{port}/v1 (OpenAI API{', API key required' if api_key else ''}); "
            f"%nbc serve --stop ends it; log: {log}")


def stop(port: int | None = None) -> str:
    """Stop the kernel's background server on ``port`` (default: all of them)."""
    ports = [port] if port is not None else list(_RUNNING)
    stopped = []
    for p in ports:
        process = _RUNNING.pop(p, None)
        if process is None:
            continue
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
            process.wait()
        stopped.append(str(p))
    return f"stopped the server on port {', '.join(stopped)}" if stopped else "no server of this kernel is running"


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


atexit.register(stop)
