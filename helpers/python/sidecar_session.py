"""The session that session-sidecar gives a WSGI app through HTTP headers.

One file, standard library only (Python 3.7+): copy it next to your app. The header contract is
docs/HEADERS.md of session-sidecar; the signature check is docs/SIGNING.md's.

    from sidecar_session import SidecarSession

    KEY = os.environ.get("SIDECAR_SIGNING_KEY")  # the sidecar's [security] upstream_signing_key

    def application(environ, start_response):
        s = SidecarSession(environ, key=KEY)
        if not s.trusted:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"forged session headers refused\\n"]
        visits = s.get("visits", 0) + 1
        s.incr("visits")
        body = ("You have visited this page %d times.\\n" % visits).encode()
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Content-Length", str(len(body)))] + s.headers())
        return [body]

WSGI traps this file handles for you:

- Request headers arrive in the environ as HTTP_* keys: upper case, "-" turned into "_". So
  "X-Session", "x-session" and "X_Session" all land in HTTP_X_SESSION (Debian's gunicorn 20.1
  keeps underscore names and, for a name sent twice, joins the values with ","; waitress drops
  names that contain "_"). The sidecar removes every client spelling of its headers; the
  signature (key=...) is what protects an app that can be reached without the sidecar.
- start_response wants a list of (str, str) tuples of native strings that encode as latin-1;
  gunicorn raises TypeError on bytes and refuses CR/LF. headers() returns exactly that, and its
  values are visible ASCII only (JSON with every non-ASCII character written \\uXXXX).
- The headers must go into the one start_response call: once it is made, a change would be
  lost silently. So after headers() every change method raises RuntimeError.
- Servers do not all keep the order of response headers: waitress sorts them by name, so
  X-Session-Incr would reach the sidecar before X-Session-Set. The order matters only when two
  data headers name the same key, and this helper never emits that: an incr or append that
  follows a set or delete of the same key in one request is folded into one X-Session-Set
  (its result is known then). So the answer means the same in any header order.
"""

import datetime
import hashlib
import hmac
import html
import json
import time

__all__ = ["SidecarSession"]

# The names the sidecar sends (lower case, as in the signature's h= list).
_DATA = "x-session"
_STATUS = "x-session-status"
_EXPIRY_AGE = "x-session-expiry-age"
_SUBJECT = "x-session-subject"
_CSRF = "x-session-csrf"
_ID = "x-session-id"
_SIGNATURE = "x-session-signature"


def _environ_getter(environ):
    def get(name):
        return environ.get("HTTP_" + name.upper().replace("-", "_"))

    return get


