"""An OpenAI-compatible images API in front of ``txt2img``: ``POST /v1/images/generations``, ``GET /v1/models``.

``stepdiff serve --openai-port PORT`` runs it in the launcher's process: a Starlette app served by uvicorn
from a thread with its own event loop. Each image is one ``txt2img`` call over gRPC
(``tritonclient.grpc.aio``) with ``output_format`` png; the ``n`` images of a request are sent at once,
so their steps batch in ``denoise_step``. When the HTTP client goes away, the calls are cancelled (gRPC
cancellation) and ``txt2img`` stops those generations at their next step. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcclient
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive
from tritonclient.utils import InferenceServerException

from .params import SEED_LIMIT
from .server import LaunchError, TritonProcess

MAX_IMAGES = 10  # n, as OpenAI allows
STRING, INTEGER, NUMBER = ((str,), "a string"), ((int,), "an integer"), ((int, float), "a number")
# Request fields handed to txt2img as inputs of the same name: field -> (Triton type, accepted JSON type)
TXT2IMG_FIELDS: dict[str, tuple[str, tuple[tuple[type, ...], str]]] = {
    "negative_prompt": ("BYTES", STRING),
    "seed": ("INT64", INTEGER),
    "num_inference_steps": ("INT32", INTEGER),
    "guidance_scale": ("FP32", NUMBER),
    "true_cfg_scale": ("FP32", NUMBER),
    "scheduler": ("BYTES", STRING),
}
# List fields (one value or a JSON list) handed to txt2img as inputs of dims [-1]: the LoRA adapters
LIST_FIELDS: dict[str, tuple[str, tuple[tuple[type, ...], str]]] = {
    "lora": ("BYTES", STRING),
    "lora_scale": ("FP32", NUMBER),
}
NUMPY_TYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT32 = range(-(2**31), 2**31)
# OpenAI fields that only identify the end user (abuse monitoring): accepted and ignored.
IGNORED_FIELDS = ("user", "safety_identifier")
ACCEPTED_FIELDS = (
    "model",
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    *IGNORED_FIELDS,
    *TXT2IMG_FIELDS,
    *LIST_FIELDS,
)
SIZE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")  # ASCII digits: \d also matches other scripts' digits
# txt2img's messages start with the input they are about: "height=60 is not ...", "prompt: ...",
# "height x width = ...".
MESSAGE_FIELD = re.compile(r"(\w+)(?:=|:| x )")
HTTP_STATUS = {"StatusCode.INVALID_ARGUMENT": 400, "StatusCode.UNAVAILABLE": 503}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; the response goes nowhere


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; ``param`` names the request field at fault, if any."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> Response:
        """The error as JSON, non-ASCII text escaped: a message quoting the request (a field name, a
        value) renders even where the request held a lone surrogate, which UTF-8 cannot encode."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return Response(json.dumps({"error": body}), status_code=self.status, media_type="application/json")


def invalid(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param, code)


@dataclass(frozen=True)
class ImageRequest:
    """A validated ``/v1/images/generations`` body: n txt2img calls with these inputs."""

    prompt: str
    n: int = 1
    size: tuple[int, int] | None = None  # (width, height); None: the pipeline's default
    inputs: dict[str, Any] = field(default_factory=dict)  # txt2img inputs from TXT2IMG_FIELDS
    lists: dict[str, list[Any]] = field(default_factory=dict)  # txt2img inputs from LIST_FIELDS

    def txt2img_inputs(self, index: int) -> list[grpcclient.InferInput]:
        """The inputs of the ``index``-th image: a given seed counts up, seed + index."""
        values: dict[str, tuple[str, list[Any]]] = {
            "prompt": ("BYTES", [self.prompt]),
            "output_format": ("BYTES", ["png"]),
        }
        for name, value in self.inputs.items():
            values[name] = (TXT2IMG_FIELDS[name][0], [value + index if name == "seed" else value])
        for name, items in self.lists.items():
            values[name] = (LIST_FIELDS[name][0], items)
        if self.size is not None:
            values["width"] = ("INT32", [self.size[0]])
            values["height"] = ("INT32", [self.size[1]])
        tensors = []
        for name, (triton_type, items) in values.items():
            tensor = grpcclient.InferInput(name, [len(items)], triton_type)
            data = [item.encode() if isinstance(item, str) else item for item in items]
            tensor.set_data_from_numpy(np.array(data, dtype=NUMPY_TYPES[triton_type]))
            tensors.append(tensor)
        return tensors


def typed(body: Mapping[str, Any], name: str, json_type: tuple[tuple[type, ...], str]) -> Any:
    """Field ``name`` when present and not null, checked against ``json_type`` (a bool is not a number
    here, nor one beyond float32's range: txt2img's numbers are float32)."""
    value = body.get(name)
    if value is not None:
        check_type(name, value, json_type)
    return value


