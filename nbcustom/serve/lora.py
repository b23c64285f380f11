"""Several LoRA adapters on one base model, chosen per row of a batch.

Each targeted linear layer holds the A and B matrices of every loaded adapter stacked
(``A`` [adapters, r, in], ``B`` [out, adapters, r], the scale folded into B, smaller ranks
padded with zeros). A batch whose rows use one adapter adds ``x @ A[i].T @ B[:, i].T``; a
mixed batch runs every adapter on every row as one wide LoRA and zeroes, per row, the columns
of the adapters the row does not use: two matrix products per layer, no loop over adapters
and no splitting of the batch (punica / S-LoRA do the same with gathers). peft's mixed-adapter
path (``adapter_names``) splits every layer's input by adapter: 16 rows of two adapters, at most
20 new tokens, took 8.6-10.0 s with peft's ``generate`` against 5.4-6.5 s in the server's batch
(RESULTS.md, ``nbcustom serve``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import NbCustomError

PREFIX = "base_model.model."


class _Rows:
    """Which adapter each row of the running batch uses, shared by every layer."""

    single: int | None = None  # the adapter of a batch whose rows all use one (None: the base)
    onehot = None  # [batch, adapters] of a mixed batch: 1 where the row uses the adapter
    _masks: dict

    def mask(self, rank: int):
        """The one-hot rows repeated over ``rank`` columns per adapter: [batch, 1, adapters * rank]."""
        if rank not in self._masks:
            self._masks[rank] = self.onehot.repeat_interleave(rank, 1)[:, None, :]
        return self._masks[rank]


class Layer(torch.nn.Module):
    """A linear layer plus every adapter's LoRA: ``A`` [adapters, r, in], ``B`` [out, adapters, r]."""

    def __init__(self, base: torch.nn.Linear, rows: _Rows):
        super().__init__()
        self.base, self.rows = base, rows
        weight = base.weight
        self.A = weight.new_zeros(0, 0, base.in_features)
        self.B = weight.new_zeros(base.out_features, 0, 0)

    def add(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Stack one more adapter (None where it does not target this layer)."""
        from torch.nn.functional import pad

        rank = max(self.A.shape[1], 0 if A is None else A.shape[0])
        self.A, self.B = pad(self.A, (0, 0, 0, rank - self.A.shape[1])), pad(self.B, (0, rank - self.B.shape[2]))
        new_A, new_B = self.A.new_zeros(1, rank, self.A.shape[2]), self.B.new_zeros(self.B.shape[0], 1, rank)
        if A is not None:
            new_A[0, : A.shape[0]], new_B[:, 0, : B.shape[1]] = A, B
        self.A, self.B = torch.cat([self.A, new_A]), torch.cat([self.B, new_B], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.rows
        if rows.single is not None:
            return out + (x @ self.A[rows.single].T) @ self.B[:, rows.single].T
        if rows.onehot is not None:  # every adapter on every row, the other adapters' columns zeroed
            adapters, rank = self.A.shape[0], self.A.shape[1]
            low = (x @ self.A.reshape(adapters * rank, -1).T) * rows.mask(rank)
            return out + low @ self.B.reshape(-1, adapters * rank).T
        return out


class MultiLoRA:
    """A base model whose targeted layers carry every loaded adapter; ``use(names)`` picks one
    adapter per row (None: the base) for the forward passes that follow."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.rows = model, _Rows()
        self.names: list[str] = []
        self.layers: dict[str, Layer] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def load(self, name: str, folder: str | Path) -> None:
        """Add the PEFT LoRA adapter saved in ``folder`` (``adapter_config.json`` +
        ``adapter_model.safetensors``) under ``name``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        unsupported = [k for k in ("use_dora", "modules_to_save", "alpha_pattern", "layers_to_transform", "trainable_token_indices") if config.get(k)]
        if config.get("peft_type") != "LORA" or config.get("fan_in_fan_out") or unsupported:
            raise NbCustomError(f"the adapter in {folder} uses {', '.join(unsupported) or 'a layout'} the server cannot batch; only plain LoRA adapters are served")
        weights = load_file(str(folder / "adapter_model.safetensors"))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
            pairs.setdefault(module, {})[part.split(".")[0]] = tensor
        modules = dict(self.model.named_modules())
        for module in pairs:
            if module not in self.layers:
                self._wrap(module, modules[module])
        for module, layer in self.layers.items():
            pair = pairs.get(module)
            if pair is None:
                layer.add(None, None)
                continue
            A, B = pair["A"], pair["B"]
            rank = A.shape[0]
            scale = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
            like = layer.base.weight
            layer.add(A.to(like.device, like.dtype), (B * scale).to(like.device, like.dtype))
        self.names.append(name)

    def _wrap(self, module: str, linear: torch.nn.Module) -> None:
        if not isinstance(linear, torch.nn.Linear):
            raise NbCustomError(f"the adapter targets `{module}`, which is not a linear layer; only plain LoRA adapters on linear layers are served")
        parent_name, _, child = module.rpartition(".")
        layer = Layer(linear, self.rows)
        for _ in self.names:  # adapters loaded before did not target it
            layer.add(None, None)
        setattr(self.model.get_submodule(parent_name), child, layer)
        self.layers[module] = layer

    def use(self, names: list[str | None]) -> None:
        """The adapter of each row of the next forward passes (``None``: the base model)."""
        index = [None if n is None else self.names.index(n) for n in names]
        self.rows.single, self.rows.onehot, self.rows._masks = None, None, {}
        if len(set(index)) == 1:
            self.rows.single = index[0]
        else:
            weight = next(self.model.parameters())
            self.rows.onehot = weight.new_zeros(len(index), len(self.names))
            for row, i in enumerate(index):
                if i is not None:
                    self.rows.onehot[row, i] = 1
