"""LoRA adapters per request, through the real server: each request alone equals diffusers with
``load_lora_weights`` + ``set_adapters``; no adapter gives the base image, also after adapter requests;
bad inputs are INVALID_ARG naming the field; concurrent requests with different settings stay close to
their solo images."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import final_latents_of_mixes, reference_image, reference_pipeline, running_server, start_launcher
from PIL import Image
from test_batching import psnr
from tritonclient.utils import InferenceServerException

from stepdiff.server import free_ports
from stepdiff.tiny import make_tiny_lora

OPTIONS = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64, scheduler="EulerDiscreteScheduler")


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory) -> dict[str, str]:
    """Three random LoRAs: two for the UNet (one loaded from --lora-dir), one also for the text encoder."""
    root = tmp_path_factory.mktemp("loras")
    (root / "dir").mkdir()
    return {
        "style-a": str(make_tiny_lora(tiny_sd, root / "style-a", seed=1)),
        "style_b": str(make_tiny_lora(tiny_sd, root / "dir" / "style_b", seed=2)),
        "words": str(make_tiny_lora(tiny_sd, root / "words", seed=3, text_encoder=True)),
    }


@pytest.fixture(scope="module")
def lora_server(tiny_sd, loras, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("lora-logs") / "tritonserver.log"
    flags = ["--lora", f"style-a={loras['style-a']}", "--lora", f"words={loras['words']}"]
    flags += ["--lora-dir", str(Path(loras["style_b"]).parent), "--max-loras-per-request", "2"]
    [openai_port] = free_ports(1)
    with running_server(tiny_sd, log_file, *flags, "--openai-port", str(openai_port)) as server:
        server.openai_url = f"http://127.0.0.1:{openai_port}/v1"
        yield server


@pytest.fixture(scope="module")
def lora_reference(tiny_sd, loras):
    """StableDiffusionPipeline with every adapter loaded as diffusers does, and one without any."""
    from diffusers import StableDiffusionPipeline

    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    with_loras = reference_pipeline(StableDiffusionPipeline, tiny_sd, **kwargs)
    for name, path in loras.items():
        with_loras.load_lora_weights(path, adapter_name=name)
    return with_loras, reference_pipeline(StableDiffusionPipeline, tiny_sd, **kwargs)


def diffusers_image(references, prompt: str, seed: int, setting: tuple[tuple[str, float], ...]) -> np.ndarray:
    with_loras, base = references
    if not setting:
        return reference_image(base, prompt, seed, **OPTIONS)
    with_loras.set_adapters([name for name, _ in setting], adapter_weights=[scale for _, scale in setting])
    return reference_image(with_loras, prompt, seed, **OPTIONS)


def served(
    server, prompt: str, seed: int, setting: tuple[tuple[str, float], ...], protocol: str = "grpc", steps: int = 4
):
    lora = {"lora": [name for name, _ in setting], "lora_scale": [scale for _, scale in setting]} if setting else {}
    return server.txt2img(prompt, protocol, seed=seed, **{**OPTIONS, "num_inference_steps": steps}, **lora)[0]


SETTINGS = [
    (("style-a", 1.0),),
    (("style_b", 0.6),),
    (("words", 1.0),),  # text encoder and UNet weights
    (("style-a", 0.7), ("style_b", -0.5)),  # two adapters on one request
    (("words", 0.5), ("style-a", 1.2)),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: "+".join(f"{n}@{s}" for n, s in setting))
def test_a_request_alone_equals_diffusers_with_set_adapters(lora_server, lora_reference, setting):
    image = served(lora_server, "a red cat", 11, setting)
    expected = diffusers_image(lora_reference, "a red cat", 11, setting)
    assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected.astype(int)).max()}"
    assert not np.array_equal(image, diffusers_image(lora_reference, "a red cat", 11, ()))  # the adapter acts


def test_no_adapter_gives_the_base_image_before_and_after_adapter_requests(lora_server, lora_reference):
    base = diffusers_image(lora_reference, "a blue car", 5, ())
    assert np.array_equal(served(lora_server, "a blue car", 5, (), "http"), base)
    for setting in SETTINGS[:3]:
        served(lora_server, "a blue car", 5, setting)
    assert np.array_equal(served(lora_server, "a blue car", 5, (), "http"), base)
    assert np.array_equal(served(lora_server, "a blue car", 5, ()), base)


def test_the_openai_images_api_passes_the_lora_fields_on(lora_server, tiny_sd):
    """``lora`` / ``lora_scale`` as extra fields of /v1/images/generations (a list, or one value) give the
    image txt2img gives with the same adapters."""
    from openai import OpenAI

    client = OpenAI(base_url=lora_server.openai_url, api_key="unused", max_retries=0)
    setting = (("style-a", 0.7), ("style_b", -0.5))
    extra = {"seed": 12, "num_inference_steps": 4, "guidance_scale": 7.5, "scheduler": OPTIONS["scheduler"]}
    for lora, scale in ((["style-a", "style_b"], [0.7, -0.5]), ("style-a", 0.7)):
        result = client.images.generate(
            model=str(tiny_sd), prompt="a cat", size="64x64", extra_body={**extra, "lora": lora, "lora_scale": scale}
        )
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
        expected = served(lora_server, "a cat", 12, setting if isinstance(lora, list) else setting[:1])
        assert np.array_equal(pixels, expected)


def test_the_loaded_adapters_are_listed_in_the_model_config(lora_server):
    _, client = lora_server.client("http")
    with client:
        for model in ("text_encoder", "denoise_step"):
            parameters = client.get_model_config(model)["parameters"]
            assert parameters["lora_adapters"]["string_value"] == "style-a,words,style_b"


def test_requests_are_counted_per_adapter(lora_server):
    before = lora_server.metric("stepdiff_lora_requests_total")
    served(lora_server, "a cat", 1, (("style-a", 1.0), ("words", 1.0)))
    assert lora_server.metric("stepdiff_lora_requests_total") - before == 2


@pytest.mark.parametrize(
    ("lora", "scales", "message"),
    [
        (["nope"], None, "lora: unknown adapter 'nope': loaded style-a, style_b, words"),
        (["style-a"], [float("nan")], "lora_scale=nan is out of range: allowed a finite number in [-10.0, 10.0]"),
        (["style-a"], [11.0], "lora_scale=11.0 is out of range"),
        (["style-a", "style_b"], [1.0], "lora_scale: 1 given, 2 expected (one per adapter named in lora"),
        (["style-a", "style_b", "words"], None, "lora: 3 adapters is over the limit of 2 per request"),
        (["style-a", "style-a"], None, "lora: adapter 'style-a' is named twice"),
    ],
)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_lora_inputs_are_invalid_arguments_naming_the_field(lora_server, lora, scales, message, protocol):
    options = {"lora": lora} | ({"lora_scale": scales} if scales else {})
    with pytest.raises(InferenceServerException) as caught:
        lora_server.txt2img("a cat", protocol, seed=1, num_inference_steps=2, **options)
    assert message in caught.value.message()
    assert "INVALID_ARG" in str(caught.value.status()) or caught.value.status() == "400"
    assert lora_server.metric("stepdiff_active_sequences") == 0


def test_concurrent_requests_with_different_settings_share_forwards_and_stay_close_to_solo(lora_server):
    """8 requests over 4 (adapter, scale) settings at once, 2 per setting. Different settings share
    forwards: some forward holds more requests than any one setting has. Each image is within 40 dB of
    the same request alone."""
    jobs = [(f"prompt {index}", 30 + index, MIXED_SETTINGS[index % 4], "grpc", 8) for index in range(8)]
    solo = [served(lora_server, *job) for job in jobs]
    sizes_before = batch_sizes(lora_server)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: served(lora_server, *job), jobs))
    for alone, batched in zip(solo, together, strict=True):
        assert psnr(alone, batched) >= 40
    sizes = {bound: count - sizes_before[bound] for bound, count in batch_sizes(lora_server).items()}
    assert sizes["+Inf"] > sizes["2"], f"no forward held more than 2 requests (forwards by size: {sizes})"


def batch_sizes(server) -> dict[str, float]:
    """The ``stepdiff_denoise_batch_size`` histogram: forwards with at most ``le`` requests, per bound."""
    return {bound: server.metric("stepdiff_denoise_batch_size_bucket", le=bound) for bound in ("2", "+Inf")}


def test_make_tiny_lora_is_reproducible(tiny_sd, tmp_path, loras):
    command = [sys.executable, "-m", "stepdiff", "make-tiny", "lora", str(tiny_sd), str(tmp_path / "again")]
    subprocess.run([*command, "--seed", "1"], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    again = tmp_path / "again"
    digest = [
        hashlib.sha256((folder / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
        for folder in (again, Path(loras["style-a"]))
    ]
    assert digest[0] == digest[1]
    with_text_encoder = make_tiny_lora(tiny_sd, tmp_path / "te", seed=1, text_encoder=True)
    from safetensors.torch import load_file

    keys = load_file(with_text_encoder / "pytorch_lora_weights.safetensors").keys()
    assert any(key.startswith("text_encoder.") for key in keys) and any(key.startswith("unet.") for key in keys)
    assert torch.is_tensor(next(iter(load_file(again / "pytorch_lora_weights.safetensors").values())))


def test_a_lora_that_does_not_fit_stops_the_server_at_start(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other-model.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8)}, bad)
    process, _ = start_launcher(tiny_sd, tmp_path / "tritonserver.log", "--lora", f"other={bad}")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"--lora other={bad}: key 'unet.no_such_block.to_q.lora_A.weight' names no module of the unet" in output


def test_a_lora_file_that_is_not_safetensors_stops_the_launcher_before_triton_starts(tiny_sd, tmp_path):
    """Read at the launcher (a header, no torch): a bad file named with its flag at once, not by the models'
    loads 30 s later."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    process, _ = start_launcher(tiny_sd, tmp_path / "tritonserver.log", "--lora", f"g={garbage}")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert f"stepdiff: error: denoise_step: lora: g={garbage}: not a safetensors file" in output
    assert "starting tritonserver" not in output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora", "Big=/nonexistent"], "adapter name 'Big' (/nonexistent) is not allowed: use [a-z0-9_-]+"),
        (["--lora", "a=/nonexistent"], "lora: a=/nonexistent: no such file or directory"),
        (["--lora", "nameonly"], "lora='nameonly': expected NAME=PATH"),
    ],
)
def test_bad_lora_flags_stop_the_launcher_naming_them(tiny_sd, tmp_path, flags, message):
    process, _ = start_launcher(tiny_sd, tmp_path / "tritonserver.log", *flags)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and message in output, output


