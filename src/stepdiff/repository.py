"""The model repository ``stepdiff serve`` hands to Triton: the template, completed for one pipeline.

The conditioning tensors a family passes from text_encoder to denoise_step (names, dtypes, shapes)
are declared once, by its adapter (``conditioning``). The template's configs leave them out; the served
copy adds them as text_encoder outputs and optional denoise_step inputs, so that a new family never
touches a ``config.pbtxt``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from .adapters.base import TensorSpec

TEMPLATE = Path(__file__).resolve().parent / "model_repository"  # ships in the package
PRODUCER = "text_encoder"  # outputs the conditioning
CONSUMER = "denoise_step"  # takes it on START


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


def write_served_repository(template: Path, target: Path, conditioning: Sequence[TensorSpec]) -> Path:
    """Copy ``template`` to ``target`` (replacing it) with ``conditioning`` added to the stage configs."""
    for model in (PRODUCER, CONSUMER):
        if not (template / model / "config.pbtxt").is_file():
            raise ValueError(f"{template} is not a stepdiff model repository: {model}/config.pbtxt is missing")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(template, target, ignore=shutil.ignore_patterns("__pycache__"))
    for model, field, optional in ((PRODUCER, "output", False), (CONSUMER, "input", True)):
        path = target / model / "config.pbtxt"
        config = read_config(path)
        _with_tensors(getattr(config, field), conditioning, optional)
        path.write_text(
            f"# Written by `stepdiff serve` from {template / model / 'config.pbtxt'}, with the pipeline's "
            f"conditioning.\n" + text_format.MessageToString(config)
        )
    return target


def served_repository_path(http_port: int) -> Path:
    """Where ``stepdiff serve`` writes the repository of the server on ``http_port``."""
    return Path.home() / ".cache" / "stepdiff" / "served" / f"model_repository-{http_port}"


def write_repository_for(pipeline: Path, http_port: int, template: Path | None = None) -> Path:
    """The served repository for ``pipeline`` (a resolved diffusers directory): ``template`` (default the
    packaged one) with the conditioning its adapter declares."""
    from .adapters import adapter_class

    return write_served_repository(
        (template or TEMPLATE).resolve(), served_repository_path(http_port), adapter_class(pipeline).conditioning
    )
