"""The ``stepdiff`` command: serve a pipeline on Triton, build tiny pipelines, run the demo."""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from . import openai_api, server
from .admission import announce_stop, generations_in_server
from .pipeline_source import local_pipeline, resolve_pipeline
from .repository import (
    CONSUMER,
    TEMPLATE,
    model_settings,
    python_backend_threads,
    serving_gpus,
    write_repository_for,
)
from .settings import DECODERS, ENCODERS, MODES, Settings, cache_folder, lora_paths

CLIENT = Path(__file__).resolve().parent / "client" / "generate.py"  # client/ in a checkout links here


SERVE_FLAGS = (
    "device",
    "dtype",
    "cpu_threads",
    "max_batch_size",
    "max_active_sequences",
    "max_queue",
    "queue_timeout_seconds",
    "max_steps",
    "max_pixels",
    "denoiser",
    "encoder",
    "decoder",
    "warmup",
    "step_lookahead",
    "lora",
    "lora_dir",
    "max_loras_per_request",
)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline",
        required=True,
        help="diffusers directory or hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="Triton model repository template (default: the one in the package); served with the pipeline's "
        "conditioning added",
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    # Flags left out keep the STEPDIFF_* environment variable, else the model's config parameter, else the
    # default shown (settings.py).
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto: CUDA when available)")
    parser.add_argument(
        "--gpus",
        help="all | 0,1,...: one instance of text_encoder, denoise_step and vae_decode on each GPU (all: every GPU "
        "torch sees); default: one instance each, on --device",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="default auto: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--cpu-threads", type=int, help="torch intra-op threads in each stage model (default 0: torch's own)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help="most requests in one denoiser forward (default 0: denoise_step's max_batch_size, 32)",
    )
    parser.add_argument(
        "--max-active-sequences",
        type=int,
        help=f"generations run at once; later ones wait in a queue (default {Settings.max_active_sequences})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        help="generations that may wait for a slot, oldest first, before 'server busy' (0: none wait; default "
        f"{Settings.max_queue})",
    )
    parser.add_argument(
        "--queue-timeout-seconds",
        type=float,
        help=f"longest wait in the queue before 'server busy' (default {Settings.queue_timeout_seconds:g})",
    )
    parser.add_argument(
        "--max-steps", type=int, help=f"largest num_inference_steps accepted (default {Settings.max_steps})"
    )
    parser.add_argument(
        "--max-pixels", type=int, help=f"largest height x width accepted (default {Settings.max_pixels})"
    )
    parser.add_argument(
        "--denoiser",
        choices=MODES,
        help="exact (default): the eager denoiser replayed as CUDA graphs, byte-identical to diffusers; compiled: "
        "torch.compile + CUDA graphs, faster in large batches, not byte-identical; eager: no graphs",
    )
    parser.add_argument(
        "--encoder",
        choices=ENCODERS,
        help="graphs (default): the text encoders' eager calls replayed as CUDA graphs, the same embeddings "
        "faster; eager: as diffusers runs them",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        help="eager (default): the VAE decode as diffusers runs it; graphs: replayed as CUDA graphs; compiled: "
        "through torch.compile, faster, not byte-identical (pairs with --denoiser compiled)",
    )
    parser.add_argument(
        "--warmup", help="image sizes whose graphs are captured at start, e.g. 512x512,768x512 (default: on first use)"
    )
    parser.add_argument(
        "--step-lookahead", type=int, help="step calls txt2img keeps in flight per generation, 1..8 (default 2)"
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="a LoRA adapter to load at start (repeatable): NAME is [a-z0-9_-]+, PATH anything diffusers' "
        "load_lora_weights reads (a .safetensors file or a directory); requests pick adapters with input lora",
    )
    parser.add_argument(
        "--lora-dir", help="every *.safetensors file or subdirectory of this directory is an adapter named after it"
    )
    parser.add_argument(
        "--max-loras-per-request",
        type=int,
        help=f"most adapters one request may name (default {Settings.max_loras_per_request})",
    )
    parser.add_argument(
        "--log-file", type=Path, default=None, help="tritonserver log (default: ~/.cache/stepdiff/logs/)"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument(
        "--log-stdout",
        action="store_true",
        help="also copy tritonserver's log to stdout, each line prefixed 'tritonserver: ' (for kubectl / docker logs)",
    )


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, dict[str, str], tuple[int, ...]]:
    """denoise_step's settings as it will load them; the STEPDIFF_* variables for tritonserver: the
    pipeline (resolved, and downloaded once, before Triton starts) and the flags given, no defaults, so
    config parameters hold where no flag or variable overrides them; and the GPUs ``--gpus`` gives the
    stage models. Every model's settings and ``--gpus`` are checked first with the pipeline as given: a
    bad value fails at once, before the pipeline's libraries load."""
    flags = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None}
    if "lora" in flags:  # repeated --lora NAME=PATH: one setting
        flags["lora"] = ";".join(flags["lora"])
    template = (args.model_repository or TEMPLATE).resolve()

    def checked(pipeline: str | Path) -> tuple[Settings, dict[str, str]]:
        variables = Settings.variables({"pipeline": pipeline, **flags})
        settings = model_settings(template, {**os.environ, **variables})[CONSUMER]
        settings.torch_device()
        return settings, variables

    local_pipeline(args.pipeline)  # a missing directory fails here; only a hub id needs diffusers to resolve
    gpus = serving_gpus(args.gpus, checked(args.pipeline)[0])
    from .adapters import adapter_class

    path = resolve_pipeline(args.pipeline)
    adapter_class(path)  # fail now, with the supported list, rather than in three model loads
    return (*checked(path), gpus)


def start_from_args(args: argparse.Namespace, stop: threading.Event | None = None) -> server.TritonProcess:
    """Start tritonserver for ``args`` and wait until every model is ready (or ``stop`` is set)."""
    server.check_ports_free((args.http_port, args.grpc_port, args.metrics_port))  # now, not after the loads
    settings, variables, gpus = settings_from_args(args)
    repository = write_repository_for(
        Path(settings.pipeline),
        args.http_port,
        args.model_repository,
        gpus,
        list(settings.lora_paths()),
        settings.sequence_idle_seconds,
    )
    options = server.ServerOptions(
        model_repository=repository,
        python_backend_threads=python_backend_threads(repository, {**os.environ, **variables}),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        admin_key=os.environ.get("STEPDIFF_ADMIN_KEY", ""),
    )
    log_file = args.log_file or cache_folder() / "logs" / f"tritonserver-{args.http_port}.log"
    print(
        f"stepdiff: starting tritonserver {server.TRITON_VERSION} for {settings.pipeline} (log: {log_file})", flush=True
    )
    device = f"GPUs {','.join(map(str, gpus))} (an instance of each stage model per GPU)" if gpus else ""
    empty_lora_dir = ""  # a mistyped or unmounted folder would otherwise pass unseen
    if settings.lora_dir and not lora_paths("", settings.lora_dir):
        empty_lora_dir = f" (--lora-dir {settings.lora_dir} holds no adapter)"
    share = f" ({settings.sequences_per_instance(len(gpus))} per denoise_step instance)" if gpus else ""
    print(
        f"stepdiff: device {device or settings.torch_device()}, dtype "
        f"{str(settings.torch_dtype()).removeprefix('torch.')}; limits: max_steps {settings.max_steps}, "
        f"max_pixels {settings.max_pixels}, max_prompt_bytes {settings.max_prompt_bytes}, "
        f"max_active_sequences {settings.max_active_sequences}{share}, max_queue {settings.max_queue} (timeout "
        f"{settings.queue_timeout_seconds:g} s), max_batch_size "
        f"{settings.max_batch_size or 'model config'}; "
        f"denoiser {settings.denoiser}, encoder {settings.encoder}, decoder {settings.decoder}, "
        f"warm-up {settings.warmup or 'on first use'}, "
        f"step lookahead {settings.step_lookahead} ({options.python_backend_threads} Python backend threads per "
        "model instance); "
        f"LoRA adapters: {', '.join(settings.lora_paths()) or 'none'}{empty_lora_dir}; "
        f"admin endpoints ({server.RESTRICTED_APIS}) "
        + (
            f"need header {server.ADMIN_HEADER}: $STEPDIFF_ADMIN_KEY"
            if options.admin_key
            else "are closed (set STEPDIFF_ADMIN_KEY to use them)"
        ),
        flush=True,
    )
    process = server.start_triton(options, variables, log_file)
    if args.log_stdout:
        threading.Thread(target=copy_log, args=(log_file,), name="copy-log", daemon=True).start()
    try:
        process.wait_ready(stop=stop)
    except BaseException:
        process.stop()
        raise
    return process


def copy_log(path: Path) -> None:
    """Copy tritonserver's log to stdout as it grows, line by line (``--log-stdout``), across restarts
    (they append to it): a container's own log then holds Triton's, the watchdog's stacks included."""
    with open(path, "rb") as log:
        pending = b""
        while True:
            chunk = log.read(1 << 16)
            if not chunk:
                time.sleep(0.2)
                continue
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                print("tritonserver: " + line.decode(errors="replace"), flush=True)


GAVE_UP = 3  # exit code of `stepdiff serve` when model processes keep dying


class RestartBudget:
    """Allows at most ``limit`` restarts within any ``window`` seconds."""

    def __init__(self, limit: int = 5, window: float = 600.0):
        self.limit = limit
        self.window = window
        self.total = 0
        self._recent: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Count a restart at ``now`` (monotonic seconds); False when the budget is spent."""
        while self._recent and now - self._recent[0] >= self.window:
            self._recent.popleft()
        if len(self._recent) >= self.limit:
            return False
        self._recent.append(now)
        self.total += 1
        return True


def warn_unwatched(process: server.TritonProcess) -> None:
    """Say so when the watchdog cannot see a model's process (e.g. $TRITONSERVER is a wrapper script)."""
    missing = sorted(set(server.MODELS) - {stub.model for stub in process.stubs})
    if missing:
        print(
            f"stepdiff: warning: no process found for {', '.join(missing)}; the watchdog cannot restart after "
            "their processes die",
            file=sys.stderr,
            flush=True,
        )


def print_ready(args: argparse.Namespace, restarts: int = 0) -> None:
    """The one line that says the server is up and where."""
    again = f" (after restart {restarts})" if restarts else ""
    print(
        f"stepdiff: ready{again}: txt2img on http://localhost:{args.http_port} and grpc localhost:{args.grpc_port}, "
        f"metrics on http://localhost:{args.metrics_port}/metrics (Ctrl-C stops)",
        flush=True,
    )


def serve(args: argparse.Namespace) -> int:
    """Run Triton in the foreground until SIGINT/SIGTERM or until it exits by itself.

    Once a second a watchdog looks at the models' processes and Triton's metrics. When a model's process
    has died, or a model has answered nothing for ``--stall-seconds`` while work waited for it, Triton 2.51
    would go on answering ready while that model fails or holds every request, so the launcher restarts
    tritonserver in place (same ports and settings); after 5 restarts within 10 minutes it stops and
    exits GAVE_UP.
    """
    if not 0 <= args.stall_seconds < math.inf:
        raise ValueError(f"--stall-seconds {args.stall_seconds}: must be >= 0 (0 turns stall detection off)")
    if not 0 <= args.drain_seconds < math.inf:
        raise ValueError(f"--drain-seconds {args.drain_seconds}: must be >= 0 (0 stops at once)")
    stop, stop_now = threading.Event(), threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: (stop_now if stop.is_set() else stop).set())
    images_api = openai_api.images_api(args.openai_port, args.pipeline, args.grpc_port)  # binds its port now
    process = start_from_args(args, stop)
    if stop.is_set():  # SIGINT / SIGTERM while the models loaded: no need to wait for them
        print(f"stepdiff: stopped before ready ({stopped_how(process.stop(now=stop_now))})", flush=True)
        return 0
    with openai_api.serving(images_api, process):  # from Triton's readiness until Triton has stopped
        code = watch(args, process, stop)
        if stop.is_set():  # SIGINT / SIGTERM
            drain(process, args.drain_seconds, stop_now)
            end_generations(process, stop_now)
            print(f"stepdiff: stopped ({stopped_how(process.stop(now=stop_now))})", flush=True)
    return code


