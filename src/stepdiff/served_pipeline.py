"""What txt2img and txt2img_stream know of the served pipeline, without torch or diffusers.

``stepdiff serve`` reads it once from the pipeline's adapter (its configs, no weights) and writes it
into the orchestrators' model configs as the parameter ``served_pipeline`` (JSON); an orchestrator reads
it back in ``initialize``. So their processes (txt2img runs four) import neither torch nor diffusers:
they start in a fraction of the time and hold a fraction of the memory. Clients can read it too, from
the model config: the defaults, the size multiple and the schedulers the pipeline accepts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .params import PipelineInfo

PARAMETER = "served_pipeline"  # the orchestrators' model config parameter that holds it
FLOAT_ARRAYS = ("latent_rgb_factors", "latent_rgb_bias")  # numpy float32 fields, lists in the JSON


@dataclass(frozen=True)
class ServedPipeline:
    """The pipeline's public facts, the conditioning tensors text_encoder hands denoise_step (names, in
    the adapter's order) and the latent -> RGB map of its previews."""

    info: PipelineInfo
    conditioning: tuple[str, ...]
    latent_rgb_factors: np.ndarray | None = None  # [channels, 3]
    latent_rgb_bias: np.ndarray | None = None  # [3]

    @classmethod
    def of(cls, adapter: Any) -> ServedPipeline:
        """From a loaded adapter (any stage; ``Stage.INFO`` reads configs only)."""
        return cls(
            adapter.info,
            tuple(spec.name for spec in adapter.conditioning),
            adapter.latent_rgb_factors,
            adapter.latent_rgb_bias,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "info": dataclasses.asdict(self.info),
                "conditioning": list(self.conditioning),
                **{key: None if (array := getattr(self, key)) is None else array.tolist() for key in FLOAT_ARRAYS},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ServedPipeline:
        fields = json.loads(text)
        info = fields["info"]
        return cls(
            PipelineInfo(**{**info, "schedulers": tuple(info["schedulers"])}),
            tuple(fields["conditioning"]),
            *(None if fields[key] is None else np.array(fields[key], dtype=np.float32) for key in FLOAT_ARRAYS),
        )

    @classmethod
    def from_model_config(cls, model_name: str, model_config: dict[str, Any]) -> ServedPipeline:
        """Read back from the model config (``json.loads(args["model_config"])``); a clear error when the
        repository was not written by ``stepdiff serve``."""
        parameter = model_config.get("parameters", {}).get(PARAMETER)
        if parameter is None:
            raise ValueError(
                f"{model_name}: the model config has no parameter {PARAMETER!r}; serve the repository that "
                "`stepdiff serve` writes (stepdiff.repository.write_repository_for), not the template"
            )
        return cls.from_json(parameter["string_value"])

    def preview(self, latents: np.ndarray) -> np.ndarray:
        """A small uint8 RGB preview [h, w, 3] of latents [1, c, h, w], without the VAE: the family's
        latent -> RGB map, or the first 3 channels when the channel count differs (tiny pipelines)."""
        latents = latents[0].astype(np.float32)
        factors = self.latent_rgb_factors
        if factors is None or latents.shape[0] != len(factors):
            return rgb_preview(np.moveaxis(latents[:3], 0, -1))
        rgb = np.einsum("chw,cr->hwr", latents, factors)
        return rgb_preview(rgb if self.latent_rgb_bias is None else rgb + self.latent_rgb_bias)


def rgb_preview(rgb: np.ndarray) -> np.ndarray:
    """Approximate RGB in [-1, 1] from a latent-to-RGB map -> uint8 [h, w, 3]."""
    return ((rgb + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
