"""Find and start a real ``tritonserver`` with the stepdiff model repository, and watch its models.

The server binary comes from ``$TRITONSERVER``, ``PATH`` (as in the NGC container) or the
``nvidia-pytriton`` wheel.  The Python backend stub must match the running interpreter, ignores
``PYTHONPATH`` and runs the first ``python3`` on ``PATH``; :func:`server_environment` takes care of
all three.

Every model instance runs in its own stub process. Triton 2.51 neither restarts a stub that died
(python_backend removed that in r24.07) nor reports it on its health endpoints, so
:class:`TritonProcess` finds the stubs in ``/proc`` and can tell which died and restart the server.
Nor does it notice a model that stops answering without dying: :class:`StallDetector` tells one from
Triton's metrics (work waiting, none answered) and ``/proc`` (a process stopped by a signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .settings import cache_folder

TRITON_VERSION = "2.51.0"
# Endpoints that change the server (load/unload models, register shared memory, logging, tracing)
# need this header with the admin key; inference, health, metadata and statistics stay open.
ADMIN_HEADER = "stepdiff-admin-key"
RESTRICTED_APIS = "model-repository,shared-memory,logging,trace"
MODELS = ("text_encoder", "denoise_step", "vae_decode", "txt2img", "txt2img_stream")
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


class LaunchError(RuntimeError):
    """The server could not be found, started, or a model failed to load."""


@dataclass(frozen=True)
class TritonInstallation:
    """Where the server binary, its backends and its shared libraries live."""

    binary: Path
    backend_directory: Path
    library_directories: tuple[Path, ...] = ()


def _pytriton_root() -> Path | None:
    """The installed ``pytriton`` folder (a namespace package when only its server was unpacked)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _wheel_stub(pytriton_root: Path | None) -> Path | None:
    if pytriton_root is None:
        return None
    stub = pytriton_root / "tritonserver" / "python_backend_stubs" / PYTHON_VERSION / "triton_python_backend_stub"
    return stub if stub.is_file() else None


def libpython_directory() -> Path | None:
    """A folder holding only a link to the running interpreter's ``libpython`` (the stub links it).

    The interpreter's own LIBDIR cannot go on ``LD_LIBRARY_PATH``: where it is the system's library
    folder (``/usr/lib/x86_64-linux-gnu`` in CUDA images) it also holds a system cuDNN and cuBLAS,
    which would then shadow torch's own builds in every model process and change GPU results.
    """
    name = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not name or not libdir or not (Path(libdir) / name).is_file():
        return None  # a statically linked interpreter: nothing to provide
    folder = cache_folder() / f"libpython-{hashlib.sha256(str(Path(libdir) / name).encode()).hexdigest()[:12]}"
    link = folder / name
    if not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another launcher made it meanwhile
            link.symlink_to(Path(libdir) / name)
    return folder


def prepare_backend_directory(python_backend: Path, stub: Path) -> Path:
    """A backends folder holding ``python_backend`` with ``stub`` (built for the running Python).

    The stub runs the model code, so its Python version must be ours; Triton looks for it next to
    ``libtriton_python.so``. The folder is cached per server build and Python version.
    """
    key = hashlib.sha256(f"{python_backend.resolve()}|{stub.resolve()}".encode()).hexdigest()[:12]
    backends = cache_folder() / f"backends-py{PYTHON_VERSION}-{key}"
    prepared = backends / "python"
    if not (prepared / ".complete").exists():
        prepared.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(python_backend / name, prepared / name)
        shutil.copy2(stub, prepared / "triton_python_backend_stub")
        (prepared / ".complete").touch()
    return backends


