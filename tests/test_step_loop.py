"""StepLoop (denoise_step's step loop) in-process with the real tiny SD engine: which calls a run takes,
the order of a sequence's calls, answers on failures and on stop, and the thread."""

from __future__ import annotations

import threading

import pytest
import torch
from test_engine import params, start

from stepdiff.adapters import InvalidInput, Stage, load_adapter
from stepdiff.admission import ServerBusy
from stepdiff.engine import StepCall, StepEngine, StepResult
from stepdiff.step_loop import StepLoop


@pytest.fixture(scope="module")
def adapters(tiny_sd):
    cpu = torch.device("cpu")
    return (
        load_adapter(str(tiny_sd), Stage.TEXT_ENCODER, cpu, torch.float32),
        load_adapter(str(tiny_sd), Stage.DENOISE, cpu, torch.float32),
    )


class Answers:
    """Collects replies by name, in the order they came."""

    def __init__(self):
        self.got: list[tuple[str, StepResult]] = []
        self.arrived = threading.Condition()

    def reply(self, name: str):
        def record(result: StepResult) -> None:
            with self.arrived:
                self.got.append((name, result))
                self.arrived.notify_all()

        return record

    def wait_for(self, count: int, timeout: float = 60) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.got) >= count, timeout), self.got

    def named(self, name: str) -> StepResult:
        [result] = [result for got, result in self.got if got == name]
        return result


def test_a_run_takes_the_oldest_call_of_every_sequence_and_later_calls_wait_in_order(adapters):
    """Calls submitted at different times share one forward; a sequence's second call waits for the
    next run and gets the next step; the run answers in order of arrival."""
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    for cid in (1, 2, 3):
        start(engine, encoder, cid, params(steps=3))
    loop, answers = StepLoop(engine, 1.0), Answers()
    loop.submit(StepCall(2), answers.reply("2a"))
    loop.submit(StepCall(1), answers.reply("1a"))
    loop.submit(StepCall(2, wants_latents=True), answers.reply("2b"))
    loop.submit(StepCall(3), answers.reply("3a"))
    assert loop.run_once() == 3
    assert [name for name, _ in answers.got] == ["2a", "1a", "3a"]
    assert engine.forward_batch_sizes == [3]
    assert all(result.error is None and result.step_index == 1 for _, result in answers.got)
    assert loop.run_once() == 1 and engine.forward_batch_sizes == [1]
    second = answers.named("2b")
    assert second.error is None and second.step_index == 2 and second.latents is not None
    assert loop.run_once() == 0 and len(answers.got) == 4


