"""DemandThreadPool: as many threads as calls in flight, under the event-loop pattern of BLS calls."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stepdiff.executor import DemandThreadPool

CALLERS = 32


def peak_threads(executor: ThreadPoolExecutor, seconds: float) -> int:
    """Threads the executor has after CALLERS coroutines sent short blocking calls back to back for
    ``seconds`` through ``run_in_executor(None, ...)``, as the Triton stub's ``async_exec`` does."""

    async def caller(stop: float) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(id(asyncio.current_task()))
        while time.monotonic() < stop:
            await loop.run_in_executor(None, time.sleep, rng.uniform(0.0002, 0.002))

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(executor)
        stop = time.monotonic() + seconds
        await asyncio.gather(*(caller(stop) for _ in range(CALLERS)))

    asyncio.run(main())
    executor.shutdown(wait=True)
    return len(executor._threads)


def test_threads_stay_at_the_calls_in_flight():
    assert peak_threads(DemandThreadPool(max_workers=500), seconds=3.0) <= CALLERS


def test_the_standard_pool_overshoots_under_the_same_calls():
    """The reason for DemandThreadPool: if this starts failing, the standard pool no longer creeps."""
    threads = max(peak_threads(ThreadPoolExecutor(max_workers=500), seconds=3.0) for _ in range(3))
    assert threads > CALLERS


def test_results_and_errors_pass_through():
    with DemandThreadPool(max_workers=4) as executor:
        assert executor.submit(divmod, 7, 2).result() == (3, 1)
        with pytest.raises(ZeroDivisionError):
            executor.submit(divmod, 1, 0).result()
        assert executor._unfinished == 0
