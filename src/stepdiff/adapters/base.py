"""The step protocol every pipeline family implements, and the per-request state it works on.

One diffusion request runs as ``encode_prompts`` (text_encoder model, several requests per text-encoder
forward when their ``text_batch_key`` is equal), ``prepare`` then N x
(``denoiser_rows`` -> ``forward`` -> ``guide`` -> ``step``) (denoise_step model, one step per call) and
``decode`` (vae_decode model). The runner (``stepdiff.runner``) batches the rows of several requests
into one ``forward`` (the adapter's eager denoiser call), replayed as a CUDA graph on the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from ..params import GenerationParams, InvalidInput, PipelineInfo
from ..runner import Rows

if TYPE_CHECKING:
    from .mixed_lora import MixedLoRA

STEP_METHODS = (
    "text_batch_key",
    "encode_prompts",
    "prepare",
    "batch_key",
    "denoiser_rows",
    "forward",
    "guide",
    "step",
    "output_latents",
    "check_latents",
    "decode",
)


@dataclass(frozen=True)
class TensorSpec:
    """A conditioning tensor the text_encoder stage outputs and denoise_step takes on START.

    ``dims`` leave out the batch dimension; ``data_type`` is Triton's (``TYPE_FP32``, ...). The served
    model configs get their conditioning entries from these (``stepdiff.repository``).
    """

    name: str
    data_type: str
    dims: tuple[int, ...]


def text_embeddings(*names: str) -> tuple[TensorSpec, ...]:
    """Float [tokens, width] embeddings per name (prompt_embeds and the like)."""
    return tuple(TensorSpec(name, "TYPE_FP32", (-1, -1)) for name in names)


def pooled_embeddings(*names: str) -> tuple[TensorSpec, ...]:
    """Float [width] pooled embeddings per name."""
    return tuple(TensorSpec(name, "TYPE_FP32", (-1,)) for name in names)


def token_masks(*names: str) -> tuple[TensorSpec, ...]:
    """Integer [tokens] attention masks per name."""
    return tuple(TensorSpec(name, "TYPE_INT64", (-1,)) for name in names)


@dataclass
class RequestState:
    """Everything one request keeps on the model's device between step calls."""

    correlation_id: int
    params: GenerationParams
    scheduler: Any
    generator: torch.Generator
    timesteps: torch.Tensor  # on the device: what the denoiser takes
    host_timesteps: torch.Tensor  # the same on the host: what the scheduler's arithmetic takes
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    do_cfg: bool
    step_index: int = 0
    last_active: float = field(default_factory=time.monotonic)
    lora_scales: torch.Tensor | None = None  # [1, adapters] for mixed-LoRA forwards, made on first use

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]

    @property
    def host_timestep(self) -> torch.Tensor:
        return self.host_timesteps[self.step_index]


