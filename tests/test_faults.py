"""Fault recovery: a model's process killed mid-request; the launcher's watchdog restarts tritonserver."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from conftest import Server, running_server
from tritonclient.utils import InferenceServerException

from stepdiff.cli import RestartBudget
from stepdiff.server import MODELS, process_alive, stub_processes, tritonserver_pid

IN_FLIGHT = {"num_inference_steps": 200, "height": 128, "width": 128}  # about 2 s each, 4 at once, 2 cores
GOOD = {"seed": 11, "num_inference_steps": 8, "height": 64, "width": 64}


def triton_pid(server: Server) -> int | None:
    """The tritonserver serving ``server`` (other test servers run here too)."""
    return tritonserver_pid(int(server.http_url.rsplit(":", 1)[1]))


def all_ready(server: Server) -> bool:
    try:
        for path in ["/v2/health/ready", *(f"/v2/models/{model}/ready" for model in MODELS)]:
            with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=2) as response:
                if response.status != 200:
                    return False
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
    return True


def test_killed_denoise_step_fails_requests_in_flight_and_the_launcher_restarts_triton(tiny_sd, tmp_path):
    log_file = tmp_path / "tritonserver.log"
    with running_server(tiny_sd, log_file) as server:
        before, _ = server.txt2img("a red panda", **GOOD)
        first_pid = triton_pid(server)
        assert first_pid is not None
        stubs = {stub.model: stub for stub in stub_processes(first_pid)}
        assert sorted(stubs) == sorted(MODELS)

        errors: dict[int, str] = {}

        def generate(index: int) -> None:
            try:
                server.txt2img("a cat", protocol=("http", "grpc")[index % 2], seed=index, **IN_FLIGHT)
                errors[index] = "no error: the generation finished"
            except InferenceServerException as error:  # the status and the message are what is checked
                errors[index] = f"{error.status()} {error.message()}"

        threads = [threading.Thread(target=generate, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while server.metric("stepdiff_active_sequences") < len(threads) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metric("stepdiff_active_sequences") == len(threads), "the generations never ran together"
        os.kill(stubs["denoise_step"].pid, signal.SIGKILL)
        killed = time.monotonic()
        for thread in threads:
            thread.join(timeout=max(0.0, killed + 20 - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "requests in flight hang after the kill"
        assert sorted(errors) == list(range(len(threads))), errors
        for index, message in errors.items():  # HTTP and gRPC alike: the dead model, named; retry later
            assert "denoise_step: Stub process 'denoise_step_0_0' is not healthy" in message, (index, message)
            assert message.split()[0] in ("503", "StatusCode.UNAVAILABLE"), (index, message)

        seen_down, deadline = False, time.monotonic() + 120  # health reports the restart, then recovery
        while time.monotonic() < deadline and (triton_pid(server) in (None, first_pid) or not all_ready(server)):
            seen_down = seen_down or not all_ready(server)
            time.sleep(0.5)
        assert seen_down and all_ready(server), "the server did not restart"
        assert not process_alive(first_pid)
        assert {stub.model for stub in stub_processes(triton_pid(server))} == set(MODELS)
        dead = stubs["denoise_step"]
        assert (
            f"stepdiff: restarting tritonserver: model denoise_step's process died (pid {dead.pid}, instance "
            f"denoise_step_0_0)" in log_file.read_text(errors="replace")
        )
        assert not any((Path("/dev/shm") / stub.shm_region).exists() for stub in stubs.values())

        after, _ = server.txt2img("a red panda", **GOOD)
        assert np.array_equal(before, after)
        assert server.metric("stepdiff_active_sequences") == 0


def test_restart_budget_allows_five_restarts_in_ten_minutes():
    budget = RestartBudget(limit=5, window=600.0)
    assert all(budget.take(now) for now in (0.0, 10.0, 20.0, 30.0, 40.0))
    assert not budget.take(599.0)
    assert budget.take(600.0)  # the first restart left the window
    assert not budget.take(601.0)
    assert budget.total == 6
