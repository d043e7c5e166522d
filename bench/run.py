#!/usr/bin/env python3
"""The benchmark: session-sidecar against nginx `proxy_pass`, on 127.0.0.1, in one run.

    python3 bench/run.py            # full: 3 interleaved rounds of 10 s per scenario, latency, 1M sessions
    python3 bench/run.py --smoke    # a few seconds, no targets (what CI runs so the harness cannot rot)
    python3 bench/run.py --calibration DIR   # also a reference proxy built from the cargo project DIR
                                             # (run as `BIN LISTEN UPSTREAM 2`), on pass-through

Every round runs each contender once, one after the other (A B C A B C ...): the upstream hit
directly (the ceiling: when it is near the proxies' figures, the ratios say nothing), nginx
`proxy_pass` (1.00x), the sidecar, and on the session scenarios the in-memory peer
(bench/lua_sessions.conf: nginx + Lua + a shared-memory dict, when nginx-extras and lua-cjson
install). Figures are medians of the rounds; CPU µs per request is the contender's own CPU time
(all its processes and threads) over the requests it served.

It builds what it needs (release sidecar, the bench upstream), installs Debian's nginx, wrk and
gnuplot if missing (and oha through cargo for fixed-rate latency), starts everything itself,
stops it, and writes bench/results.json, bench/results.md and bench/chart.png.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TICK = os.sysconf("SC_CLK_TCK")


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


LUA_MODULE = "/usr/share/nginx/modules/ngx_http_lua_module.so"
CJSON = "/usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so"


def ensure_tools(need_oha, lua=True):
    missing = [p for p, b in [("nginx", "nginx"), ("wrk", "wrk"), ("gnuplot-nox", "gnuplot")] if not shutil.which(b)
               and not os.path.exists(f"/usr/sbin/{b}")]
    if lua:
        missing += [p for p, f in [("nginx-extras", LUA_MODULE), ("lua-cjson", CJSON)] if not os.path.exists(f)]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-qq")
        if subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env).returncode != 0:
            print(f"could not install {missing}; the Lua peer is left out", flush=True)
    if need_oha and not shutil.which("oha"):
        sh("cargo", "install", "oha", "--locked", "--quiet")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port():
    """A free port whose cluster bus port (port + 10000) exists and is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def wait_port(port, proc=None, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pids):
    return sum(cpu_split(pids)[:2])


