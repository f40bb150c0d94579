"""Throwaway A/B: closed loop of C clients on txt2img or txt2img_stream, tiny SD on CPU."""

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import serve_tiny
import tritonclient.grpc as grpcclient

model, clients, duration, ramp, port = (
    sys.argv[1],
    int(sys.argv[2]),
    float(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
grpc_port = port + 1
server = serve_tiny.start(port)
try:

    def inputs(seed):
        values = {
            "prompt": np.array([b"a red panda"], dtype=np.object_),
            "seed": np.array([seed], dtype=np.int64),
            "num_inference_steps": np.array([30], dtype=np.int32),
            "height": np.array([64], dtype=np.int32),
            "width": np.array([64], dtype=np.int32),
            "guidance_scale": np.array([7.5], dtype=np.float32),
        }
        out = []
        for name, value in values.items():
            t = grpcclient.InferInput(
                name,
                [1],
                {np.object_: "BYTES", np.int64: "INT64", np.int32: "INT32", np.float32: "FP32"}[value.dtype.type],
            )
            t.set_data_from_numpy(value)
            out.append(t)
        return out

    def one(client, seed, results):
        if model == "txt2img":
            client.infer("txt2img", inputs(seed))
            return
        client.async_stream_infer("txt2img_stream", inputs(seed), enable_empty_final_response=True)
        while True:
            result, error = results.get()
            if error is not None:
                raise error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return

    done = []
    stop = time.monotonic() + duration

    def user(index):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        results = queue.Queue()
        if model != "txt2img":
            client.start_stream(callback=lambda result, error: results.put((result, error)))
        time.sleep(index * 0.05)
        n = 0
        while time.monotonic() < stop:
            one(client, index * 1000 + n, results)
            done.append(time.monotonic())
            n += 1
        if model != "txt2img":
            client.stop_stream()

    def stats():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/denoise_step/stats") as r:
            s = json.load(r)["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    def cpu_by_process():

        clk = os.sysconf("SC_CLK_TCK")
        tsp = subprocess.run(
            ["pgrep", "-f", f"tritonserver.*--http-port={port}"], capture_output=True, text=True
        ).stdout.split()
        out = {}
        for pid in [*tsp, *subprocess.run(["pgrep", "-P", tsp[0]], capture_output=True, text=True).stdout.split()]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            except OSError:
                continue
            name = "tritonserver" if pid == tsp[0] else (cmd[8] if len(cmd) > 8 else pid)
            name = name.rsplit("_0_", 1)[0]
            out[name] = out.get(name, 0) + (int(fields[11]) + int(fields[12])) / clk
        me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        out["client"] = (int(me[11]) + int(me[12])) / clk
        return out

    for i in range(3):  # warm-up
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        c.infer("txt2img", inputs(i))
    threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(ramp)
    i0, e0 = stats()
    c0 = cpu_by_process()
    t0 = time.monotonic()
    time.sleep(max(0.0, stop - time.monotonic()))
    i1, e1 = stats()
    c1 = cpu_by_process()
    t1 = time.monotonic()
    for t in threads:
        t.join()
    window = [d for d in done if t0 <= d <= t1]
    print(
        json.dumps(
            {
                "model": model,
                "clients": clients,
                "pool": os.environ.get("EXP_POOL", "default"),
                "images_per_s": round(len(window) / (t1 - t0), 3),
                "requests_per_forward": round((i1 - i0) / max(1, e1 - e0), 2),
                "step_calls_per_s": round((i1 - i0) / (t1 - t0), 1),
                "cpu_share": {k: round((c1[k] - c0.get(k, 0)) / (t1 - t0), 2) for k in c1},
            }
        ),
        flush=True,
    )
finally:
    server.terminate()
    server.wait(90)