def test_sdxl_with_a_text_encoder_lora_equals_diffusers_in_process(tiny_sdxl, tmp_path):
    """SDXL loads LoRAs like SD (UNet and text encoders); the three stages in one process, as served."""
    from diffusers import StableDiffusionXLPipeline

    from stepdiff.adapters import GenerationParams, Stage, load_adapter
    from stepdiff.engine import StepCall, StepEngine

    path = str(make_tiny_lora(tiny_sdxl, tmp_path / "xl", seed=4, text_encoder=True))
    cpu = torch.device("cpu")
    encoder, denoiser, decoder = (
        load_adapter(str(tiny_sdxl), stage, cpu, torch.float32, {"xl": path})
        for stage in (Stage.TEXT_ENCODER, Stage.DENOISE, Stage.DECODE)
    )
    engine = StepEngine(denoiser, 8, 8, 600.0)
    pipe = reference_pipeline(StableDiffusionXLPipeline, tiny_sdxl)
    pipe.load_lora_weights(path, adapter_name="xl")
    pipe.set_adapters(["xl"], adapter_weights=[0.8])
    params = GenerationParams("a red cat", None, 5, 3, 5.0, 64, 64, "EulerDiscreteScheduler", loras=(("xl", 0.8),))
    with torch.inference_mode():
        encoder.activate_loras(params.loras)
        engine.run([StepCall(1, start=True, params=params, conditioning=encoder.encode_prompt(params))])
        while not (result := engine.run([StepCall(1)])[0]).done:
            assert result.error is None
        image = decoder.decode(result.latents)[0]
    expected = reference_image(
        pipe, params.prompt, 5, "EulerDiscreteScheduler", num_inference_steps=3, height=64, width=64
    )
    assert np.array_equal(image, expected), f"max abs diff {np.abs(image.astype(int) - expected.astype(int)).max()}"


