"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) in the step protocol.

Each method is the matching slice of ``StableDiffusion3Pipeline.__call__`` (diffusers 0.42), so a
request run alone reproduces the stock pipeline bit for bit: CLIP-L, CLIP-G and T5 embeddings
(``max_sequence_length`` 256), pooled CLIP embeddings, classifier-free guidance with the negative
prompt on [uncond, cond] rows of one transformer call, the flow-matching scheduler (shifted for the
image size when its config asks for dynamic shifting). Skip-layer guidance is not offered.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from ..runner import Rows
from .base import (
    GenerationParams,
    PipelineInfo,
    RequestState,
    pooled_embeddings,
    text_embeddings,
    to_uint8,
)
from .diffusers_base import DiffusersAdapter, classifier_free_guidance
from .flow_matching import resolution_shift
from .loading import (
    Stage,
    compatible_schedulers,
    load_component_config,
    randn_tensor_without_sync,
    vae_scale_factor,
)

STAGE_COMPONENTS = {
    Stage.TEXT_ENCODER: ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
    Stage.DENOISE: ("transformer", "scheduler"),
    Stage.DECODE: ("vae",),
    Stage.INFO: (),
}
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
# SD3 latent channels -> RGB (with a bias; ComfyUI's preview factors); tiny pipelines preview 3 channels.
SD3_LATENT_RGB_FACTORS = np.array(
    [
        [-0.0922, -0.0175, 0.0749],
        [0.0311, 0.0633, 0.0954],
        [0.1994, 0.0927, 0.0458],
        [0.0856, 0.0339, 0.0902],
        [0.0587, 0.0272, -0.0496],
        [-0.0006, 0.1104, 0.0309],
        [0.0978, 0.0306, 0.0427],
        [-0.0042, 0.1038, 0.1358],
        [-0.0194, 0.0020, 0.0669],
        [-0.0488, 0.0130, -0.0268],
        [0.0922, 0.0988, 0.0951],
        [-0.0278, 0.0524, -0.0542],
        [0.0332, 0.0456, 0.0895],
        [-0.0069, -0.0030, -0.0810],
        [-0.0596, -0.0465, -0.0293],
        [-0.1448, -0.1463, -0.1189],
    ],
    dtype=np.float32,
)
SD3_LATENT_RGB_BIAS = np.array([0.2394, 0.2135, 0.1925], dtype=np.float32)


def text_length(path: Path) -> int:
    """Tokens of the transformer's text input, the same for every prompt: ``encode_prompt`` pads CLIP's
    to ``tokenizer_max_length`` and T5's to ``max_sequence_length`` (without T5: zeros of CLIP's length)."""
    clip = json.loads((path / "tokenizer" / "tokenizer_config.json").read_text()).get("model_max_length", 77)
    has_t5 = json.loads((path / "model_index.json").read_text()).get("text_encoder_3", [None])[0] is not None
    return clip + (MAX_SEQUENCE_LENGTH if has_t5 else clip)


