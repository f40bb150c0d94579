"""Host-memory growth per request: serve a pipeline, send txt2img back to back over gRPC from
--concurrency threads, sample each process's RSS every 5 s, and fit RSS against requests done.

    python3 memory_probe.py --pipeline DIR --label NAME --out DIR [--seconds 120] [--concurrency 16]

The server inherits this process's environment (MALLOC_ARENA_MAX, LD_PRELOAD, STEPDIFF_*).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "load_tests"), str(ROOT / "client")]
import generate  # noqa: E402
import soak  # noqa: E402


def load(args: argparse.Namespace, stop: threading.Event, done: list[int]) -> None:
    module = generate.client_module("grpc")
    client = module.InferenceServerClient(args.grpc_url)
    seed = 0
    while not stop.is_set():
        seed += 1
        options = {"seed": seed, "num_inference_steps": args.steps, "height": args.size, "width": args.size}
        generate.generate(client, module, "a red fox in the snow", options, None)
        done[0] += 1
    client.close()


def thread_count(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.cpu_threads = 1
    server = soak.start_server(args)
    stop, done = threading.Event(), [0]
    threads = [threading.Thread(target=load, args=(args, stop, done)) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    origin = time.time()
    time.sleep(args.warmup)
    samples = []
    while time.time() - origin < args.warmup + args.seconds:
        record = soak.sample(args, origin)
        record["requests"] = done[0]
        server_pid = soak.tritonserver_pid(int(args.url.rsplit(":", 1)[1]))
        record["threads"] = {stub.instance: thread_count(stub.pid) for stub in soak.stub_processes(server_pid)}
        record["threads"]["tritonserver"] = thread_count(server_pid)
        samples.append(record)
        time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join()
    server.send_signal(signal.SIGINT)
    server.wait(timeout=90)
    names = sorted(samples[-1]["rss_by_process_mib"])
    per_request = {
        name: 1024 * slope([(s["requests"], s["rss_by_process_mib"].get(name, 0.0)) for s in samples]) for name in names
    }
    requests = samples[-1]["requests"] - samples[0]["requests"]
    seconds = samples[-1]["t"] - samples[0]["t"]
    report = {
        "label": args.label,
        "requests": requests,
        "seconds": seconds,
        "kib_per_request": per_request,
        "samples": samples,
    }
    (args.out / f"{args.label}.json").write_text(json.dumps(report, indent=1))
    print(f"{args.label}: {requests} requests in {seconds:.0f} s ({requests / seconds:.1f}/s); RSS KiB per request:")
    for name in names:
        first, last = samples[0]["rss_by_process_mib"].get(name, 0), samples[-1]["rss_by_process_mib"].get(name, 0)
        counts = [s.get("threads", {}).get(name) for s in (samples[0], samples[-1])]
        memory = f"{first:.0f} -> {last:.0f} MiB"
        print(f"  {name:24s} {per_request[name]:+8.2f}   ({memory}, threads {counts[0]} -> {counts[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
