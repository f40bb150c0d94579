"""orchestrator.generate's step pipelining, through a StageCaller that records what it is asked.

(The flow's behaviour against the real server is in test_streaming.py, test_txt2img.py and the cancel
tests; here the order and overlap of the calls themselves, which a server does not expose.)
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stepdiff.adapters import GenerationParams
from stepdiff.admission import ServerStopping
from stepdiff.orchestrator import generate

PARAMS = GenerationParams("a cat", None, 0, 10, 7.5, 64, 64, "EulerDiscreteScheduler")
# Triton 2.51's refusal of a call whose sequence it does not hold (ended, or not started yet)
NOT_IN_TRITON = (
    "inference request for sequence {id} to model 'denoise_step' must specify the START flag on the first request "
    "of the sequence"
)


class RecordingStages:
    """Answers like the three stage models after a short delay; records each step call and the overlap."""

    def __init__(self, num_steps: int = 10):
        self.num_steps = num_steps
        self.served_in_order = asyncio.Lock()  # like the sequence batcher: one call of a sequence at a time
        self.in_flight = 0
        self.calls: list[dict] = []  # denoise_step calls after START, in the order they were sent
        self.start: dict = {}  # the START call's inputs and outputs

    fail_at_step: int | None = None  # the step call that returns ``failure``
    failure = "denoise_step: Stub process 'denoise_step_0_0' is not healthy."  # a dead denoise_step

    async def __call__(self, model, inputs, outputs, correlation_id=0, start=False, end=False):
        if model == "text_encoder":
            return {"prompt_embeds": np.zeros((1, 77, 8), np.float32)}
        if model == "vae_decode":
            return {"image": np.zeros((1, 64, 64, 3), np.uint8)}
        if start:
            self.start = {"inputs": inputs, "outputs": outputs}
            answer = {"num_steps": np.array([[self.num_steps]], np.int32), "step_index": np.array([[1]], np.int32)}
            return answer | ({"latents": np.ones((1, 4, 8, 8), np.float32)} if "latents" in outputs else {})
        self.calls.append({"inputs": set(inputs), "outputs": outputs, "end": end, "in_flight_before": self.in_flight})
        self.in_flight += 1
        try:
            async with self.served_in_order:
                await asyncio.sleep(0.005)
                if self.fail_at_step is not None and len(self.calls) > self.fail_at_step:
                    raise RuntimeError(self.failure)
        finally:
            self.in_flight -= 1
        return {"latents": np.ones((1, 4, 8, 8), np.float32)} if "latents" in outputs else {}


def test_two_calls_in_flight_previews_alone_and_an_end_call_behind_the_last_step():
    stages, progress = RecordingStages(), []

    async def on_step(step, num_steps, latents):
        progress.append((step, latents is not None))

    result = asyncio.run(generate(stages, PARAMS, ["prompt_embeds"], on_step=on_step, preview_every=4, lookahead=2))
    assert result is not None
    # START takes the first step (step 0), without latents: its preview would be after step 1
    assert stages.start["inputs"]["step"].tolist() == [[0]] and "latents" not in stages.start["outputs"]
    *steps, end = stages.calls  # steps 1 to 9
    assert len(steps) == 9 and max(call["in_flight_before"] for call in steps) == 1  # never more than 2 at once
    alone = [1 + index for index, call in enumerate(steps) if "step" in call["inputs"]]
    assert alone == [3, 7]  # previews after steps 4 and 8
    assert all(steps[index - 1]["in_flight_before"] == 0 for index in alone)
    # the last step overlaps like any other; END, sent while it is in flight, takes no step and fetches
    # the final latents
    assert [1 + index for index, call in enumerate(steps) if call["in_flight_before"] == 1] == [2, 5, 6, 9]
    assert not any(call["end"] for call in steps) and all("latents" not in call["outputs"] for call in steps[7:])
    assert end["end"] and end["inputs"] == set() and end["outputs"] == ["latents"] and end["in_flight_before"] == 1
    assert progress == [(step, step in (4, 8)) for step in range(1, 11)]


@pytest.mark.parametrize(
    "refusal",
    [
        # Triton, when the step call reaches it after END
        NOT_IN_TRITON,
        # Triton, when the step call was queued behind END in the sequence's slot (cancelled as END frees it)
        "denoise_step: Cancelled",
    ],
)
def test_an_end_that_overtakes_the_last_step_takes_it(refusal):
    """END reaches Triton before the last step's call: it takes the last step, the step call after it
    fails, and the generation still ends with the image and every step reported."""
    stages, progress = RecordingStages(num_steps=4), []
    overtaken = asyncio.Event()

    async def end_first(model, inputs, outputs, correlation_id=0, start=False, end=False):
        if model == "denoise_step" and not start and not end and len(stages.calls) == 2:  # the last step
            await overtaken.wait()
            stages.calls.append({"inputs": set(inputs), "end": end, "refused": True})
            raise RuntimeError(refusal.format(id=correlation_id))
        answer = await RecordingStages.__call__(stages, model, inputs, outputs, correlation_id, start, end)
        if end:
            overtaken.set()
        return answer

    async def on_step(step, num_steps, latents):
        progress.append(step)

    result = asyncio.run(generate(end_first, PARAMS, ["prompt_embeds"], on_step=on_step, lookahead=2))
    assert result is not None and progress == [1, 2, 3, 4]
    assert [(call["end"], "refused" in call) for call in stages.calls] == [(False, False)] * 2 + [
        (True, False),
        (False, True),
    ]
    assert not any("abort" in call["inputs"] for call in stages.calls)


def test_the_second_step_goes_out_after_starts_answer():
    """Sent before it, the call could overtake START in Triton (and bought nothing on the GPU)."""
    stages = RecordingStages(num_steps=4)
    answered: list[str] = []

    async def slow_start(model, inputs, outputs, correlation_id=0, start=False, end=False):
        if start:
            await asyncio.sleep(0.02)
            answered.append("START")
        elif model == "denoise_step":
            answered.append(f"call {len(stages.calls) + 1} sent")
        return await RecordingStages.__call__(stages, model, inputs, outputs, correlation_id, start, end)

    assert asyncio.run(generate(slow_start, PARAMS, ["prompt_embeds"], lookahead=2)) is not None
    assert answered[:2] == ["START", "call 1 sent"]
    assert [call["inputs"] for call in stages.calls] == [set()] * 4 and stages.calls[-1]["end"]  # 3 steps and END


def test_a_preview_after_every_step_gets_the_first_from_start():
    stages, progress = RecordingStages(num_steps=3), []

    async def on_step(step, num_steps, latents):
        progress.append((step, latents is not None))

    asyncio.run(generate(stages, PARAMS, ["prompt_embeds"], on_step=on_step, preview_every=1, lookahead=2))
    assert "latents" in stages.start["outputs"]
    assert progress == [(1, True), (2, True), (3, False)]  # the last step's latents are the image's


def test_lookahead_one_sends_every_step_alone_with_its_index():
    stages = RecordingStages()
    asyncio.run(generate(stages, PARAMS, ["prompt_embeds"], lookahead=1))
    *steps, end = stages.calls
    assert all("step" in call["inputs"] and call["in_flight_before"] == 0 for call in steps)
    assert end["end"] and "step" not in end["inputs"]


def test_a_cancel_stops_within_one_step_and_aborts_after_the_calls_in_flight():
    stages, progress = RecordingStages(num_steps=30), []

    async def on_step(step, num_steps, latents):
        progress.append(step)

    def cancelled():
        return len(progress) >= 3

    result = asyncio.run(
        generate(stages, PARAMS, ["prompt_embeds"], on_step=on_step, is_cancelled=cancelled, lookahead=2)
    )
    assert result is None
    *steps, abort = stages.calls
    assert "abort" in abort["inputs"] and abort["end"] and abort["in_flight_before"] == 0
    assert 1 + len(steps) == 3 + 1  # START's step and the calls: one more than reported (the one in flight)


def test_a_stopping_server_ends_the_generation_at_its_next_step_with_an_abort():
    """The launcher announced the stop: the generation ends like a cancel (the abort still goes out, while
    Triton takes it) but raises ServerStopping, which the client gets as UNAVAILABLE."""
    stages = RecordingStages(num_steps=30)
    progress: list[int] = []

    async def on_step(step, num_steps, latents):
        progress.append(step)

    with pytest.raises(ServerStopping, match=r"the generation was ended after step 3 of 30; retry"):
        asyncio.run(
            generate(
                stages, PARAMS, ["prompt_embeds"], on_step=on_step, lookahead=2, is_stopping=lambda: len(progress) >= 3
            )
        )
    *steps, abort = stages.calls
    assert "abort" in abort["inputs"] and abort["end"] and abort["in_flight_before"] == 0
    assert 1 + len(steps) == 3 + 1


def failed_generation(stages: RecordingStages) -> str:
    """Run a generation that must fail; its error's message."""
    try:
        asyncio.run(generate(stages, PARAMS, ["prompt_embeds"], lookahead=2))
    except RuntimeError as error:
        return str(error)
    raise AssertionError("the step call's error did not reach the caller")


