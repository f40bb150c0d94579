"""`stepdiff serve --gpus`: which device an instance runs on, the admission share of each denoise_step
instance, the flag's checks, the metrics' gpu label; on a machine with 2 GPUs (``-m gpu``) a served run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO, running_server
from google.protobuf import json_format

from stepdiff.repository import parse_gpus, read_config, serving_gpus, write_served_repository
from stepdiff.settings import Settings, device_label, instance_count

TEMPLATE = REPO / "model_repository"


@pytest.fixture
def cuda_available(monkeypatch):
    """torch as on a CUDA machine, for the rules that only need to know CUDA is there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_gpu_instance_runs_on_the_gpu_triton_assigned(cuda_available):
    assert Settings().instance_device("GPU", 1) == torch.device("cuda", 1)
    assert Settings(device="cuda:0").instance_device("GPU", 1) == torch.device("cuda", 1)  # the assignment wins


def test_other_instances_run_on_the_device_setting(cuda_available):
    assert Settings(device="cpu").instance_device("CPU", 0) == torch.device("cpu")
    assert Settings(device="cuda:1").instance_device("MODEL", 0) == torch.device("cuda", 1)


def test_without_cuda_a_gpu_instance_is_an_error_and_auto_is_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="Triton placed this instance on GPU 1 but torch sees no CUDA device"):
        Settings().instance_device("GPU", 1)
    assert Settings().instance_device("MODEL", 0) == torch.device("cpu")


def test_dtype_auto_follows_the_instance_device():
    assert Settings().torch_dtype(torch.device("cuda", 1)) == torch.float16
    assert Settings().torch_dtype(torch.device("cpu")) == torch.float32
    assert Settings(dtype="bfloat16").torch_dtype(torch.device("cuda", 1)) == torch.bfloat16


def test_the_gpu_label_is_the_device_index_or_cpu():
    assert device_label(torch.device("cuda", 1)) == "1"
    assert device_label(torch.device("cpu")) == "cpu"


def as_triton_json(path) -> dict:
    """A config as Triton hands it to a model (``args["model_config"]``, parsed)."""
    return json_format.MessageToDict(read_config(path), preserving_proto_field_name=True)


