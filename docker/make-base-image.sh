#!/usr/bin/env bash
# Make a local stand-in for the Dockerfile's base image where no registry can be reached.
#   bash docker/make-base-image.sh [IMAGE]      # IMAGE defaults to python:3.11-slim-bookworm
# A no-op when an image of that name is already in the engine (the official one pulled by a
# user or a hosted CI runner, or the stand-in made by an earlier run on this machine). Otherwise
# it builds a minimal Debian bookworm root file system with Python 3.11 (python3, python3-venv,
# ca-certificates) using mmdebstrap from the Debian mirror, and imports it under the SAME name,
# so `FROM python:3.11-slim-bookworm` uses it without pulling.
# Differences the Dockerfile copes with: python3 lives in /usr/bin (official: /usr/local/bin),
# and there is no `python`/`pip` command; the Dockerfile creates its own venv at /opt/venv.
set -euo pipefail
cd "$(dirname "$0")"

IMAGE=${1:-python:3.11-slim-bookworm}
SUITE=${SUITE:-bookworm}
TARBALL=base-${SUITE}.tar   # ignored by git (docker/base*.tar)

log() { printf '[make-base-image] %s\n' "$*"; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE already present: nothing to do"
  exit 0
fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
  log "installing mmdebstrap"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap
fi

log "building a $SUITE root file system (minbase + python3, python3-venv, ca-certificates)"
rm -f "$TARBALL"
# SC2016: "$1" is expanded by mmdebstrap's hook shell (the new root), not by this script.
# shellcheck disable=SC2016
# bash is Essential in Debian, so minbase already has it (KubeRay starts pods with `bash -lc`).
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$SUITE" "$TARBALL"

log "importing $TARBALL as $IMAGE"
docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "local stand-in for $IMAGE (mmdebstrap $SUITE minbase)" \
  "$TARBALL" "$IMAGE"
rm -f "$TARBALL"
docker image ls "$IMAGE"
