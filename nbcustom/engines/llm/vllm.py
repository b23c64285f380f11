"""``%nbc export NAME --format vllm``: every version of an LLM on one base, for ``vllm serve``
with LoRA (many users, a GPU).

The folder holds ``base/`` (the base model's weights and tokenizer, the chat template
included; or nothing when the base is a Hugging Face hub model, named by its id), one
adapter per version in PEFT layout (``adapters/vV/adapter_config.json`` +
``adapter_model.safetensors``), ``serve.sh`` and a README with the client call. The flags are
vLLM's documented ones: ``--enable-lora``, ``--lora-modules name=path ...`` (each version as
``NAME@V``, the active one also as ``NAME``), ``--max-lora-rank`` (the largest adapter rank,
rounded up to a rank vLLM accepts) and ``--max-loras`` (adapters in one batch).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from ... import models
from ...errors import NbCustomError

RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (vllm/config/lora.py)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(version, folder: Path, spec) -> list[str]:
    from ...store import Store

    store = Store(version.path.parent.parent)
    base = _base(version)
    versions = [store.get(version.name, v["version"]) for v in store.versions(version.name)]
    versions = [v for v in versions if _base(v) == base]  # the versions vLLM can serve on this base
    active = store.active_version(version.name)
    if Path(base).is_dir():
        shutil.copytree(base, folder / "base", ignore=shutil.ignore_patterns("*.gguf", ".*"))
        model = "./base"
    else:
        model = base
    modules, ranks = [], []
    for v in versions:
        target = folder / "adapters" / f"v{v.version}"
        target.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(v.model_dir / name, target / name)
        ranks.append(int(json.loads((target / "adapter_config.json").read_text())["r"]))
        modules.append(f"{v.name}@{v.version}=./adapters/v{v.version}")
        if v.version == active:
            modules.insert(0, f"{v.name}=./adapters/v{v.version}")
    rank = next((r for r in RANKS if r >= max(ranks)), None)
    if rank is None:
        raise NbCustomError(f"{version.name}: LoRA rank {max(ranks)} is over vLLM's largest ({RANKS[-1]}); retrain with a smaller --lora-r")
    lines = [["vllm", "serve", model], ["--enable-lora"], ["--lora-modules", *modules], ["--max-lora-rank", str(rank)],
             ["--max-loras", str(len(versions))]]
    command = [w for line in lines for w in line]
    (folder / "serve.sh").write_text(
        f"#!/bin/sh\n# every version of {version.name} on one base; the OpenAI API on port 8000\n"
        'cd "$(dirname "$0")"\n' + " \\\n  ".join(" ".join(map(shlex.quote, line)) for line in lines) + ' "$@"\n'
    )
    (folder / "serve.sh").chmod(0o755)
    system = version.manifest.get("llm", {}).get("system")
    (folder / "README.md").write_text(_readme(version.name, active, [v.version for v in versions], system))
    return [f"vLLM: {'base/ + ' if model == './base' else ''}{len(versions)} adapter(s), rank <= {rank}; run ./serve.sh in {spec.to} on a GPU machine",
            " ".join(shlex.quote(w) for w in command)]


def _base(version) -> str:
    """The base as vLLM loads it: a local folder, or a hub id when the base came from the hub."""
    info = version.manifest.get("base", {})
    if info.get("path") and Path(info["path"]).is_dir():
        return str(Path(info["path"]))
    path = models.resolve_llm(info.get("name"))
    return info["name"] if "models--" in str(path) else str(path)  # the Hugging Face cache: a hub model


def _readme(name: str, active: int | None, versions: list[int], system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "..."}]
    return (
        f"# {name} for vLLM\n\n"
        f"`./serve.sh` starts `vllm serve` with every version as a LoRA adapter: `{name}` (v{active}, the active one) and "
        + ", ".join(f"`{name}@{v}`" for v in versions) + ".\n\n"
        "```python\nfrom openai import OpenAI\n\n"
        'client = OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")\n'
        f"reply = client.chat.completions.create(model={name!r}, messages={messages!r}, temperature=0)\n"
        "print(reply.choices[0].message.content)\n```\n\n"
        + ("Send the system message it was trained with (above): vLLM does not add it.\n" if system else "")
    )