def cpu_split(pids):
    """User and system CPU seconds of the processes, and their threads' context switches."""
    user = system = switches = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
            except OSError:
                pass  # a thread that ended meanwhile
    return user / TICK, system / TICK, switches


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Stack:
    """Upstream, sidecar and nginx, all on 127.0.0.1."""

    def __init__(self, tmp, store_path=None, redis_store=None, peers=False, calibration=None):
        self.tmp = tmp
        self.redis_store = redis_store
        self.store_extra = ""
        self.signed = False
        self.lua = self.minproxy = None
        self.up_port, self.sc_port, self.ng_port = free_port(), free_port(), free_port()
        self.upstream = subprocess.Popen([os.path.join(ROOT, "target/release/examples/bench_upstream"),
                                          str(self.up_port)])
        wait_port(self.up_port, self.upstream)
        self.store_path = store_path or os.path.join(tmp, "sessions")
        self.sidecar = None
        self.start_sidecar()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream app {{ server 127.0.0.1:{self.up_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{self.ng_port} reuseport;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
""")
        self.nginx = subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stderr=subprocess.DEVNULL)
        wait_port(self.ng_port, self.nginx)
        if peers:
            self.start_lua()
        if calibration:
            self.mp_port = free_port()
            self.minproxy = subprocess.Popen([calibration, f"127.0.0.1:{self.mp_port}",
                                              f"127.0.0.1:{self.up_port}", "2"], stdout=subprocess.DEVNULL)
            wait_port(self.mp_port, self.minproxy)

    def start_lua(self):
        if not (os.path.exists(LUA_MODULE) and os.path.exists(CJSON)):
            print("no nginx Lua module or lua-cjson: the in-memory peer is left out", flush=True)
            return
        self.lua_port = free_port()
        with open(os.path.join(BENCH, "lua_sessions.conf")) as f:
            text = (f.read().replace("@TMP@", self.tmp).replace("@UPSTREAM@", str(self.up_port))
                    .replace("@LISTEN@", str(self.lua_port)))
        conf = os.path.join(self.tmp, "lua-nginx.conf")
        with open(conf, "w") as f:
            f.write(text)
        self.lua = subprocess.Popen(["nginx", "-c", conf, "-p", "/usr/share/nginx"], stderr=subprocess.DEVNULL)
        try:
            wait_port(self.lua_port, self.lua, timeout=10)
        except RuntimeError as e:
            print(f"the Lua peer did not start ({e}): left out", flush=True)
            self.lua = None

    def start_sidecar(self):
        conf = os.path.join(self.tmp, "sidecar.toml")
        with open(conf, "w") as f:
            store = self.redis_store or f'[store]\npath = "{self.store_path}"\n{self.store_extra}'
            security = f'[security]\nsecret_key = "{SECRET_KEY}"\n' if self.signed else ""
            f.write(f'listen = "127.0.0.1:{self.sc_port}"\nupstream = "http://127.0.0.1:{self.up_port}"\n'
                    f'skip_paths = ["/static/"]\n{store}{security}[admin]\nlisten = ""\n')
        started = time.time()
        self.sidecar = subprocess.Popen([os.path.join(ROOT, "target/release/session-sidecar"), "--config", conf],
                                        env={**os.environ, "RUST_LOG": "warn"})
        wait_port(self.sc_port, self.sidecar)
        # Start-up is measured to the first request served.
        urllib.request.urlopen(f"http://127.0.0.1:{self.sc_port}/static/ready").read()
        self.startup_s = time.time() - started

    def restart_sidecar(self, store_extra, signed=False):
        """The same store under another `[store]` setting (e.g. durable = false), with or without
        a `secret_key` (signed cookies, sealed records)."""
        self.sidecar.send_signal(signal.SIGTERM)
        self.sidecar.wait(timeout=60)
        self.store_extra = store_extra
        self.signed = signed
        self.start_sidecar()

    def nginx_pids(self, proc=None):
        proc = proc or self.nginx
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        return [proc.pid] + [int(p) for p in out]

    def contenders(self, scenario_sessions):
        """(name, port, pids) of everyone measured on a scenario."""
        out = [("upstream", self.up_port, [self.upstream.pid]), ("nginx", self.ng_port, self.nginx_pids()),
               ("sidecar", self.sc_port, [self.sidecar.pid])]
        if self.lua and scenario_sessions:
            out.append(("lua peer", self.lua_port, self.nginx_pids(self.lua)))
        if self.minproxy and not scenario_sessions:
            out.append(("calibration", self.mp_port, [self.minproxy.pid]))
        return out

    def stats(self):
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.up_port}/stats").read())

    def stop(self):
        procs = (self.sidecar, self.nginx, self.lua, self.minproxy, self.upstream)
        for p in procs:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            if p:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def make_sessions(port, n):
    """Creates n sessions through the sidecar and returns their cookie values."""
    cookies = []
    for _ in range(n):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/count") as r:
            c = r.headers.get("Set-Cookie")
            cookies.append(c.split(";", 1)[0].split("=", 1)[1])
    return cookies


def cpu_ticks():
    """This machine's CPU ticks so far: all of them, and those the hypervisor stole."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[7]


def steal_pct(before, after):
    return 100.0 * (after[1] - before[1]) / max(after[0] - before[0], 1)


def wrk(port, path, seconds, cookie_file=None):
    args = ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency"]
    if cookie_file:
        args += ["-s", os.path.join(BENCH, "sessions.lua"), f"http://127.0.0.1:{port}{path}", "--", cookie_file, path]
    else:
        args += [f"http://127.0.0.1:{port}{path}"]
    ticks = cpu_ticks()
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    stolen = steal_pct(ticks, cpu_ticks())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    return {"rps": rps, "requests": total, "p50_ms": pct(50), "p99_ms": pct(99),
            "non2xx": int(errors.group(1)) if errors else 0, "steal_pct": stolen}


def oha(port, path, rate, seconds, cookie=None):
    args = ["oha", "--no-tui", "--output-format", "json", "-q", str(rate), "-z", f"{seconds}s", "-c", "32",
            "--latency-correction"]
    if cookie:
        args += ["-H", f"Cookie: sessionid={cookie}", "-H", "X-Bench-Expect: existing"]
    args.append(f"http://127.0.0.1:{port}{path}")
    out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    p = out["latencyPercentiles"]
    return {"rps": out["summary"]["requestsPerSec"], "p50_ms": p["p50"] * 1000, "p99_ms": p["p99"] * 1000}


# Production runs with a secret_key (signed cookies, sealed records).
SECRET_KEY = "bench-secret-key-0123456789abcdef0123456789abcdef"
# (name, path, with sessions, target ratio to nginx ("peer": the in-memory Lua peer's ratio),
#  [store] lines for the sidecar)
BASE_SCENARIOS = [
    ("pass-through (skip_paths)", "/static/x", False, 0.95, ""),
    ("session read, no write", "/read", True, "peer", ""),
    ("visit counter (read + durable write)", "/count", True, 0.6, ""),
    ("visit counter, durable = false", "/count", True, "peer", "durable = false\n"),
]
# The signed figures first, then the same without a secret_key.
SCENARIOS = ([(f"{n}, secret_key", p, s, t, e, True) for n, p, s, t, e in BASE_SCENARIOS]
             + [(n, p, s, t, e, False) for n, p, s, t, e in BASE_SCENARIOS])
# Fixed-rate latency: every scenario's p99 at this rate, against nginx's + this many ms.
FIXED_RATE, FIXED_P99_SLACK_MS = 10000, 0.3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--big", type=int, default=1_000_000, help="sessions in the large-store scenario (0: skip)")
    ap.add_argument("--replot", action="store_true", help="only redraw the table and chart from results.json")
    ap.add_argument("--redis", action="store_true", help="also the visit counter on the Redis store")
    ap.add_argument("--only-redis", action="store_true", help="only the Redis visit counter (results-redis.*)")
    ap.add_argument("--only-big", action="store_true", help="only the large-store part (results-big.json)")
    ap.add_argument("--calibration", help="a cargo project whose one binary is a reference proxy "
                                          "(BIN LISTEN UPSTREAM THREADS), measured on pass-through")
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(BENCH, "results.json")) as f:
            write_outputs(json.load(f), smoke=False)
        return 0
    if args.smoke:
        args.seconds, args.rounds, args.sessions, args.big = 2, 1, 100, 0
    if args.only_big:
        ensure_tools(need_oha=False, lua=False)
        sh("cargo", "build", "--release", "--locked", "--quiet", "--bin", "session-sidecar",
           "--example", "bench_upstream", "--example", "bench_fill", cwd=ROOT)
        res = big_store(tempfile.mkdtemp(prefix="sidecar-bench-"), args)
        with open(os.path.join(BENCH, "results-big.json"), "w") as f:
            json.dump({"machine": machine(), "command": " ".join(sys.argv), "big": res}, f, indent=2)
        return 0
    if args.only_redis:
        ensure_tools(need_oha=False)
        sh("cargo", "build", "--release", "--locked", "--quiet", "--bin", "session-sidecar",
           "--example", "bench_upstream", cwd=ROOT)
        runs = redis_counter(tempfile.mkdtemp(prefix="sidecar-bench-"), args)
        suffix = "-smoke" if args.smoke else ""
        with open(os.path.join(BENCH, f"results-redis{suffix}.json"), "w") as f:
            json.dump({"machine": machine(), "command": " ".join(sys.argv), "redis": runs}, f, indent=2)
        text = "\n".join(["Visit counter (`/count`, wrk -t1 -c32, median of rounds) with the sidecar on Redis, "
                          "against nginx proxy_pass and the Lua+Redis session peer on the same Redis; every "
                          "server on this machine, no persistence.", ""] + redis_table(runs)
                         + ["", f"Machine: {machine()}. Command: `{' '.join(sys.argv)}`."]) + "\n"
        with open(os.path.join(BENCH, f"results-redis{suffix}.md"), "w") as f:
            f.write(text)
        print(text)
        return 1 if any(r["lost"] for r in runs) else 0
    ensure_tools(need_oha=not args.smoke)
    sh("cargo", "build", "--release", "--locked", "--quiet", "--bin", "session-sidecar",
       "--example", "bench_upstream", "--example", "bench_fill", cwd=ROOT)

    tmp = tempfile.mkdtemp(prefix="sidecar-bench-")
    calibration = build_calibration(args.calibration) if args.calibration else None
    stack = Stack(tmp, peers=True, calibration=calibration)
    results = {"machine": machine(), "command": " ".join(sys.argv), "scenarios": [],
               "loader": "wrk -t1 -c32 (one thread: its own limit is the 'upstream' column's order)"}
    try:
        cookie_files = {}

        def sessions_for(who, port):
            cookie_files[who] = os.path.join(tmp, f"cookies-{who.replace(' ', '-')}.txt")
            with open(cookie_files[who], "w") as f:
                f.write("\n".join(make_sessions(port, args.sessions)) + "\n")

        if stack.lua:
            sessions_for("lua peer", stack.lua_port)
        fixed_rate = not args.smoke and shutil.which("oha")
        for name, path, sessions, target, store_extra, signed in SCENARIOS:
            if (store_extra, signed) != (stack.store_extra, stack.signed):
                stack.restart_sidecar(store_extra, signed)
            if signed != cookie_files.get("signed"):
                # Cookies made under one secret_key setting are not valid under the other.
                sessions_for("sidecar", stack.sc_port)
                cookie_files["signed"] = signed
            contenders = stack.contenders(sessions)
            rounds = {who: [] for who, _, _ in contenders}
            for r in range(args.rounds):
                for who, port, pids in contenders:
                    cookies = cookie_files.get(who, cookie_files.get("sidecar")) if sessions else None
                    before = cpu_split(pids)
                    res = wrk(port, path, args.seconds, cookies)
                    after = cpu_split(pids)
                    n = max(res["requests"], 1)
                    res["cpu_user_us_per_req"] = (after[0] - before[0]) / n * 1e6
                    res["cpu_sys_us_per_req"] = (after[1] - before[1]) / n * 1e6
                    res["cpu_us_per_req"] = res["cpu_user_us_per_req"] + res["cpu_sys_us_per_req"]
                    res["switches_per_req"] = (after[2] - before[2]) / n
                    rounds[who].append(res)
                    print(f"{name:52} round {r + 1} {who:11} {res['rps']:>9.0f} req/s  p50 {res['p50_ms']:.3f} ms"
                          f"  p99 {res['p99_ms']:.3f} ms  {res['cpu_us_per_req']:.1f} µs CPU/req", flush=True)
            med = {who: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for who, rs in rounds.items()}
            ratios = {who: m["rps"] / med["nginx"]["rps"] for who, m in med.items()}
            if target == "peer":
                target = round(ratios["lua peer"], 2) if "lua peer" in ratios else None
            scenario = {"name": name, "path": path, "target": target, "signed": signed,
                        "ratio": ratios["sidecar"], "ratios": ratios, "median": med,
                        "nginx": med["nginx"], "sidecar": med["sidecar"], "rounds": rounds}
            if fixed_rate:
                first = None
                if sessions:
                    with open(cookie_files["sidecar"]) as f:
                        first = f.readline().strip()
                scenario["fixed_rate"] = {
                    who: oha(port, path, FIXED_RATE, args.seconds, first if who == "sidecar" else None)
                    for who, port in (("nginx", stack.ng_port), ("sidecar", stack.sc_port))}
                print(f"  fixed {FIXED_RATE} req/s: " + ", ".join(
                    f"{w} p99 {x['p99_ms']:.3f} ms" for w, x in scenario["fixed_rate"].items()), flush=True)
            results["scenarios"].append(scenario)
            print(f"  -> sidecar {ratios['sidecar']:.2f}x nginx (target {target}); "
                  + ", ".join(f"{w} {x:.2f}x" for w, x in ratios.items() if w not in ("sidecar", "nginx")),
                  flush=True)
        if stack.store_extra or stack.signed:
            stack.restart_sidecar("")
        stats = stack.stats()
        results["lost_sessions"] = stats["lost"]
        print(f"lost sessions (expected existing, got new): {stats['lost']} of {stats['requests']} requests")
    finally:
        stack.stop()

    if args.big:
        results["big"] = big_store(tmp, args)
    if args.redis:
        results["redis"] = redis_counter(tmp, args)
    write_outputs(results, args.smoke)
    if results["lost_sessions"]:
        print("FAIL: sessions were lost")
        return 1
    return 0


def build_calibration(path):
    out = tempfile.mkdtemp(prefix="sidecar-bench-calibration-")
    sh("cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(path, "Cargo.toml"),
       "--target-dir", out)
    bins = [f for f in os.listdir(os.path.join(out, "release"))
            if os.access(os.path.join(out, "release", f), os.X_OK) and os.path.isfile(os.path.join(out, "release", f))]
    return os.path.join(out, "release", bins[0])


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def counter_on(tmp, store_path, args, label):
    """Start-up, RSS and visit-counter req/s of a sidecar on the store at store_path."""
    stack = Stack(tmp, store_path=store_path)
    try:
        cookie_file = os.path.join(tmp, f"cookies-{label}.txt")
        with open(cookie_file, "w") as f:
            f.write("\n".join(make_sessions(stack.sc_port, 1000)) + "\n")
        runs = [wrk(stack.sc_port, "/count", args.seconds, cookie_file) for _ in range(args.rounds)]
        return {"startup_s": stack.startup_s, "rss_mib": rss_mib(stack.sidecar.pid),
                "counter_rps": statistics.median(r["rps"] for r in runs)}
    finally:
        stack.stop()


def big_store(tmp, args):
    """The visit counter on a store of 1k sessions and on one of args.big, one after the other;
    start-up time, RSS and bytes per session on disk for the big one, and a paper estimate."""
    small = counter_on(tmp, os.path.join(tmp, "small"), args, "small")
    path = os.path.join(tmp, "big")
    t = time.time()
    sh(os.path.join(ROOT, "target/release/examples/bench_fill"), path, str(args.big), stdout=subprocess.DEVNULL)
    print(f"filled {args.big} sessions in {time.time() - t:.0f} s")
    disk = dir_bytes(path)
    big = counter_on(tmp, path, args, "big")
    res = {"sessions": args.big, **big, "small_counter_rps": small["counter_rps"], "small_rss_mib": small["rss_mib"],
           "counter_vs_small": big["counter_rps"] / small["counter_rps"], "disk_bytes": disk,
           "disk_bytes_per_session": disk / args.big,
           "rss_bytes_per_session": max(0.0, big["rss_mib"] - small["rss_mib"]) * 1048576 / args.big}
    for n in (10_000_000, 100_000_000):
        res[f"estimate_{n}"] = {"disk_gib": res["disk_bytes_per_session"] * n / 2**30,
                                "rss_mib": small["rss_mib"] + res["rss_bytes_per_session"] * n / 2**20}
    print(f"{args.big:,} sessions: start-up {res['startup_s']:.2f} s, RSS {res['rss_mib']:.0f} MiB "
          f"(1k store: {small['rss_mib']:.0f} MiB), counter {big['counter_rps']:.0f} req/s = "
          f"{res['counter_vs_small']:.2f} of the 1k store's {small['counter_rps']:.0f}; "
          f"{res['disk_bytes_per_session']:.0f} bytes/session on disk", flush=True)
    return res


def redis_calls(ports):
    """Round trips clients made to the Redis servers at `ports` so far, from INFO commandstats."""
    total = 0
    for port in ports:
        out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True,
                             text=True, check=True).stdout
        stat = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+)", out)}
        # A script's own commands are counted too: each swap runs one GET and one SET or DEL
        # (SADD/SREM only when a subject changes, PUBLISH only when a session ends). A WAIT rides
        # in the same round trip as its swap. What is left is what clients sent themselves.
        total += (sum(stat.values()) - 2 * stat.get("evalsha", 0) - stat.get("wait", 0)
                  - stat.get("info", 0) - stat.get("ping", 0) - stat.get("replconf", 0))
    return total


