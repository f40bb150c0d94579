#!/usr/bin/env python3
"""Soak test: mixed txt2img traffic for a long time while watching the server's memory and state.

    python load_tests/soak.py --pipeline build/tiny-sd --duration 10m --users 4 --out results/soak
    python load_tests/soak.py --url localhost:8000 --grpc-url localhost:8001 \\
        --metrics-url http://localhost:8002/metrics --duration 2h --out results/soak

Runs, through locust's library API, the locustfile's HTTP and gRPC users (on gRPC a share of the
requests is cut off mid-way by a client deadline: --cancel-fraction) and a user that sends invalid
inputs, which must come back as INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) naming the field.
With --pipeline it serves the pipeline itself (`stepdiff serve`, free ports); with --url it attaches
to a running server. Every --sample-every seconds it records the resident memory (RSS) of tritonserver
and each of its model processes (from /proc, so the server must run on this machine) and
`stepdiff_active_sequences`. Writes soak.json and soak.md to --out; exits 1 on any unexpected error or
when generations are still active once the load has stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent
from locust import User, between, task
from locust.argument_parser import parse_options
from locust.env import Environment
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parent))
import locustfile  # load_tests/locustfile.py: the txt2img users; sets up gRPC for gevent

from stepdiff.server import free_ports, stub_processes, tritonserver_pid

txt2img_client = locustfile.txt2img_client  # client/generate.py
BAD_INPUTS = {  # type -> (txt2img options, what the error message must name)
    "steps=0": ({"num_inference_steps": 0}, "num_inference_steps=0"),
    "height=60": ({"height": 60}, "height=60"),
    "4096x4096": ({"height": 4096, "width": 4096}, "pixels is over the limit"),
    "unknown scheduler": ({"scheduler": "NoSuchScheduler"}, "scheduler='NoSuchScheduler'"),
}
EXPECTED_STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
INVALID = "invalid"  # request names of BadInputUser start with it


class SoakHttpUser(locustfile.HttpUser):
    weight = 1


class SoakGrpcUser(locustfile.GrpcUser):
    weight = 2


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
        kind, protocol = next(self.cases)
        overrides, expected = BAD_INPUTS[kind]
        module, client = self.clients[protocol]
        options = {"seed": 1, "num_inference_steps": 4, "height": 64, "width": 64, **overrides}
        started = time.perf_counter()
        exception: Exception | None = RuntimeError(f"the server accepted {kind}")
        try:
            txt2img_client.generate(client, module, "a cat", options)
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
            context={},
        )


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
        str(args.out / "tritonserver.log"),
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


def metric(url: str, name: str) -> int | None:
    """A gauge or counter summed over its label sets; None when the endpoint or the metric is not there."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " "))]
    return round(sum(values)) if values else None


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def sample(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """One measurement: RSS per process (MiB) and in total, active sequences, cancellations so far."""
    pid = tritonserver_pid(int(args.url.rsplit(":", 1)[1]))
    processes = {}
    if pid is not None:
        processes["tritonserver"] = rss_mib(pid)
        processes.update({stub.instance: rss_mib(stub.pid) for stub in stub_processes(pid)})
    return {
        "t": round(time.monotonic() - started, 1),
        "triton_pid": pid,
        "rss_mib": round(sum(processes.values()), 1) if processes else None,
        "rss_by_process_mib": {name: round(value, 1) for name, value in processes.items()},
        "active_sequences": metric(args.metrics_url, "stepdiff_active_sequences"),
        "cancelled_total": metric(args.metrics_url, "stepdiff_cancelled_requests_total"),
        "load_average_1m": os.getloadavg()[0],  # of this machine: other work here skews the figures
    }


def kind_of(name: str) -> str:
    if name.startswith(INVALID):
        return "invalid input"
    return "cancelled" if name.endswith("cancelled") else "good"


def run(args: argparse.Namespace) -> dict[str, Any]:
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
        user_classes=[SoakHttpUser, SoakGrpcUser, BadInputUser],
        host=f"http://{args.url}",
        stop_timeout=30,
        parsed_options=options,
    )
    started = time.monotonic()
    samples = [sample(args, started)]
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=args.users)
    load_started = time.monotonic()
    while (elapsed := time.monotonic() - load_started) < args.duration:
        gevent.sleep(min(args.sample_every, args.duration - elapsed))
        samples.append(sample(args, started))
        last, total = samples[-1], env.stats.total
        print(
            f"soak: {time.monotonic() - load_started:.0f}/{args.duration:.0f} s, {total.num_requests} requests, "
            f"{total.num_failures} unexpected errors, RSS {last['rss_mib']} MiB, active {last['active_sequences']}",
            flush=True,
        )
    runner.quit()
    load_seconds = time.monotonic() - load_started
    settle_deadline = time.monotonic() + 30  # cut-off generations stop at their next step
    while (metric(args.metrics_url, "stepdiff_active_sequences") or 0) > 0 and time.monotonic() < settle_deadline:
        time.sleep(0.5)
    samples.append(sample(args, started))
    return summarize(args, env, samples, load_seconds)


