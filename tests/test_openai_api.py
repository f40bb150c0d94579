"""The OpenAI images API of `stepdiff serve --openai-port`, driven by the official openai client against the
session server: images equal txt2img's, errors in OpenAI's shape, models, and a client that leaves cancels."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from conftest import txt2img_client
from PIL import Image
from test_batching import psnr
from test_streaming import wait_for_metric
from tritonclient.utils import InferenceServerException

from stepdiff.openai_api import ImageRequest, txt2img_error

FAST = dict(num_inference_steps=3)  # a few steps of the tiny pipeline: well under a second each


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)


def decode(image: openai.types.Image) -> tuple[bytes, np.ndarray]:
    """(the PNG file, its pixels) of one ``data`` entry."""
    png = base64.b64decode(image.b64_json)
    return png, np.asarray(Image.open(io.BytesIO(png)))


def txt2img_png(server, prompt: str, seed: int, width: int, height: int) -> bytes:
    module, triton = server.client("grpc")
    options = dict(seed=seed, height=height, width=width, output_format="png", **FAST)
    with triton:
        png, _, _ = txt2img_client.generate_file(triton, module, prompt, options)
    return png


def post(server, path: str, body: bytes) -> tuple[int, dict]:
    """A raw POST: (HTTP status, JSON body), errors included."""
    request = urllib.request.Request(server.openai_url + path, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_one_image_is_txt2img_png_byte_for_byte(server, client, tiny_sd):
    result = client.images.generate(
        model=str(tiny_sd), prompt="a photo of a cat", size="64x48", extra_body=dict(seed=21, **FAST)
    )
    [image] = result.data
    png, pixels = decode(image)
    assert png == txt2img_png(server, "a photo of a cat", 21, width=64, height=48)
    assert Image.open(io.BytesIO(png)).format == "PNG" and pixels.shape == (48, 64, 3)
    assert image.model_extra["seed"] == 21 and result.size == "64x48" and result.output_format == "png"
    assert abs(result.created - time.time()) < 60


def test_n_images_take_consecutive_seeds(server, client):
    """n=2 without a model field: seeds 40 and 41, each the image txt2img makes alone with that seed (the two
    run at once and share denoiser forwards, so the suite's batching bar applies: PSNR >= 40 dB)."""
    result = client.images.generate(prompt="a red panda", n=2, size="32x40", extra_body=dict(seed=40, **FAST))
    assert [image.model_extra["seed"] for image in result.data] == [40, 41]
    for image, seed in zip(result.data, (40, 41), strict=True):
        pixels = decode(image)[1]
        alone = np.asarray(Image.open(io.BytesIO(txt2img_png(server, "a red panda", seed, width=32, height=40))))
        assert pixels.shape == (40, 32, 3) and psnr(pixels, alone) >= 40
    assert not np.array_equal(*(decode(image)[1] for image in result.data))


def test_url_response_format_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a cat", response_format="url", extra_body=FAST)
    assert refused.value.status_code == 400
    assert refused.value.param == "response_format" and refused.value.type == "invalid_request_error"
    assert "b64_json" in refused.value.message


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("big", "size='big' is not WIDTHxHEIGHT"),
        ("64x", "size='64x' is not WIDTHxHEIGHT"),
        ("64x50", "size=64x50: height=50 is not a multiple of 8"),  # txt2img's own check
        ("4096x4096", "over the limit"),
    ],
)
def test_bad_size_is_400_naming_size(client, size, message):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a cat", size=size, extra_body=FAST)
    assert refused.value.param == "size" and message in refused.value.message


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (0, "num_inference_steps=0 is out of range: allowed 1..200"),  # txt2img's INVALID_ARG
        (10**12, "num_inference_steps=1000000000000 is out of range"),
        ("ten", 'num_inference_steps: expected an integer, got "ten"'),
    ],
)
def test_invalid_num_inference_steps_is_400(client, steps, message):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a cat", extra_body=dict(num_inference_steps=steps))
    assert refused.value.param == "num_inference_steps" and message in refused.value.message


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b"{not json", None, "the request body is not valid JSON"),
        (b'["a cat"]', None, "must be a JSON object"),
        (b"{}", "prompt", "prompt: required field is missing"),
        (b'{"prompt": "a cat", "n": 11}', "n", "n=11 is out of range: allowed 1..10"),
        (b'{"prompt": "a cat", "seed": -1}', "seed", "seed=-1 is out of range"),
        (b'{"prompt": "a cat", "quality": "hd"}', "quality", "quality: not supported by this server"),
        (b'{"prompt": "a cat", "guidance_scale": -1}', "guidance_scale", "guidance_scale=-1.0 is out of range"),
        (b'{"prompt": "a cat", "guidance_scale": 1e39}', "guidance_scale", "not a finite 32-bit float"),
        (b'{"prompt": "a cat", "lora": ["x", 1]}', "lora", "lora: expected a string or a list of them, got 1"),
        (b'{"prompt": "a cat", "lora": "x"}', "lora", "lora: unknown adapter 'x': loaded none"),
        # JSON escapes of lone surrogates decode to text UTF-8 cannot encode; the error renders all the same
        (b'{"prompt": "\\ud800"}', "prompt", "prompt: not valid Unicode text"),
        (b'{"prompt": "a", "scheduler": "\\udfff"}', "scheduler", "scheduler: not valid Unicode text"),
        (b'{"prompt": "a", "lora": ["\\ud800"]}', "lora", "lora: not valid Unicode text"),
        (b'{"prompt": "a", "\\ud800": 1}', "\ud800", "not supported by this server"),
        (b"[" * 100_000, None, "the request body is not valid JSON: maximum recursion depth exceeded"),
        (b'{"prompt": "a", "size": "\\u0666\\u0664x64"}', "size", "is not WIDTHxHEIGHT in pixels"),
    ],
)
def test_bad_requests_get_the_openai_error_shape(server, body, param, message):
    status, answer = post(server, "/images/generations", body)
    assert status == 400 and set(answer) == {"error"}
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]


