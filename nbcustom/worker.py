"""Training in a worker process: a run that dies cannot take the kernel with it.

``run`` calls an engine's ``train(spec, rows, previous, build, display)`` in a child process
and returns its ``Outcome``, as if it had been called here. The child comes from
multiprocessing's fork server, a helper process started at the first run that has imported
the model libraries once (``nbcustom._preload``); it is not a fork of the kernel. The child
writes the model files into the build's staging folder; the kernel commits the version.

- The live display is fed from the child: each ``phase``, ``step`` and ``log`` call is a
  message on a pipe, replayed on the kernel's display.
- When the child dies (the out-of-memory killer, a signal, a crash in a native library) or
  runs out of memory, the cell gets one line saying where and with what peak memory; the
  staging folder is removed, so the store is untouched.
- Ctrl-C interrupts the child and waits for it; every process of the run is stopped
  before the cell ends (the child leads its own process group). GPU memory goes with it.
- ``NbCustom.memory_limit`` (``8GB``): the kernel stops a worker whose peak resident
  memory passes it (sampled every ``POLL`` seconds), before the system's out-of-memory
  killer has to choose a process, which may be the kernel.
- ``%config NbCustom.worker = 'off'`` (or ``NBCUSTOM_WORKER=off``) trains in the kernel, as
  before.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import time
import traceback
from pathlib import Path

from . import settings
from .errors import NbCustomError

NAME = "nbcustom-worker"
PARENT = "NBCUSTOM_SERVER_PARENT"  # the fork server's environment: the process it ends with
POLL = 0.2  # seconds between looks at the worker's memory
GRACE = 10.0  # seconds an interrupted worker gets to stop before SIGKILL
DISPLAY_CALLS = ("phase", "step", "log")
# what to try when a run of a kind runs out of memory
ADVICE = {
    "llm": "try a smaller --batch-size or --max-length",
    "automl": "try fewer rows or --presets medium_quality",
    "rag": "try fewer rows per build or a smaller --chunk-size",
}
_OOM = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|std::bad_alloc|Unable to allocate", re.I)


def enabled() -> bool:
    """Whether training runs in a worker process (the default)."""
    return str(settings.get("worker")).lower() not in ("off", "0", "false", "no")


def memory_limit() -> int | None:
    """``NbCustom.memory_limit`` in bytes (``"8GB"``, ``"512MB"``), None when unset."""
    return parse_size(settings.get("memory_limit"))


def parse_size(text) -> int | None:
    if not text or str(text).strip().lower() in ("off", "none", "0"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.I)
    if not match:
        raise NbCustomError(f"memory limit {text!r}: write it as 8GB, 512MB or off")
    return int(float(match.group(1)) * 1024 ** "bkmgt".index(match.group(2).lower() or "b"))


def start() -> None:
    """Start the fork server now (``%load_ext``): it imports the libraries while the
    notebook's first cells run, not when the first training cell waits for it."""
    if enabled():
        _context()


def run(train, spec, rows, previous, build, display, kind: str):
    """``train(spec, rows, previous, build, display)`` in a worker process; its Outcome."""
    from multiprocessing.connection import wait

    context = _context()
    kernel_end, worker_end = context.Pipe()
    # the worker gets a copy of the build (its folder and names); undos it registers come back
    job = {"train": train, "spec": spec, "rows": rows, "previous": previous, "build": build,
           "environ": dict(os.environ), "settings": settings.snapshot()}
    limit = memory_limit() or float("inf")
    watch = _Watch(kind, display)
    reported = False
    process = context.Process(target=_main, args=(worker_end, job), name=NAME, daemon=True)
    process.start()
    worker_end.close()
    try:
        while True:
            ready = wait([kernel_end, process.sentinel], timeout=POLL)
            if watch.sample(process.pid) > limit:
                _signal(process, signal.SIGKILL)
                process.join()
                raise NbCustomError(watch.over(limit))
            message = None
            if kernel_end in ready:
                try:
                    message, *payload = kernel_end.recv()
                except (EOFError, OSError):  # the worker is gone; its exit code says how
                    process.join(GRACE)
            if message == "call":
                name, args, kwargs = payload
                getattr(display, name)(*args, **kwargs)
            elif message == "abort":
                build.on_abort.append(payload[0])
            elif message == "done":
                reported = True
                return payload[0]
            elif message == "error":
                reported = True
                raise _error(watch, *payload)
            elif ready and not process.is_alive():
                process.join(GRACE)
                raise NbCustomError(watch.death(process.exitcode))
    except KeyboardInterrupt:
        _interrupt(process)
        raise
    finally:
        _stop(process, reported)
        kernel_end.close()


