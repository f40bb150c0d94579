"""The Triton Python model behind ``txt2img`` (unary) and ``txt2img_stream`` (decoupled, progress).

``execute`` only schedules a coroutine per request and returns None; each coroutine runs
``orchestrator.generate`` over BLS and answers through the request's response sender. Requests thus
run concurrently in one instance, and their step calls meet (and batch) in denoise_step.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .adapters import Stage, load_adapter
from .engine import ServerBusy
from .orchestrator import generate
from .params import PARAM_NAMES, encode_image, integer, parse_generation_params, parse_output_options
from .triton_io import bls_call, error_response, load_settings, numpy_inputs, release_triton_objects

FINAL = "TRITONSERVER_RESPONSE_COMPLETE_FINAL"


class GenerationModel:
    """Serves txt2img requests; ``streaming`` models also send one progress response per step."""

    streaming = False

    def initialize(self, args: dict[str, Any]) -> None:
        self.settings = load_settings(args)
        self.adapter = load_adapter(
            self.settings.pipeline, Stage.INFO, self.settings.torch_device(), self.settings.torch_dtype()
        )
        self.tasks: set[asyncio.Task] = set()
        self.executor: ThreadPoolExecutor | None = None
        self.active = 0
        self.cancelled_family = pb_utils.MetricFamily(
            name="stepdiff_cancelled_requests_total",
            description="Generations stopped because the client cancelled, timed out or went away",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.cancelled = self.cancelled_family.Metric(labels={"model": args["model_name"]})

    async def execute(self, requests: list) -> None:
        if self.executor is None:
            # The stub runs each BLS async_exec in the event loop's default executor, whose size
            # (cpu count + 4) would otherwise cap how many step calls are in flight at once.
            workers = self.settings.max_active_sequences * self.settings.step_lookahead + 8
            self.executor = ThreadPoolExecutor(max_workers=workers)
            asyncio.get_running_loop().set_default_executor(self.executor)
        for request in requests:
            task = asyncio.ensure_future(self._serve(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        final = getattr(pb_utils, FINAL)
        self.active += 1
        try:
            if self.active > self.settings.max_active_sequences:
                # Checked here, at the door: Triton 2.51's BLS reports every child error as INTERNAL.
                raise ServerBusy(
                    f"server busy: {self.active - 1} generations in progress "
                    f"(limit {self.settings.max_active_sequences}); retry later"
                )
            raw = numpy_inputs(request, (*PARAM_NAMES, "preview_every", "output_format", "jpeg_quality"))
            params = parse_generation_params(raw, self.adapter.info, self.settings)
            output = parse_output_options(raw)
            preview_every = integer(raw, "preview_every", 0, 0, self.settings.max_steps) if self.streaming else 0
            result = await generate(
                bls_call,
                params,
                [spec.name for spec in self.adapter.conditioning],
                on_step=(lambda *progress: self._progress(sender, *progress)) if self.streaming else None,
                is_cancelled=request.is_cancelled,
                lookahead=self.settings.step_lookahead,
                preview_every=preview_every,
            )
            if result is None:
                self._cancelled(sender)
                return
            image = result.image.as_numpy()[0]
            if output.output_format == "raw":
                image_output = pb_utils.Tensor("image", image)
            else:
                image_output = pb_utils.Tensor("image_bytes", np.array([encode_image(image, output)], dtype=np.object_))
            outputs = [image_output, pb_utils.Tensor("seed", np.array([result.seed], dtype=np.int64))]
            response = pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as error:  # noqa: BLE001 - every error goes back to its own request
            if request.is_cancelled():  # a cancel can surface first as a failed progress send
                self._cancelled(sender)
                return
            response = error_response(error)
        finally:
            self.active -= 1
        sender.send(response, flags=final)

    def _cancelled(self, sender: Any) -> None:
        """Count a cancelled generation and close its request: CANCELLED (unary) or an empty final."""
        self.cancelled.increment(1)
        final = getattr(pb_utils, FINAL)
        with contextlib.suppress(Exception):  # the client may be gone: nothing left to tell it
            if self.streaming:
                sender.send(flags=final)
            else:
                error = pb_utils.TritonError(
                    "the request was cancelled by the client (or timed out); no image", pb_utils.TritonError.CANCELLED
                )
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)

    async def _progress(self, sender: Any, step: int, num_steps: int, latents: Any) -> None:
        """One streamed progress response: step, num_steps and, every K steps, a latent preview."""
        outputs = [
            pb_utils.Tensor("step", np.array([step], dtype=np.int32)),
            pb_utils.Tensor("num_steps", np.array([num_steps], dtype=np.int32)),
        ]
        if latents is not None:
            outputs.append(pb_utils.Tensor("preview", self.adapter.preview(latents.as_numpy())))
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs))

    def finalize(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        del self.cancelled, self.cancelled_family
        release_triton_objects()
