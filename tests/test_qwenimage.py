"""QwenImage through the real server: byte-identical to QwenImagePipeline alone, batched, validated."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from test_batching import assert_batched_like_solo
from test_streaming import stream
from test_txt2img import PROMPTS
from test_validation import raw_infer, text
from tritonclient.utils import InferenceServerException

RESOLUTIONS = [(64, 64), (48, 80), (96, 32)]
NEGATIVE_PROMPT = "blurry, low quality"
STEPS = 5


def reference_image(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """QwenImagePipeline's image for these inputs, as uint8 exactly like txt2img's ``image`` output."""
    images = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    return (images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("prompt_index", "size", "true_cfg"), list(itertools.product(range(5), RESOLUTIONS, [True, False]))
)
def test_image_is_byte_identical_to_diffusers(qwen_server, qwen_reference, prompt_index, size, true_cfg):
    prompt, (height, width), seed = PROMPTS[prompt_index], size, 2000 + prompt_index
    options = dict(seed=seed, num_inference_steps=STEPS, height=height, width=width, true_cfg_scale=4.0)
    if true_cfg:
        options["negative_prompt"] = NEGATIVE_PROMPT
    protocol = "http" if prompt_index % 2 else "grpc"
    image, used_seed = qwen_server.txt2img(prompt, protocol, **options)
    expected = reference_image(qwen_reference, prompt, **options)
    assert used_seed == seed
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected).max()}"


def test_true_cfg_scale_and_seed_change_the_image(qwen_server, qwen_reference):
    """The matrix above compares against images that really depend on the guidance inputs and the seed."""
    options = dict(num_inference_steps=STEPS, height=64, width=64, negative_prompt=NEGATIVE_PROMPT)
    guided, _ = qwen_server.txt2img("a photo of a cat", seed=1, true_cfg_scale=4.0, **options)
    weaker, _ = qwen_server.txt2img("a photo of a cat", seed=1, true_cfg_scale=2.0, **options)
    off, _ = qwen_server.txt2img("a photo of a cat", seed=1, true_cfg_scale=1.0, **options)
    other_seed, _ = qwen_server.txt2img("a photo of a cat", seed=2, true_cfg_scale=4.0, **options)
    assert len({image.tobytes() for image in (guided, weaker, off, other_seed)}) == 4
    # true_cfg_scale <= 1 turns true CFG off even with a negative prompt, as in diffusers.
    assert np.array_equal(
        off, reference_image(qwen_reference, "a photo of a cat", 1, num_inference_steps=STEPS, height=64, width=64)
    )


def test_defaults_follow_the_pipeline(qwen_server, qwen_reference):
    """Only prompt, seed and a small size: 50 steps, true_cfg_scale 4.0, the pipeline's own scheduler."""
    options = dict(seed=9, height=32, width=32, negative_prompt=NEGATIVE_PROMPT)
    image, _ = qwen_server.txt2img("a red panda", **options)
    assert np.array_equal(image, reference_image(qwen_reference, "a red panda", **options))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"height": (np.array([40], np.int32), "INT32")},
            "height=40 is not a multiple of 16, which QwenImagePipeline requires (VAE factor 8 x 2x2 latent patches)",
        ),
        ({"width": (np.array([72], np.int32), "INT32")}, "width=72 is not a multiple of 16"),
        ({"num_inference_steps": (np.array([1], np.int32), "INT32")}, "num_inference_steps=1 is out of range"),
        ({"scheduler": text(b"DDIMScheduler")}, "allowed FlowMatchEulerDiscreteScheduler"),
        ({"true_cfg_scale": (np.array([np.nan], np.float32), "FP32")}, "true_cfg_scale=nan is out of range"),
    ],
)
def test_bad_inputs_are_rejected_and_service_continues(qwen_server, qwen_reference, inputs, message):
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(qwen_server, {"prompt": text(b"a cat"), **inputs})
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raised.value.message()
    image, _ = qwen_server.txt2img("a cat", seed=3, num_inference_steps=2, height=32, width=32)
    assert np.array_equal(
        image, reference_image(qwen_reference, "a cat", 3, num_inference_steps=2, height=32, width=32)
    )
    assert qwen_server.metric("stepdiff_active_sequences") == 0


