"""``stepdiff make-tiny``: byte-identical output for the same seed, loadable offline by diffusers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_tiny(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "stepdiff", "make-tiny", *args], check=True, capture_output=True, timeout=300)


def test_same_command_gives_identical_files(tmp_path):
    make_tiny("sd", str(tmp_path / "a"))
    make_tiny("sd", str(tmp_path / "b"))
    make_tiny("sd", str(tmp_path / "c"), "--seed", "1")
    first, second, other_seed = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert first == second
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"} <= set(first)
    assert first["unet/diffusion_pytorch_model.safetensors"] != other_seed["unet/diffusion_pytorch_model.safetensors"]


def test_loads_offline_with_sd15_structure(tiny_sd, monkeypatch):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.scheduler.config.skip_prk_steps
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert len(ids) == 7  # start, five one-token words, end
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert all(oct(path.stat().st_mode)[-3:] == "644" for path in Path(tiny_sd).rglob("*") if path.is_file())