def locate_triton() -> TritonInstallation:
    """The ``tritonserver`` to run: ``$TRITONSERVER``, then ``PATH`` (NGC layout), then the pytriton wheel.

    The Python backend comes with the server; its stub is the pytriton wheel's build for the running
    Python when there is one (the NGC image's own stub is built for its system Python).
    """
    wheel = _pytriton_root()
    explicit = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
    if explicit:
        binary = Path(explicit).resolve()
        if not binary.is_file():
            raise LaunchError(f"TRITONSERVER={explicit} is not a file")
        python_backend, libraries = binary.parent.parent / "backends" / "python", ()
    elif wheel is not None:
        binary = wheel / "tritonserver" / "bin" / "tritonserver"
        python_backend = wheel / "tritonserver" / "backends" / "python"
        libraries = (wheel.parent / "nvidia_pytriton.libs",)
    else:
        raise LaunchError(
            "no tritonserver found: set $TRITONSERVER, put tritonserver on PATH, or `pip install "
            "nvidia-pytriton==0.7.0`"
        )
    stub = _wheel_stub(wheel) or python_backend / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"no Python backend stub for Python {PYTHON_VERSION} (looked in {stub.parent})")
    return TritonInstallation(binary, prepare_backend_directory(python_backend, stub), libraries)


# glibc malloc settings for tritonserver and its model processes, unless the user sets them. glibc gives
# each thread an arena, up to 8 per core, and raises its mmap threshold once a large buffer is freed, so
# that later image-sized buffers come from those arenas instead of mmap. On a 16-core GPU machine
# tritonserver (330 threads) then grew by 18 MiB/min under the soak's load; with these, 1.5
# (results/2026-11-22-h200-host-memory). Triton's own advice is tcmalloc or jemalloc, which pip cannot
# install; a user who preloads one (LD_PRELOAD) can drop these.
MALLOC_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}


# glibc's mallopt parameters (malloc.h); the largest mmap threshold it takes is 32 MiB on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BUFFER_BYTES = 32 << 20  # host buffers up to this size come from the heap, and are reused
KEPT_FREE_HEAP_BYTES = 128 << 20  # free heap kept for the next request instead of trimmed


def keep_host_buffers_in_heap() -> bool:
    """Undo, in this stage process, the 128 KiB mmap threshold that ``stepdiff serve`` gives tritonserver
    (``MALLOC_ENVIRONMENT``), unless the user set another one. Under it every image-sized host buffer (a
    decoded image and its float copies, the text encoder's outputs) is a fresh mmap whose pages fault in
    one by one: the 512x512 decode's postprocess took 16 to 34 ms instead of 1.3 on a 2-core machine. A
    stage process (text_encoder, denoise_step, vae_decode) makes the same sizes request after request on
    one thread, so they are reused from the heap. Returns whether glibc took the new thresholds."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENVIRONMENT["MALLOC_MMAP_THRESHOLD_"]:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, HEAP_BUFFER_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_HEAP_BYTES)
        )
    except (OSError, AttributeError):  # not glibc: nothing of ours to undo
        return False


def server_environment(installation: TritonInstallation, variables: dict[str, str]) -> dict[str, str]:
    """Environment for tritonserver: our libpython first (alone: see ``libpython_directory``), our
    interpreter's bin first, ``MALLOC_ENVIRONMENT`` where the user set none, ``variables`` (STEPDIFF_*
    of the flags given) over the user's."""
    env = {**MALLOC_ENVIRONMENT, **os.environ}
    libdirs = [str(libpython_directory() or ""), *map(str, installation.library_directories)]
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(variables)
    return env


@dataclass
class ServerOptions:
    """Command-line level choices for one server run."""

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    admin_key: str = ""
    python_backend_threads: int = 0  # its thread-pool-size (0: Triton's default, 32)


def server_command(installation: TritonInstallation, options: ServerOptions) -> list[str]:
    """The tritonserver argument list: model control mode none (the repository is served as is) and
    the admin endpoints restricted to callers that send ``ADMIN_HEADER`` with the admin key."""
    admin_key = options.admin_key or secrets.token_urlsafe(24)  # no key given: nobody gets in
    restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}"
    return [
        str(installation.binary),
        f"--model-repository={options.model_repository}",
        f"--backend-directory={installation.backend_directory}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        "--model-control-mode=none",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--log-verbose={options.log_verbose}",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        *(
            [f"--backend-config=python,thread-pool-size={options.python_backend_threads}"]
            if options.python_backend_threads
            else []
        ),
    ]


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)'.*?: (.*)$")


