"""The txt2img flow: text_encoder -> denoise_step x N (one sequence) -> vae_decode.

The flow is transport-agnostic: ``StageCaller`` is implemented with BLS inside Triton
(``model_repository/txt2img``) and with tritonclient over gRPC in ``client/stepwise.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .adapters.base import GenerationParams

# (steps done, number of steps, latents after that step when a preview was asked for, else None)
ProgressCallback = Callable[[int, int, Any], Awaitable[None]]


class StageCaller(Protocol):
    """Runs one inference on another model; values are numpy arrays or transport-native tensors."""

    async def __call__(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str],
        correlation_id: int = 0,
        start: bool = False,
        end: bool = False,
    ) -> dict[str, Any]: ...


ENCODER_OUTPUTS = ["prompt_embeds", "negative_prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds_mask"]


def batch_of_one(value: object, dtype: type) -> np.ndarray:
    """A [1, 1] tensor: the stage models batch along dim 0 and take each input as shape [1]."""
    return np.array([[value]], dtype=dtype)


def params_as_inputs(params: GenerationParams) -> dict[str, np.ndarray]:
    """The generation parameters as the inputs every stage model accepts."""
    inputs = {
        "prompt": batch_of_one(params.prompt.encode(), np.object_),
        "seed": batch_of_one(params.seed, np.int64),
        "num_inference_steps": batch_of_one(params.num_inference_steps, np.int32),
        "guidance_scale": batch_of_one(params.guidance_scale, np.float32),
        "true_cfg_scale": batch_of_one(params.true_cfg_scale, np.float32),
        "height": batch_of_one(params.height, np.int32),
        "width": batch_of_one(params.width, np.int32),
        "scheduler": batch_of_one(params.scheduler.encode(), np.object_),
    }
    if params.negative_prompt is not None:
        inputs["negative_prompt"] = batch_of_one(params.negative_prompt.encode(), np.object_)
    return inputs


def host_scalar(value: Any) -> int:
    """An integer output of a stage (a Triton tensor or a numpy array)."""
    array = value.as_numpy() if hasattr(value, "as_numpy") else np.asarray(value)
    return int(array.reshape(-1)[0])


def new_correlation_id() -> int:
    """A fresh non-zero uint64 sequence id (random, so several orchestrator instances never collide)."""
    return secrets.randbits(63) + 1


class StepWaves:
    """Lines up the step calls of concurrent generations so they reach denoise_step together.

    Without it, requests split into groups that alternate on the GPU: while one group's forward runs,
    the other group's next steps queue up and form the following batch, and so on, each forward only
    partly full. Here a step goes out at once when no step is in flight; otherwise it waits until the
    wave in flight has come back (it would have queued behind that forward anyway) and then goes out
    with everyone released at the same moment. A request alone never waits; ``max_wait`` bounds the
    wait should a step hang.
    """

    def __init__(self, max_wait: float = 2.0):
        self.max_wait = max_wait
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def send(self, call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``call`` (one denoise_step request) in the next wave."""
        if self._in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.max_wait)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await call()
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


async def _direct(call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    return await call()


@dataclass
class GenerationResult:
    image: Any
    seed: int


async def generate(
    call: StageCaller,
    params: GenerationParams,
    on_step: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
    waves: StepWaves | None = None,
    preview_every: int = 0,
) -> GenerationResult | None:
    """Run one request through the three stages; returns None when cancelled between steps.

    ``on_step`` is awaited after every step, with the current latents every ``preview_every`` steps.

    The denoise sequence always ends: normally with END on the last step, otherwise (error or cancel)
    with an END carrying ``abort`` so denoise_step frees the state at once. Concurrent generations that
    share ``waves`` send their steps in step with each other (see ``StepWaves``).
    """
    inputs = params_as_inputs(params)
    conditioning = await call("text_encoder", inputs, ENCODER_OUTPUTS)
    correlation_id = new_correlation_id()
    finished = False
    try:
        first = await call("denoise_step", {**inputs, **conditioning}, ["num_steps"], correlation_id, start=True)
        num_steps = host_scalar(first["num_steps"])
        latents = None
        for index in range(num_steps):
            if is_cancelled():
                return None
            last = index == num_steps - 1
            preview = not last and preview_every > 0 and (index + 1) % preview_every == 0
            step_input = {"step": batch_of_one(index, np.int32)}
            wanted = ["latents"] if last else ["step_index", "latents"] if preview else ["step_index"]
            send = waves.send if waves is not None else _direct
            result = await send(lambda: call("denoise_step", step_input, wanted, correlation_id, end=last))
            latents = result.get("latents")
            if on_step is not None:
                await on_step(index + 1, num_steps, latents if preview else None)
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(Exception):  # the original error (or the cancel) is what matters
                await call("denoise_step", {"abort": batch_of_one(True, np.bool_)}, [], correlation_id, end=True)
    if latents is None:
        raise RuntimeError("denoise_step finished the sequence without returning latents")
    decoded = await call("vae_decode", {"latents": latents}, ["image"])
    return GenerationResult(image=decoded["image"], seed=params.seed)
