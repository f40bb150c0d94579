"""vae_decode: final latents -> uint8 image, the pipeline's own decode and postprocess.
Triton's dynamic batcher hands over the requests that queued while the stage was busy; those whose latents
have the same shape share one VAE decode (``decode_batch``)."""

import json
import time

import torch
import triton_python_backend_utils as pb_utils

from stepdiff.adapters import Stage
from stepdiff.stage_batching import decode_batch, warm_up_decode
from stepdiff.stage_io import load_stage, output_tensor, torch_input
from stepdiff.triton_io import error_response, release_triton_objects


class TritonPythonModel:
    def initialize(self, args):
        settings, self.adapter = load_stage(args, Stage.DECODE)
        self.max_pixels = settings.max_pixels
        if settings.decoder == "compiled":  # compiled by the warm-up below, or else by the first decode
            self.adapter.compile_decode()
        elif settings.decoder == "graphs":  # captured by the warm-up below, or else by the first decode
            self.adapter.graph_decode()
        sizes = settings.warmup_sizes()
        if sizes:
            batch = json.loads(args["model_config"])["max_batch_size"]
            began = time.perf_counter()
            _, too_large = warm_up_decode(self.adapter, sizes, batch)
            for height, width, count in too_large:
                pb_utils.Logger.log_warn(
                    f"vae_decode: warm-up: {count} latents of {height}x{width} ran out of GPU memory; batches "
                    "like it will fail and be decoded one request at a time"
                )
            device = self.adapter.device
            reserved = ""
            if device.type == "cuda":
                reserved = f", {torch.cuda.memory_reserved(device) / 2**20:.0f} MiB reserved"
            pb_utils.Logger.log_info(
                f"vae_decode: warm-up {settings.warmup}: batches of 1 to {batch} latents of each size decoded in "
                f"{time.perf_counter() - began:.1f} s{reserved}"
            )

    def execute(self, requests):
        checked = []
        for request in requests:
            try:
                checked.append(self.adapter.check_latents(torch_input(request, "latents"), self.max_pixels))
            except Exception as error:  # noqa: BLE001 - every error goes back to its own request
                checked.append(error)
        valid = [latents for latents in checked if isinstance(latents, torch.Tensor)]
        with torch.inference_mode():
            decoded = iter(decode_batch(self.adapter, valid))
        return [self._response(item if isinstance(item, Exception) else next(decoded)) for item in checked]

    @staticmethod
    def _response(result):
        if isinstance(result, Exception):
            return error_response(result)
        return pb_utils.InferenceResponse(output_tensors=[output_tensor("image", result)])

    def finalize(self):
        release_triton_objects()
