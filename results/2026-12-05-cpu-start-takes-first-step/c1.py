"""c1 latency A/B helper: serve exact on CPU, 3 warm-up then 30 sequential requests, print the median."""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, "/work/main/load_tests")
from bench_batching import Load, start_server

args = argparse.Namespace(
    pipeline=Path("/tmp/ab-sd"),
    device="cpu",
    dtype="float32",
    port=18300,
    out=Path("/tmp/abc"),
    steps=30,
    guidance=7.5,
    size=64,
    schedulers=["EulerDiscreteScheduler"],
)
process, grpc_url, _ = start_server(args, denoiser="exact")
try:
    load = Load(grpc_url, args)
    for seed in range(3):
        load.request(seed)
    times = [load.request(seed)[0] for seed in range(30)]
    print(sys.argv[1], "median", round(statistics.median(times) * 1e3), "ms", "min", round(min(times) * 1e3))
finally:
    process.stop()