def _context():
    import multiprocessing as mp
    from multiprocessing import spawn

    if not getattr(spawn.get_preparation_data, "nbcustom", False):
        spawn.get_preparation_data = _without_main(spawn.get_preparation_data)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["nbcustom._preload"])
    _serve()
    return context


def _serve() -> None:
    """Start the fork server unless it runs. Started by the main thread, it is told this
    process's id: ``_preload`` ends it with this process, also when this process ended
    before it could ask. Linux's parent-death signal follows the thread that started the
    server, so one started by another thread (a job's) is left to end as before: it would
    otherwise die, with its workers, when that thread does."""
    import threading
    from multiprocessing import forkserver

    if threading.current_thread() is threading.main_thread():
        os.environ[PARENT] = str(os.getpid())
    try:
        forkserver.ensure_running()
    finally:
        os.environ.pop(PARENT, None)


def _without_main(prepare):
    """A worker runs ``_main`` of this module and never needs the kernel's ``__main__``:
    multiprocessing would import it again in the worker, and so run a user's script that
    calls ``nbcustom.finetune`` without an ``if __name__ == "__main__"`` guard twice."""

    def preparation_data(name):
        data = prepare(name)
        if name == NAME:
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    preparation_data.nbcustom = True
    return preparation_data


class _Undos(list):
    """The worker's ``build.on_abort``: an undo that pickles is sent to the kernel at once,
    so it runs also when the worker dies; the others run in the worker when its run fails."""

    def __init__(self, connection):
        super().__init__()
        self.connection = connection

    def append(self, undo) -> None:
        try:
            self.connection.send(("abort", undo))
        except (pickle.PicklingError, TypeError, AttributeError):
            super().append(undo)


class _Display:
    """The worker's display: each call is a message to the kernel."""

    def __init__(self, connection):
        self.connection = connection

    def __getattr__(self, name):
        if name not in DISPLAY_CALLS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.connection.send(("call", name, args, kwargs))


class _Watch:
    """The kernel's view of a running worker: its phase, step and peak memory."""

    def __init__(self, kind: str, display):
        self.kind, self.display = kind, display
        self.peak = 0
        self.oom_kills = _oom_kills()

    def sample(self, pid: int) -> int:
        """The worker's peak resident memory so far, in bytes (0 when unknown). The peak
        (VmHWM, which starts at the resident memory at the fork): a training step's
        activations go back to the system when it ends, so the memory now, sampled between
        steps, can miss a peak over the limit."""
        try:
            peak = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        except OSError:
            return 0
        self.peak = max(self.peak, int(peak.group(1)) * 1024 if peak else 0)
        return self.peak

    def where(self) -> str:
        state = self.display.state
        if state.phase == "training" and state.step:
            return f"after step {state.step}" + (f" of {state.total}" if state.total else "")
        return f"while {state.phase}" if state.phase else "while starting"

    def peak_text(self) -> str:
        return f"peak {self.peak / 1e9:.1f} GB" if self.peak else "peak unknown"

    def out_of_memory(self) -> str:
        return f"the run ran out of memory {self.where()} ({self.peak_text()}): {ADVICE.get(self.kind, 'try fewer rows')}"

    def over(self, limit: int) -> str:
        return (f"the run passed NbCustom.memory_limit ({limit / 1e9:.1f} GB) {self.where()} ({self.peak_text()}) and was "
                f"stopped: {ADVICE.get(self.kind, 'try fewer rows')}, or raise the limit")

    def death(self, code: int | None) -> str:
        if code is not None and code < 0:
            signal_name = signal.Signals(-code).name
            if -code == signal.SIGKILL and _oom_kills() > self.oom_kills:
                return self.out_of_memory() + " (the system's out-of-memory killer stopped the worker)"
            crash = " in a native library" if -code in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL) else ""
            return (f"the training worker died of {signal_name}{crash} {self.where()} ({self.peak_text()}); the store is "
                    f"unchanged and the kernel keeps its variables: if memory ran out, {ADVICE.get(self.kind, 'try fewer rows')}")
        return f"the training worker ended {self.where()} without a result (exit code {code}); the store is unchanged: run the cell again"


