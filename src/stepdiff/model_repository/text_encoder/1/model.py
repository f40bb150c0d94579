"""text_encoder: generation inputs -> prompt embeddings (negative ones when guidance is on)."""

import torch
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import Stage
from stepdiff.params import PARAM_NAMES, parse_generation_params
from stepdiff.triton_io import (
    error_response,
    load_stage,
    numpy_inputs,
    output_tensor,
    release_triton_objects,
)


class TritonPythonModel:
    def initialize(self, args):
        self.settings, self.adapter = load_stage(args, Stage.TEXT_ENCODER)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                params = parse_generation_params(numpy_inputs(request, PARAM_NAMES), self.adapter.info, self.settings)
                with torch.inference_mode():
                    self.adapter.activate_loras(params.loras)
                    conditioning = self.adapter.encode_prompt(params)
                outputs = [
                    output_tensor(name, value.float() if value.is_floating_point() else value)
                    for name, value in conditioning.items()
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as error:  # noqa: BLE001 - every error goes back to its own request
                responses.append(error_response(error))
        return responses

    def finalize(self):
        release_triton_objects()
