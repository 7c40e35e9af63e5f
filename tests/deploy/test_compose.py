"""docker-compose.yml and the Dockerfiles, checked without a Docker engine: the file is valid
Compose (the specification's JSON schema, vendored in compose-spec/), and everything it names
exists — build contexts, Dockerfiles and what they copy, bind-mounted paths, ports, and the
APILANE_* variables (each one is read by the service it is given to) — and NATS runs the
generated config, with each service mounting only its own identity."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from apilane.runtime import natsauth
from apilane.testing.nats_credentials import directory_of

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = Path(__file__).parent / "compose-spec" / "compose-spec.json"
# The services built from this repository, and where their code lives.
BUILT = {
    "discovery": "services/discovery",
    "renderer": "services/renderer",
    "node-loader": "services/node-loader",
}
LIBRARY_SOURCES = [REPO / "shared" / name / "src" for name in ("model", "runtime", "kube")]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def service(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = compose()["services"][name]
    return spec


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def dockerfile(name: str) -> tuple[Path, list[str]]:
    """The Dockerfile's path and its instructions as built for `name`: continuation lines
    joined, `${ARG}` replaced by the compose file's build args or the ARG defaults."""
    build = service(name)["build"]
    context = REPO / build["context"]
    path = context / build.get("dockerfile", "Dockerfile")
    joined = path.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    values = {
        match.group(1): match.group(2) or ""
        for line in lines
        if (match := re.match(r"ARG (\w+)(?:=(\S+))?$", line))
    }
    values |= {key: str(value) for key, value in build.get("args", {}).items()}
    return path, [
        re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), line) for line in lines
    ]


def source_text(root: Path) -> str:
    return "\n".join(p.read_text() for p in root.rglob("*.py") if "testing" not in p.parts)


def reads_variable(code: str, variable: str) -> bool:
    """`Env` reads drop the APILANE_ prefix (env.int("HTTP_PORT", ...)); accept both forms."""
    short = variable.removeprefix("APILANE_")
    return variable in code or re.search(rf"""\(\s*["']{re.escape(short)}["']""", code) is not None


def healthcheck_port(name: str) -> int:
    test = " ".join(service(name)["healthcheck"]["test"])
    match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/", test)
    assert match, f"{name}: the healthcheck calls no local HTTP endpoint: {test}"
    return int(match.group(1))


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    # The file declares draft 2019-09 under a URI jsonschema does not know by that spelling.
    assert "2019-09" in schema["$schema"]
    validator_class = jsonschema.Draft201909Validator
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_the_stack_has_every_part_the_issue_names() -> None:
    services = compose()["services"]
    assert {"nats", "kube-api", "jaeger", *BUILT} <= set(services)
    assert "--jetstream" in services["nats"]["command"]
    assert any(str(v).endswith(":/data") for v in services["nats"]["volumes"])
    assert services["kube-api"]["image"].startswith("rancher/k3s:")
    assert services["kube-api"]["privileged"] is True
    assert "127.0.0.1:16686:16686" in services["jaeger"]["ports"]
    assert {"4317", "4318"} <= set(services["jaeger"]["expose"])


def test_every_image_is_pinned() -> None:
    for name, spec in compose()["services"].items():
        if "image" in spec and "build" not in spec:
            repository, _, tag = spec["image"].rpartition(":")
            assert repository and re.match(r"^v?\d+\.\d+", tag), f"{name}: {spec['image']}"
    for name in BUILT:
        _, lines = dockerfile(name)
        args = dict(
            re.match(r"ARG (\w+)=(\S+)", line).groups()  # type: ignore[union-attr]
            for line in lines
            if re.match(r"ARG \w+=", line)
        )
        assert re.match(r"^\d+\.\d+\.\d+$", args["UV_VERSION"]), name
        for key, image in args.items():
            if key.endswith("_IMAGE"):
                assert re.search(r":\d+\.\d+(\.\d+)?-", image), f"{name}: {key}={image} not pinned"


@pytest.mark.parametrize("name", sorted(BUILT))
def test_build_context_dockerfile_and_copied_paths_exist(name: str) -> None:
    build = service(name)["build"]
    assert build["context"] == ".", "services are built from the repository root"
    assert build["args"]["SERVICE"] == name, "one Dockerfile, the service chosen by SERVICE"
    path, lines = dockerfile(name)
    assert path.is_file(), f"{path} is missing"
    assert path == REPO / "services" / "Dockerfile"
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _target = shlex.split(line)[1:]
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such path"


