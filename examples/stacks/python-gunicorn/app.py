"""The example pages as one WSGI callable (`application`), standard library only.

Run by gunicorn (run.sh) or by waitress (`waitress-serve --listen=127.0.0.1:8000 app:application`
with helpers/python importable). The session comes from session-sidecar in request headers and
goes back in response headers, through helpers/python/sidecar_session.py.
"""

import os
import sys
from urllib.parse import parse_qs

# The helper lives in helpers/python/ of this repository; an app of your own keeps its copy
# beside it and needs no path juggling.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "..", "helpers", "python"))
from sidecar_session import SidecarSession  # noqa: E402

# The sidecar's [security] upstream_signing_key; without it nothing is checked.
SIGNING_KEY = os.environ.get("SIDECAR_SIGNING_KEY") or None

TEXT = "text/plain; charset=utf-8"
MAX_FORM_BYTES = 1 << 20

FORM = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Comment</title></head><body>
<form method="post" action="/form">
{csrf}
<input type="text" name="comment">
<button type="submit">Send</button>
</form>
</body></html>
"""

READ = ("GET", "HEAD")  # HEAD runs the GET page; the server drops the body
ALLOWED = {"/password": ("POST",), "/form": ("GET", "HEAD", "POST")}
for _path in ("/", "/cart/add", "/cart", "/login", "/whoami", "/logout", "/logout-everywhere",
              "/test-cookie", "/expiry", "/status", "/big", "/big/size", "/sequence",
              "/sequence/check"):
    ALLOWED[_path] = READ


def read_body(environ):
    """The request body, read whole before answering (a WSGI server may not drain it)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return b""
    return environ["wsgi.input"].read(min(length, MAX_FORM_BYTES))


def pages(environ, s, body):
    """(status, content type, body text, extra headers) for one request; changes go to `s`."""
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "")
    if path not in ALLOWED:
        return "404 Not Found", TEXT, "not found\n", []
    if method not in ALLOWED[path]:
        return ("405 Method Not Allowed", TEXT, "method not allowed\n",
                [("Allow", ", ".join(ALLOWED[path]))])
    return page(environ, s, method, path, body) + ([],)


def page(environ, s, method, path, body):
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    get = method in READ

    if path == "/" and get:
        visits = s.get("visits", 0) + 1
        s.incr("visits")
        return "200 OK", TEXT, "You have visited this page %d time%s.\n" % (
            visits, "" if visits == 1 else "s")
    if path == "/cart/add" and get:
        item = query.get("item")
        if not item:
            return "400 Bad Request", TEXT, "item missing\n"
        s.append("cart", item)
        return "200 OK", TEXT, "added %s\n" % item
    if path == "/cart" and get:
        return "200 OK", TEXT, "cart: %s\n" % ",".join(str(i) for i in s.get("cart", []))
    if path == "/login" and get:
        user = query.get("user")
        if not user:
            return "400 Bad Request", TEXT, "user missing\n"
        s.cycle()
        s.set_subject(user)
        s.set("user", user)
        return "200 OK", TEXT, "logged in as %s\n" % user
    if path == "/whoami" and get:
        text = "user: %s\nsubject: %s\n" % (s.get("user", "anonymous"), s.subject or "none")
        if "flash" in s:
            text += "flash: %s\n" % s.get("flash")
            s.delete("flash")
        return "200 OK", TEXT, text
    if path == "/logout" and get:
        s.flush()
        s.set("flash", "You have been logged out.")
        return "200 OK", TEXT, "logged out\n"
    if path == "/password" and method == "POST":
        s.revoke_others()
        s.cycle()
        return "200 OK", TEXT, "password changed\n"
    if path == "/logout-everywhere" and get:
        s.revoke_all()
        s.set("flash", "You were logged out everywhere.")
        return "200 OK", TEXT, "logged out everywhere\n"
    if path == "/test-cookie" and get:
        if s.status == "existing" and "testcookie" in s:
            s.delete("testcookie")
            return "200 OK", TEXT, "cookies work\n"
        s.set("testcookie", "worked")
        return "200 OK", TEXT, "test cookie set\n"
    if path == "/form" and get:
        return "200 OK", "text/html; charset=utf-8", FORM.format(csrf=s.csrf_field())
    if path == "/form" and method == "POST":
        form = parse_qs(body.decode("utf-8", "replace"))
        comment = form.get("comment", [""])[0]
        s.set("comment", comment)
        return "200 OK", TEXT, "form accepted: %s\n" % comment
    if path == "/expiry" and get:
        seconds = query.get("seconds", "")
        if seconds == "default":
            s.set_expiry("default")
        elif seconds.isdigit():
            s.set_expiry(int(seconds))
        else:
            return "400 Bad Request", TEXT, "seconds: a number or default\n"
        s.set("expiry", seconds)
        return "200 OK", TEXT, "expiry: %s\n" % seconds
    if path == "/status" and get:
        age = "none" if s.expiry_age is None else str(s.expiry_age)
        return "200 OK", TEXT, "status: %s\nexpiry-age: %s\nkeys: %s\n" % (
            s.status, age, ",".join(sorted(s.data)))
    if path == "/big" and get:
        n = query.get("bytes", "")
        if not n.isdigit():
            return "400 Bad Request", TEXT, "bytes: a number\n"
        s.set("big", "x" * int(n))
        return "200 OK", TEXT, "stored %d\n" % int(n)
    if path == "/big/size" and get:
        return "200 OK", TEXT, "big: %d\n" % len(s.get("big", ""))
    if path == "/sequence" and get:
        # Calls on the same keys in one request: the result is the calls' in this order, on a
        # server that keeps header order and on one that sorts headers (waitress) alike.
        s.set("n", 10)
        s.incr("n", 5)
        s.delete("seq")
        s.append("seq", "a")
        s.append("seq", "b")
        s.set("gone", 1)
        s.delete("gone")
        return "200 OK", TEXT, "sequence done\n"
    if path == "/sequence/check" and get:
        gone = s.get("gone")
        return "200 OK", TEXT, "n: %s\nseq: %s\ngone: %s\n" % (
            s.get("n"), ",".join(s.get("seq", [])), "none" if gone is None else gone)
    raise AssertionError("no page for %s %s" % (method, path))


def application(environ, start_response):
    body = read_body(environ)
    s = SidecarSession(environ, key=SIGNING_KEY)
    if not s.trusted:
        status, ctype, text, extra = "403 Forbidden", TEXT, "forged session headers refused\n", []
    else:
        status, ctype, text, extra = pages(environ, s, body)
        extra += s.headers()
    data = text.encode("utf-8")
    # One start_response call with every header: native str names and values (latin-1 only;
    # the helper's values are ASCII).
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(data)))] + extra)
    return [data]
