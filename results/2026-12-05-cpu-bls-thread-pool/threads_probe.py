"""Threads and memory of an idle tritonserver started by `stepdiff serve` (tiny SD): python threads_probe.py PORT."""

import os
import subprocess
import sys
import time
from pathlib import Path

import serve_tiny

port = int(sys.argv[1])
t = time.monotonic()
p = serve_tiny.start(port)
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
