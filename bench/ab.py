#!/usr/bin/env python3
"""A/B of two sidecar binaries on 127.0.0.1: rounds interleaved in alternating order, wrk -t1 -c32
for 6 s on a pass-through path, a session read and the visit counter (returning visitors: 200
sessions made on each sidecar first); prints median req/s and the sidecar's CPU time per request
(user + system, from /proc), the steadier figure on a shared machine.

    python3 bench/ab.py BEFORE_BINARY AFTER_BINARY [ROUNDS] [EXTRA_TOML]

EXTRA_TOML is added to both configs (e.g. '[security]\nsecret_key = "..."'). AB_PATHS=/count
(comma-separated) measures only those paths; SESSION_SIDECAR_* variables reach both sidecars.

Build the bench upstream first: cargo build --release --example bench_upstream. Builds nothing
else; everything it starts listens on 127.0.0.1 and is stopped at the end.
"""
import os, socket, subprocess, tempfile, time, statistics, sys, urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


A, B = sys.argv[1], sys.argv[2]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UP = os.path.join(ROOT, "target/release/examples/bench_upstream")
T = tempfile.mkdtemp()
TICK = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK
UP_PORT = free_port()
up = subprocess.Popen([UP, str(UP_PORT)])
time.sleep(0.5)
procs = {}
for who, port, binary in (("before", free_port(), A), ("after", free_port(), B)):
    conf = f"{T}/{who}.toml"
    open(conf, "w").write(f'listen = "127.0.0.1:{port}"\nupstream = "http://127.0.0.1:{UP_PORT}"\n'
                          f'skip_paths = ["/static/"]\n[store]\npath = "{T}/{who}"\n[admin]\nlisten = ""\n'
                          + (sys.argv[4].replace("\\n", "\n") if len(sys.argv) > 4 else ""))
    procs[who] = (port, subprocess.Popen([binary, "--config", conf], env={**os.environ, "RUST_LOG": "warn"}))
time.sleep(1)
cookies = {}
for who, (port, _) in procs.items():
    cookies[who] = f"{T}/cookies-{who}.txt"
    with open(cookies[who], "w") as f:
        for _ in range(200):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/count") as r:
                f.write(r.headers.get("Set-Cookie").split(";", 1)[0].split("=", 1)[1] + "\n")
LUA = os.path.join(ROOT, "bench", "sessions.lua")
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
res = {}
for r in range(rounds):
    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
    for path in os.environ.get("AB_PATHS", "/static/x,/read,/count").split(","):
        for who in order:
            port, p = procs[who]
            c0 = cpu(p.pid)
            url = f"http://127.0.0.1:{port}{path}"
            visitors = [] if path.startswith("/static") else ["-s", LUA, url, "--", cookies[who], path]
            out = subprocess.run(["wrk", "-t1", "-c32", "-d6s"] + (visitors or [url]),
                                 capture_output=True, text=True).stdout
            c1 = cpu(p.pid)
            rps = float([l for l in out.splitlines() if "Requests/sec" in l][0].split()[1])
            reqs = int([l for l in out.splitlines() if "requests in" in l][0].split()[0])
            res.setdefault((path, who), []).append((rps, (c1 - c0) / reqs * 1e6))
for p in procs.values():
    p[1].terminate()
    p[1].wait()
up.terminate()
subprocess.run(["rm", "-rf", T])
for (path, who), v in sorted(res.items()):
    print(f"{path:10} {who:6} req/s median {statistics.median(x[0] for x in v):9.0f}  "
          f"CPU µs/req median {statistics.median(x[1] for x in v):6.1f}   all req/s {[round(x[0]) for x in v]}")
