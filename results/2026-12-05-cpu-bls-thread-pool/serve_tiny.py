"""`stepdiff serve` of the tiny SD pipeline on PORT (and the next two), for the scripts here."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start(port: int, pipeline: str = "/work/main/build/tiny-sd") -> subprocess.Popen:
    """The launcher's process, once Triton is ready (its output goes to /tmp/serve_tiny_PORT.log)."""
    log = Path(f"/tmp/serve_tiny_{port}.log").open("w")  # noqa: SIM115 - the server's, while it runs
    command = [sys.executable, "-m", "stepdiff", "serve", "--pipeline", pipeline, "--http-port", str(port)]
    command += ["--grpc-port", str(port + 1), "--metrics-port", str(port + 2)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"not ready: /tmp/serve_tiny_{port}.log")
