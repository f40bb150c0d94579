"""denoise_step's step loop: each forward takes every generation whose next step call has arrived.

Triton's ``oldest`` sequence batcher hands a sequence's next call to the model only once the execute
holding its previous call has returned, and the next execute starts at that same moment with the calls
that were queued meanwhile: under load, generations split into groups that take turns on the GPU (19
to 25 of 32 generations per forward on an H200, however long the batcher's delay). So denoise_step's
``execute`` only decodes its calls, hands them here and returns (each call is answered later, through
its response sender), which lets Triton deliver every sequence's next call at once; txt2img keeps two
calls of a generation in flight, so the next one is already here when its step is due.

One thread runs the loop: whenever the engine is ready for another run (``StepEngine.run`` returns
once the GPU has at most that run queued), it takes the oldest waiting call of every sequence, in the
order they arrived, runs them as one batch and answers each. A sequence's later calls wait for later
runs, in order. When no call waits, the thread sweeps idle sequences every ``sweep_seconds``.
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .admission import ServerBusy
from .engine import StepCall, StepEngine, StepResult

Reply = Callable[[StepResult], None]  # answers one call; runs on the loop's thread
STOPPING = "server busy: denoise_step is stopping; retry later"


@dataclass
class WaitingCall:
    call: StepCall
    reply: Reply
    arrival: int  # order of arrival over all sequences


def arrival(waiting: WaitingCall) -> int:
    return waiting.arrival


def answer(reply: Reply, result: StepResult) -> None:
    """Reply to one call; a reply that fails is printed (to Triton's log) and the others still go out."""
    try:
        reply(result)
    except Exception:  # noqa: BLE001
        traceback.print_exc()


class StepLoop:
    """Runs the engine on its own thread over the calls submitted to it."""

    def __init__(self, engine: StepEngine, sweep_seconds: float, after_run: Callable[[], None] = lambda: None):
        self.engine = engine
        self.sweep_seconds = sweep_seconds
        self.after_run = after_run  # e.g. metrics; on the loop's thread, after every run and sweep
        self._waiting: dict[int, deque[WaitingCall]] = {}  # per sequence, oldest first
        self._arrivals = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="stepdiff-step-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, call: StepCall, reply: Reply) -> None:
        """Queue one call; ``reply`` gets its result once a run has taken it."""
        with self._changed:
            if self._stopping:
                answer(reply, StepResult(error=ServerBusy(STOPPING)))
                return
            queue = self._waiting.setdefault(call.correlation_id, deque())
            queue.append(WaitingCall(call, reply, next(self._arrivals)))
            self._changed.notify()

    def take(self) -> list[WaitingCall]:
        """The oldest waiting call of every sequence, in the order they arrived."""
        with self._changed:
            heads = [queue.popleft() for queue in self._waiting.values()]
            self._waiting = {cid: queue for cid, queue in self._waiting.items() if queue}
        return sorted(heads, key=arrival)

    def run_once(self) -> int:
        """One run over the calls taken now; returns how many it answered. STARTs and aborts, which take
        no step, run first and are answered at once (not after the GPU wait of the run's forwards).
        Every taken call gets an answer: a failure of a whole run answers each of its calls with it."""
        taken = self.take()
        self.engine.sweep()
        controls = [waiting for waiting in taken if waiting.call.start or waiting.call.abort]
        steps = [waiting for waiting in taken if not (waiting.call.start or waiting.call.abort)]
        for calls in (controls, steps):
            if calls:
                self._run(calls)
        self.after_run()
        return len(taken)

    def _run(self, taken: list[WaitingCall]) -> None:
        try:
            results = self.engine.run([waiting.call for waiting in taken])
        except Exception as error:  # noqa: BLE001 - answered to every call of the run
            results = [StepResult(error=error) for _ in taken]
        for waiting, result in zip(taken, results, strict=True):
            answer(waiting.reply, result)

    def _serve(self) -> None:
        if self.engine.runner.device.type == "cuda":  # per thread; streams, events and graphs use it
            torch.cuda.set_device(self.engine.runner.device)
        while True:
            with self._changed:
                if not self._waiting and not self._stopping:
                    self._changed.wait(self.sweep_seconds)
                if self._stopping:
                    return
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - e.g. a metric that failed: the loop goes on
                traceback.print_exc()

    def stop(self) -> None:
        """Stop the thread after its current run; calls still waiting are answered "server busy"."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()
        with self._changed:
            left = sorted((waiting for queue in self._waiting.values() for waiting in queue), key=arrival)
            self._waiting = {}
        for waiting in left:
            answer(waiting.reply, StepResult(error=ServerBusy(STOPPING)))