def load_failures(log_text: str) -> list[str]:
    """Triton's one-line reasons for models that failed to load, from its log."""
    reasons = []
    for line in log_text.splitlines():
        match = _LOAD_FAILURE.search(line)
        if match:
            reason = match.group(2).split("\\n")[0].strip().rstrip('"')
            reasons.append(f"{match.group(1)}: {reason}")
    return list(dict.fromkeys(reasons))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


STUB_NAME = "triton_python_backend_stub"
SHARED_MEMORY = Path("/dev/shm")
# Seconds a server with a dead model gets to answer the requests in flight before it is killed.
DEAD_MODEL_GRACE = 5.0
# Seconds a stalled model process gets, after SIGABRT, to write its Python stacks and exit before SIGKILL.
ABORT_GRACE = 3.0


@dataclass(frozen=True)
class StubProcess:
    """The process of one model instance (a Python backend stub)."""

    pid: int
    model: str
    instance: str  # e.g. denoise_step_0_0, as Triton's "Stub process '...' is not healthy" names it
    shm_region: str  # its shared-memory region in /dev/shm, which a killed server leaves behind


def _process_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


_ENDED = ("Z", "X", "x")  # zombie, dead
_STOPPED = "T"  # stopped by a signal (SIGSTOP, SIGTSTP); a debugger's stop is "t" and does not count


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a killed stub stays a zombie (state Z), as Triton does not reap it."""
    stat = _process_stat(pid)
    return stat is not None and stat[0] not in _ENDED


def process_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (state T): it answers nothing until SIGCONT."""
    stat = _process_stat(pid)
    return stat is not None and stat[0] == _STOPPED


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The running stub processes of a tritonserver: its children whose program is the stub."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _process_stat(int(entry.name))
        if stat is None or stat[1] != server_pid or stat[0] in _ENDED:
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            # stub_launcher.cc: stub <model.py> <shm region> <size> <growth> <parent pid> <lib dir> <ipc> <instance> ...
            if Path(argv[0]).name == STUB_NAME and len(argv) > 8:
                stubs.append(StubProcess(int(entry.name), Path(argv[1]).parent.parent.name, argv[8], argv[2]))
    return sorted(stubs, key=lambda stub: stub.instance)


# nvidia-smi's GPU memory per process, for the soak's samples and the GPU tests
GPU_MEMORY_QUERY = ("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")


def gpu_mib_by_pid(query_output: str) -> dict[int, float]:
    """``GPU_MEMORY_QUERY``'s output as MiB per process id, summed over GPUs; lines without numbers
    (e.g. "[N/A]") are left out."""
    used: dict[int, float] = {}
    for line in query_output.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
    return used


def tritonserver_pid(http_port: int) -> int | None:
    """The local tritonserver listening on ``http_port`` (found by its command line), if any."""
    flag = f"--http-port={http_port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"/tritonserver") and flag in argv:
                return int(entry.name)
    return None


# Triton's metrics (per model) that tell whether a model has work and answers it, and the one txt2img adds
ANSWERED_METRICS = ("nv_inference_request_success", "nv_inference_request_failure")
QUEUED_METRIC = "nv_inference_pending_request_count"
STAGE_CALLS_METRIC = "stepdiff_stage_calls_in_flight"  # txt2img's calls to a stage not yet answered
_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class ModelActivity:
    """One model's work as Triton's metrics show it at one moment."""

    answered: float = 0.0  # requests answered since the server started, with a result or an error
    queued: float = 0.0  # requests waiting in Triton's scheduler (not yet handed to the model)
    called: float = 0.0  # txt2img's calls to this model in flight: queued, running or stuck in it

    @property
    def waiting(self) -> bool:
        """Whether any request waits for this model's answer."""
        return self.queued > 0 or self.called > 0


def model_activity(metrics_text: str) -> dict[str, ModelActivity]:
    """Per model, from the Prometheus text of Triton's metrics endpoint (label sets summed)."""
    totals: dict[str, dict[str, float]] = {}
    for line in metrics_text.splitlines():
        sample = _SAMPLE.match(line)
        if sample is None:
            continue
        name, labels, value = sample.group(1), dict(_LABEL.findall(sample.group(2))), float(sample.group(3))
        if name in ANSWERED_METRICS:
            model, field_name = labels.get("model"), "answered"
        elif name == QUEUED_METRIC:
            model, field_name = labels.get("model"), "queued"
        elif name == STAGE_CALLS_METRIC:
            model, field_name = labels.get("stage"), "called"
        else:
            continue
        if model:
            fields = totals.setdefault(model, {})
            fields[field_name] = fields.get(field_name, 0.0) + value
    return {model: ModelActivity(**fields) for model, fields in totals.items()}


