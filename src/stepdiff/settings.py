"""Settings shared by every model: read once at ``initialize`` from config parameters and environment.

Precedence: a ``STEPDIFF_<NAME>`` environment variable (what ``stepdiff serve`` and ``docker run -e`` set)
overrides the model's ``config.pbtxt`` parameter ``<name>``, which overrides the default below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from .runner import MODES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    """Serving choices and limits; every field is a config parameter and a STEPDIFF_* variable."""

    pipeline: str = ""
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int = 0
    max_batch_size: int = 0
    max_active_sequences: int = 256
    max_steps: int = 200
    max_pixels: int = 1024 * 1024
    max_prompt_bytes: int = 4096
    sequence_idle_seconds: float = 600.0
    denoiser: str = "exact"
    warmup: str = ""
    step_lookahead: int = 2

    @classmethod
    def load(cls, model_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
        """Build from a Triton model config dict (its ``parameters``) and the environment."""
        parameters = (model_config or {}).get("parameters", {})
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = environ.get(f"STEPDIFF_{field.name.upper()}")
            if raw is None and field.name in parameters:
                raw = parameters[field.name]["string_value"]
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = type(field.default)(raw)
            except ValueError:
                raise ValueError(
                    f"setting {field.name}={raw!r} is not a valid {type(field.default).__name__}"
                ) from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: allowed auto, cpu, cuda, cuda:N")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: allowed auto, {', '.join(DTYPES)}")
        for name in ("max_active_sequences", "max_steps", "max_pixels", "max_prompt_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_batch_size",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.denoiser not in MODES:
            raise ValueError(f"denoiser={self.denoiser!r}: allowed {', '.join(MODES)}")
        self.warmup_sizes()
        if not 1 <= self.step_lookahead <= 8:
            raise ValueError(f"step_lookahead={self.step_lookahead}: allowed 1..8")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads={self.cpu_threads}: must be >= 0 (0 keeps torch's default)")

    def warmup_sizes(self) -> list[tuple[int, int]]:
        """``warmup`` ("512x512,768x512": height x width) as (height, width) pairs."""
        sizes = []
        for item in filter(None, (part.strip() for part in self.warmup.split(","))):
            height, _, width = item.partition("x")
            if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
                raise ValueError(
                    f"warmup={self.warmup!r}: expected sizes HEIGHTxWIDTH separated by commas, e.g. 512x512,768x512"
                )
            sizes.append((int(height), int(width)))
        return sizes

    def torch_device(self) -> torch.device:
        """The device models run on: ``auto`` picks CUDA when available."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """The weights' dtype: ``auto`` is float16 on CUDA and float32 on CPU."""
        if self.dtype == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def apply_threads(self) -> None:
        """Pin torch's intra-op threads (results depend on the thread count on CPU)."""
        if self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)

    def environment(self) -> dict[str, str]:
        """These settings as STEPDIFF_* variables (what the launcher hands to tritonserver)."""
        return {f"STEPDIFF_{field.name.upper()}": str(getattr(self, field.name)) for field in fields(self)}
