"""Deployment files, checked without Docker: Dockerfile, Dockerfile.gpu, .dockerignore,
docker-compose.yml (+ docker-compose.gpu.yml), deploy/ (Prometheus, Grafana, topic creation, the
health probe).

What is checked against the code, so the files cannot drift from it:
- every INFERSTREAM_* variable named anywhere in the deploy files is a Settings field, and the
  environments given to the containers load into a valid Settings;
- the worker port agrees everywhere (Settings default / compose env, EXPOSE, expose, Prometheus);
- topic creation makes exactly streams.schemas.ALL_TOPICS, with the workers' partitions,
  replication and message size (the script is run against stub Kafka tools);
- Kafka's size limits fit INFERSTREAM_MAX_MESSAGE_BYTES plus the clients' record headroom;
- every metric the dashboard queries is exposed by streams.metrics.REGISTRY, and every metric in
  the registry is on the dashboard.

Real tools where they exist, never skipped (a missing one fails its test with the reason; `make
deploy-test-tools` installs them): `promtool` (Prometheus config and rules), `shellcheck` (every
shell script), the Compose specification's JSON schema (vendored by `check-jsonschema`),
`dockerfile-parse` (Dockerfiles), docker-py's .dockerignore matcher, `promql-parser` (dashboard
queries, tests/grafana_dashboard.py). tests/test_integration_prometheus.py runs every dashboard query
in a real Prometheus scraping a real worker.
"""

from __future__ import annotations

import base64
import fnmatch
import http.server
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from docker.utils.build import PatternMatcher
from dockerfile_parse import DockerfileParser
from grafana_dashboard import all_panels, metric_names, panel_queries, static_form, template_variables

from streams.config import Settings
from streams.schemas import ALL_TOPICS, CHANGELOG_TOPICS

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILES = {"cpu": REPO / "Dockerfile", "gpu": REPO / "Dockerfile.gpu"}
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "inferstream.json"
TOPIC_SCRIPT = REPO / "deploy" / "kafka" / "create-topics.sh"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"

DEPLOY_TEXT_FILES = [COMPOSE, COMPOSE_GPU, *DOCKERFILES.values(), PROMETHEUS, GRAFANA_DATASOURCES,
                     GRAFANA_PROVIDERS, TOPIC_SCRIPT, HEALTHCHECK]
EXPECTED_SERVICES = {"kafka", "topic-init", "worker", "producer", "prometheus", "grafana"}
SETTINGS_FIELDS = set(Settings.__dataclass_fields__)
# INFERSTREAM_* variables that are not Settings fields but are read by the code on purpose.
NON_FIELD_VARIABLES = {"INFERSTREAM_CONFIG"}  # the YAML settings file (Settings.load, cli --config)
# Our own images, built by compose; every other image must be pinned to a version.
OWN_IMAGES = {"inferstream"}
HEALTH_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
# Client-side record headroom on top of max_message_bytes (producer max_request_size, topic
# max.message.bytes in ensure_topics).
try:
    from streams.kafka import _REQUEST_HEADROOM as REQUEST_HEADROOM
except ImportError:  # pragma: no cover - renamed: fall back to the documented 64 KiB
    REQUEST_HEADROOM = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Loading helpers


