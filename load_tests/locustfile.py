"""Locust users for stepdiff's txt2img, over Triton's HTTP and gRPC endpoints via tritonclient.

    locust -f load_tests/locustfile.py --headless -u 8 -r 2 -t 2m \\
        --host http://localhost:8000 --grpc-url localhost:8001 --csv results/locust --html results/locust.html

Each request draws a prompt, size, step count, scheduler and seed from a small weighted mix
(tune it with --steps / --sizes for the pipeline you serve). With --cancel-fraction, that share of
gRPC requests is given a client deadline (--cancel-after) that ends it mid-way: the server stops the
generation at the next step; such requests count as successes when the deadline cut them off.
Requests show up in locust's statistics as "txt2img <protocol> <height>x<width>", with the latency
as response time and the image size in bytes as response length; errors count as failures, named by
their Triton status.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task

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


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--grpc-url", default="localhost:8001", help="Triton gRPC endpoint for the gRPC user")
    parser.add_argument("--steps", default="4,8,12", help="num_inference_steps values to draw from")
    parser.add_argument("--sizes", default="64x64,64x48", help="HEIGHTxWIDTH values to draw from")
    parser.add_argument(
        "--cancel-fraction",
        type=float,
        default=0.0,
        help="share of requests cancelled mid-way (a client deadline of --cancel-after seconds)",
    )
    parser.add_argument("--cancel-after", type=float, default=0.03, help="seconds before a cancelled request gives up")


def weighted(choices: list[tuple[str, int]]) -> str:
    values, weights = zip(*choices, strict=True)
    return random.choices(values, weights)[0]


class Txt2ImgUser(User):
    """Sends txt2img requests back to back (with a short think time) over one protocol."""

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

    @task
    def txt2img(self) -> None:
        height, width = random.choice(self.sizes)
        options = {
            "seed": random.randrange(2**31),
            "num_inference_steps": random.choice(self.steps),
            "height": height,
            "width": width,
            "scheduler": weighted(SCHEDULERS),
        }
        parsed = self.environment.parsed_options
        cancel = self.protocol == "grpc" and random.random() < parsed.cancel_fraction  # gRPC deadlines cancel
        name = f"txt2img {self.protocol} {height}x{width}" + (" cancelled" if cancel else "")
        started = time.perf_counter()
        image, exception = None, None
        try:
            timeout = parsed.cancel_after if cancel else None
            image, _, _ = txt2img_client.generate(self.client, self.module, weighted(PROMPTS), options, timeout)
            if cancel:
                exception = RuntimeError(f"finished within the {parsed.cancel_after} s deadline; nothing was cancelled")
        except Exception as error:  # noqa: BLE001 - every failure is reported to locust
            if not ((cancel and "deadline" in str(error).lower()) or (cancel and "timed out" in str(error).lower())):
                exception = error
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0 if image is None else image.nbytes,
            exception=exception,
            context={"options": options},
        )


class HttpUser(Txt2ImgUser):
    protocol = "http"


class GrpcUser(Txt2ImgUser):
    protocol = "grpc"