def start_redis(tmp, name, *extra):
    """A redis-server on a free loopback port, without persistence."""
    port = free_cluster_port() if "--cluster-enabled" in extra else free_port()
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d, *extra], stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    return port, proc


def wait_for(what, check, timeout=30):
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


def redis_topology(tmp, kind):
    """Starts a Redis of `kind`; returns (sidecar [store] TOML, data ports to count on, the port a
    single-server client uses (None on a cluster), processes)."""
    if kind == "standalone":
        port, proc = start_redis(tmp, "standalone")
        return f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}/0"\n', [port], port, [proc]
    if kind.startswith("sentinel"):
        master, mp = start_redis(tmp, f"{kind}-master")
        replica, rp = start_redis(tmp, f"{kind}-replica", "--replicaof", "127.0.0.1", str(master))
        wait_for("replica in sync", lambda: "master_link_status:up" in cli(replica, "INFO", "replication"))
        sport = free_port()
        conf = os.path.join(tmp, f"{kind}-sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {sport}\nbind 127.0.0.1\ndir {tmp}\n"
                    f"sentinel monitor sessions 127.0.0.1 {master} 1\n"
                    f"sentinel down-after-milliseconds sessions 5000\n")
        sp = subprocess.Popen(["redis-sentinel", conf], stdout=subprocess.DEVNULL)
        wait_port(sport, sp)
        wait_for("sentinel knows the master",
                 lambda: str(master) in cli(sport, "SENTINEL", "get-master-addr-by-name", "sessions"))
        wait = "wait_replicas = 1\n" if kind.endswith("wait") else ""
        toml = (f'[store]\nbackend = "redis"\nsentinels = ["redis://127.0.0.1:{sport}"]\n'
                f'master_name = "sessions"\n{wait}')
        return toml, [master], master, [sp, rp, mp]
    if kind == "cluster":
        nodes = [start_redis(tmp, f"cluster-{i}", "--cluster-enabled", "yes", "--cluster-config-file",
                             os.path.join(tmp, f"cluster-{i}", "nodes.conf")) for i in range(3)]
        ports = [p for p, _ in nodes]
        sh("redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
           "--cluster-yes", stdout=subprocess.DEVNULL)
        wait_for("cluster ok", lambda: all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in ports))
        urls = ", ".join(f'"redis://127.0.0.1:{p}"' for p in ports)
        return f'[store]\nbackend = "redis"\ncluster_nodes = [{urls}]\n', ports, None, [p for _, p in nodes]
    raise ValueError(kind)


