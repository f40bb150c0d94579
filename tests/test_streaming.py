"""txt2img_stream over gRPC streaming: progress per step, previews, cancellation; state never leaks."""

from __future__ import annotations

import queue
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import txt2img_client
from test_batching import psnr
from tritonclient.utils import InferenceServerException


def stream(server, prompt: str, cancel_after: int | None = None, preview_every: int = 0, **options):
    """Run one streamed request; returns (progress [(step, num_steps, preview)], final outputs or None)."""
    inputs = txt2img_client.build_inputs(grpcclient, prompt, options)
    if preview_every:
        tensor = grpcclient.InferInput("preview_every", [1], "INT32")
        tensor.set_data_from_numpy(np.array([preview_every], np.int32))
        inputs.append(tensor)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("txt2img_stream", inputs, enable_empty_final_response=True)
    progress, final = [], None
    try:
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            if result.as_numpy("step") is not None:
                progress.append(
                    (int(result.as_numpy("step")[0]), int(result.as_numpy("num_steps")[0]), result.as_numpy("preview"))
                )
                if cancel_after is not None and progress[-1][0] == cancel_after:
                    client.stop_stream(cancel_requests=True)
                    return progress, None
            if result.get_response().parameters["triton_final_response"].bool_param:
                final = {name: result.as_numpy(name) for name in ("image", "image_bytes", "seed")}
                return progress, final if final["image"] is not None or final["image_bytes"] is not None else None
    finally:
        client.stop_stream()
        client.close()


def wait_for_metric(server, name: str, value: float, timeout: float = 15) -> float:
    deadline = time.monotonic() + timeout
    while (current := server.metric(name)) != value and time.monotonic() < deadline:
        time.sleep(0.2)
    return current


def test_progress_in_order_previews_and_the_last_response_carries_the_image(server):
    options = dict(seed=8, num_inference_steps=7, scheduler="DDIMScheduler", height=64, width=48)
    progress, final = stream(server, "a red panda", preview_every=3, **options)
    assert [step for step, _, _ in progress] == list(range(1, 8))
    assert {total for _, total, _ in progress} == {7}
    previews = {step: preview for step, _, preview in progress if preview is not None}
    assert sorted(previews) == [3, 6] and all(p.shape == (8, 6, 3) and p.dtype == np.uint8 for p in previews.values())
    unary, _ = server.txt2img("a red panda", **options)
    assert int(final["seed"][0]) == 8 and np.array_equal(final["image"], unary)


def test_half_of_twenty_streams_cancelled_others_unaffected(server):
    cancelled_before = server.metric("stepdiff_cancelled_requests_total")
    rng = random.Random(0)
    jobs = [
        dict(seed=300 + i, num_inference_steps=12, scheduler="EulerAncestralDiscreteScheduler", height=64, width=64)
        for i in range(20)
    ]
    cancel_at = {i: rng.randint(2, 8) for i in range(0, 20, 2)}
    solo = {i: server.txt2img("a photo of a cat", **jobs[i])[0] for i in range(1, 20, 2)}
    with ThreadPoolExecutor(20) as pool:
        futures = {i: pool.submit(stream, server, "a photo of a cat", cancel_at.get(i), **jobs[i]) for i in range(20)}
        outcomes = {i: future.result() for i, future in futures.items()}
    for i, (progress, final) in outcomes.items():
        if i in cancel_at:
            assert final is None and progress[-1][0] == cancel_at[i]
        else:
            assert [step for step, _, _ in progress] == list(range(1, 13))
            assert psnr(final["image"], solo[i]) >= 40, i
    assert wait_for_metric(server, "stepdiff_active_sequences", 0) == 0
    assert wait_for_metric(server, "stepdiff_cancelled_requests_total", cancelled_before + 10) == cancelled_before + 10


def test_sequence_never_ended_is_swept_after_the_idle_ttl(limited_server):
    """A caller that STARTs a sequence on denoise_step and disappears: the state goes after 2 s, and
    Triton's sequence batcher gives the slot back after the same 2 s (its idle timeout, written by
    `stepdiff serve`): a later step call on that id is refused by Triton, not by denoise_step."""
    from test_validation import raw_infer

    prompt = (np.array([[b"a cat"]], dtype=np.object_), "BYTES")
    encoded = raw_infer(limited_server, {"prompt": prompt}, model="text_encoder")
    inputs = {
        "prompt": prompt,
        "prompt_embeds": (encoded.as_numpy("prompt_embeds"), "FP32"),
        "negative_prompt_embeds": (encoded.as_numpy("negative_prompt_embeds"), "FP32"),
    }
    started = time.monotonic()
    raw_infer(limited_server, inputs, model="denoise_step", sequence_id=777, sequence_start=True)
    assert limited_server.metric("stepdiff_active_sequences") == 1
    assert wait_for_metric(limited_server, "stepdiff_active_sequences", 0, timeout=10) == 0
    # one probe, 2 s past the timeout: a call on a held slot would count as activity and keep it
    time.sleep(max(0.0, started + 4 - time.monotonic()))
    with pytest.raises(InferenceServerException) as refused:
        raw_infer(limited_server, {"step": (np.array([[0]], np.int32), "INT32")}, model="denoise_step", sequence_id=777)
    assert "must specify the START flag" in refused.value.message(), refused.value.message()


def test_client_timeout_behaves_like_a_cancel(server):
    """A unary gRPC request whose deadline passes is stopped at the next step and its state freed."""
    cancelled_before = server.metric("stepdiff_cancelled_requests_total")
    module, client = server.client("grpc")
    with client:
        try:
            txt2img_client.generate(
                client, module, "a slow cat", dict(seed=1, num_inference_steps=200, height=128, width=128), timeout=0.5
            )
            raise AssertionError("a 200-step request finished within 0.5 s")
        except InferenceServerException as error:
            assert "Deadline" in error.message() or "DEADLINE" in str(error.status())
    assert wait_for_metric(server, "stepdiff_cancelled_requests_total", cancelled_before + 1) == cancelled_before + 1
    assert wait_for_metric(server, "stepdiff_active_sequences", 0) == 0
