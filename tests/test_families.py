"""SDXL, FLUX.1 dev and schnell, and SD3 through the real server, one after the other.

Each family: a request alone is byte-identical to its diffusers pipeline over a matrix of 5 prompts x
3 sizes x its options; mixed concurrent requests share forwards and match their solo runs; streaming,
the step API client and validation work. QwenImage has its own module (tests/test_qwenimage.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import FAMILY_PIPELINES, reference_image
from PIL import Image
from test_batching import assert_batched_like_solo
from test_clients import client
from test_streaming import stream
from test_txt2img import PROMPTS
from test_validation import raw_infer, text
from tritonclient.utils import InferenceServerException

RESOLUTIONS = [(64, 64), (48, 80), (96, 32)]
NEGATIVE = "blurry, low quality"


def int32(value: int) -> tuple[np.ndarray, str]:
    return np.array([value], np.int32), "INT32"


def fp32(value: float) -> tuple[np.ndarray, str]:
    return np.array([value], np.float32), "FP32"


@dataclass
class Family:
    """What the shared tests need to know about a family."""

    options: list[dict]  # the matrix's per-request options (besides prompt, seed and size)
    distinct: list[int]  # indices into ``options`` that must give pairwise different images
    defaults: dict  # what the defaults test sends besides prompt and seed
    bad_inputs: list[tuple[dict, str]]  # (inputs, a substring of the INVALID_ARG message)
    mixed: dict = field(default_factory=dict)  # per-request options of the concurrent test
    conditioning: set[str] = field(
        default_factory=lambda: {
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        }
    )


FLUX_OPTIONS = [
    dict(guidance_scale=3.5),  # plain
    dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0),  # true CFG
    dict(negative_prompt=NEGATIVE, true_cfg_scale=1.0, guidance_scale=1.0),  # negative unused; other guidance embedding
]
FLUX_BAD_INPUTS = [
    (
        {"height": int32(40)},
        "height=40 is not a multiple of 16, which FluxPipeline requires (VAE factor 8 x 2x2 latent patches)",
    ),
    ({"scheduler": text(b"EulerDiscreteScheduler")}, "allowed FlowMatchEulerDiscreteScheduler"),
    ({"true_cfg_scale": fp32(-1)}, "true_cfg_scale=-1.0 is out of range"),
]
FAMILIES = {
    "sdxl": Family(
        # guidance with and without a negative prompt (without one, force_zeros_for_empty_prompt gives zero
        # negative embeddings), guidance off, and a second scheduler
        options=[
            dict(negative_prompt=NEGATIVE, guidance_scale=5.0),
            dict(guidance_scale=7.5),
            dict(guidance_scale=1.0),
            dict(negative_prompt=NEGATIVE, guidance_scale=6.0, scheduler="DPMSolverMultistepScheduler"),
        ],
        distinct=[0, 1, 2, 3],
        defaults={},  # the UNet's sample size x 8 (64 here, 1024 for the real model), 50 steps, guidance 5.0
        bad_inputs=[
            ({"height": int32(60)}, "height=60 is not a multiple of 8, which StableDiffusionXLPipeline requires"),
            ({"scheduler": text(b"FlowMatchEulerDiscreteScheduler")}, "allowed DDIMScheduler"),
            ({"guidance_scale": fp32(np.inf)}, "guidance_scale=inf is out of range"),
        ],
        mixed=dict(scheduler="EulerAncestralDiscreteScheduler"),
    ),
    "flux": Family(
        options=FLUX_OPTIONS,
        distinct=[0, 1, 2],  # dev embeds the guidance scale
        defaults=dict(height=32, width=32, negative_prompt=NEGATIVE),  # 1024x1024 by default: too slow on CPU
        bad_inputs=FLUX_BAD_INPUTS,
        mixed=dict(true_cfg_scale=3.0),
    ),
    "flux-schnell": Family(
        options=FLUX_OPTIONS,
        distinct=[0, 1],  # no guidance embedding: option 2 gives option 0's image
        defaults=dict(height=32, width=32, negative_prompt=NEGATIVE),
        bad_inputs=FLUX_BAD_INPUTS,
        mixed=dict(true_cfg_scale=3.0),
    ),
    "sd3": Family(
        options=[
            dict(negative_prompt=NEGATIVE, guidance_scale=7.0),
            dict(guidance_scale=4.0),
            dict(guidance_scale=1.0),
        ],
        distinct=[0, 1, 2],
        defaults={},  # the transformer's sample size x 8, 28 steps, guidance 7.0
        bad_inputs=[
            (
                {"width": int32(72)},
                "width=72 is not a multiple of 16, which StableDiffusion3Pipeline requires "
                "(VAE factor 8 x transformer patch size 2)",
            ),
            ({"scheduler": text(b"DDIMScheduler")}, "allowed FlowMatchEulerDiscreteScheduler"),
            ({"num_inference_steps": int32(0)}, "num_inference_steps=0 is out of range"),
        ],
    ),
}
STEPS = 4


def test_every_family_has_its_table():
    assert set(FAMILIES) == set(FAMILY_PIPELINES)


@pytest.mark.parametrize(("prompt_index", "size"), list(itertools.product(range(len(PROMPTS)), RESOLUTIONS)))
def test_image_is_byte_identical_to_diffusers(family, family_server, family_reference, prompt_index, size):
    """Every option set of the family for this prompt and size (the family's matrix: 5 x 3 x its options)."""
    prompt, (height, width), seed = PROMPTS[prompt_index], size, 3000 + prompt_index
    mismatches = []
    for option, options in enumerate(FAMILIES[family].options):
        kwargs = dict(num_inference_steps=STEPS, height=height, width=width, **options)
        scheduler = kwargs.pop("scheduler", None)
        protocol = "http" if (prompt_index + option) % 2 else "grpc"
        image, used_seed = family_server.txt2img(prompt, protocol, seed=seed, scheduler=scheduler, **kwargs)
        expected = reference_image(family_reference, prompt, seed, scheduler, **kwargs)
        assert used_seed == seed
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        if not np.array_equal(image, expected):
            mismatches.append(f"{options}: max abs diff {np.abs(image.astype(int) - expected).max()}")
    assert not mismatches, mismatches


def test_options_and_seed_change_the_image(family, family_server):
    """The matrix compares against images that really depend on its options and the seed."""
    spec, size = FAMILIES[family], dict(num_inference_steps=STEPS, height=64, width=64)
    images = [
        family_server.txt2img("a photo of a cat", seed=1, **size, **spec.options[index])[0] for index in spec.distinct
    ]
    images.append(family_server.txt2img("a photo of a cat", seed=2, **size, **spec.options[0])[0])
    assert len({image.tobytes() for image in images}) == len(images)


def test_defaults_follow_the_pipeline(family, family_server, family_reference):
    options = FAMILIES[family].defaults
    image, _ = family_server.txt2img("a red panda", seed=9, **options)
    assert np.array_equal(image, reference_image(family_reference, "a red panda", 9, **options))


def test_served_configs_carry_the_adapters_conditioning(family, family_server):
    """text_encoder outputs, and denoise_step takes, what the family's adapter declares (pooled embeddings too)."""
    with grpcclient.InferenceServerClient(family_server.grpc_url) as grpc:
        outputs = {output.name: output.datatype for output in grpc.get_model_metadata("text_encoder").outputs}
        inputs = {tensor.name for tensor in grpc.get_model_metadata("denoise_step").inputs}
    assert outputs == dict.fromkeys(FAMILIES[family].conditioning, "FP32")
    assert FAMILIES[family].conditioning <= inputs


def test_bad_inputs_are_rejected_and_service_continues(family, family_server, family_reference):
    for inputs, message in FAMILIES[family].bad_inputs:
        with pytest.raises(InferenceServerException) as raised:
            raw_infer(family_server, {"prompt": text(b"a cat"), **inputs})
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in raised.value.message()
    image, _ = family_server.txt2img("a cat", seed=3, num_inference_steps=2, height=32, width=32)
    assert np.array_equal(
        image, reference_image(family_reference, "a cat", 3, num_inference_steps=2, height=32, width=32)
    )
    assert family_server.metric("stepdiff_active_sequences") == 0


def test_concurrent_mixed_requests_share_forwards_and_match_solo_runs(family, family_server):
    """Different prompts, step counts, guidance (on and off), negative prompts and step indices in one forward.

    12-14 steps: on CPU the generations start staggered (each START waits for the forward in progress),
    so shorter ones overlap less (Flux: mean forward 1.4 at 5-7 steps). Solo runs would give 1.0. Measured on
    a 2-core CI machine: SDXL 3.6, SD3 2.9, Flux 2.4, Flux schnell 2.0-2.3 (its guidance-free rows step
    fastest); a bound of 1.5 leaves room for a slower machine and still fails when forwards are not shared.
    """
    jobs = [
        dict(
            prompt=PROMPTS[i % 4],
            seed=500 + i,
            num_inference_steps=12 + i % 3,
            height=64,
            width=48,
            guidance_scale=1.0 if i % 4 == 3 else 2.0 + i,
            negative_prompt=NEGATIVE if i % 2 else None,
            **FAMILIES[family].mixed,
        )
        for i in range(8)
    ]

    assert_batched_like_solo(family_server, jobs, min_mean_batch=1.5)


def test_stream_and_stepwise_client_give_the_txt2img_image(family, family_server, tmp_path):
    options = dict(seed=11, num_inference_steps=4, height=64, width=48)
    progress, final = stream(family_server, "a photo of a dog", preview_every=2, **options)
    assert [step for step, _, _ in progress] == [1, 2, 3, 4]
    previews = {step: preview for step, _, preview in progress if preview is not None}
    assert sorted(previews) == [2] and previews[2].shape == (8, 6, 3) and previews[2].dtype == np.uint8
    image, _ = family_server.txt2img("a photo of a dog", **options)
    assert np.array_equal(final["image"], image)
    # client/stepwise.py learns the family's conditioning from text_encoder's metadata
    out = tmp_path / "stepwise.png"
    flags = [
        "--seed",
        "5",
        "--num-inference-steps",
        "4",
        "--height",
        "48",
        "--width",
        "64",
        "--negative-prompt",
        "blurry",
        "--true-cfg-scale",
        "3.0",
    ]
    result = client("stepwise.py", "a photo of a cat", "--url", family_server.grpc_url, *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected, _ = family_server.txt2img(
        "a photo of a cat",
        seed=5,
        num_inference_steps=4,
        height=48,
        width=64,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
    )
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_warm_up_rows_are_the_rows_of_a_request_of_that_size(family, family_pipeline):
    """``--warmup`` captures the graphs a request of that size will replay: its rows' key, and per row the
    same tensors in the same shapes and dtypes, as many rows as the family's default guidance brings."""
    import torch

    from stepdiff.adapters import GenerationParams, Stage, load_adapter

    cpu = torch.device("cpu")
    encoder = load_adapter(str(family_pipeline), Stage.TEXT_ENCODER, cpu, torch.float32)
    denoiser = load_adapter(str(family_pipeline), Stage.DENOISE, cpu, torch.float32)
    info = denoiser.info
    params = GenerationParams("a cat", None, 0, 2, info.default_guidance_scale, 48, 80, info.default_scheduler)
    with torch.inference_mode():
        real = denoiser.denoiser_rows(denoiser.prepare(1, params, encoder.encode_prompt(params)))
    [warm] = denoiser.warmup_rows(48, 80)

    def layout(rows) -> dict:
        return {name: (tuple(tensor.shape[1:]), tensor.dtype) for name, tensor in rows.tensors.items()}

    assert {rows.key for rows in real} == {warm.key}
    assert all(layout(rows) == layout(warm) for rows in real)
    assert sum(rows.count for rows in real) == warm.count
