"""The benchmark and diagnosis commands run end to end on CPU (they run for real only on a GPU machine,
where a broken script costs a lease): the tiny pipeline, a few steps, every table written.

Timings are not checked here; the fidelity trace is, since on CPU every stage must be identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stepdiff.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--dtype", "float32", "--size", "64", "--steps", "3"]


def run_script(name: str, *arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "load_tests" / name), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert completed.returncode == 0, f"{name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


def test_trace_fidelity_finds_every_stage_identical_on_cpu(tiny_sd, tmp_path):
    [port] = free_ports(1)
    output = run_script(
        "trace_fidelity.py",
        "--pipeline",
        str(tiny_sd),
        "--out",
        str(tmp_path),
        "--port",
        str(port),
        "--scheduler",
        "EulerAncestralDiscreteScheduler",
        "--seed",
        "77",
        *TINY,
    )
    assert "first stage that differs: None" in output
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert len(trace["rows"]) == 2 + 3 + 2  # both embeddings, every step's latents, both decodes
    assert all(row["identical"] for row in trace["rows"]) and trace["first_difference"] is None


def test_batching_benchmark_writes_its_tables(tiny_sd, tmp_path):
    [port] = free_ports(1)
    run_script(
        "bench_batching.py",
        "--pipeline",
        str(tiny_sd),
        "--out",
        str(tmp_path),
        "--port",
        str(port),
        "--modes",
        "eager",
        "--variants",
        "eager",
        "--schedulers",
        "EulerDiscreteScheduler",
        "--concurrency",
        "1,2",
        "--ceiling-batches",
        "1,2",
        "--duration",
        "1",
        "--repeats",
        "1",
        "--check-seeds",
        "0",
        *TINY,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"baseline", "triton"}
    markdown = (tmp_path / "results.md").read_text()
    assert "Concurrency 1" in markdown and "Ceilings" in markdown
    assert "1 of 1 byte-identical" in markdown  # the served image against stock diffusers, on CPU
    assert (tmp_path / "results.png").stat().st_size > 0


def test_qwenimage_benchmark_writes_its_table(tiny_qwen, tmp_path):
    [port] = free_ports(1)
    run_script(
        "bench_qwenimage.py",
        "--pipeline",
        str(tiny_qwen),
        "--out",
        str(tmp_path),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--sizes",
        "64",
        "--steps",
        "2",
        "--concurrency",
        "1,2",
        "--rounds",
        "1",
    )
    assert "ms/step" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())


def test_lora_benchmark_writes_its_table(tiny_sd, tmp_path):
    output = run_script(
        "bench_lora.py",
        "--pipeline",
        str(tiny_sd),
        "--out",
        str(tmp_path),
        "--requests",
        "5",
        "--rank",
        "4",
        *TINY,
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # none, one adapter, 4 adapters + none mixed in one forward, the same grouped by setting
    assert [row["forwards_per_step"] for row in rows] == [1, 1, 1, 5]
    assert "4 adapters + none, mixed" in output and (tmp_path / "results.md").is_file()
