#!/usr/bin/env python3
"""QwenImage per-step time: the stock QwenImagePipeline in-process against stepdiff on Triton.

In-process, a step is timed between ``callback_on_step_end`` calls of QwenImagePipeline (the device
synchronized) with 1 and with C prompts per call. Through Triton, ``txt2img_stream`` sends one response
per step; a step is the gap between two responses at the client, with 1 and with C requests in flight
(their steps batch in denoise_step). Both run the same pipeline, size, steps, dtype and true CFG.
Triton's step responses do not wait for the GPU (nothing is read back until the last step), so the
end-to-end latencies (prompt to image, both sides) are the figures to compare; step gaps show the pace.

    python load_tests/bench_qwenimage.py --pipeline build/qwenimage-size --out results/qwen --sizes 512,1024
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_batching import metric, percentile, start_server, txt2img_client  # also puts client/ and src/ on sys.path

from stepdiff.settings import DTYPES

PROMPT = "a photo of an astronaut riding a horse on mars, cinematic lighting"
NEGATIVE_PROMPT = "blurry, low quality"


def in_process_times(pipe, size: int, batch: int, args) -> tuple[list[float], float]:
    """(seconds per denoising step, end-to-end seconds) of QwenImagePipeline with ``batch`` prompts.

    Steps are timed between ``callback_on_step_end`` calls with the device synchronized; the end-to-end
    time (prompt encoding to decoded image) is the median of separate calls without those synchronizations.
    """
    stamps: list[float] = []

    def on_step_end(pipeline, step, timestep, tensors):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return tensors

    def run(**extra) -> None:
        pipe(
            [PROMPT] * batch,
            negative_prompt=[NEGATIVE_PROMPT] * batch if args.true_cfg_scale > 1 else None,
            true_cfg_scale=args.true_cfg_scale,
            num_inference_steps=args.steps,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    latencies = []
    for _ in range(3):  # the first is a warm-up (kernel selection for this shape, VAE included)
        start = time.perf_counter()
        run(output_type="np")
        latencies.append(time.perf_counter() - start)
    run(output_type="latent", callback_on_step_end=on_step_end)
    return list(np.diff(stamps)), statistics.median(latencies[1:])


def stream_step_times(url: str, seed: int, size: int, args) -> tuple[list[float], float]:
    """(seconds between consecutive step responses, end-to-end seconds) of one streamed request."""
    import tritonclient.grpc as grpcclient

    options = dict(
        seed=seed, num_inference_steps=args.steps, height=size, width=size, true_cfg_scale=args.true_cfg_scale
    )
    if args.true_cfg_scale > 1:
        options["negative_prompt"] = NEGATIVE_PROMPT
    inputs = txt2img_client.build_inputs(grpcclient, PROMPT, options)
    arrivals: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: arrivals.put((time.perf_counter(), result, error)))
    start = time.perf_counter()
    client.async_stream_infer("txt2img_stream", inputs, enable_empty_final_response=True)
    stamps = []
    try:
        while True:
            stamp, result, error = arrivals.get(timeout=600)
            if error is not None:
                raise RuntimeError(error)
            if result.as_numpy("step") is not None:
                stamps.append(stamp)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return list(np.diff(stamps)), stamp - start
    finally:
        client.stop_stream()
        client.close()


def summary(step_times: list[float]) -> dict:
    return {"step_ms_median": statistics.median(step_times) * 1e3, "step_ms_p90": percentile(step_times, 90) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument(
        "--pipeline-kind", default="QwenImage transformer width (24x128 heads), 4 layers, random weights"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--sizes", type=lambda s: [int(c) for c in s.split(",")], default=[512, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--true-cfg-scale", type=float, default=4.0, help="> 1: with a negative prompt (two forwards per step)"
    )
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="requests each Triton client sends one after another")
    parser.add_argument("--port", type=int, default=18200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from diffusers import QwenImagePipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pipe = QwenImagePipeline.from_pretrained(str(args.pipeline), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    in_process = {}
    for size in args.sizes:
        for batch in args.concurrency:
            steps, latency = in_process_times(pipe, size, batch, args)
            in_process[f"{size}/{batch}"] = {**summary(steps), "latency_s": latency}
            print(f"in-process {size}px batch {batch}: {in_process[f'{size}/{batch}']}", flush=True)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    process, url, metrics_url = start_server(args)
    served = {}
    try:
        for size in args.sizes:
            for concurrency in args.concurrency:
                stream_step_times(url, 0, size, args)  # warm-up at this shape
                rows0 = metric(metrics_url, "stepdiff_denoise_batch_size_sum")
                forwards0 = metric(metrics_url, "stepdiff_denoise_batch_size_count")
                with ThreadPoolExecutor(concurrency) as pool:
                    per_client = pool.map(
                        lambda client: [
                            stream_step_times(url, client * 1000 + n, size, args)  # noqa: B023 - map runs now
                            for n in range(args.rounds)
                        ],
                        range(concurrency),
                    )
                    runs = [run for client_runs in per_client for run in client_runs]
                steps = [gap for gaps, _ in runs for gap in gaps]
                rows = metric(metrics_url, "stepdiff_denoise_batch_size_sum") - rows0
                forwards = metric(metrics_url, "stepdiff_denoise_batch_size_count") - forwards0
                served[f"{size}/{concurrency}"] = {
                    **summary(steps),
                    "latency_s_median": statistics.median(total for _, total in runs),
                    "mean_requests_per_batched_step": rows / max(forwards, 1),
                }
                print(f"triton {size}px concurrency {concurrency}: {served[f'{size}/{concurrency}']}", flush=True)
    finally:
        process.stop()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "gpu": gpu, "date": time.strftime("%Y-%m-%d")},
        "in_process": in_process,
        "triton": served,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# QwenImage per-step time ({result['config']['date']}, {gpu})",
        "",
        f"{args.pipeline_kind}; {args.dtype}, {args.steps} steps, true_cfg_scale {args.true_cfg_scale}"
        f"{' with a negative prompt' if args.true_cfg_scale > 1 else ''}. Command: `{' '.join(sys.argv)}`",
        "",
        "| size | requests | in-process ms/step (median) | Triton ms/step (median) | Triton / in-process | "
        "Triton p90 ms | "
        "in-process latency s | Triton latency s (median) | requests per batched step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in served.items():
        size, concurrency = key.split("/")
        base = in_process[key]["step_ms_median"]
        lines.append(
            f"| {size} | {concurrency} | {base:.1f} | {row['step_ms_median']:.1f} | "
            f"{row['step_ms_median'] / base:.2f}x | "
            f"{row['step_ms_p90']:.1f} | {in_process[key]['latency_s']:.2f} | {row['latency_s_median']:.2f} | "
            f"{row['mean_requests_per_batched_step']:.2f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
