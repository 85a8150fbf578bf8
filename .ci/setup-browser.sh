#!/usr/bin/env bash
# Install the browser the e2e browser tests drive (tests/e2e/test_browser.py), idempotently.
#   bash .ci/setup-browser.sh
# Debian's chromium, driven by Playwright from PyPI (a dev extra) with
# executable_path=/usr/bin/chromium: `playwright install` downloads its own browser build from
# outside the package registries, which CI cannot reach.
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

log() { printf '[setup-browser] %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ -x "$CHROMIUM" ]; then
  log "present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
  exit 0
fi
log "installing Debian's chromium"
as_root apt-get update -q
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
log "installed: $("$CHROMIUM" --version)"