def test_instance_count_reads_the_served_instance_groups(tmp_path):
    served = write_served_repository(TEMPLATE, tmp_path / "gpus", (), gpus=(0, 1, 3))
    assert instance_count(as_triton_json(served / "denoise_step" / "config.pbtxt")) == 3
    assert instance_count(as_triton_json(TEMPLATE / "denoise_step" / "config.pbtxt")) == 1
    assert instance_count(as_triton_json(TEMPLATE / "txt2img" / "config.pbtxt")) == 4
    groups = [{"kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}, {"kind": "KIND_CPU", "count": 1}]
    assert instance_count({"instance_group": groups}) == 5


@pytest.mark.parametrize(
    ("limit", "instances", "share"),
    [(256, 1, 256), (256, 2, 128), (256, 8, 32), (5, 2, 2), (7, 3, 2), (2, 2, 1), (1, 2, 1)],
)
def test_each_denoise_step_instance_admits_its_share(limit, instances, share):
    assert Settings(max_active_sequences=limit).sequences_per_instance(instances) == share


def test_the_shares_hold_the_server_limit():
    """Never more than the limit in all (once each instance has one), and less by at most one per instance."""
    for limit in range(1, 300):
        for instances in range(1, 9):
            admitted = instances * Settings(max_active_sequences=limit).sequences_per_instance(instances)
            assert admitted == instances if limit < instances else limit - instances < admitted <= limit


def test_gpus_flag_values():
    assert parse_gpus("all", 2) == (0, 1)
    assert parse_gpus("0,1", 2) == (0, 1)
    assert parse_gpus(" 1 ", 2) == (1,)
    assert parse_gpus("1,0", 4) == (1, 0)


@pytest.mark.parametrize(
    ("flag", "visible", "message"),
    [
        ("all", 0, "--gpus all: torch sees no CUDA device on this machine"),
        ("0", 0, "--gpus 0: torch sees no CUDA device"),
        ("first", 2, "--gpus 'first': expected all or GPU ids separated by commas, e.g. 0,1"),
        ("0,", 2, "expected all or GPU ids separated by commas"),
        ("-1", 2, "expected all or GPU ids separated by commas"),
        ("0,0", 2, "--gpus 0,0: each GPU may be listed once"),
        ("0,2", 2, "--gpus 0,2: there is no GPU 2; torch sees 2 (ids 0..1)"),
    ],
)
def test_bad_gpus_flags_name_the_flag_and_what_is_allowed(flag, visible, message):
    with pytest.raises(ValueError) as raised:
        parse_gpus(flag, visible)
    assert message in str(raised.value)


def test_gpus_conflicts_with_a_device_other_than_auto_or_cuda():
    assert serving_gpus(None, Settings(device="cpu")) == ()
    with pytest.raises(ValueError, match=r"--gpus all places .* on GPUs, but device='cpu': leave --device"):
        serving_gpus("all", Settings(device="cpu"))
    with pytest.raises(ValueError, match="device='cuda:1'"):
        serving_gpus("0", Settings(device="cuda:1"))


def test_serve_with_gpus_on_a_machine_without_cuda_fails_at_start_naming_the_flag(tiny_sd):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    command = [sys.executable, "-m", "stepdiff", "serve", "--pipeline", str(tiny_sd), "--gpus", "all"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "stepdiff: error: --gpus all: torch sees no CUDA device on this machine" in result.stderr
    assert "Traceback" not in result.stderr and "starting tritonserver" not in result.stdout


def test_denoise_step_metrics_carry_the_gpu_label(server):
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    for name in ("stepdiff_active_sequences", "stepdiff_denoise_steps_total", "stepdiff_denoise_batch_size_count"):
        [labels] = re.findall(rf"^{name}{{([^}}]*)}}", text, re.MULTILINE)
        assert 'gpu="cpu"' in labels and 'model="denoise_step"' in labels


@pytest.mark.gpu
def test_two_gpus_each_run_every_stage_and_share_the_generations(tiny_sd, tmp_path):
    """`--gpus 0,1` (the second --device wins over conftest's): an instance of each stage model on each
    GPU, concurrent generations spread over both denoise_step instances, every request answered."""
    if torch.cuda.device_count() < 2:
        pytest.fail("this test needs 2 CUDA devices")
    log_file = tmp_path / "tritonserver.log"
    with running_server(tiny_sd, log_file, "--device", "auto", "--gpus", "0,1") as server:
        with ThreadPoolExecutor(16) as pool:
            images = list(
                pool.map(lambda seed: server.txt2img("a cat", seed=seed, num_inference_steps=4)[0], range(16))
            )
        assert all(image.shape == (64, 64, 3) for image in images)
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        steps = dict(re.findall(r'^stepdiff_denoise_steps_total{[^}]*gpu="(\d)"[^}]*} (\S+)', text, re.MULTILINE))
        assert set(steps) == {"0", "1"} and all(float(count) > 0 for count in steps.values()), steps
    log = log_file.read_text(errors="replace")
    for model in ("text_encoder", "denoise_step", "vae_decode"):
        for gpu in (0, 1):
            assert re.search(rf"TRITONBACKEND_ModelInstanceInitialize: {model}_\S+ \(GPU device {gpu}\)", log)
    assert "admits 128 of the server's 256 active sequences (2 instances)" in log


def test_the_gpu_benchmark_runs_end_to_end_on_cpu(tiny_sd, tmp_path):
    """load_tests/bench_gpus.py measures on a machine with 2 GPUs; here it serves without --gpus (set
    ``none``) on the CPU, so that a broken script does not cost a GPU lease."""
    from stepdiff.server import free_ports

    [port] = free_ports(1)
    command = [sys.executable, str(REPO / "load_tests" / "bench_gpus.py"), "--pipeline", str(tiny_sd)]
    command += ["--out", str(tmp_path), "--port", str(port), "--device", "cpu", "--dtype", "float32", "--size", "64"]
    command += ["--steps", "2", "--gpu-sets", "none", "--concurrency", "2", "--duration", "1", "--repeats", "1"]
    command += ["--check-seeds", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run] = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["gpus"] == "none" and run["images_vs_first"] == "1 of 1 identical"
    [row] = run["sweep"]
    assert row["concurrency"] == 2 and row["images_per_s"] > 0 and set(row["step_calls_per_gpu"]) == {"cpu"}
    assert "| `none` | 2 |" in (tmp_path / "results.md").read_text()


def test_the_gpu_benchmark_reports_the_scaling():
    sys.path.insert(0, str(REPO / "load_tests"))
    import bench_gpus

    def run(gpus: str, images_per_s: float, latency: float) -> dict:
        breakdown = {"text_encoder_ms": 6.0, "vae_decode_ms": 21.0, "step_in_triton_ms": 12.0}
        row = {
            "concurrency": 64,
            "images_per_s": images_per_s,
            "p50_s": 2.0,
            "p99_s": 3.0,
            "mean_forward_batch": 20.0,
            "step_calls_per_gpu": dict.fromkeys(gpus.split(","), 600.0),
            "cpu_cores": {"tritonserver": 1.0, "txt2img_0_0": 0.5},
        }
        return {
            "gpus": gpus,
            "start_s": 60.0,
            "latency_c1_s": latency,
            "breakdown_c1": breakdown,
            "images_vs_first": "3 of 3 identical",
            "sweep": [row],
        }

    config = {
        "date": "2026-11-22",
        "gpu": "H200, H200",
        "pipeline": "SD-1.5 architecture",
        "dtype": "float16",
        "size": 512,
        "steps": 30,
        "guidance": 7.5,
        "scheduler": "EulerDiscreteScheduler",
        "mode": "exact",
        "command": "bench_gpus.py",
    }
    markdown = bench_gpus.report({"config": config, "runs": [run("0", 10.0, 0.40), run("0,1", 19.0, 0.41)]})
    assert "| `0,1` | 64 | 19.00 | 2.00 | 3.00 | 20.00 | 0: 600, 1: 600 | 1.5 |" in markdown
    assert "`--gpus 0,1` against `--gpus 0`: images/s 1.90x at concurrency 64; latency at concurrency 1 1.02x." in (
        markdown
    )
