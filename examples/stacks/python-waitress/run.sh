#!/bin/bash
# The example WSGI app (examples/stacks/python-gunicorn/app.py, unchanged) under Debian's
# waitress (package `python3-waitress`, 2.1). Waitress sorts response headers by name, so it is
# the stack that shows the helper's changes mean the same in any header order.
#
#   bash examples/stacks/python-waitress/run.sh PORT WORKDIR
#
# Runs in the foreground on 127.0.0.1:PORT (exec: waitress is this process; SIGTERM stops it).
# SIDECAR_SIGNING_KEY passes through the environment to the app.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 PORT WORKDIR" >&2
    exit 2
fi
PORT=$1
mkdir -p "$2"
WORKDIR=$(cd "$2" && pwd)
APP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../python-gunicorn" && pwd)
# Bytecode caches go to WORKDIR, not next to app.py and the helper.
export PYTHONPYCACHEPREFIX="$WORKDIR/pycache"
cd "$APP_DIR"
# waitress' defaults take a session at max_session_bytes: max_request_header_size is 256 KiB.
exec /usr/bin/python3 -m waitress --listen="127.0.0.1:$PORT" --threads=8 app:application
