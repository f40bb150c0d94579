"""The text_encoder and vae_decode stages' batching in-process: requests share forwards (by
``text_batch_key``; by latent shape) and each gets what it gets alone, and a failing request fails
alone (the served path: the concurrent tests of test_batching and test_families)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stepdiff.adapters import GenerationParams, Stage, load_adapter
from stepdiff.runner import GraphedCall
from stepdiff.stage_batching import decode_batch, encode_batch, warm_up_decode, warm_up_encode

PROMPTS = ["a cat", "a red panda sitting on a tree branch in a bamboo forest, soft light", "a dog", ""]


FAMILIES = ["sd", "sdxl", "sd3", "flux", "qwenimage"]


def tiny_stage(family: str, stage: Stage, tmp_path_factory):
    from stepdiff.tiny import make_tiny

    path: Path = make_tiny(family, tmp_path_factory.mktemp("pipelines") / f"tiny-{family}")
    return load_adapter(str(path), stage, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module", params=FAMILIES)
def encoder(request, tmp_path_factory):
    return tiny_stage(request.param, Stage.TEXT_ENCODER, tmp_path_factory)


@pytest.fixture(scope="module", params=FAMILIES)
def decoder(request, tmp_path_factory):
    return tiny_stage(request.param, Stage.DECODE, tmp_path_factory)


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


def graphed_text_encoders(encoder) -> list[GraphedCall]:
    """The stage's text encoders' forwards that ``graph_text_encoders`` replaced."""
    modules = [getattr(encoder.pipe, name, None) for name in encoder.stage_components[Stage.TEXT_ENCODER]]
    return [module.forward for module in modules if isinstance(getattr(module, "forward", None), GraphedCall)]


def test_grouped_requests_share_forwards_and_each_gets_its_solo_conditioning(encoder, monkeypatch):
    requests = mixed_requests(encoder)
    group_sizes = []
    encode_prompts = encoder.encode_prompts

    def recorded(batch):
        group_sizes.append(len(batch))
        return encode_prompts(batch)

    with torch.inference_mode():
        alone = [encoder.encode_prompt(params) for params in requests]
        monkeypatch.setattr(encoder, "encode_prompts", recorded)
        together = encode_batch(encoder, requests)

    keys = [encoder.text_batch_key(params) for params in requests]
    assert sorted(group_sizes) == sorted(keys.count(key) for key in set(keys))
    assert max(group_sizes) > 1
    for params, solo, batched in zip(requests, alone, together, strict=True):
        assert batched.keys() == solo.keys(), params
        for name, value in solo.items():
            assert batched[name].shape == value.shape, (name, params)
            assert batched[name].dtype == value.dtype, (name, params)
            torch.testing.assert_close(batched[name], value, rtol=1e-4, atol=1e-5)


def test_a_failing_request_fails_alone_and_its_group_is_encoded_without_it(encoder, monkeypatch):
    requests = mixed_requests(encoder)[:4]
    poisoned = requests[0]
    encode_prompts = encoder.encode_prompts

    def failing_with_poisoned(batch):
        if poisoned in batch:
            raise RuntimeError("text encoder failed")
        return encode_prompts(batch)

    with torch.inference_mode():
        alone = [encoder.encode_prompt(params) for params in requests]
        monkeypatch.setattr(encoder, "encode_prompts", failing_with_poisoned)
        results = encode_batch(encoder, [requests[0], requests[0], *requests])

    assert [str(result) for result in results[:3]] == ["text encoder failed"] * 3
    for solo, batched in zip(alone[1:], results[3:], strict=True):
        for name, value in solo.items():
            torch.testing.assert_close(batched[name], value, rtol=1e-4, atol=1e-5)


def latents_of_two_shapes(decoder) -> list[torch.Tensor]:
    """Five requests' final latents: three of one shape, two of another, interleaved."""
    generator = torch.Generator().manual_seed(0)
    channels = decoder.latent_channels()
    shapes = [(4, 4), (4, 6), (4, 4), (4, 6), (4, 4)]
    return [torch.randn(1, channels, *shape, generator=generator) for shape in shapes]


def test_latents_of_one_shape_share_a_decode_and_each_gets_its_solo_image(decoder, monkeypatch):
    requests = latents_of_two_shapes(decoder)
    decoded_rows = []
    decode = decoder.decode

    def recorded(latents):
        decoded_rows.append(latents.shape[0])
        return decode(latents)

    with torch.inference_mode():
        alone = [decoder.decode(latents) for latents in requests]
        monkeypatch.setattr(decoder, "decode", recorded)
        together = decode_batch(decoder, requests)

    assert sorted(decoded_rows) == [2, 3]
    for latents, solo, batched in zip(requests, alone, together, strict=True):
        assert batched.shape == solo.shape and batched.dtype == np.uint8, latents.shape
        # a batched convolution may round differently in the last float bit: at most 1 of 255
        assert np.abs(batched.astype(int) - solo).max() <= 1, latents.shape


def test_a_failing_decode_fails_alone_and_its_group_is_decoded_without_it(decoder, monkeypatch):
    requests = latents_of_two_shapes(decoder)
    poisoned = requests[0]
    decode = decoder.decode

    def failing_with_poisoned(latents):
        if any(torch.equal(row[None], poisoned) for row in latents):
            raise RuntimeError("VAE decode failed")
        return decode(latents)

    with torch.inference_mode():
        alone = [decoder.decode(latents) for latents in requests]
        monkeypatch.setattr(decoder, "decode", failing_with_poisoned)
        results = decode_batch(decoder, requests)

    assert str(results[0]) == "VAE decode failed"
    for index in (2, 4):  # the poisoned request's group, decoded request by request: exactly as alone
        assert np.array_equal(results[index], alone[index])
    for index in (1, 3):  # the other group, decoded together
        assert np.abs(results[index].astype(int) - alone[index]).max() <= 1


