"""SDXL through the real server: byte-identical to StableDiffusionXLPipeline alone, batched, streamed, validated."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import reference_image
from test_batching import denoise_counts, psnr
from test_clients import client
from test_streaming import stream
from test_txt2img import PROMPTS
from test_validation import raw_infer, text
from tritonclient.utils import InferenceServerException

RESOLUTIONS = [(64, 64), (48, 80), (96, 32)]
# (negative prompt, guidance_scale, scheduler): guidance on with and without a negative prompt (without
# one SDXL's force_zeros_for_empty_prompt gives zero negative embeddings), guidance off, two schedulers.
OPTIONS = [
    ("blurry, low quality", 5.0, "EulerDiscreteScheduler"),
    (None, 7.5, "EulerDiscreteScheduler"),
    (None, 1.0, "EulerDiscreteScheduler"),
    ("blurry, low quality", 6.0, "DPMSolverMultistepScheduler"),
]
STEPS = 5


@pytest.mark.parametrize(("prompt_index", "size", "option"), list(itertools.product(range(5), RESOLUTIONS, range(len(OPTIONS)))))
def test_image_is_byte_identical_to_diffusers(sdxl_server, sdxl_reference, prompt_index, size, option):
    prompt, (height, width), seed = PROMPTS[prompt_index], size, 3000 + prompt_index
    negative, guidance_scale, scheduler = OPTIONS[option]
    options = dict(num_inference_steps=STEPS, guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative)
    protocol = "http" if (prompt_index + option) % 2 else "grpc"
    image, used_seed = sdxl_server.txt2img(prompt, protocol, seed=seed, scheduler=scheduler, **options)
    expected = reference_image(sdxl_reference, prompt, seed, scheduler, **options)
    assert used_seed == seed
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected).max()}"


def test_guidance_negative_prompt_and_seed_change_the_image(sdxl_server):
    """The matrix compares against images that really depend on these inputs."""
    options = dict(num_inference_steps=STEPS, height=64, width=64)
    images = [
        sdxl_server.txt2img("a photo of a cat", seed=1, guidance_scale=5.0, **options)[0],
        sdxl_server.txt2img("a photo of a cat", seed=1, guidance_scale=5.0, negative_prompt="blurry", **options)[0],
        sdxl_server.txt2img("a photo of a cat", seed=1, guidance_scale=1.0, **options)[0],
        sdxl_server.txt2img("a photo of a cat", seed=2, guidance_scale=5.0, **options)[0],
    ]
    assert len({image.tobytes() for image in images}) == 4


def test_defaults_follow_the_pipeline(sdxl_server, sdxl_reference):
    """Only prompt and seed: the UNet's sample size x 8 (64 here, 1024 for the real model), 50 steps,
    guidance 5.0, the pipeline's Euler scheduler."""
    image, _ = sdxl_server.txt2img("a red panda", seed=9)
    assert image.shape == (64, 64, 3)
    assert np.array_equal(image, reference_image(sdxl_reference, "a red panda", 9))


def test_served_configs_carry_the_adapters_conditioning(sdxl_server):
    """text_encoder outputs and denoise_step takes SDXL's pooled embeddings too (declared by the adapter)."""
    with grpcclient.InferenceServerClient(sdxl_server.grpc_url) as grpc:
        outputs = {output.name: output.datatype for output in grpc.get_model_metadata("text_encoder").outputs}
        inputs = {tensor.name for tensor in grpc.get_model_metadata("denoise_step").inputs}
    expected = {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert outputs == dict.fromkeys(expected, "FP32")
    assert expected <= inputs


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"height": (np.array([60], np.int32), "INT32")}, "height=60 is not a multiple of 8, which StableDiffusionXLPipeline requires"),
        ({"scheduler": text(b"FlowMatchEulerDiscreteScheduler")}, "allowed DDIMScheduler"),
        ({"guidance_scale": (np.array([np.inf], np.float32), "FP32")}, "guidance_scale=inf is out of range"),
    ],
)
def test_bad_inputs_are_rejected_and_service_continues(sdxl_server, sdxl_reference, inputs, message):
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(sdxl_server, {"prompt": text(b"a cat"), **inputs})
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raised.value.message()
    image, _ = sdxl_server.txt2img("a cat", seed=3, num_inference_steps=2, height=32, width=32)
    assert np.array_equal(image, reference_image(sdxl_reference, "a cat", 3, num_inference_steps=2, height=32, width=32))
    assert sdxl_server.metric("stepdiff_active_sequences") == 0


def test_concurrent_mixed_requests_share_forwards_and_match_solo_runs(sdxl_server):
    """Different steps, guidance (on and off), schedulers and step indices in one forward."""
    jobs = [
        dict(prompt=PROMPTS[i % 4], seed=400 + i, num_inference_steps=6 + i % 3, height=64, width=48,
             guidance_scale=1.0 if i % 4 == 3 else 4.0 + i, negative_prompt="blurry" if i % 2 else None,
             scheduler=OPTIONS[i % 4][2])
        for i in range(8)
    ]  # fmt: skip

    def run(job):
        return sdxl_server.txt2img(**job)[0]

    solo = [run(job) for job in jobs]
    inferences_before, executions_before = denoise_counts(sdxl_server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    inferences, executions = denoise_counts(sdxl_server)
    mean_batch = (inferences - inferences_before) / (executions - executions_before)
    print(f"mean denoise_step batch {mean_batch:.2f}")
    assert mean_batch >= 2.0
    for job, alone, batched in zip(jobs, solo, together):
        assert psnr(alone, batched) >= 40, job
    assert sdxl_server.metric("stepdiff_active_sequences") == 0


def test_stream_sends_progress_previews_and_the_same_image(sdxl_server):
    options = dict(seed=11, num_inference_steps=4, height=64, width=48)
    progress, final = stream(sdxl_server, "a photo of a dog", preview_every=2, **options)
    assert [step for step, _, _ in progress] == [1, 2, 3, 4]
    previews = {step: preview for step, _, preview in progress if preview is not None}
    assert sorted(previews) == [2] and previews[2].shape == (8, 6, 3) and previews[2].dtype == np.uint8
    image, _ = sdxl_server.txt2img("a photo of a dog", **options)
    assert np.array_equal(final["image"], image)


def test_stepwise_client_gives_the_txt2img_image(sdxl_server, tmp_path):
    """client/stepwise.py learns SDXL's conditioning (pooled embeddings) from text_encoder's metadata."""
    from PIL import Image

    out = tmp_path / "stepwise.png"
    flags = ["--seed", "5", "--num-inference-steps", "4", "--height", "48", "--width", "64", "--negative-prompt", "blurry"]
    result = client("stepwise.py", "a photo of a cat", "--url", sdxl_server.grpc_url, *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected, _ = sdxl_server.txt2img("a photo of a cat", seed=5, num_inference_steps=4, height=48, width=64, negative_prompt="blurry")
    assert np.array_equal(np.asarray(Image.open(out)), expected)