def start_lua_redis(stack, redis_port):
    """The Lua+Redis peer (bench/lua_redis_sessions.conf) on the stack's upstream and this Redis."""
    if not (os.path.exists(LUA_MODULE) and os.path.exists(CJSON)):
        print("no nginx Lua module or lua-cjson: the Lua+Redis peer is left out", flush=True)
        return None, None
    port = free_port()
    with open(os.path.join(BENCH, "lua_redis_sessions.conf")) as f:
        text = (f.read().replace("@TMP@", stack.tmp).replace("@UPSTREAM@", str(stack.up_port))
                .replace("@LISTEN@", str(port)).replace("@REDIS@", str(redis_port)))
    conf = os.path.join(stack.tmp, "lua-redis-nginx.conf")
    with open(conf, "w") as f:
        f.write(text)
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", "/usr/share/nginx"], stderr=subprocess.DEVNULL)
    wait_port(port, proc, timeout=10)
    return port, proc


# Where the Redis store is measured: (kind, label).
REDIS_TOPOLOGIES = [
    ("standalone", "one redis-server"),
    ("sentinel", "Sentinel: master + replica, 1 sentinel"),
    ("sentinel-wait", "Sentinel, wait_replicas = 1"),
    ("cluster", "Cluster: 3 masters"),
]


