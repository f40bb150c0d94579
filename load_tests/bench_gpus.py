#!/usr/bin/env python3
"""stepdiff on one GPU against several, on the same machine: `stepdiff serve --gpus 0` and `--gpus 0,1`.

For each of --gpu-sets a server (`--denoiser` --mode, the graphs of the image size captured at start)
answers, with the first of --schedulers:

1. images at concurrency 1 for --check-seeds, compared with the first set's (one seed, one image,
   whichever GPU ran which stage);
2. the median latency at concurrency 1, with Triton's per-stage breakdown;
3. a closed loop per --concurrency: images/s, p50/p99, mean requests per denoiser forward, and the step
   calls each GPU took (stepdiff_denoise_steps_total by its gpu label).

results.json and results.md go to --out; the tables are printed. The same functions as
bench_batching.py measure (Load, closed_loop, start_server, step_breakdown). A set ``none`` serves
without --gpus, on --device (the server as before --gpus; on CPU, a check that this script runs).

    python load_tests/bench_gpus.py --pipeline build/sd15-size --out results/gpus --gpu-sets 0 0,1
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
import urllib.request

import numpy as np
import torch
from bench_batching import (  # also puts client/ and src/ on sys.path
    Load,
    closed_loop,
    csv_of,
    sd_arguments,
    start_server,
    statistics_after,
    step_breakdown,
    triton_statistics,
)

from stepdiff import server as triton
from stepdiff.repository import parse_gpus

STEPS_METRIC = "stepdiff_denoise_steps_total"
NO_GPUS = "none"  # a --gpu-sets entry: serve without --gpus


def steps_per_gpu(metrics_url: str) -> dict[str, float]:
    """denoise_step's step counter per ``gpu`` label."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    steps: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(STEPS_METRIC + "{"):
            labels, value = line.rsplit(" ", 1)
            gpu = re.search(r'gpu="([^"]*)"', labels)
            key = gpu.group(1) if gpu else "?"
            steps[key] = steps.get(key, 0.0) + float(value)
    return steps


def measure(args, gpus: tuple[int, ...]) -> tuple[dict, dict[int, np.ndarray]]:
    """One server on ``gpus`` (none: on --device): its row of results and its images at concurrency 1 by seed."""
    name = ",".join(map(str, gpus)) or NO_GPUS
    began = time.perf_counter()
    process, grpc_url, metrics_url = start_server(
        args,
        args.log_verbose,
        f"tritonserver-gpus-{name.replace(',', '-')}.log",
        gpus=gpus,
        denoiser=args.mode,
        warmup=f"{args.size}x{args.size}",
    )
    start_seconds = time.perf_counter() - began
    print(f"[--gpus {name}] server ready in {start_seconds:.0f} s", flush=True)
    try:
        load = Load(grpc_url, args)
        images = {seed: load.request(seed)[1] for seed in args.check_seeds}
        closed_loop(load, metrics_url, max(args.concurrency), 3)  # warm-up at every batch size
        before = triton_statistics(grpc_url)
        latency_c1 = statistics.median(load.request(seed)[0] for seed in range(args.repeats))
        breakdown = step_breakdown(before, statistics_after(grpc_url, before, args.repeats), args.repeats)
        print(f"[--gpus {name}] latency at concurrency 1: {latency_c1 * 1e3:.0f} ms; {breakdown}", flush=True)
        sweep = []
        for concurrency in args.concurrency:
            steps_before = steps_per_gpu(metrics_url)
            row = closed_loop(load, metrics_url, concurrency, args.duration, triton.tritonserver_pid(args.port))
            steps_after = steps_per_gpu(metrics_url)
            row["step_calls_per_gpu"] = {gpu: steps_after[gpu] - steps_before.get(gpu, 0.0) for gpu in steps_after}
            sweep.append(row)
            print(
                f"[--gpus {name}] c={concurrency}: {row['images_per_s']:.2f} images/s, p50 {row['p50_s']:.2f} s, "
                f"p99 {row['p99_s']:.2f} s, mean forward {row['mean_forward_batch']:.2f}, "
                f"steps per GPU {row['step_calls_per_gpu']}",
                flush=True,
            )
    finally:
        process.stop()
    run = {"gpus": name, "start_s": start_seconds, "latency_c1_s": latency_c1, "breakdown_c1": breakdown}
    return {**run, "sweep": sweep}, images


