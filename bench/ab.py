#!/usr/bin/env python3
"""A/B of two sidecar binaries on 127.0.0.1: rounds interleaved in alternating order, wrk -t1 -c32
for 6 s on a pass-through path and a session read; prints median req/s and the sidecar's CPU
time per request (user + system, from /proc), the steadier figure on a shared machine.

    python3 bench/ab.py BEFORE_BINARY AFTER_BINARY [ROUNDS]

Build the bench upstream first: cargo build --release --example bench_upstream. Builds nothing
else; everything it starts listens on 127.0.0.1 and is stopped at the end.
"""
import os, socket, subprocess, tempfile, time, statistics, sys


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
                          f'skip_paths = ["/static/"]\n[store]\npath = "{T}/{who}"\n[admin]\nlisten = ""\n')
    procs[who] = (port, subprocess.Popen([binary, "--config", conf], env={**os.environ, "RUST_LOG": "warn"}))
time.sleep(1)
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
res = {}
for r in range(rounds):
    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
    for path in ("/static/x", "/read"):
        for who in order:
            port, p = procs[who]
            c0 = cpu(p.pid)
            out = subprocess.run(["wrk", "-t1", "-c32", "-d6s", f"http://127.0.0.1:{port}{path}"],
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
