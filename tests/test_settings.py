"""Settings precedence: a `stepdiff serve` flag beats a STEPDIFF_* variable, which beats the model's
config.pbtxt parameter, which beats the default; the launcher exports only the flags given."""

from __future__ import annotations

import argparse
import shutil

import pytest
from conftest import REPO, running_server
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException

from stepdiff.cli import add_server_arguments, settings_from_args
from stepdiff.repository import CONSUMER, config_parameters, model_settings, read_config
from stepdiff.settings import Settings

TEMPLATE = REPO / "model_repository"


def with_parameters(template, target, parameters: dict[str, str]):
    """A copy of ``template`` with ``parameters`` set in every model's config.pbtxt."""
    shutil.copytree(template, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.glob("*/config.pbtxt"):
        config = read_config(path)
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        path.write_text(text_format.MessageToString(config))
    return target


def serve_args(pipeline, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return parser.parse_args(["--pipeline", str(pipeline), *flags])


def test_flag_beats_variable_beats_config_beats_default():
    config = {"parameters": {"max_steps": {"string_value": "7"}, "max_pixels": {"string_value": "4096"}}}
    environ = {"STEPDIFF_MAX_PIXELS": "8192", "STEPDIFF_MAX_PROMPT_BYTES": "20"}
    flags = Settings.variables({"max_prompt_bytes": 30})  # what the launcher hands tritonserver for a flag

    assert Settings.load(config, {}).max_steps == 7  # config over default
    assert Settings.load(config, {}).max_pixels == 4096
    assert Settings.load(config, environ).max_pixels == 8192  # variable over config
    assert Settings.load(config, environ).max_steps == 7  # a variable only overrides its own setting
    assert Settings.load(config, {**environ, **flags}).max_prompt_bytes == 30  # flag over variable
    assert Settings.load({}, {}).max_steps == Settings.max_steps  # nothing set: the default
    assert Settings.load(config, {"STEPDIFF_MAX_STEPS": ""}).max_steps == 7  # an empty variable is unset


def test_the_templates_config_parameters_hold(tmp_path):
    """Before, the launcher exported every default as a variable, so a config value of 7 still gave 256."""
    template_config = read_config(TEMPLATE / CONSUMER / "config.pbtxt")
    assert model_settings(TEMPLATE, {})[CONSUMER].max_active_sequences == int(
        template_config.parameters["max_active_sequences"].string_value
    )
    edited = with_parameters(TEMPLATE, tmp_path / "repository", {"max_active_sequences": "7"})
    loaded = model_settings(edited, {})
    assert {settings.max_active_sequences for settings in loaded.values()} == {7}
    assert set(loaded) == {"text_encoder", "denoise_step", "vae_decode", "txt2img", "txt2img_stream"}
    assert model_settings(edited, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "9"})[CONSUMER].max_active_sequences == 9


def test_config_parameters_apply_to_their_own_model_only():
    config = read_config(TEMPLATE / CONSUMER / "config.pbtxt")
    config.parameters["max_steps"].string_value = "7"
    assert Settings.load(config_parameters(config), {}).max_steps == 7
    assert model_settings(TEMPLATE, {})["txt2img"].max_steps == Settings.max_steps


def test_the_launcher_exports_the_pipeline_and_the_flags_given_only(tiny_sd, monkeypatch):
    monkeypatch.setenv("STEPDIFF_MAX_PIXELS", "8192")  # the user's variable: left to tritonserver's environment
    settings, variables, gpus = settings_from_args(serve_args(tiny_sd, "--max-steps", "5", "--device", "cpu"))
    assert variables == {"STEPDIFF_PIPELINE": str(tiny_sd), "STEPDIFF_MAX_STEPS": "5", "STEPDIFF_DEVICE": "cpu"}
    assert (settings.max_steps, settings.max_pixels, settings.max_active_sequences) == (5, 8192, 256)
    assert gpus == ()  # no --gpus: the stage models' own instance groups


@pytest.mark.parametrize(
    ("environ", "parameters", "message"),
    [
        (
            {"STEPDIFF_MAX_STEPS": "many"},
            {},
            "setting max_steps='many' (from STEPDIFF_MAX_STEPS) is not a valid int",
        ),
        ({}, {"max_steps": "many"}, "setting max_steps='many' (from config parameter max_steps) is not a valid int"),
        ({}, {"denoiser": "fast"}, "denoiser='fast': allowed exact, compiled, eager"),
        ({}, {"decoder": "fast"}, "decoder='fast': allowed graphs, eager, compiled"),
        ({}, {"encoder": "fast"}, "encoder='fast': allowed graphs, eager"),
    ],
)
def test_a_bad_value_names_its_model_and_where_it_came_from(tmp_path, environ, parameters, message):
    repository = with_parameters(TEMPLATE, tmp_path / "repository", parameters)
    with pytest.raises(ValueError, match=r"^denoise_step: ") as raised:
        model_settings(repository, environ)
    assert message in str(raised.value)


def test_only_settings_become_variables():
    assert Settings.variables({"max_steps": 5}) == {"STEPDIFF_MAX_STEPS": "5"}
    with pytest.raises(
        ValueError,
        match="'max_step' is not a setting: allowed cpu_threads, decoder, denoiser, device, dtype, encoder, ",
    ):
        Settings.variables({"max_step": 5})


def test_served_models_follow_the_precedence(tiny_sd, tmp_path):
    """A real server: max_steps only in the configs (7), max_prompt_bytes in the configs (10) and the
    environment (20), max_pixels in the configs, the environment and a flag (16384)."""
    repository = with_parameters(
        TEMPLATE, tmp_path / "repository", {"max_steps": "7", "max_prompt_bytes": "10", "max_pixels": "4096"}
    )
    environ = {"STEPDIFF_MAX_PROMPT_BYTES": "20", "STEPDIFF_MAX_PIXELS": "8192"}
    flags = ("--model-repository", str(repository), "--max-pixels", "16384")
    with running_server(tiny_sd, tmp_path / "tritonserver.log", *flags, environ=environ) as server:
        image, _ = server.txt2img("a" * 20, num_inference_steps=7)
        assert image.shape == (64, 64, 3)
        for options, message in [
            ({"num_inference_steps": 8}, "num_inference_steps=8 is out of range: allowed 1..7"),
            ({"prompt": "a" * 21}, "prompt: 21 bytes is over the limit of 20"),
            ({"height": 136, "width": 128}, "height x width = 136x128 = 17408 pixels is over the limit of 16384"),
        ]:
            prompt = options.pop("prompt", "a cat")
            with pytest.raises(InferenceServerException) as raised:
                server.txt2img(prompt, **options)
            assert message in raised.value.message()
