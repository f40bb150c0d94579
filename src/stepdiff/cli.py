"""The ``stepdiff`` command: serve a pipeline on Triton, build tiny pipelines, run the demo."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from . import openai_api, server
from .repository import CONSUMER, TEMPLATE, model_settings, serving_gpus, write_repository_for
from .settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


SERVE_FLAGS = (
    "device",
    "dtype",
    "cpu_threads",
    "max_batch_size",
    "max_active_sequences",
    "max_steps",
    "max_pixels",
    "denoiser",
    "warmup",
    "step_lookahead",
)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline", required=True, help="diffusers directory or hub id, e.g. runwayml/stable-diffusion-v1-5"
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
        "--cpu-threads", type=int, help="torch intra-op threads in every model (default 0: torch's own)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help="most requests in one denoiser forward (default 0: denoise_step's max_batch_size, 32)",
    )
    parser.add_argument(
        "--max-active-sequences",
        type=int,
        help=f"concurrent generations before 'server busy' (default {Settings.max_active_sequences})",
    )
    parser.add_argument(
        "--max-steps", type=int, help=f"largest num_inference_steps accepted (default {Settings.max_steps})"
    )
    parser.add_argument(
        "--max-pixels", type=int, help=f"largest height x width accepted (default {Settings.max_pixels})"
    )
    parser.add_argument(
        "--denoiser",
        choices=["exact", "compiled", "eager"],
        help="exact (default): the eager denoiser replayed as CUDA graphs, byte-identical to diffusers; compiled: "
        "torch.compile + CUDA graphs, faster in large batches, not byte-identical; eager: no graphs",
    )
    parser.add_argument(
        "--warmup", help="image sizes whose graphs are captured at start, e.g. 512x512,768x512 (default: on first use)"
    )
    parser.add_argument(
        "--step-lookahead", type=int, help="step calls txt2img keeps in flight per generation, 1..8 (default 2)"
    )
    parser.add_argument(
        "--log-file", type=Path, default=None, help="tritonserver log (default: ~/.cache/stepdiff/logs/)"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """denoise_step's settings as it will load them, and the STEPDIFF_* variables for tritonserver: the
    pipeline (resolved, and downloaded once, before Triton starts) and the flags given, no defaults, so
    config parameters hold where no flag or variable overrides them. Every model's settings are checked."""
    from .adapters import adapter_class
    from .adapters.loading import resolve_pipeline

    path = resolve_pipeline(args.pipeline)
    adapter_class(path)  # fail now, with the supported list, rather than in three model loads
    flags = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None}
    variables = Settings.variables({"pipeline": path, **flags})
    template = (args.model_repository or TEMPLATE).resolve()
    settings = model_settings(template, {**os.environ, **variables})[CONSUMER]
    settings.torch_device()
    return settings, variables


