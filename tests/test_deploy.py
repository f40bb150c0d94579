"""deploy/: every overlay renders with `kubectl kustomize`, and every object validates against the
Kubernetes schemas (kubernetes-validate, offline); the StatefulSet has what serving needs."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from conftest import REPO, require_system

OVERLAYS = sorted(path for path in (REPO / "deploy" / "overlays").iterdir() if (path / "kustomization.yaml").is_file())
CUSTOM_RESOURCES = {"PodMonitor", "ServingRuntime", "InferenceService"}  # no built-in schema: checked by hand below


def render(overlay) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        require_system("kubectl (it renders the kustomize overlays)", "apt-get install kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[path.name for path in OVERLAYS])
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    documents = render(overlay)
    assert documents
    for document in documents:
        if document["kind"] in CUSTOM_RESOURCES:
            assert document["apiVersion"].split("/")[0] in ("monitoring.coreos.com", "serving.kserve.io")
            continue
        kubernetes_validate.validate(document, version, strict=True)


def test_single_gpu_deployment_serves_safely():
    objects = {document["kind"]: document for document in render(REPO / "deploy" / "overlays" / "single-gpu")}
    assert {"StatefulSet", "Service", "PodMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(objects)
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    probes = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {"/dev/shm", "/home/stepdiff/.cache"} <= mounts
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"] == "Memory"
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    # the launcher drains (its generations finish) and then stops tritonserver (up to 30 s) within the grace
    drain = float(container["args"][container["args"].index("--drain-seconds") + 1])
    assert pod["terminationGracePeriodSeconds"] >= drain + 35
    live = container["livenessProbe"]  # outlasts the launcher's own restart of tritonserver (a model load)
    assert live["periodSeconds"] * live["failureThreshold"] >= 300
    assert "replicas" not in objects["StatefulSet"]["spec"]  # the HPA's, not reset by each apply
    # each pod its own model cache: one ReadWriteOnce claim shared by all replicas held them to one node
    [claim] = objects["StatefulSet"]["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "model-cache" and "PersistentVolumeClaim" not in objects
    assert container["command"][:2] == ["/usr/bin/tini", "--"]  # the image's PID 1 (command replaces ENTRYPOINT)
    assert {port["name"] for port in objects["Service"]["spec"]["ports"]} == {"http", "grpc", "metrics"}


def test_kserve_runtime_gives_the_python_backend_its_shared_memory():
    objects = {document["kind"]: document for document in render(REPO / "deploy" / "overlays" / "kserve")}
    runtime = objects["ServingRuntime"]["spec"]
    [container] = runtime["containers"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert next(v for v in runtime["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"] == "Memory"
    assert {"name": "STEPDIFF_MAX_ACTIVE_SEQUENCES", "value": "64"} in container["env"]


def test_autoscaling_keys_on_a_metric_stepdiff_exports():
    """The HPA's metric, the prometheus-adapter rule that serves it, and denoise_step's metric agree."""
    objects = {document["kind"]: document for document in render(REPO / "deploy" / "overlays" / "single-gpu")}
    [metric] = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert any(rule["name"].get("as") == name for rule in rules)
    assert (
        f'"{name}"' in (REPO / "src" / "stepdiff" / "model_repository" / "denoise_step" / "1" / "model.py").read_text()
    )


def test_multi_gpu_deployment_puts_an_instance_on_every_gpu_it_requests():
    """`--gpus all` on the pod's two GPUs; what scales with the GPUs is twice the single-GPU overlay's."""
    from stepdiff.cli import command_parser

    def parts(overlay: str) -> tuple[dict, dict, dict]:
        objects = {document["kind"]: document for document in render(REPO / "deploy" / "overlays" / overlay)}
        [container] = objects["StatefulSet"]["spec"]["template"]["spec"]["containers"]
        env = {variable["name"]: variable["value"] for variable in container["env"]}
        return container, env, objects["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["target"]

    single, single_env, single_target = parts("single-gpu")
    multi, multi_env, multi_target = parts("multi-gpu")
    args = command_parser().parse_args(["serve", *multi["args"]])  # stepdiff serve takes them
    assert args.gpus == "all" and args.device is None  # --gpus places the stage models
    assert args.drain_seconds == 120  # as the single-GPU pod: the patch replaces the whole args list
    gpus = multi["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == multi["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert single["resources"]["limits"]["nvidia.com/gpu"] == 1
    per_gpu = int(single_env["STEPDIFF_MAX_ACTIVE_SEQUENCES"])
    assert int(multi_env["STEPDIFF_MAX_ACTIVE_SEQUENCES"]) == gpus * per_gpu
    assert int(multi_target["averageValue"]) == gpus * int(single_target["averageValue"])
