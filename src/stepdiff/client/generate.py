#!/usr/bin/env python3
"""Generate images with stepdiff's ``txt2img`` model over HTTP or gRPC and save them as PNG.

python client/generate.py "a red panda on a tree branch" --seed 7 --num-inference-steps 30
python client/generate.py --prompts-file prompts.txt --protocol grpc --concurrency 4 --out outputs/
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException

# txt2img's optional inputs: flag name -> (Triton dtype, numpy dtype)
OPTIONAL_INPUTS = {
    "negative_prompt": ("BYTES", np.object_),
    "seed": ("INT64", np.int64),
    "num_inference_steps": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "true_cfg_scale": ("FP32", np.float32),
    "height": ("INT32", np.int32),
    "width": ("INT32", np.int32),
    "scheduler": ("BYTES", np.object_),
    "output_format": ("BYTES", np.object_),
    "jpeg_quality": ("INT32", np.int32),
    "lora": ("BYTES", np.object_),
    "lora_scale": ("FP32", np.float32),
}
LIST_INPUTS = ("lora", "lora_scale")  # one value per adapter: shape [n], repeatable flags
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


def client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def build_inputs(module, prompt: str, options: dict[str, object]) -> list:
    """tritonclient InferInput objects for one txt2img request (absent options are left out)."""
    values = {"prompt": ("BYTES", np.object_, prompt)}
    for name, (triton_type, numpy_type) in OPTIONAL_INPUTS.items():
        if options.get(name) is not None:
            values[name] = (triton_type, numpy_type, options[name])
    inputs = []
    for name, (triton_type, numpy_type, value) in values.items():
        items = list(value) if name in LIST_INPUTS else [value]
        data = np.array([item.encode() if isinstance(item, str) else item for item in items], dtype=numpy_type)
        tensor = module.InferInput(name, [len(items)], triton_type)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def infer_options(module, timeout: float | None, request_id: str) -> dict[str, object]:
    """``infer`` keyword arguments: the gRPC deadline (an HTTP client has none per call) and the request id."""
    options: dict[str, object] = {"request_id": request_id}
    if timeout and module.__name__.endswith("grpc"):
        options["client_timeout"] = timeout
    return options


def generate_file(
    client, module, prompt: str, options: dict[str, object], timeout: float | None = None, request_id: str = ""
) -> tuple[bytes, int, float]:
    """One txt2img call that returns an encoded file: (PNG or JPEG bytes, seed used, seconds).

    ``options["output_format"]`` picks png (the default here) or jpeg. ``timeout`` is a gRPC deadline
    (the server stops the generation when it passes); an HTTP client takes its timeout at construction
    (``network_timeout``). ``request_id`` is Triton's request id: the server's log names a cancelled
    request by it.
    """
    started = time.perf_counter()
    options = {**options, "output_format": options.get("output_format") or "png"}
    result = client.infer(
        "txt2img", build_inputs(module, prompt, options), **infer_options(module, timeout, request_id)
    )
    return result.as_numpy("image_bytes")[0], int(result.as_numpy("seed")[0]), time.perf_counter() - started


def generate(
    client, module, prompt: str, options: dict[str, object], timeout: float | None = None, request_id: str = ""
) -> tuple[np.ndarray, int, float]:
    """One txt2img call: (image [H, W, 3] uint8, seed used, seconds), sent as raw pixels unless
    ``options["output_format"]`` asks for a file (decoded here). ``timeout`` and ``request_id`` as in
    ``generate_file``."""
    if options.get("output_format") in ("png", "jpeg"):
        encoded, seed, seconds = generate_file(client, module, prompt, options, timeout, request_id)
        return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")), seed, seconds
    started = time.perf_counter()
    result = client.infer(
        "txt2img", build_inputs(module, prompt, options), **infer_options(module, timeout, request_id)
    )
    return result.as_numpy("image"), int(result.as_numpy("seed")[0]), time.perf_counter() - started


def encoded_file(image: np.ndarray, output_format: str | None, jpeg_quality: int | None) -> bytes:
    """Pixels the server sent raw (``--output-format raw``, ``--stream``) as the file the user asked for:
    a JPEG for ``jpeg`` (quality as the server's default), else a PNG, which keeps every pixel."""
    encoded = io.BytesIO()
    if output_format == "jpeg":
        Image.fromarray(image).save(encoded, format="JPEG", quality=jpeg_quality or 90)
    else:
        Image.fromarray(image).save(encoded, format="PNG")
    return encoded.getvalue()


def generate_streaming(
    url: str,
    prompt: str,
    options: dict[str, object],
    preview_every: int = 0,
    preview_dir: Path | None = None,
    request_id: str = "",
) -> tuple[np.ndarray | None, int, float]:
    """One txt2img_stream call over gRPC with a tqdm bar per step; saves previews when asked.

    Returns (image or None when the stream ended without one, seed, seconds).
    """
    import queue

    import tritonclient.grpc as grpcclient
    from tqdm import tqdm

    inputs = build_inputs(grpcclient, prompt, {**options, "output_format": None})  # raw pixels: saved as PNG here
    if preview_every:
        tensor = grpcclient.InferInput("preview_every", [1], "INT32")
        tensor.set_data_from_numpy(np.array([preview_every], dtype=np.int32))
        inputs.append(tensor)
    responses: queue.Queue = queue.Queue()
    started = time.perf_counter()
    with grpcclient.InferenceServerClient(url) as client, tqdm(desc=slug(prompt), unit="step") as bar:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("txt2img_stream", inputs, request_id=request_id, enable_empty_final_response=True)
        try:
            while True:
                result, error = responses.get()
                if error is not None:
                    raise error
                step = result.as_numpy("step")
                if step is not None:
                    bar.total = int(result.as_numpy("num_steps")[0])
                    bar.update(int(step[0]) - bar.n)
                    preview = result.as_numpy("preview")
                    if preview is not None and preview_dir is not None:
                        Image.fromarray(preview).save(preview_dir / f"{slug(prompt)}-step{int(step[0]):03d}.png")
                if result.get_response().parameters["triton_final_response"].bool_param:
                    image, seed = result.as_numpy("image"), result.as_numpy("seed")
                    return image, int(seed[0]) if seed is not None else -1, time.perf_counter() - started
        finally:
            client.stop_stream()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompt(s); an empty string is an unconditional generation")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--url", default=None, help="host:port (default localhost:8000 for http, :8001 for grpc)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNG files")
    parser.add_argument("--timeout", type=float, default=None, help="client-side timeout per request, seconds")
    parser.add_argument(
        "--request-id",
        default="",
        help="Triton's request id, by which the server's log names a cancelled request "
        "(several prompts: ID-1, ID-2, ...)",
    )
    parser.add_argument("--stream", action="store_true", help="use txt2img_stream over gRPC: a progress bar per image")
    parser.add_argument(
        "--preview-every", type=int, default=0, help="with --stream: save a latent preview every K steps"
    )
    for name, (triton_type, _) in OPTIONAL_INPUTS.items():
        kind = {"BYTES": str, "INT64": int, "INT32": int, "FP32": float}[triton_type]
        repeated = {"action": "append", "help": f"txt2img input {name}, one per adapter (repeat)"}
        single = {"help": f"txt2img input {name}"}
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=None, **(repeated if name in LIST_INPUTS else single)
        )
    args = parser.parse_args(argv)
    if args.prompts_file:
        args.prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not args.prompts:
        parser.error("give at least one prompt (or --prompts-file)")
    if args.stream:
        args.protocol = "grpc"
    args.url = args.url or f"localhost:{DEFAULT_PORTS[args.protocol]}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    module = client_module(args.protocol)
    options = {name: getattr(args, name) for name in OPTIONAL_INPUTS}
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with module.InferenceServerClient(args.url) as probe:
            ready = probe.is_model_ready("txt2img")
    except Exception as error:  # noqa: BLE001 - connection errors come in several types
        print(f"error: cannot reach the server at {args.url} over {args.protocol}: {error}", file=sys.stderr)
        return 1
    if not ready:
        print(f"error: txt2img is not ready on {args.url}", file=sys.stderr)
        return 1
    local = threading.local()  # tritonclient's HTTP client must stay on the thread that made it

    def one(prompt: str, request_id: str) -> bool:
        if not hasattr(local, "client"):
            http_timeout = {"network_timeout": args.timeout} if args.timeout and args.protocol == "http" else {}
            local.client = module.InferenceServerClient(args.url, **http_timeout)
        output_format = options.get("output_format")
        try:
            if args.stream:  # the stream sends raw pixels: the file is encoded here
                image, seed, seconds = generate_streaming(
                    args.url, prompt, options, args.preview_every, args.out, request_id
                )
                if image is None:
                    print(f"failed: {prompt!r}: the stream ended without an image", file=sys.stderr)
                    return False
            elif output_format == "raw":
                image, seed, seconds = generate(local.client, module, prompt, options, args.timeout, request_id)
            else:  # the server encodes the file: a few hundred KB instead of megabytes of pixels
                encoded, seed, seconds = generate_file(local.client, module, prompt, options, args.timeout, request_id)
        except InferenceServerException as error:
            status = f" ({error.status()})" if error.status() else ""
            print(f"failed: {prompt!r}: {error.message()}{status}", file=sys.stderr)
            return False
        if args.stream or output_format == "raw":
            encoded = encoded_file(image, output_format, options.get("jpeg_quality"))
        extension = "jpg" if output_format == "jpeg" else "png"
        path = args.out / f"{slug(prompt)}-{seed}.{extension}"
        path.write_bytes(encoded)
        width, height = Image.open(io.BytesIO(encoded)).size
        print(f"{seconds:7.2f} s  {width}x{height}  seed {seed}  {path}", flush=True)
        return True

    if not args.request_id or len(args.prompts) == 1:
        request_ids = [args.request_id] * len(args.prompts)
    else:
        request_ids = [f"{args.request_id}-{number}" for number in range(1, len(args.prompts) + 1)]
    with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        ok = list(pool.map(one, args.prompts, request_ids))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
