"""What can be checked of the Dockerfile and its build context without a Docker engine. `make docker-smoke`
(deploy/docker_smoke.py) builds the image and serves the tiny pipeline from it; it needs dockerd, so it is
not part of `make test`."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Debian/Ubuntu releases a BASE may name -> their python3 (the wheel's Python backend stubs cover 3.8-3.13)
BASE_PYTHON = {"bookworm": (3, 11), "trixie": (3, 13), "24.04": (3, 12), "noble": (3, 12)}
HEAVY = (".venv", ".git", ".gpu", "build", "results", "outputs", "tests", ".pytest_cache")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#")))
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def pinned(name: str) -> str:
    [requirement] = [r for r in PYPROJECT["project"]["dependencies"] if re.match(rf"{name}\s*==", r)]
    return requirement.split("==", 1)[1].strip()


def test_base_is_debian_with_python_311_or_newer():
    steps = instructions()
    assert ("ARG", "BASE=debian:bookworm-slim") in steps
    assert [args for op, args in steps if op == "FROM"] == ["${BASE}"], "one stage, on the BASE build arg"
    release = re.search(r"^ARG BASE=\w+:([\w.]+?)(-slim)?$", DOCKERFILE, re.MULTILINE).group(1)
    assert BASE_PYTHON[release] >= (3, 11)
    assert "nvcr.io" not in DOCKERFILE  # the server is the nvidia-pytriton wheel's, as everywhere else
    # libpython of the base's own python3 (the Python backend stub links it), and the version check
    assert '"lib$(python3 -c' in DOCKERFILE
    assert "sys.version_info >= (3, 11)" in DOCKERFILE


def test_embedded_server_and_torch_pins_are_pyproject_s():
    assert pinned("nvidia-pytriton") == "0.7.0"  # tritonserver 2.51.0 (stepdiff.server.TRITON_VERSION)
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert f"torch=={pinned('torch')}" in runs
    # stepdiff installed as a package (not -e: the sources are not kept), so its model repository is the
    # one in site-packages and the launcher needs no --model-repository
    assert re.search(r"pip install --no-cache-dir --no-deps --force-reinstall /tmp/stepdiff\b", runs)
    assert " -e " not in runs
    assert "--model-repository" not in DOCKERFILE


def test_copied_paths_exist_and_are_in_the_build_context():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore excludes everything not let back in"
    for op, args in instructions():
        if op == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} is missing"
                assert source in allowed, f"COPY source {source} is excluded by .dockerignore"
    assert not allowed & set(HEAVY)


def test_runs_stepdiff_serve_as_the_pods_user():
    steps = instructions()
    [user] = [args for op, args in steps if op == "USER"]
    assert user != "root"
    uid = re.search(rf"useradd .*--uid (\d+) .*\b{user}\b", DOCKERFILE).group(1)
    statefulset = yaml.safe_load((REPO / "deploy" / "base" / "statefulset.yaml").read_text())
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert ("EXPOSE", "8000 8001 8002") in steps
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--"]') in steps  # SIGTERM to the launcher, zombies reaped
    [cmd] = [args for op, args in steps if op == "CMD"]
    assert "exec stepdiff serve --pipeline" in cmd
    assert re.search(r"^ENV PATH=/opt/venv/bin:", DOCKERFILE, re.MULTILINE)


def test_smoke_target_runs_in_ci_after_make_test():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^docker-smoke:.*\n\t.*deploy/docker_smoke\.py", makefile, re.MULTILINE)
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    assert "docker" not in test_recipe  # make test needs no Docker engine
    ci = (REPO / ".ci" / "run").read_text()
    assert 0 <= ci.index("\nmake test\n") < ci.index("make docker-smoke")
    usage = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "docker_smoke.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 0 and "--torch-wheels" in usage.stdout


def test_readme_docker_section_names_what_was_run():
    section = re.search(r"^## Docker\n(.*?)^## ", (REPO / "README.md").read_text(), re.MULTILINE | re.DOTALL).group(1)
    assert "make docker-smoke" in section
    assert "--shm-size" in section
    for link in re.findall(r"\]\((results/[^)]+)\)", section):
        assert (REPO / link).exists(), f"README's Docker section links to missing {link}"
