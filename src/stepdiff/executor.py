"""The thread pool behind txt2img's BLS calls: one thread per call in flight, and no more.

Triton 2.51's stub runs every ``async_exec`` as ``loop.run_in_executor(None, ...)``, so each BLS call in
flight holds a thread of the loop's default executor until it is answered. ``ThreadPoolExecutor``
counts its idle threads with a semaphore that a worker releases only after the call's future is
resolved. The event loop, woken by that future, often submits the generation's next call first, finds
no idle thread and starts one more. Threads never exit, so under a steady stream of short calls they
creep up to ``max_workers``: on a 16-core GPU machine txt2img went from 44 to 156 threads in 90 s at 90
requests/s, each new one about 70 KiB of host memory that never came back
(results/2026-11-22-h200-host-memory).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class DemandThreadPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that starts a thread only when more calls are unfinished than it has threads.

    A call counts as finished as soon as its function returns, before its future resolves, so the
    thread that ran it is already counted free when the next call arrives.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "stepdiff-bls"):
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._unfinished = 0
        self._count_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._count_lock:
            self._unfinished += 1
        return super().submit(self._counted, fn, args, kwargs)

    def _counted(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            with self._count_lock:
                self._unfinished -= 1

    def _adjust_thread_count(self) -> None:
        # Called by submit with the new call already counted. The base class decides from its idle
        # semaphore, which lags (see the module docstring); the exact count decides here.
        if self._unfinished <= len(self._threads):
            return
        while self._idle_semaphore.acquire(timeout=0):  # stale idle credits would stop the start below
            pass
        super()._adjust_thread_count()
