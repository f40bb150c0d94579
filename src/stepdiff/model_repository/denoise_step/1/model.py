"""denoise_step: one denoising step per request; per-sequence state stays on the device.

Triton's sequence batcher (oldest strategy) delivers calls of several sequences at once; the
StepEngine runs one denoiser forward per compatible group and each request's own scheduler step.
With several instances (``stepdiff serve --gpus``: one per GPU) every step of a sequence goes to the
instance that took its START, and each instance admits its share of ``max_active_sequences``.
"""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import Stage
from stepdiff.engine import StepCall, StepEngine
from stepdiff.params import PARAM_NAMES, parse_generation_params, scalar
from stepdiff.runner import DenoiserRunner
from stepdiff.settings import device_label, instance_count
from stepdiff.stage_io import load_stage, output_tensor, torch_input
from stepdiff.triton_io import error_response, numpy_inputs, release_triton_objects

BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
METRICS = (
    ("stepdiff_active_sequences", "Generations whose state denoise_step holds", "GAUGE"),
    ("stepdiff_denoise_steps_total", "Denoising steps taken (one per request per step)", "COUNTER"),
    ("stepdiff_denoise_batch_size", "Requests per denoiser forward", "HISTOGRAM"),
    ("stepdiff_denoiser_graphs", "CUDA graphs the denoiser runner has captured", "GAUGE"),
    ("stepdiff_denoiser_graph_memory_bytes", "GPU memory reserved while capturing the denoiser's graphs", "GAUGE"),
    ("stepdiff_lora_requests_total", "Generations started with a LoRA adapter, per adapter", "COUNTER"),
    ("stepdiff_denoise_host_seconds_total", "Seconds denoise_step's executes worked on the host", "COUNTER"),
    ("stepdiff_denoise_gpu_wait_seconds_total", "Seconds denoise_step's executes waited for the GPU", "COUNTER"),
)


