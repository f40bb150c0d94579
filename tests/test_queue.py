"""The waiting queue through the real server (limited_server: 2 generations at once, 4 may wait, 10 s at most).

txt2img runs in four processes and txt2img_stream in one: these requests wait in the queue they share."""

from __future__ import annotations

import contextlib
import queue
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import reference_image, txt2img_client
from tritonclient.utils import InferenceServerException

QUEUE_TIMEOUT = 10  # the limited server's --queue-timeout-seconds
STAGGER = 0.15  # seconds between arrivals: far above a request's jitter on its way in


def queue_metrics(server) -> dict[str, float]:
    return {
        "length": server.metric("stepdiff_queue_length"),
        "waits": server.metric("stepdiff_queue_wait_seconds_count"),
        "full": server.metric("stepdiff_queue_rejections_total", reason="queue_full"),
        "timeout": server.metric("stepdiff_queue_rejections_total", reason="queue_timeout"),
        "cancelled": server.metric("stepdiff_cancelled_requests_total"),
    }


def wait_for(server, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while server.metric(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def refused(server, seed: int) -> tuple[str, float]:
    """The message of an UNAVAILABLE answer to a short request, and how long it took."""
    began = time.monotonic()
    with pytest.raises(InferenceServerException) as raised:
        server.txt2img("a cat", seed=seed, num_inference_steps=4)
    assert raised.value.status() == "StatusCode.UNAVAILABLE", raised.value.message()
    return raised.value.message(), time.monotonic() - began


@contextlib.contextmanager
def streaming(server, seed: int, **options) -> Iterator[queue.Queue]:
    """A txt2img_stream generation in flight for the block, cancelled at its end; yields its responses."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = txt2img_client.build_inputs(grpcclient, "a cat", {"seed": seed, **options})
    client.async_stream_infer("txt2img_stream", inputs, enable_empty_final_response=True)
    try:
        yield responses
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def test_past_the_limit_requests_wait_and_start_in_arrival_order(limited_server, reference):
    """3x the limit in flight: two run, four wait; all finish, in arrival order, with diffusers' images.
    Forwards hold one request each (--max-batch-size 1)."""
    # A generation alone takes about a second at whatever speed this machine has now: all six are in
    # flight together, and the last one waits well under the queue timeout.
    began = time.monotonic()
    limited_server.txt2img("a cat", seed=0, num_inference_steps=40)
    steps = min(200, max(20, round(40 / (time.monotonic() - began))))
    before = queue_metrics(limited_server)
    clients = [limited_server.client() for _ in range(6)]
    for _, client in clients:
        client.is_server_live()  # connected before the requests go
    finished: list[int] = []

    def generation(seed: int) -> np.ndarray:
        module, client = clients[seed]
        image, _, _ = txt2img_client.generate(client, module, "a cat", {"seed": seed, "num_inference_steps": steps})
        finished.append(seed)
        return image

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = []
            for seed in range(6):
                futures.append(pool.submit(generation, seed))
                time.sleep(STAGGER)
            images = [future.result() for future in futures]
    finally:
        for _, client in clients:
            client.close()
    # Equal work, two at a time, started in arrival order: each finishes before the one that came after it.
    assert finished == list(range(6)), f"{steps} steps"
    for seed, image in enumerate(images):
        assert np.array_equal(image, reference_image(reference, "a cat", seed, num_inference_steps=steps)), seed
    after = queue_metrics(limited_server)
    assert after["length"] == 0 and limited_server.metric("stepdiff_active_sequences") == 0
    assert after["waits"] - before["waits"] == 6
    assert (after["full"], after["timeout"]) == (before["full"], before["timeout"])
    text = urllib.request.urlopen(limited_server.metrics_url, timeout=5).read().decode()
    buckets = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("stepdiff_denoise_batch_size_bucket")
    }
    assert buckets["1"] == buckets["+Inf"] > 0, "a forward held more than --max-batch-size requests"


def test_a_full_queue_is_refused_at_once_and_a_wait_past_the_timeout_is_refused(limited_server):
    """Two long streamed generations hold both slots. Three requests and a stream wait; one more is refused
    at once, naming max_queue; the waiting stream is cancelled and leaves the queue; the three are
    refused after queue_timeout_seconds, naming it."""
    before = queue_metrics(limited_server)
    long = dict(num_inference_steps=200, height=384, width=384)  # each far longer than the queue timeout
    with contextlib.ExitStack() as blockers, ThreadPoolExecutor(3) as pool:
        for seed in (1, 2):
            result, error = blockers.enter_context(streaming(limited_server, seed, **long)).get(timeout=120)
            assert error is None and result.as_numpy("step") is not None  # it runs
        waiting = [pool.submit(refused, limited_server, seed) for seed in range(3)]
        with streaming(limited_server, 3, num_inference_steps=4):
            wait_for(limited_server, "stepdiff_queue_length", 4)
            full, seconds = refused(limited_server, 4)
        assert "(limit 2) and 4 waiting (max_queue 4)" in full and seconds < QUEUE_TIMEOUT / 2
        wait_for(limited_server, "stepdiff_queue_length", 3)  # the cancelled stream left
        for message, seconds in (future.result() for future in waiting):
            assert f"waited {QUEUE_TIMEOUT} s (queue_timeout_seconds)" in message and seconds >= QUEUE_TIMEOUT
    wait_for(limited_server, "stepdiff_active_sequences", 0)
    after = queue_metrics(limited_server)
    assert after["length"] == 0
    assert (after["full"] - before["full"], after["timeout"] - before["timeout"]) == (1, 3)
    assert after["waits"] - before["waits"] == 6  # 2 at once, 3 timed out, 1 cancelled
    wait_for(limited_server, "stepdiff_cancelled_requests_total", before["cancelled"] + 3)
