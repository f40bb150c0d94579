#!/usr/bin/env python3
"""stepdiff on Triton against the same pipeline in-process, side by side, in one run.

1. Reference images: stock eager StableDiffusionPipeline for each scheduler and --check-seeds.
2. Through Triton (`stepdiff serve`, gRPC), per --modes (exact, compiled; compiled serves the VAE decode
   compiled too, `--decoder compiled`): images at concurrency 1
   checked against the references; latency at concurrency 1 per
   scheduler, with a per-step breakdown from Triton's statistics; a closed-loop concurrency sweep
   (images/s, p50/p99, mean requests per denoiser forward; --closed-loop staggered, the default, starts
   the clients spread over a generation's time and counts a window after the ramp: the steady state)
   and Poisson arrivals at a fraction of the peak (counted after a ramp-up, without the drain), for the
   first scheduler (on txt2img_stream, progress every step, with --model txt2img_stream). With
   --cold-start, each mode's server is first started once with the Inductor cache emptied, and that
   start is timed too.
3. In-process (same run, same GPU), per scheduler: the pipeline's latency at batch 1 with its
   UNet eager, replayed from CUDA graphs (stepdiff's runner, mode exact), and compiled (runner, mode
   compiled: torch.compile + graphs); the UNet alone at 1..N requests per forward (with CFG, 2 rows
   each) in the three variants: the ceilings. The other stages' GPU costs by batch, as stepdiff's
   text_encoder and vae_decode run them (the adapters' own calls): the text encoder, and the VAE decode
   eager (the served path), in channels-last memory format and compiled (with --variants compiled): the
   levers for the GPU time an image spends outside the UNet.
4. results.json, rewritten after every phase (a run cut off keeps what it measured), then results.md
   (+ a PNG plot when matplotlib is installed) in --out.

The served part comes before the in-process compiles so that a lent machine taken away mid-run still
leaves the served figures.

    python load_tests/bench_batching.py --pipeline build/sd15-size --out results/gpu --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "client"))
sys.path.insert(0, str(REPO / "src"))

import generate as txt2img_client  # noqa: E402

from stepdiff import server as triton  # noqa: E402
from stepdiff.pipeline_source import resolve_pipeline  # noqa: E402
from stepdiff.repository import write_repository_for  # noqa: E402
from stepdiff.runner import COMPILE_CACHE, MODES, DenoiserRunner, Rows  # noqa: E402
from stepdiff.settings import DTYPES, Settings, torch_dtype  # noqa: E402

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


def graph_unet(unet, mode: str, device: torch.device) -> DenoiserRunner:
    """Route ``unet``'s calls through a DenoiserRunner (``exact``: its eager forward replayed from CUDA
    graphs; ``compiled``: torch.compile + graphs), as a lone request in stepdiff runs it."""
    eager = unet.forward

    def forward(key, inputs):
        return eager(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            return_dict=False,
        )[0]

    runner = DenoiserRunner(forward, device, mode)

    def routed(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32).expand(sample.shape[0])
        tensors = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        [output] = runner.run(
            [Rows((tuple(sample.shape[1:]), tuple(encoder_hidden_states.shape[1:])), tensors)], separate=True
        )
        return (output,)

    unet.forward = routed
    return runner


def stock_pipeline(args, device: torch.device, dtype: torch.dtype):
    """The stock StableDiffusionPipeline on ``device``, and a function running it for (scheduler, seed)
    to a float image in [0, 1]."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(args.pipeline), dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config

    def run_pipeline(scheduler: str, seed: int = 0) -> np.ndarray:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(config)
        return pipe(
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]

    return pipe, run_pipeline


def as_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


def in_process_references(args, device: torch.device, dtype: torch.dtype) -> dict[str, dict[int, np.ndarray]]:
    """Stock eager diffusers' image for each scheduler and --check-seeds: what the served images and the
    in-process variants are checked against."""
    pipe, run_pipeline = stock_pipeline(args, device, dtype)
    references = {
        scheduler: {seed: as_uint8(run_pipeline(scheduler, seed)) for seed in args.check_seeds}
        for scheduler in args.schedulers
    }
    del pipe, run_pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return references


def in_process_baseline(args, device: torch.device, dtype: torch.dtype, references: dict) -> dict:
    pipe, run_pipeline = stock_pipeline(args, device, dtype)
    latent = args.size // pipe.vae_scale_factor
    latency: dict[str, dict[str, float]] = {}
    ceiling: dict[str, dict[int, dict]] = {}
    setup: dict[str, float] = {}
    eager_forward = pipe.unet.forward
    for variant in args.variants:
        pipe.unet.forward = eager_forward
        began = time.perf_counter()
        if variant != "eager":
            graph_unet(pipe.unet, variant, device)
        run_pipeline(args.schedulers[0])  # captures (and compiles) the batch-of-2 graph
        setup[variant] = time.perf_counter() - began
        for scheduler in args.schedulers:
            latency.setdefault(variant, {})[scheduler] = timed(lambda: run_pipeline(scheduler), args.repeats, device)  # noqa: B023, F821 - called at once
            print(f"in-process {variant:8s} {scheduler}: {latency[variant][scheduler] * 1e3:.0f} ms", flush=True)
            if variant != "eager":
                identical = all(
                    np.array_equal(as_uint8(run_pipeline(scheduler, seed)), reference)
                    for seed, reference in references[scheduler].items()
                )
                latency[variant][f"{scheduler}_identical_to_eager"] = identical
                print(f"in-process {variant:8s} {scheduler}: images identical to eager: {identical}", flush=True)
        ceiling[variant] = {}
        with torch.inference_mode():
            for requests in args.ceiling_batches:
                rows = 2 * requests if args.guidance > 1 else requests
                sample = torch.randn(rows, pipe.unet.config.in_channels, latent, latent, device=device, dtype=dtype)
                embeddings = torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
                timesteps = torch.full((rows,), 500.0, device=device)
                seconds = timed(
                    lambda: pipe.unet(sample, timesteps, encoder_hidden_states=embeddings),  # noqa: B023, F821
                    args.repeats,
                    device,
                )
                ceiling[variant][requests] = {
                    "forward_ms": seconds * 1e3,
                    "request_steps_per_s": requests / seconds,
                    "images_per_s": requests / seconds / args.steps,
                }
                print(
                    f"ceiling {variant:8s}: {requests:3d} requests/forward  {seconds * 1e3:7.1f} ms  "
                    f"{requests / seconds / args.steps:6.2f} images/s",
                    flush=True,
                )
    pipe.unet.forward = eager_forward
    del pipe, run_pipeline  # frees the GPU for the stage costs measured next
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"pipeline_latency_s": latency, "ceiling": ceiling, "setup_s": setup}


