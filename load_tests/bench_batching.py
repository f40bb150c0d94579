#!/usr/bin/env python3
"""Step-level batching benchmark: stepdiff on Triton against the same pipeline in-process.

1. In-process baseline (same run, same GPU): StableDiffusionPipeline end-to-end latency at batch 1,
   and the UNet's request-steps/s at 1..32 requests per forward (with CFG, 2 rows each): the ceiling.
2. Through Triton (`stepdiff serve`, gRPC): closed-loop concurrency sweep (images/s, p50/p99 latency,
   mean requests per denoiser forward from the stepdiff_denoise_batch_size metric) and a Poisson
   open-loop run at a fraction of the peak. Images at concurrency 1 are checked against the
   in-process pipeline (same seed, device and dtype).
3. results.json + results.md (+ a PNG plot when matplotlib is installed) in --out.

    python load_tests/bench_batching.py --pipeline build/sd15-size --out results/gpu --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "client"))
sys.path.insert(0, str(REPO / "src"))

import generate as txt2img_client  # noqa: E402

from stepdiff import server as triton  # noqa: E402
from stepdiff.settings import DTYPES, Settings  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars, cinematic lighting"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (after one warm-up), synchronizing the device."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def in_process_baseline(args, device: torch.device, dtype: torch.dtype) -> dict:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        args.pipeline, dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)

    def run_pipeline(seed: int = 0):
        return pipe(
            PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0]  # fmt: skip

    latency = timed(run_pipeline, args.repeats, device)
    references = {seed: (run_pipeline(seed) * 255).round().astype(np.uint8) for seed in args.check_seeds}
    latent = args.size // pipe.vae_scale_factor
    ceiling = {}
    with torch.inference_mode():
        for requests in args.ceiling_batches:
            rows = 2 * requests if args.guidance > 1 else requests
            sample = torch.randn(rows, pipe.unet.config.in_channels, latent, latent, device=device, dtype=dtype)
            embeddings = torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
            timesteps = torch.full((rows,), 500.0, device=device)
            seconds = timed(lambda: pipe.unet(sample, timesteps, encoder_hidden_states=embeddings), args.repeats, device)
            ceiling[requests] = {"forward_ms": seconds * 1e3, "request_steps_per_s": requests / seconds,
                                 "images_per_s": requests / seconds / args.steps}  # fmt: skip
            print(f"ceiling: {requests:3d} requests/forward  {seconds * 1e3:7.1f} ms  {requests / seconds / args.steps:6.2f} images/s", flush=True)
    print(f"in-process pipeline latency (batch 1): {latency * 1e3:.0f} ms", flush=True)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"pipeline_latency_s": latency, "ceiling": ceiling, "references": references}


class Load:
    """gRPC clients firing txt2img requests; one client per thread."""

    def __init__(self, url: str, args):
        self.url, self.args = url, args
        self.local = threading.local()
        import tritonclient.grpc as module

        self.module = module

    def request(self, seed: int) -> tuple[float, np.ndarray]:
        if not hasattr(self.local, "client"):
            self.local.client = self.module.InferenceServerClient(self.url)
        options = dict(seed=seed, num_inference_steps=self.args.steps, guidance_scale=self.args.guidance,
                       height=self.args.size, width=self.args.size, scheduler=self.args.scheduler)  # fmt: skip
        image, _, seconds = txt2img_client.generate(self.local.client, self.module, PROMPT, options)
        return seconds, image


def metric(metrics_url: str, name: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def forward_counters(metrics_url: str) -> tuple[float, float]:
    return metric(metrics_url, "stepdiff_denoise_batch_size_sum"), metric(metrics_url, "stepdiff_denoise_batch_size_count")


def closed_loop(load: Load, metrics_url: str, concurrency: int, duration: float) -> dict:
    """``concurrency`` clients, each sending its next request when the previous one returns."""
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    rows0, forwards0 = forward_counters(metrics_url)

    def client(worker: int) -> None:
        count = 0
        while time.monotonic() < deadline or count == 0:
            seconds, _ = load.request(random.randrange(2**31))
            latencies.append(seconds)
            count += 1

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.monotonic() - start
    rows, forwards = forward_counters(metrics_url)
    return {
        "concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
        "images_per_s": len(latencies) / elapsed, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
        "mean_forward_batch": (rows - rows0) / max(forwards - forwards0, 1),
    }  # fmt: skip


def open_loop(load: Load, metrics_url: str, rate: float, duration: float) -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``duration`` seconds; every request is waited for."""
    latencies: list[float] = []
    rows0, forwards0 = forward_counters(metrics_url)
    start = time.monotonic()
    with ThreadPoolExecutor(256) as pool:
        futures, next_arrival = [], start
        while next_arrival < start + duration:
            time.sleep(max(0.0, next_arrival - time.monotonic()))
            futures.append(pool.submit(lambda: latencies.append(load.request(random.randrange(2**31))[0])))
            next_arrival += random.expovariate(rate)
        for future in futures:
            future.result()
    elapsed = time.monotonic() - start
    rows, forwards = forward_counters(metrics_url)
    return {
        "offered_rate": rate, "requests": len(latencies), "images_per_s": len(latencies) / elapsed,
        "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
        "mean_forward_batch": (rows - rows0) / max(forwards - forwards0, 1),
    }  # fmt: skip


