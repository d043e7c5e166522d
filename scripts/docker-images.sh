#!/usr/bin/env bash
# Builds the images the container tests and the compose examples use:
#   session-sidecar           from the project's own Dockerfile, unchanged
#   session-sidecar-example   the example's legacy app, Redis and nginx (examples/compose/Dockerfile)
# Where the engine cannot pull the Dockerfiles' base images, they are made locally first
# (scripts/docker-base-images.sh). Layers are cached: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/docker-base-images.sh
echo "== docker build -t session-sidecar ."
docker build -q -t session-sidecar . >/dev/null
echo "== docker build -t session-sidecar-example examples (examples/compose/Dockerfile)"
docker build -q -t session-sidecar-example -f examples/compose/Dockerfile examples >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^session-sidecar(-example)?:latest '
