"""32 txt2img clients on tiny SD (CPU), 45 s after a 15 s ramp: denoise_step's calls, executes, forwards,
and how many forwards held at most 1, 2 or 4 requests (its batch-size histogram)."""

import json
import sys
import threading
import time
import urllib.request

sys.path.insert(0, "/work/main/results/2026-12-05-cpu-bls-thread-pool")
import numpy as np
import serve_tiny
import tritonclient.grpc as grpcclient

port = int(sys.argv[1])


def counters():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port + 2}/metrics").read().decode()

    def total(name):
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and 'model="denoise_step"' in line
        )

    small = [
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("stepdiff_denoise_batch_size_bucket{") and f'le="{le}"' in line
        )
        for le in ("1", "2", "4")
    ]
    return [
        total(n)
        for n in (
            "stepdiff_denoise_batch_size_sum",
            "stepdiff_denoise_batch_size_count",
            "nv_inference_count",
            "nv_inference_exec_count",
        )
    ] + small


def inputs(seed):
    out = []
    for name, value, kind in (
        ("prompt", np.array([b"a red panda"], dtype=np.object_), "BYTES"),
        ("seed", np.array([seed], dtype=np.int64), "INT64"),
        ("num_inference_steps", np.array([30], dtype=np.int32), "INT32"),
        ("height", np.array([64], dtype=np.int32), "INT32"),
        ("width", np.array([64], dtype=np.int32), "INT32"),
    ):
        t = grpcclient.InferInput(name, [1], kind)
        t.set_data_from_numpy(value)
        out.append(t)
    return out


server = serve_tiny.start(port)
try:
    stop = time.monotonic() + 60
    done = []

    def user(i):
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port + 1}")
        time.sleep(i * 0.1)
        n = 0
        while time.monotonic() < stop:
            c.infer("txt2img", inputs(i * 1000 + n))
            done.append(time.monotonic())
            n += 1

    threads = [threading.Thread(target=user, args=(i,)) for i in range(32)]
    [t.start() for t in threads]
    time.sleep(15)
    a = counters()
    t0 = time.monotonic()
    time.sleep(max(0, stop - time.monotonic()))
    b = counters()
    t1 = time.monotonic()
    [t.join() for t in threads]
    rows, forwards, calls, execs, le1, le2, le4 = (y - x for x, y in zip(a, b, strict=True))
    print(
        json.dumps(
            {
                "images_per_s": round(sum(t0 <= d <= t1 for d in done) / (t1 - t0), 2),
                "rows_per_forward": round(rows / forwards, 2),
                "forwards_per_execute": round(forwards / execs, 3),
                "calls_per_execute": round(calls / execs, 2),
                "forwards": forwards,
                "forwards_le_1": le1,
                "le_2": le2,
                "le_4": le4,
                "images": sum(t0 <= d <= t1 for d in done),
            }
        )
    )
finally:
    server.send_signal(2)
    server.wait(60)
