"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) in the step protocol.

Each method is the matching slice of ``StableDiffusionPipeline.__call__`` (diffusers 0.42), so a
request run alone reproduces the stock pipeline bit for bit. The safety checker is not run.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..runner import Rows
from .base import (
    GenerationParams,
    PipelineInfo,
    RequestState,
    check_latents,
    host_schedule,
    require_conditioning,
    rgb_preview,
    scheduler_step_kwargs,
    to_uint8,
)
from .loading import (
    Stage,
    compatible_schedulers,
    load_component_config,
    load_stage_pipeline,
    new_scheduler,
    vae_scale_factor,
)

STAGE_COMPONENTS = {
    Stage.TEXT_ENCODER: ("text_encoder", "tokenizer"),
    Stage.DENOISE: ("unet", "scheduler"),
    Stage.DECODE: ("vae",),
    Stage.INFO: (),
}
# Linear map from SD 1.x/2.x latent channels to RGB: a cheap preview without running the VAE.
LATENT_RGB_FACTORS = np.array(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
    dtype=np.float32,
)


class StableDiffusionAdapter:
    """Step-wise ``StableDiffusionPipeline``; loads only the components its stage needs."""

    family: ClassVar[str] = "stable-diffusion"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.pipe = load_stage_pipeline(
            StableDiffusionPipeline, path, STAGE_COMPONENTS[stage], device, dtype, requires_safety_checker=False
        )
        unet_config = load_component_config(path, "unet", UNet2DConditionModel)
        self.scale_factor = vae_scale_factor(path)
        self.in_channels = unet_config["in_channels"]
        self.cross_attention_dim = unet_config["cross_attention_dim"]
        self.text_length = load_component_config(path, "text_encoder")["max_position_embeddings"]
        self._cfg_capable = unet_config.get("time_cond_proj_dim") is None
        scheduler_config = load_component_config(path, "scheduler")
        self.scheduler_config = scheduler_config
        sample = unet_config["sample_size"] * self.scale_factor
        self.info = PipelineInfo(
            family=self.family,
            pipeline_class="StableDiffusionPipeline",
            default_height=sample,
            default_width=sample,
            size_multiple=self.scale_factor,
            default_steps=50,
            default_guidance_scale=7.5,
            default_scheduler=scheduler_config["_class_name"],
            schedulers=compatible_schedulers(scheduler_config),
        )

    def uses_cfg(self, params: GenerationParams) -> bool:
        """diffusers' ``do_classifier_free_guidance``."""
        return params.guidance_scale > 1 and self._cfg_capable

    def encode_prompt(self, params: GenerationParams) -> dict[str, torch.Tensor]:
        do_cfg = self.uses_cfg(params)
        prompt_embeds, negative_prompt_embeds = self.pipe.encode_prompt(
            params.prompt, self.device, 1, do_cfg, params.negative_prompt
        )
        conditioning = {"prompt_embeds": prompt_embeds}
        if do_cfg:
            conditioning["negative_prompt_embeds"] = negative_prompt_embeds
        return conditioning

    def prepare(self, correlation_id: int, params: GenerationParams, conditioning: dict[str, torch.Tensor]) -> RequestState:
        do_cfg = self.uses_cfg(params)
        require_conditioning(conditioning, ["prompt_embeds", "negative_prompt_embeds"] if do_cfg else ["prompt_embeds"])
        prompt_embeds = conditioning["prompt_embeds"].to(self.device, self.dtype)
        if do_cfg:
            negative = conditioning["negative_prompt_embeds"].to(self.device, self.dtype)
            prompt_embeds = torch.cat([negative, prompt_embeds])
        scheduler = new_scheduler(params.scheduler, self.scheduler_config)
        timesteps, _ = retrieve_timesteps(scheduler, params.num_inference_steps, self.device)
        generator = torch.Generator().manual_seed(params.seed)
        shape = (1, self.in_channels, params.height // self.scale_factor, params.width // self.scale_factor)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        return RequestState(
            correlation_id=correlation_id,
            params=params,
            scheduler=scheduler,
            generator=generator,
            timesteps=timesteps,
            host_timesteps=host_schedule(scheduler, timesteps),
            latents=latents,
            conditioning={"prompt_embeds": prompt_embeds},
            do_cfg=do_cfg,
        )

    def batch_key(self, state: RequestState) -> Hashable:
        return (tuple(state.latents.shape), tuple(state.conditioning["prompt_embeds"].shape[1:]))

    def denoiser_rows(self, state: RequestState) -> list[Rows]:
        """The UNet input of ``StableDiffusionPipeline``'s loop: [uncond, cond] rows with guidance."""
        rows = torch.cat([state.latents] * 2) if state.do_cfg else state.latents
        sample = state.scheduler.scale_model_input(rows, state.host_timestep)
        embeds = state.conditioning["prompt_embeds"]
        # float timesteps for every scheduler (PNDM's are integers): the UNet embeds them as float anyway
        timestep = state.timestep.to(torch.float32).expand(rows.shape[0])
        return [self._unet_rows(sample, timestep, embeds)]

    @staticmethod
    def _unet_rows(sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> Rows:
        """UNet inputs as runner rows, keyed by their shapes (real requests and warm-up alike)."""
        key = ("unet", tuple(sample.shape[1:]), tuple(embeds.shape[1:]))
        return Rows(key, {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeds})

    def forward(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pipe.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"], return_dict=False)[0]

    def guide(self, state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        [prediction] = outputs
        if not state.do_cfg:
            return prediction
        uncond, text = prediction.chunk(2)
        return uncond + state.params.guidance_scale * (text - uncond)

    def warmup_rows(self, height: int, width: int) -> list[Rows]:
        latent = (self.in_channels, height // self.scale_factor, width // self.scale_factor)
        sample = torch.zeros((2, *latent), device=self.device, dtype=self.dtype)
        embeds = torch.zeros((2, self.text_length, self.cross_attention_dim), device=self.device, dtype=self.dtype)
        return [self._unet_rows(sample, torch.zeros(2, device=self.device), embeds)]

    def step(self, state: RequestState, model_output: torch.Tensor) -> None:
        kwargs = scheduler_step_kwargs(state.scheduler, state.generator)
        state.latents = state.scheduler.step(model_output, state.host_timestep, state.latents, **kwargs, return_dict=False)[0]
        state.step_index += 1

    def output_latents(self, state: RequestState) -> torch.Tensor:
        """SD keeps its latents as the VAE takes them."""
        return state.latents

    def preview(self, latents: np.ndarray) -> np.ndarray:
        """A small RGB preview [h/8, w/8, 3] uint8 of latents [1, 4, h/8, w/8], without the VAE."""
        rgb = np.einsum("chw,cr->hwr", latents[0].astype(np.float32), LATENT_RGB_FACTORS)
        return rgb_preview(rgb)

    def check_latents(self, latents: torch.Tensor | None) -> torch.Tensor:
        channels = self.pipe.vae.config.latent_channels
        return check_latents(latents, channels)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        image = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
        return to_uint8(image)
