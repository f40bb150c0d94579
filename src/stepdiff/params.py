"""Validation of the public generation inputs; every error names the field, the value and what is allowed."""

from __future__ import annotations

import io
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .settings import Settings


class InvalidInput(ValueError):
    """A request input is missing or out of range; the message names the field and what is allowed."""


@dataclass(frozen=True)
class GenerationParams:
    """One request's validated sampling parameters (the public ``txt2img`` inputs)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str
    true_cfg_scale: float = 1.0
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale) in the request's order


@dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline accepts, read from its configs without loading weights."""

    pipeline_class: str
    default_height: int
    default_width: int
    size_multiple: int
    default_steps: int
    default_guidance_scale: float
    default_scheduler: str
    schedulers: tuple[str, ...]
    min_steps: int = 1
    min_steps_reason: str = ""
    default_true_cfg_scale: float = 1.0
    size_multiple_reason: str = "the VAE factor"


SEED_LIMIT = 2**63
OUTPUT_FORMATS = ("raw", "png", "jpeg")
DEFAULT_JPEG_QUALITY = 90
PARAM_NAMES = (
    "prompt",
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "height",
    "width",
    "scheduler",
    "lora",
    "lora_scale",
)
LORA_SCALE_LIMIT = 10.0


def scalar(raw: Mapping[str, np.ndarray], name: str) -> object | None:
    """The single element of input ``name``, or None when the input is absent."""
    array = raw.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInput(f"{name}: expected exactly one value (shape [1]), got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def text(raw: Mapping[str, np.ndarray], name: str, max_bytes: int) -> str | None:
    """A UTF-8 string input of at most ``max_bytes`` bytes."""
    value = scalar(raw, name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise InvalidInput(f"{name}: expected BYTES (a UTF-8 string), got {type(value).__name__}")
    if len(value) > max_bytes:
        raise InvalidInput(f"{name}: {len(value)} bytes is over the limit of {max_bytes} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(f"{name}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def integer(raw: Mapping[str, np.ndarray], name: str, default: int, low: int, high: int, why: str = "") -> int:
    """An integer input within [low, high]; ``why`` explains the range in the error."""
    value = scalar(raw, name)
    if value is None:
        return default
    if not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise InvalidInput(f"{name}={int(value)} is out of range: allowed {low}..{high}" + (f" ({why})" if why else ""))
    return int(value)


def real(raw: Mapping[str, np.ndarray], name: str, default: float, low: float, high: float) -> float:
    """A finite float input within [low, high]."""
    value = scalar(raw, name)
    if value is None:
        return default
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInput(f"{name}={value} is out of range: allowed a finite number in [{low}, {high}]")
    return value


def image_side(raw: Mapping[str, np.ndarray], name: str, default: int, info: PipelineInfo, settings: Settings) -> int:
    """``height`` or ``width``: a positive multiple of the pipeline's size multiple."""
    value = integer(raw, name, default, 1, settings.max_pixels)
    if value % info.size_multiple:
        raise InvalidInput(
            f"{name}={value} is not a multiple of {info.size_multiple}, which {info.pipeline_class} requires "
            f"({info.size_multiple_reason})"
        )
    return value


def parse_generation_params(raw: Mapping[str, np.ndarray], info: PipelineInfo, settings: Settings) -> GenerationParams:
    """Validate the ``txt2img`` inputs (absent optional inputs take the pipeline's defaults)."""
    prompt = text(raw, "prompt", settings.max_prompt_bytes)
    if prompt is None:
        raise InvalidInput("prompt: required input is missing (an empty string is allowed)")
    height = image_side(raw, "height", info.default_height, info, settings)
    width = image_side(raw, "width", info.default_width, info, settings)
    if height * width > settings.max_pixels:
        raise InvalidInput(
            f"height x width = {height}x{width} = {height * width} pixels is over the limit of {settings.max_pixels}"
        )
    scheduler = text(raw, "scheduler", 256) or info.default_scheduler
    if scheduler not in info.schedulers:
        raise InvalidInput(
            f"scheduler={scheduler!r} is not supported by {info.pipeline_class}: allowed {', '.join(info.schedulers)}"
        )
    seed = integer(raw, "seed", -1, 0, SEED_LIMIT - 1)
    steps = integer(
        raw, "num_inference_steps", info.default_steps, info.min_steps, settings.max_steps, info.min_steps_reason
    )
    return GenerationParams(
        prompt=prompt,
        negative_prompt=text(raw, "negative_prompt", settings.max_prompt_bytes),
        seed=seed if seed >= 0 else secrets.randbelow(SEED_LIMIT),
        num_inference_steps=steps,
        guidance_scale=real(raw, "guidance_scale", info.default_guidance_scale, 0.0, 100.0),
        height=height,
        width=width,
        scheduler=scheduler,
        true_cfg_scale=real(raw, "true_cfg_scale", info.default_true_cfg_scale, 0.0, 100.0),
        loras=lora_inputs(raw, settings),
    )


def lora_inputs(raw: Mapping[str, np.ndarray], settings: Settings) -> tuple[tuple[str, float], ...]:
    """``lora`` (adapter names) and ``lora_scale`` (one scale each, 1.0 when absent) as (name, scale) pairs."""
    names_array, scales_array = raw.get("lora"), raw.get("lora_scale")
    names = [] if names_array is None else list(names_array.reshape(-1))
    if not names:
        if scales_array is not None and scales_array.size:
            raise InvalidInput("lora_scale: given without lora (one scale per adapter named in lora)")
        return ()
    loaded = settings.lora_paths()
    decoded = []
    for value in names:
        name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if name not in loaded:
            allowed = ", ".join(sorted(loaded)) or "none (start the server with --lora NAME=PATH)"
            raise InvalidInput(f"lora: unknown adapter {name!r}: loaded {allowed}")
        if name in decoded:
            raise InvalidInput(f"lora: adapter {name!r} is named twice")
        decoded.append(name)
    if len(decoded) > settings.max_loras_per_request:
        raise InvalidInput(
            f"lora: {len(decoded)} adapters is over the limit of {settings.max_loras_per_request} per request "
            "(--max-loras-per-request)"
        )
    scales = [1.0] * len(decoded) if scales_array is None else [float(v) for v in scales_array.reshape(-1)]
    if len(scales) != len(decoded):
        raise InvalidInput(
            f"lora_scale: {len(scales)} given, {len(decoded)} expected (one per adapter named in lora, or none "
            "for 1.0 each)"
        )
    for scale in scales:
        if not math.isfinite(scale) or abs(scale) > LORA_SCALE_LIMIT:
            raise InvalidInput(
                f"lora_scale={scale} is out of range: allowed a finite number in "
                f"[{-LORA_SCALE_LIMIT}, {LORA_SCALE_LIMIT}]"
            )
    return tuple(zip(decoded, scales, strict=True))


@dataclass(frozen=True)
class OutputOptions:
    """How txt2img returns the image: ``raw`` (UINT8 ``image``), or an encoded file in ``image_bytes``."""

    output_format: str = "raw"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY


def parse_output_options(raw: Mapping[str, np.ndarray]) -> OutputOptions:
    """``output_format`` (raw, png or jpeg) and ``jpeg_quality`` (1..100, jpeg only)."""
    output_format = text(raw, "output_format", 16) or "raw"
    if output_format not in OUTPUT_FORMATS:
        raise InvalidInput(f"output_format={output_format!r}: allowed {', '.join(OUTPUT_FORMATS)}")
    quality = integer(raw, "jpeg_quality", DEFAULT_JPEG_QUALITY, 1, 100)
    return OutputOptions(output_format, quality)


def encode_image(image: np.ndarray, options: OutputOptions) -> bytes:
    """``image`` [H, W, 3] uint8 as a PNG (lossless: it decodes to exactly ``image``) or JPEG file."""
    buffer = io.BytesIO()
    if options.output_format == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=options.jpeg_quality)
    return buffer.getvalue()
