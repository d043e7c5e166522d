#!/usr/bin/env python3
"""Soak: mixed traffic for a while, then check that no update was lost and memory stayed flat.

    python3 scripts/soak.py --seconds 300     # the long form
    python3 scripts/soak.py --seconds 30      # the form CI runs

Traffic, all at once: new visitors who store nothing; counters advanced one request at a time;
carts; login (cycle) / work / logout (flush) loops; and sessions shared by several threads that
each advance their own key concurrently (the per-key merge). Every response is checked as it
comes, and every counter and cart against the acknowledged count at the end. Sidecar RSS is
sampled after a warm-up and at the end.
"""
import argparse
import sys
import threading
import time

import harness


class Failures:
    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def add(self, text):
        with self.lock:
            if len(self.items) < 20:
                print("FAIL:", text, file=sys.stderr)
            self.items.append(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--bin", default=None)
    args = ap.parse_args()

    app, app_port = harness.start_app()
    sidecar = harness.Sidecar(harness.binary(args.bin), app_port)
    sidecar.start()
    port = sidecar.port
    stop = threading.Event()
    fails = Failures()
    counts = {"requests": 0}
    count_lock = threading.Lock()

    def tick(n=1):
        with count_lock:
            counts["requests"] += n

    def new_visitors():
        while not stop.is_set():
            c = harness.Client(port)
            status, body = c.get("/read")
            if status != 200 or body != "new 0" or c.cookie:
                fails.add(f"new visitor: {status} {body} cookie={c.cookie}")
            c.close()
            tick()

    counters = []

    def counter():
        c = harness.Client(port)
        acked = 0
        while not stop.is_set():
            status, body = c.get("/incr")
            tick()
            if status != 200 or int(body) != acked + 1:
                fails.add(f"counter: {status} {body} after {acked}")
                return
            acked += 1
        counters.append((c, "n", acked))

    def cart():
        c = harness.Client(port)
        items = 0
        while not stop.is_set():
            status, body = c.get(f"/cart/add?item=i{items}")
            tick()
            if status != 200 or int(body) != items + 1:
                fails.add(f"cart: {status} {body} after {items}")
                return
            items += 1
            if items == 100:  # a checkout: the cart stays well under max_session_bytes
                status, body = c.get("/cart/clear")
                tick()
                if status != 200 or c.cookie:
                    fails.add(f"cart clear: {status} {body} cookie={c.cookie}")
                    return
                items = 0

    def login_logout(n):
        c = harness.Client(port)
        while not stop.is_set():
            c.get("/incr?k=before")
            old = c.cookie
            c.get(f"/login?user=u{n}")
            if not c.cookie or c.cookie == old:
                fails.add("login did not cycle the key")
            c.get("/incr?k=work")
            status, body = c.get("/read?k=before")
            if body != "existing 1":
                fails.add(f"data lost across login: {body}")
            c.get("/logout")
            if c.cookie:
                fails.add("logout left a cookie")
            status, body = c.get("/read")
            if body != "new 0":
                fails.add(f"after logout: {body}")
            tick(6)

    shared = []

    def shared_session(owner, key):
        c = harness.Client(port)
        c.cookie = owner.cookie
        acked = 0
        while not stop.is_set():
            status, body = c.get(f"/incr?k={key}")
            tick()
            if status != 200:
                fails.add(f"shared {key}: {status} {body}")
                return
            acked += 1
        shared.append((owner, key, acked))

    owner = harness.Client(port)
    owner.get("/incr?k=owner")
    threads = [threading.Thread(target=new_visitors)]
    threads += [threading.Thread(target=counter) for _ in range(4)]
    threads += [threading.Thread(target=cart) for _ in range(2)]
    threads += [threading.Thread(target=login_logout, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=shared_session, args=(owner, f"k{j}")) for j in range(4)]
    for t in threads:
        t.daemon = True
        t.start()
    warmup = min(10.0, args.seconds / 5)
    time.sleep(warmup)
    rss_start = sidecar.rss_kib()
    time.sleep(max(0.0, args.seconds - warmup))
    rss_end = sidecar.rss_kib()
    stop.set()
    for t in threads:
        t.join(timeout=60)

    lost = 0
    # Fresh connections for the final reads: idle keep-alive connections may have been closed by
    # the sidecar's header_read_timeout meanwhile, as a server should.
    for c, _, _ in counters + shared:
        c.close()
    for c, key, acked in counters:
        status, body = c.get(f"/read?k={key}")
        if body != f"existing {acked}":
            lost += 1
            fails.add(f"counter: stored {body}, acknowledged {acked}")
    for o, key, acked in shared:
        status, body = o.get(f"/read?k={key}")
        if body != f"existing {acked}":
            lost += 1
            fails.add(f"shared session key {key}: stored {body}, acknowledged {acked}")
    sidecar.stop()
    app.shutdown()
    grown = (rss_end - rss_start) / 1024
    print(f"soak: {args.seconds:.0f} s, {counts['requests']} requests "
          f"({counts['requests'] / args.seconds:.0f}/s), lost updates = {lost}, failures = {len(fails.items)}, "
          f"sidecar RSS {rss_start / 1024:.1f} MiB after warm-up -> {rss_end / 1024:.1f} MiB at the end "
          f"({grown:+.1f} MiB)")
    if grown > 32:
        print("FAIL: RSS grew by more than 32 MiB", file=sys.stderr)
        return 1
    return 1 if fails.items or lost else 0


if __name__ == "__main__":
    sys.exit(main())
