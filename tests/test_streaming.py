"""txt2img_stream over gRPC streaming: progress per step, previews, cancellation; state never leaks."""

from __future__ import annotations

import functools
import queue
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import hang_main_thread, release_main_thread, txt2img_client
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


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_forty_streams_keep_their_step_calls_queued_at_denoise_step(server):
    """Triton 2.51 holds a thread of the calling model instance's pool for each BLS call until it is
    answered (Triton's default: 32 per instance), and txt2img_stream runs one instance. 40 streams keep
    2 step calls out each (the step lookahead): with denoise_step's execute held, every running stream's
    calls reach its queue (Triton's default pool let at most 32 through); released, every stream ends
    with its image."""
    count, options = 40, dict(num_inference_steps=40, height=64, width=64)
    steps: dict[int, int] = {}
    images: dict[int, np.ndarray] = {}
    errors: list = []

    def on_response(index: int, result, error) -> None:
        if error is not None:
            errors.append(error)
            return
        if result.as_numpy("step") is not None:
            steps[index] = int(result.as_numpy("step")[0])
        if result.get_response().parameters["triton_final_response"].bool_param:
            images[index] = result.as_numpy("image")

    def queued_at_denoise_step() -> float:
        return server.metric("nv_inference_pending_request_count", model="denoise_step")

    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(count)]
    try:
        for index, client in enumerate(clients):
            client.start_stream(callback=functools.partial(on_response, index))
            inputs = txt2img_client.build_inputs(grpcclient, "a cat", {**options, "seed": 500 + index})
            client.async_stream_infer("txt2img_stream", inputs, enable_empty_final_response=True)
        wait_until(lambda: (len(steps) == count and min(steps.values()) >= 2) or errors, 120, "every stream's step 2")
        assert not errors, errors
        [denoise] = [stub for stub in server.stubs() if stub.model == "denoise_step"]
        hang_main_thread(denoise)
        try:
            running = count - len(images)
            assert running > 32, f"only {running} streams still running: too few to tell"
            deadline = time.monotonic() + 20
            while (queued := queued_at_denoise_step()) < running and time.monotonic() < deadline:
                time.sleep(0.2)
            # each running stream has one call in the held execute or queued, and its second one queued
            assert queued >= running, f"{queued} step calls queued at denoise_step for {running} running streams"
        finally:
            release_main_thread(denoise)
        wait_until(lambda: len(images) == count or errors, 120, "every stream's image")
    finally:
        for client in clients:
            client.stop_stream()
            client.close()
    assert not errors, errors
    assert all(image.shape == (64, 64, 3) for image in images.values())
    assert wait_for_metric(server, "stepdiff_active_sequences", 0) == 0


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