MIXED_SETTINGS = [(), (("style-a", 1.0),), (("style_b", 0.6),), (("words", 1.0), ("style-a", -0.5))]


@pytest.fixture(scope="module")
def lora_denoiser(tiny_sd, loras):
    from stepdiff.adapters import Stage, load_adapter

    return load_adapter(str(tiny_sd), Stage.DENOISE, torch.device("cpu"), torch.float32, loras)


def mixed_forward_matching_each_row_alone(denoiser, key, batch: dict, settings) -> torch.Tensor:
    """One mixed forward of ``batch`` with row i under ``settings[i]``; asserts each row equals the same
    batch run by PEFT under that row's setting (to float rounding; exactly for a row without adapters)."""
    from stepdiff.adapters.base import lora_key, mixed_lora_key
    from stepdiff.adapters.mixed_lora import LORA_SCALES

    scales = torch.cat([denoiser.mixed_lora.scale_row(setting, torch.device("cpu")) for setting in settings])
    with torch.inference_mode():
        mixed = denoiser.denoise(mixed_lora_key(key), {**batch, LORA_SCALES: scales})
        for row, setting in enumerate(settings):
            alone = denoiser.denoise(lora_key(setting, key), batch)[row]
            if setting:
                torch.testing.assert_close(mixed[row], alone, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(mixed[row], alone)
    return mixed


def test_one_forward_gives_each_row_its_own_lora_setting(lora_denoiser):
    """Rows of four settings (none, one adapter, another at 0.6, two adapters) in one mixed forward equal,
    row by row, the same batch run by PEFT under that row's setting: to float rounding, and exactly for the
    row without adapters. Run twice with the settings reversed: nothing depends on a row's position."""
    [template] = lora_denoiser.warmup_rows(64, 64)
    generator = torch.Generator().manual_seed(0)
    batch = {
        name: torch.randn((4, *value.shape[1:]), generator=generator) if name != "timestep" else torch.full((4,), 500.0)
        for name, value in template.tensors.items()
    }
    for settings in (MIXED_SETTINGS, MIXED_SETTINGS[::-1]):
        mixed = mixed_forward_matching_each_row_alone(lora_denoiser, template.key, batch, settings)
        assert not torch.equal(mixed[0], mixed[1])  # the adapters do change their rows


def test_adapters_that_cannot_be_stacked_fall_back_to_forwards_per_setting(tiny_sd, loras, monkeypatch):
    from stepdiff.adapters import Stage, load_adapter, mixed_lora

    monkeypatch.setattr(mixed_lora, "MAX_STACKED_RANK", 4)  # rank 4 each: three stacked exceed it
    denoiser = load_adapter(str(tiny_sd), Stage.DENOISE, torch.device("cpu"), torch.float32, loras)
    assert denoiser.mixed_lora is None


def test_compiled_forwards_mix_any_settings_without_compiling_again(tiny_sd, lora_denoiser):
    """With ``--denoiser compiled`` every forward with adapters takes the stacked path, whose scales are an
    input: once the first forward has compiled, other mixes, other scales and one setting for all compile
    nothing again (Dynamo's ``error_on_recompile``), and every request's final latents equal those of the
    eager runner (which runs one setting through PEFT) to float rounding."""
    import torch._dynamo

    from stepdiff.adapters import GenerationParams, Stage, load_adapter
    from stepdiff.runner import DenoiserRunner

    cpu = torch.device("cpu")
    encoder = load_adapter(str(tiny_sd), Stage.TEXT_ENCODER, cpu, torch.float32)
    options = (2, 7.5, 64, 64, "EulerDiscreteScheduler")
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(GenerationParams("a cat", None, 0, *options))
    mixes = [MIXED_SETTINGS[:3], [MIXED_SETTINGS[3], (), (("style-a", 0.3),)], [(("style_b", 0.9),)] * 3]

    def latents(mode: str, chosen: list, first: int = 0) -> list:
        runner = runners.setdefault(mode, DenoiserRunner(lora_denoiser.denoise, cpu, mode))
        return final_latents_of_mixes(lora_denoiser, runner, conditioning, options, chosen, first)

    runners: dict[str, DenoiserRunner] = {}
    eager = latents("eager", mixes)  # leaves style_b active in PEFT: the compiled forwards must not mind
    compiled = latents("compiled", mixes[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled += latents("compiled", mixes[1:], first=1)
    for eager_mix, compiled_mix in zip(eager, compiled, strict=True):
        for one, other in zip(eager_mix, compiled_mix, strict=True):
            torch.testing.assert_close(other, one, rtol=1e-4, atol=1e-5)
