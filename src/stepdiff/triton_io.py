"""Glue between Triton's Python backend and the core; importable only inside a Triton model.

Tensors cross between models through DLPack, so GPU tensors stay on the GPU end to end. A model that
takes its inputs in host memory (``FORCE_CPU_ONLY_INPUT_TENSORS: "yes"``: denoise_step, vae_decode) gets
them there from whichever GPU produced them, and moves them to its own instance's device.
"""

from __future__ import annotations

import faulthandler
import gc
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from .adapters import Stage, StepAdapter, load_adapter
from .adapters.base import InvalidInput
from .engine import ServerBusy
from .orchestrator import MODEL_PROCESS_DIED, SERVER_NOT_READY
from .settings import Settings


def load_settings(args: dict[str, Any]) -> Settings:
    """Settings from the model's config parameters and STEPDIFF_* variables; threads pinned.

    Also turns on faulthandler, so a crash of the model's process leaves a Python traceback in
    Triton's log instead of only "stub process is not healthy".
    """
    faulthandler.enable()
    settings = Settings.load(json.loads(args["model_config"]))
    settings.apply_threads()
    return settings


def instance_device(args: dict[str, Any], settings: Settings) -> torch.device:
    """The device of this model instance (Settings.instance_device: the GPU Triton assigned it, or the
    ``device`` setting), made torch's current CUDA device. CUDA graph capture streams, events and pinned
    memory use the current device, which would otherwise stay GPU 0 in an instance on another GPU."""
    device = settings.instance_device(args["model_instance_kind"], int(args["model_instance_device_id"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def load_stage(args: dict[str, Any], stage: Stage) -> tuple[Settings, StepAdapter]:
    """A stage model's settings and its adapter, loaded on the instance's device in the settings' dtype,
    with the served LoRA adapters (the stages that run none ignore them)."""
    settings = load_settings(args)
    device = instance_device(args, settings)
    adapter = load_adapter(settings.pipeline, stage, device, settings.torch_dtype(device), settings.lora_paths())
    return settings, adapter


def release_triton_objects() -> None:
    """Free, from ``finalize``, what still refers to Triton objects (metrics the caller deleted, requests
    and tensors kept alive by reference cycles such as stored exceptions' tracebacks). Freed later, at
    interpreter exit, they crashed the model's process (segfault in the 2.51 stub).

    What is left is then frozen: the interpreter's exit skips collecting the heap of torch, diffusers and
    the weights again (1 s and more per model process, and Triton unloads a model's instances one by one).
    """
    gc.collect()
    gc.freeze()


def numpy_inputs(request: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named inputs the request carries, as host numpy arrays (absent optional inputs are absent)."""
    present = (pb_utils.get_input_tensor_by_name(request, name) for name in names)
    return {tensor.name(): tensor.as_numpy() for tensor in present if tensor is not None}


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


def triton_error(error: BaseException) -> Any:
    """The TritonError for an exception: bad input -> INVALID_ARG, overload -> UNAVAILABLE, else INTERNAL."""
    if isinstance(error, InvalidInput):
        return pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
    if isinstance(error, ServerBusy):
        return pb_utils.TritonError(str(error), pb_utils.TritonError.UNAVAILABLE)
    if isinstance(error, StageError):
        return pb_utils.TritonError(str(error), error.code)
    return pb_utils.TritonError(f"{type(error).__name__}: {error}", pb_utils.TritonError.INTERNAL)


def error_response(error: BaseException) -> Any:
    return pb_utils.InferenceResponse(error=triton_error(error))


# Errors of another model that a caller may retry, as BLS in 2.51 words them (it reports every child
# error as INTERNAL, so the message tells):
SERVER_BUSY = "server busy:"  # ServerBusy's message, e.g. denoise_step refusing a START past the limit
RETRY_LATER = (MODEL_PROCESS_DIED, SERVER_NOT_READY, SERVER_BUSY)


class StageError(RuntimeError):
    """An error returned by another model, with the status code BLS reports (INTERNAL for all in 2.51)."""

    def __init__(self, model: str, message: str, code: int):
        super().__init__(f"{model}: {message}")
        self.code = code


async def bls_call(
    model: str,
    inputs: Mapping[str, Any],
    outputs: list[str],
    correlation_id: int = 0,
    start: bool = False,
    end: bool = False,
) -> dict[str, Any]:
    """``StageCaller`` over BLS: one async inference on another model of this server."""
    flags = 0
    if start:
        flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    if end:
        flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
    tensors = [
        value if isinstance(value, pb_utils.Tensor) else output_tensor(name, value) for name, value in inputs.items()
    ]
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=tensors,
        requested_output_names=outputs,
        correlation_id=correlation_id,
        flags=flags,
    )
    response = await request.async_exec()
    if response.has_error():
        error = response.error()
        retry = any(reason in error.message() for reason in RETRY_LATER)
        code = pb_utils.TritonError.UNAVAILABLE if retry else error.code()
        raise StageError(model, error.message(), code)
    return {tensor.name(): tensor for tensor in response.output_tensors()}
