"""txt2img: the orchestrator. text_encoder -> denoise_step x N -> vae_decode over BLS.

``execute`` only schedules a coroutine per request and returns None; each coroutine answers its
request through the response sender. Requests therefore run concurrently in one instance and their
step calls meet (and batch) in denoise_step, while HTTP and gRPC unary inference keep working.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import Stage, load_adapter
from stepdiff.engine import ServerBusy
from stepdiff.orchestrator import StepWaves, generate
from stepdiff.params import PARAM_NAMES, parse_generation_params
from stepdiff.triton_io import bls_call, error_response, load_settings, numpy_inputs


class TritonPythonModel:
    def initialize(self, args):
        self.settings = load_settings(args)
        self.info = load_adapter(self.settings.pipeline, Stage.INFO, self.settings.torch_device(), self.settings.torch_dtype()).info
        self.tasks = set()
        self.waves = StepWaves()
        self.executor = None
        self.active = 0

    async def execute(self, requests):
        if self.executor is None:
            # The stub runs each BLS async_exec in the event loop's default executor, whose size
            # (cpu count + 4) would otherwise cap how many step calls are in flight at once.
            self.executor = ThreadPoolExecutor(max_workers=self.settings.max_active_sequences + 8)
            asyncio.get_running_loop().set_default_executor(self.executor)
        for request in requests:
            task = asyncio.ensure_future(self._serve(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def _serve(self, request):
        sender = request.get_response_sender()
        self.active += 1
        try:
            if self.active > self.settings.max_active_sequences:
                # Checked here, at the door: Triton 2.51's BLS reports every child error as INTERNAL.
                raise ServerBusy(f"server busy: {self.active - 1} generations in progress (limit {self.settings.max_active_sequences}); retry later")
            params = parse_generation_params(numpy_inputs(request, PARAM_NAMES), self.info, self.settings)
            result = await generate(bls_call, params, waves=self.waves)
            outputs = [
                pb_utils.Tensor("image", result.image.as_numpy()[0]),
                pb_utils.Tensor("seed", np.array([result.seed], dtype=np.int64)),
            ]
            response = pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as error:  # noqa: BLE001 - every error goes back to its own request
            response = error_response(error)
        finally:
            self.active -= 1
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