def require_tool(name: str) -> str:
    """The path of a tool the deployment tests run. Missing, the test fails with the reason: never a
    skip, which would hide that a check did not run."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `make deploy-test-tools` installs it (Debian packages "
                    "prometheus and shellcheck)", pytrace=False)
    return path


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, unresolved: list[str] | None = None):
    """Compose variable interpolation with an empty host environment: ${VAR:-default} and
    ${VAR-default} give the default; a variable without a default is recorded in `unresolved`."""
    if isinstance(value, dict):
        return {k: interpolate(v, unresolved) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, unresolved) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if op in (":-", "-"):
            return default or ""
        if unresolved is not None:
            unresolved.append(name)
        return ""

    return _INTERPOLATION.sub(sub, value)


def load_compose(path: Path = COMPOSE) -> dict:
    return interpolate(_load_yaml(path))


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def short_volume(entry) -> tuple[str, str | None, str]:
    """(source, target, type) of a short or long volume entry."""
    if isinstance(entry, dict):
        return entry.get("source", ""), entry.get("target"), entry.get("type", "volume")
    parts = entry.split(":")
    if len(parts) == 1:
        return "", parts[0], "volume"  # anonymous volume
    source, target = parts[0], parts[1]
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return source, target, kind


class Dockerfile:
    """A Dockerfile's instructions by stage, as dockerfile-parse reads them (continuation lines joined,
    comments dropped, ARG defaults substituted into FROM, ENV of the last stage)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=True)
        self.instructions: list[tuple[int, str, str]] = []  # (stage index, INSTRUCTION, args)
        self.stages: list[dict] = []  # {"name", "image"}
        images = iter(self.parser.parent_images)
        for item in self.parser.structure:
            instruction, rest = item["instruction"], item["value"]
            if instruction == "COMMENT":
                continue
            if instruction == "FROM":
                words = rest.split()
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                self.stages.append({"name": name, "image": next(images)})
            self.instructions.append((len(self.stages) - 1, instruction, rest))

    def get(self, instruction: str, stage: int | None = None) -> list[str]:
        stage = len(self.stages) - 1 if stage is None else stage
        return [rest for s, ins, rest in self.instructions if ins == instruction and s == stage]

    def env(self) -> dict[str, str]:
        """ENV of the runtime (last) stage."""
        return dict(self.parser.envs)

    def exec_form(self, instruction: str, stage: int | None = None) -> list[str]:
        (rest,) = self.get(instruction, stage)[-1:]
        return json.loads(rest)

    def copies(self, stage: int | None = None) -> list[tuple[str | None, list[str], str]]:
        """(from stage or None, sources, absolute destination) of each COPY in a stage."""
        workdir, result = "/", []
        stage = len(self.stages) - 1 if stage is None else stage
        for s, ins, rest in self.instructions:
            if s != stage:
                continue
            if ins == "WORKDIR":
                workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
            if ins == "COPY":
                words = shlex.split(rest)
                flags = [w for w in words if w.startswith("--")]
                paths = [w for w in words if not w.startswith("--")]
                source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
                dest = paths[-1] if paths[-1].startswith("/") else f"{workdir.rstrip('/')}/{paths[-1]}"
                result.append((source_stage, paths[:-1], dest))
        return result


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def worker_env(services) -> dict[str, str]:
    return service_env(services["worker"])


@pytest.fixture(scope="module")
def worker_settings(worker_env) -> Settings:
    return Settings.load(env=worker_env)


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, Dockerfile]:
    return {kind: Dockerfile(path) for kind, path in DOCKERFILES.items()}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: structure


def test_compose_parses_with_the_expected_services(compose, services):
    assert EXPECTED_SERVICES <= set(services), f"missing services: {EXPECTED_SERVICES - set(services)}"
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"


