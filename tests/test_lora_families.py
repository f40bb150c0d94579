"""LoRA adapters per request for the transformer families (Flux, SD3, QwenImage), through the real server.

One server per family with three adapters (one also for the CLIP text encoder where the family's LoRA
loader has one: Flux, SD3). A request alone is byte-identical to diffusers' ``load_lora_weights`` +
``set_adapters``; a request without ``lora`` right after gives the base image; concurrent requests with
different settings share forwards and stay within 40 dB of their solo images. In process: one mixed
forward gives each row its own setting, a file that does not fit stops the load naming the key, and
``make_tiny_lora`` builds the same bytes again (and refuses a text-encoder part where diffusers has none).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_image, reference_pipeline, running_server
from test_batching import psnr
from test_lora import batch_sizes, mixed_forward_matching_each_row_alone

from stepdiff.tiny import make_tiny, make_tiny_lora

STEPS = 4
# Per family: its diffusers pipeline class, the request options, and whether its LoRAs can carry
# text-encoder weights (FluxPipeline: CLIP; StableDiffusion3Pipeline: both CLIPs; QwenImagePipeline: none)
FAMILIES = {
    "flux": ("FluxPipeline", dict(guidance_scale=3.5), True),
    "sd3": ("StableDiffusion3Pipeline", dict(guidance_scale=7.0), True),
    "qwenimage": ("QwenImagePipeline", dict(true_cfg_scale=4.0, negative_prompt="blurry"), False),
}
SETTINGS = [
    (("style-a", 1.0),),
    (("words", 0.8),),  # with text-encoder weights where the family has them
    (("style-a", 0.7), ("style_b", -0.5)),  # two adapters on one request
]
MIXED_SETTINGS = [(), (("style-a", 1.0),), (("style_b", 0.6),), (("words", 1.0), ("style-a", -0.5))]


def setting_id(setting) -> str:
    return "+".join(f"{name}@{scale}" for name, scale in setting) or "none"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipeline(family, tmp_path_factory) -> Path:
    return make_tiny(family, tmp_path_factory.mktemp("pipelines") / f"tiny-{family}")


@pytest.fixture(scope="module")
def loras(family, pipeline, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp(f"{family}-loras")
    return {
        "style-a": str(make_tiny_lora(pipeline, root / "style-a", seed=1)),
        "style_b": str(make_tiny_lora(pipeline, root / "style_b", seed=2)),
        "words": str(make_tiny_lora(pipeline, root / "words", seed=3, text_encoder=FAMILIES[family][2])),
    }


@pytest.fixture(scope="module")
def family_lora_server(family, pipeline, loras, tmp_path_factory):
    flags = [flag for name, path in loras.items() for flag in ("--lora", f"{name}={path}")]
    log_file = tmp_path_factory.mktemp(f"{family}-lora-logs") / "tritonserver.log"
    with running_server(pipeline, log_file, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def references(family, pipeline, loras):
    """The family's diffusers pipeline with every adapter loaded by ``load_lora_weights``, and one without."""
    import diffusers

    pipeline_class = getattr(diffusers, FAMILIES[family][0])
    with_loras = reference_pipeline(pipeline_class, pipeline)
    for name, path in loras.items():
        with_loras.load_lora_weights(path, adapter_name=name)
    return with_loras, reference_pipeline(pipeline_class, pipeline)


def options(family: str, steps: int = STEPS) -> dict:
    return dict(num_inference_steps=steps, height=64, width=64, **FAMILIES[family][1])


def diffusers_image(family, references, prompt: str, seed: int, setting) -> np.ndarray:
    with_loras, base = references
    if not setting:
        return reference_image(base, prompt, seed, **options(family))
    with_loras.set_adapters([name for name, _ in setting], adapter_weights=[scale for _, scale in setting])
    return reference_image(with_loras, prompt, seed, **options(family))


def served(family, server, prompt: str, seed: int, setting, protocol: str = "grpc", steps: int = STEPS) -> np.ndarray:
    lora = {"lora": [name for name, _ in setting], "lora_scale": [scale for _, scale in setting]} if setting else {}
    return server.txt2img(prompt, protocol, seed=seed, **options(family, steps), **lora)[0]


def test_a_request_alone_equals_diffusers_and_no_adapter_after_gives_the_base_image(
    family, family_lora_server, references
):
    base = diffusers_image(family, references, "a red cat", 11, ())
    assert np.array_equal(served(family, family_lora_server, "a red cat", 11, ()), base)
    for setting in SETTINGS:
        image = served(family, family_lora_server, "a red cat", 11, setting)
        expected = diffusers_image(family, references, "a red cat", 11, setting)
        difference = np.abs(image.astype(int) - expected.astype(int)).max()
        assert np.array_equal(image, expected), f"{setting_id(setting)}: max abs diff {difference}"
        assert not np.array_equal(image, base), setting_id(setting)  # the adapter acts
        assert np.array_equal(served(family, family_lora_server, "a red cat", 11, (), "http"), base)