@runtime_checkable
class StepAdapter(Protocol):
    """A pipeline family, decomposed into the stages and steps the Triton models call."""

    family: ClassVar[str]
    conditioning: ClassVar[tuple[TensorSpec, ...]]  # what encode_prompts returns per request (some optional)
    # previews of output_latents without the VAE (stepdiff.served_pipeline): latent channels -> RGB
    latent_rgb_factors: ClassVar[np.ndarray | None]  # [channels, 3], or None: the first 3 channels
    latent_rgb_bias: ClassVar[np.ndarray | None]  # [3]
    info: PipelineInfo

    def text_batch_key(self, params: GenerationParams) -> Hashable:
        """Requests with equal keys can share one ``encode_prompts`` call."""

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        """Prompts of requests with one ``text_batch_key`` -> each request's conditioning tensors [1, ...]
        (negative ones only when guidance is on), in one text-encoder forward; a batch of one runs the
        pipeline's own ``encode_prompt`` call for that request."""

    def prepare(
        self, correlation_id: int, params: GenerationParams, conditioning: dict[str, torch.Tensor]
    ) -> RequestState:
        """Initial latents from the seeded generator, a fresh scheduler with its timesteps."""

    def batch_key(self, state: RequestState) -> Hashable:
        """Requests with equal keys can share one denoiser forward."""

    def denoiser_rows(self, state: RequestState) -> list[Rows]:
        """What the request adds to this step's forwards (one ``Rows`` per stock denoiser call)."""

    def load_loras(self, loras: Mapping[str, str]) -> None:
        """Load LoRA adapters (name -> path) into this stage, inactive."""
        ...

    def activate_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make the request's LoRA adapters (name, scale) active in this stage; none: base weights."""
        ...

    @property
    def mixed_lora(self) -> MixedLoRA | None:
        """The denoiser's stacked LoRA layers when rows of different LoRA settings can share a forward."""
        ...

    def denoise(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward`` under the LoRA setting the key carries (``lora_key``; ``mixed_lora_key``: per-row
        scales in ``inputs[LORA_SCALES]``): what the runner calls."""
        ...

    def forward(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The eager denoiser call on a batch of rows of one key (the runner may capture it in a graph)."""

    def guide(self, state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The request's guided model output from the outputs of its ``denoiser_rows``, in order."""

    def warmup_rows(self, height: int, width: int) -> list[Rows]:
        """Rows shaped like a guided request of this size (for capturing graphs at start; may be empty)."""

    def step(self, state: RequestState, model_output: torch.Tensor) -> None:
        """The request's own scheduler step; advances ``state.step_index``."""

    def output_latents(self, state: RequestState) -> torch.Tensor:
        """The request's current latents as ``decode`` and the previews take them: [1, channels, h, w]."""

    def check_latents(self, latents: torch.Tensor | None, max_pixels: int) -> torch.Tensor:
        """Raise InvalidInput unless ``latents`` can be decoded by this pipeline into at most ``max_pixels``."""

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents [1, ...] -> uint8 image [1, height, width, 3]."""

    def compile_decode(self) -> None:
        """Make ``decode`` run its VAE through ``torch.compile`` (``decoder=compiled``)."""

    def graph_decode(self) -> None:
        """Make ``decode`` replay its VAE from CUDA graphs (``decoder=graphs``)."""

    def graph_text_encoders(self) -> bool:
        """Make ``encode_prompts`` replay its text encoders from CUDA graphs (``encoder=graphs``) where
        their shapes recur; False where they stay eager."""

    def warmup_latents(self, height: int, width: int, count: int) -> torch.Tensor:
        """Zero latents of ``count`` requests of this size, concatenated as ``decode`` takes them."""


LORA_KEY = "lora"
MIXED_LORA_KEY = "mixed-lora"


def lora_key(loras: tuple[tuple[str, float], ...], key: Hashable) -> Hashable:
    """A denoiser key that also names the request's LoRA setting (rows of different settings never
    share a forward, and each setting has its own CUDA graphs); without LoRA the key is unchanged."""
    return (LORA_KEY, loras, key) if loras else key


def mixed_lora_key(key: Hashable) -> Hashable:
    """A denoiser key for rows of any LoRA settings, each row's scales an input (``mixed_lora``)."""
    return (MIXED_LORA_KEY, key)


def split_lora_key(key: Hashable) -> tuple[tuple[tuple[str, float], ...] | None, Hashable]:
    """(the LoRA setting, the adapter's own key) of a ``lora_key``; the setting is None for a
    ``mixed_lora_key`` (the rows carry their own)."""
    if isinstance(key, tuple) and len(key) == 3 and key[0] == LORA_KEY:
        return key[1], key[2]
    if isinstance(key, tuple) and len(key) == 2 and key[0] == MIXED_LORA_KEY:
        return None, key[1]
    return (), key


@functools.cache
def step_parameters(scheduler_class: type) -> frozenset[str]:
    """The parameter names of a scheduler class's ``step``: looked up once per class, not at every step
    of every request (``inspect.signature`` costs about 70 us of host time)."""
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def scheduler_step_kwargs(scheduler: Any, generator: torch.Generator, eta: float = 0.0) -> dict[str, Any]:
    """``eta``/``generator`` keyword arguments the scheduler's ``step`` accepts (as diffusers passes them)."""
    accepted = step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor.to(device, dtype)`` without waiting for the GPU: a host tensor goes to a CUDA device from
    pinned memory, queued behind the work already there (a copy from pageable memory first waits for
    that work to finish). A dtype change happens on the host first, as the plain copy does it."""
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device, dtype)
    return tensor.to(dtype=dtype or tensor.dtype).pin_memory().to(device, non_blocking=True)


def host_schedule(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """``timesteps`` on the host for the scheduler's own arithmetic, and the scheduler's start index set.

    With device timesteps, diffusers' schedulers stall the host at every step (CPU tables indexed with a
    device tensor, comparisons, ``nonzero`` to find the step index); with host ones they compute the same
    values without waiting for the GPU. The start index is the one the scheduler would look up itself.
    """
    host = timesteps.cpu()
    if (
        getattr(scheduler, "begin_index", None) is None
        and hasattr(scheduler, "set_begin_index")
        and hasattr(scheduler, "index_for_timestep")
    ):
        scheduler.set_begin_index(scheduler.index_for_timestep(host[0], host))
    return host


# Schedulers whose step copies host scalars to the device (UniPC: its CPU sigmas, 4 to 6 per step) and
# solves a small system on the device with torch.linalg.solve (whose error check reads the device)
HOST_SCALAR_SCHEDULERS = frozenset({"UniPCMultistepScheduler"})


class DeviceScalarsWithoutWaiting(TorchFunctionMode):
    """Within a scheduler's step: a host scalar sent to the GPU (``sigma.to(device)``) is filled there
    with its value, instead of a copy that waits for the GPU's queue, and ``torch.linalg.solve`` runs
    as ``solve_ex`` without the error check that reads the device. The same kernels and values, no stall."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].device.type == "cpu" and args[0].dim() == 0:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type == "cuda":
                return torch.full((), args[0].item(), dtype=dtype or args[0].dtype, device=device)
        if func is torch.linalg.solve:
            return torch.linalg.solve_ex(*args, **kwargs).result
        return func(*args, **kwargs)


