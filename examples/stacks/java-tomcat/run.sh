#!/bin/bash
# Runs the example servlet on Debian's Tomcat 10.1 in the foreground on 127.0.0.1:PORT, with its
# own CATALINA_BASE under WORKDIR (configuration, the exploded ROOT webapp, logs, work, temp).
#   bash examples/stacks/java-tomcat/run.sh PORT WORKDIR
# SIGTERM stops Tomcat (catalina.sh execs java, which is this process). SIDECAR_SIGNING_KEY, when
# set in the environment, reaches the servlet through System.getenv.
set -euo pipefail

PORT=${1:?usage: run.sh PORT WORKDIR}
WORKDIR=${2:?usage: run.sh PORT WORKDIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELPER="$HERE/../../../helpers/java/SidecarSession.java"

export CATALINA_HOME=/usr/share/tomcat10
mkdir -p "$WORKDIR"
export CATALINA_BASE=$(cd "$WORKDIR" && pwd)/base
export CATALINA_TMPDIR=$CATALINA_BASE/temp
BASE=$CATALINA_BASE
APP=$BASE/webapps/ROOT
mkdir -p "$BASE/conf" "$BASE/logs" "$BASE/temp" "$BASE/work" \
         "$APP/WEB-INF/classes" "$APP/META-INF"

# Debian's stock files (conf/web.xml holds the default and JSP servlets, the MIME types and
# <request-character-encoding>UTF-8), then ours. /usr/share/tomcat10/etc holds the package's
# pristine copies, readable by anyone (/etc/tomcat10 is readable by root and group tomcat only).
for f in web.xml catalina.properties context.xml logging.properties; do
  if [ -r "/usr/share/tomcat10/etc/$f" ]; then cp "/usr/share/tomcat10/etc/$f" "$BASE/conf/$f"
  else cp "/etc/tomcat10/$f" "$BASE/conf/$f"; fi
done
sed -e "s/@PORT@/$PORT/" "$HERE/server.xml" > "$BASE/conf/server.xml"
cp "$HERE/web.xml" "$APP/WEB-INF/web.xml"
cp "$HERE/context.xml" "$APP/META-INF/context.xml"

# Compile the servlet and the helper into WEB-INF/classes (again only when a source is newer).
API=/usr/share/java/tomcat10-servlet-api.jar
STAMP=$APP/WEB-INF/classes/ExampleServlet.class
if [ ! -e "$STAMP" ] || [ "$HERE/ExampleServlet.java" -nt "$STAMP" ] || [ "$HELPER" -nt "$STAMP" ]; then
  javac -J-XX:-UsePerfData -J-XX:TieredStopAtLevel=1 -nowarn -encoding UTF-8 --release 17 -cp "$API" -d "$APP/WEB-INF/classes" \
    "$HELPER" "$HERE/ExampleServlet.java"
fi

# Start-up: about 1.2 s to the first answer, plus about 1.2 s of javac on a first start (javac
# runs with the C1 compiler only, which halves its time). The app's META-INF/context.xml turns
# off jar scanning (about 0.6 s) and its web.xml is metadata-complete (no annotation scanning).
# JAVA_OPTS and CATALINA_OPTS pass through.
# -XX:-UsePerfData: the JVM would otherwise write /tmp/hsperfdata_$USER/PID, outside WORKDIR.
export CATALINA_OPTS="-XX:-UsePerfData ${CATALINA_OPTS:-}"
export CATALINA_PID=$BASE/tomcat.pid
echo $$ > "$CATALINA_PID"
exec "$CATALINA_HOME/bin/catalina.sh" run
