"""The benchmark and diagnosis commands run end to end on CPU (they run for real only on a GPU machine,
where a broken script costs a lease): the tiny pipeline, a few steps, every table written.

Timings are not checked here; the fidelity trace is, since on CPU every stage must be identical."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepdiff.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--dtype", "float32", "--size", "64", "--steps", "3"]


def run_script(name: str, *arguments: str, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "load_tests" / name), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
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


def test_batching_benchmark_names_a_bad_variants_list_before_loading_anything(tmp_path):
    """Without eager first there are no reference images: say so at once, not with a KeyError after the
    in-process runs (as on the GPU machine, where it cost a call)."""
    for variants, message in (("exact", "must start with eager"), ("eager,graph", "unknown graph")):
        script, out = str(ROOT / "load_tests" / "bench_batching.py"), str(tmp_path / "out")
        completed = subprocess.run(
            [sys.executable, script, "--pipeline", str(tmp_path), "--out", out, "--variants", variants],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 2 and f"--variants {message}" in completed.stderr.replace(":", ""), (
            completed.stderr
        )
        assert not (tmp_path / "out").exists()


def test_gpu_busy_is_the_mean_of_nvidia_smis_samples_per_gpu(tmp_path, monkeypatch):
    """The benchmarks' GPU busy share: nvidia-smi's utilization samples over the window, per GPU index."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, 90\\n1, 10\\n0, 100\\n1, [N/A]\\n1, 30\\n'\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(ROOT / "load_tests"))
    import bench_batching

    assert bench_batching.GpuBusy(enabled=False).stop() is None  # off the GPU: nothing sampled
    sampler = bench_batching.GpuBusy(enabled=True)
    sampler.start()
    time.sleep(0.5)
    assert sampler.stop() == {0: 0.95, 1: 0.2}


def test_batching_benchmark_writes_its_tables(tiny_sd, tmp_path, monkeypatch):
    [port] = free_ports(1)
    cache = tmp_path / "inductor"  # --cold-start empties it (here, not the user's own cache)
    cache.mkdir()
    (cache / "earlier-kernel").write_text("x")
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
        "--stage-batches",
        "1,2",
        "--duration",
        "1",
        "--repeats",
        "1",
        "--check-seeds",
        "0",
        "--cold-start",
        "--model",
        "txt2img_stream",  # the sweep on streams; the image checks and concurrency 1 call txt2img
        *TINY,
        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"baseline", "triton"}
    served = results["triton"]["eager"]
    assert served["cold_start_s"] > 0 and served["start_s"] > 0  # a start from an empty cache, then the measured one
    assert (tmp_path / "tritonserver-eager-cold.log").stat().st_size > 0 and not (cache / "earlier-kernel").exists()
    # the closed loops started their clients spread out and counted a window after the ramp
    assert [row["starts"] for row in served["sweep"]] == ["staggered", "staggered"]
    assert "Closed loop: the clients start spread" in (tmp_path / "results.md").read_text()
    assert served["model"] == "txt2img_stream"  # each client finished a request at least (a failure stops the run)
    assert (
        "## Throughput, stepdiff `eager`, txt2img_stream, EulerDiscreteScheduler"
        in (tmp_path / "results.md").read_text()
    )
    poisson = served["open_loop"]  # counted in the window after its ramp-up (a second: it may hold none)
    assert poisson["images_per_s"] >= 0 and (poisson["requests"] == 0) == math.isnan(poisson["p50_s"])
    for row in results["triton"]["eager"]["sweep"]:  # every generation ran each stage once
        assert row["stages"]["text_encoder"]["mean_batch"] >= 1
        assert row["stages"]["vae_decode"]["mean_batch"] >= 1
        assert row["stages"]["vae_decode"]["execute_ms_per_request"] > 0
        # each execute of denoise_step holds at least one call and takes at most a forward per call
        assert row["calls_per_execute"] >= 1 and 0 < row["forwards_per_execute"] <= row["calls_per_execute"]
        # on CPU an execute never waits for a GPU, and its host time holds the forward
        assert row["host_ms_per_execute"] > 0 and row["gpu_wait_ms_per_execute"] == 0
    breakdown = results["triton"]["eager"]["breakdown_c1"]["EulerDiscreteScheduler"]  # where each stage's time goes
    for stage in ("text_encoder", "vae_decode"):
        assert 0 < breakdown[f"{stage}_execute_ms"] <= breakdown[f"{stage}_ms"]
    stage_costs = results["baseline"]["stage_costs"]  # the text encoder and the VAE decode in-process, by batch
    assert set(stage_costs["ms_per_call"]) == {"text_encoder", "vae_decode_eager", "vae_decode_channels_last"}
    assert all(set(table) == {"1", "2"} and min(table.values()) > 0 for table in stage_costs["ms_per_call"].values())
    assert stage_costs["lone_image_identical_to_served"]["eager"] is True  # the served call itself
    markdown = (tmp_path / "results.md").read_text()
    assert "Concurrency 1" in markdown and "Ceilings" in markdown and "The other stages in-process" in markdown
    assert "(cold, Inductor cache emptied: " in markdown
    assert "ceiling with text encoder + VAE" in markdown
    assert "| eager, EulerDiscreteScheduler, vae_decode |" in markdown  # served against in-process, per stage
    assert "1 of 1 byte-identical" in markdown  # the served image against stock diffusers, on CPU
    assert (tmp_path / "results.png").stat().st_size > 0
    monkeypatch.syspath_prepend(str(ROOT / "load_tests"))
    check_a_second_slice_resumes_the_run(results, tmp_path)


