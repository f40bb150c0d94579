"""On a CUDA device only (``make test-gpu``; ``make test`` deselects them): host synchronizations at
START and per intermediate step, graph replay byte-identical to stock diffusers, capture fallback."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import final_latents_of_mixes, running_server, txt2img_client

from stepdiff.adapters import GenerationParams, Stage, load_adapter
from stepdiff.engine import StepCall, StepEngine
from stepdiff.runner import DenoiserRunner, GraphedCall, Rows
from stepdiff.server import GPU_MEMORY_QUERY, gpu_mib_by_pid

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
SD_SCHEDULERS = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "PNDMScheduler",
    "DDIMScheduler",
    "LMSDiscreteScheduler",
    # diffusers' UniPC copies CPU sigma scalars to the device every step: its steps run within
    # DeviceScalarsWithoutWaiting (stepdiff.adapters.base)
    "UniPCMultistepScheduler",
]


@pytest.fixture(scope="module", autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA device (make test deselects them)")


SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch warns at each one (c10/cuda)


def counted_syncs(run: Callable[[], list]) -> tuple[list, list[str]]:
    """``run()``'s result and the host synchronizations torch.cuda.set_sync_debug_mode saw in it, each as
    the ``file:line`` of the Python code that caused it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # (torch also warns once per process, on switching the mode on, that it "does not yet detect all
    # synchronizing operations": that notice is no synchronization)
    syncs = [warning for warning in caught if SYNC_WARNING in str(warning.message)]
    return result, [f"{Path(warning.filename).name}:{warning.lineno}" for warning in syncs]


def syncs_per_call(engine: StepEngine, encoder, params: GenerationParams) -> list[list[str]]:
    """Host synchronizations (where each happened) in a START that takes the first step, then in each
    intermediate step's run.

    The conditioning comes in host memory, as denoise_step takes it. An earlier START of the same kind
    (aborted) has set up what later ones reuse: the schedule they copy, the forward's CUDA graph."""
    with torch.inference_mode():
        conditioning = {name: value.cpu() for name, value in encoder.encode_prompt(params).items()}
    engine.run([StepCall(1, start=True, step=0, params=params, conditioning=conditioning)])
    engine.run([StepCall(1, end=True, abort=True)])
    [started], at_start = counted_syncs(
        lambda: engine.run([StepCall(2, start=True, step=0, params=params, conditioning=conditioning)])
    )
    assert started.error is None, started.error
    counts = [at_start]
    for index in range(1, started.num_steps - 1):  # the last step returns the latents
        [result], count = counted_syncs(lambda index=index: engine.run([StepCall(2, step=index)]))
        assert result.error is None, result.error
        counts.append(count)
    return counts


@pytest.fixture(scope="module")
def sd(tiny_sd):
    """Tiny SD's text encoder (replayed from CUDA graphs, as served) and denoiser, fp16."""
    encoder = load_adapter(str(tiny_sd), Stage.TEXT_ENCODER, CUDA, torch.float16)
    encoder.graph_text_encoders()
    return encoder, load_adapter(str(tiny_sd), Stage.DENOISE, CUDA, torch.float16)


@pytest.mark.parametrize("scheduler", SD_SCHEDULERS)
def test_no_host_sync_at_start_or_in_intermediate_steps(sd, scheduler):
    encoder, denoiser = sd
    engine = StepEngine(denoiser, 8, 8, 60, max_runahead=1000)  # the runahead bound waits on purpose
    counts = syncs_per_call(engine, encoder, GenerationParams("a cat", None, 0, 8, 7.5, 64, 64, scheduler))
    assert counts == [[]] * len(counts), f"{scheduler}: synchronizations at START, then per intermediate step {counts}"


