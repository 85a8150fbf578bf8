"""Shared fixtures for the container end-to-end tests (real Docker engine, real containers).

    make e2e            # = .venv/bin/python -m pytest tests/e2e

`docker_engine` fails (never skips) when the engine does not answer: these tests are the only
proof that the image and the Compose cluster work, so a missing engine is an error to fix
(`bash .ci/setup-docker.sh`), not a reason to pass quietly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from e2e_support import run

REPO_ROOT = Path(__file__).resolve().parents[2]
# The tag docker/build-image.sh and cluster/compose.yaml use; IMAGE overrides it in all three.
IMAGE_TAG = os.environ.get("IMAGE", "elastic-trainer:0.1.0")
BUILD_SCRIPT = REPO_ROOT / "docker" / "build-image.sh"

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
