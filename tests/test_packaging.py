"""The wheel: it carries the model repository template, and installed outside the checkout it serves
from any working directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
from conftest import REPO, reference_image, running_server

from stepdiff.repository import served_repository_path

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
