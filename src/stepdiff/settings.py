"""Settings shared by every model: read once at ``initialize`` from config parameters and environment.

Precedence, highest first:

1. a ``stepdiff serve`` flag (``--max-steps 50``): the launcher hands the flags given, and the pipeline,
   to tritonserver as ``STEPDIFF_<NAME>`` variables, replacing the user's variable of that name;
2. a ``STEPDIFF_<NAME>`` environment variable (``docker run -e``, a pod's ``env``); empty counts as unset;
3. the model's ``config.pbtxt`` parameter ``<name>``, which applies to that model only;
4. the default below.

The launcher exports nothing else (no defaults), so a config parameter holds unless a flag or a
variable sets the same value. Flags are the most explicit choice (one command line), variables come
next (one deployment), and config parameters are the repository's own defaults, shipped with the
package or a ``--model-repository``.

With ``stepdiff serve --gpus`` a stage model runs on the GPU Triton assigns its instance
(:meth:`Settings.instance_device`), and ``max_active_sequences`` holds for the server: each
``denoise_step`` instance admits its share (:meth:`Settings.sequences_per_instance`).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a torch object is made: txt2img's processes never load it
    import torch

LORA_NAME = re.compile(r"[a-z0-9_-]+")
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("exact", "compiled", "eager")  # the denoiser runner's modes (stepdiff.runner)
# The VAE decode: diffusers' eager kernels replayed from CUDA graphs, as diffusers runs them (the
# default: no gain from graphs at 512x512 on an H200, GPU-bound), or through torch.compile; the text
# encoders: replayed from graphs (the default, the same bits), or as diffusers runs them.
DECODERS = ("graphs", "eager", "compiled")
ENCODERS = ("graphs", "eager")


BLS_HEADROOM = 8  # threads beyond the step calls, for responses and the calls of generations leaving


@dataclass(frozen=True)
class Settings:
    """Serving choices and limits; every field is a config parameter and a STEPDIFF_* variable."""

    pipeline: str = ""
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int = 0
    max_batch_size: int = 0
    max_active_sequences: int = 256
    max_queue: int = 256  # generations waiting for a slot past max_active_sequences (0: refused at once)
    queue_timeout_seconds: float = 60.0
    max_steps: int = 200
    max_pixels: int = 1024 * 1024
    max_prompt_bytes: int = 4096
    sequence_idle_seconds: float = 600.0
    denoiser: str = "exact"
    encoder: str = "graphs"
    decoder: str = "eager"
    warmup: str = ""
    step_lookahead: int = 2
    lora: str = ""  # NAME=PATH;NAME=PATH (stepdiff serve --lora, repeatable)
    lora_dir: str = ""  # each *.safetensors file or subdirectory is one adapter, named after its stem
    max_loras_per_request: int = 4

    @classmethod
    def load(cls, model_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
        """Build from a Triton model config dict (its ``parameters``) and the environment, which wins."""
        parameters = (model_config or {}).get("parameters", {})
        values: dict[str, Any] = {}
        for field in fields(cls):
            source = variable(field.name)
            raw = environ.get(source) or None  # an empty variable counts as unset
            if raw is None and field.name in parameters:
                source, raw = f"config parameter {field.name}", parameters[field.name]["string_value"]
            if not raw:
                continue
            try:
                values[field.name] = type(field.default)(raw)
            except ValueError:
                raise ValueError(
                    f"setting {field.name}={raw!r} (from {source}) is not a valid {type(field.default).__name__}"
                ) from None
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def variables(cls, values: Mapping[str, Any]) -> dict[str, str]:
        """``values`` (setting name -> value, e.g. the flags given) as the STEPDIFF_* variables that carry
        them to the models."""
        known = {field.name for field in fields(cls)}
        for name in values:
            if name not in known:
                raise ValueError(f"{name!r} is not a setting: allowed {', '.join(sorted(known))}")
        return {variable(name): str(value) for name, value in values.items()}

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: allowed auto, cpu, cuda, cuda:N")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: allowed auto, {', '.join(DTYPES)}")
        for name in ("max_active_sequences", "max_steps", "max_pixels", "max_prompt_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_batch_size", "max_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        for name in ("queue_timeout_seconds", "sequence_idle_seconds"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0 and finite")
        if self.denoiser not in MODES:
            raise ValueError(f"denoiser={self.denoiser!r}: allowed {', '.join(MODES)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r}: allowed {', '.join(ENCODERS)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}: allowed {', '.join(DECODERS)}")
        self.warmup_sizes()
        if not 1 <= self.step_lookahead <= 8:
            raise ValueError(f"step_lookahead={self.step_lookahead}: allowed 1..8")
        if self.max_loras_per_request < 1:
            raise ValueError(f"max_loras_per_request={self.max_loras_per_request}: must be >= 1")
        self.lora_paths()
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

    def lora_paths(self) -> dict[str, str]:
        """The LoRA adapters to load, name -> path: ``lora`` (NAME=PATH;...) and the entries of ``lora_dir``.
        Names are ``[a-z0-9_-]+`` and unique; every path exists. Read once per value (requests ask too)."""
        return dict(lora_paths(self.lora, self.lora_dir))

    def torch_device(self) -> torch.device:
        """The device models run on: ``auto`` picks CUDA when available."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device")
        return torch.device(self.device)

    def instance_device(self, kind: str, device_id: int) -> torch.device:
        """The device of one Triton model instance, from its ``model_instance_kind`` and
        ``model_instance_device_id``: GPU ``device_id`` for a KIND_GPU instance (``stepdiff serve --gpus``),
        else :meth:`torch_device`. A bare ``cuda`` becomes torch's current GPU, so the index is known."""
        import torch

        if kind == "GPU":
            if not torch.cuda.is_available():
                raise ValueError(f"Triton placed this instance on GPU {device_id} but torch sees no CUDA device")
            return torch.device("cuda", device_id)
        device = self.torch_device()
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def torch_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """The weights' dtype: ``auto`` is float16 on CUDA and float32 on CPU (``device``, default
        :meth:`torch_device`)."""
        if self.dtype == "auto":
            return torch_dtype("float16" if (device or self.torch_device()).type == "cuda" else "float32")
        return torch_dtype(self.dtype)

    def sequences_per_instance(self, instances: int) -> int:
        """One ``denoise_step`` instance's share of ``max_active_sequences``, which holds for the server:
        ``max_active_sequences // instances``, at least 1. The shares never add up to more than the limit
        (unless the limit is below the instance count); at most ``instances - 1`` sequences of it are lost
        to rounding (none when the instances divide it, as 256 by 1, 2, 4 or 8 GPUs)."""
        return max(1, self.max_active_sequences // instances)

    def generations_admitted(self, instances: int) -> int:
        """How many generations txt2img and txt2img_stream run at once in all, with ``instances``
        denoise_step instances: what those admit together (the limit less what the shares lose to
        rounding), so that denoise_step never refuses a generation they admitted. Triton places a new
        sequence in the lowest-numbered free slot over all instances, so while at most that many run,
        every sequence sits in an instance's first share of slots."""
        return min(self.max_active_sequences, instances * self.sequences_per_instance(instances))

    def bls_calls_in_flight(self, generations: int) -> int:
        """The most BLS calls an orchestrator instance running ``generations`` has in flight at once: up to
        ``step_lookahead`` step calls each (a generation's other calls go out one at a time), and headroom
        for the responses it sends meanwhile."""
        return generations * self.step_lookahead + BLS_HEADROOM

    def apply_threads(self) -> None:
        """Pin torch's intra-op threads (results depend on the thread count on CPU)."""
        if self.cpu_threads:
            import torch

            torch.set_num_threads(self.cpu_threads)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of ``DTYPES``."""
    import torch

    return getattr(torch, name)


def cache_folder() -> Path:
    """stepdiff's cache: the Python backend it pairs, served repositories, logs, compiled kernels;
    ``$XDG_CACHE_HOME/stepdiff`` where that is set (not empty), else ``~/.cache/stepdiff``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stepdiff"


def variable(name: str) -> str:
    """The environment variable of the setting ``name``: ``STEPDIFF_<NAME>``."""
    return f"STEPDIFF_{name.upper()}"


def instance_count(model_config: Mapping[str, Any]) -> int:
    """How many instances Triton runs of a model (its config as a dict): ``count`` per instance group,
    times the GPUs listed for a KIND_GPU group (Triton lists every GPU when the config names none)."""
    total = 0
    for group in model_config.get("instance_group", []):
        count = int(group.get("count", 1))
        total += count * max(len(group.get("gpus", [])), 1) if group.get("kind") == "KIND_GPU" else count
    return max(total, 1)


def device_label(device: torch.device) -> str:
    """The ``gpu`` label of a model instance's metrics: the CUDA device index, or ``cpu``."""
    return str(device.index) if device.type == "cuda" else "cpu"


def check_safetensors_header(what: str, path: str) -> None:
    """A ``.safetensors`` file has a safetensors header (read without torch): a bad LoRA file fails here,
    named, not in the models' loads."""
    if not (path.endswith(".safetensors") and Path(path).is_file()):
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{what}: not a safetensors file ({error})") from None


@functools.cache
def lora_paths(lora: str, lora_dir: str) -> tuple[tuple[str, str], ...]:
    """(name, path) of the adapters the ``lora`` and ``lora_dir`` settings name (Settings.lora_paths)."""
    entries: list[tuple[str, str, str]] = []  # (name, path, where it came from)
    for item in filter(None, (part.strip() for part in lora.split(";"))):
        name, separator, path = item.partition("=")
        if not separator or not path:
            raise ValueError(f"lora={item!r}: expected NAME=PATH")
        entries.append((name, path, "lora"))
    if lora_dir:
        folder = Path(lora_dir)
        if not folder.is_dir():
            raise ValueError(f"lora_dir={lora_dir!r} is not a directory")
        for path in sorted(folder.iterdir()):
            if path.is_dir() or path.suffix == ".safetensors":
                entries.append((path.stem, str(path), "lora_dir"))
    paths: dict[str, str] = {}
    for name, path, source in entries:
        if not LORA_NAME.fullmatch(name):
            raise ValueError(f"{source}: adapter name {name!r} ({path}) is not allowed: use [a-z0-9_-]+")
        if name in paths:
            raise ValueError(f"{source}: adapter name {name!r} is given twice ({paths[name]} and {path})")
        if not Path(path).exists():
            raise ValueError(f"{source}: {name}={path}: no such file or directory")
        check_safetensors_header(f"{source}: {name}={path}", path)
        paths[name] = path
    return tuple(paths.items())
