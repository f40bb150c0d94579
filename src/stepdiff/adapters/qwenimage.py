"""QwenImage (``QwenImagePipeline``: Qwen-Image, Qwen-Image-2512) in the step protocol.

Each method is the matching slice of ``QwenImagePipeline.__call__`` (diffusers 0.42), so a request
run alone reproduces the stock pipeline bit for bit. Latents live packed (2x2 patches, [1, seq, 4c])
between steps, as in the pipeline; ``output_latents`` unpacks them to [1, c, h, w] for the VAE.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import QwenImagePipeline

from ..runner import Rows
from .base import (
    GenerationParams,
    InvalidInput,
    PipelineInfo,
    RequestState,
    text_embeddings,
    to_device,
    to_uint8,
    token_masks,
)
from .diffusers_base import DiffusersAdapter
from .flow_matching import flow_schedule, pack_latents, unpack_latents
from .loading import Stage, compatible_schedulers, load_component_config, randn_tensor_without_sync

STAGE_COMPONENTS = {
    Stage.TEXT_ENCODER: ("text_encoder", "tokenizer"),
    Stage.DENOISE: ("transformer", "scheduler"),
    Stage.DECODE: ("vae",),
    Stage.INFO: (),
}
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's default max_sequence_length
TEXTS = ("prompt", "negative_prompt")  # conditioning keys: f"{text}_embeds", f"{text}_embeds_mask"
# Latent channel -> RGB for the 16-channel Wan 2.1 latent space Qwen-Image's VAE shares (the factors
# ComfyUI's previews use); other channel counts (tiny test pipelines) preview their first 3 channels.
WAN_LATENT_RGB_FACTORS = np.array(
    [
        [-0.1299, -0.1692, 0.2932],
        [0.0671, 0.0406, 0.0442],
        [0.3568, 0.2548, 0.1747],
        [0.0372, 0.2344, 0.1420],
        [0.0313, 0.0189, -0.0328],
        [0.0296, -0.0956, -0.0665],
        [-0.3477, -0.4059, -0.2925],
        [0.0166, 0.1902, 0.1975],
        [-0.0412, 0.0267, -0.1364],
        [-0.1293, 0.0740, 0.1636],
        [0.0680, 0.3019, 0.1128],
        [0.0032, 0.0581, 0.0639],
        [-0.1251, 0.0927, 0.1699],
        [0.0060, -0.0633, 0.0005],
        [0.3477, 0.2275, 0.2950],
        [0.1984, 0.0913, 0.1861],
    ],
    dtype=np.float32,
)
WAN_LATENT_RGB_BIAS = np.array([-0.1835, -0.0868, -0.3360], dtype=np.float32)


class QwenImageAdapter(DiffusersAdapter):
    """Step-wise ``QwenImagePipeline``; loads only the components its stage needs."""

    family: ClassVar[str] = "qwenimage"
    pipeline_class = QwenImagePipeline
    stage_components = STAGE_COMPONENTS
    latent_rgb_factors = WAN_LATENT_RGB_FACTORS
    latent_rgb_bias = WAN_LATENT_RGB_BIAS
    conditioning = (
        *text_embeddings("prompt_embeds", "negative_prompt_embeds"),
        *token_masks("prompt_embeds_mask", "negative_prompt_embeds_mask"),
    )
    step_takes_generator = False

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        vae_config = load_component_config(path, "vae")
        transformer_config = load_component_config(path, "transformer")
        self.vae_scale_factor = 2 ** len(vae_config["temperal_downsample"])  # as QwenImagePipeline computes it
        self.noise_channels = transformer_config["in_channels"] // 4
        self.guidance_embeds = transformer_config.get("guidance_embeds", False)
        super().__init__(path, stage, device, dtype)

    def pipeline_info(self) -> PipelineInfo:
        default_size = self.pipe.default_sample_size * self.vae_scale_factor
        return PipelineInfo(
            pipeline_class="QwenImagePipeline",
            default_height=default_size,
            default_width=default_size,
            size_multiple=self.vae_scale_factor * 2,
            size_multiple_reason=f"VAE factor {self.vae_scale_factor} x 2x2 latent patches",
            default_steps=50,
            default_guidance_scale=1.0,  # only used by guidance-distilled transformers
            default_scheduler=self.scheduler_config["_class_name"],
            schedulers=compatible_schedulers(self.scheduler_config),
            min_steps=2,
            min_steps_reason="one step gives NaN sigmas with the shift_terminal schedule",
            default_true_cfg_scale=4.0,
        )

    def uses_cfg(self, params: GenerationParams) -> bool:
        """diffusers' ``do_true_cfg``: true CFG needs a scale above 1 and a negative prompt."""
        return params.true_cfg_scale > 1 and params.negative_prompt is not None

    @staticmethod
    def _texts(do_cfg: bool) -> tuple[str, ...]:
        """The texts a request is conditioned on, in the pipeline's order: cond, then uncond."""
        return TEXTS if do_cfg else TEXTS[:1]

    def graph_text_encoders(self) -> bool:
        """Kept eager: the prompts are not padded to a fixed length, so a graph per length would be
        captured on most requests."""
        return False

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        rows: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        texts = self.batch_texts(batch)
        for name in self._texts(self.uses_cfg(batch[0])):
            embeds, mask = self.pipe.encode_prompt(texts[name], self.device, 1, max_sequence_length=MAX_SEQUENCE_LENGTH)
            # diffusers pads a batch's embeddings to its longest prompt and drops an all-ones mask (a single
            # prompt has no padding): each request keeps its own tokens and passes an explicit all-ones mask
            lengths = [embeds.shape[1]] * len(batch) if mask is None else mask.sum(dim=1).tolist()
            for row, (conditioning, length) in enumerate(zip(rows, lengths, strict=True)):
                conditioning[f"{name}_embeds"] = embeds[row : row + 1, :length]
                conditioning[f"{name}_embeds_mask"] = torch.ones((1, length), dtype=torch.long)
        return rows

    def prepare(
        self, correlation_id: int, params: GenerationParams, conditioning: dict[str, torch.Tensor]
    ) -> RequestState:
        self.checked_conditioning(params, conditioning)
        kept = {}
        for text in self._texts(self.uses_cfg(params)):
            embeds, mask = self._checked_text(text, conditioning)
            kept[f"{text}_embeds"] = to_device(embeds[:, :MAX_SEQUENCE_LENGTH], self.device, self.dtype)
            if mask is not None:  # as encode_prompt: cut, then drop an all-ones mask
                mask = mask[:, :MAX_SEQUENCE_LENGTH]
                if not mask.all():
                    kept[f"{text}_embeds_mask"] = to_device(mask, self.device)
        generator = self.seeded_generator(params)
        _, grid_height, grid_width = self._patch_grid(params)
        height, width = 2 * grid_height, 2 * grid_width  # latent size: 2x2 latent pixels per patch
        noise = randn_tensor_without_sync(
            (1, 1, self.noise_channels, height, width), generator=generator, device=self.device, dtype=self.dtype
        )
        latents = pack_latents(noise[:, 0])
        schedule = flow_schedule(self, params, latents.shape[1])
        return self.new_state(correlation_id, params, kept, schedule, generator, latents)

    def _checked_text(
        self, text: str, conditioning: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings [1, L, D] of ``text`` and their mask [1, L] (if given), or InvalidInput."""
        embeds, mask = conditioning[f"{text}_embeds"], conditioning.get(f"{text}_embeds_mask")
        width = self.pipe.transformer.config.joint_attention_dim
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[1] < 1 or embeds.shape[2] != width:
            raise InvalidInput(f"{text}_embeds: expected shape [1, tokens, {width}], got {list(embeds.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise InvalidInput(
                f"{text}_embeds_mask: expected shape {list(embeds.shape[:2])} (one per token), got {list(mask.shape)}"
            )
        return embeds, mask

    def batch_key(self, state: RequestState) -> Hashable:
        # The patch grid, not only the token count: 64x48 and 48x64 have as many patches but other RoPE.
        return self._patch_grid(state.params)

    def _patch_grid(self, params: GenerationParams) -> tuple[int, int, int]:
        """(frames, rows, columns) of 2x2 latent patches: one entry of the transformer's ``img_shapes``."""
        patch = self.vae_scale_factor * 2
        return 1, params.height // patch, params.width // patch

    def denoiser_rows(self, state: RequestState) -> list[Rows]:
        """One row per text (cond, then uncond): the pipeline calls the transformer once per text.

        Rows share a forward only with rows of the same patch grid (64x48 and 48x64 have as many
        patches but other RoPE) and text length (padding plus a mask would change the result).
        """
        rows = []
        shared = {"hidden_states": state.latents, "timestep": state.timestep.expand(1).to(state.latents.dtype)}
        if self.guidance_embeds:
            shared["guidance"] = torch.full((1,), state.params.guidance_scale, device=self.device, dtype=torch.float32)
        for text in self._texts(state.do_cfg):
            tensors = {**shared, "encoder_hidden_states": state.conditioning[f"{text}_embeds"]}
            mask = state.conditioning.get(f"{text}_embeds_mask")
            if mask is not None:
                tensors["encoder_hidden_states_mask"] = mask
            key = ("transformer", self._patch_grid(state.params), *self._text_key(state, text))
            rows.append(Rows(key, tensors))
        return rows

    def forward(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        grid = key[1]
        return self.pipe.transformer(
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"] / 1000,
            guidance=inputs.get("guidance"),
            encoder_hidden_states_mask=inputs.get("encoder_hidden_states_mask"),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            img_shapes=[[grid]] * inputs["hidden_states"].shape[0],
            attention_kwargs={},
            return_dict=False,
        )[0]

    def guide(self, state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """True CFG with the pipeline's norm rescale (the combined prediction keeps the conditional norm)."""
        if not state.do_cfg:
            return outputs[0]
        noise_pred, neg_noise_pred = outputs
        comb_pred = neg_noise_pred + state.params.true_cfg_scale * (noise_pred - neg_noise_pred)
        cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
        return comb_pred * (cond_norm / noise_norm)

    def warmup_rows(self, height: int, width: int) -> list[Rows]:
        """None: the text length, part of the key, is known only per prompt (graphs are captured on first use)."""
        return []

    @staticmethod
    def _text_key(state: RequestState, text: str) -> tuple[int, bool]:
        return state.conditioning[f"{text}_embeds"].shape[1], f"{text}_embeds_mask" in state.conditioning

    def output_latents(self, state: RequestState) -> torch.Tensor:
        return unpack_latents(state.latents, state.params.height, state.params.width, self.vae_scale_factor)

    def latent_channels(self) -> int:
        return self.pipe.vae.config.z_dim

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.unsqueeze(2).to(self.device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return to_uint8(self.pipe.image_processor.postprocess(image, output_type="np"))
