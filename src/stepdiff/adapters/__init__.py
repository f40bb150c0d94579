"""Pipeline adapters: the step protocol and one implementation per pipeline family."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..pipeline_source import resolve_pipeline
from .base import STEP_METHODS, GenerationParams, InvalidInput, PipelineInfo, RequestState, StepAdapter
from .flux import FluxAdapter
from .loading import Stage, pipeline_class_name
from .qwenimage import QwenImageAdapter
from .stable_diffusion import StableDiffusionAdapter
from .stable_diffusion_3 import StableDiffusion3Adapter
from .stable_diffusion_xl import StableDiffusionXLAdapter

ADAPTERS: tuple[type, ...] = (
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    StableDiffusion3Adapter,
    FluxAdapter,
    QwenImageAdapter,
)


class UnsupportedPipeline(ValueError):
    """The pipeline's class has no step adapter."""


def adapter_class(path: Path) -> type:
    """The adapter for the pipeline class named in ``model_index.json``."""
    name = pipeline_class_name(path)
    for adapter in ADAPTERS:
        if name in adapter.pipeline_classes():
            return adapter
    supported = ", ".join(cls for adapter in ADAPTERS for cls in adapter.pipeline_classes())
    raise UnsupportedPipeline(
        f"{name} has no step-wise adapter in stepdiff (supported: {supported}). An adapter implements "
        f"the step protocol stepdiff.adapters.StepAdapter: {', '.join(m + '()' for m in STEP_METHODS)}."
    )


def load_adapter(
    pipeline: str, stage: Stage, device: torch.device, dtype: torch.dtype, loras: Mapping[str, str] | None = None
) -> StepAdapter:
    """Resolve ``pipeline`` (directory or hub id) and load the components ``stage`` needs, with the LoRA
    adapters ``loras`` (name -> path) in them."""
    path = resolve_pipeline(pipeline)
    adapter = adapter_class(path)(path, stage, device, dtype)
    adapter.load_loras(loras or {})
    return adapter


__all__ = [
    "ADAPTERS",
    "GenerationParams",
    "InvalidInput",
    "PipelineInfo",
    "RequestState",
    "Stage",
    "StepAdapter",
    "UnsupportedPipeline",
    "adapter_class",
    "load_adapter",
]
