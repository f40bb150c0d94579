"""The model repository ``stepdiff serve`` hands to Triton: the template, completed for one pipeline.

The conditioning tensors a family passes from text_encoder to denoise_step (names, dtypes, shapes)
are declared once, by its adapter (``conditioning``). The template's configs leave them out; the served
copy adds them as text_encoder outputs and optional denoise_step inputs, so that a new family never
touches a ``config.pbtxt``. With ``--gpus`` the served copy also gives each stage model (text_encoder,
denoise_step, vae_decode) one KIND_GPU instance per listed GPU; txt2img and txt2img_stream stay KIND_CPU,
with their template's instance count per listed GPU (each GPU's step calls come from as many processes as
on one GPU). denoise_step's sequence batcher gives an unended sequence's slot back after the same
``sequence_idle_seconds`` as denoise_step frees its state. The orchestrators get what they know of the
pipeline (``ServedPipeline``) as a config parameter, so that their processes need neither torch nor
diffusers.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from .served_pipeline import PARAMETER, ServedPipeline
from .settings import Settings, cache_folder, instance_count

if TYPE_CHECKING:  # the orchestrators import this module: torch only where it is used
    from .adapters.base import TensorSpec

TEMPLATE = Path(__file__).resolve().parent / "model_repository"  # ships in the package
PRODUCER = "text_encoder"  # outputs the conditioning
CONSUMER = "denoise_step"  # takes it on START
STAGE_MODELS = (PRODUCER, CONSUMER, "vae_decode")  # the models that run on GPUs: one instance per GPU with --gpus
ORCHESTRATORS = ("txt2img", "txt2img_stream")  # KIND_CPU: with --gpus, their instance count per GPU
TRITON_PYTHON_THREADS = 32  # the Python backend's default thread-pool-size, per model instance
PYTHON_BACKEND_THREADS_IN_ALL = 8192  # over every instance: a default pid_max is 32768


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as error:
        raise ValueError(f"{path}: not a readable Triton model config: {error}") from error


def _with_tensors(entries, specs: Sequence[TensorSpec], optional: bool) -> None:
    """Add (or replace, by name) one config entry per spec to ``entries`` (a config's input or output list)."""
    names = {spec.name for spec in specs}
    kept = [entry for entry in entries if entry.name not in names]
    del entries[:]
    entries.extend(kept)
    for spec in specs:
        entry = entries.add(name=spec.name, data_type=model_config_pb2.DataType.Value(spec.data_type), dims=spec.dims)
        if optional:
            entry.optional = True


def check_template(template: Path) -> None:
    """ValueError unless ``template`` holds the stage models' configs."""
    for model in STAGE_MODELS:
        if not (template / model / "config.pbtxt").is_file():
            raise ValueError(f"{template} is not a stepdiff model repository: {model}/config.pbtxt is missing")


def _on_gpus(config: model_config_pb2.ModelConfig, gpus: Sequence[int]) -> str:
    """Replace a stage model's instance groups with one KIND_GPU instance on each of ``gpus``; what changed."""
    del config.instance_group[:]
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    return f"one instance on each of GPUs {', '.join(map(str, gpus))}"


def _per_gpu(config: model_config_pb2.ModelConfig, gpu_count: int) -> str:
    """Multiply an orchestrator's (KIND_CPU) instance counts by ``gpu_count``; what changed."""
    for group in config.instance_group:
        group.count *= gpu_count
    return f"{sum(group.count for group in config.instance_group)} instances ({gpu_count} GPUs)"


def _idle_timeout(config: model_config_pb2.ModelConfig, seconds: float) -> str | None:
    """Set the sequence batcher's idle timeout (when a sequence's slot is given back without END) to
    ``seconds``, denoise_step's own ``sequence_idle_seconds``; what changed, None if it already was."""
    microseconds = max(1, round(seconds * 1_000_000))
    if config.sequence_batching.max_sequence_idle_microseconds == microseconds:
        return None
    config.sequence_batching.max_sequence_idle_microseconds = microseconds
    return f"Triton's sequence idle timeout at sequence_idle_seconds ({seconds:g} s)"


def write_served_repository(
    template: Path,
    target: Path,
    conditioning: Sequence[TensorSpec],
    gpus: Sequence[int] = (),
    lora_adapters: Sequence[str] = (),
    sequence_idle_seconds: float | None = None,
    served_pipeline: ServedPipeline | None = None,
) -> Path:
    """Copy ``template`` to ``target`` (replacing it) with ``conditioning`` added to the stage configs,
    when ``gpus`` are given one instance of each stage model per GPU (and the orchestrators' count per
    GPU), the names of the loaded LoRA adapters as the parameter ``lora_adapters`` of the models that
    take input ``lora`` (clients read it from the model config), denoise_step's
    ``max_sequence_idle_microseconds`` at ``sequence_idle_seconds`` when given, so that Triton gives a
    sequence's slot back when denoise_step frees its state, and ``served_pipeline`` as the orchestrators'
    parameter ``served_pipeline`` when given."""
    check_template(template)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(template, target, ignore=shutil.ignore_patterns("__pycache__"))
    for model in (*STAGE_MODELS, *ORCHESTRATORS):
        path = target / model / "config.pbtxt"
        config = read_config(path)
        changes = []
        if model == PRODUCER:
            _with_tensors(config.output, conditioning, optional=False)
            changes.append("the pipeline's conditioning")
        if model == CONSUMER:
            _with_tensors(config.input, conditioning, optional=True)
            changes.append("the pipeline's conditioning")
            if sequence_idle_seconds is not None and (idle := _idle_timeout(config, sequence_idle_seconds)):
                changes.append(idle)
        if lora_adapters and model in (PRODUCER, CONSUMER):
            config.parameters["lora_adapters"].string_value = ",".join(lora_adapters)
            changes.append("the LoRA adapters' names")
        if served_pipeline is not None and model in ORCHESTRATORS:
            config.parameters[PARAMETER].string_value = served_pipeline.to_json()
            changes.append("what they know of the pipeline")
        if gpus:
            changes.append(_on_gpus(config, gpus) if model in STAGE_MODELS else _per_gpu(config, len(gpus)))
        if changes:
            path.write_text(
                f"# Written by `stepdiff serve` from {template / model / 'config.pbtxt'}, with "
                f"{' and '.join(changes)}.\n" + text_format.MessageToString(config)
            )
    return target


def served_repository_path(http_port: int) -> Path:
    """Where ``stepdiff serve`` writes the repository of the server on ``http_port``."""
    return cache_folder() / "served" / f"model_repository-{http_port}"


def write_repository_for(
    pipeline: Path,
    http_port: int,
    template: Path | None = None,
    gpus: Sequence[int] = (),
    lora_adapters: Sequence[str] = (),
    sequence_idle_seconds: float | None = None,
) -> Path:
    """The served repository for ``pipeline`` (a resolved diffusers directory): ``template`` (default the
    packaged one) with the conditioning its adapter declares and what the orchestrators know of the
    pipeline, on ``gpus`` when given, listing ``lora_adapters``, with Triton's sequence idle timeout at
    ``sequence_idle_seconds`` when given."""
    import torch

    from .adapters import Stage, load_adapter

    adapter = load_adapter(str(pipeline), Stage.INFO, torch.device("cpu"), torch.float32)  # configs only
    target = served_repository_path(http_port)
    return write_served_repository(
        (template or TEMPLATE).resolve(),
        target,
        adapter.conditioning,
        gpus,
        lora_adapters,
        sequence_idle_seconds,
        ServedPipeline.of(adapter),
    )


def config_parameters(config: model_config_pb2.ModelConfig) -> dict[str, Any]:
    """``config``'s parameters in the shape Triton hands a model (``args["model_config"]``), for Settings.load."""
    return {"parameters": {key: {"string_value": value.string_value} for key, value in config.parameters.items()}}


def generations_admitted(repository: Path, environ: Mapping[str, str]) -> int:
    """How many generations txt2img and txt2img_stream run at once in all: what the denoise_step instances
    of ``repository`` admit together, under ``environ`` (Settings.generations_admitted)."""
    config = read_config(repository / CONSUMER / "config.pbtxt")
    instances = instance_count(json_format.MessageToDict(config, preserving_proto_field_name=True))
    return Settings.load(config_parameters(config), environ).generations_admitted(instances)


def python_backend_threads(repository: Path, environ: Mapping[str, str]) -> int:
    """The Python backend's ``thread-pool-size`` for ``repository`` under ``environ``. In Triton 2.51 every
    BLS call holds a thread of its model instance's pool in tritonserver until it is answered, and a
    response sent meanwhile (txt2img's image, txt2img_stream's progress) waits for a free one, with the
    sending model's event loop. Triton's default of 32 let one txt2img_stream instance keep 16
    generations' step calls in flight. Sized so that every admitted generation may run on one
    orchestrator model, spread over its instances (Triton hands a request to the instance that has
    waited longest; txt2img_stream runs one per GPU). The pool is per model instance, every model's: at
    most ``PYTHON_BACKEND_THREADS_IN_ALL`` threads over all instances (past that, calls wait for a
    thread, as they would in denoise_step's queue), and never fewer than Triton's default."""
    admitted = generations_admitted(repository, environ)
    needed, instances_in_all = 0, 0
    for model in (*STAGE_MODELS, *ORCHESTRATORS):
        config = read_config(repository / model / "config.pbtxt")
        instances = instance_count(json_format.MessageToDict(config, preserving_proto_field_name=True))
        instances_in_all += instances
        if model in ORCHESTRATORS:
            settings = Settings.load(config_parameters(config), environ)
            needed = max(needed, settings.bls_calls_in_flight(-(-admitted // instances)))
    return max(TRITON_PYTHON_THREADS, min(needed, PYTHON_BACKEND_THREADS_IN_ALL // instances_in_all))


def model_settings(repository: Path, environ: Mapping[str, str]) -> dict[str, Settings]:
    """The settings each model of ``repository`` will load (its config parameters under ``environ``), so
    that a bad value stops the launcher before Triton starts; errors name the model."""
    check_template(repository)
    loaded = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        try:
            loaded[path.parent.name] = Settings.load(config_parameters(read_config(path)), environ)
        except ValueError as error:
            raise ValueError(f"{path.parent.name}: {error}") from None
    return loaded


def parse_gpus(flag: str, visible: int) -> tuple[int, ...]:
    """``--gpus`` (``all`` or ids such as ``0,1``) as GPU ids, checked against the ``visible`` GPUs."""
    if visible == 0:
        raise ValueError(f"--gpus {flag}: torch sees no CUDA device on this machine (leave --gpus out to serve on CPU)")
    if flag.strip() == "all":
        return tuple(range(visible))
    items = [item.strip() for item in flag.split(",")]
    if not all(item.isdigit() for item in items):
        raise ValueError(f"--gpus {flag!r}: expected all or GPU ids separated by commas, e.g. 0,1")
    ids = tuple(int(item) for item in items)
    if len(set(ids)) < len(ids):
        raise ValueError(f"--gpus {flag}: each GPU may be listed once")
    for gpu in ids:
        if gpu >= visible:
            raise ValueError(f"--gpus {flag}: there is no GPU {gpu}; torch sees {visible} (ids 0..{visible - 1})")
    return ids


def serving_gpus(flag: str | None, settings: Settings) -> tuple[int, ...]:
    """The GPUs ``--gpus`` gives the stage models (none without the flag), with the GPUs torch sees now."""
    if flag is None:
        return ()
    import torch

    if settings.device not in ("auto", "cuda"):
        raise ValueError(
            f"--gpus {flag} places text_encoder, denoise_step and vae_decode on GPUs, but device={settings.device!r}: "
            "leave --device and STEPDIFF_DEVICE out, or set them to auto or cuda"
        )
    return parse_gpus(flag, torch.cuda.device_count() if torch.cuda.is_available() else 0)