def session_signature_ok(get, key, window=60):
    """docs/SIGNING.md's check, unchanged: true when the sidecar signed these headers.

    `get` reads a request header by lower-case name (None when absent); `key` is bytes."""
    sig = get("x-session-signature") or ""
    parts = [p.strip() for p in sig.split(";")]
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    if parts[0] != "v1" or not {"t", "h", "s"} <= fields.keys() or not fields["t"].isdigit():
        return False
    if abs(time.time() - int(fields["t"])) > window:
        return False
    msg = "v1\n" + fields["t"] + "\n"
    for name in fields["h"].split(" "):
        value = get(name)
        if value is None:
            return False
        msg += name + ":" + value + "\n"
    mac = hmac.new(key, msg.encode("latin-1"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["s"])


def _dumps(value):
    # Compact, ASCII-only (ensure_ascii escapes everything outside space..~, DEL included, as
    # \\uXXXX), and no NaN/Infinity, which are not JSON: the sidecar would answer 502.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _is_int(value):
    # bool is a subclass of int in Python: True must not count as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_key(key):
    if not isinstance(key, str):
        raise TypeError("session keys are strings, not %r" % (key,))


class SidecarSession:
    """The visitor's session as the sidecar sent it, and the changes to answer with.

    `request` is a WSGI environ, or any callable that reads a request header by name and returns
    None when it is absent (Flask: `request.headers.get`). With `key` (the sidecar's
    upstream_signing_key, str or bytes) the X-Session-Signature is checked; a request that fails
    the check has `trusted` False and is shown as an empty new session with no subject, so that
    data a client forged is never read. Without a key, `trusted` is True and nothing is checked.
    """

    def __init__(self, request, key=None, window=60):
        get = request if callable(request) else _environ_getter(request)
        self.trusted = True
        signed = None
        if key is not None:
            if isinstance(key, str):
                key = key.encode("utf-8")
            if not key:
                # An empty key is a configuration mistake, and anyone can sign with it.
                raise ValueError("the signing key is empty: pass None to check nothing")
            self.trusted = session_signature_ok(get, key, window)
            if self.trusted:
                # SIGNING.md step 5: trust only the headers the signature names.
                fields = dict(p.strip().split("=", 1) for p in get(_SIGNATURE).split(";")[1:]
                              if "=" in p)
                signed = set(fields["h"].split(" "))

        def read(name):
            if not self.trusted or (signed is not None and name not in signed):
                return None
            return get(name)

        raw = read(_DATA)
        # Python's json keeps integers of any size exactly and 1.0 a float; "1.10" comes back
        # as 1.1 and "1E3" as 1000.0 (same value, other spelling) if the app writes them back.
        data = json.loads(raw) if raw else {}
        if not isinstance(data, dict):
            raise ValueError("X-Session is not a JSON object")
        self.data = data
        self.status = "existing" if read(_STATUS) == "existing" else "new"
        age = read(_EXPIRY_AGE)
        self.expiry_age = int(age) if age is not None and age.strip().isdigit() else None
        self.subject = read(_SUBJECT) or None
        self.csrf_token = read(_CSRF) or None
        self.id = read(_ID) or None

        self._set = {}  # key -> value, as one X-Session-Set
        self._delete = []  # keys, as one X-Session-Delete
        self._incr = {}  # key -> sum of the increments
        self._append = {}  # key -> items in call order
        self._flush = False
        self._cycle = False
        self._subject = None  # None: unchanged; "" removes the tag
        self._expiry = None
        self._revoke = None  # "others" or "all"
        self._emitted = False

    # -- reading --

    @property
    def is_new(self):
        return self.status == "new"

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __contains__(self, key):
        return key in self.data

    def csrf_field(self):
        """The hidden form field the sidecar checks on POST; "" when there is no token."""
        if not self.csrf_token:
            return ""
        return ('<input type="hidden" name="csrfmiddlewaretoken" value="%s">'
                % html.escape(self.csrf_token, quote=True))

    # -- changing --

    def _changing(self):
        if self._emitted:
            raise RuntimeError("the session changed after headers() was called: "
                               "start_response has its headers already")

    def _drop_pending(self, key):
        self._set.pop(key, None)
        if key in self._delete:
            self._delete.remove(key)
        self._incr.pop(key, None)
        self._append.pop(key, None)

    def set(self, key, value):
        self._changing()
        _check_key(key)
        text = _dumps(value)  # fails here, at the call, on what JSON cannot carry
        self._drop_pending(key)
        self._set[key] = json.loads(text)
        self.data[key] = json.loads(text)

    def delete(self, key):
        self._changing()
        _check_key(key)
        self._drop_pending(key)
        self._delete.append(key)
        self.data.pop(key, None)

    def incr(self, key, n=1):
        """Adds the integer n to the integer at key (a missing key counts as 0), atomically in
        the store: concurrent requests all count. Floats (1.0 included) and bools are refused,
        as the sidecar refuses them."""
        self._changing()
        _check_key(key)
        if not _is_int(n):
            raise TypeError("incr() takes an integer, not %r" % (n,))
        current = self.data.get(key, 0)
        if not _is_int(current):
            raise TypeError("incr(%r): the session holds %r, not an integer" % (key, current))
        self.data[key] = current + n
        if key in self._set or key in self._delete:
            # After a set or a delete in this request the result is known: one Set says it.
            self._drop_pending(key)
            self._set[key] = current + n
        else:
            self._incr[key] = self._incr.get(key, 0) + n

    def append(self, key, item):
        """Appends item to the list at key (a missing key starts an empty list), atomically in
        the store: two tabs adding to one cart both keep their item."""
        self._changing()
        _check_key(key)
        text = _dumps(item)
        current = self.data.get(key, [])
        if not isinstance(current, list):
            raise TypeError("append(%r): the session holds %r, not a list" % (key, current))
        self.data[key] = current + [json.loads(text)]
        if key in self._set or key in self._delete:
            self._drop_pending(key)
            self._set[key] = current + [json.loads(text)]
        else:
            self._append.setdefault(key, []).append(json.loads(text))

    def flush(self):
        """Logout: the session and its cookie go; data changed after this starts a fresh one."""
        self._changing()
        self._set, self._delete, self._incr, self._append = {}, [], {}, {}
        self._expiry = None  # as in Django, the expiry was the old session's
        self.data = {}
        self.subject = None
        if self._revoke is not None:
            # Ending the other sessions and then this one is ending them all: Revoke: all ends
            # this session too, and what follows goes into a fresh one. (A Flush beside it would
            # make the sidecar revoke with the fresh session's subject.)
            # (A subject set earlier in this request names whose sessions end; the fresh session
            # stays untagged.)
            self._revoke = "all"
        else:
            self._subject = None  # the tag goes with the session
            self._flush = True

    def cycle(self):
        """Login: the same data under a new key (session fixation)."""
        self._changing()
        self._cycle = True

    def set_subject(self, subject):
        """Tags the session (e.g. with the user id at login); "" removes the tag."""
        self._changing()
        if not isinstance(subject, str) or len(subject) > 200 or \
                any(not "!" <= c <= "~" for c in subject):
            raise ValueError("a subject is 1 to 200 visible ASCII characters, or \"\"")
        if self._revoke is not None:
            # The sidecar revokes with the subject the session has at the end of the answer.
            raise RuntimeError("set_subject() after revoke_others()/revoke_all(): "
                               "tag the session first")
        self._subject = subject
        self.subject = subject or None

    def set_expiry(self, when):
        """Django's set_expiry: seconds of inactivity (int > 0), 0 (until the browser closes),
        an aware datetime (at that instant) or "default" (the configured policy)."""
        self._changing()
        if when == "default":
            value = "default"
        elif _is_int(when) and when >= 0:
            value = str(when)
        elif isinstance(when, datetime.datetime) and when.utcoffset() is not None:
            value = when.isoformat()
        else:
            raise ValueError("set_expiry() takes an int >= 0, an aware datetime or \"default\"")
        self._expiry = value

    def revoke_others(self):
        """Ends every other session of this session's subject (after a password change)."""
        self._changing()
        if self._revoke is None:
            self._revoke = "others"

    def revoke_all(self):
        """Ends every session of this session's subject, this one too; data changed after this
        starts a fresh, untagged session."""
        self._changing()
        # X-Session-Subject beside X-Session-Revoke: all names whose sessions end (a subject set
        # earlier in this request) and tags nothing: the fresh session is untagged.
        after_flush = self._flush and not self._subject
        self._set, self._delete, self._incr, self._append = {}, [], {}, {}
        self._expiry = None
        self.data = {}
        self.subject = None
        if not after_flush:  # after a flush there is no subject to end: a second flush
            self._revoke = "all"

    # -- answering --

    def headers(self):
        """The response headers to add, as start_response wants them: a list of (str, str).

        The order is the one the sidecar applies (Set, Delete, Incr, Append, then Flush, Cycle,
        Subject, Expiry, Revoke), which gives the result of the calls in program order. After
        this, changing the session raises RuntimeError."""
        self._emitted = True
        out = []
        if self._set:
            out.append(("X-Session-Set", _dumps(self._set)))
        if self._delete:
            out.append(("X-Session-Delete", _dumps(self._delete)))
        if self._incr:
            out.append(("X-Session-Incr", _dumps(self._incr)))
        if self._append:
            out.append(("X-Session-Append", _dumps(self._append)))
        if self._flush:
            out.append(("X-Session-Flush", "1"))
        if self._cycle:
            out.append(("X-Session-Cycle", "1"))
        if self._subject is not None:
            out.append(("X-Session-Subject", self._subject))
        if self._expiry is not None:
            out.append(("X-Session-Expiry", self._expiry))
        if self._revoke is not None:
            out.append(("X-Session-Revoke", self._revoke))
        return out