def test_concurrent_cfg_and_plain_requests_batch_and_match_solo_runs(qwen_server):
    """Requests of one size share forwards (rows grouped by text length); true-CFG and plain requests
    in the same step never corrupt each other."""
    prompts = ["a photo of a cat", "a photo of a dog", "a red panda sitting on a tree branch", "a photo of a cat"]
    jobs = [
        dict(
            prompt=prompts[i % 4],
            seed=300 + i,
            num_inference_steps=8 + i % 3,
            height=64,
            width=48,
            negative_prompt=NEGATIVE_PROMPT if i % 2 else None,
            true_cfg_scale=2.0 + i,
        )
        for i in range(8)
    ]

    # Solo runs give 1.0; 2.4 measured on a 2-core machine, where the text encoder staggers the starts.
    assert_batched_like_solo(qwen_server, jobs, min_mean_batch=1.5)


def test_stream_sends_progress_previews_and_the_same_image(qwen_server):
    options = dict(seed=11, num_inference_steps=4, height=64, width=48)
    progress, final = stream(qwen_server, "a photo of a dog", preview_every=2, **options)
    assert [step for step, _, _ in progress] == [1, 2, 3, 4]
    previews = {step: preview for step, _, preview in progress if preview is not None}
    assert sorted(previews) == [2] and previews[2].shape == (8, 6, 3)  # latents are 1/8 of the image
    image, _ = qwen_server.txt2img("a photo of a dog", **options)
    assert np.array_equal(final["image"], image)


