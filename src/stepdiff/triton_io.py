"""Glue between Triton's Python backend and the core, for every model; importable only inside a Triton
model. It imports no torch: txt2img and txt2img_stream use it and nothing else of the stage models'
(their processes stay free of torch and diffusers); the stage models' torch glue is ``stage_io``.
"""

from __future__ import annotations

import faulthandler
import gc
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .admission import ServerBusy
from .orchestrator import MODEL_PROCESS_DIED, SERVER_NOT_READY
from .params import InvalidInput
from .settings import Settings


def load_settings(args: dict[str, Any]) -> Settings:
    """Settings from the model's config parameters and STEPDIFF_* variables.

    Also turns on faulthandler, so a crash of the model's process leaves a Python traceback in
    Triton's log instead of only "stub process is not healthy".
    """
    faulthandler.enable()
    return Settings.load(json.loads(args["model_config"]))


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
    """``StageCaller`` over BLS: one async inference on another model of this server (``inputs``: Triton
    tensors, or numpy arrays)."""
    flags = 0
    if start:
        flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    if end:
        flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
    tensors = [
        value if isinstance(value, pb_utils.Tensor) else pb_utils.Tensor(name, value) for name, value in inputs.items()
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
