"""Session fixtures: a tiny SD pipeline built offline and one real tritonserver serving it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "client"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import generate as txt2img_client  # noqa: E402  (client/generate.py)

from stepdiff.server import StubProcess, free_ports, stub_processes, tritonserver_pid  # noqa: E402

ADMIN_KEY = "test-admin-key"
CPU_THREADS = 1  # the server's models and the reference pipeline must use the same thread count
# CI runs on CPU in float32; on a GPU machine the same tests run with e.g. STEPDIFF_TEST_DEVICE=cuda
# STEPDIFF_TEST_DTYPE=float16, comparing against diffusers on the same device and dtype.
DEVICE = os.environ.get("STEPDIFF_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("STEPDIFF_TEST_DTYPE", "float32")


def require_system(missing: str, install: str) -> None:
    """A system package a test needs is absent. Under .ci/run (which installs it and sets
    STEPDIFF_REQUIRE_SYSTEM=1) that fails the test; elsewhere the test is skipped, saying what to install,
    so that `make test` on a machine with only python3-venv and make reports it instead of failing."""
    message = f"{missing} is not installed ({install})"
    if os.environ.get("STEPDIFF_REQUIRE_SYSTEM"):
        pytest.fail(message)
    pytest.skip(message + "; .ci/run installs it and runs this test")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from stepdiff.tiny import make_tiny

    return make_tiny("sd", tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@dataclass
class Server:
    http_url: str
    grpc_url: str
    metrics_url: str
    log_file: Path
    openai_url: str = ""  # the OpenAI images API's base URL, e.g. http://127.0.0.1:PORT/v1, where served

    def metric(self, name: str, **labels: str) -> float:
        """Current value of a stepdiff metric (summed over the label sets that have ``labels``)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        wanted = [f'{label}="{value}"' for label, value in labels.items()]
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and all(label in line.split("}")[0] for label in wanted)
        ]
        assert values, f"metric {name} not exported"
        return sum(values)

    def triton_pid(self) -> int | None:
        """The tritonserver serving this server (other test servers run here too)."""
        return tritonserver_pid(int(self.http_url.rsplit(":", 1)[1]))

    def stubs(self) -> list[StubProcess]:
        """Its tritonserver's model processes."""
        return stub_processes(self.triton_pid())

    def client(self, protocol: str = "grpc"):
        module = txt2img_client.client_module(protocol)
        return module, module.InferenceServerClient(self.grpc_url if protocol == "grpc" else self.http_url)

    def txt2img(self, prompt: str, protocol: str = "grpc", **options) -> tuple[np.ndarray, int]:
        module, client = self.client(protocol)
        with client:
            image, seed, _ = txt2img_client.generate(client, module, prompt, options)
        return image, seed