def check_a_second_slice_resumes_the_run(results: dict, tmp_path: Path) -> None:
    """--resume: a second slice (here the same mode under another name) adds to the first's results, and one
    report holds both with both commands; a slice with other generation settings is refused, naming them."""
    import bench_batching

    fresh = {"config": {**results["config"], "commands": ["bench_batching.py --modes compiled"]}, "triton": {}}
    later = bench_batching.merged(
        bench_batching.resumed(results, fresh), {"triton": {"second": results["triton"]["eager"]}}
    )
    assert later["config"]["commands"] == [*results["config"]["commands"], "bench_batching.py --modes compiled"]
    assert set(later["triton"]) == {"eager", "second"} and later["baseline"] == results["baseline"]
    out = tmp_path / "resumed"
    out.mkdir()
    bench_batching.report(later, out)
    markdown = (out / "results.md").read_text()
    assert "Commands, one after the other on the same machine" in markdown
    assert "## Throughput, stepdiff `second`" in markdown and "## Throughput, stepdiff `eager`" in markdown
    other = {"config": {**fresh["config"], "steps": 50}, "triton": {}}
    with pytest.raises(ValueError, match="steps is 50 here but 3 in the results resumed"):
        bench_batching.resumed(results, other)


def test_families_benchmark_appends_each_family_to_one_table(tiny_qwen, tiny_sdxl, tmp_path):
    """bench_families on three families, one after another into one --out: QwenImage (true CFG with its
    default negative prompt), Flux dev (embedded guidance) and SDXL (CFG), each with its own files and a
    row in the combined table."""
    from stepdiff.tiny import make_tiny

    tiny_flux = make_tiny("flux", tmp_path / "pipelines" / "tiny-flux")
    out = tmp_path / "out"
    for pipeline in (tiny_qwen, tiny_flux, tiny_sdxl):
        [port] = free_ports(1)
        output = run_script(
            "bench_families.py",
            "--pipeline",
            str(pipeline),
            "--out",
            str(out),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--sizes",
            "64",
            "--steps",
            "2",
            "--concurrency",
            "1,2",
            "--rounds",
            "1",
        )
        assert "ms/step" in output
    expected = {
        "tiny-qwenimage": (
            "QwenImage",
            "QwenImagePipeline",
            {"true_cfg_scale": 4.0, "negative_prompt": "blurry, low quality"},
        ),
        "tiny-flux": (
            "Flux.1 dev",
            "FluxPipeline",
            {"guidance_scale": 3.5, "true_cfg_scale": 1.0, "negative_prompt": None},
        ),
        "tiny-sdxl": ("SDXL", "StableDiffusionXLPipeline", {"guidance_scale": 5.0, "negative_prompt": None}),
    }
    for name, (family, pipeline_class, guidance) in expected.items():
        result = json.loads((out / f"{name}.json").read_text())
        assert (result["config"]["family"], result["config"]["pipeline_class"]) == (family, pipeline_class)
        assert result["config"]["dtype"] == "float32"  # the default on CPU
        assert {key: result["guidance"].get(key) for key in guidance} == guidance  # the family's defaults
        assert set(result["in_process"]) == set(result["triton"]) == {"64/1", "64/2"}
        assert result["triton"]["64/2"]["mean_requests_per_batched_step"] > 0
        markdown = (out / f"{name}.md").read_text()
        assert markdown.startswith(f"# {family} per-step time") and pipeline_class in markdown
    combined = (out / "results.md").read_text().splitlines()
    rows = [line for line in combined if line.startswith("| ") and "`tiny-" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| SDXL"] * 2 + ["| Flux.1 dev"] * 2 + ["| QwenImage"] * 2


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


def test_compile_levers_benchmark_applies_each_lever_and_writes_its_tables(tiny_sd, tmp_path):
    """Every lever of both stages runs through the served stage adapters and gets its row against
    ``served``; torch.compile itself is switched off (TORCH_COMPILE_DISABLE: a CPU compile takes about a
    minute per lever; the compiled paths are tested in test_runner and test_stage_batching)."""
    output = run_script(
        "bench_compile.py",
        "--pipeline",
        str(tiny_sd),
        "--out",
        str(tmp_path),
        "--batches",
        "1,2",
        "--decode-batches",
        "1,2",
        "--repeats",
        "1",
        *TINY,
        env={"TORCH_COMPILE_DISABLE": "1"},
    )
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results["denoiser"]) == [
        "served",
        "cudnn_benchmark",
        "channels_last",
        "inductor_tuning",
        "fused_qkv",
        "all",
    ]
    assert list(results["decoder"]) == [
        "served",
        "cudnn_benchmark",
        "channels_last",
        "inductor_tuning",
        "static",
        "all",
    ]
    for table in results.values():
        for row in table.values():
            assert set(row["ms_per_call"]) == {"1", "2"} and all(ms > 0 for ms in row["ms_per_call"].values())
    # the same rows as eager up to rounding (channels-last convolutions sum in another order)
    assert all(row["max_difference_from_eager"] < 1e-4 for row in results["denoiser"].values())
    assert all(row["max_difference_from_eager"] <= 1 for row in results["decoder"].values())
    markdown = (tmp_path / "results.md").read_text()
    assert "| fused_qkv |" in markdown and "| static |" in markdown and "every lever ran eagerly" in markdown
    assert "## decoder" in output


def test_compile_levers_benchmark_names_a_bad_lever():
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "load_tests" / "bench_compile.py"),
            "--pipeline",
            "x",
            "--out",
            "y",
            "--levers",
            "served,turbo",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2 and "--levers: unknown turbo" in completed.stderr
