#!/usr/bin/env python3
"""Crash safety: concurrent counters while the sidecar is killed with SIGKILL and restarted at
random moments. At the end every counter must hold every acknowledged increment.

    python3 scripts/crash_test.py                          # long form: 300 sessions, 12 cycles
    python3 scripts/crash_test.py --sessions 40 --cycles 3 # the short form CI runs

Each session is a counter advanced one request at a time. A response received is an
acknowledged increment. A request whose connection broke has an unknown outcome (the change may
have been made durable just before the kill): it may or may not count. A refused connection never
reached the sidecar. The check: for every session,
    acknowledged <= final counter <= acknowledged + unknown
and "lost" counts the sessions below the lower bound (must be 0).
"""
import argparse
import random
import sys
import threading
import time

import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=300)
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--bin", default=None, help="sidecar binary (default: cargo build --release)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    bin_path = harness.binary(args.bin)
    app, app_port = harness.start_app()
    sidecar = harness.Sidecar(bin_path, app_port)
    sidecar.start()

    clients = [harness.Client(sidecar.port) for _ in range(args.sessions)]
    for c in clients:  # create every session before the chaos, acknowledged
        status, body = c.get("/incr")
        assert status == 200 and body == "1" and c.cookie, (status, body)
    acked = [1] * args.sessions
    unknown = [0] * args.sessions
    refused = [0]
    requests = [args.sessions]
    lock = threading.Lock()
    free = list(range(args.sessions))
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            with lock:
                if not free:
                    continue
                i = free.pop(rng.randrange(len(free)))
            try:
                status, body = clients[i].get("/incr")
                if status == 200:
                    acked[i] += 1
                    assert int(body) >= acked[i], f"session {i}: counter {body} behind {acked[i]} acked"
                else:
                    raise RuntimeError(f"session {i}: unexpected status {status}: {body}")
            except ConnectionRefusedError:
                refused[0] += 1
                time.sleep(0.01)
            except (OSError, harness.http.client.HTTPException):
                unknown[i] += 1
            finally:
                with lock:
                    requests[0] += 1
                    free.append(i)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for cycle in range(args.cycles):
        time.sleep(rng.uniform(0.2, 1.2))
        sidecar.kill()
        time.sleep(rng.uniform(0.0, 0.2))
        sidecar.start()
        print(f"cycle {cycle + 1}/{args.cycles}: killed and restarted; {requests[0]} requests so far",
              flush=True)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    lost = phantom = maybe_applied = 0
    for i, c in enumerate(clients):
        c.close()
        status, body = c.get("/read")
        state, value = body.split()
        value = int(value)
        if state != "existing" or value < acked[i]:
            lost += 1
            print(f"LOST: session {i}: {state} {value}, acknowledged {acked[i]}", file=sys.stderr)
        elif value > acked[i] + unknown[i]:
            phantom += 1
            print(f"PHANTOM: session {i}: {value} > {acked[i]} + {unknown[i]}", file=sys.stderr)
        else:
            maybe_applied += value - acked[i]
    sidecar.stop()
    app.shutdown()
    print(f"crash test: {args.cycles} SIGKILL cycles, {args.sessions} sessions, {requests[0]} requests, "
          f"{sum(acked)} acknowledged increments, {sum(unknown)} with unknown outcome "
          f"({maybe_applied} of them applied), {refused[0]} refused during restarts, "
          f"lost updates = {lost}, phantom updates = {phantom}")
    return 1 if lost or phantom else 0


if __name__ == "__main__":
    sys.exit(main())