def start_from_args(args: argparse.Namespace) -> server.TritonProcess:
    """Start tritonserver for ``args`` and wait until every model is ready."""
    settings, variables = settings_from_args(args)
    gpus = serving_gpus(args.gpus, settings)
    options = server.ServerOptions(
        model_repository=write_repository_for(Path(settings.pipeline), args.http_port, args.model_repository, gpus),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        admin_key=os.environ.get("STEPDIFF_ADMIN_KEY", ""),
    )
    log_file = args.log_file or Path.home() / ".cache" / "stepdiff" / "logs" / f"tritonserver-{args.http_port}.log"
    print(
        f"stepdiff: starting tritonserver {server.TRITON_VERSION} for {settings.pipeline} (log: {log_file})", flush=True
    )
    device = f"GPUs {','.join(map(str, gpus))} (an instance of each stage model per GPU)" if gpus else ""
    share = f" ({settings.sequences_per_instance(len(gpus))} per denoise_step instance)" if gpus else ""
    print(
        f"stepdiff: device {device or settings.torch_device()}, dtype "
        f"{str(settings.torch_dtype()).removeprefix('torch.')}; limits: max_steps {settings.max_steps}, "
        f"max_pixels {settings.max_pixels}, max_prompt_bytes {settings.max_prompt_bytes}, "
        f"max_active_sequences {settings.max_active_sequences}{share}, max_batch_size "
        f"{settings.max_batch_size or 'model config'}; "
        f"denoiser {settings.denoiser}, warm-up {settings.warmup or 'on first use'}, step lookahead "
        f"{settings.step_lookahead}; "
        f"admin endpoints ({server.RESTRICTED_APIS}) "
        + (
            f"need header {server.ADMIN_HEADER}: $STEPDIFF_ADMIN_KEY"
            if options.admin_key
            else "are closed (set STEPDIFF_ADMIN_KEY to use them)"
        ),
        flush=True,
    )
    process = server.start_triton(options, variables, log_file)
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process


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

    Once a second a watchdog looks at the models' processes. When one has died, Triton 2.51 would go on
    answering ready while that model fails every request, so the launcher restarts tritonserver in
    place (same ports and settings); after 5 restarts within 10 minutes it stops and exits GAVE_UP.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    images_api = openai_api.images_api(args.openai_port, args.pipeline, args.grpc_port)  # binds its port now
    process = start_from_args(args)
    with openai_api.serving(images_api, process):  # from Triton's readiness until Triton has stopped
        return watch(args, process, stop)


def watch(args: argparse.Namespace, process: server.TritonProcess, stop: threading.Event) -> int:
    """Say ready, then run ``serve``'s watchdog until ``stop`` is set or tritonserver exits."""
    print_ready(args)
    warn_unwatched(process)
    budget = RestartBudget()
    while not stop.wait(1.0):
        if process.process.poll() is not None:
            print(
                f"stepdiff: tritonserver exited with code {process.process.returncode} (log: {process.log_path})",
                file=sys.stderr,
            )
            return process.process.returncode or 1
        dead = process.dead_stubs()
        if not dead:
            continue
        reason = "; ".join(
            f"model {stub.model}'s process died (pid {stub.pid}, instance {stub.instance})" for stub in dead
        )
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
    code = process.stop()
    print(f"stepdiff: stopped (tritonserver exit code {code})", flush=True)
    return 0


def make_tiny_command(args: argparse.Namespace) -> int:
    from .settings import DTYPES
    from .tiny import make_tiny

    out = make_tiny(args.family, args.out_dir, seed=args.seed, dtype=DTYPES[args.dtype])
    print(f"stepdiff: wrote {args.family} pipeline with random weights to {out}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Serve ``--pipeline``, generate one image with client/generate.py, stop the server."""
    process = start_from_args(args)
    try:
        command = [
            sys.executable,
            str(REPO_ROOT / "client" / "generate.py"),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepdiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve a pipeline with tritonserver (foreground)")
    add_server_arguments(serve_parser)
    serve_parser.add_argument(
        "--openai-port", type=int, help="also serve the OpenAI images API (/v1/images/generations) on this port"
    )
    serve_parser.set_defaults(run=serve)
    tiny_parser = commands.add_parser("make-tiny", help="write a random pipeline offline, reproducibly")
    tiny_parser.add_argument(
        "family",
        help="sd, sdxl, sd3, flux, flux-schnell or qwenimage (tiny, for tests); sd15-size, sdxl-size, sd3-size, "
        "flux-size or qwenimage-size (real widths with random weights, for benchmarks)",
    )
    tiny_parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weights' dtype on disk"
    )
    tiny_parser.add_argument("out_dir", type=Path)
    tiny_parser.add_argument("--seed", type=int, default=0)
    tiny_parser.set_defaults(run=make_tiny_command)
    demo_parser = commands.add_parser("demo", help="serve, generate one image with the client, stop")
    add_server_arguments(demo_parser)
    demo_parser.add_argument("--prompt", default="a photo of a red panda sitting on a tree branch")
    demo_parser.add_argument("--steps", type=int, default=20)
    demo_parser.add_argument("--out", type=Path, default=Path("outputs"))
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (server.LaunchError, ValueError) as error:
        print(f"stepdiff: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
