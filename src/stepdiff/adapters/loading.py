"""Finding a pipeline on disk or the hub, reading its configs, and building schedulers by name."""

from __future__ import annotations

import enum
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from .base import InvalidInput, to_device


class Stage(enum.Enum):
    """Which Triton model an adapter serves; decides which components are loaded."""

    TEXT_ENCODER = "text_encoder"
    DENOISE = "denoise"
    DECODE = "decode"
    INFO = "info"


def pipeline_class_name(path: Path) -> str:
    """``_class_name`` from the pipeline's ``model_index.json``."""
    return json.loads((path / "model_index.json").read_text())["_class_name"]


def load_component_config(path: Path, subfolder: str, component_class: Any = None) -> dict[str, Any]:
    """A component's config dict (``config.json`` or ``scheduler_config.json``) without its weights."""
    if component_class is not None:
        return dict(component_class.load_config(path, subfolder=subfolder))
    folder = path / subfolder
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise ValueError(f"{folder} has no config.json")


def load_stage_pipeline(
    pipeline_class: Any, path: Path, components: tuple[str, ...], device: Any, dtype: Any, **kwargs: Any
) -> Any:
    """``pipeline_class`` from ``path`` with only ``components`` loaded (every other one None), on
    ``device`` in ``dtype``, from safetensors, progress bars off."""
    index = json.loads((path / "model_index.json").read_text())
    skipped = {name: None for name, value in index.items() if isinstance(value, list) and name not in components}
    pipe = pipeline_class.from_pretrained(path, dtype=dtype, use_safetensors=True, **skipped, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def vae_scale_factor(path: Path) -> int:
    """``2 ** (len(vae.block_out_channels) - 1)`` as diffusers computes it, from the VAE config."""
    config = load_component_config(path, "vae")
    return 2 ** (len(config["block_out_channels"]) - 1)


@cache
def _scheduler_class(name: str) -> Any:
    return getattr(diffusers, name, None)


def compatible_schedulers(scheduler_config: dict[str, Any]) -> tuple[str, ...]:
    """Names of the schedulers that can replace the pipeline's own (and whose dependencies import)."""
    own = _scheduler_class(scheduler_config["_class_name"]).from_config(scheduler_config)
    names = {type(own).__name__, *(cls.__name__ for cls in own.compatibles)}
    usable = []
    for name in sorted(names):
        try:
            _scheduler_class(name).from_config(scheduler_config)
        except Exception:  # noqa: BLE001 - e.g. DPMSolverSDEScheduler without torchsde
            continue
        usable.append(name)
    return tuple(usable)


def new_scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """A fresh scheduler instance for one request (schedulers keep per-request history)."""
    scheduler_class = _scheduler_class(name)
    if scheduler_class is None:
        raise InvalidInput(f"scheduler: unknown scheduler {name!r}")
    module = sys.modules[scheduler_class.__module__]
    if getattr(module, "randn_tensor", None) is randn_tensor:
        module.randn_tensor = randn_tensor_without_sync
    return scheduler_class.from_config(scheduler_config)


def randn_tensor_without_sync(
    shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None
) -> torch.Tensor:
    """diffusers' ``randn_tensor``, with the noise of a CPU generator copied to the GPU from pinned memory
    without waiting (diffusers' plain copy stalls the host: at START for the initial latents, and at
    every step of ancestral/SDE schedulers). The same generator draws the same values."""
    device = torch.device(device) if device is not None else None
    if (
        device is None
        or device.type != "cuda"
        or not isinstance(generator, torch.Generator)
        or generator.device.type != "cpu"
    ):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)
    noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype, layout=layout)
    return to_device(noise, device)