def typed_list(body: Mapping[str, Any], name: str, json_type: tuple[tuple[type, ...], str]) -> list[Any] | None:
    """Field ``name`` as a list: one value or a JSON list of them, each checked against ``json_type``."""
    value = body.get(name)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    for item in items:
        check_type(name, item, json_type, " or a list of them")
    return items


def check_type(name: str, value: Any, json_type: tuple[tuple[type, ...], str], plural: str = "") -> None:
    types, description = json_type
    if isinstance(value, bool) or not isinstance(value, types):
        raise invalid(name, f"{name}: expected {description}{plural}, got {json.dumps(value)}", "invalid_type")
    if isinstance(value, str) and not is_unicode_text(value):
        raise invalid(name, f"{name}: not valid Unicode text (a lone surrogate escape such as \\ud800)")
    if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
        raise invalid(name, f"{name}={value} is out of range: not a finite 32-bit float")


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (JSON's ``\\ud800`` escapes decode to lone surrogates, which do not)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"WIDTHxHEIGHT"`` in pixels, or None for absent / ``auto`` (the pipeline's default). txt2img checks
    the sides (multiples of the family's size multiple, at most ``max_pixels``)."""
    if size is None or size == "auto":
        return None
    match = SIZE.fullmatch(size)
    if match is None:
        raise invalid("size", f"size={size!r} is not WIDTHxHEIGHT in pixels (e.g. 512x512) or auto")
    return int(match.group(1)), int(match.group(2))


def parse_image_request(body: object, model_id: str) -> ImageRequest:
    """Validate a ``/v1/images/generations`` body; errors name the field and what is allowed.

    An unknown ``model`` is 404 ``model_not_found``, as OpenAI answers it (the openai client raises
    NotFoundError): the request is well formed, the model it names is not served here. Ranges of the
    txt2img inputs (steps, guidance, size multiples, ...) are txt2img's own checks, answered as 400.
    """
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    for name in body:
        if name not in ACCEPTED_FIELDS:
            raise invalid(
                name,
                f"{name}: not supported by this server (accepted: {', '.join(ACCEPTED_FIELDS)})",
                "unknown_parameter",
            )
    model = typed(body, "model", STRING)
    if model not in (None, model_id):
        raise OpenAIError(
            404, f"model {model!r} is not served here; this server serves {model_id!r}", "model", "model_not_found"
        )
    prompt = typed(body, "prompt", STRING)
    if prompt is None:
        raise invalid(
            "prompt", "prompt: required field is missing (an empty string is allowed)", "missing_required_parameter"
        )
    n = typed(body, "n", INTEGER)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES:
        raise invalid("n", f"n={n} is out of range: allowed 1..{MAX_IMAGES}")
    response_format = typed(body, "response_format", STRING)
    if response_format == "url":
        raise invalid(
            "response_format",
            "response_format='url' is not supported: this server stores no images to link to; use b64_json "
            "(the default), which returns each PNG in data[].b64_json",
            "unsupported_value",
        )
    if response_format not in (None, "b64_json"):
        raise invalid("response_format", f"response_format={response_format!r}: allowed b64_json")
    output_format = typed(body, "output_format", STRING)
    if output_format not in (None, "png"):
        raise invalid("output_format", f"output_format={output_format!r}: allowed png")
    size = parse_size(typed(body, "size", STRING))
    inputs = {}
    for name, (_, json_type) in TXT2IMG_FIELDS.items():
        value = typed(body, name, json_type)
        if value is not None:
            inputs[name] = value
    lists = {}
    for name, (_, json_type) in LIST_FIELDS.items():
        items = typed_list(body, name, json_type)
        if items:
            lists[name] = items
    seed = inputs.get("seed")
    if seed is not None and not 0 <= seed <= SEED_LIMIT - n:
        raise invalid(
            "seed", f"seed={seed} is out of range: allowed 0..{SEED_LIMIT - n} (the n images use seed..seed+n-1)"
        )
    steps = inputs.get("num_inference_steps")
    if steps is not None and steps not in INT32:
        raise invalid("num_inference_steps", f"num_inference_steps={steps} is out of range (not a 32-bit integer)")
    return ImageRequest(prompt, n, size, inputs, lists)


def txt2img_error(error: InferenceServerException, images: ImageRequest) -> OpenAIError:
    """A txt2img error as OpenAI's: INVALID_ARG 400 naming the request field, UNAVAILABLE 503, others 500."""
    message = error.message() or str(error)
    status = HTTP_STATUS.get(str(error.status()), 500)
    if status != 400:
        return OpenAIError(status, message, code="unavailable" if status == 503 else "internal_error")
    match = MESSAGE_FIELD.match(message)
    name = match.group(1) if match else None
    if name in ("height", "width"):
        prefix = f"size={images.size[0]}x{images.size[1]}: " if images.size else ""
        return invalid("size", prefix + message)
    return invalid(name if name == "prompt" or name in TXT2IMG_FIELDS or name in LIST_FIELDS else None, message)


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int


async def generate(client: grpcclient.InferenceServerClient, images: ImageRequest) -> list[GeneratedImage]:
    """The n images, generated concurrently; the first error cancels the other calls."""
    calls = [asyncio.ensure_future(client.infer("txt2img", images.txt2img_inputs(i))) for i in range(images.n)]
    try:
        results = await asyncio.gather(*calls)
    except InferenceServerException as error:
        raise txt2img_error(error, images) from None
    finally:
        for call in calls:
            call.cancel()  # a no-op for calls that finished
    return [GeneratedImage(result.as_numpy("image_bytes")[0], int(result.as_numpy("seed")[0])) for result in results]


Result = TypeVar("Result")


async def unless_disconnected(work: Awaitable[Result], receive: Receive) -> Result | None:
    """``work``'s result, or None when the HTTP client disconnects first; ``work`` is then cancelled.

    Called after the body was read: from then on the server's ``receive`` returns only
    ``http.disconnect``, when the client's connection closes.
    """

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # the gRPC calls are cancelled once this returns
    return None if task.cancelled() else task.result()


async def image_generations(request: Request) -> Response:
    """``POST /v1/images/generations``."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as error:  # RecursionError: arrays or objects nested too deep
        raise invalid(None, f"the request body is not valid JSON: {error}", "invalid_json") from None
    images = parse_image_request(body, request.app.state.model_id)
    generated = await unless_disconnected(generate(request.app.state.triton, images), request.receive)
    if generated is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    width, height = Image.open(io.BytesIO(generated[0].png)).size
    data = [{"b64_json": base64.b64encode(image.png).decode("ascii"), "seed": image.seed} for image in generated]
    return JSONResponse(
        {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{width}x{height}"}
    )


def model_card(request: Request) -> dict[str, Any]:
    return {
        "id": request.app.state.model_id,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "stepdiff",
    }


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the served pipeline, whose id is ``--pipeline`` as given."""
    return JSONResponse({"object": "list", "data": [model_card(request)]})


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{id}`` (a hub id has a slash in it)."""
    if request.path_params["model"] != request.app.state.model_id:
        raise OpenAIError(404, f"model {request.path_params['model']!r} is not served here", "model", "model_not_found")
    return JSONResponse(model_card(request))


async def openai_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, OpenAIError)
    return error.response()


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (unknown path 404, wrong method 405) in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    code = "not_found" if error.status_code == 404 else "method_not_allowed" if error.status_code == 405 else None
    return OpenAIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=code).response()


async def internal_error(request: Request, error: Exception) -> Response:
    return OpenAIError(500, f"{type(error).__name__}: {error}", code="internal_error").response()


def create_app(model_id: str, grpc_url: str) -> Starlette:
    """The ASGI app; it opens its gRPC channel to Triton at ``grpc_url`` on startup and closes it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.triton = grpcclient.InferenceServerClient(grpc_url)
        try:
            yield
        finally:
            await app.state.triton.close()

    app = Starlette(
        routes=[
            Route("/v1/images/generations", image_generations, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        ],
        exception_handlers={OpenAIError: openai_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.model_id = model_id
    app.state.created = int(time.time())
    return app


class ImagesApiServer:
    """The API in ``stepdiff serve``: the port is bound at construction, before Triton starts, so a port in use
    fails at once; ``start`` serves it with uvicorn from a thread, ``stop`` ends that."""

    def __init__(self, port: int, model_id: str, grpc_url: str, host: str = "0.0.0.0"):
        try:
            self.socket = socket.create_server((host, port))
        except OSError as error:
            raise LaunchError(
                f"--openai-port {port} is not free ({os.strerror(error.errno)}): another server? Choose another port"
            ) from None
        self.port = port
        self.model_id = model_id
        config = uvicorn.Config(
            create_app(model_id, grpc_url),
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="openai-api")

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise LaunchError("the OpenAI images API did not start (its error is printed above)")
            time.sleep(0.05)
        print(f"stepdiff: OpenAI images API on http://localhost:{self.port}/v1 (model {self.model_id!r})", flush=True)

    def stop(self) -> None:
        """Finish the requests in flight (at most 5 s more), close the gRPC channel and the port."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join()
        self.socket.close()


def images_api(port: int | None, model_id: str, grpc_port: int) -> ImagesApiServer | None:
    """``stepdiff serve``'s OpenAI images API on ``port`` (None without a port), calling Triton on ``grpc_port``."""
    return None if port is None else ImagesApiServer(port, model_id, f"127.0.0.1:{grpc_port}")


@contextlib.contextmanager
def serving(api: ImagesApiServer | None, triton: TritonProcess) -> Iterator[None]:
    """Serve ``api`` (if any) while the block runs; ``triton`` is ready, and stopped if the API fails to start."""
    if api is None:
        yield
        return
    try:
        api.start()
    except BaseException:
        triton.stop()
        raise
    try:
        yield
    finally:
        api.stop()
