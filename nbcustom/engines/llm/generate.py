"""The LoRA adapter around a cached base model, greedy batched generation and the
before/after scores of a held-out set.

The base model is loaded once per kernel (``models.load_llm``) and shared, so an adapter is
only ever attached for the duration of a ``with adapted(...)`` block and removed after it:
the cached base weights stay untouched for the next run.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ...evaluate import generation_scores, perplexity
from . import data as llm_data, labels as llm_labels, pack as llm_pack

GENERATE_BATCH = 32  # a holdout of 20 in one batch: 17.2 s against 23.3 s as 16 + 4 (AVX2, one thread, 80 new tokens)
LOSS_BATCH = 8

# Where LoRA goes, by architecture (config.model_type); others get every linear layer.
TARGETS = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


def lora_config(model, r: int, alpha: int):
    from peft import LoraConfig

    targets = TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


@contextlib.contextmanager
def adapted(model, adapter_dir=None, config=None, trainable: bool = False) -> Iterator:
    """``model`` with a LoRA adapter: loaded from ``adapter_dir`` or new from ``config``.
    On exit the adapter is removed again, leaving the shared base model as it was."""
    import warnings

    from peft import PeftModel, get_peft_model

    _strip(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if adapter_dir is not None:
                peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
            else:
                peft_model = get_peft_model(model, config)
        yield peft_model
        peft_model.unload()
    finally:
        _strip(model)  # also after a failure half-way through attaching or unloading


def _strip(model) -> None:
    """Remove an adapter a crashed run may have left on the shared base model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    _settle(model)


def _settle(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy completions of tokenized prompts, in batches of similar length (left padded)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    model.eval()
    for done in range(0, len(order), GENERATE_BATCH):
        chunk = order[done:done + GENERATE_BATCH]
        batch = llm_data.left_padded([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        for i, ids in zip(chunk, out[:, batch["input_ids"].shape[1]:].tolist()):
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if progress:
            progress(min(done + GENERATE_BATCH, len(order)), len(order))
    return texts


def mean_loss(model, examples: list[llm_data.Example], pad_id: int) -> float:
    """Mean cross-entropy per response token over ``examples``."""
    import torch

    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(examples), LOSS_BATCH):
        batch = llm_pack.pack(examples[start:start + LOSS_BATCH], 0, pad_id)
        with torch.no_grad():
            loss, n = llm_pack.causal_lm_loss(model, batch)
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def score(model, tokenizer, examples: list[llm_data.Example], max_new_tokens: int, display, label: str, labels: list[str] | None = None) -> tuple[dict, list[str]]:
    """Before/after metrics of ``model`` on held-out ``examples`` and its answers: greedy
    generations, or with ``labels`` the best label of each (``llm.labels``)."""
    display.phase(f"evaluating {label}")
    loss = mean_loss(model, examples, tokenizer.pad_token_id)
    prompts = [e.ids[: e.prompt_length] for e in examples]
    references = [e.response for e in examples]
    if labels:
        texts, _ = llm_labels.classify(model, tokenizer, prompts, labels)
        return {**llm_labels.metrics(texts, references, labels)[0], "eval_loss": loss}, texts
    texts = generate(model, tokenizer, prompts, max_new_tokens, lambda i, n: display.step(i, n))
    metrics = {"eval_loss": loss, "perplexity": perplexity(loss)}
    metrics.update(generation_scores(texts, references))
    return metrics, texts
