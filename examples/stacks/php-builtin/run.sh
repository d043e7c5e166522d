#!/usr/bin/env bash
# The example app under PHP's built-in web server (php -S, Debian's php-cli), the same index.php
# as the router script for every path.
#   bash examples/stacks/php-builtin/run.sh PORT WORKDIR
# Runs in the foreground on 127.0.0.1:PORT, its log in WORKDIR/logs/php-server.log.
# SIGTERM (or SIGINT) stops the server and all its workers.
set -euo pipefail
port=${1:?usage: run.sh PORT WORKDIR}
work=${2:?usage: run.sh PORT WORKDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
app=$(cd "$here/../php" && pwd)
mkdir -p "$work/logs"

# The built-in server answers one request at a time unless PHP_CLI_SERVER_WORKERS forks workers
# (PHP 7.4+, Linux): one slow page would stall every visitor, the sidecar's health checks
# included. Four workers by default; the environment may say otherwise.
export PHP_CLI_SERVER_WORKERS=${PHP_CLI_SERVER_WORKERS:-4}

# The server is started in a process group of its own (set -m), because with workers a SIGTERM
# to the parent alone leaves the workers serving, orphaned: the whole group is stopped instead.
# SIDECAR_SIGNING_KEY reaches the app with the inherited environment (getenv()).
set -m
php -S "127.0.0.1:$port" -t "$app" "$app/index.php" >>"$work/logs/php-server.log" 2>&1 &
server=$!
set +m
stop() { kill -TERM -- "-$server" 2>/dev/null || true; }
trap stop TERM INT HUP
trap 'stop; wait "$server" 2>/dev/null || true' EXIT
wait "$server"
