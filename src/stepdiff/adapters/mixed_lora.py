"""Different LoRA settings in one denoiser forward: stacked adapter weights and per-row scales.

PEFT applies a layer's active adapters to every row of a batch, so requests with different adapters or
scales cannot share its forward. ``MixedLoRA`` gives each PEFT LoRA layer of the denoiser the weights
of every loaded adapter stacked along the rank (the ``lora_A`` of all adapters as one down projection,
their ``lora_B`` as one up projection) and a forward hook that adds

    up((down(x)) * column_scales[row])

to the base layer's output while PEFT's own adapters are off. A row's column scales are its request's
adapter scales times each adapter's ``lora_alpha / r``, zero for the adapters it does not use, so the base
layers run once for all rows and each row adds its own low-rank delta. The per-row scales are an input
of the forward (``LORA_SCALES``, batched with the rows), so one CUDA graph serves every mix of adapters
and scales. A row without adapters adds an exact zero: its output equals the base forward's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .base import to_device

# The forward input holding each row's adapter scales ([rows, adapters], in ``MixedLoRA.names`` order)
LORA_SCALES = "lora_scales"
# Above this many stacked rank columns in one layer, every row paying for every adapter costs more than
# grouping forwards by setting does: the adapter then keeps grouping
MAX_STACKED_RANK = 256


def unsupported_reason(layers: Sequence[nn.Module], names: Sequence[str]) -> str | None:
    """Why these PEFT LoRA layers cannot be stacked (None: they can)."""
    from peft.tuners.lora import layer as lora_layer

    for module in layers:
        if not isinstance(module, lora_layer.Linear | lora_layer.Conv2d):
            return f"{type(module).__name__} LoRA layers"
        present = [name for name in names if name in module.lora_A]
        if any(name in module.lora_variant for name in present):
            return "DoRA and other LoRA variants"
        if any(module.lora_bias.get(name) for name in present):
            return "LoRA with bias"
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out LoRA layers"
        if sum(module.r[name] for name in present) > MAX_STACKED_RANK:
            return f"more than {MAX_STACKED_RANK} stacked rank columns in one layer"
    return None


class StackedLayer:
    """One PEFT LoRA layer's adapters as one down and one up projection, added by a forward hook."""

    def __init__(self, module: nn.Module, owner: MixedLoRA):
        present = [name for name in owner.names if name in module.lora_A]
        self.owner = owner
        self.down = stacked(module.lora_A, present, dim=0)
        self.up = stacked(module.lora_B, present, dim=1)
        # per stacked column: the adapter's index in the scales, and its unit scaling (alpha / r, or rsLoRA's)
        slots, factors = [], []
        for name in present:
            root = math.sqrt(module.r[name]) if module.use_rslora.get(name, False) else module.r[name]
            slots += [owner.names.index(name)] * module.r[name]
            factors += [module.lora_alpha[name] / root] * module.r[name]
        weight = self.down.weight
        self.column_slots = torch.tensor(slots, device=weight.device)
        self.column_factors = torch.tensor(factors, device=weight.device, dtype=weight.dtype)
        self.channel_dim = 1 if isinstance(self.down, nn.Conv2d) else -1
        self.handle = module.register_forward_hook(self.add_delta)

    def add_delta(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        scales = self.owner.scales
        if scales is None:  # not a mixed forward: PEFT's own path (or the base layer) answered
            return None
        x = args[0]
        if x.shape[0] != scales.shape[0]:
            raise RuntimeError(f"mixed LoRA: {module.__class__.__name__} got {x.shape[0]} rows for {scales.shape[0]}")
        columns = scales[:, self.column_slots].to(self.column_factors.dtype) * self.column_factors
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[self.channel_dim] = columns.shape[1]
        hidden = self.down(x.to(self.down.weight.dtype)) * columns.view(shape)
        return output + self.up(hidden).to(output.dtype)


def stacked(projections: Mapping[str, nn.Module], names: Sequence[str], dim: int) -> nn.Module:
    """A copy of the first adapter's projection whose weight holds every named adapter's, along ``dim``."""
    merged = copy.deepcopy(projections[names[0]])
    weight = torch.cat([projections[name].weight.detach() for name in names], dim=dim)
    merged.weight = nn.Parameter(weight, requires_grad=False)
    return merged


class MixedLoRA:
    """Every LoRA layer of a denoiser stacked (``StackedLayer``); ``applied`` runs a forward with per-row scales."""

    def __init__(self, denoisers: Sequence[nn.Module], names: Sequence[str]):
        from peft.tuners.lora.layer import LoraLayer

        self.names = tuple(names)
        layers = [
            module
            for denoiser in denoisers
            for module in denoiser.modules()
            if isinstance(module, LoraLayer) and any(name in module.lora_A for name in self.names)
        ]
        reason = unsupported_reason(layers, self.names)
        if reason is not None:
            raise ValueError(f"different LoRA settings cannot share a forward: {reason}")
        self.scales: torch.Tensor | None = None
        self.layers = [StackedLayer(module, self) for module in layers]

    def scale_row(self, loras: tuple[tuple[str, float], ...], device: torch.device) -> torch.Tensor:
        """A request's adapter scales as one row ([1, adapters]; zero for the adapters it does not use)."""
        row = torch.zeros(1, len(self.names))
        for name, scale in loras:
            if name in self.names:
                row[0, self.names.index(name)] = scale
        return to_device(row, device)

    @contextlib.contextmanager
    def applied(self, scales: torch.Tensor) -> Iterator[None]:
        """Within the block each LoRA layer adds every row's delta at the row's scales (PEFT's adapters off)."""
        self.scales = scales
        try:
            yield
        finally:
            self.scales = None