def test_concurrent_requests_with_different_settings_share_forwards_and_stay_close_to_solo(family, family_lora_server):
    """8 requests over 4 settings at once: each within 40 dB of its solo image, and some forward holds
    more requests than any one setting has (the settings share forwards)."""
    # 12 steps: the tiny transformers are fast, the requests must overlap
    jobs = [(f"prompt {index}", 30 + index, MIXED_SETTINGS[index % 4], "grpc", 12) for index in range(8)]
    solo = [served(family, family_lora_server, *job) for job in jobs]
    sizes_before = batch_sizes(family_lora_server)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: served(family, family_lora_server, *job), jobs))
    for job, alone, batched in zip(jobs, solo, together, strict=True):
        assert psnr(alone, batched) >= 40, setting_id(job[2])
    sizes = {bound: count - sizes_before[bound] for bound, count in batch_sizes(family_lora_server).items()}
    assert sizes["+Inf"] > sizes["2"], f"no forward held more than 2 requests (forwards by size: {sizes})"
    assert family_lora_server.metric("stepdiff_active_sequences") == 0


def test_one_forward_gives_each_row_its_own_lora_setting(family, pipeline, loras):
    """The family's adapters stack (``MixedLoRA``): in one mixed forward of four rows (one request's
    rows, each with its own noise) every row equals PEFT's forward under that row's setting, exactly for
    the row without adapters."""
    from stepdiff.adapters import GenerationParams, Stage, load_adapter
    from stepdiff.adapters.base import lora_key

    cpu = torch.device("cpu")
    encoder = load_adapter(str(pipeline), Stage.TEXT_ENCODER, cpu, torch.float32)
    denoiser = load_adapter(str(pipeline), Stage.DENOISE, cpu, torch.float32, loras)
    assert denoiser.mixed_lora is not None, "the family's LoRA layers did not stack"
    scheduler = denoiser.info.default_scheduler
    params = GenerationParams("a red cat", None, 5, 2, 1.0, 64, 64, scheduler)  # no guidance: one row
    with torch.inference_mode():
        state = denoiser.prepare(1, params, encoder.encode_prompt(params))
        template = denoiser.denoiser_rows(state)[0]
    generator = torch.Generator().manual_seed(0)
    rows = len(MIXED_SETTINGS)
    batch = {name: value[:1].repeat(rows, *[1] * (value.dim() - 1)) for name, value in template.tensors.items()}
    batch["hidden_states"] = torch.randn(batch["hidden_states"].shape, generator=generator)
    mixed = mixed_forward_matching_each_row_alone(denoiser, template.key, batch, MIXED_SETTINGS)
    assert not torch.equal(mixed[1], denoiser.denoise(lora_key((), template.key), batch)[1])  # the adapters act


def test_a_lora_that_does_not_fit_stops_the_load_naming_the_key(family, pipeline, tmp_path):
    from safetensors.torch import save_file

    from stepdiff.adapters import Stage, load_adapter

    bad = tmp_path / "other-model.safetensors"
    key = "transformer.no_such_block.to_q.lora_A.weight"
    save_file({key: torch.zeros(4, 8), key.replace("lora_A", "lora_B"): torch.zeros(8, 4)}, bad)
    with pytest.raises(ValueError, match=f"--lora other={bad}: key '{key}' names no module of the transformer"):
        load_adapter(str(pipeline), Stage.DENOISE, torch.device("cpu"), torch.float32, {"other": str(bad)})


def test_make_tiny_lora_is_reproducible_with_the_family_components(family, pipeline, loras, tmp_path):
    from safetensors.torch import load_file

    again = make_tiny_lora(pipeline, tmp_path / "again", seed=3, text_encoder=FAMILIES[family][2])
    digests = [
        hashlib.sha256((Path(folder) / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
        for folder in (again, loras["words"])
    ]
    assert digests[0] == digests[1]
    prefixes = {key.split(".")[0] for key in load_file(again / "pytorch_lora_weights.safetensors")}
    assert prefixes == ({"transformer", "text_encoder"} if FAMILIES[family][2] else {"transformer"})
    if not FAMILIES[family][2]:
        with pytest.raises(ValueError, match="--text-encoder: QwenImagePipeline loads LoRA into its transformer only"):
            make_tiny_lora(pipeline, tmp_path / "te", text_encoder=True)
