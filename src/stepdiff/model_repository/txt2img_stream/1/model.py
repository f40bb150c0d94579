"""txt2img_stream: txt2img for gRPC streaming, with one progress response per step (and previews)."""

from stepdiff.generation_model import GenerationModel


class TritonPythonModel(GenerationModel):
    streaming = True