def test_models_lists_the_pipeline_and_unknown_models_are_404(client, tiny_sd):
    assert [model.id for model in client.models.list()] == [str(tiny_sd)]
    assert client.models.retrieve(str(tiny_sd)).owned_by == "stepdiff"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt="a cat", extra_body=FAST)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


@pytest.mark.parametrize(
    ("status", "http_status", "kind"),
    [("StatusCode.UNAVAILABLE", 503, "server_error"), ("StatusCode.INTERNAL", 500, "server_error")],
)
def test_triton_errors_map_to_http_statuses(status, http_status, kind):
    error = txt2img_error(InferenceServerException("server busy: 2 generations", status), ImageRequest("a cat"))
    answer = json.loads(error.response().body)["error"]
    assert error.status == http_status and answer["type"] == kind and answer["message"].startswith("server busy")


def test_client_that_leaves_cancels_its_generations(server, client):
    """n=2 long generations, which run at once; the client goes away: txt2img stops both (counted as
    cancelled), the denoise state is freed, and the next request is served."""
    cancelled_before = server.metric("stepdiff_cancelled_requests_total")

    async def leave_while_generating() -> None:
        leaving = openai.AsyncOpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
        request = asyncio.ensure_future(
            leaving.images.generate(prompt="a slow cat", n=2, size="128x128", extra_body=dict(num_inference_steps=200))
        )
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(server.metric, "stepdiff_active_sequences") < 2:
            assert time.monotonic() < deadline and not request.done(), "the two generations never ran at once"
            await asyncio.sleep(0.1)
        request.cancel()  # closes the connection mid-request
        await asyncio.wait({request})
        await leaving.close()

    left = time.monotonic()
    asyncio.run(leave_while_generating())
    assert wait_for_metric(server, "stepdiff_cancelled_requests_total", cancelled_before + 2) == cancelled_before + 2
    assert wait_for_metric(server, "stepdiff_active_sequences", 0) == 0
    assert time.monotonic() - left < 15
    [image] = client.images.generate(prompt="a cat", size="32x32", extra_body=dict(seed=3, **FAST)).data
    assert decode(image)[1].shape == (32, 32, 3)
