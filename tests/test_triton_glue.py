"""txt2img's glue to Triton, in-process: a stand-in for ``triton_python_backend_utils`` (importable only inside
Triton) with the few names used here. The status a failed stage call gets, and what ``finalize`` does with
the generations still in flight."""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

GLUE = ("stepdiff.triton_io", "stepdiff.generation_model")


def backend_utils() -> types.ModuleType:
    """The names of triton_python_backend_utils that triton_io.bls_call and GenerationModel.finalize use."""
    utils = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        INTERNAL, UNAVAILABLE = "INTERNAL", "UNAVAILABLE"

        def __init__(self, message: str, code: str = INTERNAL):
            self._message, self._code = message, code

        def message(self) -> str:
            return self._message

        def code(self) -> str:
            return self._code

    class InferenceResponse:
        def __init__(self, output_tensors: tuple = (), error: TritonError | None = None):
            self._outputs, self._error = output_tensors, error

        def has_error(self) -> bool:
            return self._error is not None

        def error(self) -> TritonError | None:
            return self._error

        def output_tensors(self) -> list:
            return list(self._outputs)

    class InferenceRequest:
        """A BLS request; every one gets ``answer``."""

        answer = InferenceResponse()

        def __init__(self, **kwargs: Any):
            self.kwargs = kwargs

        async def async_exec(self) -> InferenceResponse:
            return InferenceRequest.answer

    utils.TritonError = TritonError
    utils.InferenceResponse = InferenceResponse
    utils.InferenceRequest = InferenceRequest
    utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
    return utils


@pytest.fixture
def glue(monkeypatch) -> Iterator[tuple[types.ModuleType, types.ModuleType, types.ModuleType]]:
    """(the stand-in utils, triton_io, generation_model), imported against the stand-in; forgotten after."""
    utils = backend_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    for name in GLUE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield utils, *(importlib.import_module(name) for name in GLUE)
    for name in GLUE:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "message, code",
    [
        # Ctrl-C (or a restart) while generations run: the stopping server refuses their next step call
        ("Model denoise_step - Error when running inference: Server not ready", "UNAVAILABLE"),
        ("Stub process 'denoise_step_0_0' is not healthy.", "UNAVAILABLE"),  # its process died (or was aborted)
        ("server busy: 256 generations in progress (limit 256); retry later", "UNAVAILABLE"),
        ("RuntimeError: step 3 of a sequence at step 2", "INTERNAL"),
    ],
)
def test_a_failed_stage_call_is_unavailable_when_a_retry_can_succeed(glue, message, code):
    utils, triton_io, _ = glue
    utils.InferenceRequest.answer = utils.InferenceResponse(error=utils.TritonError(message))
    with pytest.raises(triton_io.StageError) as raised:
        asyncio.run(triton_io.bls_call("denoise_step", {}, ["latents"]))
    assert raised.value.code == code
    assert str(raised.value) == f"denoise_step: {message}"


def test_finalize_waits_for_generations_in_flight_then_cancels_the_rest(glue, monkeypatch):
    _, _, generation_model = glue
    monkeypatch.setattr(generation_model, "FINALIZE_GRACE", 1.0)
    model = generation_model.GenerationModel()  # the parts finalize touches, without Triton's initialize
    model.executor, model.stage_calls = None, {}
    model.cancelled = model.cancelled_family = model.failed = model.failed_family = model.stage_calls_family = object()
    model.admission = types.SimpleNamespace(close=lambda: None)
    loop = asyncio.new_event_loop()  # run as the stub runs it: run_forever in a thread of its own
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()

    async def answers_soon() -> str:
        await asyncio.sleep(0.3)
        return "answered"

    async def never_answers() -> None:
        await asyncio.Event().wait()

    async def start() -> list[asyncio.Task]:
        return [asyncio.ensure_future(answers_soon()), asyncio.ensure_future(never_answers())]

    quick, hung = asyncio.run_coroutine_threadsafe(start(), loop).result()
    model.tasks = {quick, hung}
    loop.stop()  # as the stub's Finalize does from its own thread, right before the model's finalize
    began = time.monotonic()
    model.finalize()
    assert 1.0 <= time.monotonic() - began < 3.0
    assert quick.result() == "answered"
    assert hung.cancelled()
    loop_thread.join(timeout=1.0)
    assert not loop_thread.is_alive() and not loop.is_running()
    loop.close()