class TritonPythonModel:
    def initialize(self, args):
        self.settings, self.adapter = load_stage(args, Stage.DENOISE)
        settings = self.settings
        model_config = json.loads(args["model_config"])
        max_batch_size = model_config["max_batch_size"]
        forward_cap = min(settings.max_batch_size or max_batch_size, max_batch_size)
        instances = instance_count(model_config)
        max_active_sequences = settings.sequences_per_instance(instances)
        # up to two rows per request (guidance); the runner's buckets stop at that
        runner = DenoiserRunner(self.adapter.denoise, self.adapter.device, settings.denoiser, max_rows=2 * forward_cap)
        for height, width in settings.warmup_sizes():
            for rows in self.adapter.warmup_rows(height, width):
                runner.warm_up(rows)
        stats = runner.stats
        pb_utils.Logger.log_info(
            f"denoise_step: denoiser {settings.denoiser} on {self.adapter.device}; warm-up "
            f"{settings.warmup or 'none'}: "
            f"{stats.graphs} CUDA graphs in {stats.capture_seconds:.1f} s, {stats.graph_memory_bytes / 2**20:.0f} MiB; "
            f"admits {max_active_sequences} of the server's {settings.max_active_sequences} active sequences "
            f"({instances} instances)"
        )
        self.engine = StepEngine(
            self.adapter, forward_cap, max_active_sequences, settings.sequence_idle_seconds, runner
        )
        # Keep the families alive as long as their metrics (Triton deletes metrics with their family).
        self.metric_families = {
            name: pb_utils.MetricFamily(name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind))
            for name, description, kind in METRICS
        }
        labels = {"model": args["model_name"], "gpu": device_label(self.adapter.device)}
        self.active_gauge = self.metric_families["stepdiff_active_sequences"].Metric(labels=labels)
        self.steps_counter = self.metric_families["stepdiff_denoise_steps_total"].Metric(labels=labels)
        self.batch_histogram = self.metric_families["stepdiff_denoise_batch_size"].Metric(
            labels=labels, buckets=BATCH_SIZE_BUCKETS
        )
        self.graphs_gauge = self.metric_families["stepdiff_denoiser_graphs"].Metric(labels=labels)
        self.graph_memory_gauge = self.metric_families["stepdiff_denoiser_graph_memory_bytes"].Metric(labels=labels)
        self.host_seconds = self.metric_families["stepdiff_denoise_host_seconds_total"].Metric(labels=labels)
        self.gpu_wait_seconds = self.metric_families["stepdiff_denoise_gpu_wait_seconds_total"].Metric(labels=labels)
        self.lora_counters = {
            name: self.metric_families["stepdiff_lora_requests_total"].Metric(labels={**labels, "adapter": name})
            for name in settings.lora_paths()
        }
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sweeper = threading.Thread(target=self._sweep_periodically, name="stepdiff-sweeper", daemon=True)
        self.sweeper.start()

    def _step_call(self, request) -> StepCall:
        controls = numpy_inputs(request, ("START", "END", "CORRID", "step", "abort"))
        call = StepCall(
            correlation_id=int(scalar(controls, "CORRID")),
            start=bool(scalar(controls, "START")),
            end=bool(scalar(controls, "END")),
            abort=bool(scalar(controls, "abort") or False),
            wants_latents="latents" in request.requested_output_names(),
        )
        step = scalar(controls, "step")
        call.step = None if step is None else int(step)
        if call.start:
            raw = numpy_inputs(request, PARAM_NAMES)
            call.params = parse_generation_params(raw, self.adapter.info, self.settings)
            present = {spec.name: torch_input(request, spec.name) for spec in self.adapter.conditioning}
            call.conditioning = {name: value for name, value in present.items() if value is not None}
        return call

    def _sweep_periodically(self):
        """Free sequences nobody ended (a caller that died, a sequence Triton reaped), also when idle."""
        period = min(max(self.settings.sequence_idle_seconds / 4, 0.1), 5.0)
        while not self.stopping.wait(period):
            with self.lock:
                if self.engine.sweep():
                    self.active_gauge.set(len(self.engine.states))

    def execute(self, requests):
        with self.lock:
            return self._execute(requests)

    def _execute(self, requests):
        began = time.perf_counter()
        self.engine.sweep()
        calls, responses = [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                calls.append((index, self._step_call(request)))
            except Exception as error:  # noqa: BLE001 - a malformed call fails alone
                responses[index] = error_response(error)
        results = self.engine.run([call for _, call in calls])
        for (index, call), result in zip(calls, results, strict=True):
            if result.error is not None:
                responses[index] = error_response(result.error)
                continue
            if call.start:
                for name, _ in call.params.loras:
                    self.lora_counters[name].increment(1)
            outputs = [
                output_tensor("step_index", np.array([[result.step_index]], dtype=np.int32)),
                output_tensor("num_steps", np.array([[result.num_steps]], dtype=np.int32)),
            ]
            if result.latents is not None and call.wants_latents:  # reading them back waits for the GPU
                outputs.append(output_tensor("latents", result.latents.float().cpu().numpy()))
            responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        for size in self.engine.forward_batch_sizes:
            self.batch_histogram.observe(size)
        self.steps_counter.increment(self.engine.steps_done)
        self.active_gauge.set(len(self.engine.states))
        self.graphs_gauge.set(self.engine.runner.stats.graphs)
        self.graph_memory_gauge.set(self.engine.runner.stats.graph_memory_bytes)
        waited = self.engine.gpu_wait_seconds  # (reading latents back above waits too: counted as host time)
        self.gpu_wait_seconds.increment(waited)
        self.host_seconds.increment(time.perf_counter() - began - waited)
        return responses

    def finalize(self):
        self.stopping.set()
        self.sweeper.join(timeout=10)
        del self.active_gauge, self.steps_counter, self.batch_histogram, self.graphs_gauge, self.graph_memory_gauge
        del self.host_seconds, self.gpu_wait_seconds
        del self.lora_counters
        del self.metric_families
        release_triton_objects()