def test_stepwise_client_gives_the_txt2img_image(qwen_server, tmp_path):
    """client/stepwise.py carries the masks and true_cfg_scale through the three stages itself."""
    from test_clients import client

    out = tmp_path / "stepwise.png"
    options = dict(
        seed=12, num_inference_steps=4, height=48, width=64, negative_prompt=NEGATIVE_PROMPT, true_cfg_scale=3.0
    )
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    result = client("stepwise.py", "a photo of a cat", "--url", qwen_server.grpc_url, *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    expected, _ = qwen_server.txt2img("a photo of a cat", **options)
    assert np.array_equal(np.asarray(Image.open(out)), expected)


# In-process, on the adapter and the engine (what denoise_step runs), where forwards can be counted.


@pytest.fixture(scope="module")
def qwen_stages(tiny_qwen):
    from stepdiff.adapters import Stage, load_adapter

    cpu = torch.device("cpu")
    return load_adapter(str(tiny_qwen), Stage.TEXT_ENCODER, cpu, torch.float32), load_adapter(
        str(tiny_qwen), Stage.DENOISE, cpu, torch.float32
    )


def qwen_params(prompt: str, negative: str | None = None, height: int = 64, width: int = 48, seed: int = 0):
    from stepdiff.adapters import GenerationParams

    return GenerationParams(prompt, negative, seed, 3, 1.0, height, width, "FlowMatchEulerDiscreteScheduler", 4.0)


def started_engine(encoder, denoiser, requests: dict[int, object]):
    from stepdiff.engine import StepCall, StepEngine

    engine = StepEngine(denoiser, 16, 16, 60)
    with torch.inference_mode():
        calls = [
            StepCall(cid, start=True, params=p, conditioning=encoder.encode_prompt(p)) for cid, p in requests.items()
        ]
    assert all(result.error is None for result in engine.run(calls))
    return engine


def test_rows_share_forwards_by_patch_grid_and_text_length(qwen_stages, monkeypatch):
    from stepdiff.engine import StepCall

    encoder, denoiser = qwen_stages
    requests = {
        1: qwen_params("a photo of a cat", negative="blurry"),  # cond + uncond rows
        2: qwen_params("a photo of a dog", seed=1),  # as many tokens as request 1's prompt
        3: qwen_params("a red panda sitting on a tree branch in a bamboo forest", seed=2),
        4: qwen_params("a photo of a cat", height=48, width=64, seed=3),  # as many patches, transposed
    }
    solo = {}
    for cid, params in requests.items():
        engine = started_engine(encoder, denoiser, {cid: params})
        [result] = engine.run([StepCall(cid, step=0, wants_latents=True)])
        solo[cid] = result.latents.clone()
    forwards: list[tuple[tuple, int]] = []  # (key, rows) per transformer forward
    original = type(denoiser).forward

    def counted(self, key, inputs):
        forwards.append((key, inputs["hidden_states"].shape[0]))
        return original(self, key, inputs)

    monkeypatch.setattr(type(denoiser), "forward", counted)
    engine = started_engine(encoder, denoiser, requests)
    results = engine.run([StepCall(cid, step=0, wants_latents=True) for cid in requests])
    prompt_tokens = {cid: len(encoder.pipe.tokenizer(params.prompt).input_ids) for cid, params in requests.items()}
    assert prompt_tokens[1] == prompt_tokens[2] == prompt_tokens[4] != prompt_tokens[3]
    # 1 and 2 (one grid, one text length) share a forward; 1's negative prompt, 3 (longer text) and
    # 4 (the transposed grid) each have their own
    assert sorted(rows for _, rows in forwards) == [1, 1, 1, 2]
    grid, transposed = denoiser._patch_grid(requests[1]), denoiser._patch_grid(requests[4])
    [shared] = [key for key, rows in forwards if rows == 2]
    assert shared[1] == grid != transposed
    assert sorted(key[1] for key, _ in forwards) == sorted([grid, grid, grid, transposed])
    assert len({key for key, _ in forwards}) == 4
    for cid, result in zip(requests, results, strict=True):
        assert result.error is None
        torch.testing.assert_close(result.latents, solo[cid], rtol=0, atol=1e-5)


def test_a_partial_mask_is_kept_and_matches_diffusers(qwen_stages, qwen_reference):
    """Embeddings passed in directly with padding: the mask reaches the transformer as in diffusers."""
    from stepdiff.engine import StepCall, StepEngine

    _, denoiser = qwen_stages
    embeds = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0]])
    params = qwen_params("", height=32, width=32, seed=6)
    engine = StepEngine(denoiser, 16, 16, 60)
    conditioning = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
    [started] = engine.run([StepCall(9, start=True, params=params, conditioning=conditioning)])
    assert started.error is None and "prompt_embeds_mask" in engine.states[9].conditioning
    for index in range(3):
        [result] = engine.run([StepCall(9, step=index)])
    expected = qwen_reference(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(6),
        output_type="latent",
    ).images
    assert result.error is None and result.done
    torch.testing.assert_close(
        result.latents, qwen_reference._unpack_latents(expected, 32, 32, 8)[:, :, 0], rtol=0, atol=0
    )


def test_malformed_embeddings_fail_at_start_naming_the_input(qwen_stages):
    from stepdiff.engine import StepCall, StepEngine

    _, denoiser = qwen_stages
    engine = StepEngine(denoiser, 16, 16, 60)
    params = qwen_params("a cat")
    bad = {
        "prompt_embeds: expected shape [1, tokens, 32]": {"prompt_embeds": torch.zeros(1, 5, 16)},
        "prompt_embeds_mask: expected shape [1, 5]": {
            "prompt_embeds": torch.zeros(1, 5, 32),
            "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
        },
    }
    for message, conditioning in bad.items():
        [result] = engine.run([StepCall(5, start=True, params=params, conditioning=conditioning)])
        assert message in str(result.error)
        assert engine.states == {}
