"""Imported once by the training workers' fork server (``worker``), so that a run's worker
starts in a fraction of a second: the model libraries, and the default LLM and embedding
model when they are already on disk (a worker shares their weights with the server).

Everything here runs on one thread: a process forked after OpenMP started its threads
hangs at its first parallel operation (measured: a forked child's first matrix product
never returned), so the server never starts them and the workers get the full count back.
"""

import contextlib
import os
import signal

from nbcustom.worker import PARENT

# A server started by a process's main thread ends with that process (``worker._serve``),
# also while this preload still runs: a kernel or script that exits in its first seconds
# would leave it importing for nobody.
_parent = os.environ.pop(PARENT, None)
if _parent:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != int(_parent):
            os._exit(0)  # it ended before the line above
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

_threads = torch.get_num_threads()
torch.set_num_threads(1)
try:
    for _module in ("transformers", "peft", "matplotlib.figure", "matplotlib.backends.backend_agg", "sentence_transformers", "llama_index.core",
                    "nbcustom.engines.llm.train", "nbcustom.engines.rag.index", "autogluon.tabular"):
        with contextlib.suppress(ImportError):
            __import__(_module)
    from nbcustom import models

    with contextlib.suppress(Exception):  # a missing or unconverted default loads in the run
        if models.converted_default():
            models.load_llm(models.converted_default())
    with contextlib.suppress(Exception):
        from nbcustom.engines.rag import index, models as rag_models

        rag_models.embedder(None, index.EMBED_BATCH)
finally:
    torch.set_num_threads(_threads)
