"""Checks of the deployment artifacts in deploy/ (and the top-level .dockerignore).

No Docker engine and no cluster run in CI, so each artifact is checked as far as this machine allows:

- Kubernetes: the kustomization is rendered (by `kubectl kustomize` where kubectl is installed, and always
  by the small renderer below, which must agree with it) and every object is validated offline against
  the Kubernetes schemas shipped by kubernetes-validate, in strict mode; then the settings that matter.
  The optional Redis (optional/redis.yaml) is validated and checked the same way.
- Dockerfile: parsed; COPY sources exist and survive .dockerignore; the final stage's user, port,
  HEALTHCHECK and entry point. The image's command is then run for real from an install of the built
  wheel (the `slow` tests).
- Compose: parsed; the files it references exist; the demo profile runs `gateway demo`, which (run from
  the wheel) gets ready with no key; the shared profile's replicas reach its Redis (run from the wheel
  against a local redis-server or valkey-server started with the compose service's arguments, where one
  is installed).
- systemd: the unit's command and stop timeout; `systemd-analyze verify` where it is installed.

Every process started here is stopped by its pid, every wait is bounded, and nothing leaves 127.0.0.1
(the `serve` test points the upstream at a closed loopback port, so the catalog fetch stays local).
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import psycopg
import pytest
import yaml

from gateway.usage.postgres.schema import SCHEMA_VERSION
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "flexai-gateway.service"
DEPLOY_CONFIG = K8S / "gateway.toml"
SECRET_TEMPLATE = K8S / "secret.example.yaml"
SERVICE_MONITOR = K8S / "optional" / "servicemonitor.yaml"
REDIS_MANIFEST = K8S / "optional" / "redis.yaml"

# Schemas to validate against, both shipped by kubernetes-validate (pinned in constraints.txt): the oldest
# Kubernetes these manifests aim at, and the newest the package knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "llm-gateway"
APP_SELECTOR = {"app.kubernetes.io/name": "llm-gateway"}
PORT = 8080
SHUTDOWN_GRACE_S = 30  # the gateway's default [server] shutdown_grace
RSS_AT_REST_TARGET_BYTES = 80 * 1000 * 1000  # the performance target: RSS <= 80 MB at rest
IMAGE_COMMAND = ["gateway", "serve", "--host", "0.0.0.0"]
SHARED_URL_ENV = "GATEWAY_SHARED_REDIS_URL"  # [shared] redis_url
SHARED_URL_KEY = "redis-url"  # its key in the Secret
REDIS_PORT = 6379
LEDGER_URL_ENV = "GATEWAY_USAGE_DATABASE_URL"  # [usage] database_url
LEDGER_URL_KEY = "database-url"  # its key in the Secret

slow = pytest.mark.slow

Obj = dict[str, Any]


def load_yaml_docs(path: Path) -> list[Obj]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: every YAML document must be a mapping"
    return docs


def load_yaml(path: Path) -> Obj:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs a command to completion (bounded), capturing its output. Never raises on a non-zero exit."""
    return subprocess.run(  # noqa: S603 - argv is built by this file, never by a shell
        [str(arg) for arg in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------------
# Kubernetes: rendering the kustomization


# The kustomization fields the renderer below implements. Anything else in kustomization.yaml fails the
# test: extend the renderer along with the kustomization, so that what is validated is what gets applied.
RENDERER_FIELDS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
GENERATOR_FIELDS = {"name", "files"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}


def kustomization() -> Obj:
    return load_yaml(K8S / "kustomization.yaml")


def kustomize_hash(configmap: Obj) -> str:
    """The name suffix kustomize gives a generated ConfigMap (sigs.k8s.io/kustomize/api/hasher).

    sha256 of Go's json.Marshal of {"data", "kind", "name"} (sorted keys, no spaces, <>& escaped), its first
    10 hex digits with 0, 1, 3, a, e mapped to g, h, k, m, t. kustomize looks the name up as one path
    segment "metadata/name", which finds nothing, so the name it hashes is always empty.
    """
    encoded = json.dumps(
        {"data": configmap.get("data", {}), "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escaped)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def pod_specs(obj: Obj) -> list[Obj]:
    kind = obj.get("kind")
    spec = obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [spec]
    return []


def containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def rename_configmap_refs(pod_spec: Obj, renamed: dict[str, str]) -> None:
    """What kustomize's name-reference transformer does for ConfigMaps in a pod spec."""

    def rename(ref: Obj | None) -> None:
        if ref is not None and ref.get("name") in renamed:
            ref["name"] = renamed[ref["name"]]

    for volume in pod_spec.get("volumes", []):
        rename(volume.get("configMap"))
        for source in volume.get("projected", {}).get("sources", []):
            rename(source.get("configMap"))
    for container in containers(pod_spec):
        for env in container.get("env", []):
            rename(env.get("valueFrom", {}).get("configMapKeyRef"))
        for env_from in container.get("envFrom", []):
            rename(env_from.get("configMapRef"))


def render_kustomization(directory: Path) -> list[Obj]:
    spec = load_yaml(directory / "kustomization.yaml")
    unsupported = set(spec) - RENDERER_FIELDS
    assert not unsupported, f"kustomization.yaml uses {sorted(unsupported)}, which this test cannot render"
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert spec["kind"] == "Kustomization"

    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        assert path.is_file(), f"kustomization.yaml lists {entry}, which is not a file in {directory}"
        objects.extend(load_yaml_docs(path))

    renamed: dict[str, str] = {}
    for generator in spec.get("configMapGenerator", []):
        unsupported = set(generator) - GENERATOR_FIELDS
        assert not unsupported, f"configMapGenerator uses {sorted(unsupported)}, which this test cannot render"
        data: dict[str, str] = {}
        for entry in generator["files"]:
            key, _, relative = entry.rpartition("=")
            path = directory / relative
            # kustomize's load restrictor: generator files must be inside the kustomization's directory,
            # symlinks resolved (a symlink to ../../config/gateway.toml is refused).
            assert path.resolve().is_relative_to(directory.resolve()), f"{entry} is outside {directory}"
            assert path.is_file(), f"configMapGenerator file {entry} does not exist"
            data[key or path.name] = path.read_text(encoding="utf-8")
        configmap: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "data": data}
        renamed[generator["name"]] = f"{generator['name']}-{kustomize_hash(configmap)}"
        configmap["metadata"]["name"] = renamed[generator["name"]]
        objects.append(configmap)

    namespace = spec.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED_KINDS:
            obj["metadata"]["namespace"] = namespace
        for pod_spec in pod_specs(obj):
            rename_configmap_refs(pod_spec, renamed)
    return objects


def by_kind_and_name(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    keyed = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    assert len(keyed) == len(objects), "two rendered objects have the same kind and name"
    return keyed


def find(objects: list[Obj], kind: str) -> Obj:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return render_kustomization(K8S)


@pytest.fixture(scope="module")
def deployment(rendered: list[Obj]) -> Obj:
    return find(rendered, "Deployment")


@pytest.fixture(scope="module")
def pod_spec(deployment: Obj) -> Obj:
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod_spec: Obj) -> Obj:
    assert len(pod_spec["containers"]) == 1
    found: Obj = pod_spec["containers"][0]
    return found


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (512Mi, 250m, 1, 1G) as a number: bytes or cores."""
    suffixes = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "m": 10**-3,
    }
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    number, suffix = match.groups()
    return float(number) * suffixes[suffix] if suffix else float(number)


# ------------------------------------------------------------------------------------------------------
# Kubernetes: tests


def test_kustomization_lists_every_manifest_and_only_existing_files() -> None:
    spec = kustomization()
    listed = set(spec["resources"])
    for entry in listed:
        assert (K8S / entry).is_file(), f"kustomization.yaml lists {entry}, which does not exist"
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The Secret template stays out, so that `kubectl apply -k` never overwrites the real key.
    assert SECRET_TEMPLATE.name not in listed
    assert manifests - listed == {SECRET_TEMPLATE.name}, "a manifest is neither listed nor the Secret template"
    for generator in spec["configMapGenerator"]:
        for entry in generator["files"]:
            path = K8S / entry.rpartition("=")[2]
            assert path.is_file(), f"{entry} does not exist"
            assert not path.is_symlink(), f"{entry}: kustomize refuses a symlink out of its directory"
    assert spec["namespace"] == NAMESPACE


def test_kustomization_renders_the_expected_objects(rendered: list[Obj]) -> None:
    kinds = sorted(obj["kind"] for obj in rendered)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    )
    assert find(rendered, "Namespace")["metadata"]["name"] == NAMESPACE
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_strictly(rendered: list[Obj], version: str) -> None:
    # Also the optional Redis (no CRDs needed); the ServiceMonitor's kind is not in the core schemas.
    for obj in [*rendered, load_yaml(SECRET_TEMPLATE), *load_yaml_docs(REDIS_MANIFEST)]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {path}: {error.message}"
            )


def test_strict_validation_catches_a_misspelt_field(deployment: Obj) -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kubectl_kustomize_renders_the_same_objects(rendered: list[Obj]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the test's own renderer was validated instead")
    result = run([kubectl, "kustomize", K8S], timeout=60)
    assert result.returncode == 0, f"kubectl kustomize failed:\n{tail(result.stderr)}"
    from_kubectl = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert by_kind_and_name(from_kubectl) == by_kind_and_name(rendered)


def test_configmap_is_generated_from_the_deploy_config(rendered: list[Obj]) -> None:
    configmap = find(rendered, "ConfigMap")
    text = DEPLOY_CONFIG.read_text(encoding="utf-8")
    assert configmap["data"] == {"gateway.toml": text}
    assert re.fullmatch(r"llm-gateway-config-[a-z0-9]{10}", configmap["metadata"]["name"])
    settings = tomllib.loads(text)
    # With an upstream key and no gateway keys, the gateway starts only in auth mode "open"; the comment
    # says it becomes "keys" later.
    assert settings["auth"]["mode"] == "open"
    assert re.search(r'mode\s*=\s*"keys"', text), "say in gateway.toml that the mode later becomes keys"

    def keys(table: Obj) -> Iterator[str]:
        for key, value in table.items():
            yield key
            if isinstance(value, dict):
                yield from keys(value)

    assert "api_key" not in set(keys(settings)), "the upstream key belongs in a Secret, not in the ConfigMap"


def test_deployment_runs_two_replicas_with_probes(deployment: Obj, container: Obj) -> None:
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == APP_SELECTOR
    assert container["ports"] == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
    assert "command" not in container, "the image's entry point must run as is"
    assert "args" not in container, "the image's CMD must run as is"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_deployment_env_config_and_key(pod_spec: Obj, container: Obj) -> None:
    env = {item["name"]: item for item in container["env"]}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    config_mount = mounts["config"]
    assert config_mount["readOnly"] is True
    assert env["GATEWAY_CONFIG"]["value"] == posixpath.join(config_mount["mountPath"], "gateway.toml")
    assert volumes["config"]["configMap"]["name"].startswith("llm-gateway-config-")

    secret = load_yaml(SECRET_TEMPLATE)
    key_ref = env["GATEWAY_UPSTREAM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": secret["metadata"]["name"], "key": "api-key"}, "the key is required"
    # The Redis URL may hold a password: from the same Secret, and optional, so that a cluster without
    # Redis (or a Secret made with the api-key alone) still starts.
    url_ref = env[SHARED_URL_ENV]["valueFrom"]["secretKeyRef"]
    assert url_ref == {"name": secret["metadata"]["name"], "key": SHARED_URL_KEY, "optional": True}
    # The ledger's PostgreSQL URL likewise (it holds a password too).
    ledger_ref = env[LEDGER_URL_ENV]["valueFrom"]["secretKeyRef"]
    assert ledger_ref == {"name": secret["metadata"]["name"], "key": LEDGER_URL_KEY, "optional": True}
    assert set(secret["stringData"]) == {"api-key", SHARED_URL_KEY, LEDGER_URL_KEY}
    assert secret["stringData"][SHARED_URL_KEY] == "", "the template leaves shared state off"
    assert secret["stringData"][LEDGER_URL_KEY] == "", "the template keeps the SQLite ledger"
    assert secret["metadata"]["namespace"] == NAMESPACE
    # No other secret-looking values, and nothing besides the four above, in the pod's environment.
    assert set(env) == {"GATEWAY_CONFIG", "GATEWAY_UPSTREAM_API_KEY", SHARED_URL_ENV, LEDGER_URL_ENV}


def test_no_service_link_collides_with_gateway_settings(rendered: list[Obj], pod_spec: Obj) -> None:
    # A Service "gateway" would inject GATEWAY_PORT=tcp://..., GATEWAY_SERVICE_HOST, ... into pods,
    # which the gateway reads as its own settings.
    assert pod_spec["enableServiceLinks"] is False
    for obj in rendered:
        if obj["kind"] == "Service":
            prefix = obj["metadata"]["name"].upper().replace("-", "_")
            assert not prefix.startswith("GATEWAY"), f"Service {obj['metadata']['name']} injects GATEWAY_* vars"


def assert_restricted(pod_spec: Obj) -> None:
    """The "restricted" Pod Security Standard the namespace enforces, plus a read-only root filesystem."""
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod_spec.get(key, False), key
    for volume in pod_spec.get("volumes", []):
        assert "hostPath" not in volume
    for item in containers(pod_spec):
        security = item["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in security
        assert all("hostPort" not in port for port in item.get("ports", []))


def writable_mounts(pod_spec: Obj, container: Obj) -> dict[str, Obj]:
    """The container's writable mount paths, each with its volume."""
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    return {
        mount["mountPath"]: volumes[mount["name"]]
        for mount in container["volumeMounts"]
        if not mount.get("readOnly", False)
    }


def test_pod_meets_the_restricted_pod_security_standard(rendered: list[Obj], pod_spec: Obj) -> None:
    namespace_labels = find(rendered, "Namespace")["metadata"]["labels"]
    assert namespace_labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert_restricted(pod_spec)
    assert pod_spec["securityContext"]["runAsUser"] == image_uid()


def test_only_data_and_tmp_are_writable(pod_spec: Obj, container: Obj) -> None:
    writable = writable_mounts(pod_spec, container)
    assert set(writable) == {"/data", "/tmp"}  # noqa: S108 - a mount point, not a file
    for volume in writable.values():
        assert "sizeLimit" in volume["emptyDir"]


def test_resources_are_sized_from_the_memory_targets(container: Obj) -> None:
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert quantity(requests["memory"]) >= RSS_AT_REST_TARGET_BYTES
    assert quantity(limits["memory"]) >= 2 * quantity(requests["memory"]), "room for open streams"
    assert (requests["memory"], limits["memory"]) == ("128Mi", "512Mi"), "update deploy/README.md too"
    assert 0 < quantity(requests["cpu"]) <= quantity(limits["cpu"])  # the HPA needs a CPU request


def test_grace_period_covers_prestop_and_shutdown_grace(pod_spec: Obj, container: Obj) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", "the preStop hook should be a plain pause"
    assert len(command) == 2
    pause = int(command[1])
    assert pause >= 5, "give endpoint removal time to reach kube-proxy and the ingresses"
    assert pod_spec["terminationGracePeriodSeconds"] > pause + SHUTDOWN_GRACE_S


def test_service_pdb_and_hpa_target_the_pods(rendered: list[Obj], deployment: Obj, container: Obj) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(rendered, "Service")
    assert service["metadata"]["name"] == "llm-gateway"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {port["name"] for port in container["ports"]}
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", PORT, "http")]
    assert "http" in port_names

    pdb = find(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    hpa = find(rendered, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]


def test_prometheus_scrape_annotations(deployment: Obj) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }


def test_optional_servicemonitor_selects_the_service(rendered: list[Obj]) -> None:
    monitor = load_yaml(SERVICE_MONITOR)
    service = find(rendered, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


# ------------------------------------------------------------------------------------------------------
# The Redis (Valkey) of the shared state: compose's `redis` service and kubernetes/optional/redis.yaml

# A version to the patch level, never `latest` or a moving minor tag.
# A full version: major.minor.patch, or major.minor where that is a release (PostgreSQL's 17.6).
PINNED_IMAGE = re.compile(r"[a-z0-9][a-z0-9./-]*:\d+\.\d+(?:\.\d+)?(?:-[a-z0-9.]+)?(?:@sha256:[0-9a-f]{64})?")


def redis_bytes(value: str) -> int:
    """A Redis/Valkey memory size (256mb, 1gb, 100m, 512kb): kb/mb/gb are powers of 1024, k/m/g of 1000."""
    match = re.fullmatch(r"(\d+)([kmg]b?)?", value.lower())
    assert match, f"not a Redis memory size: {value!r}"
    number, unit = match.groups()
    factors = {None: 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    return int(number) * factors[unit]


def docker_bytes(value: str) -> int:
    """A compose memory size (384m, 1g): b, k, m, g are powers of 1024."""
    match = re.fullmatch(r"(\d+)([bkmg]?)", value.lower())
    assert match, f"not a compose memory size: {value!r}"
    number, unit = match.groups()
    return int(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def valkey_arguments(argv: Sequence[str]) -> dict[str, str]:
    """valkey-server's `--name value` arguments as a mapping (the program name first)."""
    assert argv[0] == "valkey-server", "name the server, so that the image's entry point runs it as is"
    rest = list(argv[1:])
    assert len(rest) % 2 == 0, argv
    assert all(name.startswith("--") for name in rest[::2]), argv
    return dict(zip(rest[::2], rest[1::2], strict=True))


def assert_nothing_persisted_and_memory_capped(argv: Sequence[str], memory_limit: float) -> None:
    arguments = valkey_arguments(argv)
    # Limits, budgets and cached answers can be rebuilt: no RDB snapshot, no append-only file.
    assert arguments["--save"] == ""
    assert arguments["--appendonly"] == "no"
    # Below the container's limit, so that Valkey evicts before the kernel kills it. Every key the gateway
    # writes has a TTL (checked against a real server below), which a volatile-* policy needs.
    assert redis_bytes(arguments["--maxmemory"]) < memory_limit
    assert arguments["--maxmemory-policy"] in {"volatile-lru", "volatile-lfu", "volatile-ttl", "allkeys-lru"}


@pytest.fixture(scope="module")
def redis_objects() -> list[Obj]:
    objects = load_yaml_docs(REDIS_MANIFEST)
    by_kind_and_name(objects)  # no two objects of one kind and name
    return objects


@pytest.fixture(scope="module")
def redis_pod_spec(redis_objects: list[Obj]) -> Obj:
    spec: Obj = find(redis_objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def test_optional_redis_is_one_pod_outside_the_base(redis_objects: list[Obj]) -> None:
    assert sorted(obj["kind"] for obj in redis_objects) == ["Deployment", "NetworkPolicy", "Service"]
    for obj in redis_objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
    # Not in kustomization.yaml: a cluster without Redis applies the base and starts (the key is optional).
    assert not any(entry.startswith("optional") for entry in kustomization()["resources"])
    redis_deployment = find(redis_objects, "Deployment")
    assert redis_deployment["spec"]["replicas"] == 1
    assert redis_deployment["spec"]["strategy"] == {"type": "Recreate"}, "never two Redis at once"


def test_optional_redis_meets_the_restricted_pod_security_standard(redis_pod_spec: Obj) -> None:
    assert_restricted(redis_pod_spec)
    assert redis_pod_spec["enableServiceLinks"] is False
    (container,) = redis_pod_spec["containers"]
    writable = writable_mounts(redis_pod_spec, container)
    assert set(writable) == {"/data"}, "the image's working directory, which its entry point checks"
    assert "sizeLimit" in writable["/data"]["emptyDir"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert 0 < quantity(requests["memory"]) <= quantity(limits["memory"])
    assert 0 < quantity(requests["cpu"]) <= quantity(limits["cpu"])


def test_optional_redis_persists_nothing_and_is_probed_with_ping(redis_pod_spec: Obj) -> None:
    (container,) = redis_pod_spec["containers"]
    assert PINNED_IMAGE.fullmatch(container["image"]), f"{container['image']}: pin a version"
    assert "command" not in container, "the image's entry point runs as is"
    limits = container["resources"]["limits"]
    assert_nothing_persisted_and_memory_capped(container["args"], quantity(limits["memory"]))
    assert container["readinessProbe"]["exec"]["command"] in (["valkey-cli", "ping"], ["redis-cli", "ping"])
    assert container["livenessProbe"]


def test_optional_redis_serves_only_the_gateway_at_the_url_the_secret_shows(
    redis_objects: list[Obj], redis_pod_spec: Obj, rendered: list[Obj], deployment: Obj
) -> None:
    redis_deployment = find(redis_objects, "Deployment")
    redis_labels = redis_deployment["spec"]["template"]["metadata"]["labels"]
    assert redis_deployment["spec"]["selector"]["matchLabels"].items() <= redis_labels.items()
    # The gateway's Service, PodDisruptionBudget and Deployment (the autoscaler's target) never select it.
    for obj in rendered:
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        elif obj["kind"] in {"PodDisruptionBudget", "Deployment"}:
            selector = obj["spec"]["selector"]["matchLabels"]
        else:
            continue
        assert not selector.items() <= redis_labels.items(), f"{obj['kind']} would select the Redis pod"

    service = find(redis_objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= redis_labels.items()
    assert not service["metadata"]["name"].upper().replace("-", "_").startswith("GATEWAY")
    (service_port,) = service["spec"]["ports"]
    (container,) = redis_pod_spec["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert service_port["port"] == container_ports[service_port["targetPort"]] == REDIS_PORT

    # The URL the Secret template suggests for this Redis names its Service and port.
    text = SECRET_TEMPLATE.read_text(encoding="utf-8")
    match = re.search(rf"^\s*#\s*{SHARED_URL_KEY}:\s*(\S+)\s*$", text, re.MULTILINE)
    assert match, f"show the in-cluster URL in {SECRET_TEMPLATE.name}"
    url = urlsplit(match.group(1))
    assert (url.scheme, url.hostname, url.port) == ("redis", service["metadata"]["name"], service_port["port"])

    # Only the gateway's pods may connect, on that port.
    policy = find(redis_objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, "pods of this namespace only"
        assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
        assert not peer["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert [port["port"] for port in rule["ports"]] == [service_port["targetPort"]]


def test_compose_and_kubernetes_run_the_same_valkey(redis_pod_spec: Obj) -> None:
    redis = compose()["services"]["redis"]
    (container,) = redis_pod_spec["containers"]
    assert redis["image"] == container["image"], "one pinned version to bump"
    assert valkey_arguments(redis["command"]) == valkey_arguments(container["args"])


# ------------------------------------------------------------------------------------------------------
# Dockerfile: a parser of the instructions this project uses


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    flags: dict[str, str]  # --from=build, --interval=15s, ...
    args: str  # the rest of the line, continuations joined
    line: int

    def words(self) -> list[str]:
        """The arguments: a JSON array (exec form) or shell-like words."""
        if self.args.startswith("["):
            parsed = json.loads(self.args)
            assert isinstance(parsed, list)
            assert all(isinstance(word, str) for word in parsed)
            return parsed
        return shlex.split(self.args)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in instruction.words():
                key, sep, value = word.partition("=")
                assert sep, f"line {instruction.line}: write ENV as KEY=value"
                values[key] = value
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


FLAG = re.compile(r"--([a-z-]+)=(\S+)\s*")


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) are dropped, even inside a continuation
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(part for part in pending if part)))
        pending = []
    assert not pending, f"{path}: the last instruction ends with a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        assert "<<" not in rest or keyword != "RUN", f"line {number}: heredocs are not supported by this parser"
        flags: dict[str, str] = {}
        if keyword in {"FROM", "RUN", "COPY", "ADD", "HEALTHCHECK"}:
            while match := FLAG.match(rest):
                flags[match.group(1)] = match.group(2)
                rest = rest[match.end() :]
        instruction = Instruction(keyword, flags, rest.strip(), number)
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {number}: FROM image [AS name]"
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"line {number}: only ARG may come before the first FROM"
            arg_name, _, default = rest.strip().partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append(instruction)
    assert stages, f"{path} has no FROM"
    return Dockerfile(global_args, stages)


def image_command(stage: Stage) -> list[str]:
    """ENTRYPOINT + CMD of a stage, both required in exec form (no shell between the gateway and SIGTERM)."""
    entrypoint, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
    for instruction in (entrypoint, cmd):
        assert instruction.args.startswith("["), f"line {instruction.line}: use the exec (JSON) form"
    return entrypoint.words() + cmd.words()


def healthcheck_command(stage: Stage) -> list[str]:
    healthcheck = stage.last("HEALTHCHECK")
    kind, _, command = healthcheck.args.partition(" ")
    assert kind == "CMD", "HEALTHCHECK CMD [...]"
    words = json.loads(command)
    assert isinstance(words, list)
    return [str(word) for word in words]


def image_uid() -> int:
    user = parse_dockerfile().final.last("USER").args
    uid = user.partition(":")[0]
    assert uid.isdigit(), "USER must be numeric, so that Kubernetes' runAsNonRoot can check it"
    return int(uid)


# ------------------------------------------------------------------------------------------------------
# .dockerignore: Docker's matching rules (github.com/moby/patternmatcher)


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool


def ignore_pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**`, as moby/patternmatcher translates it to a regexp."""
    out = "^"
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 == len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif char in "[]-^":
            out += char  # character classes pass through, as in patternmatcher
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + "$")


def load_dockerignore(path: Path = DOCKERIGNORE) -> list[IgnorePattern]:
    patterns = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        line = posixpath.normpath(line)
        if len(line) > 1 and line.startswith("/"):
            line = line[1:]
        patterns.append(IgnorePattern(ignore_pattern_regex(line), exclusion))
    return patterns


def is_ignored(relative: str, patterns: list[IgnorePattern]) -> bool:
    """Whether a path (relative to the build context, with /) is left out of the context."""
    parents = relative.split("/")[:-1]
    ignored = False
    for pattern in patterns:
        if pattern.exclusion != ignored:
            continue  # only a later pattern of the other kind can change the outcome
        matched = bool(pattern.regex.match(relative)) or any(
            pattern.regex.match("/".join(parents[: i + 1])) for i in range(len(parents))
        )
        if matched:
            ignored = not pattern.exclusion
    return ignored


def context_files(source: Path) -> list[str]:
    """The files under a COPY source, relative to the build context."""
    if source.is_file():
        return [source.relative_to(ROOT).as_posix()]
    return sorted(path.relative_to(ROOT).as_posix() for path in source.rglob("*") if path.is_file())


# ------------------------------------------------------------------------------------------------------
# Dockerfile: tests


def pyproject() -> Obj:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def test_dockerfile_is_multistage_on_official_slim_python() -> None:
    dockerfile = parse_dockerfile()
    assert len(dockerfile.stages) >= 2
    minimum = re.search(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert minimum
    for stage in dockerfile.stages:
        match = re.fullmatch(
            r"(?:docker\.io/(?:library/)?)?python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?",
            stage.base,
        )
        assert match, f"{stage.base}: use the official slim Python image"
        assert tuple(map(int, match.groups())) >= tuple(map(int, minimum.groups()))
    names = [stage.name for stage in dockerfile.stages]
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY"):
            if "from" in instruction.flags:
                assert instruction.flags["from"] in names[: dockerfile.stages.index(stage)]
        assert not stage.all("ADD"), "COPY, not ADD"


def test_dockerfile_copies_existing_files_not_excluded_by_dockerignore() -> None:
    dockerfile = parse_dockerfile()
    patterns = load_dockerignore()
    copied: list[str] = []
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY"):
            if "from" in instruction.flags:
                continue
            *sources, _destination = instruction.words()
            for source in sources:
                assert not set(source) & set("*?["), f"line {instruction.line}: name files, no wildcards"
                path = ROOT / source
                assert path.exists(), f"line {instruction.line}: COPY {source}, which does not exist"
                files = [f for f in context_files(path) if not is_ignored(f, patterns)]
                assert files, f"line {instruction.line}: .dockerignore leaves nothing of {source} in the context"
                copied.extend(files)
    # The console script's module is among what gets copied.
    module = pyproject()["project"]["scripts"]["gateway"].partition(":")[0]
    assert module.replace(".", "/") + ".py" in copied
    assert "pyproject.toml" in copied
    assert "constraints.txt" in copied


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    # BuildKit prefers deploy/Dockerfile.dockerignore to the context's .dockerignore: there must be none.
    assert not DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore").exists()
    patterns = load_dockerignore()
    for path in [
        ".git/config",
        ".venv/bin/python",
        "deploy/gateway.env",
        "deploy/.env",
        "dist/flexai_gateway-0.1.0-py3-none-any.whl",
        "tests/test_deploy.py",
        "gateway/__pycache__/cli.cpython-311.pyc",
        "config/gateway.toml",
    ]:
        assert is_ignored(path, patterns), f"{path} would be sent to the Docker builder"
    for path in ["pyproject.toml", "constraints.txt", "README.md", "gateway/cli.py", "gateway/sub/x.py"]:
        assert not is_ignored(path, patterns), f"{path} would be left out of the build context"


def dockerfile_requirements() -> list[str]:
    """What the build stage installs before the wheel: the output of its `python -c` that reads
    pyproject.toml into the requirements file, run here on this checkout's pyproject.toml."""
    for stage in parse_dockerfile().stages[:-1]:
        for instruction in stage.all("RUN"):
            words = instruction.words()
            if words[:2] != ["python", "-c"] or "tomllib" not in words[2]:
                continue
            assert words[3] == ">", f"line {instruction.line}: python -c '...' > requirements file"
            assert words[words.index("-r") + 1] == words[4], "pip installs that file"
            result = run([sys.executable, "-c", words[2]], cwd=ROOT, timeout=30)
            assert result.returncode == 0, f"line {instruction.line}: {tail(result.stderr)}"
            return result.stdout.splitlines()
    pytest.fail("the build stage has no RUN python -c that lists the requirements from pyproject.toml")


def requirement_name(requirement: str) -> tuple[str, list[str]]:
    """A PEP 508 requirement's normalized name, and its extras."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, f"not a requirement: {requirement!r}"
    extras = [extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()]
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), extras


def test_dockerfile_installs_the_tracing_and_shared_extras_pinned() -> None:
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    requirements = dockerfile_requirements()
    # Everything but the dev extra: tracing for [tracing] enabled, shared for GATEWAY_SHARED_REDIS_URL,
    # postgres for GATEWAY_USAGE_DATABASE_URL.
    assert requirements == [*project["dependencies"], *extras["tracing"], *extras["shared"], *extras["postgres"]]
    pinned = {
        requirement_name(line)[0]
        for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    for requirement in requirements:
        name, _extras = requirement_name(requirement)
        assert name in pinned, f"{requirement}: pin {name} in constraints.txt"
    for requirement in extras["shared"]:
        # redis[hiredis]: the extra is the package it brings, the C parser; pinned as well.
        for extra in requirement_name(requirement)[1]:
            assert extra in pinned, f"{requirement}: pin {extra} in constraints.txt"
    assert "redis" in {requirement_name(r)[0] for r in extras["shared"]}
    # psycopg[binary]: the extra brings psycopg-binary (psycopg with its own libpq); pinned as well.
    assert {"psycopg", "psycopg-binary", "psycopg-pool"} <= pinned


def test_dockerfile_installs_pinned_dependencies() -> None:
    build_runs = [i.args for stage in parse_dockerfile().stages[:-1] for i in stage.all("RUN")]
    installs = [run for run in build_runs if "pip" in run and " install " in run]
    assert installs, "the build stage installs with pip"
    for command in installs:
        assert "-c constraints.txt" in command, f"install with the pinned constraints: {command}"


def test_dockerfile_final_stage_runs_the_console_script_as_non_root() -> None:
    final = parse_dockerfile().final
    assert image_uid() != 0
    assert [word for i in final.all("EXPOSE") for word in i.words()] == [str(PORT)]
    assert final.last("WORKDIR").args == "/data"
    assert final.last("VOLUME").words() == ["/data"], "/data is the one declared data directory"
    assert final.env()["PATH"].startswith("/opt/venv/bin:")
    assert any(i.flags.get("from") and i.words()[0] == "/opt/venv" for i in final.all("COPY"))
    assert not final.all("RUN") or final.all("USER")[-1].line > final.all("RUN")[-1].line

    health = healthcheck_command(final)
    assert health[0] == "python"
    assert "/healthz" in " ".join(health)

    command = image_command(final)
    assert command == IMAGE_COMMAND
    scripts = pyproject()["project"]["scripts"]
    assert command[0] in scripts
    assert scripts[command[0]] == "gateway.cli:main"


# ------------------------------------------------------------------------------------------------------
# Compose


def compose() -> Obj:
    return load_yaml(COMPOSE)


def compose_defaults(text: str) -> str:
    """Interpolates ${VAR:-default} with its default (what compose does when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def service_environment(service: Obj) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(item.partition("=")[::2] for item in environment)
    return {key: str(value) for key, value in environment.items()}


def test_compose_references_only_existing_files() -> None:
    spec = compose()
    top_level = {key for key in spec if not key.startswith("x-")}  # x-*: extension fields (YAML anchors)
    assert top_level <= {"name", "services", "volumes", "networks", "configs", "secrets"}, "no `version:`"
    declared_volumes = set(spec.get("volumes") or {})
    gitignore = (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()
    for name, service in spec["services"].items():
        if "build" not in service:
            # An upstream image (the shared profile's Valkey), pulled as is: a pinned version.
            assert PINNED_IMAGE.fullmatch(service["image"]), f"{name}: pin {service['image']} to a version"
        else:
            build = service["build"]
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, f"{name}: build from the repository root, where .dockerignore is"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        for volume in service.get("volumes", []):
            assert isinstance(volume, dict), f"{name}: use the long volume syntax"
            if volume["type"] == "bind":
                assert (DEPLOY / volume["source"]).is_file(), f"{name}: {volume['source']} does not exist"
            else:
                assert volume["type"] == "volume"
                assert volume["source"] in declared_volumes
        for env_file in service.get("env_file", []):
            entry = {"path": env_file} if isinstance(env_file, str) else env_file
            path = DEPLOY / entry["path"]
            if entry.get("required", True):
                assert path.is_file(), f"{name}: env_file {entry['path']} does not exist"
            else:
                # Created by the user from the shipped example, and never committed.
                assert path.with_name(path.name + ".example").is_file()
                assert path.name in gitignore


def test_compose_gateway_service_matches_the_image_contract() -> None:
    gateway = compose()["services"]["gateway"]
    assert "profiles" not in gateway, "plain `docker compose up` starts the gateway"
    assert "command" not in gateway, "the image's CMD runs as is"
    assert "entrypoint" not in gateway
    mounts = {volume["target"]: volume for volume in gateway["volumes"]}
    config = service_environment(gateway)["GATEWAY_CONFIG"]
    assert (DEPLOY / mounts[config]["source"]).resolve() == DEPLOY_CONFIG, "the same config as Kubernetes"
    assert mounts[config]["read_only"] is True
    assert mounts["/data"]["type"] == "volume"
    assert gateway["read_only"] is True
    assert "/tmp" in gateway["tmpfs"]  # noqa: S108 - a mount point, not a file
    assert gateway["cap_drop"] == ["ALL"]
    assert [compose_defaults(port) for port in gateway["ports"]] == [f"127.0.0.1:{PORT}:{PORT}"]
    assert quantity(gateway["stop_grace_period"].removesuffix("s")) > SHUTDOWN_GRACE_S
    assert "GATEWAY_UPSTREAM_API_KEY" not in service_environment(gateway), "the key comes from the env file"
    # One gateway shares nothing: plain `docker compose up` starts no Redis and waits for none.
    assert SHARED_URL_ENV not in service_environment(gateway)
    assert "depends_on" not in gateway

    example = (DEPLOY / "gateway.env.example").read_text(encoding="utf-8")
    for variable in ("GATEWAY_UPSTREAM_API_KEY", SHARED_URL_ENV):
        assert f"{variable}=" in example
        assert not re.search(rf"^\s*{variable}=\S", example, re.MULTILINE), f"ship no {variable}"


def test_compose_demo_profile_runs_gateway_demo() -> None:
    services = compose()["services"]
    demos = [service for service in services.values() if "demo" in service.get("profiles", [])]
    assert len(demos) == 1
    demo = demos[0]
    entrypoint = demo.get("entrypoint") or parse_dockerfile().final.last("ENTRYPOINT").words()
    argv = [*entrypoint, *demo["command"]]
    assert argv[:2] == ["gateway", "demo"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "env_file" not in demo, "the demo needs no key"
    host_ports = {
        name: compose_defaults(port).rsplit(":", 2)[1]
        for name, service in services.items()
        for port in service.get("ports", [])
    }
    assert len(set(host_ports.values())) == len(host_ports), "every gateway service can run beside the others"


def shared_replicas() -> dict[str, Obj]:
    """The compose services that share their state in Redis (GATEWAY_SHARED_REDIS_URL set)."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if SHARED_URL_ENV in service_environment(service)
    }


def test_compose_shared_profile_runs_replicas_on_one_redis() -> None:
    services = compose()["services"]
    gateway, redis, replicas = services["gateway"], services["redis"], shared_replicas()
    assert len(replicas) >= 2, "an example of several replicas"
    in_profile = {name for name, service in services.items() if "shared" in service.get("profiles", [])}
    assert in_profile == {*replicas, "redis", "postgres"}, "the shared profile: the replicas, Redis, PostgreSQL"
    for name, replica in replicas.items():
        assert replica["profiles"] == ["shared"]
        environment = service_environment(replica)
        url = urlsplit(environment.pop(SHARED_URL_ENV))
        assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", REDIS_PORT, "/0")
        assert url.password is None, f"{name}: a password belongs in gateway.env, not in compose.yaml"
        ledger = urlsplit(environment.pop(LEDGER_URL_ENV))
        assert (ledger.scheme, ledger.hostname, ledger.port) == ("postgresql", "postgres", 5432)
        assert ledger.password is None, f"{name}: a password belongs in gateway.env, not in compose.yaml"
        assert replica["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
        # Otherwise the default gateway: image, config, key file, data volume, hardening, the image's CMD.
        assert environment == service_environment(gateway)
        assert set(replica) == {*gateway, "profiles", "depends_on"}, name
        for key in set(gateway) - {"environment", "ports"}:
            assert replica[key] == gateway[key], f"{name}: {key} differs from the gateway service"

    assert "ports" not in redis, "reachable on the project's network only"
    assert redis["healthcheck"]["test"] in (["CMD", "valkey-cli", "ping"], ["CMD", "redis-cli", "ping"])
    assert_nothing_persisted_and_memory_capped(redis["command"], docker_bytes(redis["mem_limit"]))
    # Non-root from the start (the entry point then never steps down, so no capability is needed), with a
    # read-only root filesystem and /data, its working directory, in memory.
    uid = redis["user"].partition(":")[0]
    assert uid.isdigit(), "a numeric user"
    assert int(uid) != 0
    assert redis["read_only"] is True
    assert redis["tmpfs"] == ["/data"]
    assert redis["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in redis["security_opt"]


def test_compose_postgres_keeps_the_ledger_on_a_volume_unpublished_and_unprivileged() -> None:
    postgres = compose()["services"]["postgres"]
    assert "ports" not in postgres, "reachable on the project's network only"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    environment = service_environment(postgres)
    ledger = urlsplit(service_environment(next(iter(shared_replicas().values())))[LEDGER_URL_ENV])
    assert (environment["POSTGRES_USER"], environment["POSTGRES_DB"]) == (ledger.username, ledger.path[1:])
    # The record of what was spent outlives the container: a named volume on the data directory.
    [volume] = postgres["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", "/var/lib/postgresql/data")
    uid = postgres["user"].partition(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    assert postgres["read_only"] is True
    assert postgres["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in postgres["security_opt"]


# ------------------------------------------------------------------------------------------------------
# systemd


def systemd_unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in SYSTEMD_UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_runs_the_image_command() -> None:
    service = systemd_unit()["Service"]
    argv = shlex.split(service["ExecStart"][-1])
    assert argv[0].endswith("/bin/gateway")
    assert ["gateway", *argv[1:]] == IMAGE_COMMAND
    assert int(service["TimeoutStopSec"][-1]) > SHUTDOWN_GRACE_S
    assert service["DynamicUser"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["WorkingDirectory"] == [f"/var/lib/{service['StateDirectory'][-1]}"]
    assert "EnvironmentFile" in service


def test_systemd_unit_has_no_unknown_settings() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = run([analyze, "verify", SYSTEMD_UNIT], timeout=30)
    # The one complaint expected on a machine where the gateway is not installed at /opt/flexai-gateway.
    problems = [line for line in result.stderr.splitlines() if line and "is not executable" not in line]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------------
# The image's command, run from an install of the built wheel (slow: builds, installs from the index)


@pytest.fixture(scope="module")
def installed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the gateway's wheel and its pinned dependencies, as the image's build stage makes:
    the Dockerfile's requirement list (the dependencies and the extras it names), then the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist, venv = tmp / "dist", tmp / "venv"
    requirements = tmp / "requirements.txt"
    requirements.write_text("\n".join(dockerfile_requirements()) + "\n", encoding="utf-8")
    built = run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT], timeout=240)
    assert built.returncode == 0, f"python -m build failed:\n{tail(built.stdout)}\n{tail(built.stderr)}"
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    created = run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=60)
    assert created.returncode == 0, tail(created.stderr)
    # As in the Dockerfile: the venv has no pip; this interpreter's pip installs into it.
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-c",
            ROOT / "constraints.txt",
            "-r",
            requirements,
            wheels[0],
        ],
        timeout=240,
    )
    assert installed.returncode == 0, f"pip install failed:\n{tail(installed.stdout)}\n{tail(installed.stderr)}"
    assert (venv / "bin" / "gateway").is_file()
    return venv


def image_environment(venv: Path, home: Path) -> dict[str, str]:
    """The final stage's ENV, with /opt/venv mapped to `venv` and /data (the image's data directory and
    home) to `home`, on top of a clean environment: nothing is written outside the test's directories."""
    env = clean_env()
    for key, value in parse_dockerfile().final.env().items():
        if key == "PATH":
            value = value.replace("/opt/venv", str(venv)).replace("$PATH", os.environ.get("PATH", ""))
        elif value == "/data" or value.startswith("/data/"):
            value = str(home) + value.removeprefix("/data")
        assert "$" not in value, f"ENV {key}: expand it here"
        env[key] = value
    env["HOME"] = str(home)  # the image user's home is /data, its working directory
    return env


def get_status(port: int, path: str) -> int:
    return get(port, path)[0]


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    finally:
        connection.close()


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


def stop(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM by pid, then a bounded wait. Returns the exit code, or None if it had to be killed."""
    if process.poll() is not None:
        return process.returncode
    os.kill(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        return None


@dataclass
class Served:
    """A gateway process started from the wheel's install, on loopback."""

    process: subprocess.Popen[bytes]
    argv: list[str]
    port: int
    log: Path

    def log_tail(self) -> str:
        return tail(self.log.read_text(errors="replace"))

    def wait_for(self, path: str, want: int) -> int | None:
        """Polls GET path until it answers `want` (at most 100 tries and 20 s); the last status seen."""
        status = None
        deadline = time.monotonic() + 20
        for _ in range(100):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
            try:
                status = get_status(self.port, path)
            except OSError:
                status = None
            if status == want:
                break
            time.sleep(0.2)
        assert self.process.poll() is None, (
            f"`{shlex.join(self.argv)}` exited with {self.process.returncode}:\n{self.log_tail()}"
        )
        return status


def start_like_the_image(
    venv: Path,
    command: list[str],
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,
    data: Path | None = None,
) -> Served:
    """Runs an image command (`gateway ...` with --host 0.0.0.0) from `venv`: on 127.0.0.1 and a free port
    (the only changes to its arguments), in an empty working directory (the image's /data; `data`, when
    given, is one that several processes share, as compose's replicas share a volume), with the image's
    environment."""
    assert command[0] == "gateway"
    port = free_port()
    args = list(command[1:])
    args[args.index("--host") + 1] = "127.0.0.1"
    if "--port" in args:
        args[args.index("--port") + 1] = str(port)
    else:
        args += ["--port", str(port)]
    argv = [str(venv / "bin" / "gateway"), *args]
    if data is None:
        data = tmp_path / "data"
        data.mkdir()
    env = {**image_environment(venv, home=data), **(extra_env or {})}
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=data, env=env, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
    return Served(process, argv, port, log)


@slow
@pytest.mark.timeout(600)
def test_wheel_install_serves_healthz_as_the_image_does(installed_gateway: Path, tmp_path: Path) -> None:
    final = parse_dockerfile().final
    command = image_command(final)
    assert command == IMAGE_COMMAND
    before = snapshot(installed_gateway)
    # The image's CMD exactly (no config file, GATEWAY_CONFIG unset), except that the upstream is a closed
    # port on loopback: the catalog fetch at start-up must not leave this machine.
    offline = {"GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}"}
    served = start_like_the_image(installed_gateway, command, tmp_path, offline)
    try:
        status = served.wait_for("/healthz", 200)
        assert status == 200, f"GET /healthz gave {status}:\n{served.log_tail()}"
        # Alive but not ready: no catalog without an upstream, so Kubernetes sends it no traffic.
        assert get_status(served.port, "/readyz") == 503

        # The image's HEALTHCHECK command, with the venv's python, passes against the running gateway.
        health = healthcheck_command(final)
        check = run(
            [installed_gateway / "bin" / "python", *health[1:]],
            env={**image_environment(installed_gateway, home=tmp_path), "GATEWAY_PORT": str(served.port)},
            timeout=10,
        )
        assert check.returncode == 0, f"the image's HEALTHCHECK failed:\n{tail(check.stderr)}"
    finally:
        exit_code = stop(served.process, timeout=20)

    assert exit_code == 0, f"after SIGTERM: exit code {exit_code}:\n{served.log_tail()}"
    # Read-only root filesystem friendly: nothing was written into the install (the image's /opt/venv).
    assert snapshot(installed_gateway) == before


@slow
@pytest.mark.timeout(600)
def test_compose_demo_command_gets_ready_without_a_key(installed_gateway: Path, tmp_path: Path) -> None:
    demo = next(s for s in compose()["services"].values() if "demo" in s.get("profiles", []))
    command = [*parse_dockerfile().final.last("ENTRYPOINT").words(), *demo["command"]]
    served = start_like_the_image(installed_gateway, command, tmp_path)  # no key, no config, no network
    try:
        status = served.wait_for("/readyz", 200)
        assert status == 200, f"the demo never got ready (last GET /readyz: {status}):\n{served.log_tail()}"
        assert get_status(served.port, "/healthz") == 200
    finally:
        exit_code = stop(served.process, timeout=20)
    assert exit_code == 0, f"after SIGTERM: exit code {exit_code}:\n{served.log_tail()}"


@slow
@pytest.mark.timeout(600)
def test_deploy_config_passes_check_config(installed_gateway: Path, tmp_path: Path) -> None:
    # As deployed: the config file from GATEWAY_CONFIG, the upstream key from the environment.
    env = {
        **clean_env(),
        "GATEWAY_CONFIG": str(DEPLOY_CONFIG),
        "GATEWAY_UPSTREAM_API_KEY": "sk-test-not-a-key",
    }
    result = run(
        [installed_gateway / "bin" / "gateway", "check-config", DEPLOY_CONFIG],
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, f"gateway check-config rejected {DEPLOY_CONFIG}:\n{tail(result.stdout)}\n" + tail(
        result.stderr
    )


def gauge(metrics: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else None


@slow
@pytest.mark.timeout(600)
def test_compose_shared_replicas_share_a_redis_run_as_compose_runs_it(
    installed_gateway: Path, tmp_path: Path, postgres: PostgresServer
) -> None:
    server = shutil.which("valkey-server") or shutil.which("redis-server")
    if server is None:
        pytest.skip("neither valkey-server nor redis-server is installed")
    import redis  # the shared extra's client, also in the dev extra

    services = compose()["services"]
    # The compose service's command, with a local server on a free loopback port instead of the image.
    redis_argv = [str(word) for word in services["redis"]["command"]]
    valkey_arguments(redis_argv)
    redis_port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    argv = [server, *redis_argv[1:], "--port", str(redis_port), "--bind", "127.0.0.1"]
    redis_log = tmp_path / "redis.log"
    with redis_log.open("wb") as out:
        redis_process = subprocess.Popen(argv, cwd=redis_dir, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
    client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2)
    replicas: list[Served] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            assert redis_process.poll() is None, f"{shlex.join(argv)} exited:\n{tail(redis_log.read_text())}"
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"{server} never answered PING:\n{tail(redis_log.read_text())}"
            time.sleep(0.1)

        # Each replica as compose runs it: the image's CMD, the service's environment (the config mounted
        # from deploy/, the URL with the compose host name `redis` pointing here), one shared /data.
        data = tmp_path / "data"
        data.mkdir()
        ledger_url = postgres.database()
        command = image_command(parse_dockerfile().final)
        for name, service in sorted(shared_replicas().items()):
            environment = service_environment(service)
            mounts = {volume["target"]: volume for volume in service["volumes"]}
            url = urlsplit(environment[SHARED_URL_ENV])
            environment[SHARED_URL_ENV] = url._replace(netloc=f"127.0.0.1:{redis_port}").geturl()
            environment[LEDGER_URL_ENV] = ledger_url  # the compose host name `postgres`, pointing here
            environment["GATEWAY_CONFIG"] = str(DEPLOY / mounts[environment["GATEWAY_CONFIG"]]["source"])
            environment["GATEWAY_UPSTREAM_API_KEY"] = "sk-test-not-a-key"  # from gateway.env
            environment["GATEWAY_UPSTREAM_URL"] = f"http://127.0.0.1:{free_port()}"  # closed: stays local
            # What is checked here is the wiring, not latency: a generous per-call limit, so that a busy CI
            # machine (the default is 50 ms, connecting included) cannot keep a heartbeat from landing.
            environment["GATEWAY_SHARED_TIMEOUT"] = "1.0"
            (tmp_path / name).mkdir()
            replicas.append(start_like_the_image(installed_gateway, command, tmp_path / name, environment, data))

        # Every replica reaches the Redis and sees all the others through it.
        want = {"gateway_shared_store_up": 1.0, "gateway_shared_store_replicas": float(len(replicas))}
        for served in replicas:
            assert served.wait_for("/healthz", 200) == 200, served.log_tail()
            seen: dict[str, float | None] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status, metrics = get(served.port, "/metrics")
                assert status == 200, metrics
                seen = {name: gauge(metrics, name) for name in want}
                if seen == want:
                    break
                time.sleep(0.25)
            members = client.zrange("gw:replicas", 0, -1, withscores=True)
            logs = "\n\n".join(f"{shlex.join(other.argv)}:\n{other.log_tail()}" for other in replicas)
            assert seen == want, f"port {served.port}, replicas in Redis {members}:\n{logs}"

        # Every key the gateway wrote has a TTL, which the volatile-* eviction policy needs, except the
        # ledger's queue: records not yet in PostgreSQL must never be evicted (it is empty once written).
        keys = list(client.scan_iter())
        assert keys, "the replicas wrote nothing to Redis"
        for key in keys:
            assert key == b"gw:ledger" or client.pttl(key) > 0, f"{key!r} has no TTL"
        assert client.type("gw:ledger") == b"stream"
        # The replicas created the ledger's tables in the PostgreSQL the compose URL names.
        with psycopg.connect(ledger_url) as conn:
            assert conn.execute("SELECT version FROM usage_schema").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        exit_codes = [stop(served.process, timeout=20) for served in replicas]
        client.close()
        redis_exit = stop(redis_process, timeout=10)
    assert exit_codes == [0] * len(replicas), "\n".join(served.log_tail() for served in replicas)
    assert redis_exit == 0, tail(redis_log.read_text())
    assert list(redis_dir.iterdir()) == [], "the server persisted something"
