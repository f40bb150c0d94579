#!/usr/bin/env python3
"""Run the three stages yourself over gRPC: text_encoder, denoise_step x N, vae_decode.

This is what the ``txt2img`` model does inside the server, written out with tritonclient so you can
run your own loop (inspect or edit latents between steps, stop early, ...). For the same inputs the
image equals ``txt2img``'s.

    python client/stepwise.py "a red panda" --seed 7 --num-inference-steps 30 --height 512 --width 512 --out panda.png

Every stage takes the generation inputs with a leading batch dimension of 1 ([1, 1] tensors).
denoise_step is sequence-batched: one sequence id per generation, START on the first call (the inputs
plus text_encoder's outputs, the family's conditioning; returns num_steps), then one call per step
with "step" = 0, 1, ... and END on the last call, which returns "latents". An END call with
"abort" = true drops the sequence early.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException


def tensor(name: str, value: np.ndarray) -> grpcclient.InferInput:
    triton_type = "BYTES" if value.dtype == np.object_ else grpcclient.np_to_triton_dtype(value.dtype)
    infer_input = grpcclient.InferInput(name, list(value.shape), triton_type)
    infer_input.set_data_from_numpy(value)
    return infer_input


def infer(client, model: str, inputs: dict[str, np.ndarray], outputs: list[str], **sequence) -> dict[str, np.ndarray]:
    """One request; returns the outputs the model produced (absent ones are left out)."""
    result = client.infer(
        model,
        [tensor(name, value) for name, value in inputs.items()],
        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
        **sequence,
    )
    produced = {name: result.as_numpy(name) for name in outputs}
    return {name: value for name, value in produced.items() if value is not None}


def generation_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The generation inputs as [1, 1] tensors (absent options are left out: the stages use defaults)."""
    values = {
        "prompt": (args.prompt.encode(), np.object_),
        "negative_prompt": (args.negative_prompt.encode() if args.negative_prompt is not None else None, np.object_),
        "seed": (args.seed, np.int64),
        "num_inference_steps": (args.num_inference_steps, np.int32),
        "guidance_scale": (args.guidance_scale, np.float32),
        "true_cfg_scale": (args.true_cfg_scale, np.float32),
        "height": (args.height, np.int32),
        "width": (args.width, np.int32),
        "scheduler": (args.scheduler.encode() if args.scheduler else None, np.object_),
    }
    return {name: np.array([[value]], dtype=dtype) for name, (value, dtype) in values.items() if value is not None}


def run(client, args: argparse.Namespace) -> np.ndarray:
    """encode -> START -> step x N (END on the last) -> decode; returns the image [H, W, 3] uint8."""
    inputs = generation_inputs(args)
    # The conditioning is whatever the served family's text_encoder outputs (its model metadata)
    conditioning = [output.name for output in client.get_model_metadata("text_encoder").outputs]
    embeddings = infer(client, "text_encoder", inputs, conditioning)
    sequence_id = random.getrandbits(63) + 1
    finished = False
    try:
        first = {**inputs, **embeddings}
        started = infer(client, "denoise_step", first, ["num_steps"], sequence_id=sequence_id, sequence_start=True)
        num_steps = int(started["num_steps"].reshape(-1)[0])
        for index in range(num_steps):
            last = index == num_steps - 1
            step = {"step": np.array([[index]], dtype=np.int32)}
            result = infer(
                client,
                "denoise_step",
                step,
                ["latents" if last else "step_index"],
                sequence_id=sequence_id,
                sequence_end=last,
            )
            print(f"step {index + 1}/{num_steps}", file=sys.stderr, flush=True)
        finished = True
    finally:
        # Free the sequence at once: its state, and its slot in Triton's sequence batcher, which only an END
        # frees (a refused START took one too); otherwise both wait for the 600 s idle timeout.
        if not finished:
            abort = {"abort": np.array([[True]])}
            with contextlib.suppress(Exception):  # the original error is the one to report
                infer(client, "denoise_step", abort, [], sequence_id=sequence_id, sequence_end=True)
    image = infer(client, "vae_decode", {"latents": result["latents"]}, ["image"])["image"]
    return image[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--url", default="localhost:8001", help="gRPC endpoint")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int, default=0, help="a stage needs the same seed as txt2img to match it")
    parser.add_argument("--num-inference-steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--true-cfg-scale", type=float, help="QwenImage's true CFG (with --negative-prompt)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--out", type=Path, default=Path("stepwise.png"))
    args = parser.parse_args(argv)
    try:
        with grpcclient.InferenceServerClient(args.url) as client:
            image = run(client, args)
    except InferenceServerException as error:  # a refused input or an unreachable server: one line
        status = f" ({error.status()})" if error.status() else ""
        print(f"failed: {error.message()}{status}", file=sys.stderr)
        return 1
    Image.fromarray(image).save(args.out)
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
