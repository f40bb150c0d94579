"""Triton 2.51's oldest sequence batcher in front of a simulated GPU (model.py): how many requests each
denoiser forward holds under txt2img's flow, and how busy the GPU is, for a given START policy.

Each user runs generations back to back: text encoder (a sleep), START, the steps with ``--lookahead``
calls in flight, END right behind the last step, VAE decode (a sleep). Run from a stepdiff checkout's
virtual environment (it starts tritonserver as `stepdiff serve` does), e.g.
    python sim.py --policy start_step --users 32 --seconds 30
"""

import argparse
import asyncio
import collections
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcclient
from model import forward_ms
from tritonclient.grpc import InferInput, InferRequestedOutput

from stepdiff.server import ServerOptions, TritonProcess, locate_triton, server_command, server_environment

HERE = Path(__file__).resolve().parent
CONFIG = """name: "sim"
backend: "python"
max_batch_size: 32
input [ {{ name: "x" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "batch" data_type: TYPE_INT32 dims: [ 1 ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 600000000
  oldest {{ max_candidate_sequences: 1024 max_queue_delay_microseconds: {delay} }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START bool_false_true: [ false, true ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
}}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "runahead" value: {{ string_value: "{runahead}" }} }}
parameters {{ key: "host_ms" value: {{ string_value: "{host_ms}" }} }}
parameters {{ key: "host_ms_per_request" value: {{ string_value: "{host_ms_per_request}" }} }}
parameters {{ key: "gpu_scale" value: {{ string_value: "{gpu_scale}" }} }}
parameters {{ key: "log" value: {{ string_value: "{log}" }} }}
"""
# START with its step (stepdiff), or START only; "behind": the next step's call goes out before START's answer
POLICIES = ("start_step", "start_step_behind", "start_only", "start_only_behind")
START_WITH_STEP, START_ONLY, STEP, END = 0, 1, 2, 3


async def generation(client: grpcclient.InferenceServerClient, sequence: int, args: argparse.Namespace) -> None:
    """One generation's calls, as txt2img sends them."""

    def call(kind: int, **flags) -> asyncio.Future:
        x = InferInput("x", [1, 1], "INT32")
        x.set_data_from_numpy(np.full((1, 1), kind, np.int32))
        outputs = [InferRequestedOutput("batch")]
        return asyncio.ensure_future(client.infer("sim", [x], outputs=outputs, sequence_id=sequence, **flags))

    in_flight: list[asyncio.Future] = []

    async def collect() -> None:
        try:
            await in_flight.pop(0)
        except Exception:  # noqa: BLE001 - a call that overtook START: send it again
            await call(STEP)

    await asyncio.sleep(args.te_ms / 1e3)
    with_step = args.policy.startswith("start_step")
    start = call(START_WITH_STEP if with_step else START_ONLY, sequence_start=True)
    if args.policy.endswith("behind"):
        in_flight.append(call(STEP))
    await start
    for _ in range(int(with_step) + len(in_flight), args.steps):
        while len(in_flight) >= args.lookahead:
            await collect()
        in_flight.append(call(STEP))
    while len(in_flight) > 1:
        await collect()
    end = call(END, sequence_end=True)
    while in_flight:
        await collect()
    await end
    await asyncio.sleep(args.vae_ms / 1e3)


async def load(args: argparse.Namespace) -> float:
    """``args.users`` closed-loop users for ``args.seconds``; returns when they began."""
    client = grpcclient.InferenceServerClient(f"localhost:{args.port + 1}")
    began = time.monotonic()

    async def user(index: int) -> None:
        await asyncio.sleep(index * 0.1)  # staggered starts
        sequence = 1000 + index * 100000
        while time.monotonic() < began + args.seconds:
            sequence += 1
            await generation(client, sequence, args)

    await asyncio.gather(*(user(index) for index in range(args.users)))
    await client.close()
    return began


def serve(args: argparse.Namespace, log: Path) -> TritonProcess:
    """tritonserver with the sim model, once ready."""
    repository = HERE / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    (repository / "sim" / "1").mkdir(parents=True)
    shutil.copy(HERE / "model.py", repository / "sim" / "1" / "model.py")
    config = CONFIG.format(
        delay=args.delay,
        runahead=args.runahead,
        host_ms=args.host_ms,
        host_ms_per_request=args.host_ms_per_request,
        gpu_scale=args.gpu_scale,
        log=log,
    )
    (repository / "sim" / "config.pbtxt").write_text(config)
    installation = locate_triton()
    options = ServerOptions(repository, http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2)
    server = TritonProcess(
        server_command(installation, options),
        server_environment(installation, {}),
        repository / "tritonserver.log",
        options.http_port,
        options.metrics_port,
    )
    server.wait_ready(models=["sim"], timeout=60)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="start_step", choices=POLICIES)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lookahead", type=int, default=2, help="step calls in flight per generation")
    parser.add_argument("--runahead", type=int, default=2, help="as StepEngine's max_runahead")
    parser.add_argument("--delay", type=int, default=500, help="max_queue_delay_microseconds")
    parser.add_argument("--host-ms", type=float, default=2.0, help="host time per execute")
    parser.add_argument("--host-ms-per-request", type=float, default=0.05, help="and per call in it")
    parser.add_argument("--gpu-scale", type=float, default=1.0, help="forward times x this (0.75: compiled-like)")
    parser.add_argument("--te-ms", type=float, default=6.0)
    parser.add_argument("--vae-ms", type=float, default=25.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    tag = (
        f"{args.policy}-delay{args.delay}-runahead{args.runahead}-users{args.users}"
        f"-host{args.host_ms}+{args.host_ms_per_request}-gpu{args.gpu_scale}"
    )
    log = HERE / f"{tag}.log"
    log.unlink(missing_ok=True)
    server = serve(args, log)
    try:
        began = asyncio.run(load(args))
    finally:
        server.stop()
        shutil.rmtree(HERE / "repository", ignore_errors=True)
    executes = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    log.unlink()
    window = [e for e in executes if began + 0.3 * args.seconds <= e[0] <= began + args.seconds]  # warm part
    first, last = window[0][0], window[-1][0]
    span = last - first
    forwards = [int(rows) for _, _, rows, _ in window if rows]
    # the simulated GPU's forwards (each ends at gpu_end), clipped to the window
    gpu_busy = (
        sum(
            max(0.0, min(end, last) - max(end - args.gpu_scale * forward_ms(2 * rows) / 1e3, first))
            for _, _, rows, end in executes
            if rows
        )
        / span
    )
    largest = sorted(collections.Counter(forwards).items())[-4:]
    print(
        f"{tag}: steps/s {sum(forwards) / span:.0f}, requests per forward {statistics.mean(forwards):.1f} "
        f"(forwards of 1-7: {sum(rows < 8 for rows in forwards) / len(forwards):.0%}; largest {largest}), "
        f"executes/s {len(window) / span:.1f}, GPU busy {gpu_busy:.0%}"
    )


if __name__ == "__main__":
    main()
