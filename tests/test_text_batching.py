"""The text_encoder stage's batching in-process: requests share text-encoder forwards by ``text_batch_key``
and each gets what it gets alone (the served path: the concurrent tests of test_batching and test_families)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepdiff.adapters import GenerationParams, Stage, load_adapter
from stepdiff.text_batching import encode_batch

PROMPTS = ["a cat", "a red panda sitting on a tree branch in a bamboo forest, soft light", "a dog", ""]


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux", "qwenimage"])
def encoder(request, tmp_path_factory):
    from stepdiff.tiny import make_tiny

    path: Path = make_tiny(request.param, tmp_path_factory.mktemp("pipelines") / f"tiny-{request.param}")
    return load_adapter(str(path), Stage.TEXT_ENCODER, torch.device("cpu"), torch.float32)


def mixed_requests(encoder) -> list[GenerationParams]:
    """Different prompt lengths, guidance on and off, negative prompts given and not: several groups."""
    info = encoder.info
    requests = []
    for index in range(8):
        guided = index % 3 != 2
        requests.append(
            GenerationParams(
                prompt=PROMPTS[index % 4],
                negative_prompt="blurry, low quality" if index % 2 else None,
                seed=index,
                num_inference_steps=info.default_steps,
                guidance_scale=5.0 if guided else 1.0,
                height=info.default_height,
                width=info.default_width,
                scheduler=info.default_scheduler,
                true_cfg_scale=4.0 if guided else 1.0,
            )
        )
    return requests


def test_grouped_requests_share_forwards_and_each_gets_its_solo_conditioning(encoder):
    requests = mixed_requests(encoder)
    group_sizes = []
    encode_prompts = encoder.encode_prompts

    def recorded(batch):
        group_sizes.append(len(batch))
        return encode_prompts(batch)

    with torch.inference_mode():
        alone = [encoder.encode_prompt(params) for params in requests]
        encoder.encode_prompts = recorded
        try:
            together = encode_batch(encoder, requests)
        finally:
            del encoder.encode_prompts

    keys = [encoder.text_batch_key(params) for params in requests]
    assert sorted(group_sizes) == sorted(keys.count(key) for key in set(keys))
    assert max(group_sizes) > 1
    for params, solo, batched in zip(requests, alone, together, strict=True):
        assert batched.keys() == solo.keys(), params
        for name, value in solo.items():
            assert batched[name].shape == value.shape, (name, params)
            assert batched[name].dtype == value.dtype, (name, params)
            torch.testing.assert_close(batched[name], value, rtol=1e-4, atol=1e-5)


def test_a_failing_request_fails_alone_and_its_group_is_encoded_without_it(encoder):
    requests = mixed_requests(encoder)[:4]
    poisoned = requests[0]
    encode_prompts = encoder.encode_prompts

    def failing_with_poisoned(batch):
        if poisoned in batch:
            raise RuntimeError("text encoder failed")
        return encode_prompts(batch)

    with torch.inference_mode():
        alone = [encoder.encode_prompt(params) for params in requests]
        encoder.encode_prompts = failing_with_poisoned
        try:
            results = encode_batch(encoder, [requests[0], requests[0], *requests])
        finally:
            del encoder.encode_prompts

    assert [str(result) for result in results[:3]] == ["text encoder failed"] * 3
    for solo, batched in zip(alone[1:], results[3:], strict=True):
        for name, value in solo.items():
            torch.testing.assert_close(batched[name], value, rtol=1e-4, atol=1e-5)
