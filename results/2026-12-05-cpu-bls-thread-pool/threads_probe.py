"""Threads and memory of an idle tritonserver started by `stepdiff serve` (tiny SD): python threads_probe.py PORT."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

port = int(sys.argv[1])
log = Path(f"/tmp/probe_{port}.log").open("w")  # noqa: SIM115 - the server's, for the run
t = time.monotonic()
p = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "stepdiff",
        "serve",
        "--pipeline",
        "/work/main/build/tiny-sd",
        "--http-port",
        str(port),
        "--grpc-port",
        str(port + 1),
        "--metrics-port",
        str(port + 2),
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
    env={**os.environ, "HF_HUB_OFFLINE": "1"},
)
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
        break
    except OSError:
        time.sleep(0.5)
ready = time.monotonic() - t
time.sleep(3)
out = subprocess.run(
    ["pgrep", "-f", f"tritonserver.*--http-port={port}"], capture_output=True, text=True
).stdout.split()
pid = out[0]
st = Path(f"/proc/{pid}/status").read_text()
th = [line for line in st.splitlines() if line.startswith(("Threads", "VmRSS", "VmSize"))]
print(os.environ.get("EXP_POOL", "default"), f"ready {ready:.1f}s", th)
p.terminate()
p.wait(90)
