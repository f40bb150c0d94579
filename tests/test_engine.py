"""StepEngine (denoise_step's core) in-process with the real tiny SD adapter: lifecycle, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_image

from stepdiff.adapters import GenerationParams, InvalidInput, Stage, load_adapter
from stepdiff.admission import ServerBusy
from stepdiff.engine import StepCall, StepEngine


@pytest.fixture(scope="module")
def adapters(tiny_sd):
    cpu = torch.device("cpu")
    return (
        load_adapter(str(tiny_sd), Stage.TEXT_ENCODER, cpu, torch.float32),
        load_adapter(str(tiny_sd), Stage.DENOISE, cpu, torch.float32),
    )


def params(seed=0, steps=3, scheduler="DDIMScheduler", guidance=7.5, size=64) -> GenerationParams:
    return GenerationParams("a cat", None, seed, steps, guidance, size, size, scheduler)


def start(engine, encoder, cid, p):
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(p)
    [result] = engine.run([StepCall(cid, start=True, params=p, conditioning=conditioning)])
    assert result.error is None
    return result.num_steps


def test_sequence_lifecycle_returns_latents_and_frees_state(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    assert start(engine, encoder, 7, params(steps=3)) == 3
    for index in range(3):
        [result] = engine.run([StepCall(7, step=index, end=index == 2, wants_latents=index == 1)])
        assert result.error is None and result.step_index == index + 1
        assert (result.latents is None) == (index == 0)  # asked for (a preview) or the last step
    assert result.latents is not None and result.latents.shape == (1, 4, 8, 8)
    assert engine.states == {}


def test_end_after_the_last_step_returns_the_same_latents_without_a_step(adapters):
    """txt2img's way to finish: every step without END, then END alone, which takes no step and
    returns exactly the latents END on the last step returns; a step call after the last one is refused
    and leaves the finished sequence waiting for its END."""
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    finals = []
    for cid, end_apart in ((1, False), (2, True)):
        start(engine, encoder, cid, params(steps=3))
        for index in range(3):
            [result] = engine.run([StepCall(cid, end=index == 2 and not end_apart)])
            assert result.error is None and result.step_index == index + 1
        if end_apart:
            [extra] = engine.run([StepCall(cid)])  # no END: one step too many
            assert isinstance(extra.error, InvalidInput) and "send END for its latents" in str(extra.error)
            [result] = engine.run([StepCall(cid, end=True)])
            assert result.error is None and result.done and engine.forward_batch_sizes == []
        finals.append(result.latents)
    assert torch.equal(finals[0], finals[1]) and finals[1].dtype == torch.float32
    assert engine.states == {}


def test_start_with_step_zero_takes_the_first_step_in_the_forward_of_the_other_steps(adapters):
    """txt2img's START carries step 0: the new request's first step shares the forward of the step calls
    in its run, and its latents equal those of a START followed by a step call; any other step on START
    is refused naming the values allowed, and no state is made."""
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 4, 60)
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(params(seed=5))
    start(engine, encoder, 1, params(seed=5))
    [result] = engine.run([StepCall(1, step=0, wants_latents=True)])
    apart = result.latents
    start(engine, encoder, 2, params(seed=6))
    results = engine.run([StepCall(3, start=True, step=0, wants_latents=True, params=params(seed=5),
                                   conditioning=conditioning), StepCall(2)])  # fmt: skip
    assert [(result.error, result.step_index, result.num_steps) for result in results] == [(None, 1, 3), (None, 1, 3)]
    assert engine.forward_batch_sizes == [2]
    assert torch.allclose(results[0].latents, apart, atol=1e-5)  # batched with another request: close
    [alone] = engine.run([StepCall(4, start=True, step=0, wants_latents=True, params=params(seed=5),
                                   conditioning=conditioning)])  # fmt: skip
    assert torch.equal(alone.latents, apart)  # alone: the same kernels as START, then step 0
    [refused] = engine.run([StepCall(5, start=True, step=2, params=params(), conditioning=conditioning)])
    assert isinstance(refused.error, InvalidInput)
    assert str(refused.error) == "step=2 on START: allowed 0 (take the first step now) or none"
    assert 5 not in engine.states


@pytest.mark.parametrize(
    "scheduler", ["UniPCMultistepScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "DDIMScheduler"]
)
def test_step_wise_images_equal_the_pipelines(adapters, tiny_sd, reference, scheduler):
    """Step by step in process, the stock pipeline's image: UniPC (whose steps run in
    ``DeviceScalarsWithoutWaiting``) and LMS (scipy) are not in the server's matrix (test_txt2img)."""
    encoder, denoiser = adapters
    decoder = load_adapter(str(tiny_sd), Stage.DECODE, torch.device("cpu"), torch.float32)
    engine = StepEngine(denoiser, 8, 8, 60)
    start(engine, encoder, 1, params(seed=3, steps=6, scheduler=scheduler))
    for index in range(6):
        [result] = engine.run([StepCall(1, step=index, end=index == 5)])
        assert result.error is None, result.error
    with torch.inference_mode():
        image = decoder.decode(result.latents)
    options = dict(num_inference_steps=6, guidance_scale=7.5, height=64, width=64)
    assert np.array_equal(image[0], reference_image(reference, "a cat", 3, scheduler, **options))


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_requests_of_one_schedule_keep_their_own_scheduler_state(adapters, scheduler):
    """START copies a schedule set up once per (scheduler, steps): requests whose schedulers keep a step
    history (DPM++ 2M's model outputs, PNDM's ets) and whose steps interleave end as each does alone."""
    encoder, denoiser = adapters

    def final_latents(order: list[int]) -> dict[int, torch.Tensor]:
        """Each seed's final latents, one step per entry of ``order`` (a seed's first entry starts it), then
        the seeds in turn until all are done."""
        engine, seeds, finals = StepEngine(denoiser, 8, 8, 60), set(order), {}
        for seed in [*order, *sorted(seeds) * 10]:
            if seed in finals:
                continue
            if seed not in engine.states:
                start(engine, encoder, seed, params(seed=seed, steps=5, scheduler=scheduler))
            state = engine.states[seed]
            [result] = engine.run([StepCall(seed, end=state.step_index == state.num_steps - 1)])
            assert result.error is None, result.error
            if result.done:
                finals[seed] = result.latents
        assert finals.keys() == seeds
        return finals

    alone = final_latents([1] * 5) | final_latents([2] * 5)
    assert len([key for key in denoiser.schedules if key[:2] == (scheduler, 5)]) == 1
    interleaved = final_latents([1, 1, 2, 1, 2, 2])
    assert torch.equal(interleaved[1], alone[1]) and torch.equal(interleaved[2], alone[2])
    assert not torch.equal(alone[1], alone[2])


