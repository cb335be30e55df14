#!/bin/bash
# Build the images swarm-llm-{bootstrap,peer,gateway}:latest from the repository root as context.
#   docker/build.sh [extra build options, e.g. --build-arg VARIANT=cuda]
# Uses $CONTAINER_CLI (default: docker, else podman). A local CPU torch wheel in $TORCH_WHEELS (default /opt/wheels)
# is copied into docker/wheels/ first; without one the image takes torch from the index.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cli=${CONTAINER_CLI:-$(command -v docker || command -v podman)}
cp -u "${TORCH_WHEELS:-/opt/wheels}"/torch-2.13.0*.whl "$root/docker/wheels/" 2>/dev/null || true
extra=()  # podman: no registry needed (FROM a local debian:bookworm), and the docker format keeps HEALTHCHECK
[[ "$(basename "$cli")" == podman ]] && extra=(--pull=never --network host --format docker)
for target in bootstrap peer gateway; do
  "$cli" build "${extra[@]}" "$@" -f "$root/docker/Dockerfile" --target "$target" -t "swarm-llm-$target" "$root"
done
