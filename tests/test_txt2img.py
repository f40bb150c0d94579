"""txt2img against the real server reproduces StableDiffusionPipeline byte for byte (CPU, fp32, 1 thread)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import WARMUP, reference_image

PROMPTS = [
    "a cup of coffee on a wooden table, morning light, photorealistic",
    "a red panda sitting on a tree branch in a bamboo forest, soft focus background",
    "an astronaut riding a horse on the surface of Mars, cinematic lighting",
    "a cozy cabin in the snowy mountains at sunset, warm glow from windows",
    "",  # unconditional generation
]
RESOLUTIONS = [(64, 64), (48, 80), (96, 56)]
SCHEDULERS = [
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]
GUIDANCE = [7.5, 1.0]
MATRIX = list(itertools.product(range(len(PROMPTS)), RESOLUTIONS, SCHEDULERS, GUIDANCE))


@pytest.mark.parametrize(("prompt_index", "size", "scheduler", "guidance_scale"), MATRIX)
def test_image_is_byte_identical_to_diffusers(server, reference, prompt_index, size, scheduler, guidance_scale):
    prompt = PROMPTS[prompt_index]
    height, width = size
    seed = 1000 + prompt_index
    negative = "blurry, low quality" if prompt_index % 2 == 0 else None
    protocol = "http" if prompt_index % 2 else "grpc"
    options = dict(
        seed=seed, num_inference_steps=7, guidance_scale=guidance_scale, height=height, width=width, scheduler=scheduler
    )
    image, used_seed = server.txt2img(prompt, protocol, negative_prompt=negative, **options)
    expected = reference_image(
        reference,
        prompt,
        seed,
        scheduler,
        negative_prompt=negative,
        num_inference_steps=7,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
    )
    assert used_seed == seed
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected).max()}"


def test_defaults_come_from_the_pipeline(server, reference):
    """Only the prompt: the pipeline's default size (sample_size x 8), scheduler (PNDM), steps and guidance."""
    image, _seed = server.txt2img("a photo of a cat", seed=5)
    assert np.array_equal(image, reference_image(reference, "a photo of a cat", 5))


def test_absent_seed_is_random_and_returned(server):
    first, seed_a = server.txt2img("a dog", num_inference_steps=3)
    second, seed_b = server.txt2img("a dog", num_inference_steps=3)
    assert seed_a != seed_b and 0 <= seed_a < 2**63
    again, seed = server.txt2img("a dog", num_inference_steps=3, seed=seed_a)
    assert seed == seed_a and np.array_equal(again, first)
    assert not np.array_equal(first, second)


def test_same_seed_same_image_over_both_protocols(server):
    options = dict(seed=77, num_inference_steps=5, scheduler="EulerAncestralDiscreteScheduler")
    over_http, _ = server.txt2img("a blue horse", "http", **options)
    over_grpc, _ = server.txt2img("a blue horse", "grpc", **options)
    assert np.array_equal(over_http, over_grpc)


def test_state_is_freed_after_each_request(server):
    steps_before = server.metric("stepdiff_denoise_steps_total")
    host_before = server.metric("stepdiff_denoise_host_seconds_total")
    server.txt2img("a red cat", seed=1, num_inference_steps=6, scheduler="DDIMScheduler")
    assert server.metric("stepdiff_active_sequences") == 0
    assert server.metric("stepdiff_denoise_steps_total") - steps_before == 6
    # the executes' time is counted (on CPU all of it on the host: there is no GPU to wait for)
    assert server.metric("stepdiff_denoise_host_seconds_total") > host_before
    assert server.metric("stepdiff_denoise_gpu_wait_seconds_total") == 0


def test_true_cfg_scale_is_ignored_by_stable_diffusion(server):
    """true_cfg_scale belongs to QwenImage; Stable Diffusion accepts and ignores it (guidance_scale rules)."""
    options = dict(seed=21, num_inference_steps=4, negative_prompt="blurry")
    plain, _ = server.txt2img("a green cup", **options)
    with_true_cfg, _ = server.txt2img("a green cup", true_cfg_scale=9.0, **options)
    assert np.array_equal(plain, with_true_cfg)


def test_warm_up_prepares_the_stages_before_ready(server):
    """``--warmup`` (the session server's sizes): before the server is ready, text_encoder has encoded every
    batch it can form (capturing its graphs on a GPU), denoise_step has prepared its row buckets for each
    size (CUDA graphs on a GPU; none on the CPU) and vae_decode has decoded every batch of each size, so
    that its memory peak is reserved before the first request."""
    log = server.log_file.read_text(errors="replace")
    assert "text_encoder: warm-up: batches of 1 to 16 prompts encoded in" in log
    assert f"denoise_step: denoiser exact on cpu; warm-up {WARMUP}: 0 CUDA graphs" in log
    assert f"vae_decode: warm-up {WARMUP}: batches of 1 to 4 latents of each size decoded in" in log


def test_the_orchestrators_processes_load_neither_torch_nor_diffusers(server):
    """txt2img (four instances) and txt2img_stream read what they know of the pipeline from their model
    configs: their processes never load torch, while each stage model's does."""
    from stepdiff.repository import ORCHESTRATORS

    stubs = server.stubs()
    assert len(stubs) == 8, stubs  # 4 txt2img, txt2img_stream, text_encoder, denoise_step, vae_decode
    for stub in stubs:
        maps = Path(f"/proc/{stub.pid}/maps").read_text()
        loads_torch = "libtorch" in maps
        assert loads_torch == (stub.model not in ORCHESTRATORS), stub.instance


def test_a_long_prompts_truncation_warning_stays_one_short_log_line(server):
    """diffusers warns with the cut-off text of a prompt over 77 tokens; the stage models cut the line, so
    prompts up to max_prompt_bytes cannot fill the server's log."""
    tail = "".join(f" word{index}" for index in range(500))  # 3890 bytes (under max_prompt_bytes), far past 77 tokens
    server.txt2img("a cat" + tail, seed=1, num_inference_steps=1)
    lines = [line for line in server.log_file.read_text(errors="replace").splitlines() if "word499" in line]
    warned = [line for line in server.log_file.read_text(errors="replace").splitlines() if "was truncated" in line]
    assert lines == [] and warned, "the warning should be logged, without the prompt's end"
    assert all(len(line) < 800 and "more characters)" in line for line in warned)