def start_server(args, log_verbose: int = 0) -> tuple[triton.TritonProcess, str, str]:
    """tritonserver for ``args.pipeline`` on ports ``args.port``.. (log in ``args.out``), ready;
    returns it with its gRPC and metrics URLs."""
    ports = [args.port, args.port + 1, args.port + 2]
    settings = Settings(pipeline=str(args.pipeline), device=args.device, dtype=args.dtype)
    options = triton.ServerOptions(REPO / "model_repository", *ports, log_verbose=log_verbose)
    process = triton.start_triton(options, settings.environment(), args.out / "tritonserver.log")
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process, f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[2]}/metrics"


def through_triton(args, baseline: dict) -> dict:
    process, grpc_url, metrics_url = start_server(args, args.log_verbose)
    try:
        load = Load(grpc_url, args)
        checks = {}
        for seed, reference in baseline["references"].items():
            _, image = load.request(seed)
            checks[seed] = {"identical": bool(np.array_equal(image, reference)),
                            "max_abs_diff": int(np.abs(image.astype(int) - reference).max())}  # fmt: skip
        print(f"images vs in-process pipeline: {checks}", flush=True)
        closed_loop(load, metrics_url, max(args.concurrency), 3)  # warm-up at every batch size
        latency_c1 = statistics.median(load.request(seed)[0] for seed in range(args.repeats))
        print(f"triton latency at concurrency 1: {latency_c1 * 1e3:.0f} ms", flush=True)
        sweep = []
        for concurrency in args.concurrency:
            row = closed_loop(load, metrics_url, concurrency, args.duration)
            sweep.append(row)
            print(f"closed loop c={concurrency:3d}: {row['images_per_s']:6.2f} images/s  p50 {row['p50_s']:.2f} s  "
                  f"p99 {row['p99_s']:.2f} s  mean forward batch {row['mean_forward_batch']:.2f}", flush=True)  # fmt: skip
        peak = max(row["images_per_s"] for row in sweep)
        poisson = open_loop(load, metrics_url, args.open_loop_fraction * peak, args.duration)
        print(f"open loop at {poisson['offered_rate']:.2f}/s: {poisson['images_per_s']:.2f} images/s  "
              f"p50 {poisson['p50_s']:.2f} s  p99 {poisson['p99_s']:.2f} s", flush=True)  # fmt: skip
    finally:
        process.stop()
    return {"latency_c1_s": latency_c1, "image_checks": checks, "sweep": sweep, "open_loop": poisson}


