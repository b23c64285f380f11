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
  once rather than at every product; an adapted layer's W is kept twice (W and W^T, for
  the input gradient) in oneDNN's blocked layout, which its products otherwise rebuild at
  every call;
- each LoRA layer is one autograd node (``_lora_function``): ``x W^T + s (x A^T) B^T`` as
  one product plus one ``addmm_`` from one bf16 copy of its input, shared by the layers that
  read the same input (q, k, v; gate, up), and in the backward pass the LoRA term added
  inside the input gradient's product, instead of peft's separate casts, scaling and sums;
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
    def computing(self, model, training: bool = True):
        """``model`` (a PEFT model or a transformers model) computing in this precision until
        the block ends: on a CPU in bf16, autocast, bf16 copies of the adapted layers' and the
        LM head's frozen weights, the lean LoRA forward, float32 attention (see the module
        docstring) and peft's input casts off; elsewhere nothing changes. No autocast cast
        cache: it would keep the LoRA weights' bf16 copies from before each update.
        ``training=False`` (``%%predict``): the frozen weights are not packed for oneDNN,
        which costs 0.3 s and did not make generation faster."""
        if self.compute == self.weights:
            yield model
            return
        if self.device == "cpu":
            os.environ.setdefault(*ONEDNN_CACHE)  # unless the user set it
        import torch

        dtype = getattr(torch, self.compute)
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        adapters = [m for m in model.modules() if hasattr(m, "get_base_layer") and hasattr(m, "lora_A")]
        lean = [m for m in adapters if _plain_lora(m) and not m.get_base_layer().weight.requires_grad]
        frozen = [m.get_base_layer() for m in adapters if m not in lean] + [causal.get_output_embeddings()]
        kept = [(layer, layer.weight) for layer in frozen if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad]
        attention = causal.config._attn_implementation
        for layer, weight in kept:
            layer.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        casting = [(m, m.cast_input_dtype_enabled) for m in adapters if hasattr(m, "cast_input_dtype_enabled")]
        for m, _ in casting:
            m.cast_input_dtype_enabled = False  # autocast casts; peft need not cast each input
        shared = _SharedCast(dtype)
        for layer in lean:  # their frozen weights only in the lean forward's layout
            layer.forward = functools.partial(_lora_forward, layer, shared, _frozen(layer.get_base_layer().weight, dtype, training))
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


def _lora_forward(layer, cast, weights, x, *args, **kwargs):
    """``x W^T + b + s (x A^T) B^T`` from one bf16 copy of ``x`` (``_lora_function``);
    ``weights``: the frozen W for the product and for the input gradient (``_frozen``)."""
    name = layer.active_adapters[0]
    lora = (layer.lora_A[name].weight, layer.lora_B[name].weight)
    return _lora_function().apply(cast(x), *lora, *weights, layer.get_base_layer().bias, layer.scaling[name])


def _frozen(weight, dtype, packed: bool = True) -> tuple:
    """A frozen weight W in ``dtype`` twice: for ``x W^T`` and, as W^T, for the input gradient
    ``g W``; if ``packed``, each one reordered once into oneDNN's blocked layout where torch
    has it (a training step's products then skip the reorder they would do at every call)."""
    import torch

    weight = weight.detach().to(dtype)
    pack = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if not packed or pack is None or dtype != torch.bfloat16:
        return weight, weight.t()
    return pack(weight), pack(weight.t().contiguous())


@functools.cache
def _lora_function():
    import torch

    def product(x, weight, bias=None):
        """``x weight^T + bias`` for a plain or a oneDNN-packed ``weight``."""
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)

    class LoRALinear(torch.autograd.Function):
        """A LoRA layer as one autograd node: ``x W^T + b + s (x A^T) B^T`` and its input, A and
        B gradients, the LoRA terms added inside the products (``addmm_``)."""

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, weight, transposed, bias, scale):
            flat = x.reshape(-1, x.shape[-1])
            a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
            low = flat @ a.t()
            out = product(flat, weight, None if bias is None else bias.to(x.dtype)).addmm_(low, b.t(), alpha=scale)
            ctx.save_for_backward(flat, low, a, b)
            ctx.transposed, ctx.scale, ctx.dtype, ctx.shape = transposed, scale, lora_a.dtype, x.shape
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            flat, low, a, b = ctx.saved_tensors
            grad = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
            grad_low = (grad @ b).mul_(ctx.scale)
            grad_x = product(grad, ctx.transposed).addmm_(grad_low, a).view(ctx.shape) if ctx.needs_input_grad[0] else None
            grad_a = (grad_low.t() @ flat).to(ctx.dtype)
            grad_b = (grad.t() @ low).mul_(ctx.scale).to(ctx.dtype)
            return grad_x, grad_a, grad_b, None, None, None, None

    return LoRALinear


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
