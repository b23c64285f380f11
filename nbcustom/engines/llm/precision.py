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
- the LoRA layers that read the same input (q, k, v; gate, up: found in a forward pass of
  two tokens, ``_same_input``) are one autograd node (``_lora_function``): their frozen
  weights side by side in one product, their A matrices stacked in another, their B
  matrices (block-diagonal) in one ``addmm_``; in the backward pass the LoRA term is added
  inside the input gradient's product. peft computes each layer as five to seven nodes, with
  casts, scaling and sums; a layer that shares its input with none is a node of its own;
- attention runs in float32 (the CPU's bf16 attention backward is slower than float32 at
  fine-tuning lengths).

tests/benchmarks/bench_finetune_cpu.py measures the whole.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
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
        which costs 0.3 s and did not make generation faster; nor are they where the CPU
        cannot (``cpu_features().packs_bf16``).

        Every change is undone on every exit, a failure half-way through the set-up
        included: each one's undo is armed before it is made."""
        if self.compute == self.weights:
            yield model
            return
        if self.device == "cpu":
            os.environ.setdefault(*ONEDNN_CACHE)  # unless the user set it
        import torch

        dtype = getattr(torch, self.compute)
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        adapters = [m for m in model.modules() if hasattr(m, "get_base_layer") and hasattr(m, "lora_A")]
        lean = [m for m in adapters if _plain_lora(m) and not any(p.requires_grad for p in m.get_base_layer().parameters())]
        groups = _same_input(causal, lean)  # before anything below changes the model
        frozen = [m.get_base_layer() for m in adapters if m not in lean] + [causal.get_output_embeddings()]
        attention = causal.config._attn_implementation
        with contextlib.ExitStack() as undo:
            for layer in frozen:
                if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad:
                    undo.callback(setattr, layer, "weight", layer.weight)
                    layer.weight = torch.nn.Parameter(layer.weight.detach().to(dtype), requires_grad=False)
            for m in adapters:
                if hasattr(m, "cast_input_dtype_enabled"):
                    undo.callback(setattr, m, "cast_input_dtype_enabled", m.cast_input_dtype_enabled)
                    m.cast_input_dtype_enabled = False  # autocast casts; peft need not cast each input
            for group in groups:  # their frozen weights only in the lean forward's layout
                adapted = _Adapted(group, dtype, training)
                for index, layer in enumerate(group):
                    undo.callback(vars(layer).pop, "forward", None)
                    layer.forward = functools.partial(adapted.forward, index)
            if attention == "sdpa":
                undo.callback(causal.set_attn_implementation, attention)
                causal.set_attn_implementation(_float32_sdpa())
            undo.enter_context(self.autocast())
            yield model

    def autocast(self):
        """Autocast to the compute dtype, where it differs from the weights' (else nothing)."""
        import torch

        if self.compute == self.weights:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=getattr(torch, self.compute), cache_enabled=False)


@dataclass(frozen=True)
class CPUFeatures:
    """What this CPU offers the bf16 paths, decided once (``cpu_features``): ``native_bf16``,
    the features that multiply bf16 natively (empty: bf16 is emulated, slower than float32);
    ``packs_bf16``, whether oneDNN can reorder bf16 weights into its blocked layout (it needs
    avx512bw/vl/dq or avx_ne_convert, and crashes without); ``capability``, the kernels
    PyTorch dispatches to (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...)."""

    native_bf16: tuple[str, ...]
    packs_bf16: bool
    capability: str


