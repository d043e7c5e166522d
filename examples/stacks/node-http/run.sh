#!/bin/bash
# The example app on Node's http module (Debian's `nodejs`, Node 20), no npm packages.
#
#   bash examples/stacks/node-http/run.sh PORT WORKDIR
#
# Runs in the foreground on 127.0.0.1:PORT: a cluster primary and WORKERS (default 2) workers.
# SIGTERM stops the workers gracefully, then the primary (exec: node is this process). The pid
# file and access log go to WORKDIR; SIDECAR_SIGNING_KEY passes through the environment.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 PORT WORKDIR" >&2
    exit 2
fi
PORT=$1
mkdir -p "$2"
WORKDIR=$(cd "$2" && pwd)
APP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODE=/usr/bin/node
[ -x "$NODE" ] || NODE=node

export NODE_ENV=production
exec "$NODE" "$APP_DIR/app.js" "$PORT" "$WORKDIR"
