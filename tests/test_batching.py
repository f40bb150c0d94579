"""Step-level continuous batching through the real server: shared forwards, joins mid-way, determinism."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

SCHEDULERS = ["PNDMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def inference_counts(server, model: str = "denoise_step", at_least: int = 0, timeout: float = 10) -> tuple[int, int]:
    """Triton's statistics of ``model``: requests (inferences) and model executions so far, once they
    count ``at_least`` requests and two reads 50 ms apart agree. Triton records an execution's statistics
    after its responses went out, so a client that has its answers may read them a moment early (on a busy
    2-core CI machine, 1 of 16 answered requests was counted)."""
    deadline = time.monotonic() + timeout
    last = None
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        while True:
            stats = client.get_inference_statistics(model).model_stats[0]
            counts = (stats.inference_count, stats.execution_count)
            if (counts == last and counts[0] >= at_least) or time.monotonic() > deadline:
                return counts
            last = counts
            time.sleep(0.05)


def assert_batched_like_solo(server, jobs: list[dict], min_mean_batch: float) -> float:
    """Run each txt2img job alone, then all at once: the concurrent run must share denoise_step
    executions (mean requests per execution by Triton's statistics >= ``min_mean_batch``), every image
    must match its solo run (PSNR >= 40 dB), and no sequence may be left behind. Returns the mean."""

    def run(job):
        return server.txt2img(**job)[0]

    solo = [run(job) for job in jobs]
    before = {model: inference_counts(server, model) for model in ("denoise_step", "text_encoder")}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    mean_batch, encoder_batch = (
        (inferences - before[model][0]) / (executions - before[model][1])
        for model, (inferences, executions) in ((m, inference_counts(server, m, before[m][0] + 1)) for m in before)
    )
    print(f"mean denoise_step batch {mean_batch:.2f}, text_encoder {encoder_batch:.2f}")
    assert mean_batch >= min_mean_batch
    for job, alone, batched in zip(jobs, solo, together, strict=True):
        assert psnr(alone, batched) >= 40, job
    assert server.metric("stepdiff_active_sequences") == 0
    return mean_batch


def test_concurrent_mixed_requests_share_forwards_and_match_solo_runs(server):
    jobs = [
        dict(
            seed=100 + i,
            num_inference_steps=8 + i,
            scheduler=SCHEDULERS[i % 4],
            guidance_scale=7.5 if i % 3 else 1.0,
            height=128,
            width=128,
        )
        for i in range(8)
    ]
    solo = [server.txt2img("a photo of a cat", **job)[0] for job in jobs]
    inferences_before, executions_before = inference_counts(server)
    forwards_before = server.metric("stepdiff_denoise_batch_size_count")
    rows_before = server.metric("stepdiff_denoise_batch_size_sum")
    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda job: server.txt2img("a photo of a cat", **job)[0], jobs))
    inferences, executions = inference_counts(server, at_least=inferences_before + 1)
    mean_batch = (inferences - inferences_before) / (executions - executions_before)
    forwards = server.metric("stepdiff_denoise_batch_size_count") - forwards_before
    mean_forward = (server.metric("stepdiff_denoise_batch_size_sum") - rows_before) / forwards
    print(f"mean denoise_step batch {mean_batch:.2f} (Triton statistics), mean forward {mean_forward:.2f} (metric)")
    assert mean_batch >= 2.5
    assert mean_forward >= 2.5
    # Every request-step ran in some forward; PNDM (skip_prk_steps) has num_inference_steps + 1 timesteps.
    expected_steps = sum(job["num_inference_steps"] + (job["scheduler"] == "PNDMScheduler") for job in jobs)
    assert server.metric("stepdiff_denoise_batch_size_sum") - rows_before == expected_steps
    for job, alone, together in zip(jobs, solo, batched, strict=True):
        assert psnr(alone, together) >= 40, job
    assert server.metric("stepdiff_active_sequences") == 0


def test_request_joins_while_others_are_mid_way(server):
    long_job = dict(num_inference_steps=60, scheduler="DDIMScheduler", height=128, width=128)
    finished: dict[str, float] = {}

    def run(name: str, **options) -> None:
        server.txt2img("a red panda", **options)
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        steps_before = server.metric("stepdiff_denoise_steps_total")
        longs = [pool.submit(run, f"long{i}", seed=i, **long_job) for i in range(3)]
        while server.metric("stepdiff_denoise_steps_total") - steps_before < 30:  # the long ones are under way
            time.sleep(0.01)
        short = pool.submit(
            run, "short", seed=9, num_inference_steps=3, scheduler="DDIMScheduler", height=128, width=128
        )
        short.result()
        for future in longs:
            future.result()
    assert finished["short"] < min(finished[f"long{i}"] for i in range(3)), "the short request waited for the long ones"


def test_a_burst_of_prompts_shares_text_encoder_executions_and_each_gets_its_own_embeddings(server):
    """16 step-API text_encoder calls sent at once (gRPC async): those queued while the first ran reach
    the model together (Triton's dynamic batcher) and share forwards; each request gets its solo result."""
    prompts = [f"a photo of {animal}" for animal in ("a cat", "a dog", "an owl", "a red panda")] * 4

    def inputs(prompt: str) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("prompt", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        return [tensor]

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        solo = {prompt: client.infer("text_encoder", inputs(prompt)).as_numpy("prompt_embeds") for prompt in prompts}
        inferences_before, executions_before = inference_counts(server, "text_encoder")
        answers: Queue = Queue()
        for index, prompt in enumerate(prompts):
            callback = functools.partial(lambda index, result, error: answers.put((index, result, error)), index)
            client.async_infer("text_encoder", inputs(prompt), callback)
        results = [answers.get(timeout=60) for _ in prompts]
    inferences, executions = inference_counts(server, "text_encoder", inferences_before + len(prompts))
    assert inferences - inferences_before == len(prompts)
    assert executions - executions_before < len(prompts), "no two text_encoder requests shared an execution"
    for index, result, error in results:
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("prompt_embeds"), solo[prompts[index]], rtol=1e-4, atol=1e-5)


def test_text_encoder_refuses_more_than_one_prompt_per_request(server):
    tensor = grpcclient.InferInput("prompt", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a cat"], [b"a dog"]], dtype=np.object_))
    with grpcclient.InferenceServerClient(server.grpc_url) as client, pytest.raises(InferenceServerException) as raised:
        client.infer("text_encoder", [tensor])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "prompt: expected exactly one value (shape [1]), got shape [2, 1]" in raised.value.message()


def test_latents_queued_while_vae_decode_runs_share_a_decode_and_bad_ones_fail_alone(server):
    """A long decode, then 4 requests of another latent shape and one of that shape with NaN, sent at
    once (gRPC async): those queued behind the long one reach vae_decode together and share decodes;
    each gets its solo image (within 1 of 255: a batched convolution may round differently) and the
    NaN request alone gets INVALID_ARG naming latents."""
    rng = np.random.default_rng(0)
    long_one = rng.standard_normal((1, 4, 96, 96), dtype=np.float32)
    small = [rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(4)]
    poisoned = small[0].copy()
    poisoned[0, 0, 0, 0] = np.nan

    def inputs(latents: np.ndarray) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("latents", list(latents.shape), "FP32")
        tensor.set_data_from_numpy(latents)
        return [tensor]

    requests = [long_one, *small, poisoned]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        solo = [client.infer("vae_decode", inputs(latents)).as_numpy("image") for latents in small]
        inferences_before, executions_before = inference_counts(server, "vae_decode")
        answers: Queue = Queue()
        for index, latents in enumerate(requests):
            callback = functools.partial(lambda index, result, error: answers.put((index, result, error)), index)
            client.async_infer("vae_decode", inputs(latents), callback)
        results = {index: (result, error) for index, result, error in (answers.get(timeout=60) for _ in requests)}
    inferences, executions = inference_counts(server, "vae_decode", inferences_before + len(requests))
    assert inferences - inferences_before == len(requests)
    assert executions - executions_before < len(requests), "no two vae_decode requests shared an execution"
    assert results[0][1] is None and results[0][0].as_numpy("image").shape == (1, 768, 768, 3)
    for index, expected in enumerate(solo, start=1):
        image, error = results[index]
        assert error is None, error
        assert np.abs(image.as_numpy("image").astype(int) - expected).max() <= 1
    error = results[len(requests) - 1][1]
    assert error is not None and error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "latents: contains NaN or infinity" in error.message()
