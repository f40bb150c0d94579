"""Send COUNT denoise_step STARTs that denoise_step refuses (no prompt: INVALID_ARG) and never END them,
then one txt2img generation, and print how long each part took.

    python results/2026-11-22-cpu-sequence-slots/refused_starts.py 127.0.0.1:8001 1100
"""

import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client"))
import generate  # client/generate.py


def refused_start(client: grpcclient.InferenceServerClient, sequence_id: int) -> str:
    step = grpcclient.InferInput("step", [1, 1], "INT32")
    step.set_data_from_numpy(np.array([[0]], dtype=np.int32))
    try:
        client.infer("denoise_step", [step], sequence_id=sequence_id, sequence_start=True)
    except Exception as error:  # noqa: BLE001 - the refusal is the point
        return str(error)[:120]
    return "accepted"


def main(url: str, count: int) -> None:
    client = grpcclient.InferenceServerClient(url)
    began = time.perf_counter()
    answers = {refused_start(client, 1000 + index) for index in range(count)}
    print(f"{count} refused STARTs in {time.perf_counter() - began:.1f} s: {answers}")
    began = time.perf_counter()
    options = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1}
    generate.generate(client, grpcclient, "a cat", options)
    print(f"then one txt2img: {time.perf_counter() - began:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