def in_process_stage_costs(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Milliseconds per call of the text encoder (with guidance) and of the VAE decode at each of
    --stage-batches requests, through the stage adapters that text_encoder and vae_decode serve; the
    decode also in channels-last format and, when --variants names compiled, through torch.compile, each
    with whether a lone image stays identical to the served decode."""
    from stepdiff.adapters import GenerationParams, Stage, load_adapter

    encoder = load_adapter(str(args.pipeline), Stage.TEXT_ENCODER, device, dtype)
    decoder = load_adapter(str(args.pipeline), Stage.DECODE, device, dtype)
    info = encoder.info
    params = GenerationParams(
        PROMPT, None, 0, args.steps, args.guidance, args.size, args.size, info.default_scheduler, args.guidance
    )
    costs: dict[str, dict[int, float]] = {"text_encoder": {}}
    with torch.inference_mode():
        for batch in args.stage_batches:
            seconds = timed(lambda: encoder.encode_prompts([params] * batch), args.repeats, device)  # noqa: B023
            costs["text_encoder"][batch] = seconds * 1e3
        vae = decoder.pipe.vae
        eager_decode = vae.decode
        variants = ["eager", "channels_last"] + (["compiled"] if "compiled" in args.variants else [])
        generator = torch.Generator().manual_seed(0)
        lone = decoder.warmup_latents(args.size, args.size, 1).normal_(generator=generator)
        reference = decoder.decode(lone)
        identical: dict[str, bool] = {}
        for variant in variants:
            vae.to(memory_format=torch.channels_last if variant == "channels_last" else torch.contiguous_format)
            vae.decode = torch.compile(eager_decode) if variant == "compiled" else eager_decode
            began = time.perf_counter()
            image = decoder.decode(lone)
            print(f"stage vae_decode {variant}: first call {time.perf_counter() - began:.1f} s", flush=True)
            identical[variant] = bool(np.array_equal(image, reference))
            costs[f"vae_decode_{variant}"] = {}
            for batch in args.stage_batches:
                latents = decoder.warmup_latents(args.size, args.size, batch).normal_(generator=generator)
                seconds = timed(lambda: decoder.decode(latents), args.repeats, device)  # noqa: B023
                costs[f"vae_decode_{variant}"][batch] = seconds * 1e3
        vae.to(memory_format=torch.contiguous_format)
        vae.decode = eager_decode
    for stage, table in costs.items():
        print(f"stage {stage}: " + ", ".join(f"{b}: {ms:.1f} ms" for b, ms in table.items()), flush=True)
    return {"ms_per_call": costs, "lone_image_identical_to_served": identical}


class Load:
    """gRPC clients firing requests at ``model`` (txt2img, or txt2img_stream: a progress response per
    step, over one gRPC stream per client); one client per thread."""

    def __init__(self, url: str, args, model: str = "txt2img"):
        self.url, self.args, self.model = url, args, model
        self.local = threading.local()
        import tritonclient.grpc as module

        self.module = module

    def request(self, seed: int, scheduler: str | None = None) -> tuple[float, np.ndarray]:
        if not hasattr(self.local, "client"):
            self.local.client = self.module.InferenceServerClient(self.url)
        options = dict(
            seed=seed,
            num_inference_steps=self.args.steps,
            guidance_scale=self.args.guidance,
            height=self.args.size,
            width=self.args.size,
            scheduler=scheduler or self.args.schedulers[0],
        )
        if self.model == "txt2img_stream":
            return self.streamed(options)
        image, _, seconds = txt2img_client.generate(self.local.client, self.module, PROMPT, options)
        return seconds, image

    def streamed(self, options: dict) -> tuple[float, np.ndarray]:
        """One txt2img_stream request on this thread's stream: (seconds to its final response, image)."""
        if not hasattr(self.local, "responses"):
            responses = self.local.responses = queue.Queue()
            self.local.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        started = time.perf_counter()
        inputs = txt2img_client.build_inputs(self.module, PROMPT, {**options, "output_format": None})
        self.local.client.async_stream_infer("txt2img_stream", inputs, enable_empty_final_response=True)
        while True:
            result, error = self.local.responses.get()
            if error is not None:
                raise error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return time.perf_counter() - started, result.as_numpy("image")


def metric_total(text: str, name: str, model: str | None = None) -> float:
    """The sum of metric ``name`` over its label sets (those of ``model`` only, when given) in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and (model is None or f'model="{model}"' in line)
    )


def metrics_text(metrics_url: str) -> str:
    return urllib.request.urlopen(metrics_url, timeout=5).read().decode()


def metric(metrics_url: str, name: str) -> float:
    return metric_total(metrics_text(metrics_url), name)


def forward_counters(metrics_url: str) -> tuple[float, ...]:
    """denoise_step's requests in forwards, forwards, Triton's calls and executions of it, and its executes'
    seconds on the host and waiting for the GPU, so far (one reading of the metrics)."""
    text = metrics_text(metrics_url)
    names = (
        "stepdiff_denoise_batch_size_sum",
        "stepdiff_denoise_batch_size_count",
        "nv_inference_count",
        "nv_inference_exec_count",
        "stepdiff_denoise_host_seconds_total",
        "stepdiff_denoise_gpu_wait_seconds_total",
    )
    return tuple(metric_total(text, name, "denoise_step") for name in names)


def cpu_seconds(server_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by tritonserver and each model process."""
    if server_pid is None:
        return {}
    pids = {"tritonserver": server_pid}
    for stub in triton.stub_processes(server_pid):  # instances on several GPUs share a name
        pids[stub.instance if stub.instance not in pids else f"{stub.instance} (pid {stub.pid})"] = stub.pid
    used = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


CLOSED_LOOP_STARTS = {  # how the throughput tables' closed loops ran
    "together": "Closed loop: every client starts at once and every request counts (ramp-up and drain included).",
    "staggered": "Closed loop: the clients start spread over about one generation's time; only the requests "
    "completed in the measured window, after all were in flight for a generation's time, count.",
}


class GpuBusy:
    """How busy each GPU was between ``start`` and ``stop``: nvidia-smi's ``utilization.gpu`` (the share of
    time a kernel ran) sampled every 100 ms and averaged. Where the served GPU is busy nearly all the time,
    more throughput can only come from less GPU work, not from less waiting."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.sampler: subprocess.Popen | None = None

    def start(self) -> None:
        if self.enabled:
            query = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self.sampler = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> dict[int, float] | None:
        """The mean busy share per GPU index; None without nvidia-smi or off the GPU."""
        if self.sampler is None:
            return None
        self.sampler.terminate()
        samples: dict[int, list[float]] = {}
        for line in self.sampler.communicate()[0].splitlines():
            index, _, busy = line.partition(",")
            with contextlib.suppress(ValueError):  # "[N/A]" where a GPU cannot tell
                samples.setdefault(int(index), []).append(float(busy) / 100)
        return {index: round(statistics.mean(values), 3) for index, values in samples.items()} or None


class WindowReadings:
    """The denoiser's forward counters and the Triton processes' CPU seconds at the two edges of a
    measurement window, and how busy the GPUs were in between (with ``gpu``): read by timers at the
    ``window``'s (monotonic) times; without a window, now and when ``measured`` is called."""

    def __init__(
        self, metrics_url: str, server_pid: int | None, window: tuple[float, float] | None = None, gpu: bool = False
    ):
        self.metrics_url, self.server_pid = metrics_url, server_pid
        self.busy_sampler = GpuBusy(gpu)
        self.busy: dict[int, float] | None = None  # per GPU over the window
        self.edges: dict[str, tuple[float, tuple[float, ...], dict[str, float]]] = {}
        self.timers = [
            threading.Timer(at - time.monotonic(), self.read, (edge,))
            for edge, at in (zip(("begin", "end"), window, strict=True) if window else ())
        ]
        for timer in self.timers:
            timer.start()
        if window is None:
            self.read("begin")

    def read(self, edge: str) -> None:  # "begin" or "end"
        self.edges[edge] = (time.monotonic(), forward_counters(self.metrics_url), cpu_seconds(self.server_pid))
        if edge == "begin":
            self.busy_sampler.start()
        else:
            self.busy = self.busy_sampler.stop()

    def measured(self) -> dict:
        """After the window's end (without a window: read now): seconds between the edges, mean requests
        per forward, forwards' requests per second, the share of one core each process used and how busy each
        GPU was."""
        for timer in self.timers:
            timer.join()
        if not self.timers:
            self.read("end")
        (began, counts0, cpu0), (ended, counts, cpu) = self.edges["begin"], self.edges["end"]
        deltas = (now - before for now, before in zip(counts, counts0, strict=True))
        rows, forwards, calls, executions, host_seconds, gpu_wait_seconds = deltas
        elapsed = ended - began
        return {
            "seconds": elapsed,
            "mean_forward_batch": rows / max(forwards, 1),
            "steps_per_s": rows / elapsed,  # requests stepped in forwards
            # more than one forward per execute: rows of different shapes, or two calls of one sequence in one
            # batch (a pass each)
            "forwards_per_execute": forwards / max(executions, 1),
            "calls_per_execute": calls / max(executions, 1),
            # where an execute's time goes: the host's work (on CPU the forward too), and waiting for the GPU
            "host_ms_per_execute": 1e3 * host_seconds / max(executions, 1),
            "gpu_wait_ms_per_execute": 1e3 * gpu_wait_seconds / max(executions, 1),
            "cpu_cores": {name: round((cpu[name] - cpu0[name]) / elapsed, 2) for name in cpu if name in cpu0},
            "gpu_busy": self.busy,
        }


def closed_loop(
    load: Load,
    metrics_url: str,
    concurrency: int,
    duration: float,
    server_pid: int | None = None,
    generation_s: float = 0.0,
) -> dict:
    """``concurrency`` clients, each sending its next request when the previous one returns; with
    ``server_pid``, also the share of one core each Triton process used meanwhile.

    Without ``generation_s`` every client starts at once and every request counts. Such clients stay in
    step: their generations are encoded, stepped and decoded together, so at each turn the GPU decodes
    while no forward runs, and the first and last requests see fewer in flight. With ``generation_s``
    (about one generation's time at this concurrency), client i starts i * generation_s / concurrency
    seconds after the first, and only the requests completed in the ``duration`` seconds that begin
    2 * generation_s after the start count (every client has then finished one request with all
    ``concurrency`` in flight); the counters are read at the window's ends."""
    start = time.monotonic()
    window = (start + 2 * generation_s, start + 2 * generation_s + duration) if generation_s else None
    deadline = window[1] if window else start + duration
    completed: list[tuple[float, float]] = []  # (when, seconds) per request
    readings = WindowReadings(metrics_url, server_pid, window, gpu=load.args.device.startswith("cuda"))

    def client(worker: int) -> None:
        if generation_s:
            time.sleep(worker * generation_s / concurrency)
        count = 0
        while time.monotonic() < deadline or count == 0:
            seconds, _ = load.request(random.randrange(2**31))
            completed.append((time.monotonic(), seconds))
            count += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    measured = readings.measured()
    latencies = [seconds for when, seconds in completed if window is None or window[0] <= when <= window[1]]
    return {
        "concurrency": concurrency,
        "starts": "staggered" if window else "together",
        "requests": len(latencies),
        "images_per_s": len(latencies) / measured["seconds"],
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        **measured,
    }


def open_loop(load: Load, metrics_url: str, rate: float, duration: float) -> dict:
    """Poisson arrivals at ``rate`` requests/s for 1.5 x ``duration`` seconds; every request is waited for.
    What counts is the ``duration`` after the first half (the ramp-up) of it: latencies of the requests
    that arrive then, images/s and forwards completed then (the drain after the last arrival left out)."""
    arrivals: list[tuple[float, float]] = []  # (arrived, seconds) per request
    start = time.monotonic()
    window = (start + duration / 2, start + 1.5 * duration)
    readings = WindowReadings(metrics_url, None, window, gpu=load.args.device.startswith("cuda"))

    def request(arrived: float) -> None:
        seconds, _ = load.request(random.randrange(2**31))
        arrivals.append((arrived, seconds))

    with ThreadPoolExecutor(256) as pool:
        futures, next_arrival = [], start
        while next_arrival < window[1]:
            time.sleep(max(0.0, next_arrival - time.monotonic()))
            futures.append(pool.submit(request, next_arrival))
            next_arrival += random.expovariate(rate)
        for future in futures:
            future.result()
    measured = readings.measured()
    completed = sum(window[0] <= arrived + seconds <= window[1] for arrived, seconds in arrivals)
    latencies = [seconds for arrived, seconds in arrivals if window[0] <= arrived < window[1]]
    return {
        "offered_rate": rate,
        "requests": len(latencies),
        "images_per_s": completed / measured["seconds"],
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "mean_forward_batch": measured["mean_forward_batch"],
        "gpu_busy": measured["gpu_busy"],
    }


def start_server(
    args, log_verbose: int = 0, log_name: str = "tritonserver.log", gpus: Sequence[int] = (), **settings
) -> tuple[triton.TritonProcess, str, str]:
    """tritonserver for ``args.pipeline`` on ports ``args.port``.. (log in ``args.out``) with ``settings``
    (Settings fields, passed as `stepdiff serve` passes its flags), on ``gpus`` as `--gpus` when given,
    ready; returns it with its gRPC and metrics URLs."""
    ports = [args.port, args.port + 1, args.port + 2]
    variables = Settings.variables({"pipeline": args.pipeline, "device": args.device, "dtype": args.dtype, **settings})
    repository = write_repository_for(resolve_pipeline(str(args.pipeline)), args.port, gpus=gpus)
    options = triton.ServerOptions(repository, *ports, log_verbose=log_verbose)
    process = triton.start_triton(options, variables, args.out / log_name)
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process, f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[2]}/metrics"


