#!/usr/bin/env bash
# The main job in one command: the sidecar (release build, embedded sled store under
# data/sessions) in front of the example legacy app. Open the printed URL; Ctrl-C stops both.
# APP_PORT, LISTEN, ADMIN_LISTEN and SESSION_SIDECAR_STORE__PATH move it (a second demo beside
# the first needs all four).
set -euo pipefail
cd "$(dirname "$0")/.."
APP_PORT="${APP_PORT:-8000}"
LISTEN="${LISTEN:-127.0.0.1:8080}"
ADMIN_LISTEN="${ADMIN_LISTEN-127.0.0.1:9091}"   # empty: no admin listener

wait_port() {  # host:port
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing is listening on $1" >&2
  return 1
}

echo "building the release binary (the first build takes a few minutes)..."
cargo build --release --locked
python3 examples/legacy_app.py "$APP_PORT" &
app=$!
stop() { kill -TERM ${sidecar:-} $app 2>/dev/null; wait 2>/dev/null; }
# Ctrl-C or SIGTERM: a normal stop. Anything else ending the script keeps its exit status.
trap 'stop; exit 0' INT TERM
trap 'status=$?; stop; exit $status' EXIT
wait_port "127.0.0.1:$APP_PORT"
SESSION_SIDECAR_UPSTREAM="http://127.0.0.1:$APP_PORT" SESSION_SIDECAR_LISTEN="$LISTEN" \
  SESSION_SIDECAR_ADMIN__LISTEN="$ADMIN_LISTEN" \
  SESSION_SIDECAR_STORE__PATH="${SESSION_SIDECAR_STORE__PATH:-data/sessions}" \
  ./target/release/session-sidecar --config config/sidecar.toml &
sidecar=$!
if ! wait_port "$LISTEN"; then
  wait $sidecar || true
  echo "session-sidecar did not start (its message is above)" >&2
  exit 1
fi
echo
echo "  session-sidecar is up: open http://$LISTEN/ and reload to watch the visit counter count."
echo "  Also: http://$LISTEN/cart  http://$LISTEN/login?user=ann  http://$LISTEN/logout  http://$LISTEN/test-cookie"
echo "  Ctrl-C stops both."
echo
wait $sidecar
