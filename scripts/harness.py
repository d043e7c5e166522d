"""Shared parts of the crash and soak scripts: a small upstream app that keeps counters and carts
in the session through headers, and a sidecar process started on 127.0.0.1 with its own store.

Standard library only. Everything listens on 127.0.0.1 and stops with the script.
"""
import http.client
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App(BaseHTTPRequestHandler):
    """/incr?k=KEY   X-Session-Set {KEY: old + 1}, body: the new value
    /read?k=KEY      body: the value, no change
    /cart/add?item=  X-Session-Set {"cart": [..., item]}
    /cart/clear      X-Session-Delete ["cart"]
    /login?user=     X-Session-Cycle + X-Session-Set {"user": ...} + X-Session-Subject
    /logout          X-Session-Flush"""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        session = json.loads(self.headers.get("X-Session", "{}"))
        status = self.headers.get("X-Session-Status", "new")
        changes = []
        key = q.get("k", "n")
        if url.path == "/incr":
            value = session.get(key, 0) + 1
            changes.append(("X-Session-Set", json.dumps({key: value})))
            body = str(value)
        elif url.path == "/read":
            body = f"{status} {session.get(key, 0)}"
        elif url.path == "/cart/add":
            cart = session.get("cart", []) + [q.get("item", "x")]
            changes.append(("X-Session-Set", json.dumps({"cart": cart})))
            body = str(len(cart))
        elif url.path == "/cart/clear":
            changes.append(("X-Session-Delete", json.dumps(["cart"])))
            body = "0"
        elif url.path == "/login":
            user = q.get("user", "u")
            changes += [("X-Session-Cycle", "1"), ("X-Session-Set", json.dumps({"user": user})),
                        ("X-Session-Subject", user)]
            body = "ok"
        elif url.path == "/logout":
            changes.append(("X-Session-Flush", "1"))
            body = "bye"
        else:
            body = "hello"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        for name, value in changes:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # connections cut by a killed sidecar are expected here


def start_app():
    server = QuietServer(("127.0.0.1", 0), App)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def binary(path=None):
    if path:
        return path
    subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "session-sidecar")


class Sidecar:
    """One sidecar process; restartable on the same port and store."""

    def __init__(self, bin_path, app_port, extra=""):
        self.bin = bin_path
        self.dir = tempfile.mkdtemp(prefix="sidecar-")
        self.port = free_port()
        self.config = os.path.join(self.dir, "sidecar.toml")
        with open(self.config, "w") as f:
            f.write(f'listen = "127.0.0.1:{self.port}"\nupstream = "http://127.0.0.1:{app_port}"\n{extra}\n'
                    f'[store]\npath = "{self.dir}/sessions"\n[admin]\nlisten = ""\n')
        self.proc = None
        self.log = open(os.path.join(self.dir, "sidecar.log"), "ab")

    def start(self):
        self.proc = subprocess.Popen([self.bin, "--config", self.config], stdout=self.log, stderr=self.log,
                                     env={**os.environ, "RUST_LOG": "warn"})
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}; log in {self.dir}/sidecar.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("sidecar did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


class Client:
    """One visitor: a cookie of its own and a keep-alive connection."""

    def __init__(self, port):
        self.port = port
        self.cookie = None
        self.conn = None

    def get(self, path):
        """Returns (status, body). Raises ConnectionRefusedError when the request certainly never
        reached the sidecar, and other OSError/HTTPException when its outcome is unknown."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.connect()  # a refusal here means the request was never sent
        headers = {"Cookie": f"sessionid={self.cookie}"} if self.cookie else {}
        try:
            self.conn.request("GET", path, headers=headers)
            resp = self.conn.getresponse()
            body = resp.read().decode()
        except Exception:
            self.conn.close()
            self.conn = None
            raise
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie" and value.startswith("sessionid="):
                v = value.split(";", 1)[0].split("=", 1)[1]
                self.cookie = v or None
                if "Max-Age=0" in value:
                    self.cookie = None
        return resp.status, body

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None