class StableDiffusion3Adapter(DiffusersAdapter):
    """Step-wise ``StableDiffusion3Pipeline``; loads only the components its stage needs."""

    family: ClassVar[str] = "stable-diffusion-3"
    pipeline_class = StableDiffusion3Pipeline
    stage_components = STAGE_COMPONENTS
    latent_rgb_factors = SD3_LATENT_RGB_FACTORS
    latent_rgb_bias = SD3_LATENT_RGB_BIAS
    conditioning = (
        *text_embeddings("prompt_embeds", "negative_prompt_embeds"),
        *pooled_embeddings("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    )
    step_takes_generator = False

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        transformer_config = load_component_config(path, "transformer")
        self.vae_scale_factor = vae_scale_factor(path)
        self.patch_size = transformer_config["patch_size"]
        self.sample_size = transformer_config["sample_size"]
        self.in_channels = transformer_config["in_channels"]
        self.joint_attention_dim = transformer_config["joint_attention_dim"]
        self.pooled_projection_dim = transformer_config["pooled_projection_dim"]
        self.text_length = text_length(path)
        super().__init__(path, stage, device, dtype)

    def pipeline_info(self) -> PipelineInfo:
        default_size = self.sample_size * self.vae_scale_factor
        return PipelineInfo(
            pipeline_class="StableDiffusion3Pipeline",
            default_height=default_size,
            default_width=default_size,
            size_multiple=self.vae_scale_factor * self.patch_size,
            size_multiple_reason=f"VAE factor {self.vae_scale_factor} x transformer patch size {self.patch_size}",
            default_steps=28,
            default_guidance_scale=7.0,
            default_scheduler=self.scheduler_config["_class_name"],
            schedulers=compatible_schedulers(self.scheduler_config),
        )

    def uses_cfg(self, params: GenerationParams) -> bool:
        """diffusers' ``do_classifier_free_guidance``."""
        return params.guidance_scale > 1

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        do_cfg = self.uses_cfg(batch[0])
        texts = self.batch_texts(batch)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            texts["prompt"],
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=texts["negative_prompt"],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return self.request_rows(
            do_cfg,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
        )

    def prepare(
        self, correlation_id: int, params: GenerationParams, conditioning: dict[str, torch.Tensor]
    ) -> RequestState:
        self.checked_conditioning(params, conditioning)
        kept = self.guided_conditioning(params, conditioning)
        generator = self.seeded_generator(params)
        shape = (1, self.in_channels, params.height // self.vae_scale_factor, params.width // self.vae_scale_factor)
        latents = randn_tensor_without_sync(shape, generator=generator, device=self.device, dtype=self.dtype)
        image_seq_len = (shape[2] // self.patch_size) * (shape[3] // self.patch_size)

        def set_timesteps(scheduler: Any) -> torch.Tensor:
            shift = {}
            if scheduler.config.get("use_dynamic_shifting"):
                shift["mu"] = resolution_shift(scheduler, image_seq_len, default_max_shift=1.16)
            return retrieve_timesteps(scheduler, params.num_inference_steps, self.device, **shift)[0]

        schedule = self.schedule(params, set_timesteps, image_seq_len)
        return self.new_state(correlation_id, params, kept, schedule, generator, latents)

    def batch_key(self, state: RequestState) -> Hashable:
        return tuple(state.latents.shape[1:]), state.conditioning["prompt_embeds"].shape[1]

    def denoiser_rows(self, state: RequestState) -> list[Rows]:
        """The transformer input of the pipeline's loop: [uncond, cond] rows with guidance."""
        latents = torch.cat([state.latents] * 2) if state.do_cfg else state.latents
        embeds = state.conditioning["prompt_embeds"]
        key = ("transformer", tuple(latents.shape[1:]), embeds.shape[1])
        tensors = {
            "hidden_states": latents,
            "timestep": state.timestep.expand(latents.shape[0]),
            "encoder_hidden_states": embeds,
            "pooled_projections": state.conditioning["pooled_prompt_embeds"],
        }
        return [Rows(key, tensors)]

    def forward(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pipe.transformer(**inputs, joint_attention_kwargs=None, return_dict=False)[0]

    def guide(self, state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return classifier_free_guidance(state, outputs)

    def warmup_rows(self, height: int, width: int) -> list[Rows]:
        """Rows of a guided request (the default guidance runs CFG), its text as ``encode_prompt`` pads
        every prompt."""
        rows = 2
        latent = (self.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        tensors = {
            "hidden_states": (rows, *latent),
            "encoder_hidden_states": (rows, self.text_length, self.joint_attention_dim),
            "pooled_projections": (rows, self.pooled_projection_dim),
        }
        zeros = {name: torch.zeros(shape, device=self.device, dtype=self.dtype) for name, shape in tensors.items()}
        timestep = torch.zeros(rows, device=self.device)  # the scheduler's float32 timesteps
        return [Rows(("transformer", latent, self.text_length), {**zeros, "timestep": timestep})]

    def output_latents(self, state: RequestState) -> torch.Tensor:
        return state.latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = (latents.to(self.device, vae.dtype) / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return to_uint8(self.pipe.image_processor.postprocess(image, output_type="np"))