@functools.cache
def cpu_features() -> CPUFeatures:
    """This CPU's ``CPUFeatures`` (tests patch this function to stand in for another CPU)."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    packs = bool(getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    native = tuple(flag for flag in NATIVE_BF16 if capabilities.get(flag)) if packs else ()
    return CPUFeatures(native, packs, torch.backends.cpu.get_cpu_capability())


def choose(device: str, asked: str = "auto", strict: bool = True) -> Precision:
    """The precision of a run on ``device`` ("cpu" or "cuda") for ``--precision asked``.

    bf16 on a CPU without native bf16 would be emulated, about 25x slower than float32
    (tests/benchmarks/RESULTS.md): asked for, it is refused with one line; replayed
    (``strict=False``: ``%%predict`` of a version trained in bf16 elsewhere), it is float32."""
    import torch

    from ...errors import NbCustomError

    if device == "cuda":
        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if asked == "fp32":
            return Precision(device, "float32", "float32", "asked for (--precision fp32)")
        if asked == "bf16" and half != "bfloat16":
            raise NbCustomError("--precision bf16: this GPU has no bfloat16; use --precision auto (float16) or fp32")
        return Precision(device, half, half, "the GPU's half precision" if asked == "auto" else "asked for (--precision bf16)")
    cpu = cpu_features()
    flags = cpu.native_bf16
    has = f"this CPU has {' and '.join(flags)}" if flags else f"this CPU ({cpu.capability}) has no native bf16 (no amx_bf16 or avx512_bf16)"
    if asked == "fp32":
        return Precision(device, "float32", "float32", f"asked for (--precision fp32; {has})")
    if asked == "bf16" and not flags:
        if strict:
            raise NbCustomError(
                f"--precision bf16 needs a CPU with amx_bf16 or avx512_bf16; this one ({cpu.capability}) would emulate bf16 "
                "about 25x slower than fp32: use --precision auto or fp32"
            )
        return Precision(device, "float32", "float32", f"trained in bf16; {has}: fp32")
    if asked == "bf16":
        return Precision(device, "float32", "bfloat16", f"asked for (--precision bf16; {has})")
    return Precision(device, "float32", "bfloat16" if flags else "float32", has)


def _plain_lora(layer) -> bool:
    """A LoRA layer with one active adapter, unmerged, without dropout or DoRA, on a linear layer."""
    import torch

    names = layer.active_adapters
    return (
        len(names) == 1 and not layer.merged and not layer.disable_adapters and isinstance(layer.get_base_layer(), torch.nn.Linear)
        and not layer.use_dora.get(names[0], False) and isinstance(layer.lora_dropout[names[0]], torch.nn.Identity)
        and names[0] in layer.lora_A and not getattr(layer, "lora_bias", {}).get(names[0], False)
    )


def _same_input(model, layers) -> list[list]:
    """``layers`` in groups that read the same input: the layers called one after another on
    the same tensor in a forward pass of two tokens (q, k, v; gate, up) form a group, each
    other layer (or every layer, if that pass fails) stands alone."""
    import torch

    calls = []

    def record(layer, forward, x, *args, **kwargs):
        calls.append((layer, x))
        return forward(x, *args, **kwargs)

    for layer in layers:
        layer.forward = functools.partial(record, layer, layer.forward)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=model.device), use_cache=False)
    except Exception:  # an architecture that needs more than input ids: no groups
        calls = []
    finally:
        for layer in layers:
            del layer.forward
    groups, seen = [], set()
    for layer, x in calls:
        if layer not in seen:
            if groups and groups[-1][1] is x:
                groups[-1][0].append(layer)
            else:
                groups.append(([layer], x))
            seen.add(layer)
    return [group for group, _ in groups] + [[layer] for layer in layers if layer not in seen]


class _Adapted:
    """LoRA layers that read the same input (``_same_input``) computed as one autograd node
    (``_lora_function``), from one ``dtype`` copy of the input: the first layer called
    computes every layer's output, the others take theirs (per thread: ``pack.backward``
    may run shards of a batch side by side). ``packed``: see ``_frozen``."""

    def __init__(self, layers, dtype, packed: bool):
        import torch

        base = [layer.get_base_layer() for layer in layers]
        self.layers, self.dtype, self.sizes = layers, dtype, tuple(b.out_features for b in base)
        self.weights = _frozen(torch.cat([b.weight.detach() for b in base]), dtype, packed)
        biases = [b.bias.detach() if b.bias is not None else torch.zeros(b.out_features) for b in base]
        self.bias = torch.cat(biases).to(dtype) if any(b.bias is not None for b in base) else None
        self.pending = threading.local()  # (input, its version, {index: output}) not yet taken

    def forward(self, index, x, *args, **kwargs):
        pending = getattr(self.pending, "outputs", None)
        if pending is not None and pending[0] is x and pending[1] == x._version and index in pending[2]:
            out = pending[2].pop(index)
            if not pending[2]:
                self.pending.outputs = None
            return out
        names = [layer.active_adapters[0] for layer in self.layers]
        lora = [layer.lora_A[n].weight for layer, n in zip(self.layers, names)] + [layer.lora_B[n].weight for layer, n in zip(self.layers, names)]
        scales = tuple(layer.scaling[n] for layer, n in zip(self.layers, names))
        outputs = dict(enumerate(_lora_function().apply(x.to(self.dtype), *self.weights, self.bias, self.sizes, scales, *lora)))
        out = outputs.pop(index)
        self.pending.outputs = (x, x._version, outputs) if outputs else None
        return out


def _frozen(weight, dtype, packed: bool = True) -> tuple:
    """A frozen weight W in ``dtype`` twice: for ``x W^T`` and, as W^T, for the input gradient
    ``g W``; if ``packed``, each one reordered once into oneDNN's blocked layout where the CPU
    allows it (a training step's products then skip the reorder they would do at every call)."""
    import torch

    weight = weight.detach().to(dtype)
    if not packed or dtype != torch.bfloat16 or not cpu_features().packs_bf16:
        return weight, weight.t()
    pack = torch.ops.mkldnn._reorder_linear_weight
    return pack(weight), pack(weight.t().contiguous())


@functools.cache
def _lora_function():
    import torch

    def product(x, weight, bias=None):
        """``x weight^T + bias`` for a plain or a oneDNN-packed ``weight``."""
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    class LoRALinear(torch.autograd.Function):
        """LoRA layers that read the same input as one node: ``x W_i^T + b_i + s_i (x A_i^T) B_i^T``
        for each layer i, as ``x W^T + b + (x A^T) B^T`` with the W_i and b_i side by side, the
        A_i stacked and the s_i B_i block-diagonal, and the input, A and B gradients, the LoRA
        terms added inside the products (``addmm_``)."""

        @staticmethod
        def forward(ctx, x, weight, transposed, bias, sizes, scales, *lora):
            count = len(sizes)
            flat = x.reshape(-1, x.shape[-1])
            a = torch.cat(lora[:count]).to(x.dtype)
            b = torch.block_diag(*(m * s for m, s in zip(lora[count:], scales))).to(x.dtype)
            low = flat @ a.t()
            out = product(flat, weight, bias).addmm_(low, b.t())
            ctx.save_for_backward(flat, low, a, b)
            ctx.transposed, ctx.sizes, ctx.scales, ctx.shape = transposed, sizes, scales, x.shape
            ctx.ranks, ctx.dtype = [m.shape[0] for m in lora[:count]], lora[0].dtype
            return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in out.split(sizes, 1))

        @staticmethod
        def backward(ctx, *grads):
            flat, low, a, b = ctx.saved_tensors
            grads = [g.reshape(-1, g.shape[-1]) for g in grads]
            grad = (torch.cat(grads, 1) if len(grads) > 1 else grads[0]).to(flat.dtype)
            grad_low = grad @ b
            grad_x = product(grad, ctx.transposed).addmm_(grad_low, a).view(ctx.shape) if ctx.needs_input_grad[0] else None
            grad_a = (grad_low.t() @ flat).to(ctx.dtype).split(ctx.ranks)
            grad_b = grad.t() @ low  # its diagonal blocks (one per layer) are the B gradients / s
            rows, cols = (list(itertools.accumulate(n, initial=0)) for n in (ctx.sizes, ctx.ranks))
            grad_b = [grad_b[rows[i]:rows[i + 1], cols[i]:cols[i + 1]].to(ctx.dtype, copy=True).mul_(s) for i, s in enumerate(ctx.scales)]
            return grad_x, None, None, None, None, None, *grad_a, *grad_b

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
