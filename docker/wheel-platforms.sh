# shellcheck shell=bash
# Sourced by docker/build-image.sh and docker/lock-requirements.sh: which wheels fit the image.
# The image is linux x86_64 with CPython 3.11 and glibc 2.36 (Debian bookworm). pip does not
# expand a manylinux_2_X platform to older glibc versions, so every accepted tag is listed.
PIP_PYTHON=${PIP_PYTHON:-.venv/bin/python}
if [ ! -x "$PIP_PYTHON" ]; then PIP_PYTHON=python3; fi
WHEEL_PLATFORM_ARGS=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
  --platform manylinux2014_x86_64)
for glibc in 17 24 27 28 31 34 35 36; do
  WHEEL_PLATFORM_ARGS+=(--platform "manylinux_2_${glibc}_x86_64")
done
export PIP_PYTHON