def report(result: dict) -> str:
    """The markdown tables: latency at concurrency 1, throughput per concurrency, and the scaling."""
    cfg, runs = result["config"], result["runs"]
    lines = [
        f"# stepdiff with --gpus {' and '.join(run['gpus'] for run in runs)} ({cfg['date']}, {cfg['gpu']})",
        "",
        f"Pipeline: {cfg['pipeline']}, {cfg['dtype']}, {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, guidance "
        f"{cfg['guidance']}, {cfg['scheduler']}, `--denoiser {cfg['mode']}`. Command: `{cfg['command']}`",
        "",
        "| `--gpus` | latency at concurrency 1 | text_encoder ms | vae_decode ms | step in Triton ms | "
        "images vs the first set | server start s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        b = run["breakdown_c1"]
        lines.append(
            f"| `{run['gpus']}` | {run['latency_c1_s'] * 1e3:.0f} ms | {b['text_encoder_ms']:.1f} | "
            f"{b['vae_decode_ms']:.1f} | {b['step_in_triton_ms']:.2f} | {run['images_vs_first']} | "
            f"{run['start_s']:.0f} |"
        )
    lines += [
        "",
        "| `--gpus` | concurrency | images/s | p50 s | p99 s | mean requests/forward | step calls per GPU | "
        "CPU cores (Triton processes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for row in run["sweep"]:
            per_gpu = ", ".join(f"{gpu}: {count:.0f}" for gpu, count in sorted(row["step_calls_per_gpu"].items()))
            lines.append(
                f"| `{run['gpus']}` | {row['concurrency']} | {row['images_per_s']:.2f} | {row['p50_s']:.2f} | "
                f"{row['p99_s']:.2f} | {row['mean_forward_batch']:.2f} | {per_gpu} | "
                f"{sum(row['cpu_cores'].values()):.1f} |"
            )
    first = runs[0]
    for run in runs[1:]:
        throughput = ", ".join(
            f"{row['images_per_s'] / base['images_per_s']:.2f}x at concurrency {row['concurrency']}"
            for row, base in zip(run["sweep"], first["sweep"], strict=True)
        )
        lines += [
            "",
            f"`--gpus {run['gpus']}` against `--gpus {first['gpus']}`: images/s {throughput}; latency at "
            f"concurrency 1 {run['latency_c1_s'] / first['latency_c1_s']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def compare_images(images: dict[int, np.ndarray], first: dict[int, np.ndarray]) -> str:
    """How a set's images at concurrency 1 compare with the first set's, seed by seed."""
    same = sum(np.array_equal(images[seed], first[seed]) for seed in first)
    worst = max(int(np.abs(images[seed].astype(int) - first[seed]).max()) for seed in first)
    return f"{same} of {len(first)} identical" + ("" if same == len(first) else f" (max |diff| {worst})")


def main() -> int:
    parser = sd_arguments(__doc__)
    parser.add_argument("--pipeline-kind", default="SD-1.5 architecture, random weights")
    parser.add_argument(
        "--gpu-sets",
        nargs="+",
        default=["0", "0,1"],
        help=f"one server per set, each as `stepdiff serve --gpus` takes it, or {NO_GPUS} (no --gpus: on --device)",
    )
    parser.add_argument(
        "--schedulers", type=csv_of(str), default=["EulerDiscreteScheduler"], help="the first is measured"
    )
    parser.add_argument("--mode", default="exact", choices=["exact", "compiled", "eager"], help="--denoiser")
    parser.add_argument(
        "--concurrency", type=csv_of(int), default=[64, 128], help="requests in flight in the closed loops"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--repeats", type=int, default=5, help="requests for the latency at concurrency 1")
    parser.add_argument("--check-seeds", type=csv_of(int), default=[0, 1, 2])
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # every set checked before a server starts
    gpu_sets = [() if text == NO_GPUS else parse_gpus(text, visible) for text in args.gpu_sets]
    result = {
        "config": {
            "date": time.strftime("%Y-%m-%d"),
            "gpu": ", ".join(torch.cuda.get_device_name(index) for index in range(visible)) or args.device,
            "pipeline": args.pipeline_kind,
            "dtype": args.dtype,
            "size": args.size,
            "steps": args.steps,
            "guidance": args.guidance,
            "scheduler": args.schedulers[0],
            "mode": args.mode,
            "command": " ".join(sys.argv),
        },
        "runs": [],
    }
    first_images: dict[int, np.ndarray] = {}
    for gpus in gpu_sets:
        run, images = measure(args, gpus)
        first_images = first_images or images
        run["images_vs_first"] = compare_images(images, first_images)
        result["runs"].append(run)
        # rewritten after every server: a cut-off run keeps what it measured
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
    markdown = report(result)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
