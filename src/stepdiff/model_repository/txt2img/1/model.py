"""txt2img: text_encoder -> denoise_step x N -> vae_decode over BLS; one response per request."""

from stepdiff.generation_model import GenerationModel


class TritonPythonModel(GenerationModel):
    streaming = False