def test_starts_and_aborts_are_answered_before_the_steps_taken_with_them(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    start(engine, encoder, 1, params(steps=3))
    start(engine, encoder, 2, params(steps=3))
    loop, answers = StepLoop(engine, 1.0), Answers()
    p = params(seed=3, steps=3)
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(p)
    loop.submit(StepCall(1), answers.reply("step"))
    loop.submit(StepCall(3, start=True, params=p, conditioning=conditioning), answers.reply("start"))
    loop.submit(StepCall(2, end=True, abort=True), answers.reply("abort"))
    assert loop.run_once() == 3
    assert [name for name, _ in answers.got] == ["start", "abort", "step"]
    assert answers.named("start").num_steps == 3 and sorted(engine.states) == [1, 3]
    assert engine.forward_batch_sizes == [1]


def test_a_bad_call_fails_alone_and_the_next_good_call_still_steps(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    start(engine, encoder, 5, params(steps=2))
    loop, answers = StepLoop(engine, 1.0), Answers()
    loop.submit(StepCall(99), answers.reply("unknown"))
    loop.submit(StepCall(5, step=1), answers.reply("wrong step"))
    loop.submit(StepCall(5, step=0), answers.reply("good"))
    loop.run_once()
    assert isinstance(answers.named("unknown").error, InvalidInput)
    assert "step=1 but sequence 5 is at step 0" in str(answers.named("wrong step").error)
    assert 5 not in engine.states  # a failed call ends its sequence, as in the engine
    loop.run_once()
    assert "unknown or already finished" in str(answers.named("good").error)
    start(engine, encoder, 5, params(steps=2))
    loop.submit(StepCall(5, step=0), answers.reply("again"))
    loop.run_once()
    assert answers.named("again").error is None and answers.named("again").step_index == 1


def test_a_run_that_raises_answers_every_call_it_took(adapters):
    _, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    loop, answers = StepLoop(engine, 1.0), Answers()

    def broken(calls):
        raise RuntimeError("the device went away")

    engine.run = broken
    loop.submit(StepCall(1), answers.reply("a"))
    loop.submit(StepCall(2), answers.reply("b"))
    assert loop.run_once() == 2
    assert [str(result.error) for _, result in answers.got] == ["the device went away"] * 2


def test_a_failing_reply_does_not_keep_the_others_from_their_answers(adapters, capfd):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    for cid in (1, 2):
        start(engine, encoder, cid, params(steps=2))
    loop, answers = StepLoop(engine, 1.0), Answers()

    def gone(result):
        raise ConnectionError("the caller left")

    loop.submit(StepCall(1), gone)
    loop.submit(StepCall(2), answers.reply("b"))
    loop.run_once()
    assert answers.named("b").error is None
    assert "the caller left" in capfd.readouterr().err


def test_the_thread_serves_generations_submitted_from_many_threads_to_the_engines_latents(adapters):
    """Four generations stepping through the loop's thread, each caller waiting for its answer before
    its next call (as Triton does), end with the latents the engine gives each of them run alone."""
    encoder, denoiser = adapters
    steps = 4
    expected = {}
    for cid in range(1, 5):
        alone = StepEngine(denoiser, 8, 4, 60)
        start(alone, encoder, cid, params(seed=cid, steps=steps))
        for index in range(steps):
            [result] = alone.run([StepCall(cid, end=index == steps - 1)])
        expected[cid] = result.latents
    engine = StepEngine(denoiser, 8, 8, 60)
    sizes: list[int] = []
    loop = StepLoop(engine, 0.05, after_run=lambda: sizes.extend(engine.forward_batch_sizes))
    loop.start()
    finals = {}

    def generate(cid):
        answers = Answers()
        p = params(seed=cid, steps=steps)
        with torch.inference_mode():
            conditioning = encoder.encode_prompt(p)
        loop.submit(StepCall(cid, start=True, params=p, conditioning=conditioning), answers.reply("start"))
        answers.wait_for(1)
        for index in range(steps):
            loop.submit(StepCall(cid, end=index == steps - 1), answers.reply(str(index)))
            answers.wait_for(index + 2)
        finals[cid] = answers.named(str(steps - 1)).latents

    threads = [threading.Thread(target=generate, args=(cid,)) for cid in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    loop.stop()
    for cid in range(1, 5):
        assert torch.allclose(finals[cid], expected[cid], atol=1e-5), cid
    assert sum(sizes) == 4 * steps and engine.states == {}


def test_stop_answers_waiting_calls_busy_and_refuses_new_ones(adapters):
    _, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    loop, answers = StepLoop(engine, 1.0), Answers()
    loop.submit(StepCall(1), answers.reply("waiting"))
    loop.stop()
    loop.submit(StepCall(2), answers.reply("late"))
    for name in ("waiting", "late"):
        error = answers.named(name).error
        assert isinstance(error, ServerBusy) and "server busy: denoise_step is stopping" in str(error)


def test_the_idle_loop_sweeps_sequences_nobody_ended(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 0.2)
    start(engine, encoder, 8, params(steps=3))
    swept = threading.Event()
    loop = StepLoop(engine, 0.05, after_run=lambda: engine.states or swept.set())
    loop.start()
    try:
        assert swept.wait(10)
    finally:
        loop.stop()