def redis_counter(tmp, args):
    """The visit counter with the sidecar on Redis of each topology (all on this machine), against
    nginx proxy_pass and the Lua+Redis peer on the same Redis, interleaved per round."""
    missing = [c for c in ("redis-server", "redis-sentinel") if not shutil.which(c)]
    if missing:
        sh("apt-get", "install", "-y", "-qq", *missing, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    out = []
    for kind, label in REDIS_TOPOLOGIES:
        sub = tempfile.mkdtemp(prefix=f"redis-{kind}-", dir=tmp)
        toml, ports, single, procs = redis_topology(sub, kind)
        stack = Stack(sub, redis_store=toml)
        peer_port = peer = None
        try:
            if single:
                peer_port, peer = start_lua_redis(stack, single)
            contenders = [("nginx", stack.ng_port), ("sidecar", stack.sc_port)]
            cookie_files = {}
            for who, port in (("sidecar", stack.sc_port), ("lua+redis peer", peer_port)):
                if port:
                    cookie_files[who] = os.path.join(sub, f"cookies-{who.replace(' ', '-')}.txt")
                    with open(cookie_files[who], "w") as f:
                        f.write("\n".join(make_sessions(port, args.sessions)) + "\n")
            if peer_port:
                contenders.append(("lua+redis peer", peer_port))
            rounds = {who: [] for who, _ in contenders}
            for r in range(args.rounds):
                for who, port in contenders:
                    before = redis_calls(ports)
                    res = wrk(port, "/count", args.seconds, cookie_files.get(who, cookie_files["sidecar"]))
                    res["redis_calls_per_req"] = (redis_calls(ports) - before) / max(res["requests"], 1)
                    rounds[who].append(res)
                    print(f"redis {kind:14} round {r + 1} {who:15} {res['rps']:>8.0f} req/s  p99 {res['p99_ms']:.3f} ms"
                          f"  {res['redis_calls_per_req']:.2f} round trips/req  non-2xx {res['non2xx']}", flush=True)
            med = {w: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for w, rs in rounds.items()}
            before = redis_calls(ports)
            read = wrk(stack.sc_port, "/read", max(2, args.seconds // 2), cookie_files["sidecar"])
            read_calls = (redis_calls(ports) - before) / max(read["requests"], 1)
            res = {"kind": kind, "label": label, "median": med,
                   "nginx_rps": med["nginx"]["rps"], "sidecar_rps": med["sidecar"]["rps"],
                   "ratio": med["sidecar"]["rps"] / med["nginx"]["rps"], "p99_ms": med["sidecar"]["p99_ms"],
                   "calls_per_write": med["sidecar"]["redis_calls_per_req"], "calls_per_read": read_calls,
                   "read_rps": read["rps"], "non2xx": sum(x["non2xx"] for x in rounds["sidecar"]),
                   "lost": stack.stats()["lost"]}
            if "lua+redis peer" in med:
                res["peer_rps"] = med["lua+redis peer"]["rps"]
                res["peer_ratio"] = res["peer_rps"] / res["nginx_rps"]
                res["peer_calls_per_write"] = med["lua+redis peer"]["redis_calls_per_req"]
            print(f"redis {kind}: sidecar {res['ratio']:.2f}x nginx"
                  + (f", Lua+Redis peer {res['peer_ratio']:.2f}x" if "peer_ratio" in res else "")
                  + f"; round trips {res['calls_per_write']:.2f} per counter request, {read_calls:.2f} per read-only;"
                  f" lost {res['lost']}", flush=True)
            out.append(res)
        finally:
            stack.stop()
            for p in ([peer] if peer else []) + procs:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return out


def redis_table(runs):
    lines = ["| Redis | nginx req/s | sidecar req/s | sidecar / nginx | Lua+Redis peer req/s (/ nginx) "
             "| sidecar p99 ms | round trips: counter / read-only (peer: counter) | lost |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        peer = (f"{r['peer_rps']:.0f} ({r['peer_ratio']:.2f}x)" if "peer_rps" in r else "- (single server only)")
        peer_calls = f" ({r['peer_calls_per_write']:.2f})" if "peer_calls_per_write" in r else ""
        lines.append(f"| {r['label']} | {r['nginx_rps']:.0f} | {r['sidecar_rps']:.0f} | {r['ratio']:.2f} | {peer} | "
                     f"{r['p99_ms']:.3f} | {r['calls_per_write']:.2f} / {r['calls_per_read']:.2f}{peer_calls} | "
                     f"{r['lost']} |")
    return lines


def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, {os.uname().sysname} {os.uname().release}"


def write_outputs(results, smoke):
    suffix = "-smoke" if smoke else ""
    with open(os.path.join(BENCH, f"results{suffix}.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| scenario | upstream direct | nginx req/s | sidecar req/s | sidecar / nginx (target) | other contenders "
             f"| sidecar p50 / p99 ms | nginx p50 / p99 ms | p99 at {FIXED_RATE:,} req/s: sidecar / nginx ms "
             f"(target ≤ nginx + {FIXED_P99_SLACK_MS}) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in results["scenarios"]:
        med = s.get("median", {"nginx": s["nginx"], "sidecar": s["sidecar"]})
        n, c = med["nginx"], med["sidecar"]
        up = med.get("upstream", {}).get("rps")
        others = ", ".join(f"{w} {med[w]['rps']:.0f} req/s = {r:.2f}x"
                           for w, r in s.get("ratios", {}).items() if w not in ("sidecar", "nginx", "upstream"))
        target = f"≥ {s['target']}" if s["target"] is not None else "no peer"
        met = "" if s["target"] is None else (" met" if s["ratio"] >= s["target"] else " NOT met")
        fr = s.get("fixed_rate")
        if fr:
            ok = fr["sidecar"]["p99_ms"] <= fr["nginx"]["p99_ms"] + FIXED_P99_SLACK_MS
            fixed = (f"{fr['sidecar']['p99_ms']:.3f} / {fr['nginx']['p99_ms']:.3f} "
                     f"({fr['sidecar']['p99_ms'] - fr['nginx']['p99_ms']:+.3f}: {'met' if ok else 'NOT met'})")
        else:
            fixed = "-"
        lines.append(f"| {s['name']} | {f'{up:.0f}' if up else '-'} | {n['rps']:.0f} | {c['rps']:.0f} | "
                     f"{s['ratio']:.2f} ({target}{met}) | {others or '-'} | "
                     f"{c['p50_ms']:.3f} / {c['p99_ms']:.3f} | {n['p50_ms']:.3f} / {n['p99_ms']:.3f} | {fixed} |")
    stolen = [m["steal_pct"] for sc in results["scenarios"]
              for m in sc.get("median", {}).values() if "steal_pct" in m]
    if stolen:
        lines += ["", f"CPU time the hypervisor took from this machine during the closed-loop runs (steal, the "
                  f"median of each contender's rounds): {statistics.median(stolen):.1f} % typical, "
                  f"{max(stolen):.1f} % at most; figures measured under heavy steal swing with it."]
    lines += ["", "CPU time per request (µs, all of each contender's processes and threads, median of the rounds; "
              "in brackets user + system, then the threads' context switches per request):",
              "", "| scenario | sidecar | nginx proxy_pass | in-memory Lua peer |", "|---|---|---|---|"]

    def cpu_cell(m):
        if not m:
            return "-"
        if "cpu_user_us_per_req" not in m:
            return f"{m['cpu_us_per_req']:.1f}"
        return (f"{m['cpu_us_per_req']:.1f} ({m['cpu_user_us_per_req']:.1f} + {m['cpu_sys_us_per_req']:.1f}; "
                f"{m['switches_per_req']:.2f} cs)")
    for s in results["scenarios"]:
        med = s.get("median", {"nginx": s["nginx"], "sidecar": s["sidecar"]})
        lines.append(f"| {s['name']} | {cpu_cell(med['sidecar'])} | {cpu_cell(med['nginx'])} "
                     f"| {cpu_cell(med.get('lua peer'))} |")
    if "fixed_rate" in results:
        fr = results["fixed_rate"]
        lines.append("")
        lines.append(f"Fixed rate 10,000 req/s on `/read` (oha, latency-corrected): sidecar p99 "
                     f"{fr['sidecar']['p99_ms']:.3f} ms, nginx p99 {fr['nginx']['p99_ms']:.3f} ms "
                     f"(difference {fr['sidecar']['p99_ms'] - fr['nginx']['p99_ms']:+.3f} ms; target ≤ +0.3 ms).")
    if "redis" in results:
        lines.append("")
        lines.append("Visit counter on the Redis store (every server on this machine, no persistence):")
        lines.append("")
        lines += redis_table(results["redis"])
    if "big" in results:
        b = results["big"]
        lines.append("")
        lines.append(f"Store of {b['sessions']:,} sessions: start-up to first request {b['startup_s']:.2f} s "
                     f"(target ≤ 2 s), RSS {b['rss_mib']:.0f} MiB (target ≤ 128; 1k-session store: "
                     f"{b.get('small_rss_mib', 0):.0f} MiB), visit counter {b['counter_rps']:.0f} req/s = "
                     f"{b.get('counter_vs_small', 0):.2f} of the 1k store's {b.get('small_counter_rps', 0):.0f} "
                     f"(target ≥ 0.90).")
        if "disk_bytes_per_session" in b:
            lines.append(f"Per session: {b['disk_bytes_per_session']:.0f} bytes on disk, "
                         f"{b['rss_bytes_per_session']:.0f} bytes of RSS beyond the 1k store's. On paper: "
                         + "; ".join(f"{n // 1_000_000}M sessions ≈ {b[f'estimate_{n}']['disk_gib']:.1f} GiB on disk, "
                                     f"RSS ≈ {b[f'estimate_{n}']['rss_mib']:.0f} MiB"
                                     for n in (10_000_000, 100_000_000)) + ".")
    lines.append("")
    lines.append(f"Machine: {results['machine']}. Command: `{results['command']}`.")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(BENCH, f"results{suffix}.md"), "w") as f:
        f.write(text)
    print(text)
    data = os.path.join(tempfile.mkdtemp(), "data.txt")
    with open(data, "w") as f:
        for i, s in enumerate(results["scenarios"]):
            lua = s.get("median", {}).get("lua peer", {}).get("rps")
            short = s["name"].replace(" (skip_paths)", "").replace("session read, no write", "read").replace(
                "visit counter (read + durable write)", "counter").replace(
                "visit counter, durable = false", "counter, not durable").replace(", secret_key", " +key")
            f.write(f"{i} \"{short}\" {s['nginx']['rps']:.0f} {s['sidecar']['rps']:.0f} {s['ratio']:.2f} "
                    f"{f'{lua:.0f}' if lua else 'NaN'}\n")
    png = os.path.join(BENCH, f"chart{suffix}.png")
    script = f"""
set terminal pngcairo size 1400,520 font ",10" noenhanced
set output "{png}"
set title "Requests per second, wrk -t1 -c32 (median of rounds; higher is better)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key outside top center horizontal
set datafile missing "NaN"
plot "{data}" using 3:xtic(2) title "nginx proxy_pass", "" using 4 title "session-sidecar", \
     "" using 6 title "nginx + Lua sessions in shared memory (not persistent)", \
     "" using ($1):($4 + 1500):(sprintf("%.2fx", $5)) with labels notitle
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    sys.exit(main())
