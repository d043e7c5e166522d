#!/usr/bin/env python3
"""A rolling upgrade on Redis, for real: the release before 0.2 (which names sessions by their
keys in clear) and this release serve the same visitors from one Redis, then the old one goes.

1. An old sidecar and a new one with `[store] legacy_names = true` share a redis-server the script
   starts. Simulated browsers (cookie jars) count, log in (cycle + subject), count, log out with a
   flash message and log in again, each request sent at random to either sidecar. Every answer is
   checked against what the browser should see: no visitor may be logged out, no count lost.
2. The old sidecar stops (the fleet is upgraded); the new one is told `legacy_names = false` by a
   SIGHUP and sweeps: every session moves to its digest. The browsers are still logged in, and no
   key name or value in Redis names a session key or a subject.

    python3 scripts/mixed_fleet.py --old PATH/TO/OLD/session-sidecar [--new target/release/session-sidecar]

Without --old, the release before is built from git (commit e0be108) into target/previous-release.
Prints the figures; exits non-zero on the first wrong answer."""

import argparse, http.client, http.server, json, os, random, signal, socket, subprocess, sys
import tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREVIOUS = "e0be108"
PREFIX = "fleet:"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


class App(http.server.BaseHTTPRequestHandler):
    """A legacy app: a counter, a login, a logout with a flash message. It answers what it saw."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        session = json.loads(self.headers.get("X-Session", "{}"))
        status = self.headers.get("X-Session-Status")
        headers = []
        path, _, query = self.path.partition("?")
        if path == "/count":
            headers.append(("X-Session-Set", json.dumps({"n": session.get("n", 0) + 1})))
        elif path == "/login":
            headers += [("X-Session-Cycle", "1"), ("X-Session-Subject", query),
                        ("X-Session-Set", json.dumps({"user": query}))]
        elif path == "/logout":
            headers += [("X-Session-Flush", "1"), ("X-Session-Set", '{"flash":"bye"}')]
        body = json.dumps({"status": status, "session": session}).encode()
        self.send_response(200)
        for h in headers:
            self.send_header(*h)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Browser:
    def __init__(self, name):
        self.name, self.cookie, self.expect = name, None, {}

    def get(self, port, path):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Cookie": f"sessionid={self.cookie}"} if self.cookie else {}
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            sys.exit(f"{self.name}: {path} on {port} answered {r.status}: {body[:200]!r}")
        for h, v in r.getheaders():
            if h.lower() == "set-cookie" and v.startswith("sessionid="):
                value = v.split(";")[0].split("=", 1)[1]
                self.cookie = None if "Max-Age=0" in v else value
        return json.loads(body)


def sidecar(binary, conf_path, port, admin, app_port, redis_port, legacy, sweep):
    with open(conf_path, "w") as f:
        f.write(f'listen = "127.0.0.1:{port}"\nupstream = "http://127.0.0.1:{app_port}"\n'
                f'[admin]\nlisten = "127.0.0.1:{admin}"\n[expiry]\nsweep_interval = {sweep}\n'
                f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
                f'key_prefix = "{PREFIX}"\n' + ("legacy_names = true\n" if legacy is not None and legacy else ""))
    proc = subprocess.Popen([binary, "--config", conf_path], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc


def old_binary(path):
    if path:
        return os.path.abspath(path)
    tree = os.path.join(ROOT, "target", "previous-release", "src")
    if not os.path.isdir(tree):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, PREVIOUS], check=True)
    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=tree, check=True,
                   env={**os.environ, "CARGO_TARGET_DIR": os.path.join(ROOT, "target", "previous-release", "target")})
    return os.path.join(ROOT, "target", "previous-release", "target", "release", "session-sidecar")


def redis_contents(port):
    out = []
    names = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{PREFIX}*"],
                           capture_output=True, text=True, check=True).stdout.split()
    for n in names:
        kind = subprocess.run(["redis-cli", "-p", str(port), "TYPE", n], capture_output=True, text=True).stdout.strip()
        cmd = "SMEMBERS" if kind == "set" else "GET"
        value = subprocess.run(["redis-cli", "-p", str(port), cmd, n], capture_output=True).stdout
        out.append((n, value))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old")
    ap.add_argument("--new", default=os.path.join(ROOT, "target", "release", "session-sidecar"))
    ap.add_argument("--browsers", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    old_bin = old_binary(args.old)
    work = tempfile.mkdtemp()
    app_port, redis_port = free_port(), free_port()
    app = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)
    wait_port(redis_port)
    old_port, new_port = free_port(), free_port()
    new_conf = os.path.join(work, "new.toml")
    old = sidecar(old_bin, os.path.join(work, "old.toml"), old_port, free_port(), app_port, redis_port, None, 300)
    new = sidecar(args.new, new_conf, new_port, free_port(), app_port, redis_port, True, 2)
    requests, names = 0, set()
    browsers = [Browser(f"b{i}") for i in range(args.browsers)]
    try:
        # Phase 1: both releases serve every browser, each request to either at random.
        for rnd in range(args.rounds):
            for b in browsers:
                user = f"user-{b.name}-{rnd}"
                names.add(user)
                steps = [("/count", None), ("/login?" + user, None), ("/count", None), ("/count", None)]
                if rnd % 2 == 1:
                    steps.append(("/logout", None))
                for path, _ in steps:
                    port = rng.choice([old_port, new_port])
                    seen = b.get(port, path)
                    requests += 1
                    if b.cookie:
                        names.add(b.cookie)
                    want_existing = bool(b.expect)
                    if (seen["status"] == "existing") != want_existing or seen["session"] != b.expect:
                        sys.exit(f"{b.name}: {path} via {'old' if port == old_port else 'new'} saw "
                                 f"{seen}, expected {b.expect} (round {rnd}, after {requests} requests)")
                    if path == "/count":
                        b.expect = {**b.expect, "n": b.expect.get("n", 0) + 1}
                    elif path.startswith("/login"):
                        b.expect = {**b.expect, "user": user}
                    elif path == "/logout":
                        b.expect = {"flash": "bye"}
        phase1 = requests
        # Phase 2: the old release is gone; the new one stops writing clear names and sweeps.
        old.send_signal(signal.SIGTERM)
        old.wait(timeout=30)
        sidecar_conf = open(new_conf).read().replace("legacy_names = true\n", "")
        open(new_conf, "w").write(sidecar_conf)
        new.send_signal(signal.SIGHUP)
        time.sleep(5)  # two sweeps at sweep_interval = 2
        for b in browsers:
            seen = b.get(new_port, "/")
            requests += 1
            if (seen["status"] == "existing") != bool(b.expect) or seen["session"] != b.expect:
                sys.exit(f"{b.name} after the upgrade saw {seen}, expected {b.expect}")
        held = redis_contents(redis_port)
        clear = [(n, v) for n, v in held if any(x in n or x.encode() in v for x in names)]
        legacy = [n for n, _ in held if n.startswith(PREFIX + "r:") or n.startswith(PREFIX + "u:")]
        if clear or legacy:
            sys.exit(f"clear names left in Redis: {clear[:3]} {legacy[:3]}")
        print(f"mixed fleet: {args.browsers} browsers, {phase1} requests across the old and the new "
              f"release, 0 visitors logged out, 0 counts lost; after the upgrade and a sweep, "
              f"{len(held)} Redis keys, none naming any of {len(names)} session keys and subjects used")
    finally:
        for p in (old, new, redis):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        app.shutdown()


main()
