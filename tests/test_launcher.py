"""The launcher: clear errors for bad pipelines, Triton's own reason when a model fails to load."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Server, start_launcher, wait_for_line
from tritonclient.utils import InferenceServerException

from stepdiff.cli import exit_code_of
from stepdiff.server import check_ports_free, load_failures


def run_serve(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "stepdiff", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(environ or {})})


def test_missing_pipeline_is_a_clear_error(tmp_path):
    result = run_serve("--pipeline", str(tmp_path / "nowhere"), "--http-port", "1")
    assert result.returncode == 2
    assert f"stepdiff: error: pipeline '{tmp_path / 'nowhere'}': no such directory, and not a hub id" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error_before_anything_starts(tiny_sd):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--pipeline", str(tiny_sd), "--grpc-port", str(port))
    assert result.returncode == 2
    assert f"port {port} is not free" in result.stderr
    assert "stepdiff: ready" not in result.stdout


def test_directory_without_model_index_is_rejected(tmp_path):
    result = run_serve("--pipeline", str(tmp_path))
    assert result.returncode == 2
    assert "not a diffusers pipeline directory (no model_index.json)" in result.stderr


def test_unsupported_pipeline_class_names_the_step_methods(tiny_sd, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    result = run_serve("--pipeline", str(other))
    assert result.returncode == 2
    assert "KandinskyPipeline has no step-wise adapter" in result.stderr
    for method in (
        "text_batch_key()",
        "encode_prompts()",
        "prepare()",
        "denoiser_rows()",
        "forward()",
        "guide()",
        "step()",
        "decode()",
    ):
        assert method in result.stderr


def test_sigterm_while_the_models_load_stops_the_launcher_at_once(tiny_sd, tmp_path):
    """A pod deleted during a long start (a download, a compile) is not held until the models are ready:
    SIGTERM stops tritonserver and the launcher then, with exit code 0. (An empty --lora-dir is said in the
    settings line.)"""
    (tmp_path / "no-loras").mkdir()
    process, ports = start_launcher(tiny_sd, tmp_path / "triton.log", "--lora-dir", str(tmp_path / "no-loras"))
    for line in process.stdout:  # the launcher prints its settings line, then starts tritonserver
        if line.startswith("stepdiff: device"):
            assert f"LoRA adapters: none (--lora-dir {tmp_path / 'no-loras'} holds no adapter)" in line
            break
    time.sleep(1.0)  # tritonserver loads its models: the tiny pipeline's take ~10 s on 2 cores
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stepdiff: stopped before ready (tritonserver " in output and "stepdiff: ready" not in output
    assert time.monotonic() - signalled < 40  # Triton's graceful stop; ready would have come first otherwise
    check_ports_free(ports)  # tritonserver is gone with its ports


@contextlib.contextmanager
def signalled_mid_generation(tiny_sd, tmp_path, *flags: str, **options):
    """``stepdiff serve FLAGS``, one generation started (200 steps, ``options``) and SIGTERM sent while it
    runs; yields the launcher, what it printed until ready, the generation's future."""
    process, (http_port, grpc_port, metrics_port) = start_launcher(tiny_sd, tmp_path / "triton.log", *flags)
    try:
        started = wait_for_line(process, "stepdiff: ready")
        server = Server(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                        tmp_path / "triton.log")  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            generation = pool.submit(server.txt2img, "a red panda", seed=3, num_inference_steps=200, **options)
            while server.metric("stepdiff_active_sequences") < 1:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            yield process, started, generation
    finally:
        process.kill()


def test_drain_seconds_lets_a_generation_in_flight_finish_before_the_stop(tiny_sd, tmp_path):
    """--drain-seconds: SIGTERM during a generation; the launcher waits for it (Triton goes on serving), the
    client gets its image, then Triton stops and the launcher exits 0. With --log-stdout its output also
    holds Triton's log."""
    flags = ("--drain-seconds", "120", "--log-stdout")
    with signalled_mid_generation(tiny_sd, tmp_path, *flags) as (process, started, generation):
        image, seed = generation.result(timeout=120)
        output, _ = process.communicate(timeout=120)
    assert image.shape == (64, 64, 3) and seed == 3
    assert process.returncode == 0, output
    assert "stepdiff: draining: generations in flight or queued: 1;" in output
    assert "stepdiff: drained; generations left: 0" in output and "stepdiff: stopped" in output
    # --log-stdout: Triton's log in the launcher's output as well
    everything = "\n".join(started) + output
    assert "tritonserver: " in everything and "Started GRPCInferenceService" in everything


