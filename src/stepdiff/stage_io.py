"""The stage models' torch glue to Triton's Python backend (text_encoder, denoise_step, vae_decode):
their instance's device, their adapter, and tensors in and out.

Tensors cross between models through DLPack, so GPU tensors stay on the GPU end to end. A model that
takes its inputs in host memory (``FORCE_CPU_ONLY_INPUT_TENSORS: "yes"``: denoise_step, vae_decode) gets
them there from whichever GPU produced them, and moves them to its own instance's device.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from .adapters import Stage, StepAdapter, load_adapter
from .server import keep_host_buffers_in_heap
from .settings import Settings
from .triton_io import load_settings

LOG_LINE_CHARACTERS = 500  # diffusers' truncation warning quotes the cut-off prompt text: up to max_prompt_bytes


class ShortRecords(logging.Filter):
    """Cuts a log record's message to ``LOG_LINE_CHARACTERS``, saying how much it left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > LOG_LINE_CHARACTERS:
            left_out = len(message) - LOG_LINE_CHARACTERS
            record.msg, record.args = f"{message[:LOG_LINE_CHARACTERS]}... ({left_out} more characters)", ()
        return True


def shorten_library_logs() -> None:
    """Keep diffusers' and transformers' log lines (their own handlers, on the Triton log's stderr) short:
    a long prompt's truncation warning would otherwise write the prompt's tail into the log per request."""
    for name in ("diffusers", "transformers"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(ShortRecords())


def instance_device(args: dict[str, Any], settings: Settings) -> torch.device:
    """The device of this model instance (Settings.instance_device: the GPU Triton assigned it, or the
    ``device`` setting), made torch's current CUDA device. CUDA graph capture streams, events and pinned
    memory use the current device, which would otherwise stay GPU 0 in an instance on another GPU."""
    device = settings.instance_device(args["model_instance_kind"], int(args["model_instance_device_id"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def load_stage(args: dict[str, Any], stage: Stage) -> tuple[Settings, StepAdapter]:
    """A stage model's settings (torch's threads pinned to them) and its adapter, loaded on the instance's
    device in the settings' dtype, with the served LoRA adapters (the stages that run none ignore them).
    Image-sized host buffers come from the heap (``keep_host_buffers_in_heap``); the libraries' log lines
    are kept short (``shorten_library_logs``)."""
    keep_host_buffers_in_heap()
    shorten_library_logs()
    settings = load_settings(args)
    settings.apply_threads()
    device = instance_device(args, settings)
    adapter = load_adapter(settings.pipeline, stage, device, settings.torch_dtype(device), settings.lora_paths())
    return settings, adapter


def torch_input(request: Any, name: str) -> torch.Tensor | None:
    """One input as a torch tensor on its own device, copied (request tensors die with execute).

    A GPU input lives in Triton's memory pool, which reuses it once execute returns: the copy is
    waited for here, not left queued on the stream. The input's device may be another GPU than the
    instance's (a generation's stages may run on different GPUs): the adapters move every input to
    their own device (``prepare`` and ``decode``: ``.to(self.device)``).
    """
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    copy = dlpack.from_dlpack(tensor.to_dlpack()).clone()
    if copy.is_cuda:
        torch.cuda.current_stream(copy.device).synchronize()
    return copy


def output_tensor(name: str, value: torch.Tensor | np.ndarray) -> Any:
    """A Triton output tensor; torch tensors go through DLPack (no copy to host on GPU)."""
    if isinstance(value, torch.Tensor):
        return pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(value.contiguous()))
    return pb_utils.Tensor(name, value)
