"""Stable Diffusion XL (``StableDiffusionXLPipeline``) in the step protocol.

The SD adapter with SDXL's differences, each the matching slice of ``StableDiffusionXLPipeline.__call__``
(diffusers 0.42): two text encoders (their hidden states concatenated, pooled embeddings from the
second), ``add_time_ids`` (original and target size = the image size, crop at (0, 0)), the VAE
upcast to float32 when the pipeline would upcast it, and the invisible watermark when diffusers
would apply one. ``force_zeros_for_empty_prompt`` is the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from .base import GenerationParams, RequestState, pooled_embeddings, text_embeddings, to_device, to_uint8
from .loading import Stage, load_component_config
from .stable_diffusion import StableDiffusionAdapter

STAGE_COMPONENTS = {
    Stage.TEXT_ENCODER: ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    Stage.DENOISE: ("unet", "scheduler"),
    Stage.DECODE: ("vae",),
    Stage.INFO: (),
}
# SDXL latent channels -> RGB (with a bias), for previews without the VAE.
LATENT_RGB_FACTORS = np.array(
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
    dtype=np.float32,
)
LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)
TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Step-wise ``StableDiffusionXLPipeline`` (base models; the refiner is an img2img pipeline)."""

    family: ClassVar[str] = "stable-diffusion-xl"
    pipeline_class = StableDiffusionXLPipeline
    stage_components = STAGE_COMPONENTS
    latent_rgb_factors = LATENT_RGB_FACTORS
    latent_rgb_bias = LATENT_RGB_BIAS
    conditioning = (
        *text_embeddings("prompt_embeds", "negative_prompt_embeds"),
        *pooled_embeddings("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    )
    load_kwargs: ClassVar[dict[str, bool]] = {}
    default_guidance_scale: ClassVar[float] = 5.0

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        unet_config = load_component_config(path, "unet")
        self.pooled_dim = (
            unet_config["projection_class_embeddings_input_dim"] - TIME_IDS * unet_config["addition_time_embed_dim"]
        )
        super().__init__(path, stage, device, dtype)
        self.text_length = load_component_config(path, "text_encoder_2")["max_position_embeddings"]
        vae = self.pipe.vae
        if vae is not None and vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)  # what the pipeline's upcast_vae() does before every decode

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        do_cfg = self.uses_cfg(batch[0])
        texts = self.batch_texts(batch)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            texts["prompt"],
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=texts["negative_prompt"],
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
        state = super().prepare(correlation_id, params, conditioning)
        size = (params.height, params.width)
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=self.pooled_dim
        )
        rows = 2 if state.do_cfg else 1  # the negative time ids are the same ones
        state.conditioning["add_time_ids"] = to_device(time_ids, self.device).repeat(rows, 1)
        state.scheduler.set_begin_index(0)  # as the pipeline does before its loop
        return state

    def row_conditioning(self, state: RequestState) -> dict[str, torch.Tensor]:
        rows = super().row_conditioning(state)
        rows["text_embeds"] = state.conditioning["pooled_prompt_embeds"]
        rows["time_ids"] = state.conditioning["add_time_ids"]
        return rows

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().row_shapes(), "text_embeds": (self.pooled_dim,), "time_ids": (TIME_IDS,)}

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype)
        if (
            getattr(vae.config, "latents_mean", None) is not None
            and getattr(vae.config, "latents_std", None) is not None
        ):
            mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if self.pipe.watermark is not None:
            image = self.pipe.watermark.apply_watermark(image)
        return to_uint8(self.pipe.image_processor.postprocess(image, output_type="np"))
