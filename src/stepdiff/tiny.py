"""Tiny random diffusers pipelines, built offline and byte-for-byte reproducibly from configs.

They have the real layouts (model_index.json, one folder per component, safetensors weights) so the
serving code loads them through the same ``from_pretrained`` path as a real checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
        pairs = [(ranks.get(pair, len(ranks)), index) for index, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:index], pieces[index] + pieces[index + 1], *pieces[index + 2 :]]
    return pieces


def clip_vocabulary(words: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary and merge list in which every word is one token.

    Each word is first encoded with the merges learned so far; the pieces left are then joined left to
    right by new (lower-priority) merges, so earlier words keep encoding to a single token.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*alphabet, *(c + "</w>" for c in alphabet)]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        encoded = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(encoded) > 1:
            merge = (encoded[0], encoded[1])
            ranks[merge] = len(ranks)
            pieces.append(merge[0] + merge[1])
            encoded = [merge[0] + merge[1], *encoded[2:]]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    return vocab, list(ranks)


def clip_tokenizer():
    """The offline CLIP tokenizer over ``clip_vocabulary`` (77 tokens, as SD's)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def sd15_pipeline(vae, text_encoder, tokenizer, unet):
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


def build_tiny_stable_diffusion(seed: int = 0):
    """A StableDiffusionPipeline with SD-1.5 structure (VAE factor 8, CLIP, PNDM) and tiny widths."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=len(vocab),
        )
    ).eval()
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    return sd15_pipeline(vae, text_encoder, tokenizer, unet)


def build_sd15_size(seed: int = 0):
    """Stable Diffusion 1.5's real architecture (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE) with
    random weights and the tiny tokenizer: for benchmarks, where only shapes and FLOPs matter."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            vocab_size=len(vocab),
        )
    ).eval()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    return sd15_pipeline(vae, text_encoder, tokenizer, unet)


BUILDERS = {"sd": build_tiny_stable_diffusion, "sd15-size": build_sd15_size}


def make_tiny(family: str, out_dir: str | os.PathLike[str], seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the random pipeline of ``family`` to ``out_dir`` (safetensors, world-readable files)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {family!r}; choose one of {sorted(BUILDERS)}")
    out = Path(out_dir)
    pipeline = BUILDERS[family](seed).to(dtype=dtype)
    pipeline.save_pretrained(out, safe_serialization=True)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out
