#!/usr/bin/env python3
"""What each torch.compile lever buys stepdiff's compiled stages, in-process, against the compiled call
as served, in one run.

``--denoiser compiled`` replays the adapter's denoiser call through ``torch.compile`` (Inductor's default
options, one graph with a dynamic batch) from CUDA graphs; ``--decoder compiled`` runs the VAE's decode
through ``torch.compile``. The levers these leave out (PyTorch's and diffusers' speed-up guides):

- ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` (cuDNN times its algorithms for each shape;
  Inductor calls cuDNN for convolutions);
- ``channels_last``: the module's weights in channels-last memory format;
- ``inductor_tuning``: diffusers' recipe for SDXL: ``conv_1x1_as_mm``, ``coordinate_descent_tuning``,
  ``epilogue_fusion=False``;
- ``fused_qkv``: each attention's projections fused into one matmul (``fuse_qkv_projections``; denoiser);
- ``static``: a compiled graph per batch size instead of one with a dynamic batch (decoder);
- ``all``: every lever of the stage together.

Each lever gets a freshly loaded stage (the adapter ``stepdiff serve`` loads), compiled and warmed up,
then timed at each of --batches requests per forward (the denoiser: guided, 2 rows per request,
through the runner as ``denoise_step`` runs it) and --decode-batches latents per decode. The tables
give ms per call, each lever against ``served`` in the same run, the compile time, and how far its
output lies from the eager call's. Writes results.json and results.md to --out, after each lever.

    python load_tests/bench_compile.py --pipeline build/sd15-size --out results/compile --device cuda --dtype float16
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch._dynamo
import torch._inductor.config
from bench_batching import csv_of, sd_arguments, timed  # also puts src/ on sys.path

from stepdiff.adapters import Stage, StepAdapter, load_adapter
from stepdiff.runner import DenoiserRunner, compiled
from stepdiff.settings import torch_dtype

INDUCTOR_TUNING = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}


@dataclass(frozen=True)
class Lever:
    """What one lever changes; ``served`` changes nothing."""

    cudnn_benchmark: bool = False
    channels_last: bool = False
    inductor: dict[str, Any] = field(default_factory=dict)
    fused_qkv: bool = False
    static: bool = False


SHARED_LEVERS = {
    "served": Lever(),
    "cudnn_benchmark": Lever(cudnn_benchmark=True),
    "channels_last": Lever(channels_last=True),
    "inductor_tuning": Lever(inductor=INDUCTOR_TUNING),
}


def with_all(levers: dict[str, Lever]) -> dict[str, Lever]:
    """``levers`` and ``all``: every one of them together."""
    together = Lever(
        cudnn_benchmark=any(lever.cudnn_benchmark for lever in levers.values()),
        channels_last=any(lever.channels_last for lever in levers.values()),
        inductor={key: value for lever in levers.values() for key, value in lever.inductor.items()},
        fused_qkv=any(lever.fused_qkv for lever in levers.values()),
        static=any(lever.static for lever in levers.values()),
    )
    return {**levers, "all": together}


DENOISER_LEVERS = with_all({**SHARED_LEVERS, "fused_qkv": Lever(fused_qkv=True)})
DECODER_LEVERS = with_all({**SHARED_LEVERS, "static": Lever(static=True)})
LEVERS = {"denoiser": DENOISER_LEVERS, "decoder": DECODER_LEVERS}


@contextlib.contextmanager
def applied(lever: Lever, modules: list[torch.nn.Module]) -> Iterator[None]:
    """``lever``'s process-wide settings for the duration (compiles happen inside), and its changes to
    ``modules`` (freshly loaded, dropped afterwards). Dynamo starts afresh, so that a lever never runs
    code compiled for another."""
    torch._dynamo.reset()
    for module in modules:
        if lever.channels_last:
            module.to(memory_format=torch.channels_last)
        if lever.fused_qkv:
            module.fuse_qkv_projections()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = lever.cudnn_benchmark
    try:
        with torch._inductor.config.patch(lever.inductor):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def stage_modules(adapter: StepAdapter, stage: Stage) -> list[torch.nn.Module]:
    """The modules a compiled stage runs: the denoiser's (UNet or transformer), or the VAE."""
    names = adapter.stage_components[Stage.DENOISE] if stage == Stage.DENOISE else ("vae",)
    return [module for name in names if isinstance(module := getattr(adapter.pipe, name, None), torch.nn.Module)]


