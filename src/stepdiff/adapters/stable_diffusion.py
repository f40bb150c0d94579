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

from ..runner import Rows
from .base import GenerationParams, PipelineInfo, RequestState, text_embeddings, to_device, to_uint8
from .diffusers_base import DiffusersAdapter, classifier_free_guidance
from .loading import (
    Stage,
    compatible_schedulers,
    load_component_config,
    randn_tensor_without_sync,
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


class StableDiffusionAdapter(DiffusersAdapter):
    """Step-wise ``StableDiffusionPipeline``; loads only the components its stage needs."""

    family: ClassVar[str] = "stable-diffusion"
    pipeline_class = StableDiffusionPipeline
    stage_components = STAGE_COMPONENTS
    conditioning = text_embeddings("prompt_embeds", "negative_prompt_embeds")
    load_kwargs: ClassVar[dict[str, bool]] = {"requires_safety_checker": False}
    latent_rgb_factors = LATENT_RGB_FACTORS
    default_guidance_scale: ClassVar[float] = 7.5

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        unet_config = load_component_config(path, "unet", UNet2DConditionModel)
        self.vae_scale_factor = vae_scale_factor(path)
        self.in_channels = unet_config["in_channels"]
        self.sample_size = unet_config["sample_size"]
        self.cross_attention_dim = unet_config["cross_attention_dim"]
        # LCM-distilled UNets embed the guidance scale (timestep_cond) instead of running CFG
        self.time_cond_proj_dim = unet_config.get("time_cond_proj_dim")
        self.text_length = load_component_config(path, "text_encoder")["max_position_embeddings"]
        super().__init__(path, stage, device, dtype)

    def pipeline_info(self) -> PipelineInfo:
        sample = self.sample_size * self.vae_scale_factor
        return PipelineInfo(
            pipeline_class=self.pipeline_class.__name__,
            default_height=sample,
            default_width=sample,
            size_multiple=self.vae_scale_factor,
            default_steps=50,
            default_guidance_scale=self.default_guidance_scale,
            default_scheduler=self.scheduler_config["_class_name"],
            schedulers=compatible_schedulers(self.scheduler_config),
        )

    def uses_cfg(self, params: GenerationParams) -> bool:
        """diffusers' ``do_classifier_free_guidance``."""
        return params.guidance_scale > 1 and self.time_cond_proj_dim is None

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        do_cfg = self.uses_cfg(batch[0])
        texts = self.batch_texts(batch)
        prompt_embeds, negative_prompt_embeds = self.pipe.encode_prompt(
            texts["prompt"], self.device, 1, do_cfg, texts["negative_prompt"]
        )
        return self.request_rows(do_cfg, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)

    def prepare(
        self, correlation_id: int, params: GenerationParams, conditioning: dict[str, torch.Tensor]
    ) -> RequestState:
        self.checked_conditioning(params, conditioning)
        kept = self.guided_conditioning(params, conditioning)
        steps = params.num_inference_steps
        schedule = self.schedule(params, lambda scheduler: retrieve_timesteps(scheduler, steps, self.device)[0])
        generator = self.seeded_generator(params)
        shape = (1, self.in_channels, params.height // self.vae_scale_factor, params.width // self.vae_scale_factor)
        dtype = kept["prompt_embeds"].dtype
        latents = randn_tensor_without_sync(shape, generator=generator, device=self.device, dtype=dtype)
        latents = latents * schedule.scheduler.init_noise_sigma
        if self.time_cond_proj_dim is not None:
            kept["timestep_cond"] = self.timestep_cond(params)
        return self.new_state(correlation_id, params, kept, schedule, generator, latents)

    def timestep_cond(self, params: GenerationParams) -> torch.Tensor:
        """The guidance-scale embedding an LCM-distilled UNet takes, as the pipeline builds it."""
        scale = torch.tensor(params.guidance_scale - 1).repeat(1)
        embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=self.time_cond_proj_dim)
        return to_device(embedding, self.device, self.dtype)

    def batch_key(self, state: RequestState) -> Hashable:
        return (tuple(state.latents.shape), tuple(state.conditioning["prompt_embeds"].shape[1:]))

    def denoiser_rows(self, state: RequestState) -> list[Rows]:
        """The UNet input of the pipeline's loop: [uncond, cond] rows with guidance."""
        rows = torch.cat([state.latents] * 2) if state.do_cfg else state.latents
        sample = state.scheduler.scale_model_input(rows, state.host_timestep)
        # float timesteps for every scheduler (PNDM's are integers): the UNet embeds them as float anyway
        timestep = state.timestep.to(torch.float32).expand(rows.shape[0])
        return [self._unet_rows({"sample": sample, "timestep": timestep, **self.row_conditioning(state)})]

    def row_conditioning(self, state: RequestState) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs per row (named as ``forward`` reads them)."""
        rows = {"encoder_hidden_states": state.conditioning["prompt_embeds"]}
        if "timestep_cond" in state.conditioning:
            rows["timestep_cond"] = state.conditioning["timestep_cond"]
        return rows

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one row of ``row_conditioning`` (for warm-up)."""
        shapes = {"encoder_hidden_states": (self.text_length, self.cross_attention_dim)}
        if self.time_cond_proj_dim is not None:
            shapes["timestep_cond"] = (self.time_cond_proj_dim,)
        return shapes

    @staticmethod
    def _unet_rows(tensors: dict[str, torch.Tensor]) -> Rows:
        """UNet inputs as runner rows, keyed by their shapes (real requests and warm-up alike)."""
        return Rows(("unet", *((name, tuple(value.shape[1:])) for name, value in sorted(tensors.items()))), tensors)

    def forward(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added_cond_kwargs = {name: inputs[name] for name in ("text_embeds", "time_ids") if name in inputs} or None
        return self.pipe.unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep_cond=inputs.get("timestep_cond"),
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]

    def guide(self, state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return classifier_free_guidance(state, outputs)

    def warmup_rows(self, height: int, width: int) -> list[Rows]:
        """Rows of a guided request (one row for LCM UNets, which do not run CFG)."""
        rows = 1 if self.time_cond_proj_dim is not None else 2
        latent = (self.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        shapes = {"sample": latent, **self.row_shapes()}
        tensors = {
            name: torch.zeros((rows, *shape), device=self.device, dtype=self.dtype) for name, shape in shapes.items()
        }
        return [self._unet_rows({**tensors, "timestep": torch.zeros(rows, device=self.device)})]

    def output_latents(self, state: RequestState) -> torch.Tensor:
        """SD keeps its latents as the VAE takes them."""
        return state.latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        image = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
        return to_uint8(image)
