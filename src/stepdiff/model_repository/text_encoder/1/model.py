"""text_encoder: generation inputs -> prompt embeddings (negative ones when guidance is on).

Triton's dynamic batcher hands over the requests that queued while the stage was busy; those with the same
guidance, negative-prompt presence and LoRA setting share one text-encoder forward (``encode_batch``).
"""

import json
import time

import torch
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import GenerationParams, Stage
from stepdiff.params import PARAM_NAMES, parse_generation_params
from stepdiff.stage_batching import encode_batch, warm_up_encode
from stepdiff.stage_io import load_stage, output_tensor
from stepdiff.triton_io import error_response, numpy_inputs, release_triton_objects


class TritonPythonModel:
    def initialize(self, args):
        self.settings, self.adapter = load_stage(args, Stage.TEXT_ENCODER)
        # graphs captured by the warm-up, or else by each batch size's first call
        graphed = self.settings.encoder == "graphs" and self.adapter.graph_text_encoders()
        if graphed and self.settings.warmup_sizes():
            self._warm_up(json.loads(args["model_config"])["max_batch_size"])

    def _warm_up(self, batch):
        began = time.perf_counter()
        warm_up_encode(self.adapter, batch)
        seconds = time.perf_counter() - began
        pb_utils.Logger.log_info(f"text_encoder: warm-up: batches of 1 to {batch} prompts encoded in {seconds:.1f} s")

    def execute(self, requests):
        parsed = []
        for request in requests:
            try:
                raw = numpy_inputs(request, PARAM_NAMES)
                parsed.append(parse_generation_params(raw, self.adapter.info, self.settings))
            except Exception as error:  # noqa: BLE001 - every error goes back to its own request
                parsed.append(error)
        valid = [params for params in parsed if isinstance(params, GenerationParams)]
        with torch.inference_mode():
            encoded = iter(encode_batch(self.adapter, valid))
        return [self._response(item if isinstance(item, Exception) else next(encoded)) for item in parsed]

    @staticmethod
    def _response(result):
        """The conditioning in host memory: txt2img only passes it on to denoise_step, which takes host
        inputs. Sent from the GPU, it reached every orchestrator process (txt2img, txt2img_stream) as
        GPU tensors, and each held a CUDA context (518 MiB each on an H200)."""
        if isinstance(result, Exception):
            return error_response(result)
        outputs = [
            output_tensor(name, (value.float() if value.is_floating_point() else value).cpu())
            for name, value in result.items()
        ]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        release_triton_objects()
