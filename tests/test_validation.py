"""Bad txt2img inputs get INVALID_ARG naming the field; the server stays healthy and exact afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import reference_image
from tritonclient.utils import InferenceServerException


def raw_infer(server, inputs: dict[str, tuple[np.ndarray, str]], model: str = "txt2img", **sequence):
    """One gRPC request from (array, Triton type) pairs; ``sequence`` goes to ``client.infer``."""
    tensors = []
    for name, (value, triton_type) in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), triton_type)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return client.infer(model, tensors, **sequence)


def text(value: bytes) -> tuple[np.ndarray, str]:
    return np.array([value], dtype=np.object_), "BYTES"


BAD_REQUESTS = {
    "height not a multiple of 8": ({"height": (np.array([60], np.int32), "INT32")}, "height=60 is not a multiple of 8"),
    "zero width": ({"width": (np.array([0], np.int32), "INT32")}, "width=0 is out of range"),
    "negative height": ({"height": (np.array([-64], np.int32), "INT32")}, "height=-64 is out of range"),
    "too many pixels": (
        {"height": (np.array([4096], np.int32), "INT32"), "width": (np.array([4096], np.int32), "INT32")},
        "over the limit",
    ),
    "zero steps": (
        {"num_inference_steps": (np.array([0], np.int32), "INT32")},
        "num_inference_steps=0 is out of range: allowed 1..200",
    ),
    "too many steps": ({"num_inference_steps": (np.array([100000], np.int32), "INT32")}, "num_inference_steps=100000"),
    "NaN guidance": (
        {"guidance_scale": (np.array([np.nan], np.float32), "FP32")},
        "guidance_scale=nan is out of range",
    ),
    "infinite guidance": ({"guidance_scale": (np.array([np.inf], np.float32), "FP32")}, "guidance_scale=inf"),
    "negative guidance": ({"guidance_scale": (np.array([-1], np.float32), "FP32")}, "guidance_scale=-1.0"),
    "negative seed": ({"seed": (np.array([-5], np.int64), "INT64")}, "seed=-5 is out of range"),
    "unknown scheduler": ({"scheduler": text(b"FancyScheduler")}, "scheduler='FancyScheduler' is not supported"),
    "non-UTF-8 prompt": ({"prompt": text(b"\xff\xfe cat")}, "prompt: not valid UTF-8"),
    "prompt over the byte limit": ({"prompt": text(b"a" * 5000)}, "prompt: 5000 bytes is over the limit of 4096"),
    "unknown output format": ({"output_format": text(b"gif")}, "output_format='gif': allowed raw, png, jpeg"),
    "JPEG quality out of range": (
        {"output_format": text(b"jpeg"), "jpeg_quality": (np.array([0], np.int32), "INT32")},
        "jpeg_quality=0 is out of range: allowed 1..100",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_arg_naming_the_field(server, case):
    overrides, message = BAD_REQUESTS[case]
    inputs = {"prompt": text(b"a cat"), **overrides}
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(server, inputs)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raised.value.message()


def test_missing_prompt_and_wrong_shape_are_rejected_by_triton(server):
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(server, {"seed": (np.array([1], np.int64), "INT64")})
    assert "prompt" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(server, {"prompt": (np.array([b"a", b"b"], dtype=np.object_), "BYTES")})
    assert "prompt" in raised.value.message() and "shape" in raised.value.message()


def test_direct_denoise_step_calls_are_validated(server):
    step = grpcclient.InferInput("step", [1, 1], "INT32")
    step.set_data_from_numpy(np.array([[0]], np.int32))
    prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a cat"]], dtype=np.object_))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as no_start:  # Triton's sequence batcher refuses it
            client.infer("denoise_step", [step], sequence_id=424242)
        assert "START" in no_start.value.message()
        with pytest.raises(InferenceServerException) as no_embeddings:
            client.infer("denoise_step", [prompt], sequence_id=424243, sequence_start=True, sequence_end=True)
    assert no_embeddings.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "prompt_embeds: required on START" in no_embeddings.value.message()
    assert server.metric("stepdiff_active_sequences") == 0


def test_vae_decode_refuses_latents_of_an_image_over_max_pixels(server):
    """Direct callers of vae_decode are held to max_pixels like txt2img's: 160x160 latents of the tiny SD
    (VAE factor 8) would be a 1280x1280 image."""
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(server, {"latents": (np.zeros((1, 4, 160, 160), np.float32), "FP32")}, model="vae_decode")
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.message()
    assert "latents: [1, 4, 160, 160] decode to 1280x1280 = 1638400 pixels, over the limit of 1048576 (max_pixels)" in (
        raised.value.message()
    )
    image = raw_infer(server, {"latents": (np.zeros((1, 4, 128, 128), np.float32), "FP32")}, model="vae_decode")
    assert image.as_numpy("image").shape == (1, 1024, 1024, 3)  # exactly max_pixels: decoded


def test_after_bad_requests_the_next_good_one_is_still_exact(server, reference):
    """Bad requests leave the server exact, and each is counted in stepdiff_failed_requests_total with its
    code (Triton's own nv_inference_request_failure counts them as successes)."""
    failed_before = server.metric("stepdiff_failed_requests_total", model="txt2img", code="INVALID_ARG")
    for overrides, _ in BAD_REQUESTS.values():
        with pytest.raises(InferenceServerException):
            raw_infer(server, {"prompt": text(b"a cat"), **overrides})
    failed = server.metric("stepdiff_failed_requests_total", model="txt2img", code="INVALID_ARG") - failed_before
    assert failed == len(BAD_REQUESTS)
    image, _ = server.txt2img("a red panda", seed=11, num_inference_steps=6)
    assert np.array_equal(image, reference_image(reference, "a red panda", 11, num_inference_steps=6))
    assert server.metric("stepdiff_active_sequences") == 0
