"""txt2img's output_format: raw pixels, or a PNG (lossless) / JPEG file in image_bytes, unary and streamed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import txt2img_client
from PIL import Image
from test_streaming import stream
from test_validation import raw_infer, text

OPTIONS = dict(seed=17, num_inference_steps=4, height=48, width=64)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_png_decodes_to_exactly_the_raw_image_and_is_smaller(server, protocol):
    raw, seed = server.txt2img("a photo of a cat", protocol, **OPTIONS)
    module, client = server.client(protocol)
    with client:
        encoded, png_seed, _ = txt2img_client.generate_file(
            client, module, "a photo of a cat", {**OPTIONS, "output_format": "png"}
        )
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n" and png_seed == seed
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), raw)
    assert len(encoded) < raw.nbytes


def test_jpeg_has_the_size_and_follows_the_quality(server):
    raw, _ = server.txt2img("a photo of a cat", **OPTIONS)
    sizes = {}
    for quality in (20, 95):
        inputs = {
            "prompt": text(b"a photo of a cat"),
            "output_format": text(b"jpeg"),
            "jpeg_quality": (np.array([quality], np.int32), "INT32"),
            **{
                name: (
                    np.array([value], np.int64 if name == "seed" else np.int32),
                    "INT64" if name == "seed" else "INT32",
                )
                for name, value in OPTIONS.items()
            },
        }
        result = raw_infer(server, inputs)
        assert result.as_numpy("image") is None  # the file replaces the pixels
        encoded = result.as_numpy("image_bytes")[0]
        image = Image.open(io.BytesIO(encoded))
        assert image.format == "JPEG" and image.size == (64, 48)
        assert np.abs(np.asarray(image).astype(int) - raw).mean() < 40  # lossy, but the same picture
        sizes[quality] = len(encoded)
    assert sizes[20] < sizes[95]


def test_stream_ends_with_the_png(server):
    raw, _ = server.txt2img("a red panda", **OPTIONS)
    progress, final = stream(server, "a red panda", output_format="png", **OPTIONS)
    total = progress[0][1]  # PNDM (the tiny pipeline's scheduler) takes one step more than asked
    assert [step for step, _, _ in progress] == list(range(1, total + 1))
    assert final["image"] is None
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(final["image_bytes"][0]))), raw)


def test_the_client_readme_curl_recipe_cuts_out_the_png(server):
    """client/README.md's recipe, over plain HTTP: binary image_bytes after the JSON header and a 4-byte length."""
    import json
    import urllib.request

    body = {
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a photo of a cat"]},
            {"name": "seed", "shape": [1], "datatype": "INT64", "data": [7]},
            {"name": "num_inference_steps", "shape": [1], "datatype": "INT32", "data": [3]},
            {"name": "output_format", "shape": [1], "datatype": "BYTES", "data": ["png"]},
        ],
        "outputs": [{"name": "image_bytes", "parameters": {"binary_data": True}}, {"name": "seed"}],
    }
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/txt2img/infer", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        header = int(response.headers["Inference-Header-Content-Length"])
        payload = response.read()
    assert json.loads(payload[:header])["outputs"][1]["data"] == [7]
    png = payload[header + 4 :]
    raw, _ = server.txt2img("a photo of a cat", seed=7, num_inference_steps=3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), raw)
