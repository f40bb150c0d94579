"""txt2img: the orchestrator. text_encoder -> denoise_step x N -> vae_decode over BLS.

``execute`` only schedules a coroutine per request and returns None; each coroutine answers its
request through the response sender. Requests therefore run concurrently in one instance and their
step calls meet (and batch) in denoise_step, while HTTP and gRPC unary inference keep working.
"""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import Stage, load_adapter
from stepdiff.orchestrator import StepWaves, generate
from stepdiff.params import PARAM_NAMES, parse_generation_params
from stepdiff.triton_io import bls_call, error_response, load_settings, numpy_inputs


class TritonPythonModel:
    def initialize(self, args):
        self.settings = load_settings(args)
        self.info = load_adapter(self.settings.pipeline, Stage.INFO, self.settings.torch_device(), self.settings.torch_dtype()).info
        self.tasks = set()
        self.waves = StepWaves()

    async def execute(self, requests):
        for request in requests:
            task = asyncio.ensure_future(self._serve(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def _serve(self, request):
        sender = request.get_response_sender()
        try:
            params = parse_generation_params(numpy_inputs(request, PARAM_NAMES), self.info, self.settings)
            result = await generate(bls_call, params, waves=self.waves)
            outputs = [
                pb_utils.Tensor("image", result.image.as_numpy()[0]),
                pb_utils.Tensor("seed", np.array([result.seed], dtype=np.int64)),
            ]
            response = pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as error:  # noqa: BLE001 - every error goes back to its own request
            response = error_response(error)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
