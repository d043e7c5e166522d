#!/bin/bash
# run.sh PORT WORKDIR — the Perl CGI example under Debian's lighttpd (mod_cgi), in the
# foreground on 127.0.0.1:PORT. Generated config, logs and pid file go to WORKDIR.
# SIDECAR_SIGNING_KEY, when set in the environment, is passed to the script.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 PORT WORKDIR" >&2
    exit 2
fi
port=$1
mkdir -p "$2"
workdir=$(cd "$2" && pwd)
appdir=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$workdir/htdocs" "$workdir/uploads"

setenv=''
if [ -n "${SIDECAR_SIGNING_KEY:-}" ]; then
    setenv='setenv.add-environment = ( "SIDECAR_SIGNING_KEY" => env.SIDECAR_SIGNING_KEY )'
fi

sed -e "s|@PORT@|$port|g" -e "s|@WORKDIR@|$workdir|g" -e "s|@APPDIR@|$appdir|g" \
    -e "s|@SETENV@|$setenv|" \
    "$appdir/lighttpd.conf.in" > "$workdir/lighttpd.conf"

lighttpd -t -f "$workdir/lighttpd.conf" >/dev/null

# lighttpd is the process: SIGTERM stops it (and it stops its CGI children).
exec lighttpd -D -f "$workdir/lighttpd.conf"
