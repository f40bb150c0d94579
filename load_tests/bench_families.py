#!/usr/bin/env python3
"""Per-step time of any family stepdiff serves: its stock diffusers pipeline in-process against stepdiff on Triton.

``--pipeline`` is any pipeline directory stepdiff serves (SD 1.x/2.x, SDXL, SD3, Flux.1, QwenImage), e.g.
``stepdiff make-tiny sdxl-size|flux-size|sd3-size|qwenimage-size|sd15-size DIR``. In-process, the family's
own pipeline class (``DiffusionPipeline.from_pretrained``) runs with 1 and with C prompts per call, and a
step is timed between its ``callback_on_step_end`` calls (the device synchronized). Through Triton
(``stepdiff serve``), ``txt2img_stream`` sends one response per step; a step is the gap between two responses
at the client, with 1 and with C requests in flight (their steps batch in denoise_step). Both sides run the
same pipeline, size, steps, dtype and guidance. Triton's step responses do not wait for the GPU (nothing is
read back until the last step), so the end-to-end latencies (prompt to image, both sides) are the figures
to compare; step gaps show the pace.

Guidance options left out keep the family's diffusers defaults (``guidance_scale``, ``true_cfg_scale``); the
negative prompt defaults to none, except for QwenImage, whose default true CFG (4.0) runs only with one.
``--dtype`` defaults to the family's usual one on CUDA (float16: SD, SDXL, SD3; bfloat16: Flux, QwenImage)
and float32 on CPU.

Each run writes ``<name>.json`` and ``<name>.md`` (name: ``--name``, by default the pipeline directory's)
to ``--out`` and rewrites ``results.md`` there: one table over every pipeline benchmarked into ``--out``.

    python load_tests/bench_families.py --pipeline build/sdxl-size --out results/families --dtype float16
    python load_tests/bench_families.py --pipeline build/qwenimage-size --out results/families --dtype bfloat16
"""

from __future__ import annotations

import argparse
import inspect
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

from stepdiff.settings import DTYPES, torch_dtype

PROMPT = "a photo of an astronaut riding a horse on mars, cinematic lighting"
NEGATIVE_PROMPT = "blurry, low quality"
# pipeline class -> (family, dtype on CUDA when --dtype is not given, negative prompt when not given)
FAMILIES = {
    "StableDiffusionPipeline": ("SD 1.x/2.x", "float16", None),
    "StableDiffusionXLPipeline": ("SDXL", "float16", None),
    "StableDiffusion3Pipeline": ("SD3", "float16", None),
    "FluxPipeline": ("Flux.1", "bfloat16", None),
    "QwenImagePipeline": ("QwenImage", "bfloat16", NEGATIVE_PROMPT),  # true CFG 4.0 needs a negative prompt
}
GUIDANCE = ("guidance_scale", "true_cfg_scale")