def report(result: dict, out: Path) -> None:
    """results.md with the tables and the targets; results.png when matplotlib is available."""
    base, tri, cfg = result["baseline"], result["triton"], result["config"]
    ceiling = {int(k): v for k, v in base["ceiling"].items()}
    by_c = {row["concurrency"]: row for row in tri["sweep"]}
    lines = [
        f"# stepdiff batching benchmark ({cfg['date']}, {cfg['gpu']})", "",
        f"Pipeline: {cfg['pipeline_kind']}, {cfg['dtype']}, {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, "
        f"guidance {cfg['guidance']}, {cfg['scheduler']}. Command: `{cfg['command']}`", "",
        f"- in-process StableDiffusionPipeline latency (batch 1): **{base['pipeline_latency_s'] * 1e3:.0f} ms**",
        f"- through Triton at concurrency 1: **{tri['latency_c1_s'] * 1e3:.0f} ms** "
        f"({tri['latency_c1_s'] / base['pipeline_latency_s']:.3f}x; target <= 1.05x)",
        f"- images at concurrency 1 vs in-process (same seed): {tri['image_checks']}", "",
        "| concurrency | images/s | p50 s | p99 s | mean requests/forward | ceiling images/s at that batch | vs ceiling |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c, row in by_c.items():
        ceil = ceiling.get(c, {}).get("images_per_s", float("nan"))
        lines.append(f"| {c} | {row['images_per_s']:.2f} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | "
                     f"{row['mean_forward_batch']:.2f} | {ceil:.2f} | {row['images_per_s'] / ceil:.2f}x |")  # fmt: skip
    ol = tri["open_loop"]
    lines += [
        "", f"Poisson open loop at {ol['offered_rate']:.2f} requests/s (~{cfg['open_loop_fraction']:.0%} of peak): "
        f"{ol['images_per_s']:.2f} images/s, p50 {ol['p50_s']:.2f} s, p99 {ol['p99_s']:.2f} s, "
        f"mean requests/forward {ol['mean_forward_batch']:.2f}", "",
        "| requests per UNet forward | forward ms | images/s (ceiling) |", "|---|---|---|",
    ]  # fmt: skip
    lines += [f"| {b} | {v['forward_ms']:.1f} | {v['images_per_s']:.2f} |" for b, v in ceiling.items()]
    if 16 in by_c and 1 in by_c and 16 in ceiling:
        lines += ["", f"Targets: c=16 vs ceiling at 16: {by_c[16]['images_per_s'] / ceiling[16]['images_per_s']:.2f}x "
                  f"(target >= 0.85x); c=16 vs c=1: {by_c[16]['images_per_s'] / by_c[1]['images_per_s']:.2f}x (target >= 3x)"]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cs = list(by_c)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(cs, [by_c[c]["images_per_s"] for c in cs], "o-", label="stepdiff on Triton")
    left.plot([c for c in cs if c in ceiling], [ceiling[c]["images_per_s"] for c in cs if c in ceiling], "s--", label="in-process UNet ceiling")
    left.set(xscale="log", xlabel="concurrency (requests in flight)", ylabel="images/s", title="Throughput")
    left.set_xticks(cs, [str(c) for c in cs])
    left.legend()
    right.plot(cs, [by_c[c]["p99_s"] for c in cs], "o-", label="p99")
    right.plot(cs, [by_c[c]["p50_s"] for c in cs], "^-", label="p50")
    right.axhline(base["pipeline_latency_s"], color="gray", linestyle=":", label="in-process, batch 1")
    right.set(xscale="log", xlabel="concurrency", ylabel="latency (s)", title="Latency")
    right.set_xticks(cs, [str(c) for c in cs])
    right.legend()
    fig.suptitle(f"stepdiff, {cfg['pipeline_kind']} {cfg['size']}px {cfg['steps']} steps, {cfg['gpu']}")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--pipeline-kind", default="SD-1.5 architecture, random weights")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="EulerDiscreteScheduler")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ceiling-batches", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-seeds", type=lambda s: [int(c) for c in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--open-loop-fraction", type=float, default=0.8)
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    baseline = in_process_baseline(args, device, dtype)
    result = {
        "config": {
            "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "pipeline_kind": args.pipeline_kind, "dtype": args.dtype, "size": args.size, "steps": args.steps,
            "guidance": args.guidance, "scheduler": args.scheduler,
            "open_loop_fraction": args.open_loop_fraction, "command": " ".join(sys.argv),
        },
        "triton": through_triton(args, baseline),
        "baseline": {k: v for k, v in baseline.items() if k != "references"},
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    report(result, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
