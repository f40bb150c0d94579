"""Host time of a START without a step (adapter.prepare through StepEngine.run, then an abort), tiny SD, CPU."""

import json
import statistics
import time

import torch

import stepdiff
from stepdiff.adapters import GenerationParams, Stage, load_adapter
from stepdiff.engine import StepCall, StepEngine

pipeline = "/work/main/build/tiny-sd"
cpu = torch.device("cpu")
encoder = load_adapter(pipeline, Stage.TEXT_ENCODER, cpu, torch.float32)
denoiser = load_adapter(pipeline, Stage.DENOISE, cpu, torch.float32)
engine = StepEngine(denoiser, 8, 8, 60)
result = {"stepdiff": stepdiff.__file__}
for scheduler in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"):
    params = GenerationParams("a cat", None, 0, 30, 7.5, 64, 64, scheduler)
    with torch.inference_mode():
        conditioning = encoder.encode_prompt(params)
    times = []
    for index in range(300):
        began = time.perf_counter()
        [started] = engine.run([StepCall(index + 1, start=True, params=params, conditioning=conditioning)])
        times.append(time.perf_counter() - began)
        assert started.error is None
        engine.run([StepCall(index + 1, end=True, abort=True)])
    result[scheduler] = round(statistics.median(times[10:]) * 1e3, 3)
print(json.dumps(result))
