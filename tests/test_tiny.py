"""``stepdiff make-tiny``: byte-identical output for the same seed, loadable offline by diffusers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_tiny(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "stepdiff", "make-tiny", *args], check=True, capture_output=True, timeout=300)


def test_same_command_gives_identical_files(tmp_path):
    make_tiny("sd", str(tmp_path / "a"))
    make_tiny("sd", str(tmp_path / "b"))
    make_tiny("sd", str(tmp_path / "c"), "--seed", "1")
    first, second, other_seed = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert first == second
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"} <= set(first)
    assert first["unet/diffusion_pytorch_model.safetensors"] != other_seed["unet/diffusion_pytorch_model.safetensors"]


def test_loads_offline_with_sd15_structure(tiny_sd, monkeypatch):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.scheduler.config.skip_prk_steps
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert len(ids) == 7  # start, five one-token words, end
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert all(oct(path.stat().st_mode)[-3:] == "644" for path in Path(tiny_sd).rglob("*") if path.is_file())


def test_qwenimage_is_reproducible_and_loads_offline_like_qwen_image(tiny_qwen, tmp_path, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    make_tiny("qwenimage", str(tmp_path / "again"))
    assert digests(tmp_path / "again") == digests(tiny_qwen)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    template = pipe.prompt_template_encode
    prefix = pipe.tokenizer(template[: template.index("{}")]).input_ids
    assert len(prefix) == pipe.prompt_template_encode_start_idx == 34
    prompt_ids = pipe.tokenizer(template.format("a photo of a cat")).input_ids
    assert len(prompt_ids) == 34 + 5 + 5  # five one-token words, then "<|im_end|>\n<|im_start|>assistant\n"
    scheduler = pipe.scheduler
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.time_shift_type == "exponential"
    assert scheduler.config.shift_terminal == 0.02
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.patch_size == 2
    image = pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0


def test_the_other_families_are_reproducible_and_have_their_structure(tmp_path):
    """SDXL, Flux dev/schnell and SD3: same files twice; the structure their adapters rely on."""
    import diffusers
    import pytest

    from stepdiff.tiny import make_tiny as build

    expectations = {
        "sdxl": lambda pipe: (
            pipe.unet.config.addition_embed_type == "text_time"
            and pipe.vae.config.force_upcast
            and pipe.tokenizer_2.pad_token == "!"
        ),
        "flux": lambda pipe: pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting,
        "flux-schnell": lambda pipe: (
            not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.use_dynamic_shifting
        ),
        "sd3": lambda pipe: (
            pipe.transformer.config.patch_size == 2 and pipe.vae.config.shift_factor == pytest.approx(0.0609)
        ),
    }
    for family, check in expectations.items():
        first, second = build(family, tmp_path / f"{family}-a"), build(family, tmp_path / f"{family}-b")
        assert digests(first) == digests(second), family
        pipe = diffusers.DiffusionPipeline.from_pretrained(first)
        assert pipe.vae_scale_factor == 8 and check(pipe), family
        if family != "sdxl":  # the offline T5 tokenizer: tiny words are one piece, others fall back to characters
            t5 = pipe.tokenizer_2 if family.startswith("flux") else pipe.tokenizer_3
            assert t5.convert_ids_to_tokens(t5("a photo of a zebra").input_ids) == [
                "▁a",
                "▁photo",
                "▁of",
                "▁a",
                "▁z",
                "e",
                "b",
                "r",
                "a",
                "</s>",
            ]