def test_a_failed_step_call_ends_the_sequence_with_an_abort():
    """denoise_step frees the state of a sequence whose call failed, but only an END frees its slot in
    Triton's sequence batcher: the abort goes out once the call in flight is back, and nothing else."""
    stages = RecordingStages(num_steps=30)
    stages.fail_at_step, stages.failure = 4, "denoise_step: RuntimeError: CUDA error: an illegal memory access"
    assert "illegal memory access" in failed_generation(stages)
    *steps, abort = stages.calls
    assert "abort" in abort["inputs"] and abort["end"] and abort["in_flight_before"] == 0
    assert not any("abort" in call["inputs"] or call["end"] for call in steps)
    assert len(steps) <= 6  # nothing is sent after the failure but the call already in flight


def test_a_failed_last_step_whose_end_fails_too_raises_its_own_error():
    """The last step's call failed for real: denoise_step freed the state, END finds none, and the
    generation reports the step's error, not END's."""
    stages = RecordingStages(num_steps=4)

    async def last_step_fails(model, inputs, outputs, correlation_id=0, start=False, end=False):
        calls_before = len(stages.calls)
        answer = await RecordingStages.__call__(stages, model, inputs, outputs, correlation_id, start, end)
        if model == "denoise_step" and not start and calls_before == 2:  # the last step (steps 1 to 3)
            raise RuntimeError("denoise_step: RuntimeError: CUDA error: an illegal memory access")
        if end and "abort" not in inputs:
            raise RuntimeError(f"denoise_step: sequence {correlation_id}: unknown or already finished")
        return answer

    with pytest.raises(RuntimeError, match="illegal memory access"):
        asyncio.run(generate(last_step_fails, PARAMS, ["prompt_embeds"], lookahead=2))
    assert [("abort" in call["inputs"], call["end"]) for call in stages.calls] == [(False, False)] * 3 + [
        (False, True),  # END, sent while the last step was in flight
        (True, True),  # then the abort
    ]


