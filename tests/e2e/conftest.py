"""Shared fixtures for the container end-to-end tests (real Docker engine, real containers).

    make e2e            # = .venv/bin/python -m pytest tests/e2e -m "not comparison"

`docker_engine` fails (never skips) when the engine does not answer: these tests are the only
proof that the image and the Compose cluster work, so a missing engine is an error to fix
(`bash .ci/setup-docker.sh`), not a reason to pass quietly.

One Compose cluster (head, Redis, 2 workers and Prometheus: the `monitoring` profile) serves the
session: the browser, Compose and self-healing modules run their scenarios on it in turn, each
first bringing it back to head + 2 healthy workers (`compose_cluster.up`), since a scenario
kills, stops or adds workers, or crashes the head (self-healing, the last module).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.compose import ComposeCluster, compose_cluster, run

REPO_ROOT = Path(__file__).resolve().parents[2]
# The tag docker/build-image.sh and cluster/compose.yaml use; IMAGE overrides it in all three.
IMAGE_TAG = os.environ.get("IMAGE", "elastic-trainer:0.1.0")
BUILD_SCRIPT = REPO_ROOT / "docker" / "build-image.sh"
PROMETHEUS_IMAGE = os.environ.get("PROMETHEUS_IMAGE", "elastic-trainer-prometheus:0.1.0")

# Set to 1 to test whatever image is already tagged instead of (re)building it first.
SKIP_BUILD_ENV = "E2E_SKIP_IMAGE_BUILD"


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The engine's server version; fails the session when `docker info` does not answer."""
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"Docker engine unusable ({exc}); run `bash .ci/setup-docker.sh`")
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(
            "Docker engine does not answer `docker info`; run `bash .ci/setup-docker.sh`\n"
            f"{proc.stderr.strip()}"
        )
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def project_image(docker_engine: str) -> str:
    """The project image tag, built from the current tree by `docker/build-image.sh`.

    The build is cached layer by layer, so when `make image` ran just before (as in `.ci/run`)
    this takes seconds; rebuilding by default keeps the tests from running stale code.
    """
    if os.environ.get(SKIP_BUILD_ENV) == "1" and image_exists(IMAGE_TAG):
        return IMAGE_TAG
    run(["bash", str(BUILD_SCRIPT)], timeout=1800, cwd=REPO_ROOT)
    if not image_exists(IMAGE_TAG):
        pytest.fail(f"{BUILD_SCRIPT} finished but {IMAGE_TAG} is not in the engine")
    return IMAGE_TAG


@pytest.fixture(scope="session")
def prometheus_image(project_image: str) -> str:
    """docker/prometheus built on the base image that building the project image made."""
    run(["docker", "build", "--tag", PROMETHEUS_IMAGE, str(REPO_ROOT / "docker" / "prometheus")],
        timeout=900)  # fmt: skip
    return PROMETHEUS_IMAGE


@pytest.fixture(scope="session")
def shared_cluster(
    project_image: str,
    prometheus_image: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[ComposeCluster]:
    """The session's Compose cluster; `down -v` at the end, with logs first if a test failed."""
    tmp = tmp_path_factory.mktemp("compose")
    with compose_cluster(request, tmp, "et-e2e", prometheus_image=prometheus_image) as c:
        yield c


@pytest.fixture(scope="module")
def cluster(shared_cluster: ComposeCluster) -> ComposeCluster:
    """The shared cluster, back to head + 2 healthy workers for this module's scenarios."""
    shared_cluster.up(workers=2)
    shared_cluster.mark(f"head + {len(shared_cluster.workers())} workers healthy for the module")
    return shared_cluster
