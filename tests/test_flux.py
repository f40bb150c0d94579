"""FLUX.1 dev and schnell through the real server: byte-identical to FluxPipeline alone, batched, streamed."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import reference_image
from test_batching import denoise_counts, psnr
from test_clients import client
from test_streaming import stream
from test_txt2img import PROMPTS
from test_validation import raw_infer, text
from tritonclient.utils import InferenceServerException

RESOLUTIONS = [(64, 64), (48, 80), (96, 32)]
# (negative prompt, true_cfg_scale, guidance_scale): plain; true CFG with a negative prompt; a negative
# prompt that true_cfg_scale 1 leaves unused, with another guidance embedding (ignored by schnell).
OPTIONS = [(None, 1.0, 3.5), ("blurry, low quality", 4.0, 3.5), ("blurry, low quality", 1.0, 1.0)]
STEPS = 4


@pytest.mark.parametrize(("prompt_index", "size", "option"), list(itertools.product(range(5), RESOLUTIONS, range(len(OPTIONS)))))
def test_image_is_byte_identical_to_diffusers(flux_server, flux_reference, prompt_index, size, option):
    prompt, (height, width), seed = PROMPTS[prompt_index], size, 4000 + prompt_index
    negative, true_cfg_scale, guidance_scale = OPTIONS[option]
    options = dict(num_inference_steps=STEPS, height=height, width=width, negative_prompt=negative,
                   true_cfg_scale=true_cfg_scale, guidance_scale=guidance_scale)  # fmt: skip
    protocol = "http" if (prompt_index + option) % 2 else "grpc"
    image, used_seed = flux_server.txt2img(prompt, protocol, seed=seed, **options)
    expected = reference_image(flux_reference, prompt, seed, **options)
    assert used_seed == seed
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected).max()}"


def test_true_cfg_guidance_and_seed_change_the_image(flux_server, tiny_flux):
    """The matrix compares against images that depend on these inputs (guidance only with dev's embedding)."""
    options = dict(num_inference_steps=STEPS, height=64, width=64)
    plain = flux_server.txt2img("a photo of a cat", seed=1, **options)[0]
    true_cfg = flux_server.txt2img("a photo of a cat", seed=1, negative_prompt="blurry", true_cfg_scale=4.0, **options)[0]
    guided = flux_server.txt2img("a photo of a cat", seed=1, guidance_scale=7.0, **options)[0]
    other_seed = flux_server.txt2img("a photo of a cat", seed=2, **options)[0]
    assert len({image.tobytes() for image in (plain, true_cfg, other_seed)}) == 3
    assert np.array_equal(plain, guided) == (tiny_flux.name == "tiny-flux-schnell")


def test_defaults_follow_the_pipeline(flux_server, flux_reference):
    """Only prompt, seed and a small size: 28 steps, guidance 3.5, no true CFG, the pipeline's scheduler."""
    options = dict(height=32, width=32, negative_prompt="blurry")
    image, _ = flux_server.txt2img("a red panda", seed=9, **options)
    assert np.array_equal(image, reference_image(flux_reference, "a red panda", 9, **options))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"height": (np.array([40], np.int32), "INT32")}, "height=40 is not a multiple of 16, which FluxPipeline requires (VAE factor 8 x 2x2 latent patches)"),
        ({"scheduler": text(b"EulerDiscreteScheduler")}, "allowed FlowMatchEulerDiscreteScheduler"),
        ({"true_cfg_scale": (np.array([-1], np.float32), "FP32")}, "true_cfg_scale=-1.0 is out of range"),
    ],
)
def test_bad_inputs_are_rejected_and_service_continues(flux_server, flux_reference, inputs, message):
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(flux_server, {"prompt": text(b"a cat"), **inputs})
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raised.value.message()
    image, _ = flux_server.txt2img("a cat", seed=3, num_inference_steps=2, height=32, width=32)
    assert np.array_equal(image, reference_image(flux_reference, "a cat", 3, num_inference_steps=2, height=32, width=32))
    assert flux_server.metric("stepdiff_active_sequences") == 0


def test_concurrent_mixed_requests_share_forwards_and_match_solo_runs(flux_server):
    """Different step counts, guidance, true CFG on and off and step indices in one forward."""
    jobs = [
        dict(prompt=PROMPTS[i % 4], seed=500 + i, num_inference_steps=12 + i % 3, height=64, width=48,
             guidance_scale=2.0 + i, negative_prompt="blurry" if i % 2 else None, true_cfg_scale=3.0)
        for i in range(8)
    ]  # fmt: skip

    def run(job):
        return flux_server.txt2img(**job)[0]

    solo = [run(job) for job in jobs]
    inferences_before, executions_before = denoise_counts(flux_server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    inferences, executions = denoise_counts(flux_server)
    mean_batch = (inferences - inferences_before) / (executions - executions_before)
    print(f"mean denoise_step batch {mean_batch:.2f}")
    assert mean_batch >= 2.0
    for job, alone, batched in zip(jobs, solo, together):
        assert psnr(alone, batched) >= 40, job
    assert flux_server.metric("stepdiff_active_sequences") == 0


def test_stream_and_stepwise_client_give_the_txt2img_image(flux_server, tmp_path):
    from PIL import Image

    options = dict(seed=11, num_inference_steps=4, height=64, width=48)
    progress, final = stream(flux_server, "a photo of a dog", preview_every=2, **options)
    assert [step for step, _, _ in progress] == [1, 2, 3, 4]
    previews = {step: preview for step, _, preview in progress if preview is not None}
    assert sorted(previews) == [2] and previews[2].shape == (8, 6, 3)
    image, _ = flux_server.txt2img("a photo of a dog", **options)
    assert np.array_equal(final["image"], image)
    out = tmp_path / "stepwise.png"
    flags = ["--seed", "5", "--num-inference-steps", "4", "--height", "48", "--width", "64", "--negative-prompt", "blurry",
             "--true-cfg-scale", "3.0"]  # fmt: skip
    result = client("stepwise.py", "a photo of a cat", "--url", flux_server.grpc_url, *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected, _ = flux_server.txt2img("a photo of a cat", seed=5, num_inference_steps=4, height=48, width=64,
                                      negative_prompt="blurry", true_cfg_scale=3.0)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), expected)
