"""What can be checked of the Dockerfile without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

from stepdiff.server import TRITON_VERSION

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
# NGC container release -> Triton server version (https://docs.nvidia.com/deeplearning/triton-inference-server/release-notes/)
NGC_RELEASES = {"24.09": "2.50.0", "24.10": "2.51.0", "24.11": "2.52.0"}


def test_base_image_is_the_embedded_server_version():
    match = re.search(r"^FROM nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3$", DOCKERFILE, re.MULTILINE)
    assert match, "base image must be an NGC tritonserver -py3 tag"
    assert NGC_RELEASES[match.group(1)] == TRITON_VERSION


def test_copied_paths_exist_and_the_repository_is_served():
    for source in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY source {path} is missing"
    assert "--model-repository /opt/stepdiff/model_repository" in DOCKERFILE
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.MULTILINE), "must run as a non-root user"
    assert re.search(r"^EXPOSE 8000 8001 8002$", DOCKERFILE, re.MULTILINE)
    assert "torch==2.13.0" in DOCKERFILE
