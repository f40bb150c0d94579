"""A denoise_step stand-in for sim.py: Triton's real batcher in front, a simulated GPU behind.

Each call's input ``x`` says what it is: 0 START with its step, 1 START only, 2 a step, 3 END (no step).
The GPU is a clock: ``execute`` queues its forward (H200 graph-replay times of the SD-1.5 UNet, two rows
per request for guidance) and, like ``StepEngine``, then waits for the run ``runahead - 1`` back.
"""

import itertools
import json
import time

import numpy as np

# (UNet rows, ms): the fast-denoiser issue's H200 graph replay, 64 rows extrapolated
GRAPH_MS = [(1, 9.5), (2, 11.9), (4, 16.7), (8, 27.2), (32, 94.2), (64, 188.0)]


def forward_ms(rows: int) -> float:
    """Interpolated UNet time of a forward of ``rows`` rows."""
    for (r0, m0), (r1, m1) in itertools.pairwise(GRAPH_MS):
        if rows <= r1:
            return m0 + (m1 - m0) * (rows - r0) / (r1 - r0)
    raise ValueError(rows)


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        setting = {key: value["string_value"] for key, value in parameters.items()}
        self.runahead = int(setting["runahead"])
        self.host_ms, self.host_ms_per_request = float(setting["host_ms"]), float(setting["host_ms_per_request"])
        self.gpu_scale = float(setting["gpu_scale"])  # e.g. 0.75 for a compiled UNet
        self.gpu_free = time.monotonic()
        self.done_at: list[float] = []  # when each run's forward ends on the GPU
        self.log = open(setting["log"], "a")  # noqa: SIM115 - one line per execute, for sim.py

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # here, so that sim.py can import forward_ms

        kinds = [int(pb_utils.get_input_tensor_by_name(r, "x").as_numpy().ravel()[0]) for r in requests]
        rows = sum(kind in (0, 2) for kind in kinds)
        time.sleep((self.host_ms + self.host_ms_per_request * len(requests)) / 1e3)  # batch assembly on the host
        now = time.monotonic()
        if rows:
            self.gpu_free = max(now, self.gpu_free) + self.gpu_scale * forward_ms(2 * rows) / 1e3
            self.done_at.append(self.gpu_free)
            if len(self.done_at) >= self.runahead:
                time.sleep(max(0.0, self.done_at[-self.runahead] - time.monotonic()))
        elif 3 in kinds and self.done_at:  # END's latents come out behind the forwards queued
            time.sleep(max(0.0, self.done_at[-1] - time.monotonic()))
        self.log.write(f"{now:.4f} {len(requests)} {rows} {self.gpu_free if rows else 0:.4f}\n")
        self.log.flush()
        batch = np.array([rows], dtype=np.int32)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("batch", batch)]) for _ in requests]
