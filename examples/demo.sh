#!/usr/bin/env bash
# The main job in one command: the sidecar (release build, embedded sled store under
# data/sessions) in front of the example legacy app. Open the printed URL; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
APP_PORT="${APP_PORT:-8000}"
LISTEN="${LISTEN:-127.0.0.1:8080}"

wait_port() {  # host:port
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing is listening on $1" >&2
  return 1
}

cargo build --release --locked --quiet
python3 examples/legacy_app.py "$APP_PORT" &
app=$!
trap 'kill -TERM ${sidecar:-} $app 2>/dev/null; wait 2>/dev/null; exit 0' INT TERM EXIT
wait_port "127.0.0.1:$APP_PORT"
SESSION_SIDECAR_UPSTREAM="http://127.0.0.1:$APP_PORT" SESSION_SIDECAR_LISTEN="$LISTEN" \
  ./target/release/session-sidecar --config config/sidecar.toml &
sidecar=$!
wait_port "$LISTEN"
echo
echo "  session-sidecar is up: open http://$LISTEN/ and reload to watch the visit counter count."
echo "  Also: http://$LISTEN/cart  http://$LISTEN/login?user=ann  http://$LISTEN/logout  http://$LISTEN/test-cookie"
echo "  Ctrl-C stops both."
echo
wait $sidecar