def test_the_image_copies_every_workspace_members_pyproject() -> None:
    _, lines = dockerfile("discovery")
    copied = {shlex.split(line)[1] for line in lines if line.startswith("COPY ")}
    members = {str(p.relative_to(REPO)) for p in REPO.glob("*/*/pyproject.toml")}
    members |= {str(p.relative_to(REPO)) for p in REPO.glob("*/pyproject.toml")}
    assert members <= copied | {"pyproject.toml"}, members - copied


@pytest.mark.parametrize("name", sorted(BUILT))
def test_image_installs_only_its_own_distribution_and_runs_its_entry_point(name: str) -> None:
    path, lines = dockerfile(name)
    distribution = f"apilane-{name}"
    pyproject = (REPO / BUILT[name] / "pyproject.toml").read_text()
    assert f'name = "{distribution}"' in pyproject
    syncs = [line for line in lines if "uv sync" in line]
    assert syncs, f"{path}: no uv sync"
    for line in syncs:
        assert "--frozen" in line and "--no-dev" in line, line
        assert f"--package {distribution}" in line, line
    [entrypoint] = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT").strip()) == ["/app/service"]
    link = next(line for line in lines if "/app/service" in line and "ln -s" in line)
    assert f"/app/.venv/bin/{distribution}" in link
    # the console script the link names exists, and its module has a __main__
    script = re.search(rf'^{re.escape(distribution)} = "([\w.]+):main"', pyproject, re.M)
    assert script, f"{distribution} declares no console script of its own name"
    package = REPO / BUILT[name] / "src" / Path(*script.group(1).split(".")[:-1])
    assert (package / "__main__.py").is_file()


def test_services_run_as_non_root_where_they_can() -> None:
    for name in ("discovery", "renderer"):
        _, lines = dockerfile(name)
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users, f"{name}: no USER"
        assert not users[-1].startswith(("0", "root")), f"{name} runs as {users[-1]}"
    # node-loader loads BPF programs: root, privileged, and nothing pretends otherwise.
    assert service("node-loader")["privileged"] is True


@pytest.mark.parametrize("name", sorted(BUILT))
def test_http_port_matches_healthcheck_and_image(name: str) -> None:
    port = int(environment(name)["APILANE_HTTP_PORT"])
    assert healthcheck_port(name) == port
    _, lines = dockerfile(name)
    assert f"EXPOSE {port}" in lines


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_apilane_variable_is_read_by_its_service(name: str) -> None:
    code = source_text(REPO / BUILT[name] / "src") + "".join(map(source_text, LIBRARY_SOURCES))
    for variable in sorted(v for v in environment(name) if v.startswith("APILANE_")):
        assert reads_variable(code, variable), f"{name}: nothing reads {variable}"


@pytest.mark.parametrize("name", sorted(BUILT))
def test_tracing_goes_to_jaeger(name: str) -> None:
    env = environment(name)
    assert env["OTEL_SERVICE_NAME"] == f"apilane-{name}"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"


def test_dependencies_wait_for_health() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        for dependency, condition in spec.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
                )
    for name in BUILT:
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy"
    for name in ("discovery", "renderer"):
        seed = services[name]["depends_on"]["kube-seed"]
        assert seed["condition"] == "service_completed_successfully"


def test_bind_mounts_and_seeded_files_exist() -> None:
    named_volumes = set(compose().get("volumes", {}))
    for name, spec in compose()["services"].items():
        for volume in spec.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: bind source {source} is missing"
            elif not source.startswith(("/", "$")):
                assert source in named_volumes, f"{name}: volume {source} is not declared"
    seed_command = " ".join(service("kube-seed")["command"])
    for demo_file in re.findall(r"/demo/([\w.-]+\.yaml)", seed_command):
        assert (REPO / "deploy/demo" / demo_file).is_file(), demo_file