def denoiser_calls(
    adapter: StepAdapter, lever: Lever, size: int, batches: list[int], mode: str
) -> dict[int, Callable[[], Any]]:
    """For each of ``batches`` requests, a call running the runner's forward (``mode``: compiled or eager)
    on that many guided requests (random rows, the same for every lever), as ``denoise_step`` runs it."""
    runner = DenoiserRunner(adapter.denoise, adapter.device, mode)
    generator = torch.Generator().manual_seed(0)
    [example] = adapter.warmup_rows(size, size)
    for name, value in example.tensors.items():
        if value.is_floating_point() and name != "timestep":
            value.copy_(torch.randn(value.shape, generator=generator).to(value.dtype))
    return {batch: (lambda batch=batch: runner.run([example] * batch)[0]) for batch in batches}


def decoder_calls(
    adapter: StepAdapter, lever: Lever, size: int, batches: list[int], mode: str
) -> dict[int, Callable[[], Any]]:
    """For each of ``batches`` requests, a call decoding that many random latents (the same for every
    lever) to images, as ``vae_decode`` runs it with ``--decoder`` ``mode`` (compiled or eager)."""
    if mode == "compiled" and lever.static:
        adapter.pipe.vae.decode = compiled(adapter.pipe.vae.decode, dynamic=False)
    elif mode == "compiled":
        adapter.compile_decode()
    generator = torch.Generator().manual_seed(0)
    latents = {batch: adapter.warmup_latents(size, size, batch).normal_(generator=generator) for batch in batches}
    return {batch: (lambda batch=batch: adapter.decode(latents[batch])) for batch in batches}


CALLS = {"denoiser": (Stage.DENOISE, denoiser_calls), "decoder": (Stage.DECODE, decoder_calls)}
STAGE_BATCHES = {"denoiser": lambda args: args.batches, "decoder": lambda args: args.decode_batches}


def difference(output: Any, reference: Any) -> float:
    """The largest absolute difference between two outputs (denoiser rows, or uint8 images in levels)."""
    as_array = (lambda value: value.float().cpu().numpy()) if isinstance(output, torch.Tensor) else np.asarray
    return float(np.abs(as_array(output).astype(np.float64) - as_array(reference).astype(np.float64)).max())


def measure_stage(
    stage_name: str, levers: list[str], batches: list[int], args, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, dict]]:
    """Each lever's name and its compile time, ms per call at each of ``batches`` and distance from
    eager, for one stage, as each is measured."""
    stage, make_calls = CALLS[stage_name]
    eager = load_adapter(str(args.pipeline), stage, device, dtype)
    with torch.inference_mode():
        reference = make_calls(eager, Lever(), args.size, batches[:1], "eager")[batches[0]]()
    del eager
    for name in levers:
        lever = LEVERS[stage_name][name]
        adapter = load_adapter(str(args.pipeline), stage, device, dtype)
        with applied(lever, stage_modules(adapter, stage)), torch.inference_mode():
            calls = make_calls(adapter, lever, args.size, batches, "compiled")
            began = time.perf_counter()
            for call in calls.values():  # compiles (and on CUDA captures) every batch
                call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - began
            ms = {batch: timed(call, args.repeats, device) * 1e3 for batch, call in calls.items()}
            distance = difference(calls[batches[0]](), reference)
        print(
            f"{stage_name} {name:16s} compile {compile_s:6.1f} s  "
            + "  ".join(f"{batch}: {value:7.1f} ms" for batch, value in ms.items())
            + f"  vs eager: {distance:.3g}",
            flush=True,
        )
        del adapter, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield name, {"compile_s": compile_s, "ms_per_call": ms, "max_difference_from_eager": distance}


