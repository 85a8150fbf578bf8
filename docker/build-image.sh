#!/usr/bin/env bash
# Build the project image elastic-trainer:0.1.0 (the one image for Compose, KubeRay and CI).
#   bash docker/build-image.sh            # = make image
# Environment knobs:
#   IMAGE=elastic-trainer:0.1.0           tag to build
#   BASE_IMAGE=python:3.11-slim-bookworm  base image (FROM); made locally when missing, see below
#   INSTALL_FROM=wheelhouse               wheelhouse: download wheels on the host into
#                                         docker/.wheelhouse/, install with --no-index (the build
#                                         needs no network: air-gapped hosts, CI);
#                                         index: skip the wheelhouse, pip in the build reaches
#                                         your index (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL are
#                                         passed through; torch must resolve to the CPU build)
# When BASE_IMAGE is not in the engine, docker/make-base-image.sh makes a local stand-in under
# the same name (run `docker pull python:3.11-slim-bookworm` first to use the official one).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/wheel-platforms.sh
source docker/wheel-platforms.sh

IMAGE=${IMAGE:-elastic-trainer:0.1.0}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
INSTALL_FROM=${INSTALL_FROM:-wheelhouse}
WHEELHOUSE=docker/.wheelhouse

log() { printf '[build-image] %s\n' "$*"; }

fill_wheelhouse() {
  # The stamp records what the wheelhouse was made from: unchanged inputs skip the download, so
  # the COPY layer of the wheelhouse stays cached and the dependency layer is reused.
  local want have=""
  want=$(cat docker/requirements.txt docker/requirements.lock .ci/constraints.txt | sha256sum)
  want=${want%% *}
  [ -f "$WHEELHOUSE/.stamp" ] && have=$(cat "$WHEELHOUSE/.stamp")
  if [ "$want" = "$have" ]; then
    log "wheelhouse up to date ($(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels)"
    return
  fi
  log "downloading wheels into $WHEELHOUSE"
  rm -rf "$WHEELHOUSE"
  mkdir -p "$WHEELHOUSE"
  "$PIP_PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" "${WHEEL_PLATFORM_ARGS[@]}" \
    -r docker/requirements.txt -c docker/requirements.lock -c .ci/constraints.txt
  echo "$want" >"$WHEELHOUSE/.stamp"
  log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

bash docker/make-base-image.sh "$BASE_IMAGE"
case "$INSTALL_FROM" in
  wheelhouse) fill_wheelhouse ;;
  index) mkdir -p "$WHEELHOUSE" && find "$WHEELHOUSE" -name '*.whl' -delete && rm -f "$WHEELHOUSE/.stamp" ;;
  *) log "INSTALL_FROM must be wheelhouse or index, not '$INSTALL_FROM'" >&2; exit 2 ;;
esac

log "building $IMAGE from $BASE_IMAGE (dependencies from: $INSTALL_FROM)"
start=$SECONDS
# Build args only where they differ from the Dockerfile's defaults: `docker compose up --build`
# passes none, and identical arguments let both reuse the same cached layers.
build_args=()
[ "$BASE_IMAGE" != python:3.11-slim-bookworm ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$INSTALL_FROM" = index ]; then
  build_args+=(--build-arg INSTALL_FROM=index --build-arg PIP_INDEX_URL --build-arg PIP_EXTRA_INDEX_URL)
fi
docker build --file docker/Dockerfile --tag "$IMAGE" "${build_args[@]}" \
  --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  .
log "built $IMAGE in $((SECONDS - start))s: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
