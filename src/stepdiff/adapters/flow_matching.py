"""Flow-matching helpers shared by the transformer families (QwenImage, Flux, SD3): the resolution
shift ``mu``, the default sigmas and 2x2 latent packing, as their diffusers pipelines compute them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from ..params import GenerationParams
from .diffusers_base import DiffusersAdapter, Schedule


def resolution_shift(scheduler: Any, image_seq_len: int, default_max_shift: float = 1.15) -> float:
    """``mu`` for dynamic shifting: linear in the number of image tokens between the scheduler's bounds
    (a scheduler config without ``max_shift`` gets the pipeline's default: 1.15, SD3's 1.16)."""
    config = scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


def flow_timesteps(scheduler: Any, num_steps: int, device: torch.device, image_seq_len: int) -> torch.Tensor:
    """Timesteps from the pipelines' default sigmas ``linspace(1, 1/n, n)``, shifted for the image size,
    with the scheduler started at index 0 (QwenImagePipeline, FluxPipeline)."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if scheduler.config.get("use_flow_sigmas"):
        sigmas = None
    mu = resolution_shift(scheduler, image_seq_len)  # used by the scheduler only with dynamic shifting
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


def flow_schedule(adapter: DiffusersAdapter, params: GenerationParams, image_seq_len: int) -> Schedule:
    """A request's schedule (``DiffusersAdapter.schedule``) of ``flow_timesteps`` for an image of
    ``image_seq_len`` tokens."""
    steps = params.num_inference_steps
    return adapter.schedule(
        params, lambda scheduler: flow_timesteps(scheduler, steps, adapter.device, image_seq_len), image_seq_len
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[1, c, h, w] latents -> [1, (h/2)(w/2), 4c] tokens of 2x2 patches (QwenImage and Flux alike)."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """[1, (h/2)(w/2), 4c] tokens -> [1, c, h/f, w/f] latents for an image of ``height`` x ``width``."""
    return FluxPipeline._unpack_latents(tokens, height, width, vae_scale_factor)
