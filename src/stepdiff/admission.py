"""Admission of generations: at most ``limit`` run at once in a server; later ones wait in a bounded FIFO.

txt2img and txt2img_stream run in several processes (one per Triton model instance; txt2img has four),
while the limit and the queue hold for the whole server. Their state is therefore one small JSON file
that the model processes of one tritonserver share: the generations running and those waiting, oldest
first, each with the process that holds it. Every change happens under an exclusive ``flock`` and
first drops the entries of processes that are gone, so a crashed process gives its slots back. Whoever
changes the file also starts the oldest waiters while slots are free, so a slot never waits for its
waiter's process; a process with waiters looks every ``poll`` seconds which of them started.

When the launcher stops the server it first announces the stop with a second file beside the first
(``announce_stop``): from then on no generation is admitted, those waiting are refused, and those
running end at their next step (``orchestrator.generate``), so that their denoise sequences are ended
while Triton still takes calls. (Triton 2.51's Python backend refuses every BLS call once the server
is exiting, and Triton's stop waits for the sequences still open until its exit timeout.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import Protocol


class ServerBusy(RuntimeError):
    """No room for the work now (too many generations or sequences); the caller should retry later."""


State = dict[str, list[list[str]]]  # "running" and "waiting": [entry, owner] pairs, oldest first


class QueueFull(ServerBusy):
    """Every slot is taken and ``max_queue`` generations already wait."""


class QueueTimeout(ServerBusy):
    """A generation waited ``queue_timeout_seconds`` and no slot came free for it."""


class ServerStopping(ServerBusy):
    """The server is stopping (``announce_stop``): no generation starts, and those running end."""


def process_identity(pid: int) -> str:
    """``PID-STARTTIME`` of a running process (unique even when pids are reused), "" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return f"{pid}-{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime


def is_alive(identity: str) -> bool:
    return process_identity(int(identity.partition("-")[0])) == identity


SLOTS_FOLDER = Path(tempfile.gettempdir()) / "stepdiff-admission"


def slots_file(server_pid: int) -> Path:
    """The file the model processes of the tritonserver ``server_pid`` share."""
    return SLOTS_FOLDER / f"{process_identity(server_pid)}.json"


STOPPING = "server stopping: no new generation starts; retry on another server or once it is back"


def stop_file(slots: Path) -> Path:
    """The file beside the slots file ``slots`` whose presence says that its server is stopping."""
    return slots.with_suffix(".stopping")


def announce_stop(server_pid: int) -> None:
    """Tell the generation models of the tritonserver ``server_pid`` that it is stopping."""
    SLOTS_FOLDER.mkdir(parents=True, exist_ok=True)
    stop_file(slots_file(server_pid)).touch()