def summarize(args: argparse.Namespace, env: Environment, samples: list[dict], load_seconds: float) -> dict[str, Any]:
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
    ]
    measured = [entry for entry in samples if entry["rss_mib"] is not None]
    warm = next((entry for entry in measured if entry["t"] >= args.warmup), measured[-1] if measured else None)
    memory = None
    if measured:
        memory = {
            "rss_start_mib": measured[0]["rss_mib"],
            "rss_after_warmup_mib": warm["rss_mib"],
            "warmup_s": warm["t"],
            "rss_end_mib": measured[-1]["rss_mib"],
            "rss_max_mib": max(entry["rss_mib"] for entry in measured),
            "growth_after_warmup_mib": round(measured[-1]["rss_mib"] - warm["rss_mib"], 1),
            "by_process_start_mib": measured[0]["rss_by_process_mib"],
            "by_process_end_mib": measured[-1]["rss_by_process_mib"],
        }
    first, last = samples[0], samples[-1]
    total = env.stats.total
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": f"own (`stepdiff serve --pipeline {args.pipeline}`)" if args.pipeline else f"attached ({args.url})",
        "duration_s": round(load_seconds, 1),
        "cpu_count": os.cpu_count(),
        "users": {"total": args.users, "weights": {"http": 1, "grpc": 2, "invalid inputs": 1}},
        "options": {
            key: getattr(args, key) for key in ("steps", "sizes", "cancel_fraction", "cancel_after", "cpu_threads")
        },
        "total_requests": total.num_requests,
        "requests_per_s": round(total.num_requests / load_seconds, 2),
        "unexpected_errors": total.num_failures,
        "by_kind": kinds,
        "invalid_by_type": invalid_by_type,
        "requests": requests,
        "errors": errors,
        "cancelled_by_server": (
            last["cancelled_total"] - first["cancelled_total"]
            if None not in (first["cancelled_total"], last["cancelled_total"])
            else None
        ),
        "active_sequences_end": last["active_sequences"],
        "triton_restarts_seen": len({entry["triton_pid"] for entry in measured}) - 1 if measured else None,
        "memory": memory,
        "samples": samples,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Soak run, {report['date']}",
        "",
        f"Server: {report['server']}, {report['cpu_count']} CPUs. {report['duration_s']:.0f} s of load, "
        f"{report['users']['total']} locust users "
        f"(weights HTTP 1 : gRPC 2 : invalid inputs 1); options {report['options']}.",
        "",
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
    ]
    memory = report["memory"]
    if memory:
        lines += [
            "Resident memory of tritonserver and its model processes (sum of RSS, MiB; shared pages count once "
            "per process):",
            "",
            f"| start | after warm-up ({memory['warmup_s']:.0f} s) | end | max | end minus after warm-up |",
            "|---|---|---|---|---|",
            f"| {memory['rss_start_mib']:.0f} | {memory['rss_after_warmup_mib']:.0f} | {memory['rss_end_mib']:.0f} "
            f"| {memory['rss_max_mib']:.0f} | {memory['growth_after_warmup_mib']:+.1f} |",
            "",
            "| process | start | end |",
            "|---|---|---|",
            *(
                f"| {name} | {value:.0f} | {memory['by_process_end_mib'].get(name, 0):.0f} |"
                for name, value in memory["by_process_start_mib"].items()
            ),
            "",
        ]
    else:
        lines += ["Memory: not measured (no tritonserver with that HTTP port on this machine).", ""]
    lines += [
        f"Active sequences once the load stopped: {report['active_sequences_end']}. "
        f"Generations the server counted as cancelled: {report['cancelled_by_server']}. "
        f"tritonserver restarts seen: {report['triton_restarts_seen']}.",
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
    parser.add_argument("--duration", type=parse_duration, default="10m", help="e.g. 600, 90s, 10m, 2h (default 10m)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--steps", default="8,12,20", help="num_inference_steps values of the good requests")
    parser.add_argument("--sizes", default="64x64,64x48", help="HEIGHTxWIDTH values of the good requests")
    parser.add_argument("--cancel-fraction", type=float, default=0.2, help="share of gRPC requests cut off mid-way")
    parser.add_argument("--cancel-after", type=float, default=0.03, help="client deadline of those, seconds")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="memory growth is judged after this many seconds")
    parser.add_argument("--cpu-threads", type=int, default=1, help="with --pipeline: torch threads per model")
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    args = parser.parse_args(argv)
    if args.url:
        host, port = args.url.rsplit(":", 1)
        args.grpc_url = args.grpc_url or f"{host}:{int(port) + 1}"
        args.metrics_url = args.metrics_url or f"http://{host}:{int(port) + 2}/metrics"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server(args) if args.pipeline else None
    try:
        report = run(args)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(report))
    print(markdown(report))
    print(f"soak: wrote {args.out / 'soak.json'} and {args.out / 'soak.md'}")
    return 1 if report["unexpected_errors"] or report["active_sequences_end"] else 0


if __name__ == "__main__":
    sys.exit(main())