def stopped_how(returncode: int) -> str:
    """How tritonserver ended after the launcher's SIGTERM: its exit code, or that it was killed."""
    if returncode < 0:
        return f"tritonserver killed with signal {-returncode}: not exited in time, or a second Ctrl-C / SIGTERM"
    return f"tritonserver exit code {returncode}"


def drain(process: server.TritonProcess, seconds: float, stop_now: threading.Event) -> None:
    """Wait until no generation runs or waits in the server (``--drain-seconds``), at most ``seconds``, or
    until ``stop_now`` is set. Triton goes on serving meanwhile: behind a load balancer that has taken the
    server out (Kubernetes does at SIGTERM), what is in flight finishes instead of failing."""
    deadline = time.monotonic() + seconds
    in_flight = generations_in_server(process.process.pid) if seconds else 0
    if not in_flight:
        return
    print(
        f"stepdiff: draining: generations in flight or queued: {in_flight}; stopping once they finish, at most "
        f"{seconds:g} s (--drain-seconds; a second Ctrl-C / SIGTERM stops now)",
        flush=True,
    )
    in_flight = wait_for_generations(process, in_flight, deadline, stop_now, poll=0.5)
    print(f"stepdiff: drained; generations left: {in_flight}", flush=True)


def wait_for_generations(
    process: server.TritonProcess, in_flight: int, deadline: float, stop_now: threading.Event, poll: float
) -> int:
    """Look every ``poll`` s at the generations in the server, from ``in_flight`` on, until none is left,
    ``deadline`` (monotonic) passes or ``stop_now`` is set; returns how many are left."""
    while in_flight and time.monotonic() < deadline and not stop_now.wait(poll):
        in_flight = generations_in_server(process.process.pid)
    return in_flight


