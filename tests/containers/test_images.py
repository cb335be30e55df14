"""The container images and docker/compose.yaml, for real: build the three images with podman (docker/build.sh),
start the compose topology (bootstrap, two half-model peers, gateway) as `podman run` calls made from the compose
file's own services, answer a chat completion over HTTP, and check that every container runs as a non-root user and
that its image's HEALTHCHECK reports healthy. Every container and volume made here is removed, pass or fail.

Marked `containers` (not in the default run): `make test-containers`. Skipped where podman is missing or cannot run a
container. Podman 4.3 has no `podman compose`; the compose file itself targets `docker compose`. Uses this
machine's recipe (/work/shared/containers/podman-setup.sh, or $PODMAN_SETUP) for podman's configuration and
the local debian:bookworm base image. A few minutes with the build cache warm; the first build ~4 minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
SETUP = Path(os.environ.get("PODMAN_SETUP", "/work/shared/containers/podman-setup.sh"))
ORDER = ["bootstrap", "peer-a", "peer-b", "gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    """The environment podman needs here; skips where podman cannot run a container."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (Debian: apt install podman runc; see docker/README.md)")
    env = dict(os.environ)
    if SETUP.is_file():
        out = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            pytest.skip(f"{SETUP} failed: {out.stderr[-500:]}")
        for name, value in re.findall(r"(\w+)=(\S+)", out.stdout):
            env[name] = value
    probe = subprocess.run(["podman", "run", "--rm", "--network", "host", "debian:bookworm", "true"],
                           env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    return env


def interpolate(value: object, overrides: dict[str, str]) -> str:
    """Compose's `${NAME:-default}`, with this test's values first."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: overrides.get(m[1], os.environ.get(m[1], m[2])), str(value))


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def run_commands(prefix: str, overrides: dict[str, str]) -> dict[str, list[str]]:
    """`podman run` of each compose service, as `docker compose up` would start it (host network, init, env,
    named volumes: this test's own, by prefix)."""
    compose = load_compose()
    assert list(compose["services"]) == ORDER
    commands = {}
    for name, service in compose["services"].items():
        assert service["network_mode"] == "host" and service["init"] is True
        cmd = ["podman", "run", "-d", "--init", "--network", "host", "--name", f"{prefix}-{name}"]
        for key, value in service.get("environment", {}).items():
            cmd += ["-e", f"{key}={interpolate(value, overrides)}"]
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], volume
            cmd += ["-v", f"{prefix}-{volume}"]
        commands[name] = [*cmd, service["image"]]
    return commands


def podman(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out.stdout


def wait_healthy(env: dict[str, str], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(podman(env, "inspect", name))[0]["State"]
        assert state["Running"], f"{name} exited ({state.get('ExitCode')}):\n{podman(env, 'logs', name, check=False)}"
        if subprocess.run(["podman", "healthcheck", "run", name], env=env, capture_output=True).returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"{name} not healthy after {timeout:.0f} s:\n{podman(env, 'logs', name, check=False)}")


def test_compose_topology_answers_a_chat_completion(podman_env):
    env = podman_env
    build = subprocess.run([str(ROOT / "docker" / "build.sh")], env={**env, "CONTAINER_CLI": "podman"},
                           capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    prefix = f"swarm-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    commands = run_commands(prefix, {"GATEWAY_PORT": str(port), "SWARM_DHT_PORT": str(free_port())})
    containers = [f"{prefix}-{name}" for name in ORDER]
    try:
        for name in ORDER:
            podman(env, *commands[name][1:])
            if name == "bootstrap":  # compose: the others depend on its being healthy
                wait_healthy(env, f"{prefix}-bootstrap", 60)
        for name in containers:  # the gateway is healthy once its chain is complete
            wait_healthy(env, name, 600)

        body = {"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        assert answer["choices"][0]["message"]["content"].strip(), answer
        assert answer["usage"]["completion_tokens"] > 0

        for name in containers:
            assert podman(env, "exec", name, "id", "-u").strip() != "0", f"{name} runs as root"
            health = subprocess.run(["podman", "healthcheck", "run", name], env=env, capture_output=True, text=True)
            assert health.returncode == 0, f"{name}: {health.stdout} {health.stderr}"
    except BaseException:
        for name in containers:  # shown by pytest with the failure
            print(f"===== {name}\n{podman(env, 'logs', name, check=False)[-4000:]}")
        raise
    finally:
        for name in reversed(containers):
            podman(env, "rm", "-f", "-t", "10", name, check=False)
        for volume in load_compose()["volumes"]:
            podman(env, "volume", "rm", "-f", f"{prefix}-{volume}", check=False)
