#!/usr/bin/env python3
"""Build the Docker image and serve the tiny pipeline from a container (`make docker-smoke`).

1. The base image: BASE (debian:bookworm-slim) when present or pullable; else a Debian bookworm base made
   here with debootstrap and `docker import` (tagged stepdiff-base:bookworm, reused once made).
2. `docker build` of the Dockerfile with that base and CPU torch: by default the host's pip fetches the CPU
   wheel of pyproject's torch pin (its own index, mirrors, cache, plus --torch-index) and the build gets it
   as TORCH_INDEX from a PEP 503 index on 127.0.0.1; --torch-wheels DIR serves a folder instead, and
   --build-fetches-torch hands --torch-index to the build itself.
3. The tiny SD pipeline, built on the host (`stepdiff make-tiny sd`), mounted read-only into a container
   run as the image's non-root user with a read-only root filesystem and the three ports published.
4. From outside the container: wait for /v2/health/ready, generate a PNG with client/generate.py over HTTP
   and over gRPC, check both (PNG, size, equal bytes, diffusers' image on the host), read the metrics.
5. `docker stop`: the container must exit with code 0 within the grace period, saying `stepdiff: stopped`;
   then it is removed, and none is left behind, also when a step fails.

Needs a running dockerd (root or the docker group), debootstrap when the base has to be made, and the
checkout's virtual environment (the client, make-tiny and the diffusers reference run on the host).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from stepdiff.server import free_ports

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROMPT = "a photo of a red panda sitting on a tree branch"
SEED, STEPS, HEIGHT, WIDTH = 7, 5, 64, 48  # not square: a transposed image fails the size check
# Seconds docker stop waits before SIGKILL (Docker's default is 10). The launcher gives tritonserver 30 s to
# unload its models after SIGTERM, then kills it; unloading takes 10-30 s on 2 busy CPU cores.
STOP_GRACE = 60
# Not eager: fullgraph, and the backend's own compile errors raised (Dynamo would otherwise fall back to eager).
COMPILE_CHECK = (
    "import torch, torch._dynamo; torch._dynamo.config.suppress_errors = False\n"
    "f = torch.compile(lambda x: (x.sin() ** 2 + x.cos() ** 2) * 2, fullgraph=True)\n"
    "print('compiled', round(float(f(torch.ones(4)).sum()), 3))"
)
WHEELS_PORT = 47213  # where --torch-wheels are served to the build
SOURCES = """Types: deb
URIs: {mirror}
Suites: {suite} {suite}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {security}
Suites: {suite}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# What Debian's official -slim images leave out (their /etc/dpkg/dpkg.cfg.d/docker): docs, man pages, locales.
DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
"""


class SmokeError(RuntimeError):
    """A step of the smoke test failed."""


class Log:
    """Prints each line with the seconds since start and keeps it for the record."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {message}"
        self.lines.append(line)
        print(line, flush=True)