# Seconds the generations still in flight at a stop get to end (each at its next step) before Triton stops.
END_GENERATIONS_SECONDS = 10.0


def end_generations(process: server.TritonProcess, stop_now: threading.Event) -> None:
    """Announce the stop to the generation models, which then admit nothing and end the generations in
    flight at their next step (UNAVAILABLE "server stopping"), and wait until they have, at most
    END_GENERATIONS_SECONDS or until ``stop_now`` is set. Their denoise sequences must end while Triton
    still takes calls: once tritonserver is stopping, Triton 2.51's Python backend refuses every call a
    model makes, and Triton's stop waits its 30 s exit timeout for the sequences left open."""
    if process.process.poll() is not None:
        return
    announce_stop(process.process.pid)
    in_flight = generations_in_server(process.process.pid)
    if not in_flight or stop_now.is_set():
        return
    print(f"stepdiff: stopping: ending the {in_flight} generations in flight or queued (UNAVAILABLE)", flush=True)
    in_flight = wait_for_generations(process, in_flight, time.monotonic() + END_GENERATIONS_SECONDS, stop_now, poll=0.1)
    if in_flight:
        print(f"stepdiff: {in_flight} generations did not end in {END_GENERATIONS_SECONDS:g} s", flush=True)


def exit_code_of(returncode: int) -> int:
    """The launcher's exit code when tritonserver exited on its own: its code, 1 for a clean exit (the
    launcher did not ask for it), 128 + N for a death by signal N (``Popen`` reports -N), as shells do."""
    return 128 - returncode if returncode < 0 else returncode or 1


