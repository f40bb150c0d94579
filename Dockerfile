# stepdiff on the NGC Triton image: the same tritonserver 2.51.0 that `stepdiff serve` embeds locally.
#   docker build -t stepdiff .
#   docker run --gpus all --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -e STEPDIFF_PIPELINE=runwayml/stable-diffusion-v1-5 -v $HOME/.cache/huggingface:/home/stepdiff/.cache/huggingface stepdiff
# --shm-size: the Python backend moves tensors through /dev/shm (Docker's 64 MB default is too small).
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The image's Python is 3.10; stepdiff needs >= 3.11. The launcher pairs Triton's Python backend with
# the nvidia-pytriton wheel's stub built for this interpreter.
ARG PYTHON=python3.12
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv lib${PYTHON}-dev \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 stepdiff
WORKDIR /opt/stepdiff
COPY pyproject.toml README.md ./
COPY src ./src
COPY model_repository ./model_repository
COPY client ./client
RUN ${PYTHON} -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir -e . \
 && chown -R stepdiff /opt/stepdiff

USER stepdiff
ENV PATH=/opt/venv/bin:/opt/tritonserver/bin:${PATH} \
    STEPDIFF_PIPELINE=runwayml/stable-diffusion-v1-5 \
    STEPDIFF_DEVICE=cuda
EXPOSE 8000 8001 8002
# tritonserver (from this image) on /opt/stepdiff/model_repository, through the launcher.
CMD ["sh", "-c", "exec stepdiff serve --pipeline \"$STEPDIFF_PIPELINE\" --device \"$STEPDIFF_DEVICE\" --model-repository /opt/stepdiff/model_repository"]
