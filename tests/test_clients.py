"""client/generate.py and client/stepwise.py end to end against the real server."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
from conftest import REPO, free_ports
from PIL import Image

OPTIONS = [
    "--seed",
    "21",
    "--num-inference-steps",
    "6",
    "--height",
    "48",
    "--width",
    "64",
    "--scheduler",
    "EulerAncestralDiscreteScheduler",
]
SAME_OPTIONS = dict(seed=21, num_inference_steps=6, height=48, width=64, scheduler="EulerAncestralDiscreteScheduler")


def client(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "client" / script), *args], capture_output=True, text=True, timeout=300
    )


def test_stepwise_loop_gives_the_txt2img_image(server, tmp_path):
    for guidance in ("7.5", "1.0"):
        out = tmp_path / f"stepwise-{guidance}.png"
        result = client(
            "stepwise.py",
            "a red panda",
            "--url",
            server.grpc_url,
            "--negative-prompt",
            "blurry",
            "--guidance-scale",
            guidance,
            *OPTIONS,
            "--out",
            str(out),
        )
        assert result.returncode == 0, result.stderr
        assert "step 7/7" not in result.stderr and "step 6/6" in result.stderr
        expected, _ = server.txt2img(
            "a red panda",
            negative_prompt="blurry",
            guidance_scale=float(guidance),
            seed=21,
            num_inference_steps=6,
            height=48,
            width=64,
            scheduler="EulerAncestralDiscreteScheduler",
        )
        assert np.array_equal(np.asarray(Image.open(out)), expected)
    assert server.metric("stepdiff_active_sequences") == 0
    refused = client("stepwise.py", "a red panda", "--url", server.grpc_url, "--num-inference-steps", "0")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("failed: num_inference_steps=0 is out of range"), refused.stderr


def test_generate_saves_pngs_named_by_prompt_and_seed(server, tmp_path):
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        out = tmp_path / protocol
        result = client(
            "generate.py",
            "a photo of a cat",
            "",
            "--url",
            url,
            "--protocol",
            protocol,
            "--concurrency",
            "2",
            "--out",
            str(out),
            *OPTIONS,
        )
        assert result.returncode == 0, result.stderr
        saved = sorted(path.name for path in out.iterdir())
        assert saved == ["a-photo-of-a-cat-21.png", "empty-21.png"]
        image = np.asarray(Image.open(out / "a-photo-of-a-cat-21.png"))
        expected, _ = server.txt2img("a photo of a cat", **SAME_OPTIONS)
        assert np.array_equal(image, expected)
        assert result.stdout.count(" s  64x48  seed 21  ") == 2


def test_generate_reports_rejections_and_a_server_that_is_down(server, tmp_path):
    rejected = client("generate.py", "a cat", "--url", server.http_url, "--height", "50", "--out", str(tmp_path))
    assert rejected.returncode == 1
    assert "height=50 is not a multiple of 8" in rejected.stderr and "400" in rejected.stderr
    down = client("generate.py", "a cat", "--url", f"127.0.0.1:{free_ports(1)[0]}", "--out", str(tmp_path))
    assert down.returncode == 1 and "cannot reach the server" in down.stderr


def test_generate_writes_the_format_asked_for_from_raw_pixels_and_streams(server, tmp_path):
    """--output-format raw: the raw pixels as a PNG, the same image; --stream with jpeg: a JPEG file; a
    streamed request refused by the server: one line naming the field, no Python status None."""
    raw = client("generate.py", "a photo of a cat", "--url", server.http_url, "--output-format", "raw",
                 "--out", str(tmp_path / "raw"), *OPTIONS)  # fmt: skip
    assert raw.returncode == 0, raw.stderr
    expected, _ = server.txt2img("a photo of a cat", **SAME_OPTIONS)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "raw" / "a-photo-of-a-cat-21.png")), expected)
    jpeg = client("generate.py", "a photo of a cat", "--url", server.grpc_url, "--stream", "--output-format", "jpeg",
                  "--out", str(tmp_path / "jpeg"), *OPTIONS)  # fmt: skip
    assert jpeg.returncode == 0, jpeg.stderr
    assert Image.open(tmp_path / "jpeg" / "a-photo-of-a-cat-21.jpg").format == "JPEG"
    refused = client("generate.py", "a cat", "--url", server.grpc_url, "--stream", "--height", "50",
                     "--out", str(tmp_path / "refused"))  # fmt: skip
    assert refused.returncode == 1 and "failed: 'a cat': " in refused.stderr
    assert "height=50 is not a multiple of 8" in refused.stderr and "None" not in refused.stderr


def test_generate_streams_with_progress_and_previews(server, tmp_path):
    result = client(
        "generate.py",
        "a red panda",
        "--url",
        server.grpc_url,
        "--stream",
        "--preview-every",
        "2",
        "--out",
        str(tmp_path),
        *OPTIONS,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "a-red-panda-21.png",
        "a-red-panda-step002.png",
        "a-red-panda-step004.png",
    ]
    assert "6/6" in result.stderr  # tqdm's bar reached the last step
    expected, _ = server.txt2img("a red panda", **SAME_OPTIONS)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a-red-panda-21.png")), expected)


def test_generate_timeout_works_over_both_protocols(server, tmp_path):
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        ok = client(
            "generate.py",
            "a cat",
            "--url",
            url,
            "--protocol",
            protocol,
            "--timeout",
            "60",
            "--out",
            str(tmp_path),
            *OPTIONS,
        )
        assert ok.returncode == 0, ok.stderr
    cut = client(
        "generate.py",
        "a cat",
        "--url",
        server.grpc_url,
        "--protocol",
        "grpc",
        "--timeout",
        "0.05",
        "--num-inference-steps",
        "150",
        "--out",
        str(tmp_path / "cut"),
        "--request-id",
        f"cut-{tmp_path.name}",
    )
    assert cut.returncode == 1 and "Deadline" in cut.stderr
    # the server stops the generation at its next step and logs it by the client's --request-id
    logged = f"txt2img: request 'cut-{tmp_path.name}' cancelled by its client"
    deadline = time.monotonic() + 60
    while logged not in server.log_file.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert logged in server.log_file.read_text(errors="replace")
