#!/usr/bin/env python3
"""Per-step cost of LoRA adapters in a batch of requests, in-process (the denoise_step engine, no Triton).

--requests generations (CFG, one image size) step together through the StepEngine and its runner
(--mode) with: no adapter; every request on one adapter; the requests spread over 4 distinct adapters
plus requests without any, mixed in one forward (the stacked adapters of ``MixedLoRA``), and the same
spread with mixing turned off (forwards grouped by setting: 5 per step). Adapters are random
(``make_tiny_lora``, rank --rank) for the pipeline. Prints a markdown table against the no-LoRA baseline
of the same run and writes results.json / results.md to --out.

    python load_tests/bench_lora.py --pipeline build/sd15-size --out results/lora --device cuda --dtype float16
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from bench_batching import PROMPT, sd_arguments  # also puts src/ on sys.path

from stepdiff.adapters import GenerationParams, Stage, load_adapter
from stepdiff.engine import StepCall, StepEngine
from stepdiff.runner import DenoiserRunner
from stepdiff.settings import torch_dtype
from stepdiff.tiny import make_tiny_lora

ADAPTERS = 4


def step_seconds(engine: StepEngine, conditioning, settings: list, args, device: torch.device) -> tuple[float, int]:
    """Median seconds per batched step of ``len(settings)`` generations (setting i for request i), and
    the forwards of the last step."""
    calls = [
        StepCall(
            index + 1,
            start=True,
            params=GenerationParams(PROMPT, None, index, args.steps, 7.5, args.size, args.size, args.scheduler, 1.0, s),
            conditioning=conditioning,
        )
        for index, s in enumerate(settings)
    ]
    engine.run(calls)
    samples = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        results = engine.run([StepCall(index + 1) for index in range(len(settings))])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - began)
        assert all(result.error is None for result in results), [result.error for result in results]
    return statistics.median(samples[1:]), len(engine.forward_batch_sizes)  # the first step may capture graphs


def main() -> int:
    parser = sd_arguments(__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mode", default="exact", choices=["exact", "compiled", "eager"])
    parser.add_argument("--scheduler", default="EulerDiscreteScheduler")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    loras = {
        f"lora{index}": str(make_tiny_lora(args.pipeline, args.out / f"lora{index}", seed=index, rank=args.rank))
        for index in range(ADAPTERS)
    }
    encoder = load_adapter(str(args.pipeline), Stage.TEXT_ENCODER, device, dtype)
    denoiser = load_adapter(str(args.pipeline), Stage.DENOISE, device, dtype, loras)
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(GenerationParams(PROMPT, None, 0, args.steps, 7.5, 64, 64, args.scheduler))
    runner = DenoiserRunner(denoiser.denoise, device, args.mode, max_rows=2 * args.requests)
    engine = StepEngine(denoiser, args.requests, 4 * args.requests, 600.0, runner)
    names = list(loras)
    spread = [((names[index % 5], 1.0),) if index % 5 < ADAPTERS else () for index in range(args.requests)]
    cases = {  # case -> (settings, mixing on)
        "no adapter": ([()] * args.requests, True),
        "1 adapter (all requests)": ([((names[0], 1.0),)] * args.requests, True),
        f"{ADAPTERS} adapters + none, mixed": (spread, True),
        f"{ADAPTERS} adapters + none, grouped by setting": (spread, False),
    }
    stacked = denoiser.mixed_lora
    rows = []
    for case, (settings, mixing) in cases.items():
        denoiser.mixed_lora = stacked if mixing else None  # None: the engine groups forwards by setting
        seconds, forwards = step_seconds(engine, conditioning, settings, args, device)
        rows.append({"case": case, "step_ms": seconds * 1000, "forwards_per_step": forwards})
        print(f"{case}: {seconds * 1000:.1f} ms per step, {forwards} forwards", flush=True)
    base = rows[0]["step_ms"]
    lines = [
        f"# LoRA per-step cost, {args.requests} requests per step (in-process engine, `{args.mode}`)",
        "",
        f"Pipeline {args.pipeline}, {args.dtype}, {args.size}x{args.size}, CFG 7.5, {args.scheduler}, random "
        f"LoRAs of rank {args.rank} on the UNet's attention projections. Device: "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}.",
        "",
        "| case | forwards per step | ms per step | vs no adapter |",
        "|---|---|---|---|",
        *(
            f"| {row['case']} | {row['forwards_per_step']} | {row['step_ms']:.1f} | {row['step_ms'] / base:.2f}x |"
            for row in rows
        ),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {"args": vars(args) | {"pipeline": str(args.pipeline), "out": str(args.out)}, "rows": rows}, indent=2
        )
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
