"""The Triton Python model behind ``txt2img`` (unary) and ``txt2img_stream`` (decoupled, progress).

``execute`` only schedules a coroutine per request and returns None; each coroutine runs
``orchestrator.generate`` over BLS and answers through the request's response sender. Requests thus
run concurrently in one instance, and their step calls meet (and batch) in denoise_step.

At most as many generations run at once, over every instance of both models, as denoise_step admits
(``max_active_sequences``); later ones wait their turn in a FIFO of at most ``max_queue``, for up to
``queue_timeout_seconds`` (``admission``). Inputs are checked before a request queues.

Each BLS call is counted in ``stepdiff_stage_calls_in_flight`` until answered: with Triton's own counts
of the requests a model answered, that tells ``stepdiff serve``'s watchdog a model that holds calls
without answering (hung) from one that has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .admission import Admission, SharedSlots
from .executor import DemandThreadPool
from .orchestrator import generate
from .params import PARAM_NAMES, encode_image, integer, parse_generation_params, parse_output_options
from .repository import generations_admitted
from .served_pipeline import ServedPipeline
from .triton_io import bls_call, error_response, load_settings, numpy_inputs, release_triton_objects

FINAL = "TRITONSERVER_RESPONSE_COMPLETE_FINAL"
# Seconds finalize waits for the generations still in flight to answer before cancelling them.
FINALIZE_GRACE = 5.0
FAILURE_CODES = ("INVALID_ARG", "UNAVAILABLE", "INTERNAL")  # the status codes txt2img's errors carry
QUEUE_WAIT_BUCKETS = [0.01, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class QueueMetrics:
    """Admission's observer: ``stepdiff_queue_length`` (gauge), ``stepdiff_queue_wait_seconds``
    (histogram) and ``stepdiff_queue_rejections_total`` (counter per ``reason``), labelled by model. The
    instances of a model add to the same series."""

    def __init__(self, model_name: str):
        labels = {"model": model_name}
        # Keep the families alive as long as their metrics (Triton deletes metrics with their family).
        self.families = [
            pb_utils.MetricFamily(name=name, description=description, kind=kind)
            for name, description, kind in (
                ("stepdiff_queue_length", "Generations waiting for a slot", pb_utils.MetricFamily.GAUGE),
                (
                    "stepdiff_queue_wait_seconds",
                    "Seconds from a generation's arrival to its start (0: at once) or to leaving the queue",
                    pb_utils.MetricFamily.HISTOGRAM,
                ),
                (
                    "stepdiff_queue_rejections_total",
                    "Generations refused with UNAVAILABLE: the queue was full or the wait timed out",
                    pb_utils.MetricFamily.COUNTER,
                ),
            )
        ]
        length, wait, rejections = self.families
        self.length = length.Metric(labels=labels)
        self.wait = wait.Metric(labels=labels, buckets=QUEUE_WAIT_BUCKETS)
        self.rejections = {
            reason: rejections.Metric(labels={**labels, "reason": reason}) for reason in ("queue_full", "queue_timeout")
        }

    def queued(self, change: int) -> None:
        self.length.increment(change)

    def waited(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections[reason].increment(1)


class GenerationModel:
    """Serves txt2img requests; ``streaming`` models also send one progress response per step."""

    streaming = False

    def initialize(self, args: dict[str, Any]) -> None:
        self.settings = load_settings(args)
        self.pipeline = ServedPipeline.from_model_config(args["model_name"], json.loads(args["model_config"]))
        self.tasks: set[asyncio.Task] = set()
        self.executor: DemandThreadPool | None = None
        # args["model_repository"] is this model's directory; denoise_step's is next to it.
        limit = generations_admitted(Path(args["model_repository"]).parent, os.environ)
        self.admission = Admission(
            SharedSlots.for_server(limit, self.settings.max_queue),
            self.settings.queue_timeout_seconds,
            QueueMetrics(args["model_name"]),
        )
        self.cancelled_family = pb_utils.MetricFamily(
            name="stepdiff_cancelled_requests_total",
            description="Generations stopped because the client cancelled, timed out or went away",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.cancelled = self.cancelled_family.Metric(labels={"model": args["model_name"]})
        self.failed_family = pb_utils.MetricFamily(
            name="stepdiff_failed_requests_total",
            description="Generations answered with an error, by its Triton status code (Triton's own "
            "nv_inference_request_failure counts a Python model's error responses as successes)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.failed = {  # created at start, so that every series exists at 0 before the first failure
            code: self.failed_family.Metric(labels={"model": args["model_name"], "code": code})
            for code in FAILURE_CODES
        }
        self.model_name = args["model_name"]
        self.stage_calls_family = pb_utils.MetricFamily(
            name="stepdiff_stage_calls_in_flight",
            description="Calls to a stage model (BLS) sent and not yet answered",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.stage_calls: dict[str, Any] = {}  # stage model -> its gauge

    async def execute(self, requests: list) -> None:
        if self.executor is None:
            # Replacing the loop's default executor cannot be avoided while BLS goes through async_exec:
            # the 2.51 stub runs every async_exec as loop.run_in_executor(None, ...), i.e. in the default
            # executor, and asyncio's own (cpu count + 4 threads, made on first use) would cap the step
            # calls in flight at that, each thread blocked until its call is answered. The stub sets no
            # executor of its own, so nothing of Triton's is replaced. (tritonserver also holds a thread per
            # call: `stepdiff serve` sizes its pool the same way, repository.python_backend_threads.)
            self.executor = DemandThreadPool(self.settings.bls_calls_in_flight(self.admission.slots.limit))
            asyncio.get_running_loop().set_default_executor(self.executor)
        for request in requests:
            task = asyncio.ensure_future(self._serve(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def _serve(self, request: Any) -> None:
        """Answer one request: its image, its error, or (cancelled) CANCELLED, counted once."""
        sender = request.get_response_sender()
        try:
            response = await self._generate(request, sender)
        except Exception as error:  # noqa: BLE001 - every error goes back to its own request
            # a cancel can surface first as a failed progress send
            response = None if request.is_cancelled() else error_response(error)
        if response is None:
            self._cancelled(request, sender)
            return
        if response.has_error():
            self._failed(response.error())
        sender.send(response, flags=getattr(pb_utils, FINAL))

    async def _generate(self, request: Any, sender: Any) -> Any:
        """The request's response with its image; None when it was cancelled while waiting or between steps."""
        raw = numpy_inputs(request, (*PARAM_NAMES, "preview_every", "output_format", "jpeg_quality"))
        params = parse_generation_params(raw, self.pipeline.info, self.settings)
        output = parse_output_options(raw)
        preview_every = integer(raw, "preview_every", 0, 0, self.settings.max_steps) if self.streaming else 0
        # The limits are checked here, at the door: Triton 2.51's BLS reports every child error as INTERNAL.
        async with self.admission.slot(request.is_cancelled) as started:
            result = (
                await generate(
                    self._call_stage,
                    params,
                    self.pipeline.conditioning,
                    on_step=(lambda *progress: self._progress(sender, *progress)) if self.streaming else None,
                    is_cancelled=request.is_cancelled,
                    lookahead=self.settings.step_lookahead,
                    preview_every=preview_every,
                    is_stopping=self.admission.slots.stopping,
                )
                if started
                else None
            )
        if result is None:
            return None
        image = result.image.as_numpy()[0]
        if output.output_format == "raw":
            image_output = pb_utils.Tensor("image", image)
        else:
            image_output = pb_utils.Tensor("image_bytes", np.array([encode_image(image, output)], dtype=np.object_))
        outputs = [image_output, pb_utils.Tensor("seed", np.array([result.seed], dtype=np.int64))]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    async def _call_stage(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str],
        correlation_id: int = 0,
        start: bool = False,
        end: bool = False,
    ) -> dict[str, Any]:
        """``bls_call``, counted in ``stepdiff_stage_calls_in_flight`` while it waits for its answer."""
        in_flight = self.stage_calls.get(model)
        if in_flight is None:
            labels = {"model": self.model_name, "stage": model}
            in_flight = self.stage_calls[model] = self.stage_calls_family.Metric(labels=labels)
        in_flight.increment(1)
        try:
            return await bls_call(model, inputs, outputs, correlation_id, start, end)
        finally:
            in_flight.increment(-1)

    def _failed(self, error: Any) -> None:
        """Count an error answer by its status code."""
        names = {getattr(pb_utils.TritonError, name): name for name in FAILURE_CODES}
        self.failed[names.get(error.code(), "INTERNAL")].increment(1)

    def _cancelled(self, request: Any, sender: Any) -> None:
        """Close a cancelled generation's request (CANCELLED, or an empty final on a stream), then count it
        and log it by the request's id (the client's ``request_id``), so that a count can be matched."""
        final = getattr(pb_utils, FINAL)
        with contextlib.suppress(Exception):  # the client may be gone: nothing left to tell it
            if self.streaming:
                sender.send(flags=final)
            else:
                error = pb_utils.TritonError(
                    "the request was cancelled by the client (or timed out); no image", pb_utils.TritonError.CANCELLED
                )
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        self.cancelled.increment(1)
        pb_utils.Logger.log_info(f"{self.model_name}: request {request.request_id()!r} cancelled by its client")

    async def _progress(self, sender: Any, step: int, num_steps: int, latents: Any) -> None:
        """One streamed progress response: step, num_steps and, every K steps, a latent preview."""
        outputs = [
            pb_utils.Tensor("step", np.array([step], dtype=np.int32)),
            pb_utils.Tensor("num_steps", np.array([num_steps], dtype=np.int32)),
        ]
        if latents is not None:
            outputs.append(pb_utils.Tensor("preview", self.pipeline.preview(latents.as_numpy())))
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs))

    def finalize(self) -> None:
        """Let the generations in flight answer (up to FINALIZE_GRACE s), cancel what is left, then free the
        executor and the metrics."""
        self._finish_generations(FINALIZE_GRACE)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.admission.close()
        del self.cancelled, self.cancelled_family, self.failed, self.failed_family
        del self.stage_calls, self.stage_calls_family, self.admission
        release_triton_objects()

    def _finish_generations(self, grace: float) -> None:
        """Run the generations still in flight until they end or ``grace`` seconds pass, then cancel them.

        Triton unloads the model once its requests have had their final responses (at Ctrl-C none was
        left), so there is little to wait for as a rule. The stub stops the event loop before calling
        finalize (loop.stop(), which takes effect when the loop next wakes up); the loop runs here, on
        the finalizing thread, once its own thread has let go of it.
        """
        pending = {task for task in tuple(self.tasks) if not task.done()}  # tuple: the loop may still discard
        if not pending:
            return
        loop = next(iter(pending)).get_loop()
        loop.call_soon_threadsafe(lambda: None)  # wakes an idle loop, so that the stub's stop() takes effect
        deadline = time.monotonic() + 1.0
        while loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        if loop.is_running():  # its thread is stuck in a callback: nothing can run the generations
            return
        loop.run_until_complete(asyncio.wait(pending, timeout=grace))
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
