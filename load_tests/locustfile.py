"""Locust users for stepdiff's txt2img, over Triton's HTTP and gRPC endpoints via tritonclient.

    locust -f load_tests/locustfile.py --headless -u 8 -r 2 -t 2m \\
        --host http://localhost:8000 --grpc-url localhost:8001 --csv results/locust --html results/locust.html

Each request draws a prompt, size, step count, scheduler and seed from a small weighted mix
(tune it with --steps / --sizes for the pipeline you serve). With --cancel-fraction, that share of
gRPC requests is given a client deadline (--cancel-after) that ends it mid-way: the server stops the
generation at the next step; such requests count as successes when the deadline cut them off.
StreamUser sends txt2img_stream requests over gRPC streaming, checks that every step is reported
in order and that the last response carries the image; --cancel-fraction of its streams are
cancelled by the client after a random step in the first quarter.
Requests show up in locust's statistics as "<model> <protocol> <height>x<width>" (" cancelled" added
for those cut off), with the latency as response time and the image size in bytes as response length;
errors count as failures, named by their Triton status. Every request carries a request id (Triton's
``request_id``, also in the request event's context), by which the server's log names a cancellation.
"""

from __future__ import annotations

import itertools
import queue
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.exception import StopUser
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING

grpc_gevent.init_gevent()  # gRPC must cooperate with locust's gevent loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
import generate as txt2img_client  # noqa: E402

PROMPTS = [
    ("a photo of a cat", 4),
    ("a red panda sitting on a tree branch in a bamboo forest, soft focus background", 3),
    ("an astronaut riding a horse on the surface of Mars, cinematic lighting", 2),
    ("", 1),
]
SCHEDULERS = [("PNDMScheduler", 2), ("EulerAncestralDiscreteScheduler", 2), ("DPMSolverMultistepScheduler", 1)]
STREAM_TIMEOUT = 300  # seconds a stream may go without a response
REQUEST_IDS = (f"locust-{int(time.time())}-{number}" for number in itertools.count(1))  # unique per run


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--grpc-url", default="localhost:8001", help="Triton gRPC endpoint for the gRPC user")
    parser.add_argument("--steps", default="4,8,12", help="num_inference_steps values to draw from")
    parser.add_argument("--sizes", default="64x64,64x48", help="HEIGHTxWIDTH values to draw from")
    parser.add_argument(
        "--cancel-fraction",
        type=float,
        default=0.0,
        help="share of gRPC requests cancelled mid-way: txt2img by a client deadline of --cancel-after seconds, "
        "txt2img_stream by the client after a random step in the first quarter",
    )
    parser.add_argument("--cancel-after", type=float, default=0.03, help="seconds before a cancelled request gives up")


def stop_if_ending(user: User) -> None:
    """Stop ``user`` before it starts a request once locust has begun stopping the run. Locust kills a
    waiting user at once, but a user whose wait ends just then runs before the kill lands: it would send
    one more request and be killed with it in flight, a request cut off that no one records and that
    the server counts as cancelled."""
    runner = user.environment.runner
    if runner is not None and runner.state in (STATE_CLEANUP, STATE_STOPPING, STATE_STOPPED):
        raise StopUser


def weighted(choices: list[tuple[str, int]]) -> str:
    values, weights = zip(*choices, strict=True)
    return random.choices(values, weights)[0]