def test_decode_warm_up_decodes_every_batch_of_each_size_largest_first(decoder):
    """The warm-up decodes the latents that requests of each size would send, every count the stage's
    batcher can form, the size with most pixels and the largest count first, so that the decode's memory
    peak is reserved before serving."""
    multiple = decoder.info.size_multiple
    sizes = [(2 * multiple, 2 * multiple), (4 * multiple, 2 * multiple), (2 * multiple, 3 * multiple)]
    shapes, too_large = warm_up_decode(decoder, sizes, 2)
    assert too_large == []
    pixels = [(4 * multiple, 2 * multiple), (2 * multiple, 3 * multiple), (2 * multiple, 2 * multiple)]
    assert shapes == [(count, height, width, 3) for height, width in pixels for count in (2, 1)]


def test_a_decode_warm_up_batch_out_of_gpu_memory_is_skipped_and_named(decoder, monkeypatch):
    """A batch too large for the GPU does not stop the start: it is named (served, such a batch falls back
    to one decode per request), and the smaller batches are still decoded. One latent that does not fit
    stops it."""
    decode = decoder.decode

    def out_of_memory_past(limit):
        def limited(latents):
            if latents.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return decode(latents)

        return limited

    multiple = decoder.info.size_multiple
    monkeypatch.setattr(decoder, "decode", out_of_memory_past(2))
    shapes, too_large = warm_up_decode(decoder, [(2 * multiple, 2 * multiple)], 4)
    assert [shape[0] for shape in shapes] == [2, 1]
    assert too_large == [(2 * multiple, 2 * multiple, 4), (2 * multiple, 2 * multiple, 3)]
    monkeypatch.setattr(decoder, "decode", out_of_memory_past(0))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        warm_up_decode(decoder, [(2 * multiple, 2 * multiple)], 4)


def test_a_compiled_decode_runs_through_inductor_and_stays_within_a_level_of_eager(tmp_path_factory, monkeypatch):
    """``decoder=compiled``: the VAE decode goes through torch.compile (Dynamo compiles a graph, Inductor's
    kernels are cached under TORCHINDUCTOR_CACHE_DIR) and its image differs from the eager decode's by at
    most one level of 255 (SD; one family: a CPU compile takes about a minute)."""
    import torch._dynamo

    cache = tmp_path_factory.mktemp("inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    decoder = tiny_stage("sd", Stage.DECODE, tmp_path_factory)  # its own: compiling changes the adapter
    latents = decoder.warmup_latents(64, 64, 1).normal_(generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = decoder.decode(latents)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        decoder.compile_decode()
        compiled = decoder.decode(latents)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert any(cache.iterdir())
    assert compiled.shape == eager.shape and compiled.dtype == np.uint8
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1


def test_the_encode_warm_up_captures_what_requests_then_replay(tmp_path_factory):
    """``--warmup`` with ``encoder=graphs``: a capture per batch size from 1 to the stage's largest, in the
    LoRA setting requests run in (none), so that served requests of the default kind capture nothing."""
    encoder = tiny_stage("sd", Stage.TEXT_ENCODER, tmp_path_factory)
    encoder.graph_text_encoders()
    graphed = encoder.pipe.text_encoder.forward
    warm_up_encode(encoder, 4)
    assert sorted(len(capture.inputs[0]) for capture in graphed.captures.values()) == [1, 2, 3, 4]
    requests = [request for request in mixed_requests(encoder) if request.prompt][:3]
    with torch.inference_mode():
        for count in range(1, 4):
            assert not any(isinstance(result, Exception) for result in encode_batch(encoder, requests[:count]))
    assert len(graphed.captures) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_stages_give_the_eager_conditioning_and_images(family, tmp_path_factory):
    """``encoder=graphs`` and ``decoder=graphs`` on CPU: the calls run on the
    captures' input copies, one capture per distinct call, with the eager results bit for bit."""
    encoder = tiny_stage(family, Stage.TEXT_ENCODER, tmp_path_factory)
    decoder = tiny_stage(family, Stage.DECODE, tmp_path_factory)
    requests = mixed_requests(encoder)
    latents = latents_of_two_shapes(decoder)
    with torch.inference_mode():
        eager_conditioning = encode_batch(encoder, requests)
        eager_images = decode_batch(decoder, latents)
        assert encoder.graph_text_encoders() == (family != "qwenimage")
        decoder.graph_decode()
        for _ in range(2):  # the first round makes the captures, the second reuses them
            conditioning = encode_batch(encoder, requests)
            images = decode_batch(decoder, latents)
            for eager, graphed in zip(eager_conditioning, conditioning, strict=True):
                assert eager.keys() == graphed.keys()
                for name, value in eager.items():
                    assert torch.equal(graphed[name], value), name
            for eager, graphed in zip(eager_images, images, strict=True):
                assert np.array_equal(graphed, eager)
    assert sorted(len(capture.inputs[0]) for capture in decoder.pipe.vae.decode.captures.values()) == [2, 3]
    captured = [len(forward.captures) for forward in graphed_text_encoders(encoder)]
    if family == "qwenimage":  # its prompts keep their own lengths: eager
        assert captured == []
    else:
        assert captured and all(count > 0 for count in captured)