class StallDetector:
    """Finds the models that stopped answering, from what :meth:`observe` is shown about once a second.

    A model stalls when work waits for it (requests queued in Triton, or txt2img's calls to it in
    flight) and it has answered none for ``stall_seconds``: every answer, success or error, resets the
    clock, so a long generation whose steps keep completing never stalls. A model process stopped by
    a signal (state T) stalls after ``stall_seconds`` too: Triton 2.51 fails its requests as "not
    healthy" after about a second, so no work stays waiting for it, and it never answers again.
    """

    def __init__(self, stall_seconds: float):
        self.stall_seconds = stall_seconds
        self.reset()

    def reset(self) -> None:
        """Forget what was seen (a new server: its metrics start from zero)."""
        # model with work waiting -> (requests answered, since when: the first look with work, or the last answer)
        self._answered: dict[str, tuple[float, float]] = {}
        self._stopped_since: dict[int, float] = {}  # pid -> when first seen stopped

    def observe(self, now: float, activity: dict[str, ModelActivity], stopped: Sequence[StubProcess]) -> dict[str, str]:
        """The stalled models, each with what was seen, e.g. ``{"denoise_step": "answered no request for
        120 s (--stall-seconds 120) while 4 calls from txt2img and 4 queued requests waited"}``. ``now`` is
        monotonic seconds; a model missing from ``activity`` (metrics not read this time) keeps its clock."""
        stalled = {}
        for model, current in activity.items():
            if not current.waiting:
                self._answered.pop(model, None)
                continue
            answered, since = self._answered.get(model, (current.answered, now))
            if current.answered != answered:
                since = now
            self._answered[model] = (current.answered, since)
            if now - since >= self.stall_seconds:
                stalled[model] = (
                    f"answered no request for {now - since:.0f} s (--stall-seconds {self.stall_seconds:g}) while "
                    f"{current.called:.0f} calls from txt2img and {current.queued:.0f} queued requests waited"
                )
        self._stopped_since = {stub.pid: self._stopped_since.get(stub.pid, now) for stub in stopped}
        for stub in stopped:
            seconds = now - self._stopped_since[stub.pid]
            if seconds >= self.stall_seconds:
                stalled.setdefault(
                    stub.model,
                    f"has been stopped by a signal for {seconds:.0f} s (--stall-seconds {self.stall_seconds:g}): "
                    f"pid {stub.pid}, instance {stub.instance}, state T",
                )
        return stalled


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports that are free right now (for tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class TritonProcess:
    """A running tritonserver whose log goes to a file; readiness, failures and its model processes."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, http_port: int, metrics_port: int):
        self.command = command
        self.env = env
        self.log_path = log_path
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.stubs: list[StubProcess] = []  # found when the server last became ready
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._launch(open(log_path, "wb"))  # noqa: SIM115 - the server writes it until stop() closes it

    def _launch(self, log: BinaryIO) -> None:
        self._log = log
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(
        self, models: Sequence[str] = MODELS, timeout: float = 600.0, stop: threading.Event | None = None
    ) -> None:
        """Block until the server and every model are ready (or ``stop`` is set); then note the stub
        processes. Raise LaunchError with Triton's reason when the server exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if self.process.poll() is not None:
                reasons = load_failures(self.log_text())
                detail = "\n  ".join(reasons) or self._log_tail()
                raise LaunchError(
                    f"tritonserver exited with code {self.process.returncode}:\n  {detail}\n(full log: {self.log_path})"
                )
            if _http_ok(f"{self.http_url}/v2/health/ready") and all(
                _http_ok(f"{self.http_url}/v2/models/{name}/ready") for name in models
            ):
                self.stubs = stub_processes(self.process.pid)
                return
            time.sleep(0.5)
        if stop and stop.is_set():
            return
        raise LaunchError(f"models not ready after {timeout:.0f} s (log: {self.log_path})")

    def _log_tail(self, lines: int = 15) -> str:
        return "\n  ".join(self.log_text().splitlines()[-lines:])

    def dead_stubs(self) -> list[StubProcess]:
        """The model processes that ran when the server became ready and have exited since."""
        return [stub for stub in self.stubs if not process_alive(stub.pid)]

    def stopped_stubs(self) -> list[StubProcess]:
        """The model processes stopped by a signal (SIGSTOP, SIGTSTP): alive, and answering nothing."""
        return [stub for stub in self.stubs if process_stopped(stub.pid)]

    def model_activity(self) -> dict[str, ModelActivity]:
        """Every model's answered, queued and called requests from Triton's metrics; empty when unreadable."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                return model_activity(response.read().decode(errors="replace"))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return {}

    def abort(self, stubs: Sequence[StubProcess], grace: float = ABORT_GRACE) -> None:
        """End model processes that stopped answering, so that Triton fails their requests in flight
        ("Stub process '<instance>' is not healthy", which clients get as UNAVAILABLE) instead of leaving
        them to the restart, which would close their connections unanswered.

        SIGABRT first (and SIGCONT, which a stopped process needs to take it), as systemd's watchdog
        does: the models' faulthandler writes every thread's Python stack to the Triton log, which shows
        where the model hung. SIGKILL to those still running after ``grace`` seconds."""
        for stub in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub.pid, signal.SIGABRT)
                os.kill(stub.pid, signal.SIGCONT)
        deadline = time.monotonic() + grace
        while any(process_alive(stub.pid) for stub in stubs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for stub in stubs:
            if process_alive(stub.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stub.pid, signal.SIGKILL)

    def stop(self, timeout: float = 30.0, now: threading.Event | None = None) -> int:
        """SIGTERM (Triton unloads models and exits), SIGKILL to the server and its stubs after
        ``timeout``, or as soon as ``now`` is set; returns the exit code. The stubs' shared memory is freed
        either way."""
        if self.process.poll() is None:
            self.stubs = list({stub.pid: stub for stub in [*self.stubs, *stub_processes(self.process.pid)]}.values())
            self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline and not (now and now.wait(0.1)):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.1 if now else max(deadline - time.monotonic(), 0))
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        for stub in self.stubs:  # a model that never unloaded (a dead stub, a kill) leaves its region
            with contextlib.suppress(FileNotFoundError):
                (SHARED_MEMORY / stub.shm_region).unlink()
        self.stubs = []
        return self.process.returncode

    def restart(self, reason: str, stop: threading.Event | None = None) -> None:
        """Stop the server (killed after DEAD_MODEL_GRACE s), start it again with the same command,
        ports and settings, and wait until every model is ready (or ``stop`` is set).

        During the grace Triton's HTTP endpoint already refuses new connections while requests in
        flight get their answers, e.g. the "is not healthy" error of a dead model. A server with a
        dead stub would not finish a graceful stop soon: it waits 30 s for that model to unload.
        """
        self.stop(timeout=DEAD_MODEL_GRACE)
        if stop and stop.is_set():
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - one log across restarts, closed by stop()
        log.write(f"stepdiff: restarting tritonserver: {reason}\n".encode())
        log.flush()
        self._launch(log)
        try:
            self.wait_ready(stop=stop)
        except BaseException:
            self.stop()
            raise


def check_ports_free(ports: Sequence[int]) -> None:
    """LaunchError naming a port something already listens on (it would answer our readiness checks)."""
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as error:
                raise LaunchError(
                    f"port {port} is not free ({error.strerror}): another server? "
                    "Choose others with --http-port / --grpc-port / --metrics-port"
                ) from None


def start_triton(options: ServerOptions, variables: dict[str, str], log_path: Path) -> TritonProcess:
    """Start tritonserver with ``variables`` (STEPDIFF_* settings, over the user's) in the models' environment."""
    check_ports_free((options.http_port, options.grpc_port, options.metrics_port))
    installation = locate_triton()
    command = server_command(installation, options)
    env = server_environment(installation, variables)
    return TritonProcess(command, env, log_path, options.http_port, options.metrics_port)