def restart_reason(process: server.TritonProcess, stalls: server.StallDetector | None) -> str:
    """Why tritonserver must restart now ("" when nothing is wrong): model processes that died, else models
    that stalled. A stalled model's processes are aborted here, so that Triton fails its requests in flight
    with an error clients may retry (see TritonProcess.abort)."""
    dead = process.dead_stubs()
    if dead:
        return "; ".join(
            f"model {stub.model}'s process died (pid {stub.pid}, instance {stub.instance})" for stub in dead
        )
    if stalls is None:
        return ""
    stalled = stalls.observe(time.monotonic(), process.model_activity(), process.stopped_stubs())
    aborted = [stub for stub in process.stubs if stub.model in stalled]
    process.abort(aborted)
    reasons = []
    for model, seen in stalled.items():
        processes = ", ".join(f"pid {stub.pid} ({stub.instance})" for stub in aborted if stub.model == model)
        outcome = f"aborted {processes}: its Python stacks are in the Triton log" if processes else "no process found"
        reasons.append(f"model {model} {seen}; {outcome}")
    return "; ".join(reasons)


def watch(args: argparse.Namespace, process: server.TritonProcess, stop: threading.Event) -> int:
    """Say ready, then run ``serve``'s watchdog until ``stop`` is set or tritonserver exits."""
    stalls = server.StallDetector(args.stall_seconds) if args.stall_seconds else None
    stall_rule = (
        f" or a model answers nothing for {args.stall_seconds:g} s while work waits (--stall-seconds)"
        if stalls
        else "; hung models are not watched (--stall-seconds 0)"
    )
    print(f"stepdiff: the watchdog restarts tritonserver when a model's process dies{stall_rule}", flush=True)
    print_ready(args)
    warn_unwatched(process)
    budget = RestartBudget()
    while not stop.wait(1.0):
        if process.process.poll() is not None:
            print(
                f"stepdiff: tritonserver exited with code {process.process.returncode} (log: {process.log_path})",
                file=sys.stderr,
            )
            return exit_code_of(process.process.returncode)
        reason = restart_reason(process, stalls)
        if not reason:
            continue
        if not budget.take(time.monotonic()):
            print(
                f"stepdiff: {reason}; giving up after {budget.limit} restarts within {budget.window / 60:.0f} minutes "
                f"(log: {process.log_path})",
                file=sys.stderr,
                flush=True,
            )
            process.stop(timeout=server.DEAD_MODEL_GRACE)
            return GAVE_UP
        print(f"stepdiff: {reason}; restarting tritonserver", flush=True)
        try:
            process.restart(reason, stop=stop)
        except server.LaunchError as error:
            print(f"stepdiff: the restart failed, giving up: {error}", file=sys.stderr, flush=True)
            return GAVE_UP
        if not stop.is_set():
            print_ready(args, budget.total)
            warn_unwatched(process)
            if stalls is not None:
                stalls.reset()  # the new server's metrics start from zero
    return 0


