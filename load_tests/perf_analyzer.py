#!/usr/bin/env python3
"""Run Triton's perf_analyzer against txt2img (concurrency sweep) and denoise_step (sequence mode).

    python load_tests/perf_analyzer.py --url localhost:8001 --out results/perf --concurrency 1:8:1

Writes the input-data JSON it used, perf_analyzer's CSV per model and its console output. The
denoise_step run replays whole sequences: a START call with the generation inputs and real
embeddings (fetched once from text_encoder), then N calls without inputs, each taking the next step
(no "step" index, since perf_analyzer ends unfinished sequences early with their last request);
perf_analyzer sets START/END and a fresh sequence id itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

PROMPTS = ["a photo of a cat", "a red panda on a tree branch", "an astronaut riding a horse on mars"]


def perf_analyzer_command() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary (tritonclient's wheel ships it) and an environment that finds libcudart."""
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(binary).exists():
        raise SystemExit("perf_analyzer not found: pip install 'tritonclient[all]==2.51.0'")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        libdir = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        pass  # a system CUDA runtime may be on the library path already
    missing = missing_libraries(
        subprocess.run(["ldd", binary], capture_output=True, text=True, env=env, check=False).stdout
    )
    if missing:
        hint = " (Debian/Ubuntu: apt-get install libb64-0d)" if "libb64.so.0d" in missing else ""
        raise SystemExit(f"perf_analyzer cannot start: this machine lacks {', '.join(missing)}{hint}")
    return binary, env


def missing_libraries(ldd_output: str) -> list[str]:
    """The shared libraries ``ldd`` reports as ``not found``."""
    return [line.split("=>")[0].strip() for line in ldd_output.splitlines() if "=> not found" in line]


def generation_inputs(args: argparse.Namespace, prompt: str, seed: int) -> dict[str, list]:
    return {
        "prompt": [prompt],
        "seed": [seed],
        "num_inference_steps": [args.steps],
        "guidance_scale": [args.guidance_scale],
        "height": [args.height],
        "width": [args.width],
        "scheduler": [args.scheduler],
    }


def txt2img_data(args: argparse.Namespace) -> dict:
    return {"data": [generation_inputs(args, prompt, seed) for seed, prompt in enumerate(PROMPTS)]}


def denoise_sequence_data(args: argparse.Namespace) -> dict:
    """One START + N step calls per sequence, with embeddings computed by the running text_encoder."""
    sequences = []
    with grpcclient.InferenceServerClient(args.url) as client:
        conditioning = [output.name for output in client.get_model_metadata("text_encoder").outputs]
        for seed, prompt in enumerate(PROMPTS):
            start = generation_inputs(args, prompt, seed)
            tensors = []
            for name, value in start.items():
                array = np.array([value], dtype=np.object_ if isinstance(value[0], str) else None)
                if array.dtype == np.object_:
                    array = np.array([[v.encode() for v in value]], dtype=np.object_)
                elif array.dtype == np.int64 and name != "seed":
                    array = array.astype(np.int32)
                elif array.dtype == np.float64:
                    array = array.astype(np.float32)
                tensor = grpcclient.InferInput(
                    name,
                    list(array.shape),
                    "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype),
                )
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            outputs = [grpcclient.InferRequestedOutput(name) for name in conditioning]
            result = client.infer("text_encoder", tensors, outputs=outputs)
            for name in conditioning:
                embedding = result.as_numpy(name)
                if embedding is not None:
                    start[name] = {"content": embedding[0].ravel().tolist(), "shape": list(embedding.shape[1:])}
            steps = [{} for _ in range(args.steps)]
            sequences.append([start, *steps])
    return {"data": sequences}


def run(binary: str, env: dict[str, str], arguments: list[str], log: Path) -> int:
    command = [binary, *arguments]
    print("$", " ".join(command), flush=True)
    with open(log, "w") as handle:
        completed = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=1800)
    print(log.read_text()[-1500:])
    return completed.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint")
    parser.add_argument("--out", type=Path, default=Path("results/perf_analyzer"))
    parser.add_argument("--concurrency", default="1:4:1", help="perf_analyzer --concurrency-range for txt2img")
    parser.add_argument("--sequences", default="1:4:1", help="concurrent sequences for denoise_step")
    parser.add_argument("--measurement-interval", type=int, default=4000, help="milliseconds per measurement window")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--scheduler", default="DDIMScheduler", help="one with exactly --steps timesteps (not PNDM)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    binary, env = perf_analyzer_command()
    # 10 windows (perf_analyzer's default) to stabilize: 5 were too few for denoise_step at 2 sequences on a
    # busy 2-core CI machine, which then left that row out
    common = ["-u", args.url, "-i", "grpc", "-p", str(args.measurement_interval), "--max-trials", "10", "-s", "50"]
    (args.out / "txt2img_input.json").write_text(json.dumps(txt2img_data(args)))
    (args.out / "denoise_step_input.json").write_text(json.dumps(denoise_sequence_data(args)))
    txt2img = run(
        binary,
        env,
        [
            "-m",
            "txt2img",
            *common,
            "--input-data",
            str(args.out / "txt2img_input.json"),
            "--concurrency-range",
            args.concurrency,
            "-f",
            str(args.out / "txt2img.csv"),
        ],
        args.out / "txt2img.log",
    )
    denoise = run(
        binary,
        env,
        [
            "-m",
            "denoise_step",
            *common,
            "--input-data",
            str(args.out / "denoise_step_input.json"),
            "--concurrency-range",
            args.sequences,
            "--sequence-id-range",
            "1000000:2000000",
            "-f",
            str(args.out / "denoise_step.csv"),
        ],
        args.out / "denoise_step.log",
    )
    return txt2img or denoise


if __name__ == "__main__":
    sys.exit(main())