def test_a_second_signal_during_the_drain_stops_at_once(tiny_sd, tmp_path):
    """The second Ctrl-C / SIGTERM ends the drain and kills tritonserver at once, without first ending the
    generation in flight (the generation fails)."""
    with signalled_mid_generation(tiny_sd, tmp_path, "--drain-seconds", "120", height=256) as (process, _, generation):
        wait_for_line(process, "stepdiff: draining: generations in flight or queued: 1;")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        stopped_after = time.monotonic() - signalled
        with pytest.raises(InferenceServerException):  # its generation failed: it was not waited for
            generation.result(timeout=120)
    assert process.returncode == 0, output
    assert stopped_after < 15, output  # not Triton's 30 s exit timeout
    assert "stepdiff: drained; generations left: 1" in output and "stepdiff: stopped (tritonserver " in output
    assert "stepdiff: stopping: ending" not in output  # the second signal does not wait for them to end


def test_a_stop_ends_the_generations_in_flight_before_triton_stops(tiny_sd, tmp_path):
    """Without a drain, SIGTERM ends the generation in flight at its next step (UNAVAILABLE, saying so) while
    Triton still takes its abort, so tritonserver stops by itself instead of waiting its 30 s exit timeout
    for the open sequence and being killed."""
    with signalled_mid_generation(tiny_sd, tmp_path) as (process, _, generation):
        with pytest.raises(InferenceServerException) as failure:
            generation.result(timeout=120)
        output, _ = process.communicate(timeout=120)
    assert "server stopping: the generation was ended after step" in str(failure.value)
    assert failure.value.status() == "StatusCode.UNAVAILABLE"
    assert process.returncode == 0, output
    assert "stepdiff: stopping: ending the 1 generations in flight or queued" in output
    assert "stepdiff: stopped (tritonserver exit code 0)" in output, output
    assert "Exit timeout expired" not in (tmp_path / "triton.log").read_text()


def test_model_load_failure_exits_with_tritons_reason(tiny_sd, tmp_path):
    """Corrupt UNet weights: tritonserver starts, denoise_step fails to load, the launcher says why."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    process, _ = start_launcher(broken, tmp_path / "triton.log")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output
    assert "tritonserver exited with code" in output
    assert "denoise_step:" in output  # the failing model, with Triton's one-line reason
    assert len(output.splitlines()) < 15, "expected a short reason, not the whole log"


def test_load_failures_parses_tritons_log_lines():
    log = (
        "E1121 06:21:06.301768 3095 model_lifecycle.cc:642] \"failed to load 'denoise_step' version 1: "
        'Internal: TypeError: boom\\n\\nAt:\\n  model.py(25): initialize\\n"\n'
        "I1121 06:21:06 other line\n"
    )
    assert load_failures(log) == ["denoise_step: Internal: TypeError: boom"]


def test_admin_endpoints_need_the_admin_key(server):
    """Model control mode none plus restricted repository/shared-memory endpoints; inference stays open."""
    import urllib.error
    import urllib.request

    from conftest import ADMIN_KEY

    def post(path: str, headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"http://{server.http_url}{path}", data=b"{}", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert post("/v2/repository/index", {}) == 403
    assert post("/v2/repository/index", {"stepdiff-admin-key": "wrong"}) == 403
    assert post("/v2/repository/index", {"stepdiff-admin-key": ADMIN_KEY}) == 200
    assert post("/v2/repository/models/txt2img/unload", {"stepdiff-admin-key": ADMIN_KEY}) != 200  # mode none
    assert post("/v2/systemsharedmemory/status", {}) == 403


def test_models_see_only_libpython_from_the_interpreters_libdir(tmp_path, monkeypatch):
    """The interpreter's LIBDIR may be the system library folder (CUDA images: a system cuDNN and cuBLAS
    that would shadow torch's own in the model processes): only a link to libpython goes on the path."""
    import sysconfig

    from stepdiff import server

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env = server.server_environment(server.locate_triton(), {})
    libdirs = env["LD_LIBRARY_PATH"].split(":")
    assert sysconfig.get_config_var("LIBDIR") not in libdirs
    first = server.libpython_directory()
    assert libdirs[0] == str(first) and str(first).startswith(str(tmp_path))
    [link] = first.iterdir()
    assert link.name == sysconfig.get_config_var("INSTSONAME") and link.resolve().is_file()