class GenerationUser(User):
    """Draws a request's options from the mix and reports each request to locust."""

    abstract = True
    protocol = "http"
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.module = txt2img_client.client_module(self.protocol)
        url = options.grpc_url if self.protocol == "grpc" else self.host.split("://", 1)[-1]
        self.client = self.module.InferenceServerClient(url)
        self.steps = [int(value) for value in options.steps.split(",")]
        self.sizes = [tuple(int(side) for side in value.split("x")) for value in options.sizes.split(",")]

    def on_stop(self) -> None:
        self.client.close()

    def draw(self, model: str) -> tuple[dict, str, bool, str]:
        """(txt2img options, request name, whether to cancel it, request id); stops the user instead
        once the run is ending."""
        stop_if_ending(self)
        height, width = random.choice(self.sizes)
        options = {
            "seed": random.randrange(2**31),
            "num_inference_steps": random.choice(self.steps),
            "height": height,
            "width": width,
            "scheduler": weighted(SCHEDULERS),
        }
        cancel = self.protocol == "grpc" and random.random() < self.environment.parsed_options.cancel_fraction
        name = f"{model} {self.protocol} {height}x{width}" + (" cancelled" if cancel else "")
        return options, name, cancel, next(REQUEST_IDS)

    def report(
        self, name: str, request_id: str, started: float, options: dict, image, exception: Exception | None
    ) -> None:
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0 if image is None else image.nbytes,
            exception=exception,
            context={"options": options, "request_id": request_id},
        )


class Txt2ImgUser(GenerationUser):
    """Sends txt2img requests back to back (with a short think time) over one protocol."""

    abstract = True

    @task
    def txt2img(self) -> None:
        options, name, cancel, request_id = self.draw("txt2img")
        parsed = self.environment.parsed_options
        started = time.perf_counter()
        image, exception = None, None
        try:
            timeout = parsed.cancel_after if cancel else None  # gRPC deadlines cancel
            prompt = weighted(PROMPTS)
            image, _, _ = txt2img_client.generate(self.client, self.module, prompt, options, timeout, request_id)
            if cancel:
                exception = RuntimeError(f"finished within the {parsed.cancel_after} s deadline; nothing was cancelled")
        except Exception as error:  # noqa: BLE001 - every failure is reported to locust
            if not ((cancel and "deadline" in str(error).lower()) or (cancel and "timed out" in str(error).lower())):
                exception = error
        self.report(name, request_id, started, options, image, exception)


class HttpUser(Txt2ImgUser):
    protocol = "http"


class GrpcUser(Txt2ImgUser):
    protocol = "grpc"


class StreamUser(GenerationUser):
    """Sends txt2img_stream requests over gRPC streaming, one stream each; cancels some mid-way."""

    protocol = "grpc"

    @task
    def txt2img_stream(self) -> None:
        options, name, cancel, request_id = self.draw("txt2img_stream")
        cancel_at = random.randint(1, max(1, options["num_inference_steps"] // 4)) if cancel else None
        responses: queue.Queue = queue.Queue()
        started = time.perf_counter()
        image, exception = None, None
        try:
            self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
            inputs = txt2img_client.build_inputs(self.module, weighted(PROMPTS), options)
            self.client.async_stream_infer(
                "txt2img_stream", inputs, request_id=request_id, enable_empty_final_response=True
            )
            image = self.follow(responses, cancel_at)
            if image is not None and image.shape != (options["height"], options["width"], 3):
                raise RuntimeError(f"image of shape {image.shape}")
        except Exception as error:  # noqa: BLE001 - every failure is reported to locust
            exception = error
        finally:
            self.client.stop_stream()
        self.report(name, request_id, started, options, image, exception)

    def follow(self, responses: queue.Queue, cancel_at: int | None):
        """Reads the stream: steps 1..num_steps in order, then the image; None once cancelled after ``cancel_at``."""
        done, total = 0, None  # num_steps is the scheduler's count (PNDM's is one more than requested)
        while True:
            result, error = responses.get(timeout=STREAM_TIMEOUT)
            if error is not None:
                raise error
            step = result.as_numpy("step")
            if step is not None:
                progress = (int(step[0]), int(result.as_numpy("num_steps")[0]))
                if progress != (done + 1, total or progress[1]):
                    raise RuntimeError(f"step {progress[0]} of {progress[1]} after step {done} of {total}")
                done, total = progress
                if done == cancel_at:
                    self.client.stop_stream(cancel_requests=True)
                    return None
            if result.get_response().parameters["triton_final_response"].bool_param:
                if done != total or result.as_numpy("image") is None:
                    raise RuntimeError(f"final response after step {done} of {total}, image missing or early")
                return result.as_numpy("image")