def stall_free_step(scheduler: Any) -> contextlib.AbstractContextManager:
    """What a step of ``scheduler`` runs within so that it does not wait for the GPU."""
    return (
        DeviceScalarsWithoutWaiting()
        if type(scheduler).__name__ in HOST_SCALAR_SCHEDULERS
        else contextlib.nullcontext()
    )


def require_conditioning(conditioning: dict[str, torch.Tensor], names: list[str]) -> None:
    """InvalidInput unless every conditioning tensor in ``names`` came with the START call."""
    for name in names:
        if name not in conditioning:
            raise InvalidInput(f"{name}: required on START (the text_encoder output for this request)")


def check_latents(latents: torch.Tensor | None, channels: int, vae_scale_factor: int, max_pixels: int) -> torch.Tensor:
    """Latents of shape [1, channels, h, w] with finite values, of an image (``vae_scale_factor`` pixels
    per latent) of at most ``max_pixels``, or InvalidInput naming the problem."""
    if latents is None:
        raise InvalidInput("latents: required input is missing")
    if latents.dim() != 4 or latents.shape[0] != 1 or latents.shape[1] != channels or min(latents.shape[2:]) < 1:
        raise InvalidInput(f"latents: expected shape [1, {channels}, h, w], got {list(latents.shape)}")
    height, width = (side * vae_scale_factor for side in latents.shape[2:])
    if height * width > max_pixels:
        raise InvalidInput(
            f"latents: {list(latents.shape)} decode to {height}x{width} = {height * width} pixels, over the "
            f"limit of {max_pixels} (max_pixels)"
        )
    if not torch.isfinite(latents).all():
        raise InvalidInput("latents: contains NaN or infinity")
    return latents


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers ``output_type="np"`` floats in [0, 1] -> uint8, as the public ``image`` output defines."""
    return (images * 255).round().astype(np.uint8)
