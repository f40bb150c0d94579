"""The served model repository: the template completed with the adapter's declared conditioning, and
what the orchestrators know of the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO
from google.protobuf import json_format

from stepdiff.adapters import Stage, load_adapter
from stepdiff.adapters.qwenimage import QwenImageAdapter
from stepdiff.adapters.stable_diffusion_xl import StableDiffusionXLAdapter
from stepdiff.repository import ORCHESTRATORS, read_config, write_served_repository
from stepdiff.served_pipeline import ServedPipeline

TEMPLATE = REPO / "model_repository"


def entries(config, field: str) -> dict[str, tuple[str, list[int], bool]]:
    from tritonclient.grpc import model_config_pb2

    return {
        entry.name: (
            model_config_pb2.DataType.Name(entry.data_type),
            list(entry.dims),
            getattr(entry, "optional", False),
        )
        for entry in getattr(config, field)
    }


@pytest.mark.parametrize("adapter", [StableDiffusionXLAdapter, QwenImageAdapter])
def test_conditioning_becomes_text_encoder_outputs_and_optional_denoise_step_inputs(tmp_path, adapter):
    served = write_served_repository(TEMPLATE, tmp_path / "served", adapter.conditioning)
    outputs = entries(read_config(served / "text_encoder" / "config.pbtxt"), "output")
    inputs = entries(read_config(served / "denoise_step" / "config.pbtxt"), "input")
    for spec in adapter.conditioning:
        assert outputs[spec.name] == (spec.data_type, list(spec.dims), False)
        assert inputs[spec.name] == (spec.data_type, list(spec.dims), True)
    assert len(outputs) == len(adapter.conditioning)  # the template declares none of its own
    assert {"prompt", "seed", "step", "abort"} <= set(inputs)  # the template's inputs stay
    template_config = read_config(TEMPLATE / "denoise_step" / "config.pbtxt")
    assert read_config(served / "denoise_step" / "config.pbtxt").sequence_batching == template_config.sequence_batching
    assert (served / "denoise_step" / "1" / "model.py").read_text() == (
        TEMPLATE / "denoise_step" / "1" / "model.py"
    ).read_text()


def test_served_copy_replaces_an_older_one_and_leaves_the_template_alone(tmp_path):
    before = (TEMPLATE / "text_encoder" / "config.pbtxt").read_text()
    target = tmp_path / "served"
    write_served_repository(TEMPLATE, target, QwenImageAdapter.conditioning)
    write_served_repository(TEMPLATE, target, StableDiffusionXLAdapter.conditioning)
    outputs = entries(read_config(target / "text_encoder" / "config.pbtxt"), "output")
    assert "prompt_embeds_mask" not in outputs and "pooled_prompt_embeds" in outputs
    assert (TEMPLATE / "text_encoder" / "config.pbtxt").read_text() == before


def test_a_directory_without_the_stage_models_is_refused(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.pbtxt").write_text((TEMPLATE / "text_encoder" / "config.pbtxt").read_text())
    with pytest.raises(ValueError, match=r"denoise_step/config\.pbtxt is missing"):
        write_served_repository(tmp_path, tmp_path / "served", StableDiffusionXLAdapter.conditioning)


def test_gpus_give_each_stage_model_one_instance_per_gpu(tmp_path):
    from tritonclient.grpc import model_config_pb2

    served = write_served_repository(TEMPLATE, tmp_path / "served", StableDiffusionXLAdapter.conditioning, gpus=(0, 1))
    for model in ("text_encoder", "denoise_step", "vae_decode"):
        [group] = read_config(served / model / "config.pbtxt").instance_group
        assert (group.kind, group.count, list(group.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1, [0, 1])
    for model in ("txt2img", "txt2img_stream"):  # the orchestrators stay on the CPU, as many per GPU as on one
        served_config, template = (
            read_config(served / model / "config.pbtxt"),
            read_config(TEMPLATE / model / "config.pbtxt"),
        )
        [group], [template_group] = served_config.instance_group, template.instance_group
        assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_CPU, 2 * template_group.count)
        del served_config.instance_group[:], template.instance_group[:]
        assert served_config == template  # nothing else changed
    denoise = read_config(served / "denoise_step" / "config.pbtxt")
    assert denoise.sequence_batching == read_config(TEMPLATE / "denoise_step" / "config.pbtxt").sequence_batching
    assert "pooled_prompt_embeds" in entries(denoise, "input")


def test_without_gpus_the_instance_groups_stay_the_templates(tmp_path):
    served = write_served_repository(TEMPLATE, tmp_path / "served", StableDiffusionXLAdapter.conditioning)
    for model in ("text_encoder", "denoise_step", "vae_decode", "txt2img", "txt2img_stream"):
        template_groups = read_config(TEMPLATE / model / "config.pbtxt").instance_group
        assert read_config(served / model / "config.pbtxt").instance_group == template_groups
    assert (served / "vae_decode" / "config.pbtxt").read_text() == (
        TEMPLATE / "vae_decode" / "config.pbtxt"
    ).read_text()


def test_tritons_idle_timeout_follows_sequence_idle_seconds(tmp_path):
    template = read_config(TEMPLATE / "denoise_step" / "config.pbtxt")
    assert template.sequence_batching.max_sequence_idle_microseconds == 600_000_000  # the default's 600 s
    served = write_served_repository(TEMPLATE, tmp_path / "s", (), sequence_idle_seconds=2.5)
    config_text = (served / "denoise_step" / "config.pbtxt").read_text()
    served_config = read_config(served / "denoise_step" / "config.pbtxt")
    assert served_config.sequence_batching.max_sequence_idle_microseconds == 2_500_000
    assert "Triton's sequence idle timeout at sequence_idle_seconds (2.5 s)" in config_text.splitlines()[0]
    served_config.sequence_batching.max_sequence_idle_microseconds = 600_000_000
    assert served_config.sequence_batching == template.sequence_batching  # nothing else in the batcher changed
    default = write_served_repository(TEMPLATE, tmp_path / "d", (), sequence_idle_seconds=600.0)
    assert "idle timeout" not in (default / "denoise_step" / "config.pbtxt").read_text().splitlines()[0]
    for model in ("text_encoder", "vae_decode"):  # only denoise_step has sequences
        assert "idle" not in (served / model / "config.pbtxt").read_text()


@pytest.mark.parametrize("pipeline", ["tiny_sd", "tiny_qwen"])
def test_the_orchestrators_read_back_what_they_know_of_the_pipeline(tmp_path, request, pipeline):
    """txt2img and txt2img_stream import neither torch nor diffusers: the launcher writes the pipeline's
    facts, its conditioning names and its preview map into their configs, and they read them back."""
    adapter = load_adapter(str(request.getfixturevalue(pipeline)), Stage.INFO, torch.device("cpu"), torch.float32)
    written = ServedPipeline.of(adapter)
    served = write_served_repository(TEMPLATE, tmp_path / "served", adapter.conditioning, served_pipeline=written)
    for model in ORCHESTRATORS:
        config = json_format.MessageToDict(
            read_config(served / model / "config.pbtxt"), preserving_proto_field_name=True
        )
        read = ServedPipeline.from_model_config(model, json.loads(json.dumps(config)))  # as Triton hands it over
        assert read.info == adapter.info and read.conditioning == tuple(spec.name for spec in adapter.conditioning)
        for name in ("latent_rgb_factors", "latent_rgb_bias"):
            expected, got = getattr(adapter, name), getattr(read, name)
            same = got is None if expected is None else got.dtype == expected.dtype and np.array_equal(got, expected)
            assert same, name
        for channels in (len(adapter.latent_rgb_factors), 5):  # the family's map; the first 3 channels (tiny)
            latents = np.random.default_rng(channels).standard_normal((1, channels, 5, 7)).astype(np.float16)
            preview = read.preview(latents)
            assert np.array_equal(preview, written.preview(latents)) and preview.shape == (5, 7, 3)
    for model in ("text_encoder", "denoise_step", "vae_decode"):  # only the orchestrators get it
        assert "served_pipeline" not in read_config(served / model / "config.pbtxt").parameters


def test_an_orchestrator_without_the_pipelines_facts_says_how_to_serve():
    with pytest.raises(
        ValueError, match=r"txt2img: the model config has no parameter 'served_pipeline'.*stepdiff serve"
    ):
        ServedPipeline.from_model_config("txt2img", {"parameters": {}})
