#!/usr/bin/env python3
"""A legacy app with no session framework, using session-sidecar through headers only.

It reads the visitor's session from the X-Session request header (a JSON object) and answers
changes in response headers. It never sees or sets a cookie. Standard library only.

    python3 examples/legacy_app.py [PORT [HOST]]   # default 8000 on 127.0.0.1; the sidecar goes in front

Pages (the examples of the Django session tutorials):
    /                  visit counter: "You have visited this page N times"
    /cart              a shopping cart; /cart/add?item=book, /cart/clear
    /login?user=ann    login: X-Session-Cycle (new key) + X-Session-Subject
    /logout            logout: X-Session-Flush, then a fresh session holding a flash message
    /test-cookie       Django's set_test_cookie()/test_cookie_worked() via X-Session-Status
    /slow?seconds=2    a slow page that saves {"slow": N} when it answers (drain tests)
"""
import html
import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class App(BaseHTTPRequestHandler):
    server_version = "LegacyApp/1.0"

    def session(self):
        return json.loads(self.headers.get("X-Session", "{}"))

    def page(self, title, body, changes=(), status=200):
        session = self.session()
        flash = session.get("flash")
        user = session.get("user")
        nav = ('<p><a href="/">home</a> | <a href="/cart">cart</a> | '
               '<a href="/test-cookie">test cookie</a> | ')
        nav += (f'logged in as <b>{html.escape(user)}</b> <a href="/logout">logout</a></p>' if user
                else '<a href="/login?user=ann">login as ann</a></p>')
        text = (f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
                + nav + (f"<p><i>{html.escape(flash)}</i></p>" if flash else "") + body)
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Served-By", socket.gethostname())
        changes = list(changes)
        if flash:  # a flash message is shown once
            changes.append(("X-Session-Delete", json.dumps(["flash"])))
        for name, value in changes:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        session = self.session()
        status = self.headers.get("X-Session-Status", "new")
        if url.path == "/":
            visits = session.get("num_visits", 0) + 1
            self.page("Home", f"<p>You have visited this page {visits} time{'s' if visits != 1 else ''}.</p>"
                              f"<p>Session: {status}, expires in {self.headers.get('X-Session-Expiry-Age')} s.</p>",
                      [("X-Session-Set", json.dumps({"num_visits": visits}))])
        elif url.path == "/cart":
            items = session.get("cart", [])
            rows = "".join(f"<li>{html.escape(i)}</li>" for i in items) or "<li>(empty)</li>"
            self.page("Cart", f"<ul>{rows}</ul><p><a href='/cart/add?item=book'>add a book</a> | "
                              f"<a href='/cart/add?item=pen'>add a pen</a> | <a href='/cart/clear'>clear</a></p>")
        elif url.path == "/cart/add":
            items = session.get("cart", []) + [query.get("item", "thing")]
            self.redirect("/cart", [("X-Session-Set", json.dumps({"cart": items}))])
        elif url.path == "/cart/clear":
            self.redirect("/cart", [("X-Session-Delete", json.dumps(["cart"]))])
        elif url.path == "/login":
            user = query.get("user", "ann")
            # A new key at login defeats session fixation; the subject lets an operator revoke it.
            self.redirect("/", [("X-Session-Cycle", "1"),
                                ("X-Session-Set", json.dumps({"user": user, "flash": f"Welcome, {user}!"})),
                                ("X-Session-Subject", user)])
        elif url.path == "/logout":
            self.redirect("/", [("X-Session-Flush", "1"),
                                ("X-Session-Set", json.dumps({"flash": "You are logged out."}))])
        elif url.path == "/test-cookie":
            # Django's pattern: set a test value, check on the next request that it came back.
            if status == "existing":
                self.page("Test cookie", "<p>Your browser accepts cookies.</p>")
            elif "check" in query:
                self.page("Test cookie", "<p>Your browser does not accept cookies: please enable them "
                                         "to log in.</p>")
            else:
                self.page("Test cookie", "<p>Test cookie set; <a href='/test-cookie?check=1'>check</a> "
                                         "that it came back.</p>",
                          [("X-Session-Set", json.dumps({"testcookie": "worked"}))])
        elif url.path == "/slow":
            seconds = float(query.get("seconds", "2"))
            time.sleep(seconds)
            slow = session.get("slow", 0) + 1
            self.page("Slow", f"<p>Answered after {seconds:g} s; slow pages so far: {slow}.</p>",
                      [("X-Session-Set", json.dumps({"slow": slow}))])
        else:
            self.page("Not found", "<p>No such page.</p>", status=404)

    def redirect(self, to, changes):
        self.send_response(303)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        for name, value in changes:
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, fmt, *args):
        sys.stderr.write("legacy-app: " + fmt % args + "\n")


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"  # 0.0.0.0 in a container
    print(f"legacy app on http://{host}:{port} (reach it through the sidecar)", file=sys.stderr)
    ThreadingHTTPServer((host, port), App).serve_forever()
