"""Find and start a real ``tritonserver`` with the stepdiff model repository, and watch its models.

The server binary comes from ``$TRITONSERVER``, ``PATH`` (as in the NGC container) or the
``nvidia-pytriton`` wheel.  The Python backend stub must match the running interpreter, ignores
``PYTHONPATH`` and runs the first ``python3`` on ``PATH``; :func:`server_environment` takes care of
all three.

Every model instance runs in its own stub process. Triton 2.51 neither restarts a stub that died
(python_backend removed that in r24.07) nor reports it on its health endpoints, so
:class:`TritonProcess` finds the stubs in ``/proc`` and can tell which died and restart the server.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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


def _stepdiff_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stepdiff"


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
    folder = _stepdiff_cache() / f"libpython-{hashlib.sha256(str(Path(libdir) / name).encode()).hexdigest()[:12]}"
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
    backends = _stepdiff_cache() / f"backends-py{PYTHON_VERSION}-{key}"
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


def server_environment(installation: TritonInstallation, variables: dict[str, str]) -> dict[str, str]:
    """Environment for tritonserver: our libpython first (alone: see ``libpython_directory``), our
    interpreter's bin first, ``variables`` (STEPDIFF_* of the flags given) over the user's."""
    env = dict(os.environ)
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
    extra_args: Sequence[str] = field(default_factory=tuple)


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
        *options.extra_args,
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


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a killed stub stays a zombie (state Z), as Triton does not reap it."""
    stat = _process_stat(pid)
    return stat is not None and stat[0] not in _ENDED


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

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, http_port: int):
        self.command = command
        self.env = env
        self.log_path = log_path
        self.http_url = f"http://127.0.0.1:{http_port}"
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

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (Triton unloads models and exits), SIGKILL to the server and its stubs after
        ``timeout``; returns the exit code. The stubs' shared memory is freed either way."""
        if self.process.poll() is None:
            self.stubs = list({stub.pid: stub for stub in [*self.stubs, *stub_processes(self.process.pid)]}.values())
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
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
    return TritonProcess(command, server_environment(installation, variables), log_path, options.http_port)