def triton_statistics(grpc_url: str) -> dict[str, dict[str, float]]:
    """Cumulative per-model counts and times (ns) from Triton's statistics extension."""
    import tritonclient.grpc as grpcclient

    stats = {}
    with grpcclient.InferenceServerClient(grpc_url) as client:
        for model in ("text_encoder", "denoise_step", "vae_decode"):
            found = client.get_inference_statistics(model).model_stats[0]
            inference = found.inference_stats
            stats[model] = {
                "count": found.inference_count,
                "executions": found.execution_count,
                "queue_ns": inference.queue.ns,
                "infer_ns": inference.compute_infer.ns,
                "input_ns": inference.compute_input.ns,
                "output_ns": inference.compute_output.ns,
                "success_ns": inference.success.ns,
            }
    return stats


def statistics_after(grpc_url: str, before: dict, requests: int, timeout: float = 5.0) -> dict:
    """``triton_statistics`` once each stage counts ``requests`` more than ``before``: a Python model reports
    an execute's statistics after sending its responses, so the last decode's may come after the image."""
    deadline = time.monotonic() + timeout
    while True:
        after = triton_statistics(grpc_url)
        if time.monotonic() > deadline or all(
            after[stage]["count"] - before[stage]["count"] >= requests for stage in SERVED_STAGES
        ):
            return after
        time.sleep(0.05)


