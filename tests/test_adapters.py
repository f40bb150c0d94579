"""Adapters in-process against their stock diffusers pipelines (the served path is tested per family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import reference_image

from stepdiff.adapters import GenerationParams, Stage, load_adapter


def image_alone(pipeline: Path, params: GenerationParams) -> np.ndarray:
    """One request through the three stages' adapters, as the served models run it alone."""
    cpu = torch.device("cpu")
    encoder, denoiser, decoder = (
        load_adapter(str(pipeline), stage, cpu, torch.float32)
        for stage in (Stage.TEXT_ENCODER, Stage.DENOISE, Stage.DECODE)
    )
    with torch.inference_mode():
        state = denoiser.prepare(
            1, params, {name: value.float() for name, value in encoder.encode_prompt(params).items()}
        )
        while not state.done:
            outputs = [denoiser.forward(rows.key, rows.tensors) for rows in denoiser.denoiser_rows(state)]
            denoiser.step(state, denoiser.guide(state, outputs))
        return decoder.decode(denoiser.output_latents(state))[0]


def lcm_pipeline(out: Path) -> Path:
    """The tiny SD pipeline with an LCM-distilled UNet (guidance embedded via time_cond_proj_dim)."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    from stepdiff.tiny import build_tiny_stable_diffusion

    pipe = build_tiny_stable_diffusion()
    torch.manual_seed(5)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 8})
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_lcm_unet_gets_the_guidance_embedding_as_diffusers_builds_it(tmp_path):
    from diffusers import StableDiffusionPipeline

    path = lcm_pipeline(tmp_path / "tiny-lcm")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for guidance_scale in (8.0, 2.0):
        params = GenerationParams("a photo of a cat", None, 4, 4, guidance_scale, 64, 48, "LCMScheduler")
        image = image_alone(path, params)
        expected = reference_image(
            pipe, params.prompt, 4, num_inference_steps=4, guidance_scale=guidance_scale, height=64, width=48
        )
        assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected).max()}"
        images.append(image)
    assert not np.array_equal(*images)  # the embedded guidance scale reaches the UNet


def test_sdxl_alone_is_byte_identical_in_process(tiny_sdxl, sdxl_reference):
    """The adapter slices without Triton in between (the served matrix is tests/test_sdxl.py)."""
    params = GenerationParams("a red panda", "blurry", 7, 3, 6.0, 48, 64, "EulerAncestralDiscreteScheduler")
    expected = reference_image(
        sdxl_reference,
        "a red panda",
        7,
        "EulerAncestralDiscreteScheduler",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=6.0,
        height=48,
        width=64,
    )
    assert np.array_equal(image_alone(tiny_sdxl, params), expected)
