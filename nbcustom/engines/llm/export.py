"""LLM exports: the LoRA merged into the base as Hugging Face safetensors (``merged``), a
GGUF file for llama.cpp (``gguf``) and an Ollama model folder (``ollama``).

Each writer takes a committed version, an empty folder and the ``ExportSpec`` and returns
lines saying what it wrote. The GGUF file is written with the ``gguf`` package's writer,
tensor by tensor from the merged model, so no llama.cpp binary is needed. What exported
models most often lose is the chat format: the tokenizer, its chat template, the turn-end
token as eos and a pad token travel with every format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ... import models
from ...errors import NbCustomError
from .generator import Generator

# llama.cpp's names for the file types and tensor types of each --quant
QUANTS = {"f16": ("MOSTLY_F16", "F16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
SYSTEM_MARK, PROMPT_MARK = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def merged(version, folder: Path, spec) -> list[str]:
    """The adapter merged into the base: ``from_pretrained(folder)`` needs no peft."""
    model, tokenizer = _merged(version)
    with models.quiet():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return [f"merged model (safetensors, {str(model.dtype).removeprefix('torch.')}) with the tokenizer and its chat template",
            f"load it with AutoModelForCausalLM.from_pretrained({spec.to!r})"]


def gguf(version, folder: Path, spec) -> list[str]:
    """One GGUF file with weights, hyperparameters, tokenizer and chat template."""
    model, tokenizer = _merged(version)
    path = folder / gguf_name(version, spec.quant)
    write_gguf(model, tokenizer, path, spec.quant, f"{version.name}-v{version.version}", _pretokenizer(version))
    return [f"{path.name}: {spec.quant} GGUF, {path.stat().st_size / 2**20:.1f} MiB (llama.cpp: llama-cli -m {path.name})"]


def ollama(version, folder: Path, spec) -> list[str]:
    """The GGUF file plus a ``Modelfile`` with the chat template, stop token and system
    message, and a README saying how to create the Ollama model."""
    model, tokenizer = _merged(version)
    path = folder / gguf_name(version, spec.quant)
    write_gguf(model, tokenizer, path, spec.quant, f"{version.name}-v{version.version}", _pretokenizer(version))
    system = Generator(version).system
    (folder / "Modelfile").write_text(modelfile(tokenizer, path.name, system))
    (folder / "README.md").write_text(
        f"# {version.name} v{version.version} for Ollama\n\n"
        f"```bash\nollama create {version.name} -f Modelfile\nollama run {version.name}\n```\n\n"
        f"`{path.name}` holds the weights ({spec.quant}); `Modelfile` the chat template, the stop token and the system message.\n"
    )
    return [f"{path.name} ({spec.quant}, {path.stat().st_size / 2**20:.1f} MiB) + Modelfile",
            f"ollama create {version.name} -f {Path(spec.to) / 'Modelfile'}"]


def gguf_name(version, quant: str) -> str:
    return f"{version.name}-v{version.version}.{quant}.gguf"


def _merged(version):
    """(merged model on the CPU, tokenizer with eos = the turn-end token and a pad token)."""
    from transformers import AutoTokenizer

    generator = Generator(version)
    with models.quiet():
        model = generator.merged().to("cpu")
        tokenizer = AutoTokenizer.from_pretrained(version.model_dir)
    if not tokenizer.chat_template:
        raise NbCustomError(f"{version.name}@{version.version}: its tokenizer has no chat template, so an export would lose the chat format")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            config.bos_token_id = tokenizer.bos_token_id
    model.config.name_or_path = f"{version.name}-v{version.version}"
    return model, tokenizer


# --- GGUF -------------------------------------------------------------------------------------
def write_gguf(model, tokenizer, path: Path, quant: str, name: str, pretokenizer: str = "default") -> None:
    """Write ``model`` (a llama-architecture causal LM) and its BPE tokenizer as GGUF;
    ``pretokenizer`` names llama.cpp's pre-tokenizer regex for the tokenizer's family."""
    import gguf as gg

    config = model.config
    if config.model_type != "llama":
        raise NbCustomError(f"GGUF export supports llama-architecture models (SmolLM2, Llama), not {config.model_type}; use --format merged")
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0), "rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        raise NbCustomError(f"GGUF export does not write {rope['rope_type']} RoPE scaling; use --format merged")
    file_type, tensor_type = (getattr(gg.LlamaFileType, QUANTS[quant][0]), getattr(gg.GGMLQuantizationType, QUANTS[quant][1]))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gg.GGUFWriter(path, gg.MODEL_ARCH_NAMES[gg.MODEL_ARCH.LLAMA])
    writer.add_type(gg.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gg.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size, pretokenizer)

    names = gg.get_tensor_name_map(gg.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: no output.weight, which is how readers know the embedding is shared
        module, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(module)
        if gguf_name is None:
            raise NbCustomError(f"GGUF export: no GGUF name for the tensor {hf_name}; use --format merged")
        data = tensor.detach().float().cpu().numpy()
        # llama.cpp applies rotary embeddings to interleaved pairs, transformers to halves:
        # the rows of q and k are reordered as llama.cpp's converter does
        if module.endswith("self_attn.q_proj"):
            data = _permute(data, heads)
        elif module.endswith("self_attn.k_proj"):
            data = _permute(data, kv_heads)
        if data.ndim == 1:  # norms stay float32, as llama.cpp keeps them
            writer.add_tensor(f"{gguf_name}.{suffix}", data)
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", gg.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute(weights, heads: int):
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _add_tokenizer(writer, tokenizer, size: int, pretokenizer: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp reads it (``tokenizer.ggml.*``)."""
    import gguf as gg

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise NbCustomError(f"GGUF export supports BPE tokenizers, not {backend['model']['type']}; use --format merged")
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    missing = [i for i, t in enumerate(tokens) if t is None]
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    types = [
        gg.TokenType.UNUSED if i in missing else gg.TokenType.CONTROL if i in special
        else gg.TokenType.USER_DEFINED if tokens[i] in added else gg.TokenType.NORMAL
        for i in range(size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pretokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_eot_token_id(tokenizer.eos_token_id)  # the turn-end token ends generation
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    writer.add_chat_template(tokenizer.chat_template)


def _pretokenizer(version) -> str:
    """llama.cpp picks its pre-tokenizer regex by name: SmolLM's own, else its default."""
    return "smollm" if "smollm" in json.dumps(version.manifest.get("base", {})).lower() else "default"


# --- Ollama -----------------------------------------------------------------------------------
def modelfile(tokenizer, gguf_file: str, system: str | None) -> str:
    """An Ollama ``Modelfile``: FROM the GGUF, the chat TEMPLATE in Ollama's Go template
    syntax, the turn-end token as stop, greedy decoding (as ``%%predict``) and SYSTEM."""
    template, default_system = ollama_template(tokenizer)
    system = system if system is not None else default_system
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{_triple_quoted(template)}"""',
             f'PARAMETER stop "{tokenizer.eos_token}"', "PARAMETER temperature 0"]
    if system is not None:
        lines.append(f'SYSTEM """{_triple_quoted(system)}"""')
    return "\n".join(lines) + "\n"


def ollama_template(tokenizer) -> tuple[str, str | None]:
    """(Ollama TEMPLATE, the system message the chat template adds when none is given).

    The model's own chat template is rendered with markers in place of the system message
    and the prompt; the markers become ``{{ .System }}`` and ``{{ .Prompt }}``, so the
    TEMPLATE writes exactly the text the model was tuned on. ``{{ .Response }}`` and the
    turn-end token close the assistant turn, for Ollama's earlier turns of a chat.
    """
    full = _render(tokenizer, [{"role": "system", "content": SYSTEM_MARK}, {"role": "user", "content": PROMPT_MARK}])
    alone = _render(tokenizer, [{"role": "user", "content": PROMPT_MARK}])
    if full.count(SYSTEM_MARK) != 1 or full.count(PROMPT_MARK) != 1 or full.index(SYSTEM_MARK) > full.index(PROMPT_MARK):
        raise NbCustomError("the model's chat template has no plain system + user turn; use --format gguf and write the Modelfile yourself")
    before, after = full.split(SYSTEM_MARK)
    pattern = re.compile(re.escape(before) + "(.*)" + re.escape(after), re.S)
    found = pattern.fullmatch(alone)
    if found:  # the chat template adds a default system message: SYSTEM will carry it
        template, default = before + "{{ .System }}" + after, found.group(1)
    elif full.endswith(alone):  # no system turn unless one is given
        cut = len(full) - len(alone)
        template, default = "{{ if .System }}" + before + "{{ .System }}" + full[len(before) + len(SYSTEM_MARK):cut] + "{{ end }}" + alone, None
    else:
        raise NbCustomError("cannot express the model's chat template for Ollama; use --format gguf and write the Modelfile yourself")
    return template.replace(PROMPT_MARK, "{{ .Prompt }}") + "{{ .Response }}" + tokenizer.eos_token, default


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _triple_quoted(text: str) -> str:
    if '"""' in text:
        raise NbCustomError('a system message or chat template with """ cannot be written into a Modelfile')
    return text
