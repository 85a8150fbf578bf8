#!/usr/bin/env bash
# One-time: generate the Ray auth token for the Compose cluster into cluster/.env (mode 600).
#   bash cluster/init-token.sh            # refuses to replace an existing token
#   bash cluster/init-token.sh --force    # rotate it (then: docker compose up -d --force-recreate)
# Compose reads cluster/.env to fill ${RAY_AUTH_TOKEN} on every node; the host's `ray job submit`
# uses the same file:  set -a; . cluster/.env; set +a
# The token never enters the image and cluster/.env is ignored by git: never commit it.
set -euo pipefail
cd "$(dirname "$0")"

ENV_FILE=${ENV_FILE:-.env}
if [ -s "$ENV_FILE" ] && grep -q '^RAY_AUTH_TOKEN=.' "$ENV_FILE" && [ "${1:-}" != "--force" ]; then
  echo "$PWD/$ENV_FILE already holds a token; keeping it (use --force to rotate)"
  exit 0
fi

# 32 random bytes, hex: no quoting issues in .env files, shells or HTTP headers.
token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
umask 077
tmp=$(mktemp "$ENV_FILE.XXXXXX")
{
  echo "# Ray token auth for cluster/compose.yaml (made by cluster/init-token.sh; keep secret)."
  echo "RAY_AUTH_MODE=token"
  echo "RAY_AUTH_TOKEN=$token"
} >"$tmp"
chmod 600 "$tmp"
mv "$tmp" "$ENV_FILE"
echo "wrote $PWD/$ENV_FILE (mode 600)"
echo "host side:  set -a; . cluster/.env; set +a   # exports RAY_AUTH_MODE and RAY_AUTH_TOKEN"
