"""Tiny random diffusers pipelines, built offline and byte-for-byte reproducibly from configs.

They have the real layouts (model_index.json, one folder per component, safetensors weights) so the
serving code loads them through the same ``from_pretrained`` path as a real checkpoint.
"""

from __future__ import annotations

import itertools
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLQwenImage,
        FluxPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

# A fixed word list: each word becomes one BPE token, anything else falls back to byte-level pieces.
TINY_WORDS = (
    "a photo of the an in on with and at by cat dog red blue green yellow panda horse astronaut "
    "mountain forest city sea sky sunset night morning light cup coffee table cabin snow neon "
    "painting oil watercolor portrait landscape futuristic cinematic lighting soft focus style "
    "sitting riding tree branch bamboo mars surface warm glow windows flying cars cyberpunk "
    "wooden photorealistic background cozy snowy lights detailed blurry ugly low quality"
).split()

SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), index) for index, pair in enumerate(itertools.pairwise(pieces))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:index], pieces[index] + pieces[index + 1], *pieces[index + 2 :]]
    return pieces


def bpe_vocabulary(words: list[list[str]], alphabet: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Vocabulary pieces and a merge list in which every word (a list of alphabet symbols) is one token.

    Each word is first encoded with the merges learned so far; the pieces left are then joined left to
    right by new (lower-priority) merges, so earlier words keep encoding to a single token.
    """
    pieces = list(alphabet)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        encoded = _apply_merges(word, ranks)
        while len(encoded) > 1:
            merge = (encoded[0], encoded[1])
            ranks[merge] = len(ranks)
            pieces.append(merge[0] + merge[1])
            encoded = [merge[0] + merge[1], *encoded[2:]]
    return pieces, list(ranks)


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_vocabulary(words: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary (words end in ``</w>``) in which every word is one token."""
    alphabet = _byte_level_alphabet()
    pieces, merges = bpe_vocabulary(
        [[*word[:-1], word[-1] + "</w>"] for word in words], [*alphabet, *(c + "</w>" for c in alphabet)]
    )
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    return {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """The offline CLIP tokenizer over ``clip_vocabulary`` (77 tokens, as SD's)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def sd15_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from these components with SD 1.5's scheduler and no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD-1.5 structure (VAE factor 8, CLIP, PNDM) and tiny widths."""
    from diffusers import UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(tokenizer, 32, 2, hidden_act="quick_gelu")
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    torch.manual_seed(seed + 2)
    vae = kl_vae(4, (8, 8, 16, 16), 1, sample_size=64)
    return sd15_pipeline(vae, text_encoder, tokenizer, unet)


def build_sd15_size(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's real architecture (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE) with
    random weights and the tiny tokenizer: for benchmarks, where only shapes and FLOPs matter."""
    from diffusers import UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(tokenizer, 768, 12, heads=12, intermediate_size=3072, hidden_act="quick_gelu")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = kl_vae(4, (128, 256, 512, 512), 2, sample_size=512)
    return sd15_pipeline(vae, text_encoder, tokenizer, unet)


# stable-diffusion-xl-base-1.0's scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "clip_sample": False,
}


def clip_text_encoder(
    tokenizer: CLIPTokenizer,
    hidden_size: int,
    layers: int,
    projection_dim: int | None = None,
    heads: int = 4,
    intermediate_size: int = 37,
    hidden_act: str = "gelu",
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random CLIP text encoder over ``tokenizer``'s vocabulary; with a projection (pooled ``text_embeds``,
    as SDXL's second and SD3's encoders) when ``projection_dim`` is given."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        vocab_size=len(vocab),
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
    )
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model_class(config).eval()


def t5_tokenizer() -> T5TokenizerFast:
    """An offline T5 (unigram) tokenizer: each tiny word is one piece, anything else single characters."""
    import string

    from transformers import T5TokenizerFast

    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    pieces |= {f"\u2581{word}": -1.0 for word in TINY_WORDS}
    pieces |= {f"\u2581{character}": -4.0 for character in characters if f"\u2581{character}" not in pieces}
    pieces |= dict.fromkeys(characters, -5.0)
    return T5TokenizerFast(vocab=list(pieces.items()), extra_ids=0)


def t5_encoder(
    tokenizer: T5TokenizerFast, d_model: int, layers: int = 2, d_ff: int = 37, heads: int = 4, d_kv: int = 8
) -> T5EncoderModel:
    """A random T5 encoder over ``tokenizer``'s vocabulary (T5 v1.1 style gated GELU, as FLUX and SD3 use)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8 if d_model < 256 else 32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def kl_vae(latent_channels: int, widths: tuple[int, ...], layers: int, **config: object) -> AutoencoderKL:
    """An ``AutoencoderKL`` with 4 blocks (VAE factor 8) of ``widths``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=layers,
        norm_num_groups=min(32, widths[0] // 2),
        **config,
    )


def build_sdxl(seed: int = 0, real_widths: bool = False) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline with SDXL's structure (two CLIP text encoders, the second with a
    projection for pooled embeddings; a text-time conditioned UNet; an upcast VAE; Euler): tiny widths, or
    the real UNet and VAE with 2-layer text encoders of the real widths (for benchmarks)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tokenizer = clip_tokenizer()
    vocab, merges = clip_vocabulary()
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")  # as SDXL's second
    torch.manual_seed(seed)
    if real_widths:  # stable-diffusion-xl-base-1.0: CLIP ViT-L and OpenCLIP ViT-bigG widths
        text_encoder = clip_text_encoder(tokenizer, 768, 2, heads=12, intermediate_size=3072, hidden_act="quick_gelu")
        text_encoder_2 = clip_text_encoder(tokenizer_2, 1280, 2, projection_dim=1280, heads=20, intermediate_size=5120)
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = kl_vae(4, (128, 256, 512, 512), 2, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    else:
        text_encoder = clip_text_encoder(tokenizer, 16, 3)
        text_encoder_2 = clip_text_encoder(tokenizer_2, 32, 3, projection_dim=24)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=16 + 32,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 24,
        )
        vae = kl_vae(4, (8, 8, 16, 16), 1, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


# FLUX.1-dev's and FLUX.1-schnell's scheduler_config.json (FlowMatchEulerDiscreteScheduler).
FLUX_DEV_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER_CONFIG = {**FLUX_DEV_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}


def build_flux(seed: int = 0, schnell: bool = False, real_widths: bool = False) -> FluxPipeline:
    """A FluxPipeline with FLUX.1's structure (CLIP pooled + T5 embeddings, packed 2x2 latents, VAE factor 8
    with shift and scale, guidance embedding for dev, none for schnell): tiny widths, or FLUX.1's widths with
    2 of its 19 double and 4 of its 38 single blocks and 2-layer text encoders (for benchmarks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    if real_widths:
        text_encoder = clip_text_encoder(tokenizer, 768, 2, heads=12, intermediate_size=3072, hidden_act="quick_gelu")
        text_encoder_2 = t5_encoder(tokenizer_2, 4096, d_ff=10240, heads=64, d_kv=64)
        transformer = FluxTransformer2DModel(num_layers=2, num_single_layers=4, guidance_embeds=not schnell)
        vae = kl_vae(
            16,
            (128, 256, 512, 512),
            2,
            sample_size=1024,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
    else:
        text_encoder = clip_text_encoder(tokenizer, 32, 2, hidden_act="quick_gelu")
        text_encoder_2 = t5_encoder(tokenizer_2, 32)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=not schnell,
            axes_dims_rope=(4, 6, 6),
        )
        vae = kl_vae(
            4,
            (8, 8, 16, 16),
            1,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
    scheduler_config = FLUX_SCHNELL_SCHEDULER_CONFIG if schnell else FLUX_DEV_SCHEDULER_CONFIG
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# stable-diffusion-3.5's scheduler_config.json (FlowMatchEulerDiscreteScheduler, fixed shift).
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


def build_sd3(seed: int = 0, real_widths: bool = False) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline with SD 3.5's structure (CLIP-L and CLIP-G with projections, T5, an MMDiT
    with 2x2 patches and joint attention over CLIP+T5 tokens, VAE factor 8 with shift and scale): tiny
    widths, or SD 3.5 Large's widths with 4 of its 38 blocks and 2-layer text encoders (for benchmarks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    if real_widths:
        text_encoder = clip_text_encoder(
            tokenizer, 768, 2, projection_dim=768, heads=12, intermediate_size=3072, hidden_act="quick_gelu"
        )
        text_encoder_2 = clip_text_encoder(tokenizer_2, 1280, 2, projection_dim=1280, heads=20, intermediate_size=5120)
        text_encoder_3 = t5_encoder(tokenizer_3, 4096, d_ff=10240, heads=64, d_kv=64)
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        )
        vae = kl_vae(
            16,
            (128, 256, 512, 512),
            2,
            sample_size=1024,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        )
    else:
        text_encoder = clip_text_encoder(tokenizer, 16, 2, projection_dim=16)
        text_encoder_2 = clip_text_encoder(tokenizer_2, 16, 2, projection_dim=16)
        text_encoder_3 = t5_encoder(tokenizer_3, 32)  # CLIP-L + CLIP-G widths (16 + 16) fit in it
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=32,
        )
        vae = kl_vae(
            4,
            (8, 8, 16, 16),
            1,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# Qwen-Image's scheduler_config.json: flow matching with resolution-dependent (exponential) shift.
QWENIMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
# The words of QwenImagePipeline's prompt template: with each one a token, the template's prefix
# (system turn + "<|im_start|>user\n") is the 34 tokens the pipeline drops, as with Qwen's tokenizer.
QWEN_TEMPLATE_WORDS = (
    "system Describe the image by detailing color shape size texture quantity text spatial relationships "
    "of objects and background user assistant"
).split()
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """An offline Qwen2 byte-level BPE tokenizer: template and tiny words are one token each (with and
    without a leading space), anything else falls back to byte-level pieces."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    def byte_level(text: str) -> list[str]:
        return list(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0])

    words = dict.fromkeys([*QWEN_TEMPLATE_WORDS, *TINY_WORDS])
    pieces, merges = bpe_vocabulary(
        [byte_level(prefix + word) for word in words for prefix in ("", " ")], _byte_level_alphabet()
    )
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys([*pieces, *QWEN_SPECIAL_TOKENS]))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def qwen_text_encoder(
    tokenizer: Qwen2Tokenizer, hidden_size: int, intermediate_size: int, layers: int, heads: int
) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL text encoder of the given width (a one-block vision tower: QwenImage reads text only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = tokenizer.get_vocab()
    head_dim = hidden_size // heads
    section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwenimage_pipeline(
    text_encoder: Qwen2_5_VLForConditionalGeneration,
    tokenizer: Qwen2Tokenizer,
    transformer: QwenImageTransformer2DModel,
    vae: AutoencoderKLQwenImage,
) -> QwenImagePipeline:
    """A QwenImagePipeline from these components with Qwen-Image's scheduler configuration."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWENIMAGE_SCHEDULER_CONFIG)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_tiny_qwenimage(seed: int = 0) -> QwenImagePipeline:
    """A QwenImagePipeline with Qwen-Image's structure (VAE factor 8, 2x2 patches, Qwen2.5-VL text
    encoder, flow-match scheduler with dynamic exponential shift) and tiny widths."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = qwen_text_encoder(tokenizer, hidden_size=32, intermediate_size=64, layers=2, heads=2)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    return qwenimage_pipeline(text_encoder, tokenizer, transformer, vae)


def build_qwenimage_size(seed: int = 0, transformer_layers: int = 4) -> QwenImagePipeline:
    """Qwen-Image's transformer width (24 heads x 128, joint dim 3584) with ``transformer_layers`` of its
    60 blocks, its VAE, and a 2-layer text encoder of its hidden size: random weights, for benchmarks."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = qwen_text_encoder(tokenizer, hidden_size=3584, intermediate_size=4096, layers=2, heads=28)
    transformer = QwenImageTransformer2DModel(num_layers=transformer_layers)
    vae = AutoencoderKLQwenImage(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
    )
    return qwenimage_pipeline(text_encoder, tokenizer, transformer, vae)


BUILDERS = {
    "sd": build_tiny_stable_diffusion,
    "sd15-size": build_sd15_size,
    "sdxl": build_sdxl,
    "sdxl-size": partial(build_sdxl, real_widths=True),
    "flux": build_flux,
    "flux-schnell": partial(build_flux, schnell=True),
    "flux-size": partial(build_flux, real_widths=True),
    "sd3": build_sd3,
    "sd3-size": partial(build_sd3, real_widths=True),
    "qwenimage": build_tiny_qwenimage,
    "qwenimage-size": build_qwenimage_size,
}


def make_tiny(family: str, out_dir: str | os.PathLike[str], seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the random pipeline of ``family`` to ``out_dir`` (safetensors, world-readable files)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {family!r}; choose one of {sorted(BUILDERS)}")
    out = Path(out_dir)
    pipeline = BUILDERS[family](seed)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    pipeline.save_pretrained(out, safe_serialization=True)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


# The attention projections diffusers' LoRA training scripts target, per component
LORA_TARGETS = {
    "denoiser": ["to_q", "to_k", "to_v", "to_out.0"],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def make_tiny_lora(
    pipeline_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    text_encoder: bool = False,
    rank: int = 4,
) -> Path:
    """Write a random LoRA for the pipeline in ``pipeline_dir`` to ``out_dir`` as diffusers saves one
    (``pytorch_lora_weights.safetensors``): the denoiser's attention projections, and with
    ``text_encoder`` the (CLIP) text encoder's, where the pipeline's LoRA loader has one (not QwenImage).
    Offline, and the same bytes for the same pipeline and seed."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    denoiser_name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    components = {denoiser_name: LORA_TARGETS["denoiser"]}
    if text_encoder:
        if "text_encoder" not in getattr(pipe, "_lora_loadable_modules", ()):
            raise ValueError(
                f"--text-encoder: {type(pipe).__name__} loads LoRA into its {denoiser_name} only, "
                "not into a text encoder"
            )
        components["text_encoder"] = LORA_TARGETS["text_encoder"]
    torch.manual_seed(seed)
    layers = {}
    for name, targets in components.items():
        component = getattr(pipe, name)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        component.add_adapter(config)
        with torch.no_grad():  # PEFT's non-zero init is large next to tiny random weights: keep the images sane
            for parameter_name, parameter in component.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.mul_(0.1)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(component)
    out = Path(out_dir)
    type(pipe).save_lora_weights(out, **layers, safe_serialization=True)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out