def test_compose_interpolations_all_have_defaults():
    for path in (COMPOSE, COMPOSE_GPU):
        unresolved: list[str] = []
        interpolate(_load_yaml(path), unresolved)
        assert not unresolved, f"{path.name}: ${{VAR}} without a default (the stack must start without a .env): {unresolved}"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_matches_the_compose_specification_schema(path):
    import importlib.util

    import jsonschema

    # Only the schema file of check-jsonschema (the `dev` extra) is used: located, not imported (its
    # CLI needs a newer click than faust-streaming allows in recent releases).
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec is not None and spec.origin is not None, "check-jsonschema is not installed: pip install -e '.[dev]'"
    schema_file = Path(spec.origin).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    assert schema_file.is_file(), f"this check-jsonschema no longer vendors compose-spec.json ({schema_file})"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(_load_yaml(path)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_depends_on_targets_exist_with_valid_conditions(services, dockerfiles):
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert condition in HEALTH_CONDITIONS, f"{name} -> {target}: unknown condition {condition}"
            if condition == "service_healthy":
                dependency = services[target]
                has_check = "healthcheck" in dependency and not dependency["healthcheck"].get("disable")
                assert has_check, f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
            if not service.get("profiles"):
                assert not services[target].get("profiles"), \
                    f"{name} (always started) depends on {target}, which only starts with a profile"
    # no cycles
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        assert state.get(name) != 1, f"depends_on cycle through {name}"
        if state.get(name) == 2:
            return
        state[name] = 1
        for target in depends_on(services[name]):
            visit(target)
        state[name] = 2

    for name in services:
        visit(name)


def test_healthchecks_are_well_formed(services):
    for name, service in services.items():
        check = service.get("healthcheck")
        if check is None or check.get("disable"):
            continue
        test = check["test"]
        if isinstance(test, list):
            assert test and test[0] in ("CMD", "CMD-SHELL", "NONE"), f"{name}: healthcheck test {test}"
            if test[0] == "CMD-SHELL":
                assert len(test) == 2, f"{name}: CMD-SHELL takes exactly one shell string"
            if test[0] == "CMD":
                assert len(test) >= 2, f"{name}: CMD without a command"
        else:
            assert isinstance(test, str) and test.strip(), f"{name}: empty healthcheck test"
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in check:
                assert DURATION.match(str(check[key])), f"{name}: healthcheck {key}={check[key]!r} is not a duration"
        if "retries" in check:
            assert isinstance(check["retries"], int) and check["retries"] > 0, f"{name}: retries"


def test_worker_scales_with_docker_compose_scale(services):
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name prevents --scale worker=N"
    assert "hostname" not in worker, "replicas would share one hostname (and worker id)"
    for port in worker.get("ports", []):
        published = port.get("published") if isinstance(port, dict) else (str(port).rsplit(":", 1)[0] if ":" in str(port) else None)
        assert not published, f"worker publishes host port {port}: a second replica could not bind it"
    for entry in worker.get("volumes", []):
        source, target, kind = short_volume(entry)
        assert kind != "volume" or not source, f"replicas would share the named volume {source} at {target}"


def test_every_build_dockerfile_exists():
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in (load_compose(path).get("services") or {}).items():
            build = service.get("build")
            if build is None:
                continue
            if isinstance(build, str):
                build = {"context": build}
            context = (path.parent / build.get("context", ".")).resolve()
            assert context.is_dir(), f"{path.name}/{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{path.name}/{name}: {dockerfile} missing"


def test_every_volume_source_exists(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for entry in service.get("volumes", []):
            source, target, kind = short_volume(entry)
            assert target and target.startswith("/"), f"{name}: volume target {target!r} must be absolute"
            if kind == "bind":
                assert (COMPOSE.parent / source).exists(), f"{name}: bind source {source} does not exist"
            elif source:
                assert source in declared, f"{name}: named volume {source} not declared under volumes:"


def test_images_are_pinned(services, dockerfiles):
    images = [(f"compose:{n}", s["image"]) for n, s in services.items() if "image" in s]
    images += [(f"{df.path.name}:{st['name']}", st["image"]) for df in dockerfiles.values() for st in df.stages]
    for where, image in images:
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if repository.split("/")[-1] in OWN_IMAGES:
            continue
        assert tag and tag != "latest", f"{where}: image {image} is not pinned to a version"


# ---------------------------------------------------------------------------------------------
# Settings: variable names, values, ports


def _inferstream_variables(text: str) -> set[str]:
    return set(re.findall(r"\bINFERSTREAM_[A-Z0-9_]+\b", text))


def test_every_inferstream_variable_is_a_settings_field():
    for path in DEPLOY_TEXT_FILES:
        for variable in _inferstream_variables(path.read_text()) - NON_FIELD_VARIABLES:
            field = variable.removeprefix("INFERSTREAM_").lower()
            assert field in SETTINGS_FIELDS, f"{path.name}: {variable} is not a Settings field (streams/config.py)"


def test_container_environments_load_into_settings(services, dockerfiles):
    for df in dockerfiles.values():
        Settings.load(env=df.env())  # raises on a value of the wrong type
    for path in (COMPOSE, COMPOSE_GPU):
        for service in (load_compose(path).get("services") or {}).values():
            env = service_env(service)
            if any(k.startswith("INFERSTREAM_") for k in env):
                Settings.load(env={**dockerfiles["cpu"].env(), **env})


def test_worker_settings_are_production_like(worker_settings):
    s = worker_settings
    assert s.broker == "kafka:9092"
    assert s.web_host == "0.0.0.0", "other containers (Prometheus) must reach the web port"
    assert s.session_timeout_s == 45
    assert s.heartbeat_interval_s <= s.session_timeout_s / 3, "Kafka wants heartbeats well inside the session"
    assert s.replication_factor >= 1 and s.partitions >= 1


def test_the_worker_port_agrees_everywhere(services, worker_env, dockerfiles):
    port = int(worker_env.get("INFERSTREAM_WEB_PORT", Settings().web_port))
    assert port == Settings().web_port or "INFERSTREAM_WEB_PORT" in worker_env
    for df in dockerfiles.values():
        assert int(df.env().get("INFERSTREAM_WEB_PORT", Settings().web_port)) == port, f"{df.path.name}: ENV port"
        exposed = {int(p.split("/")[0]) for rest in df.get("EXPOSE") for p in rest.split()}
        assert port in exposed, f"{df.path.name}: EXPOSE {exposed} lacks the web port {port}"
    expose = {int(str(p).split("/")[0]) for p in services["worker"].get("expose", [])}
    assert port in expose, f"worker expose {expose} lacks {port}"
    jobs = _worker_jobs()
    assert jobs, "no Prometheus job scrapes the workers"
    for job in jobs:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("port") == port, f"Prometheus job {job['job_name']} scrapes port {sd.get('port')}, workers listen on {port}"


def test_dockerfile_healthcheck_probes_health_through_the_settings_port(dockerfiles):
    for df in dockerfiles.values():
        (healthcheck,) = df.get("HEALTHCHECK")
        assert "CMD" in healthcheck and "/health" in healthcheck, f"{df.path.name}: HEALTHCHECK {healthcheck}"
        assert "deploy/healthcheck.py" in healthcheck
        copied = [dest for _, sources, dest in df.copies() if "deploy/healthcheck.py" in sources]
        assert copied and healthcheck.count(copied[0]) == 1, f"{df.path.name}: probe not copied where HEALTHCHECK runs it"


class _Probe(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        status = {"/health": 200, "/ready": 503}.get(self.path, 404)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _run_probe(path: str, port: int, host: str = "0.0.0.0") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_")}
    env.update(INFERSTREAM_WEB_PORT=str(port), INFERSTREAM_WEB_HOST=host,
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(HEALTHCHECK), path], env=env, capture_output=True, text=True, timeout=30)


def test_health_probe_answers_from_the_worker_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _run_probe("/health", port).returncode == 0
        assert _run_probe("/health", port, host="127.0.0.1").returncode == 0
        ready = _run_probe("/ready", port)
        assert ready.returncode == 1 and "503" in ready.stderr
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = _run_probe("/health", free)
    assert down.returncode == 1 and "unreachable" in down.stderr


def test_compose_worker_healthcheck_uses_ready(services, dockerfiles):
    test = services["worker"]["healthcheck"]["test"]
    assert "/ready" in test, f"worker healthcheck should probe readiness: {test}"
    probe = next(word for word in test if str(word).endswith("healthcheck.py"))
    destinations = [dest for _, sources, dest in dockerfiles["cpu"].copies() if "deploy/healthcheck.py" in sources]
    assert probe in destinations


# ---------------------------------------------------------------------------------------------
# Kafka and topics


def test_kafka_runs_kraft_single_node(services, worker_settings):
    env = service_env(services["kafka"])
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    voter_host_port = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@", 1)[1]
    assert voter_host_port.split(":")[1] == listeners[controller].rsplit(":", 1)[1]
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert worker_settings.broker in advertised.values(), "the workers' INFERSTREAM_BROKER is not an advertised listener"
    assert set(listeners) <= set(dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")))
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "CLUSTER_ID must be a base64 UUID"


def test_kafka_message_size_fits_the_workers_frames(services, worker_settings):
    env = service_env(services["kafka"])
    largest_batch = worker_settings.max_message_bytes + REQUEST_HEADROOM  # producer max_request_size
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= largest_batch
    assert int(env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= int(env["KAFKA_MESSAGE_MAX_BYTES"])
    assert worker_settings.max_message_bytes >= 1_500_000, "frames around 2 MB should fit"
    for name in ("producer", "verdicts", "topic-init"):
        if name in services:
            value = service_env(services[name]).get("INFERSTREAM_MAX_MESSAGE_BYTES")
            assert value is not None and int(value) == worker_settings.max_message_bytes, \
                f"{name}: INFERSTREAM_MAX_MESSAGE_BYTES differs from the workers'"


def test_topic_init_declares_exactly_all_topics(services):
    init = services["topic-init"]
    env = service_env(init)
    assert sorted(env["TOPICS"].split()) == sorted(ALL_TOPICS)
    assert depends_on(init) == {"kafka": "service_healthy"}
    assert init.get("restart", "no") == "no"
    for name in ("worker", "producer"):
        assert depends_on(services[name]).get("topic-init") == "service_completed_successfully"
    # the script the entrypoint runs is the one in deploy/kafka, mounted where it is run from
    script = next(word for word in init["entrypoint"] if word.endswith(".sh"))
    mounts = [short_volume(v) for v in init.get("volumes", [])]
    host = next(COMPOSE.parent / src / Path(script).relative_to(tgt) for src, tgt, _ in mounts
                if script.startswith(tgt.rstrip("/") + "/"))
    assert host.resolve() == TOPIC_SCRIPT.resolve()


def _run_topic_script(env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """Runs create-topics.sh with stub kafka-topics.sh / kafka-configs.sh that log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for tool in ("kafka-topics.sh", "kafka-configs.sh"):
        stub = bin_dir / tool
        stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")
        stub.chmod(0o755)
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, "KAFKA_BIN": str(bin_dir)}
    result = subprocess.run(["sh", str(TOPIC_SCRIPT)], env=run_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def _flag_values(call: list[str], flag: str) -> list[str]:
    return [call[i + 1] for i, word in enumerate(call[:-1]) if word == flag]


def test_topic_script_creates_the_topics_the_workers_expect(services, worker_settings, tmp_path):
    env = service_env(services["topic-init"])
    calls = _run_topic_script(env, tmp_path)
    creates = [c for c in calls if c[0] == "kafka-topics.sh" and "--create" in c]
    named = worker_settings.replace(topic_prefix=env.get("TOPIC_PREFIX", ""))
    expected = sorted(named.topic(t) for t in ALL_TOPICS)
    changelogs = {named.topic(name) for name in CHANGELOG_TOPICS}  # the recommender's and the alert agent's
    assert sorted(_flag_values(c, "--topic")[0] for c in creates) == expected
    assert worker_settings.topic_prefix == env.get("TOPIC_PREFIX", ""), "topic prefix differs from the workers'"
    for call in creates:
        assert "--if-not-exists" in call
        assert _flag_values(call, "--bootstrap-server") == [worker_settings.broker]
        assert _flag_values(call, "--partitions") == [str(worker_settings.partitions)]
        assert _flag_values(call, "--replication-factor") == [str(worker_settings.replication_factor)]
        configs = dict(c.split("=", 1) for c in _flag_values(call, "--config"))
        # the same topic limit the workers' ensure_topics would set
        assert int(configs["max.message.bytes"]) == worker_settings.max_message_bytes + REQUEST_HEADROOM
        if _flag_values(call, "--topic")[0] in changelogs:
            # compacted and kept forever (the last state of every user or stream), as ensure_topics makes them
            assert configs["cleanup.policy"] == "compact" and configs["retention.ms"] == "-1"
        else:
            assert configs["cleanup.policy"] == "delete" and int(configs["retention.ms"]) > 0
    kafka_env = service_env(services["kafka"])
    assert worker_settings.max_message_bytes + REQUEST_HEADROOM <= int(kafka_env["KAFKA_MESSAGE_MAX_BYTES"])
    altered = sorted(_flag_values(c, "--entity-name")[0] for c in calls if c[0] == "kafka-configs.sh")
    assert altered == expected, "configs of existing topics are not re-applied"


def test_topic_script_honours_a_prefix(tmp_path):
    calls = _run_topic_script({"TOPIC_PREFIX": "staging.", "PARTITIONS": "3"}, tmp_path)
    created = sorted(_flag_values(c, "--topic")[0] for c in calls if "--create" in c)
    assert created == sorted(f"staging.{t}" for t in ALL_TOPICS)


def shell_scripts() -> list[Path]:
    """Every shell script the repository tracks: *.sh, and files whose #! line names a shell."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    scripts = []
    for name in tracked.decode().split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue
        with path.open("rb") as f:
            first = f.readline(200)
        if name.endswith((".sh", ".bash")) or re.match(rb"#!\s*/\S*/(env\s+)?(ba|da|k)?sh\b", first):
            scripts.append(path)
    return scripts


def test_every_shell_script_passes_shellcheck():
    shellcheck = require_tool("shellcheck")
    scripts = shell_scripts()
    assert TOPIC_SCRIPT in scripts and REPO / ".ci" / "run" in scripts, scripts
    result = subprocess.run([shellcheck, "--external-sources", *map(str, scripts)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pip_installs(df: Dockerfile, stage: int) -> list[str]:
    return [rest for rest in df.get("RUN", stage) if "pip install" in rest]


def _extras_installed(df: Dockerfile, stage: int) -> set[str]:
    extras: set[str] = set()
    for line in _pip_installs(df, stage):
        for group in re.findall(r"(?:inferstream|\.whl\)|\.)\[([a-z0-9_,-]+)\]", line):
            extras.update(e for e in group.split(",") if e)
    return extras


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_is_multi_stage_with_models_built_at_build_time(dockerfiles, kind):
    df = dockerfiles[kind]
    known_extras = set(_pyproject()["project"]["optional-dependencies"])
    assert len(df.stages) >= 2
    build_stage = next(i for i in range(len(df.stages)) if any("models/build.py" in r for r in df.get("RUN", i)))
    assert build_stage < len(df.stages) - 1, "models must be built in a build stage, not the runtime"
    assert "models" in _extras_installed(df, build_stage)
    # CPU torch wheel pinned like the `models` extra
    torch_pin = next(d for d in _pyproject()["project"]["optional-dependencies"]["models"] if d.startswith("torch"))
    torch_runs = [r for r in df.get("RUN", build_stage) if "torch" in r and "download.pytorch.org/whl/cpu" in r]
    assert torch_runs and torch_pin.replace(" ", "") in torch_runs[0], f"{df.path.name}: CPU torch not installed as {torch_pin}"
    runtime = len(df.stages) - 1
    extras = _extras_installed(df, runtime)
    assert extras <= known_extras, f"{df.path.name}: unknown extras {extras - known_extras}"
    assert extras == {kind}, f"{df.path.name}: the runtime installs {extras}; exactly {{{kind}}} (onnxruntime vs -gpu)"
    assert "torch" not in " ".join(_pip_installs(df, runtime))
    copies = df.copies(runtime)
    build_name = df.stages[build_stage]["name"]
    assert any(src == build_name and any(s.rstrip("/").endswith("models") for s in sources) and dest.rstrip("/") == "/app/models"
               for src, sources, dest in copies), f"{df.path.name}: built models/ not copied into the runtime"
    for directory in ("policies", "samples"):
        assert any(src is None and f"{directory}/" in sources for src, sources, _ in copies), f"{df.path.name}: {directory}/"


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_runtime_runs_the_worker_as_non_root(dockerfiles, kind):
    df = dockerfiles[kind]
    users = df.get("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{df.path.name}: runs as root"
    assert df.exec_form("CMD") == ["inferstream", "worker"]
    env = df.env()
    assert env.get("INFERSTREAM_WEB_HOST") == "0.0.0.0"
    # the package is installed, not editable: the repository-relative defaults would be wrong
    workdir = df.get("WORKDIR")[-1]
    for field, relative in (("INFERSTREAM_MODEL_DIR", "models"), ("INFERSTREAM_POLICY", "policies/default.yaml")):
        assert env.get(field, "").startswith(workdir), f"{df.path.name}: {field} not set inside {workdir}"
        assert (REPO / relative).exists()
    assert env.get("INFERSTREAM_DATA_DIR"), f"{df.path.name}: data dir must be writable by the non-root user"
    if kind == "gpu":
        assert "nvidia/cuda" in df.stages[-1]["image"] and "runtime" in df.stages[-1]["image"]
        assert env.get("INFERSTREAM_PROVIDERS") == "cuda,cpu"
    else:
        assert "INFERSTREAM_PROVIDERS" not in env


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_runtime_preloads_the_jemalloc_it_installs(dockerfiles, kind):
    """The preload names a library the runtime stage installs: ld.so only warns when a preloaded
    library is missing, and the worker would run on glibc's malloc unnoticed. The oracle for which
    file the package holds is dpkg's own list (make test installs libjemalloc2)."""
    df = dockerfiles[kind]
    preload = df.env().get("LD_PRELOAD")
    assert preload == "libjemalloc.so.2", f"{df.path.name}: LD_PRELOAD {preload!r}"
    installs = [shlex.split(run) for run in df.get("RUN") if "apt-get install" in run]
    assert any("libjemalloc2" in words for words in installs), f"{df.path.name}: libjemalloc2 not installed"
    files = subprocess.run(["dpkg", "-L", "libjemalloc2"], capture_output=True, text=True, check=True).stdout.split()
    assert any(Path(f).name == preload for f in files)


def _dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether `docker build` leaves `path` out of the context: docker-py's own .dockerignore matcher."""
    return PatternMatcher(patterns).matches(path)


def test_dockerignore_keeps_the_context_small_and_the_sources_in(dockerfiles):
    patterns = _dockerignore_patterns()
    for must in (".git", ".venv", ".inferstream", ".pytest_cache", ".ruff_cache"):
        assert _ignored(must, patterns), f".dockerignore lacks {must}"
    assert _ignored("streams/__pycache__", patterns)
    # built model files never come from the checkout: same models/ lines as .gitignore
    gitignored_models = [line.strip() for line in (REPO / ".gitignore").read_text().splitlines()
                         if line.strip().startswith("models/")]
    assert set(gitignored_models) <= set(patterns), "models/ lines of .gitignore missing from .dockerignore"
    # everything the Dockerfiles COPY from the context exists and is not ignored
    for df in dockerfiles.values():
        for stage in range(len(df.stages)):
            for source_stage, sources, _ in df.copies(stage):
                if source_stage is not None:
                    continue
                for source in sources:
                    assert (REPO / source).exists(), f"{df.path.name}: COPY {source} does not exist"
                    assert not _ignored(source.rstrip("/"), patterns), f"{df.path.name}: COPY {source} is dockerignored"


# ---------------------------------------------------------------------------------------------
# Prometheus


def _worker_jobs() -> list[dict]:
    config = _load_yaml(PROMETHEUS)
    return [job for job in config["scrape_configs"]
            if any("worker" in sd.get("names", []) for sd in job.get("dns_sd_configs", []))]


def test_prometheus_scrapes_every_worker_replica(services):
    config = _load_yaml(PROMETHEUS)
    names = [job["job_name"] for job in config["scrape_configs"]]
    assert len(names) == len(set(names)), "duplicate job names"
    (job,) = _worker_jobs()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    for sd in job["dns_sd_configs"]:
        assert sd.get("type", "SRV") == "A", "compose DNS has A records per replica, no SRV"
        assert all(name in services for name in sd["names"])
    prometheus = services["prometheus"]
    mounts = {tgt: src for src, tgt, kind in map(short_volume, prometheus["volumes"]) if kind == "bind"}
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    mounted = mounts[config_flag.split("=", 1)[1]]
    assert (COMPOSE.parent / mounted).resolve() == PROMETHEUS.resolve()


def test_prometheus_config_and_its_rules_pass_promtool():
    """`promtool check config` also checks every rule file the config loads."""
    result = subprocess.run([require_tool("promtool"), "check", "config", str(PROMETHEUS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _prometheus_yaml_files() -> dict[Path, dict]:
    return {path: _load_yaml(path) or {} for path in sorted(PROMETHEUS.parent.rglob("*.y*ml"))}


def test_every_rule_file_is_loaded_mounted_and_its_tests_pass(services):
    """A rules file under deploy/prometheus is listed in rule_files (else Prometheus never evaluates
    it) and mounted beside the config in the compose stack; rule unit tests (files with rule_files and
    tests) pass `promtool test rules`."""
    files = _prometheus_yaml_files()
    listed = [PROMETHEUS.parent / pattern for pattern in _load_yaml(PROMETHEUS).get("rule_files") or []]
    rule_files = [path for path, content in files.items() if "groups" in content]
    for path in rule_files:
        assert any(fnmatch.fnmatch(str(path), str(p)) for p in listed), f"{path.name}: not in rule_files"
    prometheus = services["prometheus"]
    mounts = {tgt: src for src, tgt, kind in map(short_volume, prometheus["volumes"]) if kind == "bind"}
    config_dir = Path(next(a for a in prometheus["command"] if a.startswith("--config.file=")).split("=", 1)[1]).parent
    for path in rule_files:
        mounted = mounts.get(str(config_dir / path.relative_to(PROMETHEUS.parent)))
        assert mounted and (COMPOSE.parent / mounted).resolve() == path.resolve(), \
            f"{path.name}: not mounted at {config_dir} in the prometheus service"
    tests = [path for path, content in files.items() if "tests" in content]
    assert rule_files and tests, "deploy/prometheus has alerting rules and their unit tests"
    result = subprocess.run([require_tool("promtool"), "test", "rules", *map(str, tests)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Grafana


def _registry_series() -> tuple[set[str], dict[str, set[str]]]:
    """All series names the worker exposes, and the series of each metric family."""
    from streams.metrics import REGISTRY

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""],
                "summary": ["", "_sum", "_count"], "info": ["_info"]}
    families: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        families[family.name] = {family.name + s for s in suffixes.get(family.type, [""])}
    return set().union(*families.values()), families


# Series Prometheus itself adds to every target: allowed on the dashboard though not in REGISTRY.
PROMETHEUS_SYNTHETIC = {"up"}


def _dashboard_metrics(dashboard: dict) -> dict[str, set[str]]:
    """Where each query of the dashboard (panels and variables) is, and the metrics it selects."""
    queries = {q.where: q.expr for q in panel_queries(dashboard)}
    queries.update({f"variable {v.name}": v.selector for v in template_variables(dashboard) if v.selector})
    return {where: metric_names(static_form(expr, dashboard)) for where, expr in queries.items()}


def test_dashboard_queries_only_metrics_the_workers_expose(dashboard):
    series, _ = _registry_series()
    used = _dashboard_metrics(dashboard)
    assert used
    for where, names in used.items():
        assert names, f"{where}: selects no metric"
        unknown = names - series - PROMETHEUS_SYNTHETIC
        assert not unknown, f"{where}: {sorted(unknown)} not exposed by streams/metrics.py REGISTRY"


def test_dashboard_shows_every_metric_of_the_registry(dashboard):
    _, families = _registry_series()
    used = set().union(*_dashboard_metrics(dashboard).values())
    missing = sorted(name for name, family_series in families.items() if not family_series & used)
    assert not missing, f"metrics in streams/metrics.py with no dashboard panel: {missing}"


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] == "inferstream-overview", "a stable uid keeps links and provisioning updates working"
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource_vars = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(datasource_vars) == 1 and datasource_vars[0]["query"] == "prometheus"
    ds_ref = "${" + datasource_vars[0]["name"] + "}"
    occupied: set[tuple[int, int]] = set()
    for panel in all_panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, f"panel {panel['id']} outside the grid"
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {panel['id']} {panel.get('title')!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == ds_ref, f"panel {panel['id']} ignores the datasource variable"
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == ds_ref
        for var_ref in re.findall(r"\$(\w+)|\$\{(\w+)\}", json.dumps(panel.get("targets", []))):
            name = var_ref[0] or var_ref[1]
            assert name.startswith("__") or name in variables, f"panel {panel['id']} uses undefined ${name}"


def test_grafana_provisioning_points_at_existing_files(services, dashboard):
    grafana = services["grafana"]
    mounts = {tgt: COMPOSE.parent / src for src, tgt, kind in map(short_volume, grafana["volumes"]) if kind == "bind"}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning.resolve() == GRAFANA_DATASOURCES.parent.parent.resolve()

    datasources = _load_yaml(GRAFANA_DATASOURCES)
    assert datasources["apiVersion"] == 1
    (prometheus,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    host, port = re.match(r"https?://([^:/]+):(\d+)", prometheus["url"]).groups()
    assert host in services, f"datasource url host {host} is not a compose service"
    assert any(str(p).endswith(f":{port}") for p in services[host].get("ports", [])) or port == "9090"
    current = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource").get("current", {})
    assert current.get("value") in (None, prometheus["uid"]), "dashboard default datasource is not the provisioned one"

    providers = _load_yaml(GRAFANA_PROVIDERS)
    assert providers["apiVersion"] == 1
    for provider in providers["providers"]:
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        host_dir = next((src for tgt, src in mounts.items() if path == tgt or path.startswith(tgt + "/")), None)
        assert host_dir is not None, f"provider path {path} is not mounted into grafana"
        host_dir = host_dir / Path(path).relative_to(next(t for t in mounts if path == t or path.startswith(t + "/")))
        assert host_dir.resolve() == DASHBOARD.parent.resolve() and DASHBOARD.is_file()
    home = service_env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert any(home == f"{tgt}/{DASHBOARD.name}" and src.resolve() == DASHBOARD.parent.resolve()
                   for tgt, src in mounts.items())


# ---------------------------------------------------------------------------------------------
# GPU override


def test_gpu_override_swaps_the_worker_image_and_reserves_gpus(services):
    override = load_compose(COMPOSE_GPU)["services"]
    assert set(override) <= set(services), "the override must only change existing services"
    worker = override["worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile.gpu"
    assert worker["image"] != services["worker"]["image"], "CPU and GPU images need different tags"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    Settings.load(env=service_env(worker))
    assert service_env(worker).get("INFERSTREAM_PROVIDERS") == "cuda,cpu"
    merged = {**service_env(services["worker"]), **service_env(worker)}
    assert "container_name" not in worker and "ports" not in worker and merged["INFERSTREAM_BROKER"] == "kafka:9092"


def test_producer_example_publishes_the_sample_posts(services, dockerfiles):
    producer = services["producer"]
    assert producer.get("profiles") == ["demo"]
    command = producer["command"]
    assert command[:3] == ["inferstream", "produce", "posts"]
    sample = command[3]
    copied = {dest.rstrip("/"): sources for src, sources, dest in dockerfiles["cpu"].copies() if src is None}
    directory, name = sample.rsplit("/", 1)
    assert directory in copied, f"{sample}: its folder is not copied into the image"
    assert (REPO / copied[directory][0] / name).is_file()
