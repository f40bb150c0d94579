#!/usr/bin/env python3
"""Soak test: mixed txt2img traffic for a long time while watching the server's memory and state.

    python load_tests/soak.py --pipeline build/tiny-sd --duration 1h --users 5 --out results/soak
    python load_tests/soak.py --url localhost:8000 --grpc-url localhost:8001 \\
        --metrics-url http://localhost:8002/metrics --duration 9m30s --out /tmp/soak/leg2 --previous /tmp/soak/leg1

Runs, through locust's library API, the locustfile's HTTP, gRPC and gRPC streaming (txt2img_stream)
users (--cancel-fraction of the gRPC requests is cut off mid-way by a client deadline, of the streams
cancelled by the client after a step) and a user that sends invalid inputs, which must come back as
INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) naming the field. With --pipeline it serves the
pipeline itself (`stepdiff serve`, free ports); with --url it attaches to a running server. Every
--sample-every seconds it records the resident memory (RSS) of tritonserver and each of its model
processes (from /proc, so the server must run on this machine), the GPU memory in use (Triton's
nv_gpu_memory_used_bytes, where there is a GPU), `stepdiff_active_sequences` and the cancellations
counted per model.

Memory must stay flat: the least-squares slope over the last half of the run (never the --warmup
seconds) of the summed RSS, of tritonserver's own RSS and of the GPU memory must stay under
--max-growth-mib-per-min; runs shorter than 10 minutes report the slopes without judging them. With
--previous (an earlier run's --out against the same server) that run's samples and figures join this
one's: two 9.5-minute legs make one 19-minute verdict.

Writes soak.json and soak.md to --out, and each sample to samples.jsonl as it is taken (a run cut
short still leaves those); exits 1 on any unexpected error, generations still active once the load
has stopped, a tritonserver restart, more cancellations counted by the server than made by the client
or over 2 + 5% fewer, or memory growth at or over the limit. Every request carries a request id; with
the server's log (--server-log; its own when it serves the pipeline) the report names each request the
server counted as cancelled that the client did not cancel, with what the client recorded for it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent
import numpy as np
from locust import User, between, task
from locust.argument_parser import parse_options
from locust.env import Environment
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parent))
import locustfile  # load_tests/locustfile.py: the txt2img users; sets up gRPC for gevent

from stepdiff.server import GPU_MEMORY_QUERY, free_ports, gpu_mib_by_pid, stub_processes, tritonserver_pid

txt2img_client = locustfile.txt2img_client  # client/generate.py
BAD_INPUTS = {  # type -> (txt2img options, what the error message must name)
    "steps=0": ({"num_inference_steps": 0}, "num_inference_steps=0"),
    "height=60": ({"height": 60}, "height=60"),
    "4096x4096": ({"height": 4096, "width": 4096}, "pixels is over the limit"),
    "unknown scheduler": ({"scheduler": "NoSuchScheduler"}, "scheduler='NoSuchScheduler'"),
}
EXPECTED_STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
INVALID = "invalid"  # request names of BadInputUser start with it
MIN_JUDGED_S = 600  # memory growth is judged in runs (all legs) that span at least this long
CANCELLED_METRIC = "stepdiff_cancelled_requests_total"  # per model (label "model")
# A cancel that reaches the server after the generation's last step finds nothing to stop and is not
# counted there (0 to 2 in 100 in short runs on a loaded 2-core machine): up to 2 + 5% of the client's
# cancellations may be missing from the server's count.
LATE_CANCELS, LATE_CANCEL_SHARE = 2, 0.05


class SoakHttpUser(locustfile.HttpUser):
    weight = 1


class SoakGrpcUser(locustfile.GrpcUser):
    weight = 2


class SoakStreamUser(locustfile.StreamUser):
    weight = 1


class BadInputUser(User):
    """Sends invalid txt2img requests over HTTP and gRPC; INVALID_ARG naming the field is a success."""

    weight = 1
    wait_time = between(0.2, 0.5)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        urls = {"http": self.host.split("://", 1)[-1], "grpc": options.grpc_url}
        self.clients = {}
        for protocol, url in urls.items():
            module = txt2img_client.client_module(protocol)
            self.clients[protocol] = (module, module.InferenceServerClient(url))
        self.cases = itertools.cycle(itertools.product(sorted(BAD_INPUTS), sorted(self.clients)))  # every case in turn

    def on_stop(self) -> None:
        for _, client in self.clients.values():
            client.close()

    @task
    def invalid_input(self) -> None:
        locustfile.stop_if_ending(self)
        kind, protocol = next(self.cases)
        overrides, expected = BAD_INPUTS[kind]
        module, client = self.clients[protocol]
        options = {"seed": 1, "num_inference_steps": 4, "height": 64, "width": 64, **overrides}
        request_id = next(locustfile.REQUEST_IDS)
        started = time.perf_counter()
        exception: Exception | None = RuntimeError(f"the server accepted {kind}")
        try:
            txt2img_client.generate(client, module, "a cat", options, request_id=request_id)
        except InferenceServerException as error:
            if error.status() == EXPECTED_STATUS[protocol] and expected in (error.message() or ""):
                exception = None
            else:
                exception = error
        except Exception as error:  # noqa: BLE001 - reported to locust as an unexpected error
            exception = error
        self.environment.events.request.fire(
            request_type=protocol,
            name=f"{INVALID} {kind} {protocol}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=exception,
            context={"request_id": request_id},
        )


USERS = {"HTTP": SoakHttpUser, "gRPC": SoakGrpcUser, "gRPC stream": SoakStreamUser, "invalid inputs": BadInputUser}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m", "1h30m"."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+)([hms])", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use e.g. 600, 90s, 10m, 1h30m")
    return float(sum(int(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts))


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    """`stepdiff serve` on free ports (sets args.url, grpc_url, metrics_url); its output goes to serve.log."""
    http, grpc, metrics = free_ports(3)
    args.url, args.grpc_url, args.metrics_url = (
        f"localhost:{http}",
        f"localhost:{grpc}",
        f"http://localhost:{metrics}/metrics",
    )
    command = [
        sys.executable,
        "-m",
        "stepdiff",
        "serve",
        "--pipeline",
        str(args.pipeline),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        "--cpu-threads",
        str(args.cpu_threads),
        "--log-file",
        str(args.server_log),
    ]
    log_path = args.out / "serve.log"
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "stepdiff: ready" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.send_signal(signal.SIGINT)  # the launcher stops tritonserver (its own session) too
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            sys.exit(f"soak: the server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)
    return process


class CancellationLog:
    """The cancellations the server logged (generation_model: "<model>: request '<id>' cancelled by its
    client") after this object was made, read from tritonserver's log file."""

    LINE = re.compile(r"(\w+): request '([^']*)' cancelled by its client")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def read(self) -> dict[str, list[str]]:
        """Request ids by model, in the order they were logged."""
        with self.path.open("rb") as log:
            log.seek(self.start)
            text = log.read().decode(errors="replace")
        found: dict[str, list[str]] = {}
        for model, request_id in self.LINE.findall(text):
            found.setdefault(model, []).append(request_id)
        return found


def read_metrics(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Triton's metrics as (name, labels, value); empty when the endpoint does not answer."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return []
    metrics = []
    for match in re.finditer(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.MULTILINE):
        name, labels, value = match.groups()
        metrics.append((name, dict(re.findall(r'(\w+)="([^"]*)"', labels or "")), float(value)))
    return metrics


def metric(metrics: list[tuple[str, dict[str, str], float]], name: str) -> int | None:
    """A gauge or counter summed over its label sets; None when it is not there."""
    values = [value for metric_name, _, value in metrics if metric_name == name]
    return round(sum(values)) if values else None


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def output_of_spawned(command: list[str], timeout: float) -> str:
    """``command``'s stdout, started with posix_spawn rather than fork. Under gevent, subprocess forks,
    and with gRPC calls in flight gRPC skips its fork handlers and the child can die inside gRPC before
    it runs the command (on the H200, 55 of 59 nvidia-smi samples of a soak were lost that way)."""
    with tempfile.TemporaryFile() as stdout:
        pid = os.posix_spawnp(command[0], command, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, stdout.fileno(), 1)])
        deadline = time.monotonic() + timeout
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"{command[0]} gave no answer in {timeout} s")
            gevent.sleep(0.02)
        if os.waitstatus_to_exitcode(status[1]) != 0:
            raise OSError(f"{command[0]} exited with {os.waitstatus_to_exitcode(status[1])}")
        stdout.seek(0)
        return stdout.read().decode()