def _error(watch: _Watch, error: bytes | None, kind: str, text: str, trace: str) -> BaseException:
    """The worker's exception, raised in the kernel: itself when it pickles, else a copy."""
    if kind == "oom":
        return NbCustomError(watch.out_of_memory())
    if error is not None:
        with contextlib.suppress(Exception):
            exception = pickle.loads(error)
            if not isinstance(exception, (NbCustomError, KeyboardInterrupt)):
                exception.add_note(f"in the training worker:\n{trace}")
            return exception
    exception = RuntimeError(f"{kind}: {text}")
    exception.add_note(f"in the training worker:\n{trace}")
    return exception


def _oom_kills() -> int:
    """Processes the kernel's cgroup lost to the out-of-memory killer so far (cgroup v2)."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split(":", 2)[2]
        events = Path("/sys/fs/cgroup", cgroup.lstrip("/"), "memory.events").read_text()
        return int(re.search(r"oom_kill (\d+)", events).group(1))
    except (OSError, IndexError, AttributeError, ValueError):
        return 0


def _interrupt(process) -> None:
    """Ctrl-C in the kernel: the worker gets SIGINT (its KeyboardInterrupt runs its clean-up)."""
    _signal(process, signal.SIGINT)
    process.join(GRACE)


def _stop(process, reported: bool) -> None:
    """No process of the run outlives it. A worker that reported its end gets time to exit
    by itself; any other is stopped with SIGTERM; then whatever is left of its group, SIGKILL."""
    if not reported and process.is_alive():
        _signal(process, signal.SIGTERM)
    process.join(GRACE)
    _signal(process, signal.SIGKILL)  # the worker if it hangs, and children it left behind
    process.join()


def _signal(process, number: int) -> None:
    """``number`` to the worker's process group, or to the worker before it made one."""
    for send in (os.killpg, os.kill):
        try:
            send(process.pid, number)
            return
        except ProcessLookupError:
            continue
        except (PermissionError, TypeError):
            return


# --- the worker -------------------------------------------------------------------------
def _main(connection, job: dict) -> None:
    os.setpgrp()  # the kernel stops the worker and whatever it starts as one group
    _die_with_parent()
    os.environ.clear()
    os.environ.update(job["environ"])  # the kernel's, as it is now (not the fork server's)
    settings.restore(job["settings"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    build = job["build"]
    build.on_abort = _Undos(connection)
    try:
        outcome = job["train"](job["spec"], job["rows"], job["previous"], build, _Display(connection))
        connection.send(("done", outcome))
    except BaseException as e:
        for undo in reversed(list(build.on_abort)):
            with contextlib.suppress(Exception):
                undo()
        oom = isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OOM.search(str(e)))
        try:
            error = pickle.dumps(e)
        except Exception:
            error = None
        with contextlib.suppress(OSError, ValueError):
            connection.send(("error", error, "oom" if oom else type(e).__name__, str(e), traceback.format_exc()))
    finally:
        connection.close()


def _terminated(signum, frame):
    raise KeyboardInterrupt("stopped by the kernel")


def _die_with_parent() -> None:
    """The worker gets SIGKILL when the fork server ends (it ends with the kernel)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