def test_no_host_sync_at_start_or_in_intermediate_flow_match_steps(tiny_qwen):
    encoder = load_adapter(str(tiny_qwen), Stage.TEXT_ENCODER, CUDA, torch.bfloat16)
    denoiser = load_adapter(str(tiny_qwen), Stage.DENOISE, CUDA, torch.bfloat16)
    engine = StepEngine(denoiser, 8, 8, 60, max_runahead=1000)
    params = GenerationParams("a cat", "blurry", 0, 8, 1.0, 64, 64, denoiser.info.default_scheduler, true_cfg_scale=4.0)
    counts = syncs_per_call(engine, encoder, params)
    assert counts == [[]] * len(counts), f"FlowMatchEuler: at START, then per intermediate step {counts}"


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graph_replay_is_byte_identical_to_stock_diffusers(tiny_sd, sd, scheduler, seed):
    """The step-wise path with CUDA graphs in every stage (text encoder, exact runner, VAE decode) against
    StableDiffusionPipeline, fp16."""
    import diffusers

    encoder, denoiser = sd
    decoder = load_adapter(str(tiny_sd), Stage.DECODE, CUDA, torch.float16)
    decoder.graph_decode()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd, dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to(CUDA)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    stock = pipe(
        "a cat",
        num_inference_steps=10,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    engine = StepEngine(denoiser, 8, 8, 60)
    params = GenerationParams("a cat", None, seed, 10, 7.5, 64, 64, scheduler)
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(params)
    [started] = engine.run([StepCall(5, start=True, params=params, conditioning=conditioning)])
    for index in range(started.num_steps):
        [result] = engine.run([StepCall(5, step=index, end=index == started.num_steps - 1)])
    assert engine.runner.stats.graphs >= 1, "the exact runner did not capture a graph"
    with torch.inference_mode():
        image = decoder.decode(result.latents)
    assert np.array_equal(image[0], (stock[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_graphed_text_encoders_give_the_eager_conditioning(family, tmp_path_factory):
    """``encoder=graphs`` on the GPU: prompts of several lengths, with and without guidance, negative
    prompts given and not (the "" negative's embeddings differed by 0.002 while transformers saw the
    capture and built an explicit causal mask): the eager conditioning bit for bit, from the capture on."""
    from test_stage_batching import graphed_text_encoders, mixed_requests

    from stepdiff.stage_batching import encode_batch
    from stepdiff.tiny import make_tiny

    path = make_tiny(family, tmp_path_factory.mktemp("pipelines") / f"tiny-{family}", dtype=torch.float16)
    encoder = load_adapter(str(path), Stage.TEXT_ENCODER, CUDA, torch.float16)
    requests = mixed_requests(encoder)
    with torch.inference_mode():
        eager = encode_batch(encoder, requests)
        encoder.graph_text_encoders()
        for _ in range(2):  # the first round captures, the second replays
            for eager_request, graphed_request in zip(eager, encode_batch(encoder, requests), strict=True):
                for name, value in eager_request.items():
                    assert torch.equal(graphed_request[name], value), name
    graphed = graphed_text_encoders(encoder)
    assert graphed and all(forward.use_graphs and forward.captures for forward in graphed)


def test_a_stage_call_that_cannot_be_captured_runs_eagerly():
    def function(x):  # .item() synchronizes: not capturable
        return x * float(x.sum().item() != 0) + 1

    graphed = GraphedCall(function, CUDA, "test")
    x = torch.arange(6.0, device=CUDA)
    with torch.inference_mode():
        assert torch.equal(graphed(x), x + 1) and torch.equal(graphed(x), x + 1)
    assert not graphed.use_graphs and graphed.captures == {}


def test_a_forward_that_cannot_be_captured_runs_eagerly():
    calls = []

    def forward(key, inputs):  # .item() synchronizes: not capturable
        calls.append(key)
        return inputs["x"] * float(inputs["x"].sum().item() != 0) + 1

    runner = DenoiserRunner(forward, CUDA)
    x = torch.arange(6.0, device=CUDA).reshape(2, 3)
    with torch.inference_mode():
        [output] = runner.run([Rows("k", {"x": x})])
    assert runner.stats.graphs == 0 and not runner.use_graphs
    assert torch.equal(output, x + 1)


@pytest.mark.parametrize("mode", ["exact", "compiled"])
def test_mixed_lora_forwards_replay_one_graph_for_any_mix(tiny_sd, tmp_path, mode):
    """Requests of different LoRA settings share one replayed graph per row bucket (``exact``, and
    ``compiled``, where one setting for all takes the stacked path too): a new mix of adapters and scales
    captures nothing, and each request stays close to its own setting run in a forward grouped by
    setting (the fallback, ``exact``)."""
    from stepdiff.tiny import make_tiny_lora

    loras = {name: str(make_tiny_lora(tiny_sd, tmp_path / name, seed=seed)) for seed, name in enumerate("ab")}
    encoder = load_adapter(str(tiny_sd), Stage.TEXT_ENCODER, CUDA, torch.float16)
    denoiser = load_adapter(str(tiny_sd), Stage.DENOISE, CUDA, torch.float16, loras)
    assert denoiser.mixed_lora is not None
    options = (4, 7.5, 64, 64, "EulerDiscreteScheduler")
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(GenerationParams("a cat", None, 0, *options))

    def latents(mixes: list, stacked, mode: str) -> tuple[list[list[torch.Tensor]], int]:
        """The final latents of one request per setting in ``mixes``, stepping together; graphs captured."""
        denoiser.mixed_lora = stacked  # None: forwards grouped by setting
        runner = DenoiserRunner(denoiser.denoise, CUDA, mode, max_rows=16)
        return final_latents_of_mixes(denoiser, runner, conditioning, options, mixes), runner.stats.graphs

    stacked = denoiser.mixed_lora
    mixes = [[(), (("a", 1.0),), (("b", 0.5),)], [(("a", -0.7), ("b", 1.2)), (), (("a", 0.3),)]]
    if mode == "compiled":
        mixes.append([(("b", 0.9),)] * 3)
    mixed, graphs = latents(mixes, stacked, mode)
    assert graphs == 1, f"{graphs} graphs for {len(mixes)} mixes of 3 requests (one row bucket): a mix must not capture"
    grouped, _ = latents(mixes, None, "exact")
    for mixed_mix, grouped_mix in zip(mixed, grouped, strict=True):
        for one, other in zip(mixed_mix, grouped_mix, strict=True):
            # fp16 forwards of other batch sizes round differently: compare the whole latents, not elements
            error = (one.float() - other.float()).norm() / other.float().norm()
            assert error < 0.01, f"mixed vs grouped latents differ by {error:.2%}"
    denoiser.mixed_lora = stacked


def test_orchestrators_hold_no_gpu_memory(tiny_sd, tmp_path):
    """Served on the GPU, only the three stage models hold GPU memory: txt2img and txt2img_stream pass the
    text encoder's conditioning on in host memory and never open a CUDA context (each held 518 MiB on
    an H200 while the conditioning came from the GPU)."""
    if shutil.which("nvidia-smi") is None:
        pytest.fail("nvidia-smi is needed to see each process's GPU memory")
    with running_server(tiny_sd, tmp_path / "tritonserver.log", "--device", "cuda") as server:
        options = {"num_inference_steps": 2, "height": 64, "width": 64}
        server.txt2img("a cat", **options)
        txt2img_client.generate_streaming(server.grpc_url, "a dog", options)
        stubs = {stub.pid: stub.model for stub in server.stubs()}
        query = subprocess.run(GPU_MEMORY_QUERY, capture_output=True, text=True, check=True).stdout
        on_gpu: dict[str, float] = {}
        for pid, mib in gpu_mib_by_pid(query).items():
            if pid in stubs:
                on_gpu[stubs[pid]] = on_gpu.get(stubs[pid], 0.0) + mib
    assert {"text_encoder", "denoise_step", "vae_decode"} <= on_gpu.keys(), f"stage models not seen: {on_gpu}"
    assert not {"txt2img", "txt2img_stream"} & on_gpu.keys(), f"an orchestrator holds GPU memory (MiB): {on_gpu}"
