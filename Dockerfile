# stepdiff on Debian with the same embedded tritonserver 2.51.0 (from the nvidia-pytriton wheel) that
# `stepdiff serve` runs everywhere else; `make docker-smoke` builds this file and serves a pipeline from it.
#   docker build -t stepdiff .                                      # CUDA torch (PyPI's torch 2.13.0: CUDA 13.0)
#   docker build -t stepdiff --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # CPU-only torch
#   docker run --gpus all --shm-size=1g --stop-timeout 60 -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -e STEPDIFF_PIPELINE=stable-diffusion-v1-5/stable-diffusion-v1-5 -v $HOME/.cache/huggingface:/home/stepdiff/.cache/huggingface stepdiff
# --shm-size: the Python backend moves tensors through /dev/shm (Docker's 64 MB default is too small).
# --stop-timeout: after SIGTERM the launcher gives tritonserver 30 s to unload its models (Docker's default: 10 s).
# Plain Dockerfile syntax (no BuildKit-only features): the legacy builder and BuildKit both build it.

# Any Debian or Ubuntu image whose python3 is 3.11 or newer (the wheel carries Python backend stubs for
# 3.8-3.13). Without registry access, `make docker-smoke` makes a bookworm base with debootstrap.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# python3 + venv; libpython3.X because the Python backend stub links it dynamically; tini as PID 1
# (forwards SIGTERM to the launcher and reaps the model processes a killed tritonserver leaves behind);
# a C/C++ compiler and Python's headers for torch.compile (--denoiser/--decoder compiled): Inductor builds
# its CPU kernels and Triton its GPU launchers with them, and without them those modes ran eagerly.
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini gcc g++ libc6-dev python3-dev \
 && apt-get install -y --no-install-recommends "lib$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')" \
 && python3 -c 'import sys; assert sys.version_info >= (3, 11), "stepdiff needs Python >= 3.11, the base has " + sys.version' \
 && rm -rf /var/lib/apt/lists/*

# ~/.cache made here, as the user: a volume mounted below it (-v ...:/home/stepdiff/.cache/huggingface)
# would otherwise make it root's, and the launcher could not write its own caches there.
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin stepdiff \
 && install -d -o stepdiff -g stepdiff /home/stepdiff/.cache \
 && python3 -m venv /opt/venv

# torch first, from TORCH_INDEX when given (PyPI stays the index for everything else). The pin is
# pyproject.toml's; a `+cpu` build from the CPU index outranks PyPI's CUDA build of the same version.
ARG TORCH_INDEX=
RUN /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} \
    torch==2.13.0

# The dependencies, in a layer of their own that only pyproject.toml invalidates (a stub package stands in
# for the sources), then stepdiff itself: a regular install (not -e), the model repository inside it.
COPY pyproject.toml /tmp/stepdiff/
RUN mkdir -p /tmp/stepdiff/src/stepdiff \
 && touch /tmp/stepdiff/README.md /tmp/stepdiff/src/stepdiff/__init__.py \
 && /opt/venv/bin/pip install --no-cache-dir /tmp/stepdiff \
 && rm -rf /tmp/stepdiff
COPY pyproject.toml README.md /tmp/stepdiff/
COPY src /tmp/stepdiff/src
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall /tmp/stepdiff \
 && rm -rf /tmp/stepdiff \
 && /opt/venv/bin/stepdiff --help > /dev/null

USER stepdiff
WORKDIR /home/stepdiff
# The models' settings (STEPDIFF_DEVICE, STEPDIFF_DTYPE, STEPDIFF_MAX_STEPS, ...) are read from the
# environment too: `docker run -e STEPDIFF_DEVICE=cpu ...`. auto: CUDA when torch sees a GPU.
ENV PATH=/opt/venv/bin:${PATH} \
    STEPDIFF_PIPELINE=stable-diffusion-v1-5/stable-diffusion-v1-5 \
    STEPDIFF_DEVICE=auto
EXPOSE 8000 8001 8002
ENTRYPOINT ["/usr/bin/tini", "--"]
# The launcher finds the tritonserver of the nvidia-pytriton wheel and the model repository in the package.
# --log-stdout: tritonserver's log in `docker logs` as well.
CMD ["sh", "-c", "exec stepdiff serve --pipeline \"$STEPDIFF_PIPELINE\" --log-stdout"]