def docker(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise SmokeError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return result


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def make_local_base(
    tag: str, suite: str, mirror: str, security: str, host_ca_certificates: list[Path], log: Log
) -> None:
    """A minimal Debian root file system from debootstrap, tailored like the official -slim images, imported."""
    if not shutil.which("debootstrap"):
        raise SmokeError("the base image cannot be pulled and debootstrap is missing: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise SmokeError("the base image cannot be pulled; making one with debootstrap needs root")
    root = Path(tempfile.mkdtemp(prefix="stepdiff-rootfs-", dir="/var/tmp"))
    try:
        log(f"debootstrap --variant=minbase {suite} from {mirror}")
        made = subprocess.run(
            ["debootstrap", "--variant=minbase", suite, str(root), mirror], capture_output=True, text=True, timeout=1800
        )
        if made.returncode != 0:
            raise SmokeError(f"debootstrap failed ({made.returncode}): {(made.stdout + made.stderr)[-2000:]}")
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(
            SOURCES.format(mirror=mirror, security=security, suite=suite)
        )
        (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_EXCLUDES)
        # The host's own CA certificates (a TLS-intercepting proxy's, say): the build's pip, Debian's, trusts
        # the system bundle, which the Dockerfile's ca-certificates rebuilds from this folder.
        (root / "usr/local/share/ca-certificates").mkdir(parents=True, exist_ok=True)
        for cert in host_ca_certificates:
            shutil.copy2(cert, root / "usr/local/share/ca-certificates" / cert.name)
        for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb"):
            for path in root.glob(pattern):
                if path.is_file():
                    path.unlink()
        for folder in ("usr/share/doc", "usr/share/man", "usr/share/locale"):
            shutil.rmtree(root / folder, ignore_errors=True)
            (root / folder).mkdir()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        docker(
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            'CMD ["bash"]',
            "-",
            tag,
            stdin=tar.stdout,
            timeout=900,
        )
        if tar.wait() != 0:
            raise SmokeError("tar of the debootstrap root failed")
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def choose_base(args: argparse.Namespace, log: Log) -> tuple[str, str]:
    """(image, how it was had): the base asked for if present or pullable, else the local debootstrap one."""
    if image_exists(args.base):
        return args.base, "present"
    pulled = docker("pull", args.base, check=False, timeout=600)
    if pulled.returncode == 0:
        return args.base, "pulled"
    log(f"cannot pull {args.base}: {pulled.stderr.strip().splitlines()[-1] if pulled.stderr.strip() else '?'}")
    if image_exists(args.local_base):
        return args.local_base, "made earlier with debootstrap (reused)"
    suite = args.local_base.rsplit(":", 1)[-1]
    certificates = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")) if args.host_ca_certificates else []
    started = time.monotonic()
    make_local_base(args.local_base, suite, args.mirror, args.security_mirror, certificates, log)
    added = f", with the host's CA certificates {', '.join(c.name for c in certificates)}" if certificates else ""
    return args.local_base, f"made now with debootstrap + docker import in {time.monotonic() - started:.0f} s{added}"


@contextlib.contextmanager
def wheel_index(folder: Path | None):
    """A PEP 503 index of the torch wheels in ``folder`` on 127.0.0.1 (None: yields None)."""
    if folder is None:
        yield None
        return
    wheels = sorted(folder.glob("torch-*.whl"))
    if not wheels:
        raise SmokeError(f"no torch-*.whl in {folder}")
    with tempfile.TemporaryDirectory(prefix="stepdiff-wheels-") as served:
        project = Path(served) / "simple" / "torch"
        project.mkdir(parents=True)
        links = []
        for wheel in wheels:
            (project / wheel.name).symlink_to(wheel.resolve())
            links.append(f'<a href="{html.escape(wheel.name)}">{html.escape(wheel.name)}</a><br>')
        (project / "index.html").write_text("<html><body>\n" + "\n".join(links) + "\n</body></html>\n")

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *_):
                pass

        handler = functools.partial(Quiet, directory=served)
        try:  # a fixed port keeps TORCH_INDEX, and so the build cache of the torch layer, the same every run
            httpd = ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
        except OSError:
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/simple"
        finally:
            httpd.shutdown()


def host_torch_wheel(args: argparse.Namespace, work: Path, log: Log) -> Path:
    """The CPU build of pyproject's torch for the image's Python, fetched by this machine's pip (its index,
    mirrors, find-links and cache, plus --torch-index) into a folder served to the build."""
    requirement = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch=="))
    folder = work / "torch-wheels"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--retries=1"]
    command += ["--python-version", args.image_python, "--implementation", "cp", "--platform", args.platform]
    command += ["--extra-index-url", args.torch_index, "-d", str(folder), f"{requirement}+cpu"]
    log(
        f"pip download {requirement}+cpu for Python {args.image_python} (the host's pip sources and {args.torch_index})"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SmokeError(f"the host's pip could not fetch {requirement}+cpu: {result.stderr.strip()[-2000:]}")
    return folder


def build_image(args: argparse.Namespace, base: str, torch_index: str, host_network: bool, work: Path, log: Log):
    # --force-rm: a failing step leaves no container behind (the legacy builder's default keeps it)
    command = ["docker", "build", "--force-rm", "-t", args.image, "--build-arg", f"BASE={base}"]
    command += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    command += ["--network", "host"] if host_network else []
    command += [*args.build_option, "-f", str(REPO / "Dockerfile"), str(REPO)]
    log("$ " + " ".join(command))
    build_log = work / "build.log"
    started = time.monotonic()
    with build_log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=args.build_timeout).returncode
    seconds = time.monotonic() - started
    tail = build_log.read_text(errors="replace").splitlines()[-40:]
    if code != 0:
        raise SmokeError(f"docker build failed ({code}) after {seconds:.0f} s; {build_log}:\n" + "\n".join(tail))
    return seconds, tail


def tiny_pipeline(work: Path, log: Log) -> Path:
    """The tiny SD pipeline, readable by the image's user (save_pretrained writes weights with mode 0600)."""
    pipeline = work / "tiny-sd"
    if not (pipeline / "model_index.json").is_file():
        log(f"stepdiff make-tiny sd {pipeline}")
        subprocess.run(
            [sys.executable, "-m", "stepdiff", "make-tiny", "sd", str(pipeline)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    for path in [pipeline, *pipeline.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return pipeline


def container_running(name: str) -> bool:
    result = docker("inspect", "-f", "{{.State.Running}}", name, check=False)
    return result.stdout.strip() == "true"


def wait_ready(name: str, http_port: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2).status == 200:
                return time.monotonic() - started
        if not container_running(name):
            raise SmokeError("the container exited before it was ready")
        time.sleep(0.5)
    raise SmokeError(f"not ready after {timeout:.0f} s")


def generate_png(protocol: str, port: int, out: Path) -> tuple[Path, str]:
    """client/generate.py from the host: (the PNG it wrote, its output line)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "client" / "generate.py"), PROMPT, "--protocol", protocol]
    command += ["--url", f"127.0.0.1:{port}", "--seed", str(SEED), "--num-inference-steps", str(STEPS)]
    command += ["--height", str(HEIGHT), "--width", str(WIDTH), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SmokeError(f"client/generate.py over {protocol} failed: {result.stdout}{result.stderr}")
    [png] = out.glob(f"*-{SEED}.png")
    return png, result.stdout.strip()


def check_png(data: bytes) -> np.ndarray:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise SmokeError("the file is not a PNG")
    image = Image.open(io.BytesIO(data))
    if image.format != "PNG" or image.mode != "RGB" or image.size != (WIDTH, HEIGHT):
        raise SmokeError(f"got a {image.format} {image.mode} {image.size}, expected PNG RGB {(WIDTH, HEIGHT)}")
    pixels = np.asarray(image)
    if pixels.std() == 0:
        raise SmokeError("the image is one flat colour")
    return pixels


def reference_image(pipeline: Path) -> np.ndarray:
    """diffusers' own image for the same request, in this process (one thread, as the container's models)."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        generator=torch.Generator().manual_seed(SEED),
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def metric_total(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    if not values:
        raise SmokeError(f"metric {name} is not exported")
    return sum(values)


def smoke(args: argparse.Namespace, log: Log, summary: dict) -> None:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    version = docker("version", "--format", "{{.Client.Version}} {{.Server.Version}}", check=False)
    if version.returncode != 0:
        raise SmokeError(f"no Docker engine: {version.stderr.strip()} (apt-get install docker.io; start dockerd)")
    summary["docker_client"], summary["docker_server"] = version.stdout.split()
    log(f"docker client {summary['docker_client']}, engine {summary['docker_server']}")

    base, how = choose_base(args, log)
    summary.update(base=base, base_source=how)
    log(f"base image {base}: {how}")

    wheels = args.torch_wheels or (None if args.build_fetches_torch else host_torch_wheel(args, work, log))
    with wheel_index(wheels) as local_index:
        torch_index = local_index or args.torch_index
        summary["torch_index"] = f"{wheels} (served on 127.0.0.1)" if local_index else torch_index
        summary["build_seconds"], build_tail = build_image(args, base, torch_index, bool(local_index), work, log)
    summary["build_log_tail"] = build_tail
    size = int(docker("image", "inspect", "-f", "{{.Size}}", args.image).stdout)
    summary["image_bytes"] = size
    log(f"built {args.image} in {summary['build_seconds']:.0f} s: {size / 1e9:.2f} GB")

    pipeline = tiny_pipeline(work, log)
    http_port, grpc_port, metrics_port = free_ports(3)
    name = f"stepdiff-smoke-{os.getpid()}"
    run = ["run", "-d", "--name", name, "--shm-size", "256m", "--read-only", "--tmpfs", "/tmp"]
    # ~/.cache must allow exec: the launcher puts Triton's Python backend and its stub there (--tmpfs is noexec)
    run += ["--tmpfs", "/home/stepdiff/.cache:exec,uid=1000,gid=1000,mode=0700"]
    run += ["-p", f"127.0.0.1:{http_port}:8000", "-p", f"127.0.0.1:{grpc_port}:8001"]
    run += ["-p", f"127.0.0.1:{metrics_port}:8002", "-v", f"{pipeline}:/models/tiny-sd:ro"]
    run += ["-e", "STEPDIFF_PIPELINE=/models/tiny-sd", "-e", "STEPDIFF_CPU_THREADS=1", "-e", "HF_HUB_OFFLINE=1"]
    run += [args.image]
    log("$ docker " + " ".join(run))
    try:
        docker(*run)
        summary["container"] = name
        summary["ready_seconds"] = wait_ready(name, http_port, args.ready_timeout)
        log(f"ready after {summary['ready_seconds']:.1f} s (/v2/health/ready on the published port {http_port})")

        for folder in ("png-http", "png-grpc"):
            shutil.rmtree(work / folder, ignore_errors=True)
        http_file, http_line = generate_png("http", http_port, work / "png-http")
        log(f"client over HTTP: {http_line}")
        grpc_file, grpc_line = generate_png("grpc", grpc_port, work / "png-grpc")
        log(f"client over gRPC: {grpc_line}")
        http_png = http_file.read_bytes()
        pixels = check_png(http_png)
        if grpc_file.read_bytes() != http_png:
            raise SmokeError("the PNGs over HTTP and gRPC differ")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(http_file, args.out / "smoke.png")
        steps = metric_total(metrics_port, "stepdiff_denoise_steps_total")
        reference = reference_image(pipeline)
        quality = psnr(pixels, reference)
        summary["png"] = {
            "bytes": len(http_png),
            "size": f"{WIDTH}x{HEIGHT}",
            "http_equals_grpc": True,
            "equals_diffusers_on_host": bool(np.array_equal(pixels, reference)),
            "psnr_vs_diffusers_db": quality if np.isfinite(quality) else None,  # None: identical
            "denoise_steps_metric": steps,
        }
        log(
            f"PNG {len(http_png)} bytes, {WIDTH}x{HEIGHT} RGB, HTTP == gRPC; against diffusers on the host: "
            f"{'byte-identical' if np.array_equal(pixels, reference) else f'PSNR {quality:.1f} dB'}; "
            f"stepdiff_denoise_steps_total {steps:g}"
        )
        if quality < 40:
            raise SmokeError(f"the image is not diffusers' (PSNR {quality:.1f} dB < 40)")

        # torch.compile in the image (--denoiser/--decoder compiled): Inductor builds a C++ kernel with the
        # image's compiler, into a cache that allows exec, as the launcher's own Inductor cache does
        began = time.monotonic()
        compiled = docker("exec", "-e", "TORCHINDUCTOR_CACHE_DIR=/home/stepdiff/.cache/inductor-smoke", name, "python",
                          "-c", COMPILE_CHECK, check=False, timeout=300)  # fmt: skip
        summary["torch_compile"] = compiled.stdout.strip() or compiled.stderr.strip()[-500:]
        if compiled.returncode != 0 or compiled.stdout.strip() != "compiled 8.0":
            raise SmokeError(f"torch.compile failed in the image: {compiled.stdout}{compiled.stderr[-3000:]}")
        log(f"torch.compile of a small function in the image: {time.monotonic() - began:.1f} s")

        started = time.monotonic()
        docker("stop", "--time", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)
        summary["stop_seconds"] = time.monotonic() - started
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
        summary["exit_code"] = state["ExitCode"]
        result = docker("logs", name)
        logs = result.stdout + result.stderr
        summary["container_log_tail"] = logs.strip().splitlines()[-12:]
        stopped = re.search(r"stepdiff: stopped \(tritonserver (?:exit code (-?\d+)|killed with signal (\d+))", logs)
        summary["tritonserver_exit_code"] = (
            (int(stopped.group(1)) if stopped.group(1) else -int(stopped.group(2))) if stopped else None
        )
        log(
            f"docker stop: {summary['stop_seconds']:.1f} s, exit code {state['ExitCode']}, OOM {state['OOMKilled']}; "
            f"the launcher's tritonserver exit code {summary['tritonserver_exit_code']} (-9: killed after its 30 s)"
        )
        if state["ExitCode"] != 0 or state["OOMKilled"] or not stopped:
            raise SmokeError(f"the container did not stop cleanly: {state}; its log:\n{logs[-3000:]}")
        if summary["stop_seconds"] >= STOP_GRACE:
            raise SmokeError(f"docker stop took {summary['stop_seconds']:.0f} s: the grace period ran out")
    except BaseException:
        if container_running(name):
            triton_log = docker("exec", name, "sh", "-c", "tail -n 40 ~/.cache/stepdiff/logs/*.log", check=False)
            log("tritonserver log tail:\n" + triton_log.stdout)
        result = docker("logs", name, check=False)
        log("container log tail:\n" + "\n".join((result.stdout + result.stderr).splitlines()[-30:]))
        raise
    finally:
        docker("rm", "-f", name, check=False)
        left = docker("inspect", name, check=False).returncode == 0
        summary["container_left"] = left
        if left:
            raise SmokeError(f"container {name} is still there")
    log(f"container {name} removed; none left")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="stepdiff:smoke", help="tag of the image built (default %(default)s)")
    parser.add_argument("--base", default=os.environ.get("BASE", "debian:bookworm-slim"), help="the Dockerfile's BASE")
    parser.add_argument(
        "--local-base",
        default="stepdiff-base:bookworm",
        help="tag of the debootstrap base, made when BASE cannot be had",
    )
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    parser.add_argument("--security-mirror", default="http://deb.debian.org/debian-security")
    parser.add_argument(
        "--no-host-ca-certificates",
        dest="host_ca_certificates",
        action="store_false",
        help="do not copy the host's /usr/local/share/ca-certificates/*.crt into the debootstrap base",
    )
    parser.add_argument(
        "--torch-index",
        default=os.environ.get("TORCH_INDEX", "https://download.pytorch.org/whl/cpu"),
        help="the Dockerfile's TORCH_INDEX (default: the CPU builds, %(default)s)",
    )
    parser.add_argument(
        "--torch-wheels",
        type=Path,
        default=os.environ.get("TORCH_WHEELS") or None,
        help="a folder holding the torch wheel for the image (served to the build on 127.0.0.1); default: the "
        "host's pip downloads the CPU build of pyproject's torch pin (from its own sources and --torch-index)",
    )
    parser.add_argument(
        "--build-fetches-torch",
        action="store_true",
        help="pass --torch-index to the build as TORCH_INDEX instead: pip inside the build fetches torch",
    )
    parser.add_argument("--image-python", default="3.11", help="the image's python3 (debian:bookworm: 3.11)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64", help="the image's wheel platform")
    parser.add_argument(
        "--build-option",
        action="append",
        default=[],
        help="extra docker build option, e.g. --build-option=--cpuset-cpus=0 (repeatable)",
    )
    parser.add_argument("--build-timeout", type=float, default=3600)
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "docker-smoke", help="scratch folder")
    parser.add_argument("--out", type=Path, default=None, help="also write summary.json and smoke.log here")
    args = parser.parse_args(argv)
    log, summary = Log(), {"ok": False}
    try:
        smoke(args, log, summary)
        summary["ok"] = True
        log("docker smoke passed")
    except (SmokeError, subprocess.SubprocessError, OSError) as error:
        log(f"docker smoke FAILED: {error}")
    finally:
        summary["seconds"] = time.monotonic() - log.started
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            (args.out / "smoke.log").write_text("\n".join(log.lines) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
