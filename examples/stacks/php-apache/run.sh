#!/usr/bin/env bash
# The example app under Apache 2.4 (prefork) with mod_php, from Debian's packages.
#   bash examples/stacks/php-apache/run.sh PORT WORKDIR
# Runs in the foreground on 127.0.0.1:PORT; configuration, logs and run files under WORKDIR.
# SIGTERM stops Apache and its children (exec: Apache is this process).
set -euo pipefail
port=${1:?usage: run.sh PORT WORKDIR}
work=${2:?usage: run.sh PORT WORKDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
app=$(cd "$here/../php" && pwd)
mkdir -p "$work/run" "$work/logs"
work=$(cd "$work" && pwd)

# Started as root, Apache serves as www-data, as on Debian (its children must read the app and
# the helper; when www-data cannot, as the owner of the checkout); otherwise as the user who runs it.
user='# not root: Apache runs as the user who started it'
if [ "$(id -u)" = 0 ]; then
    serve_as=www-data
    helper="$app/../../../helpers/php/SidecarSession.php"
    if ! runuser -u www-data -- sh -c 'test -r "$1" && test -r "$2"' sh "$app/index.php" "$helper"; then
        serve_as=$(stat -c %U "$app")
        if [ "$serve_as" = root ]; then
            echo "run.sh: www-data cannot read $app and the helper; make them readable" >&2
            exit 1
        fi
    fi
    user="User $serve_as"$'\n'"Group $(id -gn "$serve_as")"
fi

sed -e "s|@WORKDIR@|$work|g" -e "s|@PORT@|$port|g" -e "s|@APPDIR@|$app|g" \
    -e "s|@USER@|${user//$'\n'/\\n}|" \
    "$here/apache2.conf.in" > "$work/apache2.conf"
rm -f "$work/run/apache2.pid"

# Debian's apache2ctl sources /etc/apache2/envvars (LANG=C, no HOME); the key the app needs comes
# from this environment and reaches PHP through PassEnv (apache2.conf).
export LANG=C
exec /usr/sbin/apache2 -f "$work/apache2.conf" -DFOREGROUND
