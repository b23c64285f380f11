"""The arithmetic precision of a fine-tuning run: ``--precision auto|fp32|bf16``.

On a GPU the base model is loaded in bfloat16 (float16 where bf16 is missing). On a CPU the
base model stays float32 in memory and a bf16 run computes under ``torch.autocast`` when the
processor multiplies bf16 natively (AMX or AVX512-BF16: oneDNN's kernels make a linear
layer several times faster than in float32); elsewhere bf16 would only be emulated, so
``auto`` keeps float32 there. Autocast on float32 weights, rather than a bf16 model, keeps
the residual stream, the norms and the embeddings in float32: the loss stays within bf16
rounding of the float32 loss, and one cached base model serves both precisions. LoRA
weights and the optimizer state are float32 in every case.

While a CPU bf16 run computes (``Precision.computing``), what was measured to cost time
besides the arithmetic is changed, and undone afterwards (a step of short rows is mostly
per-operation overhead on a CPU):

- the frozen weights of the adapted linear layers and of the LM head are bf16 copies, cast
  once rather than at every product;
- each LoRA layer computes ``x W^T + s (x A^T) B^T`` as one product plus one ``addmm``
  from one bf16 copy of its input, shared by the layers that read the same input (q, k, v;
  gate, up), instead of peft's separate casts, scaling and sum;
- attention runs in float32 (the CPU's bf16 attention backward is slower than float32 at
  fine-tuning lengths).

tests/benchmarks/bench_finetune_cpu.py measures the whole.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")  # x86 and arm64 names in torch.cpu.get_capabilities()
# oneDNN (bf16 products on CPU) keeps a compiled kernel for every new shape, 1024 by default;
# packed rows bring new shapes each step and a 30-step run grew to 4.2 GB. 128 held it at
# 3.4 GB at the same speed (tests/benchmarks/RESULTS.md). Read by oneDNN at its first use.
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")


@dataclass(frozen=True)
class Precision:
    """Where and how a run computes: ``device``, the base model's ``weights`` dtype, the
    ``compute`` dtype (autocast's when it differs from the weights) and ``why``."""

    device: str
    weights: str
    compute: str
    why: str

    @property
    def name(self) -> str:
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.compute]

    @contextlib.contextmanager
    def computing(self, model):
        """``model`` (a PEFT model or a transformers model) computing in this precision until
        the block ends: on a CPU in bf16, autocast, bf16 copies of the adapted layers' and the
        LM head's frozen weights, the lean LoRA forward, float32 attention (see the module
        docstring) and peft's input casts off; elsewhere nothing changes. No autocast cast
        cache: it would keep the LoRA weights' bf16 copies from before each update."""
        if self.compute == self.weights:
            yield model
            return
        if self.device == "cpu":
            os.environ.setdefault(*ONEDNN_CACHE)  # unless the user set it
        import torch

        dtype = getattr(torch, self.compute)
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        adapters = [m for m in model.modules() if hasattr(m, "get_base_layer") and hasattr(m, "lora_A")]
        frozen = [m.get_base_layer() for m in adapters] + [causal.get_output_embeddings()]
        kept = [(layer, layer.weight) for layer in frozen if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad]
        lean = [m for m in adapters if _plain_lora(m)]
        attention = causal.config._attn_implementation
        for layer, weight in kept:
            layer.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        casting = [(m, m.cast_input_dtype_enabled) for m in adapters if hasattr(m, "cast_input_dtype_enabled")]
        for m, _ in casting:
            m.cast_input_dtype_enabled = False  # autocast casts; peft need not cast each input
        shared = _SharedCast(dtype)
        for layer in lean:
            layer.forward = functools.partial(_lora_forward, layer, shared)
        if attention == "sdpa":
            causal.set_attn_implementation(_float32_sdpa())
        try:
            with torch.autocast(self.device, dtype=dtype, cache_enabled=False):
                yield model
        finally:
            for layer, weight in kept:
                layer.weight = weight
            for layer in lean:
                del layer.forward
            for m, enabled in casting:
                m.cast_input_dtype_enabled = enabled
            shared.last = None
            if attention == "sdpa":
                causal.set_attn_implementation(attention)


def choose(device: str, asked: str = "auto") -> Precision:
    """The precision of a run on ``device`` ("cpu" or "cuda") for ``--precision asked``."""
    import torch

    if device == "cuda":
        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if asked == "fp32":
            return Precision(device, "float32", "float32", "asked for (--precision fp32)")
        if asked == "bf16" and half != "bfloat16":
            from ...errors import NbCustomError

            raise NbCustomError("--precision bf16: this GPU has no bfloat16; use --precision auto (float16) or fp32")
        return Precision(device, half, half, "the GPU's half precision" if asked == "auto" else "asked for (--precision bf16)")
    flags = cpu_bf16_flags()
    has = f"this CPU has {' and '.join(flags)}" if flags else "this CPU has no native bf16 (no amx_bf16 or avx512_bf16)"
    if asked == "fp32":
        return Precision(device, "float32", "float32", f"asked for (--precision fp32; {has})")
    if asked == "bf16":
        return Precision(device, "float32", "bfloat16", f"asked for (--precision bf16; {has}{'' if flags else ': emulated, slow'})")
    return Precision(device, "float32", "bfloat16" if flags else "float32", has)


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU features that make bf16 matrix products native (empty: none)."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    return tuple(flag for flag in NATIVE_BF16 if capabilities.get(flag)) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()


class _SharedCast(threading.local):
    """The bf16 copy of the last input cast: q, k and v (gate and up) read the same tensor,
    so it is cast and kept for the backward pass once, not once per layer. One per thread
    (``pack.backward`` may run shards of a batch side by side)."""

    def __init__(self, dtype):
        self.dtype, self.last = dtype, None

    def __call__(self, x):
        if x.dtype == self.dtype:
            return x
        last = self.last
        if last is None or last[0] is not x or last[1] != x._version:  # not changed in place since
            last = self.last = (x, x._version, x.to(self.dtype))
        return last[2]


def _plain_lora(layer) -> bool:
    """A LoRA layer with one active adapter, unmerged, without dropout or DoRA, on a linear layer."""
    import torch

    names = layer.active_adapters
    return (
        len(names) == 1 and not layer.merged and not layer.disable_adapters and isinstance(layer.get_base_layer(), torch.nn.Linear)
        and not layer.use_dora.get(names[0], False) and isinstance(layer.lora_dropout[names[0]], torch.nn.Identity)
        and names[0] in layer.lora_A and not getattr(layer, "lora_bias", {}).get(names[0], False)
    )


def _lora_forward(layer, cast, x, *args, **kwargs):
    """``x W^T + b + s (x A^T) B^T`` from one bf16 copy of ``x``: the LoRA sum and scaling
    are the ``addmm``'s, and autocast casts the small A and B."""
    import torch

    name = layer.active_adapters[0]
    base, x = layer.get_base_layer(), cast(x)
    out = torch.nn.functional.linear(x, base.weight, base.bias)
    low = torch.nn.functional.linear(x, layer.lora_A[name].weight)
    sum_ = torch.addmm(out.flatten(0, -2), low.flatten(0, -2), layer.lora_B[name].weight.t(), alpha=layer.scaling[name])
    return sum_.view(out.shape)


@functools.cache
def _float32_sdpa() -> str:
    """The name of transformers' sdpa attention run in float32 (with autocast off), registered once."""
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register("nbcustom_sdpa_float32", attention)
    AttentionMaskInterface.register("nbcustom_sdpa_float32", sdpa_mask)
    return "nbcustom_sdpa_float32"