def start_launcher(
    pipeline: Path, log_file: Path, *extra: str, environ: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[subprocess.Popen, list[int]]:
    ports = free_ports(3)
    command = [
        sys.executable,
        "-m",
        "stepdiff",
        "serve",
        "--pipeline",
        str(pipeline),
        "--http-port",
        str(ports[0]),
        "--grpc-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--cpu-threads",
        str(CPU_THREADS),
        "--device",
        DEVICE,
        "--dtype",
        DTYPE,
        "--log-file",
        str(log_file),
        *extra,
    ]
    env = {**os.environ, "STEPDIFF_ADMIN_KEY": ADMIN_KEY, **(environ or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    return process, ports


def wait_for_line(process: subprocess.Popen, marker: str, timeout: float = 300) -> list[str]:
    """Read the launcher's output until ``marker`` appears; fail with everything it printed."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line.rstrip())
        if marker in line:
            return lines
    raise AssertionError(f"launcher never printed {marker!r}; output:\n" + "\n".join(lines))


def final_latents_of_mixes(denoiser, runner, conditioning: dict, options: tuple, mixes: list, first: int = 0) -> list:
    """For each mix (one LoRA setting per request), its requests stepping together through a StepEngine on
    ``runner`` until done: their final latents, one list per mix. Mix ``m``'s requests are sequences (and
    seeds) ``10 * (first + m) + i``; ``options`` are GenerationParams' after prompt, negative and seed."""
    from stepdiff.adapters import GenerationParams
    from stepdiff.engine import StepCall, StepEngine

    def params(seed: int, setting: tuple) -> GenerationParams:
        return GenerationParams("a cat", None, seed, *options, loras=setting)

    engine = StepEngine(denoiser, 8, 8, 60, runner)
    finals = []
    for index, mix in enumerate(mixes, start=first):
        ids = [10 * index + request for request in range(len(mix))]
        results = engine.run(
            [
                StepCall(i, start=True, conditioning=conditioning, params=params(i, setting))
                for i, setting in zip(ids, mix, strict=True)
            ]
        )
        assert all(result.error is None for result in results), results
        while not results[0].done:
            results = engine.run([StepCall(i) for i in ids])
            assert all(result.error is None for result in results), results
        results = engine.run([StepCall(i, end=True) for i in ids])  # the final latents; frees the states
        assert all(result.error is None and result.done for result in results), results
        finals.append([result.latents for result in results])
    return finals


PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT, WAIT_ALL = 17, 0x4206, 0x4207, 0x40000000  # <sys/ptrace.h>, __WALL
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def hang_main_thread(stub: StubProcess) -> None:
    """Stop only the main thread of a model's process, which runs ``execute``, with ptrace (this test's thread
    becomes its tracer): a hung model. Its other threads run on, the stub's health thread among them, so
    Triton notices nothing (a SIGSTOP, which stops them all, it reports as "not healthy")."""
    if LIBC.ptrace(PTRACE_SEIZE, stub.pid, None, None) != 0:
        pytest.skip(f"ptrace is not permitted here: {os.strerror(ctypes.get_errno())}")
    assert LIBC.ptrace(PTRACE_INTERRUPT, stub.pid, None, None) == 0, os.strerror(ctypes.get_errno())
    os.waitpid(stub.pid, WAIT_ALL)  # until it stops


def release_main_thread(stub: StubProcess) -> None:
    """Let the main thread that ``hang_main_thread`` stopped run on (from the thread that stopped it)."""
    assert LIBC.ptrace(PTRACE_DETACH, stub.pid, None, None) == 0, os.strerror(ctypes.get_errno())


WARMUP = "64x64,48x64"  # the session server's --warmup


@contextlib.contextmanager
def running_server(
    pipeline: Path,
    log_file: Path,
    *extra: str,
    environ: dict[str, str] | None = None,
    cwd: Path | None = None,
    allowed_fatal_errors: frozenset[str] = frozenset(),
):
    """``stepdiff serve`` until the block ends; then SIGINT, which must stop it cleanly. A "Fatal Python
    error" in Triton's log fails the test unless its kind is in ``allowed_fatal_errors`` (e.g. "Aborted",
    when a test aborts a model process on purpose)."""
    process, (http_port, grpc_port, metrics_port) = start_launcher(pipeline, log_file, *extra, environ=environ, cwd=cwd)
    try:
        wait_for_line(process, "stepdiff: ready")
    except AssertionError:
        process.kill()
        raise
    try:
        yield Server(
            f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", log_file
        )
    finally:  # also when the test failed: never leave a server behind
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, f"launcher did not stop cleanly:\n{output}"
    assert "stepdiff: stopped" in output
    fatal = set(re.findall(r"Fatal Python error: (\w+)", log_file.read_text(errors="replace")))
    assert fatal <= allowed_fatal_errors, f"a model process crashed ({', '.join(sorted(fatal))}): {log_file}"


@pytest.fixture(scope="session")
def server(tiny_sd, tmp_path_factory):
    """The session's server; it also serves the OpenAI images API (tests/test_openai_api.py) and warms up
    two sizes at start (``WARMUP``)."""
    [openai_port] = free_ports(1)
    log_file = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with running_server(tiny_sd, log_file, "--openai-port", str(openai_port), "--warmup", WARMUP) as running:
        running.openai_url = f"http://127.0.0.1:{openai_port}/v1"
        yield running


def reference_pipeline(pipeline_class, path: Path, **kwargs):
    """The stock diffusers pipeline to compare against: the server's device, dtype and thread count."""
    from stepdiff.settings import torch_dtype

    torch.set_num_threads(CPU_THREADS)
    pipe = pipeline_class.from_pretrained(path, dtype=torch_dtype(DTYPE), **kwargs).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference(tiny_sd):
    """StableDiffusionPipeline, without the safety checker (the server does not run it either)."""
    from diffusers import StableDiffusionPipeline

    return reference_pipeline(StableDiffusionPipeline, tiny_sd, safety_checker=None, requires_safety_checker=False)


def reference_image(pipe, prompt: str, seed: int, scheduler: str | None = None, **kwargs) -> np.ndarray:
    """diffusers' image for these inputs, converted to uint8 exactly as txt2img's ``image`` output."""
    import diffusers

    original = pipe.scheduler
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        images = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    finally:
        pipe.scheduler = original
    return (images[0] * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def limited_server(tiny_sd, tmp_path_factory):
    """A second server with tight limits: 2 active sequences, 4 waiting for at most 10 s, 1 request per
    forward, 2 s idle TTL."""
    log_file = tmp_path_factory.mktemp("limited") / "tritonserver.log"
    limits = ("--max-active-sequences", "2", "--max-queue", "4", "--queue-timeout-seconds", "10")
    limits += ("--max-batch-size", "1")
    with running_server(tiny_sd, log_file, *limits, environ={"STEPDIFF_SEQUENCE_IDLE_SECONDS": "2"}) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from stepdiff.tiny import make_tiny

    return make_tiny("qwenimage", tmp_path_factory.mktemp("pipelines") / "tiny-qwenimage")


@pytest.fixture(scope="session")
def qwen_server(tiny_qwen, tmp_path_factory):
    with running_server(tiny_qwen, tmp_path_factory.mktemp("qwen-logs") / "tritonserver.log") as running:
        yield running


@pytest.fixture(scope="session")
def qwen_reference(tiny_qwen):
    """QwenImagePipeline."""
    from diffusers import QwenImagePipeline

    return reference_pipeline(QwenImagePipeline, tiny_qwen)


# The families tests/test_families.py serves, each with its diffusers pipeline class.
FAMILY_PIPELINES = {
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
}


@pytest.fixture(scope="session", params=list(FAMILY_PIPELINES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def family_pipeline(family, tmp_path_factory) -> Path:
    from stepdiff.tiny import make_tiny

    return make_tiny(family, tmp_path_factory.mktemp("pipelines") / f"tiny-{family}")


@pytest.fixture(scope="session")
def family_server(family, family_pipeline, tmp_path_factory):
    with running_server(family_pipeline, tmp_path_factory.mktemp(f"{family}-logs") / "tritonserver.log") as running:
        yield running


@pytest.fixture(scope="session")
def family_reference(family, family_pipeline):
    """The family's stock diffusers pipeline."""
    import diffusers

    return reference_pipeline(getattr(diffusers, FAMILY_PIPELINES[family]), family_pipeline)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from stepdiff.tiny import make_tiny

    return make_tiny("sdxl", tmp_path_factory.mktemp("pipelines") / "tiny-sdxl")


@pytest.fixture(scope="session")
def sdxl_reference(tiny_sdxl):
    """StableDiffusionXLPipeline, for in-process adapter tests."""
    from diffusers import StableDiffusionXLPipeline

    return reference_pipeline(StableDiffusionXLPipeline, tiny_sdxl)