def gpu_mib_now() -> dict[int, float]:
    """GPU memory per process from nvidia-smi (MiB); empty without it."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        return gpu_mib_by_pid(output_of_spawned(list(GPU_MEMORY_QUERY), timeout=10))
    except (OSError, TimeoutError):
        return {}


def sample(args: argparse.Namespace, origin: float) -> dict[str, Any]:
    """One measurement: RSS and GPU memory per process (MiB), the RSS sum, the GPU's memory in use, the
    denoiser's CUDA graphs, active sequences and cancellations so far."""
    pid = tritonserver_pid(int(args.url.rsplit(":", 1)[1]))
    processes, gpu_by_process = {}, {}
    if pid is not None:
        names = {pid: "tritonserver"} | {stub.pid: stub.instance for stub in stub_processes(pid)}
        processes = {name: rss_mib(process) for process, name in names.items()}
        gpu_by_process = {names[process]: mib for process, mib in gpu_mib_now().items() if process in names}
    metrics = read_metrics(args.metrics_url)
    gpu_bytes = metric(metrics, "nv_gpu_memory_used_bytes")  # all GPUs Triton sees; absent without one
    now = time.time()
    return {
        "t": round(now - origin, 1),
        "time": now,
        "triton_pid": pid,
        "rss_mib": round(sum(processes.values()), 1) if processes else None,
        "rss_by_process_mib": {name: round(value, 1) for name, value in processes.items()},
        "gpu_memory_mib": None if gpu_bytes is None else round(gpu_bytes / 2**20, 1),
        "gpu_by_process_mib": gpu_by_process,
        "denoiser_graphs": metric(metrics, "stepdiff_denoiser_graphs"),
        "active_sequences": metric(metrics, "stepdiff_active_sequences"),
        "cancelled": {labels["model"]: round(value) for name, labels, value in metrics if name == CANCELLED_METRIC},
        "load_average_1m": os.getloadavg()[0],  # of this machine: other work here skews the figures
    }


