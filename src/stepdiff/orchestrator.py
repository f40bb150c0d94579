"""The txt2img flow: text_encoder -> denoise_step x N (one sequence) -> vae_decode.

The flow is transport-agnostic: ``StageCaller`` is what it needs from a transport; inside Triton it is
BLS (``triton_io.bls_call``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .admission import ServerStopping
from .params import GenerationParams

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
    if params.loras:  # [1, n]: one name and one scale per adapter
        inputs["lora"] = np.array([[name.encode() for name, _ in params.loras]], dtype=np.object_)
        inputs["lora_scale"] = np.array([[scale for _, scale in params.loras]], dtype=np.float32)
    return inputs


def host_scalar(value: Any) -> int:
    """An integer output of a stage (a Triton tensor or a numpy array)."""
    array = value.as_numpy() if hasattr(value, "as_numpy") else np.asarray(value)
    return int(array.reshape(-1)[0])


def new_correlation_id() -> int:
    """A fresh non-zero uint64 sequence id (random, so several orchestrator instances never collide)."""
    return secrets.randbits(63) + 1


# Errors of another model, as BLS in 2.51 words them, after which the server restarts or stops:
MODEL_PROCESS_DIED = "is not healthy"  # "Stub process '<instance>' is not healthy." (the launcher restarts)
SERVER_NOT_READY = "Server not ready"  # the server is stopping or restarting: it takes no new requests
NOTHING_TO_ABORT = (MODEL_PROCESS_DIED, SERVER_NOT_READY)
# A call of a sequence that has ended (Triton 2.51's sequence batcher: "inference request for sequence
# <id> to model 'denoise_step' must specify the START flag on the first request of the sequence")
SEQUENCE_ENDED = "must specify the START flag"


@dataclass
class GenerationResult:
    image: Any
    seed: int


async def generate(
    call: StageCaller,
    params: GenerationParams,
    conditioning_names: Sequence[str],
    on_step: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
    preview_every: int = 0,
    lookahead: int = 2,
    is_stopping: Callable[[], bool] = lambda: False,
) -> GenerationResult | None:
    """Run one request through the three stages; returns None when cancelled between steps.

    ``conditioning_names`` are the text_encoder outputs denoise_step takes on START (the adapter's
    ``conditioning``; a family returns the ones a request needs).

    ``on_step`` is awaited after every step, with the current latents every ``preview_every`` steps.

    The START call also takes the first step (``step`` 0): a sequence's calls each wait for a forward of
    denoise_step's, so a START of its own would cost every generation one forward's time more. (Under
    load a START's step runs in a small forward of its own, since Triton never batches a START with step
    calls; on 2026-12-05 a START without its step was still slower at 32 in flight: 1.4% compiled, 7%
    exact.) The second step's call goes out once START has answered: sent right behind START it would
    wait in Triton for START's forward to end, but on one H200 that bought nothing (0.96-0.99x the steps
    per second at 32 in flight, both modes, results/2026-12-05-h200-step-behind-start-ab) and such a
    call can overtake START (Triton 2.51 queues a sequence's requests after letting go of its lock).

    Up to ``lookahead`` step calls are in flight at once, so that the next step already waits in
    Triton's sequence batcher when denoise_step finishes one: the per-step round trip overlaps the GPU
    instead of following it. Calls in flight together are interchangeable ("the next step", no
    ``step`` input), since two calls sent at once may reach Triton in either order. A call that must
    see exactly its step (a preview) waits until none is in flight and goes out alone. The last step
    goes out like the others; once it is the only call in flight, an END call that takes no step goes
    out for the final latents, so that it joins the forward right after the last step's (sent once the
    last step was back, it would miss that forward and wait for the next: one forward's time more per
    generation). Should END reach Triton first, it takes the last step itself (it is "the next step,
    then the latents") and the step call after it fails (Triton refuses it, ``SEQUENCE_ENDED``, or
    cancels it when it was queued behind END): a failed last step whose END still brings the final
    latents was overtaken, while one whose END fails too raises its own error (a failed call frees the
    sequence's state, so END finds none). (END on the last step itself would make the forward it joins wait
    for the GPU to copy its latents out: at 30 steps and 32 requests, nearly every forward holds some
    request's last step.) A cancel is checked right before each call: at most ``lookahead - 1`` more
    steps run. So is ``is_stopping`` (the server is about to stop): the generation then ends the same
    way and raises ServerStopping.

    The denoise sequence always ends: normally with the END call after the last step; otherwise (a cancel, an
    error, a refused START) with an END carrying ``abort`` once the calls in flight are back. That frees
    denoise_step's state, and also the sequence's slot in Triton's sequence batcher, which only an END
    (or ``max_sequence_idle_microseconds``) frees: denoise_step freeing its own state after a failed call
    is not enough, and 1024 such sequences would fill the batcher. Not after ``NOTHING_TO_ABORT``
    errors: the server restarts or stops, and refuses the abort too (the launcher announces a stop first,
    so that generations end through ``is_stopping`` while Triton still takes their abort).
    """
    inputs = params_as_inputs(params)
    conditioning = await call("text_encoder", inputs, list(conditioning_names))
    correlation_id = new_correlation_id()
    in_flight: collections.deque[asyncio.Future] = collections.deque()
    progress = {"steps": 0}
    finished = False
    step_errors: list[str] = []

    async def denoise_call(*args: Any, **kwargs: Any) -> Any:
        """A denoise_step call whose error is kept for the abort's decision."""
        try:
            return await call("denoise_step", *args, **kwargs)
        except Exception as error:
            step_errors.append(str(error))
            raise

    async def report(num_steps: int, latents: Any = None) -> None:
        """Count one more step done and tell ``on_step``."""
        progress["steps"] += 1
        if on_step is not None:
            await on_step(progress["steps"], num_steps, latents)

    async def collect(num_steps: int, preview: bool = False) -> Any:
        """Await the oldest call in flight; report its step."""
        latents = (await in_flight.popleft()).get("latents")
        await report(num_steps, latents if preview else None)
        return latents

    try:
        first_preview = preview_every == 1
        first = await denoise_call(
            {**inputs, **conditioning, "step": batch_of_one(0, np.int32)},
            ["num_steps", "step_index", *(["latents"] if first_preview else [])],
            correlation_id,
            start=True,
        )
        num_steps = host_scalar(first["num_steps"])
        await report(num_steps, first.get("latents") if first_preview and num_steps > 1 else None)
        for index in range(1, num_steps):
            preview = index < num_steps - 1 and preview_every > 0 and (index + 1) % preview_every == 0
            alone = preview or lookahead == 1
            while in_flight and (alone or len(in_flight) >= lookahead):
                await collect(num_steps)
            if is_cancelled():  # checked right before sending: a cancel seen while waiting counts
                return None
            if is_stopping():
                raise ServerStopping(
                    f"server stopping: the generation was ended after step {progress['steps']} of {num_steps}; "
                    "retry on another server or once it is back"
                )
            if not alone:  # a "next step" call: no ``step`` input, no latents
                in_flight.append(asyncio.ensure_future(denoise_call({}, ["step_index"], correlation_id)))
                continue
            wanted = ["step_index", "latents"] if preview else ["step_index"]
            in_flight.append(
                asyncio.ensure_future(denoise_call({"step": batch_of_one(index, np.int32)}, wanted, correlation_id))
            )
            await collect(num_steps, preview)
        while len(in_flight) > 1:
            await collect(num_steps)
        if is_cancelled():  # a stopping server still takes this END, as it would take the abort
            return None
        in_flight.append(asyncio.ensure_future(denoise_call({}, ["latents"], correlation_id, end=True)))
        last_step_error: Exception | None = None
        if len(in_flight) > 1:  # the last step's call
            try:
                await collect(num_steps)
            except Exception as error:  # noqa: BLE001 - END may have come first and taken the last step
                last_step_error = error
        try:
            latents = (await in_flight.popleft()).get("latents")
        except Exception:
            if last_step_error is not None:
                raise last_step_error from None
            raise
        finished = True
        if last_step_error is not None:  # END took the last step
            await report(num_steps)
    finally:
        if not finished:
            for pending in in_flight:  # let them finish before the abort (they may still be on their way)
                with contextlib.suppress(Exception):
                    await pending
            restarting = any(reason in error for error in step_errors for reason in NOTHING_TO_ABORT)
            if not restarting:
                with contextlib.suppress(Exception):  # the original error (or the cancel) is what matters
                    await call("denoise_step", {"abort": batch_of_one(True, np.bool_)}, [], correlation_id, end=True)
    if latents is None:
        raise RuntimeError("denoise_step finished the sequence without returning latents")
    decoded = await call("vae_decode", {"latents": latents}, ["image"])
    return GenerationResult(image=decoded["image"], seed=params.seed)
