"""FLUX.1 dev and schnell (``FluxPipeline``) in the step protocol.

Each method is the matching slice of ``FluxPipeline.__call__`` (diffusers 0.42), so a request run
alone reproduces the stock pipeline bit for bit:
- CLIP pooled plus T5 embeddings (``max_sequence_length`` 512, diffusers' default);
- packed 2x2 latents with their position ids, timesteps shifted for the image sequence length;
- the guidance embedding (``guidance_scale``, default 3.5) when the transformer has one (dev), none
  for schnell;
- true CFG with the negative prompt when ``true_cfg_scale`` > 1 and a negative prompt is given.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline

from ..runner import Rows
from .base import (
    GenerationParams,
    PipelineInfo,
    RequestState,
    pooled_embeddings,
    text_embeddings,
    to_device,
    to_uint8,
)
from .diffusers_base import DiffusersAdapter, split_rows
from .flow_matching import flow_schedule, pack_latents, unpack_latents
from .loading import (
    Stage,
    compatible_schedulers,
    load_component_config,
    randn_tensor_without_sync,
    vae_scale_factor,
)

STAGE_COMPONENTS = {
    Stage.TEXT_ENCODER: ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    Stage.DENOISE: ("transformer", "scheduler"),
    Stage.DECODE: ("vae",),
    Stage.INFO: (),
}
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default max_sequence_length
# Each text's conditioning keys (T5 embeddings, CLIP pooled embeddings), in the pipeline's order: cond, uncond
TEXTS = {
    "prompt": ("prompt_embeds", "pooled_prompt_embeds"),
    "negative_prompt": ("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
}
# FLUX.1 latent channels -> RGB (ComfyUI's preview factors); tiny pipelines preview their first 3 channels.
FLUX_LATENT_RGB_FACTORS = np.array(
    [
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    dtype=np.float32,
)
FLUX_LATENT_RGB_BIAS = np.array([-0.0329, -0.0718, -0.0851], dtype=np.float32)


class FluxAdapter(DiffusersAdapter):
    """Step-wise ``FluxPipeline``; loads only the components its stage needs."""

    family: ClassVar[str] = "flux"
    pipeline_class = FluxPipeline
    stage_components = STAGE_COMPONENTS
    latent_rgb_factors = FLUX_LATENT_RGB_FACTORS
    latent_rgb_bias = FLUX_LATENT_RGB_BIAS
    conditioning = (
        *text_embeddings("prompt_embeds", "negative_prompt_embeds"),
        *pooled_embeddings("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    )
    step_takes_generator = False

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        transformer_config = load_component_config(path, "transformer")
        self.vae_scale_factor = vae_scale_factor(path)
        self.noise_channels = transformer_config["in_channels"] // 4
        self.guidance_embeds = transformer_config.get("guidance_embeds", False)
        self.joint_attention_dim = transformer_config["joint_attention_dim"]
        self.pooled_projection_dim = transformer_config["pooled_projection_dim"]
        self.position_ids: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(path, stage, device, dtype)

    def pipeline_info(self) -> PipelineInfo:
        default_size = self.pipe.default_sample_size * self.vae_scale_factor  # 1024, whatever the config
        return PipelineInfo(
            pipeline_class="FluxPipeline",
            default_height=default_size,
            default_width=default_size,
            size_multiple=self.vae_scale_factor * 2,
            size_multiple_reason=f"VAE factor {self.vae_scale_factor} x 2x2 latent patches",
            default_steps=28,
            default_guidance_scale=3.5,  # used only by guidance-distilled transformers (dev)
            default_scheduler=self.scheduler_config["_class_name"],
            schedulers=compatible_schedulers(self.scheduler_config),
        )

    def uses_cfg(self, params: GenerationParams) -> bool:
        """diffusers' ``do_true_cfg``: a scale above 1 and a negative prompt."""
        return params.true_cfg_scale > 1 and params.negative_prompt is not None

    @staticmethod
    def _texts(do_cfg: bool) -> tuple[str, ...]:
        """The texts a request is conditioned on, in the pipeline's order: cond, then uncond."""
        return tuple(TEXTS) if do_cfg else ("prompt",)

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        conditioning = {}
        texts = self.batch_texts(batch)
        for text in self._texts(self.uses_cfg(batch[0])):
            embeds, pooled, _ = self.pipe.encode_prompt(
                texts[text],
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            conditioning |= dict(zip(TEXTS[text], (embeds, pooled), strict=True))
        return split_rows(conditioning)

    def prepare(
        self, correlation_id: int, params: GenerationParams, conditioning: dict[str, torch.Tensor]
    ) -> RequestState:
        self.checked_conditioning(params, conditioning)
        kept = {
            name: to_device(conditioning[name], self.device, self.dtype)
            for name in self.required_conditioning(self.uses_cfg(params))
        }
        generator = self.seeded_generator(params)
        height, width = self._latent_size(params.height, params.width)
        noise = randn_tensor_without_sync(
            (1, self.noise_channels, height, width), generator=generator, device=self.device, dtype=self.dtype
        )
        latents = pack_latents(noise)
        schedule = flow_schedule(self, params, latents.shape[1])
        return self.new_state(correlation_id, params, kept, schedule, generator, latents)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent height and width (2x2 latent pixels per packed token)."""
        patch = self.vae_scale_factor * 2
        return 2 * (height // patch), 2 * (width // patch)

    def batch_key(self, state: RequestState) -> Hashable:
        return self._latent_size(state.params.height, state.params.width)

    def denoiser_rows(self, state: RequestState) -> list[Rows]:
        """One row per text (cond, then uncond), as the pipeline calls the transformer once per text.

        Rows share a forward with rows of the same latent grid (their image position ids) and text length.
        """
        shared = {"hidden_states": state.latents, "timestep": state.timestep.expand(1).to(state.latents.dtype) / 1000}
        if self.guidance_embeds:
            shared["guidance"] = torch.full((1,), state.params.guidance_scale, device=self.device, dtype=torch.float32)
        rows = []
        for text in self._texts(state.do_cfg):
            embeds, pooled = (state.conditioning[name] for name in TEXTS[text])
            key = ("transformer", self._latent_size(state.params.height, state.params.width), embeds.shape[1])
            self._position_ids_for(key)
            rows.append(Rows(key, {**shared, "encoder_hidden_states": embeds, "pooled_projections": pooled}))
        return rows

    def _position_ids_for(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(text ids, image ids) of a key, built once outside any graph capture, as the pipeline builds them."""
        if key not in self.position_ids:
            _, (height, width), text_length = key
            text_ids = torch.zeros(text_length, 3).to(device=self.device, dtype=self.dtype)
            image_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, self.device, self.dtype)
            self.position_ids[key] = text_ids, image_ids
        return self.position_ids[key]

    def forward(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        text_ids, image_ids = self._position_ids_for(key)
        return self.pipe.transformer(
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"],
            guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=text_ids,
            img_ids=image_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

    def guide(self, state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if not state.do_cfg:
            return outputs[0]
        noise_pred, neg_noise_pred = outputs
        return neg_noise_pred + state.params.true_cfg_scale * (noise_pred - neg_noise_pred)

    def warmup_rows(self, height: int, width: int) -> list[Rows]:
        """A row of a request (true CFG adds a second of the same key), its text as ``encode_prompt``
        pads every prompt: T5's ``max_sequence_length`` tokens."""
        key = ("transformer", self._latent_size(height, width), MAX_SEQUENCE_LENGTH)
        self._position_ids_for(key)
        latent_height, latent_width = key[1]
        tensors = {
            "hidden_states": (1, (latent_height // 2) * (latent_width // 2), self.noise_channels * 4),
            "timestep": (1,),
            "encoder_hidden_states": (1, MAX_SEQUENCE_LENGTH, self.joint_attention_dim),
            "pooled_projections": (1, self.pooled_projection_dim),
        }
        zeros = {name: torch.zeros(shape, device=self.device, dtype=self.dtype) for name, shape in tensors.items()}
        if self.guidance_embeds:
            zeros["guidance"] = torch.zeros(1, device=self.device, dtype=torch.float32)
        return [Rows(key, zeros)]

    def output_latents(self, state: RequestState) -> torch.Tensor:
        return unpack_latents(state.latents, state.params.height, state.params.width, self.vae_scale_factor)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return to_uint8(self.pipe.image_processor.postprocess(image, output_type="np"))