def stage_executions(grpc_url: str) -> dict[str, tuple[int, int, int]]:
    """text_encoder and vae_decode: requests, executions and compute ns summed over executions (Triton's
    batch statistics count a batched execution once, where the request statistics count it per request)."""
    import tritonclient.grpc as grpcclient

    found = {}
    with grpcclient.InferenceServerClient(grpc_url) as client:
        for model in ("text_encoder", "vae_decode"):
            stats = client.get_inference_statistics(model).model_stats[0]
            compute_ns = sum(batch.compute_infer.ns for batch in stats.batch_stats)
            found[model] = (stats.inference_count, stats.execution_count, compute_ns)
    return found


def stage_costs(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per stage between two ``stage_executions``: requests per execution and execute ms per request."""
    costs = {}
    for model in after:
        requests, executions, compute_ns = (a - b for a, b in zip(after[model], before[model], strict=True))
        costs[model] = {
            "mean_batch": requests / max(executions, 1),
            "execute_ms_per_request": compute_ns / max(requests, 1) / 1e6,
        }
    return costs


SERVED_STAGES = ("text_encoder", "vae_decode")


def step_breakdown(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Milliseconds per request (stages) and per step call (denoise_step) between two statistics snapshots."""
    delta = {model: {k: after[model][k] - before[model][k] for k in after[model]} for model in after}
    steps = max(delta["denoise_step"]["count"], 1)
    stages = {}
    for stage in SERVED_STAGES:  # where a stage's time goes: waiting, its execute(), moving tensors
        stages[f"{stage}_ms"] = delta[stage]["success_ns"] / requests / 1e6
        stages[f"{stage}_queue_ms"] = delta[stage]["queue_ns"] / requests / 1e6
        stages[f"{stage}_execute_ms"] = delta[stage]["infer_ns"] / requests / 1e6
        stages[f"{stage}_io_ms"] = (delta[stage]["input_ns"] + delta[stage]["output_ns"]) / requests / 1e6
    return {
        **stages,
        "step_calls_per_request": steps / requests,
        "step_queue_ms": delta["denoise_step"]["queue_ns"] / steps / 1e6,
        "step_execute_ms": delta["denoise_step"]["infer_ns"] / steps / 1e6,
        "step_io_ms": (delta["denoise_step"]["input_ns"] + delta["denoise_step"]["output_ns"]) / steps / 1e6,
        "step_in_triton_ms": delta["denoise_step"]["success_ns"] / steps / 1e6,
    }


def served_decoder(mode: str) -> str:
    """The VAE decode (`--decoder`) served with ``mode``: compiled with `compiled`, else eager."""
    return "compiled" if mode == "compiled" else "eager"


def timed_start(args, mode: str, log_name: str) -> tuple[triton.TritonProcess, str, str, float]:
    """``mode``'s server (with the compiled decode for ``compiled``), ready, and the seconds it took."""
    began = time.perf_counter()
    started = start_server(
        args, args.log_verbose, log_name, denoiser=mode, decoder=served_decoder(mode), warmup=f"{args.size}x{args.size}"
    )
    return *started, time.perf_counter() - began


def empty_compile_cache() -> None:
    """Remove the Inductor cache the compiles use: TORCHINDUCTOR_CACHE_DIR, else stepdiff's own."""
    shutil.rmtree(os.environ.get("TORCHINDUCTOR_CACHE_DIR", COMPILE_CACHE), ignore_errors=True)


def cold_start(args, mode: str) -> float:
    """Seconds to ready for ``mode``'s server with stepdiff's Inductor cache emptied first (what a first
    deployment pays), the server stopped again after."""
    empty_compile_cache()
    process, _, _, seconds = timed_start(args, mode, f"tritonserver-{mode}-cold.log")
    process.stop()
    print(f"[{mode}] cold start (empty Inductor cache): ready in {seconds:.0f} s", flush=True)
    return seconds


def through_triton(args, references: dict, mode: str, record: dict, save: Callable[[], None]) -> None:
    """Serve ``mode`` and measure it into ``record``, calling ``save`` after every phase (a run cut off
    keeps what it measured)."""
    if args.cold_start:
        record["cold_start_s"] = cold_start(args, mode)
    process, grpc_url, metrics_url, record["start_s"] = timed_start(args, mode, f"tritonserver-{mode}.log")
    print(f"[{mode}] server ready in {record['start_s']:.0f} s", flush=True)
    save()
    try:
        load = Load(grpc_url, args)
        checks = record["image_checks"] = {}
        for scheduler in args.schedulers:
            for seed, reference in references[scheduler].items():
                _, image = load.request(seed, scheduler)
                checks[f"{scheduler} seed {seed}"] = {
                    "identical": bool(np.array_equal(image, reference)),
                    "max_abs_diff": int(np.abs(image.astype(int) - reference).max()),
                }
        print(f"[{mode}] images vs in-process eager diffusers: {checks}", flush=True)
        warm = closed_loop(load, metrics_url, max(args.concurrency), 3)  # warm-up at every batch size
        latency_c1, breakdown = record["latency_c1_s"], record["breakdown_c1"] = {}, {}
        for scheduler in args.schedulers:
            before = triton_statistics(grpc_url)
            latency_c1[scheduler] = statistics.median(load.request(seed, scheduler)[0] for seed in range(args.repeats))
            after = statistics_after(grpc_url, before, args.repeats)
            breakdown[scheduler] = step_breakdown(before, after, args.repeats)
            print(
                f"[{mode}] latency at concurrency 1, {scheduler}: {latency_c1[scheduler] * 1e3:.0f} ms; "
                f"breakdown {breakdown[scheduler]}",
                flush=True,
            )
        save()
        sweep = record["sweep"] = []
        record["model"] = args.model
        load = Load(grpc_url, args, args.model)
        for concurrency in args.concurrency:
            stages_before = stage_executions(grpc_url)
            # a generation's time at this concurrency, from the warm-up's rate at the highest (an underestimate
            # below it, which only spreads the starts less)
            generation_s = concurrency / warm["images_per_s"] if args.closed_loop == "staggered" else 0.0
            row = closed_loop(
                load, metrics_url, concurrency, args.duration, triton.tritonserver_pid(args.port), generation_s
            )
            row["stages"] = stage_costs(stages_before, stage_executions(grpc_url))
            # throughput from the steps taken in the window: finer than completions (0.1 images/s in 10 s)
            row["images_per_s_of_steps"] = row["steps_per_s"] / args.steps
            sweep.append(row)
            save()
            print(
                f"[{mode}] closed loop c={concurrency:3d}: {row['images_per_s']:6.2f} images/s  p50 "
                f"{row['p50_s']:.2f} s  "
                f"p99 {row['p99_s']:.2f} s  mean forward batch {row['mean_forward_batch']:.2f}  "
                f"calls per execute {row['calls_per_execute']:.2f}  "
                f"forwards per execute {row['forwards_per_execute']:.2f}  "
                f"ms per execute on the host {row['host_ms_per_execute']:.1f}, waiting for the GPU "
                f"{row['gpu_wait_ms_per_execute']:.1f}  "
                f"steps/s {row['steps_per_s']:.0f} ({row['images_per_s_of_steps']:.2f} images/s)  "
                f"GPU busy {row['gpu_busy']}  "
                f"CPU cores {row['cpu_cores']}  stages {row['stages']}",
                flush=True,
            )
        peak = max(row["images_per_s"] for row in sweep)
        poisson = record["open_loop"] = open_loop(load, metrics_url, args.open_loop_fraction * peak, args.duration)
        print(
            f"[{mode}] open loop at {poisson['offered_rate']:.2f}/s: {poisson['images_per_s']:.2f} images/s  "
            f"p50 {poisson['p50_s']:.2f} s  p99 {poisson['p99_s']:.2f} s",
            flush=True,
        )
        record["graphs"] = {
            name: metric(metrics_url, name)
            for name in ("stepdiff_denoiser_graphs", "stepdiff_denoiser_graph_memory_bytes")
        }
        save()
    finally:
        process.stop()


def busy_cell(busy: dict | None) -> str:
    """A throughput row's GPU busy shares (``GpuBusy``) for a table: "97%", or per GPU "0: 97%, 1: 95%"."""
    if not busy:
        return "—"
    if len(busy) == 1:
        return f"{next(iter(busy.values())):.0%}"
    return ", ".join(f"{index}: {share:.0%}" for index, share in busy.items())


def per_request_ms(table: dict[int, float], batch: float) -> float:
    """A stage's in-process ms per request, at its measured batch nearest ``batch``."""
    nearest = min(table, key=lambda measured: abs(measured - batch))
    return table[nearest] / nearest


def report(result: dict, out: Path) -> None:
    """results.md with the tables and the targets; results.png when matplotlib is available."""
    base, cfg = result["baseline"], result["config"]
    schedulers, modes = cfg["schedulers"], list(result["triton"])
    latency = base["pipeline_latency_s"]
    ceiling = {variant: {int(k): v for k, v in table.items()} for variant, table in base["ceiling"].items()}
    stages = {
        stage: {int(k): v for k, v in table.items()} for stage, table in base["stage_costs"]["ms_per_call"].items()
    }
    lines = [
        f"# stepdiff vs diffusers in-process ({cfg['date']}, {cfg['gpu']})",
        "",
        f"Pipeline: {cfg['pipeline_kind']}, {cfg['dtype']}, {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, "
        f"guidance {cfg['guidance']}. "
        + ("Command" if len(cfg["commands"]) == 1 else "Commands, one after the other on the same machine")
        + ": "
        + "; ".join(f"`{command}`" for command in cfg["commands"]),
        "",
        "## Concurrency 1 (median latency, prompt to image)",
        "",
        "| | " + " | ".join(schedulers) + " |",
        "|---|" + "---|" * len(schedulers),
    ]
    for variant, by_scheduler in latency.items():
        cells = []
        for scheduler in schedulers:
            same = by_scheduler.get(f"{scheduler}_identical_to_eager")
            cells.append(
                f"{by_scheduler[scheduler] * 1e3:.0f} ms"
                + ("" if same is None else f" (images {'identical' if same else 'differ'})")
            )
        lines.append(f"| in-process diffusers, UNet {variant} | " + " | ".join(cells) + " |")
    for mode in modes:
        tri = result["triton"][mode]
        cells = []
        for scheduler in schedulers:
            ms = tri["latency_c1_s"][scheduler]
            versus = " / ".join(f"{ms / latency[v][scheduler]:.2f}x {v}" for v in latency if scheduler in latency[v])
            cells.append(f"**{ms * 1e3:.0f} ms** ({versus})")
        lines.append(f"| stepdiff `{mode}` | " + " | ".join(cells) + " |")
    lines += ["", "Served images vs stock eager diffusers (same seed, device, dtype):", ""]
    for mode in modes:
        checks = result["triton"][mode]["image_checks"]
        same = sum(check["identical"] for check in checks.values())
        worst = max(check["max_abs_diff"] for check in checks.values())
        lines.append(f"- `{mode}`: {same} of {len(checks)} byte-identical (max |diff| {worst}): {', '.join(checks)}")
    lines += [
        "",
        "Per-step breakdown at concurrency 1 (Triton statistics; step calls overlap: the next waits in the "
        "batcher while this one runs)",
        "",
        "| mode, scheduler | text_encoder ms | vae_decode ms | step calls | queue ms/step | execute ms/step | "
        "I/O ms/step | in Triton ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        for scheduler, b in result["triton"][mode]["breakdown_c1"].items():
            lines.append(
                f"| {mode}, {scheduler} | {b['text_encoder_ms']:.1f} | {b['vae_decode_ms']:.1f} | "
                f"{b['step_calls_per_request']:.0f} | "
                f"{b['step_queue_ms']:.2f} | {b['step_execute_ms']:.2f} | {b['step_io_ms']:.2f} | "
                f"{b['step_in_triton_ms']:.2f} |"
            )
    lines += [
        "",
        "The text encoder and VAE decode at concurrency 1, ms per request: served (Triton statistics) against "
        "the same call in-process at 1 request",
        "",
        "| mode, scheduler, stage | in Triton | queue | execute | I/O | in-process |",
        "|---|---|---|---|---|---|",
    ]
    for mode in modes:
        decode = stages.get(f"vae_decode_{served_decoder(mode)}", {})
        in_process = {"text_encoder": stages["text_encoder"].get(1), "vae_decode": decode.get(1)}
        for scheduler, b in result["triton"][mode]["breakdown_c1"].items():
            for stage in SERVED_STAGES:
                alone = f"{in_process[stage]:.1f}" if in_process[stage] is not None else "—"
                lines.append(
                    f"| {mode}, {scheduler}, {stage} | {b[f'{stage}_ms']:.1f} | {b[f'{stage}_queue_ms']:.1f} | "
                    f"{b[f'{stage}_execute_ms']:.1f} | {b[f'{stage}_io_ms']:.1f} | {alone} |"
                )
    for mode in modes:
        tri, variant = result["triton"][mode], mode  # each mode against the in-process UNet run the same way
        lines += [
            "",
            f"## Throughput, stepdiff `{mode}`, {tri.get('model', 'txt2img')}, {schedulers[0]} (ceiling: in-process "
            f"UNet {variant} at that batch)",
            "",
            CLOSED_LOOP_STARTS[tri["sweep"][0].get("starts", "together")] if tri["sweep"] else "",
            "",
            "| concurrency | images/s | p50 s | p99 s | mean requests/forward | steps/s (images/s of steps) "
            "| GPU busy | ceiling images/s | vs ceiling | ceiling with text encoder + VAE | vs that "
            "| text_encoder requests/execution, execute ms/request "
            "| vae_decode requests/execution, execute ms/request |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in tri["sweep"]:
            ceil = ceiling.get(variant, {}).get(row["concurrency"], {}).get("images_per_s")
            encoder, decoder = (row["stages"][model] for model in ("text_encoder", "vae_decode"))
            if ceil:
                # the same ceiling with each image also paying the text encoder and the VAE decode the mode serves
                # (compiled for compiled, where measured), in-process, at the measured batches nearest to what the
                # server formed
                decode = stages.get(f"vae_decode_{served_decoder(mode)}") or stages["vae_decode_eager"]
                stage_ms = per_request_ms(stages["text_encoder"], encoder["mean_batch"]) + per_request_ms(
                    decode, decoder["mean_batch"]
                )
                with_stages = 1 / (1 / ceil + stage_ms / 1e3)
                versus = (
                    f"{ceil:.2f} | {row['images_per_s'] / ceil:.2f}x | {with_stages:.2f} | "
                    f"{row['images_per_s'] / with_stages:.2f}x"
                )
            else:
                versus = "— | — | — | —"
            lines.append(
                f"| {row['concurrency']} | {row['images_per_s']:.2f} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | "
                f"{row['mean_forward_batch']:.2f} | {row['steps_per_s']:.0f} ({row['images_per_s_of_steps']:.2f}) | "
                f"{busy_cell(row.get('gpu_busy'))} | {versus} | "
                f"{encoder['mean_batch']:.2f}, {encoder['execute_ms_per_request']:.1f} | "
                f"{decoder['mean_batch']:.2f}, {decoder['execute_ms_per_request']:.1f} |"
            )
        ol = tri["open_loop"]
        lines += [
            "",
            f"Poisson arrivals at {ol['offered_rate']:.2f}/s (~{cfg['open_loop_fraction']:.0%} of peak): "
            f"{ol['images_per_s']:.2f} images/s (after a ramp-up of half the window), "
            f"p50 {ol['p50_s']:.2f} s, p99 {ol['p99_s']:.2f} s, mean requests/forward {ol['mean_forward_batch']:.2f}. "
            f"Server start {tri['start_s']:.0f} s"
            + (f" (cold, Inductor cache emptied: {tri['cold_start_s']:.0f} s)" if tri.get("cold_start_s") else "")
            + f"; {tri['graphs'].get('stepdiff_denoiser_graphs', 0):.0f} graphs, "
            f"{tri['graphs'].get('stepdiff_denoiser_graph_memory_bytes', 0) / 2**20:.0f} MiB reserved while capturing.",
        ]
    batches = sorted({b for table in ceiling.values() for b in table})
    lines += [
        "",
        "## Ceilings: the UNet alone, requests per forward (2 rows each with guidance)",
        "",
        "| requests | " + " | ".join(f"{v} ms | {v} images/s" for v in ceiling) + " |",
        "|---|" + "---|---|" * len(ceiling),
    ]
    for b in batches:
        lines.append(
            f"| {b} | "
            + " | ".join(
                f"{ceiling[v][b]['forward_ms']:.1f} | {ceiling[v][b]['images_per_s']:.2f}"
                for v in ceiling
                if b in ceiling[v]
            )
            + " |"
        )
    identical = base["stage_costs"]["lone_image_identical_to_served"]
    lines += [
        "",
        "## The other stages in-process: ms per call (per request) by requests per call",
        "",
        "As stepdiff's text_encoder (with guidance) and vae_decode run them, without Triton: the VAE decode as "
        "served (eager) and with each lever measured; a lone image identical to the served decode: "
        + ", ".join(f"{variant} {'yes' if same else 'no'}" for variant, same in identical.items())
        + ".",
        "",
        "| requests | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for b in sorted({b for table in stages.values() for b in table}):
        cells = (f"{table[b]:.1f} ({table[b] / b:.1f})" if b in table else "—" for table in stages.values())
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "In-process first pipeline call (capture, compile), s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in base["setup_s"].items()),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        sweep = result["triton"][mode]["sweep"]
        cs = [row["concurrency"] for row in sweep]
        left.plot(cs, [row["images_per_s"] for row in sweep], "o-", label=f"stepdiff {mode}")
        right.plot(cs, [row["p50_s"] for row in sweep], "o-", label=f"stepdiff {mode} p50")
    for variant, table in ceiling.items():
        left.plot(
            list(table),
            [v["images_per_s"] for v in table.values()],
            "s--",
            label=f"in-process UNet {variant} (ceiling)",
        )
    left.set(xscale="log", xlabel="concurrency (requests in flight)", ylabel="images/s", title="Throughput")
    left.legend(fontsize=7)
    right.axhline(latency["eager"][schedulers[0]], color="gray", linestyle=":", label="in-process eager, batch 1")
    right.set(xscale="log", xlabel="concurrency", ylabel="latency (s)", title="Latency")
    right.legend(fontsize=7)
    fig.suptitle(f"stepdiff, {cfg['pipeline_kind']} {cfg['size']}px {cfg['steps']} steps, {cfg['gpu']}")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


RESUMABLE_SETTINGS = ("gpu", "pipeline_kind", "dtype", "size", "steps", "guidance", "schedulers")


def merged(earlier: dict, later: dict) -> dict:
    """earlier with later's entries added, dictionaries merged key by key (later wins where both have one)."""
    both = dict(earlier)
    for key, value in later.items():
        both[key] = merged(both[key], value) if isinstance(value, dict) and isinstance(both.get(key), dict) else value
    return both


def resumed(earlier: dict, fresh: dict) -> dict:
    """A run continued in another slice: earlier's results and fresh's (still empty) with the commands of both.
    ValueError names a generation setting that differs, since the report compares the slices' figures."""
    before, now = earlier["config"], fresh["config"]
    for setting in RESUMABLE_SETTINGS:
        if before.get(setting) != now[setting]:
            raise ValueError(f"{setting} is {now[setting]!r} here but {before.get(setting)!r} in the results resumed")
    both = merged(earlier, fresh)
    both["config"] = {**before, "commands": [*before["commands"], *now["commands"]]}
    return both


def csv_of(kind: type):
    return lambda text: [kind(item) for item in text.split(",")]


def sd_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of the SD benchmarks: the pipeline, where results go, device, dtype and the generation."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    return parser


def main() -> int:
    parser = sd_arguments(__doc__)
    parser.add_argument("--pipeline-kind", default="SD-1.5 architecture, random weights")
    parser.add_argument(
        "--schedulers",
        type=csv_of(str),
        default=["EulerDiscreteScheduler", "PNDMScheduler"],
        help="the first also gets the throughput sweep",
    )
    parser.add_argument(
        "--modes", type=csv_of(str), default=["exact", "compiled"], help="stepdiff --denoiser modes to serve"
    )
    parser.add_argument(
        "--variants",
        type=csv_of(str),
        default=["eager", "exact", "compiled"],
        help="in-process UNet variants (eager first: it gives the reference images)",
    )
    parser.add_argument("--concurrency", type=csv_of(int), default=[1, 4, 16, 32, 64])
    parser.add_argument("--ceiling-batches", type=csv_of(int), default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--stage-batches", type=csv_of(int), default=[1, 2, 4], help="requests per text encoder / VAE decode call"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument(
        "--closed-loop",
        choices=["staggered", "together"],
        default="staggered",
        help="staggered: the clients start spread over one generation's time and only the duration after "
        "the ramp counts; together: all start at once and everything counts (the figures before 2026-12-04)",
    )
    parser.add_argument(
        "--model",
        choices=["txt2img", "txt2img_stream"],
        default="txt2img",
        help="what the concurrency sweep and the Poisson run call (txt2img_stream: a progress response per step); "
        "the image checks and concurrency 1 call txt2img",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-seeds", type=csv_of(int), default=[0, 1, 2])
    parser.add_argument("--open-loop-fraction", type=float, default=0.8)
    parser.add_argument(
        "--clear-compile-cache", action="store_true", help="empty stepdiff's Inductor cache first (cold compile)"
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="before each mode's measured server, time one start with the Inductor cache emptied "
        "(`compiled` then compiles from nothing; the measured server starts warm)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="add to the results.json already in --out (a run in slices, e.g. one mode per call on a lent "
        "machine): the same pipeline, GPU and generation settings, one report over every slice",
    )
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose")
    args = parser.parse_args()
    if args.variants[:1] != ["eager"]:
        parser.error(f"--variants must start with eager (it gives the reference images), got {','.join(args.variants)}")
    unknown = sorted(set(args.variants) - set(MODES))
    if unknown:
        parser.error(f"--variants: unknown {','.join(unknown)} (allowed: {', '.join(MODES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    if args.clear_compile_cache:  # the first compile (served, or in-process without --modes) is then cold
        empty_compile_cache()
    result = {
        "config": {
            "date": time.strftime("%Y-%m-%d"),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "pipeline_kind": args.pipeline_kind,
            "dtype": args.dtype,
            "size": args.size,
            "steps": args.steps,
            "guidance": args.guidance,
            "schedulers": args.schedulers,
            "open_loop_fraction": args.open_loop_fraction,
            "commands": [" ".join(sys.argv)],
        },
        "triton": {},
    }
    if args.resume and (args.out / "results.json").exists():
        try:
            result = resumed(json.loads((args.out / "results.json").read_text()), result)
        except ValueError as error:
            parser.error(f"--resume: {error}")

    def save() -> None:  # after every phase: a run cut off keeps what it measured
        (args.out / "results.json").write_text(json.dumps(result, indent=2))

    # Served first, the in-process compiles after: on a machine that may go away, the served figures are
    # the ones to have. The reference images (stock eager diffusers) take seconds.
    references = in_process_references(args, device, dtype)
    for mode in args.modes:
        through_triton(args, references, mode, result["triton"].setdefault(mode, {}), save)
    result["baseline"] = merged(result.get("baseline", {}), in_process_baseline(args, device, dtype, references))
    save()
    result["baseline"] = merged(result["baseline"], {"stage_costs": in_process_stage_costs(args, device, dtype)})
    save()
    report(result, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