def markdown(results: dict[str, dict], args, device_name: str) -> str:
    """The tables: per stage, each lever's ms per call at each batch, against ``served`` of the same run."""
    lines = [
        "# torch.compile levers for the compiled stages, in-process",
        "",
        f"Pipeline {args.pipeline}, {args.dtype}, {args.size}x{args.size}, device {device_name}; median of "
        f"{args.repeats} calls after a warm-up. Denoiser: one forward through the runner (`compiled`: "
        "torch.compile + CUDA graphs) of that many guided requests (2 rows each); decoder: the adapter's "
        "decode of that many latents to uint8 images. The difference from eager is at the first batch "
        "(denoiser: in the output's units; decoder: levels of 255).",
    ]
    if torch._dynamo.config.disable:
        lines += ["", "**torch.compile was disabled (TORCH_COMPILE_DISABLE=1): every lever ran eagerly.**"]
    for stage_name, table in results.items():
        batches = STAGE_BATCHES[stage_name](args)
        served = table.get("served", {}).get("ms_per_call", {})
        header = " | ".join(f"{batch} requests: ms (vs served)" for batch in batches)
        lines += ["", f"## {stage_name}", "", f"| lever | compile s | {header} | difference from eager |"]
        lines.append("|---" * (len(batches) + 3) + "|")
        for name, row in table.items():
            cells = [f"{ms:.1f} ({ms / served[batch]:.2f}x)" for batch, ms in row["ms_per_call"].items()]
            distance = row["max_difference_from_eager"]
            lines.append(f"| {name} | {row['compile_s']:.1f} | " + " | ".join(cells) + f" | {distance:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = sd_arguments(__doc__)
    parser.add_argument("--stages", type=csv_of(str), default=["denoiser", "decoder"], help="denoiser,decoder")
    parser.add_argument(
        "--levers",
        type=csv_of(str),
        default=["served", "cudnn_benchmark", "channels_last", "inductor_tuning", "fused_qkv", "static", "all"],
        help="levers to time (each stage takes those it has; served first: the baseline)",
    )
    parser.add_argument(
        "--batches",
        type=csv_of(int),
        default=[1, 16, 26],
        help="the denoiser's requests per forward (26: about the mean at 32 in flight; 32, 64 rows, costs "
        "another compile: diffusers' Upsample2D branches at a batch of 64)",
    )
    parser.add_argument("--decode-batches", type=csv_of(int), default=[1, 4, 8], help="the decoder's latents per call")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    unknown = sorted(set(args.stages) - set(LEVERS))
    if unknown:
        parser.error(f"--stages: unknown {','.join(unknown)} (allowed: {', '.join(LEVERS)})")
    known = set().union(*(LEVERS[stage] for stage in args.stages))
    unknown = sorted(set(args.levers) - known)
    if unknown:
        parser.error(f"--levers: unknown {','.join(unknown)} (allowed: {', '.join(sorted(known))})")
    if args.levers[:1] != ["served"]:
        parser.error(f"--levers must start with served (the baseline), got {','.join(args.levers)}")
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    settings = {**vars(args), "pipeline": str(args.pipeline), "out": str(args.out)}
    results: dict[str, dict] = {}
    for stage_name in args.stages:
        levers = [name for name in args.levers if name in LEVERS[stage_name]]
        results[stage_name] = {}
        measured = measure_stage(stage_name, levers, STAGE_BATCHES[stage_name](args), args, device, dtype)
        for name, row in measured:  # written after each lever: a run cut off keeps what it measured
            results[stage_name][name] = row
            (args.out / "results.md").write_text(markdown(results, args, device_name))
            (args.out / "results.json").write_text(json.dumps({"args": settings, "results": results}, indent=2))
    print(markdown(results, args, device_name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