def load_pipeline(path: Path, device: torch.device, dtype: torch.dtype):
    """The family's own diffusers pipeline, as the server loads it (safetensors, no safety checker)."""
    from diffusers import DiffusionPipeline

    index = json.loads((path / "model_index.json").read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, use_safetensors=True, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of(pipe) -> str:
    family = FAMILIES[type(pipe).__name__][0]
    if family == "Flux.1":
        return f"Flux.1 {'dev' if pipe.transformer.config.guidance_embeds else 'schnell'}"
    return family


def describe(pipe, path: Path) -> str:
    """``name``: pipeline class, denoiser class and size."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    parameters = sum(p.numel() for p in denoiser.parameters())
    count = f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.3g}M"
    return f"`{path.name}`: {type(pipe).__name__}, {type(denoiser).__name__} of {count} parameters"


def guidance_options(pipe, args) -> tuple[dict, dict]:
    """(the guidance options both sides send: only those given, the family's defaults otherwise; the
    effective values, for the report: the pipeline's own defaults filled in)."""
    accepted = inspect.signature(pipe.__call__).parameters
    sent = {name: getattr(args, name) for name in GUIDANCE if getattr(args, name) is not None}
    if args.negative_prompt is not None:
        sent["negative_prompt"] = args.negative_prompt
    effective = {name: sent.get(name, accepted[name].default) for name in GUIDANCE if name in accepted}
    effective["negative_prompt"] = sent.get("negative_prompt")
    return sent, effective


def in_process_times(pipe, size: int, batch: int, args) -> tuple[list[float], float]:
    """(seconds per denoising step, end-to-end seconds) of the pipeline with ``batch`` prompts.

    Steps are timed between ``callback_on_step_end`` calls with the device synchronized; the end-to-end
    time (prompt encoding to decoded image) is the median of separate calls without those synchronizations.
    """
    stamps: list[float] = []
    accepted = inspect.signature(pipe.__call__).parameters
    options = {name: value for name, value in args.guidance.items() if name in accepted}  # as the server ignores
    if "negative_prompt" in options:
        options["negative_prompt"] = [options["negative_prompt"]] * batch

    def on_step_end(pipeline, step, timestep, tensors):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return tensors

    def run(**extra) -> None:
        pipe(
            [PROMPT] * batch,
            num_inference_steps=args.steps,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            **options,
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

    options = dict(seed=seed, num_inference_steps=args.steps, height=size, width=size, **args.guidance)
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


def guidance_text(effective: dict) -> str:
    parts = [f"{name} {value}" for name, value in effective.items() if name != "negative_prompt" and value is not None]
    negative = effective["negative_prompt"]
    return ", ".join(parts) + (f", negative prompt {negative!r}" if negative is not None else ", no negative prompt")


def table(result: dict) -> list[str]:
    """One pipeline's markdown: its family, pipeline class, settings and command, then the table."""
    config, in_process, served = result["config"], result["in_process"], result["triton"]
    lines = [
        f"# {config['family']} per-step time ({config['date']}, {config['gpu']})",
        "",
        f"{config['description']}; {config['dtype']}, {config['steps']} steps, {guidance_text(result['guidance'])}. "
        f"Command: `{config['command']}`",
        "",
        "| size | requests | in-process ms/step (median) | Triton ms/step (median) | Triton / in-process | "
        "Triton p90 ms | in-process latency s | Triton latency s (median) | requests per batched step |",
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
    return lines


def combined_table(out: Path) -> list[str]:
    """Every pipeline benchmarked into ``out``, one table, in family order."""
    results = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    results = [
        result for result in results if isinstance(result, dict) and "pipeline_class" in result.get("config", {})
    ]
    order = list(FAMILIES)
    results.sort(key=lambda result: (order.index(result["config"]["pipeline_class"]), result["config"]["name"]))
    lines = [
        "# Per-step time by family: in-process diffusers against stepdiff on Triton",
        "",
        "One row per pipeline, size and number of requests at once; `<name>.md` has each run's command, "
        "guidance and p90s.",
        "",
        "| family | pipeline | dtype | steps | size | requests | in-process ms/step | Triton ms/step | "
        "Triton / in-process | in-process latency s | Triton latency s | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        config = result["config"]
        for key, row in result["triton"].items():
            size, concurrency = key.split("/")
            base = result["in_process"][key]
            lines.append(
                f"| {config['family']} | `{config['name']}` ({config['pipeline_class']}) | {config['dtype']} | "
                f"{config['steps']} | {size} | {concurrency} | {base['step_ms_median']:.1f} | "
                f"{row['step_ms_median']:.1f} | {row['step_ms_median'] / base['step_ms_median']:.2f}x | "
                f"{base['latency_s']:.2f} | {row['latency_s_median']:.2f} | {config['gpu']} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pipeline", type=Path, required=True, help="a diffusers directory of a family stepdiff serves"
    )
    parser.add_argument("--name", help="file names in --out (default: the pipeline directory's name)")
    parser.add_argument("--pipeline-kind", help="description in the table (default: class and denoiser size)")
    parser.add_argument("--out", type=Path, required=True, help="several runs may share it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the family's on CUDA, float32 on CPU")
    parser.add_argument("--sizes", type=lambda s: [int(c) for c in s.split(",")], default=[512, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, help="default: the family's (SD 7.5, SDXL 5, SD3 7, Flux 3.5)")
    parser.add_argument(
        "--true-cfg-scale",
        type=float,
        help="Flux, QwenImage: default the family's (1.0, 4.0); > 1 with a negative prompt",
    )
    parser.add_argument("--negative-prompt", help=f"default: none, QwenImage {NEGATIVE_PROMPT!r}")
    parser.add_argument("--no-negative-prompt", action="store_true", help="none, QwenImage included")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="requests each Triton client sends one after another")
    parser.add_argument("--port", type=int, default=18200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.name = args.name or args.pipeline.resolve().name
    if args.name == "results":
        parser.error("--name results would overwrite the combined results.md; pass another --name")
    pipeline_class = json.loads((args.pipeline / "model_index.json").read_text())["_class_name"]
    if pipeline_class not in FAMILIES:
        parser.error(f"{pipeline_class} is not a family stepdiff serves ({', '.join(FAMILIES)})")
    device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = FAMILIES[pipeline_class][1] if device.type == "cuda" else "float32"
    if args.negative_prompt is None and not args.no_negative_prompt:
        args.negative_prompt = FAMILIES[pipeline_class][2]

    pipe = load_pipeline(args.pipeline, device, torch_dtype(args.dtype))
    family, description = family_of(pipe), args.pipeline_kind or describe(pipe, args.pipeline)
    args.guidance, effective = guidance_options(pipe, args)
    print(f"{family}: {description}; {guidance_text(effective)}", flush=True)
    in_process = {}
    # a fresh process's first pipeline calls run slow beyond the per-shape warm-up (on a fresh H200,
    # SDXL at 512 with one prompt measured 2.45 s against 1.48 s at 1024): one untimed round first
    in_process_times(pipe, args.sizes[0], args.concurrency[0], args)
    for size in args.sizes:
        for batch in args.concurrency:
            steps, latency = in_process_times(pipe, size, batch, args)
            in_process[f"{size}/{batch}"] = {**summary(steps), "latency_s": latency}
            print(f"in-process {size}px batch {batch}: {in_process[f'{size}/{batch}']}", flush=True)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    process, url, metrics_url = start_server(args, log_name=f"tritonserver-{args.name}.log")
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
    result = {
        "config": {
            **{k: str(v) for k, v in vars(args).items() if k != "guidance"},
            "family": family,
            "pipeline_class": pipeline_class,
            "description": description,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
        },
        "guidance": effective,
        "in_process": in_process,
        "triton": served,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = table(result)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.md").write_text("\n".join(combined_table(args.out)) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
