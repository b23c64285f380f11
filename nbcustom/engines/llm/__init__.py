"""The LLM engine: LoRA fine-tuning (``train``) and generation from a version (``load``).

Parts: ``data`` (rows -> tokenized examples, split, schedule), ``pack`` (packed rows, loss,
micro-batches), ``generate`` (adapters, greedy generation, scoring), ``train`` (the loop and
checkpoints), ``launch`` and ``worker`` (the loop in torchrun workers: ``--devices N``),
``generator`` (a committed version).
"""

from .generator import Generator, load
from .train import train

__all__ = ["Generator", "load", "train"]