def make_tiny_command(args: argparse.Namespace) -> int:
    from .settings import torch_dtype
    from .tiny import make_tiny, make_tiny_lora

    if args.family == "lora":
        if len(args.out_dir) != 2:
            raise SystemExit("usage: stepdiff make-tiny lora PIPELINE_DIR OUT [--text-encoder]")
        out = make_tiny_lora(*args.out_dir, seed=args.seed, text_encoder=args.text_encoder)
        print(f"stepdiff: wrote a random LoRA for {args.out_dir[0]} to {out}")
        return 0
    if len(args.out_dir) != 1:
        raise SystemExit(f"usage: stepdiff make-tiny {args.family} OUT")
    out = make_tiny(args.family, args.out_dir[0], seed=args.seed, dtype=torch_dtype(args.dtype))
    print(f"stepdiff: wrote {args.family} pipeline with random weights to {out}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Serve ``--pipeline``, generate one image with client/generate.py, stop the server."""
    process = start_from_args(args)
    try:
        command = [
            sys.executable,
            str(CLIENT),
            "--url",
            f"localhost:{args.http_port}",
            "--out",
            str(args.out),
            "--num-inference-steps",
            str(args.steps),
            "--seed",
            "0",
            args.prompt,
        ]
        code = subprocess.call(command)
    finally:
        process.stop()
    if code == 0:
        print(f"stepdiff: demo done; the image is in {args.out.resolve()}")
    return code


def command_parser() -> argparse.ArgumentParser:
    """The ``stepdiff`` command line: serve, make-tiny, demo."""
    parser = argparse.ArgumentParser(prog="stepdiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve a pipeline with tritonserver (foreground)")
    add_server_arguments(serve_parser)
    serve_parser.add_argument(
        "--openai-port", type=int, help="also serve the OpenAI images API (/v1/images/generations) on this port"
    )
    serve_parser.add_argument(
        "--stall-seconds",
        type=float,
        default=120.0,
        help="restart tritonserver when a model answers no request for this long while work waits for it "
        "(default 120; 0: off)",
    )
    serve_parser.add_argument(
        "--drain-seconds",
        type=float,
        default=0.0,
        help="on SIGTERM / Ctrl-C, first let the generations in flight and queued finish, for up to this long "
        "(a second signal stops at once; default 0: stop at once, failing them)",
    )
    serve_parser.set_defaults(run=serve)
    tiny_parser = commands.add_parser("make-tiny", help="write a random pipeline offline, reproducibly")
    tiny_parser.add_argument(
        "family",
        help="sd, sdxl, sd3, flux, flux-schnell or qwenimage (tiny, for tests); sd15-size, sdxl-size, sd3-size, "
        "flux-size or qwenimage-size (real widths with random weights, for benchmarks); lora: a random LoRA "
        "for the pipeline in PIPELINE_DIR (make-tiny lora PIPELINE_DIR OUT)",
    )
    tiny_parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weights' dtype on disk"
    )
    tiny_parser.add_argument("out_dir", type=Path, nargs="+", metavar="[PIPELINE_DIR] OUT")
    tiny_parser.add_argument("--seed", type=int, default=0)
    tiny_parser.add_argument(
        "--text-encoder", action="store_true", help="lora: also give the text encoder LoRA weights"
    )
    tiny_parser.set_defaults(run=make_tiny_command)
    demo_parser = commands.add_parser("demo", help="serve, generate one image with the client, stop")
    add_server_arguments(demo_parser)
    demo_parser.add_argument("--prompt", default="a photo of a red panda sitting on a tree branch")
    demo_parser.add_argument("--steps", type=int, default=20)
    demo_parser.add_argument("--out", type=Path, default=Path("outputs"))
    demo_parser.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_parser().parse_args(argv)
    try:
        return args.run(args)
    except (server.LaunchError, ValueError) as error:
        print(f"stepdiff: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