def generations_in_server(server_pid: int) -> int:
    """Generations running or waiting in the tritonserver ``server_pid`` (txt2img's and txt2img_stream's,
    from their shared file; held by processes still alive), read under a shared lock: 0 before any."""
    try:
        fd = os.open(slots_file(server_pid), os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _, state = read_state(fd)
    finally:
        os.close(fd)  # and its lock
    return sum(1 for entries in state.values() for _, owner in entries if is_alive(owner))


def read_state(fd: int) -> tuple[bytes, State]:
    """The shared file's bytes and its state (no generation yet when it is empty); the caller holds its lock."""
    raw = os.pread(fd, os.fstat(fd).st_size, 0)
    return raw, json.loads(raw) if raw else {"running": [], "waiting": []}


class SharedSlots:
    """The running and waiting generations of one server, in a JSON file that its processes share; this
    one's entries belong to ``owner`` (default: this process)."""

    def __init__(self, path: Path, limit: int, max_queue: int, owner: str | None = None):
        self.limit, self.max_queue = limit, max_queue
        self.owner = owner or process_identity(os.getpid())
        self.stop_path = stop_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @classmethod
    def for_server(cls, limit: int, max_queue: int) -> SharedSlots:
        """The slots of the tritonserver whose model process this is (Triton starts them as its children),
        in the temporary directory; the files of servers that are gone are removed."""
        for stale in [*SLOTS_FOLDER.glob("*.json"), *SLOTS_FOLDER.glob("*.stopping")]:
            if not is_alive(stale.stem):
                stale.unlink(missing_ok=True)
        return cls(slots_file(os.getppid()), limit, max_queue)

    def close(self) -> None:
        os.close(self.fd)

    def stopping(self) -> bool:
        """Whether the launcher has announced the server's stop."""
        return self.stop_path.exists()

    @contextlib.contextmanager
    def _state(self) -> Iterator[State]:
        """The state, locked, with the dead processes' entries dropped and the oldest waiters started;
        what the block changes is written back (then waiters start again while slots are free)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw, state = read_state(self.fd)
            owners = {owner for entries in state.values() for _, owner in entries} - {self.owner}
            gone = {owner for owner in owners if not is_alive(owner)}
            for key, entries in state.items():
                state[key] = [entry for entry in entries if entry[1] not in gone]
            self._start_waiters(state)
            yield state
            self._start_waiters(state)
            data = json.dumps(state).encode()
            if data != raw:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, data, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _start_waiters(self, state: State) -> None:
        while state["waiting"] and len(state["running"]) < self.limit:
            state["running"].append(state["waiting"].pop(0))

    def join(self, entry: str) -> bool:
        """Add a generation: True when it runs now, False when it waits; QueueFull when the queue is full,
        ServerStopping when the server is stopping."""
        if self.stopping():
            raise ServerStopping(STOPPING)
        with self._state() as state:
            running, waiting = state["running"], state["waiting"]
            if len(running) < self.limit:  # then nobody waits
                running.append([entry, self.owner])
                return True
            if len(waiting) >= self.max_queue:
                raise QueueFull(
                    f"server busy: {len(running)} generations in progress (limit {self.limit}) and {len(waiting)} "
                    f"waiting (max_queue {self.max_queue}); retry later"
                )
            waiting.append([entry, self.owner])
            return False

    def running(self, entries: Collection[str]) -> set[str]:
        """Those of ``entries`` that run now."""
        with self._state() as state:
            return {entry for entry, _ in state["running"] if entry in entries}

    def leave(self, entry: str) -> None:
        """Take a generation out, running or waiting; its slot goes to the oldest waiter."""
        with self._state() as state:
            for key, entries in state.items():
                state[key] = [item for item in entries if item[0] != entry]


class QueueObserver(Protocol):
    """What admission reports (Triton metrics in a model)."""

    def queued(self, change: int) -> None:
        """This process's waiters grew or shrank by ``change``."""

    def waited(self, seconds: float) -> None:
        """A generation started (0 when at once), or left the queue, after ``seconds``."""

    def rejected(self, reason: str) -> None:
        """A generation was refused: ``queue_full`` or ``queue_timeout``."""


class Admission:
    """This process's door to the server's slots: ``slot`` holds one for a generation, after waiting its
    turn when all are taken."""

    def __init__(
        self, slots: SharedSlots, timeout: float, observer: QueueObserver, poll: float = 0.05, check: float = 0.1
    ):
        self.slots, self.timeout, self.observer = slots, timeout, observer
        self.poll = poll  # seconds between looks at the shared state while this process has waiters
        self.check = check  # seconds between a waiter's looks at its deadline and at is_cancelled
        self.waiters: dict[str, asyncio.Future[None]] = {}  # entry -> set once it runs
        self.timer: asyncio.TimerHandle | None = None

    @contextlib.asynccontextmanager
    async def slot(self, is_cancelled: Callable[[], bool]) -> AsyncIterator[bool]:
        """Hold a slot for the block. Yields False, holding none, when ``is_cancelled`` turned true while
        waiting. QueueFull at once when the queue is full, QueueTimeout after ``timeout`` s of waiting."""
        entry = secrets.token_hex(8)
        try:
            started = self.slots.join(entry)
        except QueueFull:
            self.observer.rejected("queue_full")
            raise
        try:
            if started:
                self.observer.waited(0.0)
            else:
                started = await self._wait(entry, is_cancelled)
            yield started
        finally:
            self.slots.leave(entry)
            self._wake_started()

    async def _wait(self, entry: str, is_cancelled: Callable[[], bool]) -> bool:
        """Wait until ``entry`` runs (True) or the client cancels (False); QueueTimeout past ``timeout``,
        ServerStopping once the server is stopping."""
        began = time.monotonic()
        started = self.waiters[entry] = asyncio.get_running_loop().create_future()
        self.observer.queued(1)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.poll, self._poll)
        try:
            while not started.done():
                if is_cancelled():
                    return False
                if self.slots.stopping():
                    raise ServerStopping(STOPPING)
                left = began + self.timeout - time.monotonic()
                if left <= 0:
                    self.observer.rejected("queue_timeout")
                    raise QueueTimeout(
                        f"server busy: waited {self.timeout:g} s (queue_timeout_seconds) and none of the "
                        f"{self.slots.limit} generation slots came free; retry later"
                    )
                await asyncio.wait([started], timeout=min(self.check, left))
            return True
        finally:
            del self.waiters[entry]
            self.observer.queued(-1)
            self.observer.waited(time.monotonic() - began)

    def _wake_started(self) -> None:
        """Wake this process's waiters that run now."""
        if self.waiters:
            for entry in self.slots.running(self.waiters.keys()):
                if not self.waiters[entry].done():
                    self.waiters[entry].set_result(None)

    def _poll(self) -> None:
        self._wake_started()
        self.timer = asyncio.get_running_loop().call_later(self.poll, self._poll) if self.waiters else None

    def close(self) -> None:
        """Stop looking at the shared state (the model is finalized)."""
        if self.timer is not None:
            self.timer.cancel()
        self.slots.close()
