"""The embedding model in ONNX Runtime, for questions: the same weights, exported once with
PyTorch's ONNX exporter (``torch.onnx.export(dynamo=True)``) into the model cache, then run by
``onnxruntime`` with sentence-transformers' mean pooling and normalization.

Used when the ``onnx`` extra is installed and the model is what sentence-transformers runs as
Transformer -> mean Pooling (-> Normalize) without prompts (all-MiniLM-L6-v2 is); anything
else stays in PyTorch. On 2 AMD EPYC cores (RESULTS.md, ``%%rag`` at a million chunks) one
question took 7.8 ms against 17 ms in PyTorch, with vectors equal within 1e-6 cosine; batches
of documents were no faster (3.68 s against 3.43 s for 512 short records, 1.78 s against
1.93 s for 256 handbook pages), so documents stay in PyTorch. The export takes about 11 s,
once per model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import warnings
from pathlib import Path

from ... import models

_RUNNERS: dict[str, "Runner | None"] = {}


def runner(st_model, path: str) -> "Runner | None":
    """ONNX Runtime for the sentence-transformers model loaded from ``path``, or None where
    it does not apply (the extra missing, another pipeline)."""
    if path not in _RUNNERS:
        _RUNNERS[path] = _make(st_model, path) if _applies(st_model) else None
    return _RUNNERS[path]


def made(path: str) -> "Runner | None":
    """The runner of the model at ``path`` if ``runner`` made one already."""
    return _RUNNERS.get(path)


def _applies(st_model) -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    kinds = [type(m).__name__ for m in st_model]
    pooling = st_model[1].get_config_dict() if len(kinds) > 1 and kinds[1] == "Pooling" else {}
    return (kinds in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) and pooling.get("pooling_mode") == "mean"
            and not any(getattr(st_model, "prompts", {}).values()))


def _make(st_model, path: str) -> "Runner":
    import onnxruntime
    import torch

    file = _exported(st_model, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return Runner(session, st_model.tokenizer, st_model.max_seq_length, normalizes=len(st_model) == 3)


def _exported(st_model, path: str) -> Path:
    """The model's ONNX file in the cache, exported on first use (a folder renamed into place)."""
    import torch

    config = Path(path) / "config.json"
    stamp = f"{Path(path).resolve()}|{config.stat().st_mtime_ns if config.exists() else 0}|{torch.__version__}"
    folder = models.cache_dir() / "onnx" / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    if (folder / "model.onnx").exists():
        return folder / "model.onnx"
    transformer = st_model[0].auto_model
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in st_model.tokenizer.model_input_names]

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs):
            return self.transformer(**dict(zip(names, inputs))).last_hidden_state

    sample = st_model.tokenizer(["an example", "a somewhat longer example text"], padding=True, return_tensors="pt")
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=st_model.max_seq_length)
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), models.quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"), \
                torch.inference_mode(False):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Hidden().eval(), tuple(sample[n] for n in names), str(staging / "model.onnx"), input_names=names,
                output_names=["hidden"], dynamic_shapes=(({0: batch, 1: length},) * len(names),), dynamo=True,
            )
        if not folder.exists():
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / "model.onnx"


class Runner:
    """Texts -> sentence-transformers' vectors, through ONNX Runtime."""

    def __init__(self, session, tokenizer, max_length: int, normalizes: bool):
        self.session, self.tokenizer, self.max_length, self.normalizes = session, tokenizer, max_length, normalizes
        self.inputs = [i.name for i in session.get_inputs()]

    def embed(self, texts: list[str], batch_size: int, normalize: bool = False) -> list[list[float]]:
        """Vectors of ``texts``, ``batch_size`` at a time; unit length when the model's pipeline
        ends with Normalize or ``normalize`` asks for it."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths together: little padding
        out = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
            hidden = self.session.run(None, {n: enc[n].astype(np.int64) for n in self.inputs})[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            vectors = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            if self.normalizes or normalize:
                vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
            out.append(vectors)
        if not out:
            return []
        vectors = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(out)
        return vectors.tolist()
