"""vae_decode: final latents -> uint8 image, the pipeline's own decode and postprocess."""

import torch
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import Stage
from stepdiff.triton_io import (
    error_response,
    load_stage,
    output_tensor,
    release_triton_objects,
    torch_input,
)


class TritonPythonModel:
    def initialize(self, args):
        _, self.adapter = load_stage(args, Stage.DECODE)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                latents = torch_input(request, "latents")
                with torch.inference_mode():
                    image = self.adapter.decode(self.adapter.check_latents(latents))
                responses.append(pb_utils.InferenceResponse(output_tensors=[output_tensor("image", image)]))
            except Exception as error:  # noqa: BLE001 - every error goes back to its own request
                responses.append(error_response(error))
        return responses

    def finalize(self):
        release_triton_objects()
