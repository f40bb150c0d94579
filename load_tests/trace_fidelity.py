#!/usr/bin/env python3
"""Where does a served image first differ from in-process diffusers? Stage by stage, on one device.

In-process: the stock ``StableDiffusionPipeline`` records its prompt embeddings, the latents after every
step (``callback_on_step_end``) and the image. Through the server (step API over gRPC): ``text_encoder``'s
embeddings, ``denoise_step``'s latents after every step (asked for on each call), ``vae_decode`` of the
served latents and of the in-process latents. Each stage is compared with its in-process twin and the
first that differs is named.

    python load_tests/trace_fidelity.py --pipeline build/sd15-size --device cuda --dtype float16 --out results/tmp/trace
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import numpy as np
import torch
from bench_batching import PROMPT, sd_arguments, start_server  # also puts client/ and src/ on sys.path

from stepdiff.settings import torch_dtype


def compare(name: str, served: np.ndarray, local: np.ndarray) -> dict:
    served, local = np.asarray(served), np.asarray(local)
    same_shape = served.shape == local.shape
    diff = np.abs(served.astype(np.float64) - local.astype(np.float64)) if same_shape else np.array([np.inf])
    row = {
        "stage": name,
        "identical": bool(same_shape and np.array_equal(served, local)),
        "max_abs_diff": float(diff.max()),
        "differing": int((diff > 0).sum()),
    }
    print(
        f"{name:28s} identical={row['identical']!s:5s} max|diff|={row['max_abs_diff']:.3g} "
        f"differing={row['differing']}",
        flush=True,
    )
    return row


def in_process(args, device, dtype) -> dict:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(args.pipeline), dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, device, 1, args.guidance > 1, None)
    steps = []

    def on_step_end(pipeline, index, timestep, tensors):
        steps.append(tensors["latents"].float().cpu().numpy())
        return tensors

    image = pipe(
        PROMPT,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.size,
        width=args.size,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
        callback_on_step_end=on_step_end,
    ).images[0]
    result = {
        "prompt_embeds": cond.float().cpu().numpy(),
        "negative_prompt_embeds": uncond.float().cpu().numpy() if uncond is not None else None,
        "steps": steps,
        "image": (image * 255).round().astype(np.uint8),
    }
    del pipe
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return result


def served(args, grpc_url: str, local_final: np.ndarray) -> dict:
    import stepwise  # client/stepwise.py (bench_batching put client/ on sys.path)
    import tritonclient.grpc as grpcclient

    options = argparse.Namespace(
        prompt=PROMPT,
        negative_prompt=None,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        true_cfg_scale=None,
        height=args.size,
        width=args.size,
        scheduler=args.scheduler,
    )
    with grpcclient.InferenceServerClient(grpc_url) as client:
        inputs = stepwise.generation_inputs(options)
        conditioning = [output.name for output in client.get_model_metadata("text_encoder").outputs]
        embeddings = stepwise.infer(client, "text_encoder", inputs, conditioning)
        sequence = random.getrandbits(63) + 1
        started = stepwise.infer(
            client, "denoise_step", {**inputs, **embeddings}, ["num_steps"], sequence_id=sequence, sequence_start=True
        )
        steps = []
        num_steps = int(started["num_steps"].reshape(-1)[0])  # PNDM takes one more than asked
        for index in range(num_steps):
            last = index == num_steps - 1
            step = {"step": np.array([[index]], dtype=np.int32)}
            steps.append(
                stepwise.infer(client, "denoise_step", step, ["latents"], sequence_id=sequence, sequence_end=last)[
                    "latents"
                ]
            )
        image = stepwise.infer(client, "vae_decode", {"latents": steps[-1]}, ["image"])["image"][0]
        local_latents_image = stepwise.infer(
            client, "vae_decode", {"latents": local_final.astype(np.float32)}, ["image"]
        )["image"][0]
    return {"embeddings": embeddings, "steps": steps, "image": image, "image_of_local_latents": local_latents_image}


def main() -> int:
    parser = sd_arguments(__doc__)
    parser.add_argument("--scheduler", default="EulerDiscreteScheduler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=18300)
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    local = in_process(args, device, dtype)
    process, grpc_url, _ = start_server(args)
    try:
        remote = served(args, grpc_url, local["steps"][-1])
    finally:
        process.stop()
    rows = [compare("prompt_embeds", remote["embeddings"]["prompt_embeds"], local["prompt_embeds"])]
    if local["negative_prompt_embeds"] is not None:
        rows.append(
            compare(
                "negative_prompt_embeds",
                remote["embeddings"]["negative_prompt_embeds"],
                local["negative_prompt_embeds"],
            )
        )
    rows += [
        compare(f"latents after step {i + 1}", served, in_process)
        for i, (served, in_process) in enumerate(zip(remote["steps"], local["steps"], strict=True))
    ]
    rows.append(compare("vae_decode(in-process latents)", remote["image_of_local_latents"], local["image"]))
    rows.append(compare("image", remote["image"], local["image"]))
    first = next((row["stage"] for row in rows if not row["identical"]), None)
    print(f"first stage that differs: {first}", flush=True)
    (args.out / "trace.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "first_difference": first}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
