"""Admission without Triton: the shared FIFO of generations waiting for a slot (src/stepdiff/admission.py).

Two ``Admission`` objects on one file stand for two model processes of one server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stepdiff.admission import (
    Admission,
    QueueFull,
    QueueTimeout,
    ServerBusy,
    ServerStopping,
    SharedSlots,
    process_identity,
)
from stepdiff.repository import TEMPLATE, generations_admitted, python_backend_threads, write_served_repository
from stepdiff.settings import Settings


class Recorder:
    """A QueueObserver that keeps what it was told."""

    def __init__(self):
        self.length = 0
        self.waits: list[float] = []
        self.rejections: Counter[str] = Counter()

    def queued(self, change: int) -> None:
        self.length += change

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections[reason] += 1


def door(path: Path, limit: int = 2, max_queue: int = 4, timeout: float = 5.0) -> Admission:
    return Admission(SharedSlots(path, limit, max_queue), timeout, Recorder(), poll=0.01, check=0.01)


def never() -> bool:
    return False


def test_waiters_start_in_arrival_order_across_processes_and_the_overflow_is_refused(tmp_path):
    """3x the limit: two run, four wait and start oldest first as slots free, in either process; the
    seventh is refused at once, naming max_queue."""
    path = tmp_path / "slots.json"
    doors = [door(path), door(path)]
    started: list[int] = []
    release = {index: asyncio.Event() for index in range(6)}

    async def generation(index: int) -> None:
        async with doors[index % 2].slot(never) as admitted:
            assert admitted
            started.append(index)
            await release[index].wait()

    async def scenario() -> None:
        tasks = []
        for index in range(6):
            tasks.append(asyncio.ensure_future(generation(index)))
            await asyncio.sleep(0.02)
        assert started == [0, 1]
        assert [item.observer.length for item in doors] == [2, 2]
        with pytest.raises(QueueFull, match=r"2 generations in progress \(limit 2\) and 4 waiting \(max_queue 4\)"):
            async with doors[0].slot(never):
                pass
        for index in (1, 0, 3, 2, 5, 4):  # finishing out of order does not change who starts next
            release[index].set()
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert started == [0, 1, 2, 3, 4, 5]
    assert [item.observer.length for item in doors] == [0, 0]
    assert sum(len(item.observer.waits) for item in doors) == 6
    assert doors[0].observer.rejections == {"queue_full": 1}
    assert json.loads(path.read_text()) == {"running": [], "waiting": []}


def test_a_waiter_times_out_naming_queue_timeout_seconds_and_leaves_the_queue(tmp_path):
    admission = door(tmp_path / "slots.json", limit=1, max_queue=1, timeout=0.2)

    async def scenario() -> None:
        async with admission.slot(never):
            for _ in range(2):  # the second could not queue (max_queue 1) if the first had stayed
                with pytest.raises(QueueTimeout, match=r"waited 0.2 s \(queue_timeout_seconds\)") as raised:
                    async with admission.slot(never):
                        pytest.fail("started while the slot is held")
                assert isinstance(raised.value, ServerBusy)  # UNAVAILABLE for the client

    asyncio.run(scenario())
    assert admission.observer.rejections == {"queue_timeout": 2}
    assert admission.observer.length == 0 and min(admission.observer.waits[1:]) >= 0.2


def test_a_cancelled_waiter_leaves_without_taking_a_slot(tmp_path):
    admission = door(tmp_path / "slots.json", limit=1)
    cancelled = False
    order: list[str] = []

    async def holder() -> None:
        async with admission.slot(never):
            await asyncio.sleep(0.2)
        order.append("holder done")

    async def cancelling() -> None:
        async with admission.slot(lambda: cancelled) as admitted:
            order.append(f"cancelling admitted={admitted}")

    async def later() -> None:
        async with admission.slot(never) as admitted:
            order.append(f"later admitted={admitted}")

    async def scenario() -> None:
        nonlocal cancelled
        tasks = [asyncio.ensure_future(holder())]
        await asyncio.sleep(0.02)
        tasks.append(asyncio.ensure_future(cancelling()))
        await asyncio.sleep(0.02)
        tasks.append(asyncio.ensure_future(later()))
        await asyncio.sleep(0.02)
        cancelled = True
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert order == ["cancelling admitted=False", "holder done", "later admitted=True"]
    assert admission.observer.length == 0


def test_no_queue_refuses_at_once_past_the_limit(tmp_path):
    admission = door(tmp_path / "slots.json", limit=1, max_queue=0)

    async def scenario() -> None:
        async with admission.slot(never):
            with pytest.raises(QueueFull, match=r"1 generations in progress \(limit 1\) and 0 waiting \(max_queue 0\)"):
                async with admission.slot(never):
                    pass

    asyncio.run(scenario())


def test_an_announced_stop_refuses_the_waiters_and_new_generations(tmp_path):
    """Once the stop file is there (the launcher's announce_stop), a waiter is refused within a check and
    leaves the queue, a new generation is refused at once; the running one keeps its slot until it ends."""
    admission = door(tmp_path / "slots.json", limit=1)
    outcomes: list[str] = []

    async def waiter() -> None:
        with pytest.raises(ServerStopping, match="server stopping: no new generation starts"):
            async with admission.slot(never):
                pass
        outcomes.append("waiter refused")

    async def scenario() -> None:
        async with admission.slot(never):
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0.05)
            assert admission.observer.length == 1
            admission.slots.stop_path.touch()
            await task
            with pytest.raises(ServerStopping):
                async with admission.slot(never):
                    pass
        outcomes.append("running one ended")

    asyncio.run(scenario())
    assert outcomes == ["waiter refused", "running one ended"]
    assert admission.observer.length == 0 and json.loads((tmp_path / "slots.json").read_text()) == {
        "running": [],
        "waiting": [],
    }


def test_the_slots_of_a_process_that_is_gone_go_to_the_waiters(tmp_path):
    path = tmp_path / "slots.json"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = SharedSlots(path, limit=1, max_queue=1, owner=process_identity(child.pid))
        assert gone.join("held by the child")
        here = SharedSlots(path, limit=1, max_queue=1)
        assert not here.join("mine")
        assert here.running(["mine"]) == set()
    finally:
        child.kill()
        child.wait()
    assert here.running(["mine"]) == {"mine"}
    assert process_identity(child.pid) == ""
    assert process_identity(os.getpid()).startswith(f"{os.getpid()}-")


@pytest.mark.parametrize(
    ("limit", "instances", "admitted"),
    [(256, 1, 256), (256, 2, 256), (5, 2, 4), (7, 3, 6), (2, 4, 2), (1, 2, 1)],
)
def test_txt2img_admits_what_the_denoise_step_instances_admit_together(limit, instances, admitted):
    assert Settings(max_active_sequences=limit).generations_admitted(instances) == admitted


def test_txt2img_reads_what_the_served_denoise_step_instances_admit(tmp_path):
    served = write_served_repository(TEMPLATE, tmp_path / "gpus", (), gpus=(0, 1))
    assert generations_admitted(served, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "5"}) == 4
    assert generations_admitted(TEMPLATE, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "5"}) == 5


def test_tritons_python_threads_cover_every_admitted_generations_step_calls(tmp_path):
    """Every admitted generation on one orchestrator model, spread over its instances (txt2img_stream:
    one per GPU), each with step_lookahead calls out."""
    assert python_backend_threads(TEMPLATE, {}) == 256 * 2 + 8
    assert (
        python_backend_threads(TEMPLATE, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "20", "STEPDIFF_STEP_LOOKAHEAD": "3"}) == 68
    )
    served = write_served_repository(TEMPLATE, tmp_path / "gpus", (), gpus=(0, 1))
    assert python_backend_threads(served, {}) == 128 * 2 + 8
    assert python_backend_threads(served, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "41"}) == 20 * 2 + 8  # 40 admitted
    # at most 8192 threads over all instances (8 on one GPU, 16 on two), never fewer than Triton's 32
    assert python_backend_threads(TEMPLATE, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "100000"}) == 1024
    assert python_backend_threads(served, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "100000"}) == 512
    assert python_backend_threads(TEMPLATE, {"STEPDIFF_MAX_ACTIVE_SEQUENCES": "1"}) == 32


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_queue": -1}, "max_queue=-1: must be >= 0"),
        ({"queue_timeout_seconds": 0.0}, "queue_timeout_seconds=0.0: must be > 0 and finite"),
        ({"queue_timeout_seconds": float("inf")}, "queue_timeout_seconds=inf: must be > 0 and finite"),
        ({"sequence_idle_seconds": 0.0}, "sequence_idle_seconds=0.0: must be > 0 and finite"),
    ],
)
def test_bad_queue_settings_name_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        Settings(**values).validate()