def kind_of(name: str) -> str:
    if name.startswith(INVALID):
        return "invalid input"
    outcome = "cancelled" if name.endswith("cancelled") else "good"
    return f"stream {outcome}" if name.startswith("txt2img_stream ") else outcome


def run(args: argparse.Namespace, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The load, the samples and the summary."""
    options = parse_options(
        [
            "--headless",
            "--grpc-url",
            args.grpc_url,
            "--steps",
            args.steps,
            "--sizes",
            args.sizes,
            "--cancel-fraction",
            str(args.cancel_fraction),
            "--cancel-after",
            str(args.cancel_after),
        ]
    )  # fmt: skip  (locust's own options plus the locustfile's)
    env = Environment(
        user_classes=list(USERS.values()),
        host=f"http://{args.url}",
        stop_timeout=30,
        parsed_options=options,
    )
    origin = previous["samples"][0]["time"] if previous else time.time()  # one timeline for all legs
    settle(args)  # what earlier work left in flight is counted before this run's first sample
    samples: list[dict[str, Any]] = []
    kept = (args.out / "samples.jsonl").open("w")  # as they come: a run cut short still leaves its samples

    def take_sample() -> None:
        samples.append(sample(args, origin))
        kept.write(json.dumps(samples[-1]) + "\n")
        kept.flush()

    take_sample()
    server_log = CancellationLog(args.server_log) if args.server_log else None
    recorded: dict[str, str] = {}  # request id -> the request's name, as the client reported it

    def record(name: str, context: dict | None = None, **_: Any) -> None:
        if context and "request_id" in context:
            recorded[context["request_id"]] = name

    env.events.request.add_listener(record)
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=args.users)
    load_started = time.monotonic()
    while (elapsed := time.monotonic() - load_started) < args.duration:
        gevent.sleep(min(args.sample_every, args.duration - elapsed))
        take_sample()
        last, total = samples[-1], env.stats.total
        print(
            f"soak: {time.monotonic() - load_started:.0f}/{args.duration:.0f} s, {total.num_requests} requests, "
            f"{total.num_failures} unexpected errors, RSS {last['rss_mib']} MiB, GPU {last['gpu_memory_mib']} MiB, "
            f"active {last['active_sequences']}",
            flush=True,
        )
    runner.quit()
    load_seconds = time.monotonic() - load_started
    settle(args)  # cut-off generations stop at their next step
    take_sample()
    kept.close()
    logged = server_log.read() if server_log else None
    return summarize(args, env, samples, load_seconds, previous, recorded, logged)


# What a generation holds until it ends: a place in the waiting queue, a stage call, a denoise state.
IN_FLIGHT_METRICS = ("stepdiff_queue_length", "stepdiff_stage_calls_in_flight", "stepdiff_active_sequences")


def settle(args: argparse.Namespace, timeout: float = 30) -> None:
    """Wait (up to ``timeout`` s) until no generation is in flight. A generation cut off by its client
    is counted as cancelled only when txt2img next checks, which may be before its denoise state exists
    (waiting for the text encoder): a run whose samples start or end before that would count it in the
    wrong run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = read_metrics(args.metrics_url)
        if not any(metric(metrics, name) for name in IN_FLIGHT_METRICS):
            return
        time.sleep(0.5)


def points(samples: list[dict], key: str) -> list[tuple[float, float]]:
    """(seconds, value) of the samples that have ``key`` measured."""
    return [(entry["t"], entry[key]) for entry in samples if entry[key] is not None]


def slope(series: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points in MiB per minute; None for fewer than 3 points."""
    if len(series) < 3:
        return None
    seconds, mib = zip(*series, strict=True)
    return round(float(np.polyfit(seconds, mib, 1)[0]) * 60, 3) + 0.0  # + 0.0: never -0.0


def series_by_process(samples: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    """(seconds, MiB) per process of a per-process figure (absent from samples of older runs)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in samples:
        for name, value in entry.get(key, {}).items():
            series.setdefault(name, []).append((entry["t"], value))
    return series


def growth(args: argparse.Namespace, samples: list[dict]) -> dict[str, Any]:
    """Memory slopes over the last half of the run (after the warm-up) and whether they are judged."""
    span = samples[-1]["t"] - samples[0]["t"]
    start = max(args.warmup, samples[0]["t"] + span / 2)
    window = [entry for entry in samples if entry["t"] >= start]
    by_process = series_by_process(window, "rss_by_process_mib")
    gpu_by_process = series_by_process(window, "gpu_by_process_mib")
    graphs = [entry["denoiser_graphs"] for entry in window if entry.get("denoiser_graphs") is not None]
    series = {
        "RSS, all processes": points(window, "rss_mib"),
        "RSS, tritonserver": by_process.get("tritonserver", []),
        "GPU memory": points(window, "gpu_memory_mib"),
    }
    rates = {name: rate for name, values in series.items() if (rate := slope(values)) is not None}
    judged = span >= MIN_JUDGED_S and bool(rates)
    limit = args.max_growth_mib_per_min
    too_fast = {name: rate for name, rate in rates.items() if rate >= limit} if judged else {}
    if not rates:
        verdict = "not measured"
    elif not judged:
        verdict = f"too short to judge (the samples span {span / 60:.1f} min; {MIN_JUDGED_S // 60} min needed)"
    elif too_fast:
        verdict = "growing: " + ", ".join(f"{name} {rate:+.2f} MiB/min" for name, rate in too_fast.items())
    else:
        verdict = f"flat (every slope under {limit} MiB/min)"
    return {
        "window_s": [round(start, 1), samples[-1]["t"]],
        "max_mib_per_min": limit,
        "judged": judged,
        "mib_per_min": rates,
        "by_process_mib_per_min": {name: slope(values) for name, values in by_process.items()},
        "gpu_by_process_mib_per_min": {name: slope(values) for name, values in gpu_by_process.items()},
        "gpu_by_process_window_mib": {name: [values[0][1], values[-1][1]] for name, values in gpu_by_process.items()},
        "denoiser_graphs_window": [graphs[0], graphs[-1]] if graphs else None,  # captures inside the window
        "too_fast": too_fast,
        "verdict": verdict,
    }


def memory_figures(samples: list[dict], key: str, warmup: float) -> dict[str, float] | None:
    """Start, after warm-up, end and max of one sampled figure (MiB); None when it was never measured."""
    measured = [entry for entry in samples if entry[key] is not None]
    if not measured:
        return None
    warm = next((entry for entry in measured if entry["t"] >= warmup), measured[-1])
    return {
        "start_mib": measured[0][key],
        "after_warmup_mib": warm[key],
        "warmup_s": warm["t"],
        "end_mib": measured[-1][key],
        "max_mib": max(entry[key] for entry in measured),
        "growth_after_warmup_mib": round(measured[-1][key] - warm[key], 1),
    }


def summarize(
    args: argparse.Namespace,
    env: Environment,
    leg: list[dict],
    load_seconds: float,
    previous: dict[str, Any] | None,
    recorded: dict[str, str],
    logged: dict[str, list[str]] | None,
) -> dict[str, Any]:
    """This run's request figures and, over all legs' samples, the memory figures and the verdict.
    ``recorded``: request id -> name as the client reported it; ``logged``: the ids the server's log
    named as cancelled, by model (None without the log)."""
    requests = {}
    for entry in sorted(env.stats.entries.values(), key=lambda entry: entry.name):
        requests[entry.name] = {
            "kind": kind_of(entry.name),
            "count": entry.num_requests,
            "unexpected_errors": entry.num_failures,
            "median_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95),
        }
    kinds: dict[str, dict[str, int]] = {}
    for row in requests.values():
        totals = kinds.setdefault(row["kind"], {"count": 0, "unexpected_errors": 0})
        totals["count"] += row["count"]
        totals["unexpected_errors"] += row["unexpected_errors"]
    invalid_by_type = {
        kind: sum(row["count"] for name, row in requests.items() if name.startswith(f"{INVALID} {kind} "))
        for kind in BAD_INPUTS
    }
    errors = [
        {"request": error.name, "error": str(error.error), "occurrences": error.occurrences}
        for error in env.stats.errors.values()
    ] + [  # exceptions raised in a task outside a request (locust logs them but counts no failure)
        {"request": "task", "error": row["msg"], "occurrences": row["count"]} for row in env.runner.exceptions.values()
    ]
    first, last = leg[0], leg[-1]
    cancelled_by_client = [
        (name.split()[0], row["count"]) for name, row in requests.items() if "cancelled" in row["kind"]
    ]
    cancellations = {
        model: {
            "client": sum(count for name, count in cancelled_by_client if name == model),
            "server": count - first["cancelled"].get(model, 0),
        }
        for model, count in last["cancelled"].items()
    }
    if logged is not None:  # what the counts cannot tell: which requests differ
        cancelled_ids = {rid: name.split()[0] for rid, name in recorded.items() if "cancelled" in kind_of(name)}
        for model, counts in cancellations.items():
            by_client = {rid for rid, cancelled_model in cancelled_ids.items() if cancelled_model == model}
            by_server = logged.get(model, [])
            counts["server_logged"] = len(by_server)
            counts["server_not_client"] = [
                {"request_id": rid, "client_recorded": recorded.get(rid)} for rid in by_server if rid not in by_client
            ]
            counts["client_not_server"] = sorted(by_client - set(by_server))
    samples = (previous["samples"] if previous else []) + leg
    pids = {entry["triton_pid"] for entry in samples if entry["triton_pid"] is not None}
    memory = memory_figures(samples, "rss_mib", args.warmup)
    if memory:
        measured = [entry["rss_by_process_mib"] for entry in samples if entry["rss_mib"] is not None]
        memory.update(by_process_start_mib=measured[0], by_process_end_mib=measured[-1])
    total = env.stats.total
    unexpected = total.num_failures + sum(row["count"] for row in env.runner.exceptions.values())
    this_leg = {
        "out": str(args.out),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(load_seconds, 1),
        "total_requests": total.num_requests,
        "unexpected_errors": unexpected,
        "active_sequences_end": last["active_sequences"],
    }
    report = {
        "date": this_leg["date"],
        "server": f"own (`stepdiff serve --pipeline {args.pipeline}`)" if args.pipeline else f"attached ({args.url})",
        "duration_s": this_leg["duration_s"],
        "cpu_count": os.cpu_count(),
        "users": {"total": args.users, "weights": {name: user.weight for name, user in USERS.items()}},
        "options": {
            key: getattr(args, key) for key in ("steps", "sizes", "cancel_fraction", "cancel_after", "cpu_threads")
        },
        "total_requests": total.num_requests,
        "requests_per_s": round(total.num_requests / load_seconds, 2),
        "unexpected_errors": unexpected,
        "by_kind": kinds,
        "invalid_by_type": invalid_by_type,
        "requests": requests,
        "errors": errors,
        "cancellations": cancellations,
        "cancelled_by_server": sum(counts["server"] for counts in cancellations.values()) if cancellations else None,
        "active_sequences_end": last["active_sequences"],
        "triton_restarts_seen": len(pids) - 1 if pids else None,
        "legs": (previous["legs"] if previous else []) + [this_leg],
        "memory": memory,
        "gpu_memory": memory_figures(samples, "gpu_memory_mib", args.warmup),
        "growth": growth(args, samples),
        "samples": samples,
    }
    report["failures"] = failures(report)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """What makes the soak fail; empty when it passes."""
    found = [
        f"{leg['unexpected_errors']} unexpected errors in {leg['out']}"
        for leg in report["legs"]
        if leg["unexpected_errors"]
    ] + [
        f"{leg['active_sequences_end']} generations still active after {leg['out']}"
        for leg in report["legs"]
        if leg["active_sequences_end"]
    ]
    if report["triton_restarts_seen"]:
        found.append(f"tritonserver restarted {report['triton_restarts_seen']} times")
    found += [
        f"{model}: the client cancelled {counts['client']}, the server counted {counts['server']}"
        for model, counts in report["cancellations"].items()
        if not 0 <= counts["client"] - counts["server"] <= LATE_CANCELS + LATE_CANCEL_SHARE * counts["client"]
    ]
    if report["growth"]["too_fast"]:
        found.append(f"memory {report['growth']['verdict']} (limit {report['growth']['max_mib_per_min']})")
    return found


def per_minute(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def markdown(report: dict[str, Any]) -> str:
    weights = " : ".join(f"{name} {weight}" for name, weight in report["users"]["weights"].items())
    lines = [
        f"# Soak run, {report['date']}",
        "",
        f"Server: {report['server']}, {report['cpu_count']} CPUs. {report['duration_s']:.0f} s of load, "
        f"{report['users']['total']} locust users (weights {weights}); options {report['options']}.",
        "",
    ]
    if len(report["legs"]) > 1:
        lines += [
            "Earlier runs against the same server, whose samples join this one's for the memory figures:",
            "",
            *(
                f"- {leg['date']}, {leg['duration_s']:.0f} s, {leg['total_requests']} requests, "
                f"{leg['unexpected_errors']} unexpected errors, active sequences after it: "
                f"{leg['active_sequences_end']} ({leg['out']})"
                for leg in report["legs"][:-1]
            ),
            "",
        ]
    lines += [
        "| kind | requests | unexpected errors |",
        "|---|---|---|",
        *(
            f"| {kind} | {row['count']} | {row['unexpected_errors']} |"
            for kind, row in sorted(report["by_kind"].items())
        ),
        f"| **all** | {report['total_requests']} ({report['requests_per_s']}/s) | {report['unexpected_errors']} |",
        "",
        "Invalid inputs, each expected to be rejected with INVALID_ARG naming the field: "
        + ", ".join(f"{kind}: {count}" for kind, count in report["invalid_by_type"].items())
        + ".",
        "",
        "| request | count | unexpected errors | median ms | p95 ms |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {row['count']} | {row['unexpected_errors']} | {row['median_ms']:.0f} | {row['p95_ms']:.0f} |"
            for name, row in report["requests"].items()
        ),
        "",
        "Unexpected errors: " + ("none." if not report["errors"] else ""),
        *(f"- {error['request']}: {error['error']} (x{error['occurrences']})" for error in report["errors"]),
        "",
        "Cancellations, by the client / as the server counted them: "
        + ", ".join(f"{model} {c['client']} / {c['server']}" for model, c in report["cancellations"].items())
        + f" (up to {LATE_CANCELS} + {LATE_CANCEL_SHARE:.0%} may reach the server after the last step, "
        "with nothing left to stop).",
        *(
            f"- {model}: the server's log names {rid!r} as cancelled, which the client "
            + (f"recorded as {name!r}" if name else "has no record of")
            for model, counts in report["cancellations"].items()
            for rid, name in (
                (row["request_id"], row["client_recorded"]) for row in counts.get("server_not_client", [])
            )
        ),
        "",
    ]
    memory, gpu, growth_ = report["memory"], report["gpu_memory"], report["growth"]
    rows = {
        "RSS, tritonserver + model processes (sum; shared pages count once per process)": memory,
        "GPU memory in use (Triton's nv_gpu_memory_used_bytes, all GPUs)": gpu,
    }
    lines += [
        "| memory, MiB | start | after warm-up | end | max | end minus after warm-up |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {m['start_mib']:.0f} | {m['after_warmup_mib']:.0f} ({m['warmup_s']:.0f} s) "
            f"| {m['end_mib']:.0f} | {m['max_mib']:.0f} | {m['growth_after_warmup_mib']:+.1f} |"
            for name, m in rows.items()
            if m
        ),
        "",
    ]
    if not memory:
        lines += ["RSS: not measured (no tritonserver with that HTTP port on this machine).", ""]
    if not gpu:
        lines += ["GPU memory: no GPU (the server exports no nv_gpu_memory_used_bytes).", ""]
    if memory:
        lines += [
            "| process | start | end | MiB/min over the last half |",
            "|---|---|---|---|",
            *(
                f"| {name} | {value:.0f} | {memory['by_process_end_mib'].get(name, 0):.0f} "
                f"| {per_minute(growth_['by_process_mib_per_min'].get(name))} |"
                for name, value in memory["by_process_start_mib"].items()
            ),
            "",
        ]
    window = growth_["window_s"]
    if growth_.get("gpu_by_process_mib_per_min"):
        lines += [
            "| GPU memory by process (nvidia-smi), MiB | window start | end | MiB/min over the last half |",
            "|---|---|---|---|",
            *(
                f"| {name} | {first:.0f} | {last:.0f} | {per_minute(growth_['gpu_by_process_mib_per_min'][name])} |"
                for name, (first, last) in growth_["gpu_by_process_window_mib"].items()
            ),
            "",
        ]
    if growth_.get("denoiser_graphs_window"):
        first, last = growth_["denoiser_graphs_window"]
        lines += [f"CUDA graphs the denoiser had captured: {first} when the last half began, {last} at its end.", ""]
    lines += [
        f"Growth over the last half, {window[0]:.0f} to {window[1]:.0f} s (least-squares slope, MiB/min): "
        + (
            ", ".join(f"{name} {per_minute(value)}" for name, value in growth_["mib_per_min"].items())
            or "nothing measured"
        )
        + f". Verdict: {growth_['verdict']}.",
        "",
        f"Active sequences once the load stopped: {report['active_sequences_end']}. "
        f"tritonserver restarts seen: {report['triton_restarts_seen']}.",
        "",
        "**PASS**" if not report["failures"] else "**FAIL**: " + "; ".join(report["failures"]) + ".",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--pipeline", help="serve this pipeline with `stepdiff serve` for the run")
    target.add_argument("--url", help="HTTP host:port of a running server (on this machine, for memory)")
    parser.add_argument("--grpc-url", help="with --url: gRPC host:port (default: the HTTP port + 1)")
    parser.add_argument("--metrics-url", help="with --url: metrics URL (default: http://host:<HTTP port + 2>/metrics)")
    parser.add_argument("--duration", type=parse_duration, default="10m", help="e.g. 600, 90s, 9m30s, 2h (default 10m)")
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--steps", default="8,12,20", help="num_inference_steps values of the good requests")
    parser.add_argument("--sizes", default="64x64,64x48", help="HEIGHTxWIDTH values of the good requests")
    parser.add_argument("--cancel-fraction", type=float, default=0.2, help="share of gRPC requests cut off mid-way")
    parser.add_argument("--cancel-after", type=float, default=0.03, help="client deadline of those, seconds")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument(
        "--warmup", type=parse_duration, default="60", help="seconds from the start left out of the growth verdict"
    )
    parser.add_argument(
        "--max-growth-mib-per-min", type=float, default=1.0, help="memory growth that fails the run (default 1.0)"
    )
    parser.add_argument(
        "--previous", type=Path, help="with --url: the --out of an earlier run against the same server, continued here"
    )
    parser.add_argument("--cpu-threads", type=int, default=1, help="with --pipeline: torch threads per model")
    parser.add_argument(
        "--server-log",
        type=Path,
        help="tritonserver's log file, read for the cancelled requests' ids (with --pipeline: OUT/tritonserver.log)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    args = parser.parse_args(argv)
    if args.pipeline:
        args.server_log = args.server_log or args.out / "tritonserver.log"
    if args.previous and not args.url:
        parser.error("--previous continues a run against the same server: give its --url")
    if args.url:
        host, port = args.url.rsplit(":", 1)
        args.grpc_url = args.grpc_url or f"{host}:{int(port) + 1}"
        args.metrics_url = args.metrics_url or f"http://{host}:{int(port) + 2}/metrics"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = json.loads((args.previous / "soak.json").read_text()) if args.previous else None
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server(args) if args.pipeline else None
    try:
        report = run(args, previous)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    print(f"soak: wrote {args.out / 'soak.json'} and {args.out / 'soak.md'}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