def test_compatible_requests_share_one_forward_and_batches_are_capped(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 2, 8, 60)
    schedulers = ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "PNDMScheduler"]
    for cid, scheduler in enumerate(schedulers, start=1):
        start(engine, encoder, cid, params(seed=cid, scheduler=scheduler, guidance=1.0 if cid == 2 else 7.5))
    start(engine, encoder, 9, params(size=48))  # another latent shape: its own group
    results = engine.run([StepCall(cid, step=0) for cid in (1, 2, 3, 9)])
    assert all(result.error is None for result in results)
    assert sorted(engine.forward_batch_sizes) == [1, 1, 2]
    assert engine.steps_done == 4


def test_bad_calls_fail_alone_and_a_wrong_step_leaves_its_sequence_as_it_was(adapters):
    """An unknown sequence and a START without inputs leave no state; a wrong ``step`` is refused, naming
    the step to send, and that step then runs as if the refused call had not come."""
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 8, 60)
    start(engine, encoder, 1, params())
    start(engine, encoder, 2, params())
    unknown, wrong_step, good = engine.run([StepCall(99, step=0), StepCall(1, step=2), StepCall(2, step=0)])
    assert isinstance(unknown.error, InvalidInput) and "unknown" in str(unknown.error)
    assert isinstance(wrong_step.error, InvalidInput) and "step=2" in str(wrong_step.error)
    assert "unchanged: send step=0 next" in str(wrong_step.error)
    assert good.error is None and good.step_index == 1
    assert set(engine.states) == {1, 2} and engine.states[1].step_index == 0
    [missing] = engine.run([StepCall(3, start=True)])
    assert isinstance(missing.error, InvalidInput) and set(engine.states) == {1, 2}
    [retried] = engine.run([StepCall(1, step=0)])
    assert retried.error is None and retried.step_index == 1
    assert torch.equal(engine.states[1].latents, engine.states[2].latents)  # same seed, same first step


def test_scheduler_failure_fails_only_its_request(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 8, 60)
    start(engine, encoder, 1, params())
    start(engine, encoder, 2, params(seed=5))

    def broken_step(*args, **kwargs):
        raise RuntimeError("scheduler exploded")

    engine.states[1].scheduler.step = broken_step
    failed, fine = engine.run([StepCall(1, step=0), StepCall(2, step=0)])
    assert "scheduler exploded" in str(failed.error)
    assert fine.error is None
    assert set(engine.states) == {2}


def test_abort_restart_busy_and_sweep(adapters):
    encoder, denoiser = adapters
    engine = StepEngine(denoiser, 8, 2, idle_seconds=10)
    start(engine, encoder, 1, params())
    engine.run([StepCall(1, step=0)])
    start(engine, encoder, 1, params())  # a START for an id in use restarts it
    assert engine.states[1].step_index == 0
    start(engine, encoder, 2, params())
    p = params()
    [busy] = engine.run([StepCall(3, start=True, params=p, conditioning=encoder.encode_prompt(p))])
    assert isinstance(busy.error, ServerBusy) and "server busy" in str(busy.error)
    [aborted] = engine.run([StepCall(1, end=True, abort=True)])
    assert aborted.error is None and set(engine.states) == {2}
    assert engine.sweep(now=engine.states[2].last_active + 5) == 0
    assert engine.sweep(now=engine.states[2].last_active + 11) == 1
    assert engine.states == {}


def test_two_calls_of_one_sequence_in_one_batch_take_two_steps_in_order(adapters):
    """Interchangeable "next step" calls of one sequence delivered together must not share a step."""
    encoder, denoiser = adapters
    together, apart = StepEngine(denoiser, 8, 4, 60), StepEngine(denoiser, 8, 4, 60)
    for engine in (together, apart):
        start(engine, encoder, 3, params(steps=4, scheduler="PNDMScheduler"))
    first, second = together.run([StepCall(3), StepCall(3, wants_latents=True)])
    assert (first.step_index, second.step_index) == (1, 2) and first.latents is None
    apart.run([StepCall(3)])
    [reference] = apart.run([StepCall(3, wants_latents=True)])
    assert torch.equal(second.latents, reference.latents)
