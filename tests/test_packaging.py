"""The wheel: it carries the model repository template and the clients, and installed outside the
checkout it serves from any working directory, and `stepdiff demo` writes its image."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
from conftest import REPO, reference_image, running_server
from PIL import Image

from stepdiff.repository import served_repository_path
from stepdiff.server import free_ports

MODELS = ("text_encoder", "denoise_step", "vae_decode", "txt2img", "txt2img_stream")


def test_installed_wheel_serves_from_another_directory(tiny_sd, reference, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheels.glob("stepdiff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in MODELS:
        assert {
            f"stepdiff/model_repository/{model}/config.pbtxt",
            f"stepdiff/model_repository/{model}/1/model.py",
        } <= names
    assert {"stepdiff/client/generate.py", "stepdiff/client/stepwise.py"} <= names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy comes first on the path: the launcher and every model process import it, not the checkout.
    with running_server(
        tiny_sd, tmp_path / "tritonserver.log", environ={"PYTHONPATH": str(site)}, cwd=elsewhere
    ) as server:
        image, _ = server.txt2img("a photo of a cat", seed=4, num_inference_steps=3, height=32, width=32)
        served = served_repository_path(int(server.http_url.rsplit(":", 1)[1]))
        header = (served / "denoise_step" / "config.pbtxt").read_text().splitlines()[0]
    assert str(site / "stepdiff" / "model_repository") in header
    assert np.array_equal(
        image, reference_image(reference, "a photo of a cat", 4, num_inference_steps=3, height=32, width=32)
    )

    # `stepdiff demo` of the installed copy: it serves, generates with the client the wheel carries, stops
    ports = [str(port) for port in free_ports(3)]
    ports_flags = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    result = subprocess.run(
        [sys.executable, "-m", "stepdiff", "demo", "--pipeline", str(tiny_sd), "--steps", "2", *ports_flags],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"the image is in {elsewhere / 'outputs'}" in result.stdout
    [png] = (elsewhere / "outputs").glob("*.png")
    assert np.asarray(Image.open(png)).shape[2] == 3