@pytest.mark.parametrize("failure", ["Stub process 'denoise_step_0_0' is not healthy.", "Server not ready"])
def test_no_abort_after_a_dead_process_or_a_stopping_server(failure):
    """The restart (or the stop) that follows frees every slot; an abort could only wait for it."""
    stages = RecordingStages(num_steps=30)
    stages.fail_at_step, stages.failure = 4, f"denoise_step: {failure}"
    assert failure in failed_generation(stages)
    assert not any("abort" in call["inputs"] for call in stages.calls)
    assert len(stages.calls) <= 6


def test_a_refused_start_ends_the_sequence_with_an_abort():
    """A START that denoise_step refuses (server busy, a bad input) still took a sequence slot in Triton."""
    stages = RecordingStages()

    async def refuse_start(model, inputs, outputs, correlation_id=0, start=False, end=False):
        if start:
            raise RuntimeError("denoise_step: server busy: 8 active sequences (limit 8); retry later")
        return await RecordingStages.__call__(stages, model, inputs, outputs, correlation_id, start, end)

    try:
        asyncio.run(generate(refuse_start, PARAMS, ["prompt_embeds"], lookahead=2))
    except RuntimeError as error:
        assert "server busy" in str(error)
    else:
        raise AssertionError("the refused START did not reach the caller")
    [abort] = stages.calls
    assert "abort" in abort["inputs"] and abort["end"] and abort["in_flight_before"] == 0
