"""The arithmetic precision of a fine-tuning run: ``--precision auto|fp32|bf16``.

On a GPU the base model is loaded in bfloat16 (float16 where bf16 is missing). On a CPU the
base model stays float32 in memory and the run computes under ``torch.autocast`` in
bfloat16 when the processor multiplies bf16 natively (AMX or AVX512-BF16: oneDNN's kernels
make a linear layer several times faster than in float32); elsewhere bf16 would only be
emulated, so ``auto`` keeps float32 there. Autocast on float32 weights, rather than bf16
weights, keeps the residual stream, the norms and the embeddings in float32: its loss stays
within bf16 rounding of the float32 loss, and one cached base model serves both precisions.
LoRA weights and the optimizer state are float32 in every case.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")  # x86 and arm64 names in torch.cpu.get_capabilities()


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

    def autocast(self):
        """Autocast to the compute dtype where the weights are float32 (CPU bf16); else nothing.
        No cast cache: it would keep the LoRA weights' bf16 copies from before each update."""
        import torch

        if self.compute == self.weights:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=getattr(torch, self.compute), cache_enabled=False)


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