def test_malloc_settings_apply_unless_the_user_sets_them(tmp_path, monkeypatch):
    from stepdiff import server

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    env = server.server_environment(server.locate_triton(), {})
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"


# Runs in a fresh interpreter (glibc reads MALLOC_* once, at its first malloc): how many mmapped chunks a
# held 4 MiB buffer adds (glibc's mallinfo2().hblks), after keep_host_buffers_in_heap.
MMAPPED_BY_A_BUFFER = """
import ctypes, ctypes.util
from stepdiff.server import keep_host_buffers_in_heap
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
applied = keep_host_buffers_in_heap()
before = libc.mallinfo2().hblks
buffer = bytearray(4 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [("131072", "True 0"), ("65536", "False 1")],  # the launcher's threshold is undone; a user's is kept
)
def test_stage_processes_keep_image_sized_buffers_in_the_heap(threshold, expected):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": threshold, "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run([sys.executable, "-c", MMAPPED_BY_A_BUFFER], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (["--warmup", "512"], {}, "warmup='512': expected sizes HEIGHTxWIDTH separated by commas"),
        (["--warmup", "512x0"], {}, "warmup='512x0': expected sizes HEIGHTxWIDTH"),
        (["--step-lookahead", "0"], {}, "step_lookahead=0: allowed 1..8"),
        (["--step-lookahead", "9"], {}, "step_lookahead=9: allowed 1..8"),
        (["--drain-seconds", "-1"], {}, "--drain-seconds -1.0: must be >= 0 (0 stops at once)"),
        (["--max-queue", "-1"], {}, "max_queue=-1: must be >= 0"),
        ([], {"STEPDIFF_QUEUE_TIMEOUT_SECONDS": "0"}, "queue_timeout_seconds=0.0: must be > 0 and finite"),
        ([], {"STEPDIFF_SEQUENCE_IDLE_SECONDS": "-1"}, "sequence_idle_seconds=-1.0: must be > 0 and finite"),
        ([], {"STEPDIFF_DENOISER": "fast"}, "denoiser='fast': allowed exact, compiled, eager"),
        ([], {"STEPDIFF_DECODER": "exact"}, "decoder='exact': allowed graphs, eager, compiled"),
    ],
)
def test_bad_denoiser_settings_stop_serve_naming_the_setting(tiny_sd, flags, environ, message):
    result = run_serve("--pipeline", str(tiny_sd), *flags, environ=environ)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "stepdiff: ready" not in result.stdout


LOADED_AFTER_SERVE = """
import sys
from stepdiff import cli
try:
    code = cli.main(["serve", *sys.argv[1:]])
except SystemExit as stop:
    code = stop.code
print(code, "diffusers" in sys.modules, "stepdiff.adapters" in sys.modules)
"""


def test_a_bad_setting_or_a_port_in_use_fails_before_the_pipelines_libraries_load(tiny_sd):
    """The user hears of a missing pipeline directory, a bad flag, a bad --gpus (a GPU listed twice; on a
    machine without CUDA: none seen) or a taken port at once, not after diffusers and transformers import."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags in (
            ["--pipeline", "/nonexistent/sd15"],
            ["--step-lookahead", "0"],
            ["--gpus", "0,0"],
            ["--metrics-port", port],
        ):
            command = [sys.executable, "-c", LOADED_AFTER_SERVE, "--pipeline", str(tiny_sd), *flags]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.stdout.split() == ["2", "False", "False"], (flags, done.stdout, done.stderr)


def test_the_launcher_exits_with_the_code_tritonserver_left_as_a_shell_reports_it():
    """tritonserver exiting on its own: its code; a clean exit, which the launcher did not ask for, is a
    failure; a death by SIGKILL is 137 (Popen's -9 would reach the shell as 247)."""
    assert [exit_code_of(code) for code in (3, 0, -signal.SIGKILL, -signal.SIGSEGV)] == [3, 1, 137, 139]