def test_node_loader_gets_the_host_mounts_and_a_dedicated_cgroup() -> None:
    spec = service("node-loader")
    targets = {}
    for volume in spec["volumes"]:
        if isinstance(volume, dict):
            targets[volume["target"]] = volume["source"]
        else:
            source, target, *_ = volume.split(":")
            targets[target] = source
    assert targets["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert targets["/lib/modules"] == "/lib/modules"
    assert targets["/usr/src"] == "/usr/src"
    assert "/sys/fs/cgroup" in targets["/host/cgroup2"]
    env = environment("node-loader")
    cgroup = env["APILANE_CGROUP_PATH"]
    # A child of the mounted cgroup2 hierarchy, never its root (the safety rule).
    assert cgroup.startswith("/host/cgroup2/") and cgroup.rstrip("/") != "/host/cgroup2"
    assert env.get("APILANE_ALLOW_ROOT_CGROUP", "false") == "false"
    assert env["APILANE_MAP_BACKEND"] == "bpf"


# --------------------------------------------------------------------------- NATS

COMPOSE_IDENTITIES = REPO / "deploy/compose/identities.toml"


def mounts(name: str) -> dict[str, str]:
    """target -> source of a service's volumes."""
    found = {}
    for volume in service(name).get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume["source"]
        else:
            source, target, *_ = volume.split(":")
            found[target] = source
    return found


def test_the_nats_config_is_the_generators_output() -> None:
    committed = (REPO / "deploy/compose/nats.conf").read_text()
    assert committed == natsauth.render_server_config(natsauth.PROFILES["compose"]), (
        "regenerate it: python -m apilane.runtime.natsauth server-config compose"
    )


def test_nats_runs_the_committed_config_with_the_generated_accounts_and_tls() -> None:
    command = service("nats")["command"]
    config = command[command.index("--config") + 1]
    volumes = mounts("nats")
    assert volumes[config] == "./deploy/compose/nats.conf"
    profile = natsauth.PROFILES["compose"]
    included = posixpath.normpath(
        posixpath.join(posixpath.dirname(config), profile.accounts_include)
    )
    auth_dir = posixpath.dirname(included)
    assert volumes[auth_dir] == "nats-auth-server"
    assert profile.tls is not None and profile.tls.verify, "compose runs mutual TLS"
    for path in (profile.tls.cert_file, profile.tls.key_file, profile.tls.ca_file):
        assert posixpath.dirname(path) == auth_dir
    assert service("nats")["depends_on"]["nats-auth"]["condition"] == (
        "service_completed_successfully"
    )


def test_the_nats_auth_step_writes_every_identity_of_the_identities_file() -> None:
    step = service("nats-auth")
    assert step["entrypoint"][-1] == "apilane.testing.nats_credentials"
    volumes = mounts("nats-auth")
    assert volumes["/config/identities.toml"] == "./deploy/compose/identities.toml"
    written = {target.removeprefix("/auth/"): source for target, source in volumes.items()}
    identities = natsauth.load_identities(COMPOSE_IDENTITIES)
    expected = {directory_of(identity) for identity in identities} | {"server"}
    assert expected <= set(written)
    assert "--out=/auth" in step["command"] and "--server-host=nats" in step["command"]


@pytest.mark.parametrize("name", sorted(BUILT))
def test_each_service_mounts_only_its_own_nats_identity(name: str) -> None:
    identities = natsauth.load_identities(COMPOSE_IDENTITIES)
    env = environment(name)
    [identity] = [
        i
        for i in identities
        if str(i.role) == name and (i.node == env.get("APILANE_NODE_NAME", i.node))
    ]
    assert identity.cluster == env["APILANE_CLUSTER"]
    step = {t.removeprefix("/auth/"): s for t, s in mounts("nats-auth").items()}
    own_volume = step[directory_of(identity)]
    credentials = {t: s for t, s in mounts(name).items() if s.startswith("nats-auth-")}
    assert credentials == {"/etc/apilane/nats": own_volume}
    assert f"{own_volume}:/etc/apilane/nats:ro" in service(name)["volumes"]
    for variable, file in (
        ("APILANE_NATS_NKEY_SEED_FILE", "seed.nk"),
        ("APILANE_NATS_TLS_CA_FILE", "ca.crt"),
        ("APILANE_NATS_TLS_CERT_FILE", "client.crt"),
        ("APILANE_NATS_TLS_KEY_FILE", "client.key"),
    ):
        assert env[variable] == f"/etc/apilane/nats/{file}"
    assert env["APILANE_NATS_URL"].startswith("tls://")
