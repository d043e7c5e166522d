"use strict";
// The session that session-sidecar gives a Node app through HTTP headers.
//
// One file, Node's standard library only (Node 18.3+): copy it next to your app. The header
// contract is docs/HEADERS.md of session-sidecar; the signature check is docs/SIGNING.md's.
//
//   const { SidecarSession } = require("./sidecar-session");
//   const KEY = process.env.SIDECAR_SIGNING_KEY; // the sidecar's [security] upstream_signing_key
//
//   http.createServer((req, res) => {
//     const s = new SidecarSession(req, { key: KEY });
//     if (!s.trusted) { res.writeHead(403); res.end("forged session headers refused\n"); return; }
//     const visits = s.get("visits", 0) + 1;
//     s.incr("visits");
//     s.applyTo(res); // before writeHead/end
//     res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8" });
//     res.end(`You have visited this page ${visits} times.\n`);
//   });
//
// Node traps this file handles for you:
//
// - Response headers can be set only until they are sent: res.setHeader after writeHead, write
//   or end throws ERR_HTTP_HEADERS_SENT (or, on some paths, the header is just lost). applyTo(res)
//   checks res.headersSent and throws a clear error first; and once the headers have been taken
//   (headers() or applyTo()), every change method throws instead of being lost silently.
// - JSON.stringify leaves non-ASCII characters raw, and a header value must be visible ASCII:
//   this file writes its own JSON, every character outside space..~ as \uXXXX.
// - JSON.parse turns 12345678901234567890123 into 1.2345678901234568e22, and writing it back
//   would corrupt it. This file parses X-Session itself: integers outside Number's safe range
//   (beyond +-9007199254740991) become BigInt, so they come back exactly when written, and
//   incr() counts on them exactly. Safe integers stay plain numbers. (Other numbers are plain
//   numbers too: 1.10 comes back as 1.1 and 1.0 as 1 if the app writes them back.)
// - req.headers holds lower-case names; "x_session" is a name of its own there, never read as
//   "x-session". The sidecar removes every client spelling of its headers; the signature
//   (key option) is what protects an app that can be reached without the sidecar.
// - Some servers reorder response headers (Python's waitress sorts them by name). The order
//   matters only when two data headers name the same key; this file never emits that: an incr
//   or append after a set or delete of the same key in one request is folded into the Set.

const crypto = require("crypto");

// docs/SIGNING.md's check, unchanged: true when the sidecar signed these headers.
function sessionSignatureOk(headers, key, window = 60) {
  const parts = String(headers["x-session-signature"] || "").split(";").map((p) => p.trim());
  if (parts.shift() !== "v1") return false;
  const f = {};
  for (const p of parts) {
    const eq = p.indexOf("=");
    if (eq > 0) f[p.slice(0, eq)] = p.slice(eq + 1);
  }
  if (!/^\d+$/.test(f.t || "") || f.h === undefined || f.s === undefined) return false;
  if (Math.abs(Date.now() / 1000 - Number(f.t)) > window) return false;
  let msg = "v1\n" + f.t + "\n";
  for (const name of f.h.split(" ")) {
    if (typeof headers[name] !== "string") return false;
    msg += name + ":" + headers[name] + "\n";
  }
  const mac = crypto.createHmac("sha256", key).update(msg, "latin1").digest("hex");
  return mac.length === f.s.length && crypto.timingSafeEqual(Buffer.from(mac), Buffer.from(f.s));
}

// ---- JSON in, with integers exact ----

const INTEGER = /^-?(?:0|[1-9]\d*)$/;
const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

function setOwn(obj, key, value) {
  // "__proto__" as a key must be a plain property, not the prototype (as JSON.parse does it).
  Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
}

// Parses JSON text; integers outside the safe range become BigInt. When `floats` (a Set) is
// given, it receives the top-level keys whose value is written as a non-integer number.
function parseJson(text, floats = null) {
  let i = 0;
  let depth = 0;
  let lastFloat = false;
  const fail = (what) => {
    throw new SyntaxError(`X-Session: ${what} at ${i}`);
  };
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i])) i++;
  };
  const value = () => {
    ws();
    const c = text[i];
    lastFloat = false;
    if (c === "{") {
      i++;
      depth++;
      const obj = {};
      ws();
      if (text[i] === "}") return i++, depth--, obj;
      for (;;) {
        ws();
        if (text[i] !== '"') fail("a key expected");
        const k = string();
        ws();
        if (text[i++] !== ":") fail("':' expected");
        setOwn(obj, k, value());
        if (floats && depth === 1 && lastFloat) floats.add(k);
        ws();
        if (text[i] === ",") i++;
        else if (text[i] === "}") return i++, depth--, obj;
        else fail("',' or '}' expected");
      }
    }
    if (c === "[") {
      i++;
      depth++;
      const arr = [];
      ws();
      if (text[i] === "]") return i++, depth--, arr;
      for (;;) {
        arr.push(value());
        ws();
        if (text[i] === ",") i++;
        else if (text[i] === "]") return i++, depth--, arr;
        else fail("',' or ']' expected");
      }
    }
    if (c === '"') return string();
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) return (i += word.length), v;
    }
    NUMBER.lastIndex = i;
    const m = NUMBER.exec(text);
    if (!m) fail("a value expected");
    i += m[0].length;
    if (INTEGER.test(m[0])) {
      const n = Number(m[0]);
      return Number.isSafeInteger(n) ? n : BigInt(m[0]);
    }
    lastFloat = true;
    return Number(m[0]);
  };
  const string = () => {
    // JSON strings are JavaScript string literals without the extras: JSON.parse reads one.
    const start = i;
    i++;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    if (i >= text.length) fail("unterminated string");
    i++;
    return JSON.parse(text.slice(start, i));
  };
  const v = value();
  ws();
  if (i !== text.length) fail("trailing characters");
  return v;
}

// ---- JSON out, ASCII only ----

function quote(s) {
  let out = '"';
  for (let j = 0; j < s.length; j++) {
    const c = s.charCodeAt(j);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += "\\\\";
    else if (c >= 0x20 && c < 0x7f) out += s[j];
    else out += "\\u" + c.toString(16).padStart(4, "0");
  }
  return out + '"';
}

function encode(v, seen = []) {
  if (v === null) return "null";
  switch (typeof v) {
    case "boolean":
      return String(v);
    case "bigint":
      return v.toString();
    case "number":
      if (!Number.isFinite(v)) throw new TypeError(`${v} is not JSON`);
      return Object.is(v, -0) ? "0" : String(v);
    case "string":
      return quote(v);
    case "object":
      break;
    default:
      return undefined; // undefined, functions, symbols: left out, as JSON.stringify does
  }
  if (typeof v.toJSON === "function") return encode(v.toJSON(), seen);
  if (seen.includes(v)) throw new TypeError("a cyclic value is not JSON");
  seen = seen.concat([v]);
  if (Array.isArray(v)) return "[" + v.map((x) => encode(x, seen) ?? "null").join(",") + "]";
  const parts = [];
  for (const k of Object.keys(v)) {
    const e = encode(v[k], seen);
    if (e !== undefined) parts.push(quote(k) + ":" + e);
  }
  return "{" + parts.join(",") + "}";
}

function encodeMap(map) {
  const parts = [];
  for (const [k, v] of map) parts.push(quote(k) + ":" + encode(v));
  return "{" + parts.join(",") + "}";
}

// A copy of v as the session will hold it (throws on what JSON cannot carry).
function asStored(v) {
  const text = encode(v);
  if (text === undefined) throw new TypeError(`${typeof v} is not JSON`);
  return parseJson(text);
}

const isInt = (v) => typeof v === "bigint" || Number.isSafeInteger(v);

function add(a, b) {
  if (typeof a === "number" && typeof b === "number" && Number.isSafeInteger(a + b)) return a + b;
  const sum = BigInt(a) + BigInt(b);
  return sum >= BigInt(Number.MIN_SAFE_INTEGER) && sum <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(sum)
    : sum;
}

function checkKey(key) {
  if (typeof key !== "string") throw new TypeError("session keys are strings");
}

const has = (obj, key) => Object.prototype.hasOwnProperty.call(obj, key);

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

class SidecarSession {
  // `req` is the http module's request (or its req.headers). With `key` (the sidecar's
  // upstream_signing_key, string or Buffer) the X-Session-Signature is checked; a request that
  // fails the check has `trusted` false and is shown as an empty new session without subject,
  // so that data a client forged is never read. Without a key, `trusted` is true.
  constructor(req, { key = null, window = 60 } = {}) {
    const headers = (req && req.headers) || req || {};
    this.trusted = true;
    let signed = null;
    if (key !== null && key !== undefined) {
      if (key.length === 0) {
        // An empty key is a configuration mistake, and anyone can sign with it.
        throw new RangeError("the signing key is empty: pass null to check nothing");
      }
      this.trusted = sessionSignatureOk(headers, key, window);
      if (this.trusted) {
        // SIGNING.md step 5: trust only the headers the signature names.
        const h = headers["x-session-signature"].split(";").map((p) => p.trim())
          .find((p) => p.startsWith("h="));
        signed = new Set(h.slice(2).split(" "));
      }
    }
    const read = (name) => {
      if (!this.trusted || (signed && !signed.has(name))) return null;
      const v = headers[name];
      return typeof v === "string" ? v : null;
    };
    const raw = read("x-session");
    // Top-level keys written as non-integer numbers (1.0 included, which JavaScript cannot
    // tell from 1): incr() refuses them, as the sidecar would.
    this._floats = new Set();
    const data = raw ? parseJson(raw, this._floats) : {};
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      throw new SyntaxError("X-Session is not a JSON object");
    }
    this.data = data;
    this.status = read("x-session-status") === "existing" ? "existing" : "new";
    const age = read("x-session-expiry-age");
    this.expiryAge = age !== null && /^\d+$/.test(age.trim()) ? Number(age.trim()) : null;
    this.subject = read("x-session-subject") || null;
    this.csrfToken = read("x-session-csrf") || null;
    this.id = read("x-session-id") || null;

    this._set = new Map(); // key -> value, as one X-Session-Set
    this._delete = []; // keys, as one X-Session-Delete
    this._incr = new Map(); // key -> sum (number or BigInt)
    this._append = new Map(); // key -> items in call order
    this._flush = false;
    this._cycle = false;
    this._subject = null; // null: unchanged; "" removes the tag
    this._expiry = null;
    this._revoke = null; // "others" or "all"
    this._emitted = false;
  }

  // ---- reading ----

  get isNew() {
    return this.status === "new";
  }

  get(key, fallback = null) {
    return has(this.data, key) ? this.data[key] : fallback;
  }

  has(key) {
    return has(this.data, key);
  }

  // The hidden form field the sidecar checks on POST; "" when there is no token.
  csrfField() {
    if (!this.csrfToken) return "";
    const v = this.csrfToken.replace(/[&<>"']/g, (c) => ESCAPES[c]);
    return `<input type="hidden" name="csrfmiddlewaretoken" value="${v}">`;
  }

  // ---- changing ----

  _changing() {
    if (this._emitted) {
      throw new Error("the session changed after its headers were taken (headers()/applyTo())");
    }
  }

  _dropPending(key) {
    this._set.delete(key);
    this._delete = this._delete.filter((k) => k !== key);
    this._incr.delete(key);
    this._append.delete(key);
    this._floats.delete(key);
  }

  set(key, value) {
    this._changing();
    checkKey(key);
    const stored = asStored(value);
    this._dropPending(key);
    this._set.set(key, stored);
    setOwn(this.data, key, asStored(value));
    if (typeof stored === "number" && !Number.isInteger(stored)) this._floats.add(key);
  }

  delete(key) {
    this._changing();
    checkKey(key);
    this._dropPending(key);
    this._delete.push(key);
    delete this.data[key];
  }

  // Adds the integer n (a safe integer or a BigInt) to the integer at key (a missing key counts
  // as 0), atomically in the store: concurrent requests all count.
  incr(key, n = 1) {
    this._changing();
    checkKey(key);
    if (!isInt(n)) throw new TypeError(`incr() takes an integer, not ${String(n)}`);
    const current = this.get(key, 0);
    if (this._floats.has(key)) {
      throw new TypeError(`incr(${key}): the session holds a number written as a float`);
    }
    if (!isInt(current)) {
      throw new TypeError(`incr(${key}): the session holds ${encode(current)}, not an integer`);
    }
    const result = add(current, n);
    setOwn(this.data, key, result);
    if (this._set.has(key) || this._delete.includes(key)) {
      // After a set or a delete in this request the result is known: one Set says it.
      this._dropPending(key);
      this._set.set(key, result);
    } else {
      this._incr.set(key, add(this._incr.get(key) ?? 0, n));
    }
  }

  // Appends item to the list at key (a missing key starts an empty list), atomically in the
  // store: two tabs adding to one cart both keep their item.
  append(key, item) {
    this._changing();
    checkKey(key);
    const stored = asStored(item);
    const current = this.get(key, []);
    if (!Array.isArray(current)) {
      throw new TypeError(`append(${key}): the session holds ${encode(current)}, not a list`);
    }
    setOwn(this.data, key, current.concat([asStored(item)]));
    if (this._set.has(key) || this._delete.includes(key)) {
      this._dropPending(key);
      this._set.set(key, current.concat([stored]));
    } else {
      if (!this._append.has(key)) this._append.set(key, []);
      this._append.get(key).push(stored);
    }
  }

  _clearData() {
    this._set = new Map();
    this._delete = [];
    this._incr = new Map();
    this._append = new Map();
    this._floats = new Set();
    this._expiry = null; // as in Django, the expiry was the old session's
    this.data = {};
    this.subject = null;
  }

  // Logout: the session and its cookie go; data changed after this starts a fresh one.
  flush() {
    this._changing();
    this._clearData();
    if (this._revoke !== null) {
      // Ending the other sessions and then this one is ending them all: Revoke: all ends this
      // session too, and what follows goes into a fresh one. (A Flush beside it would make the
      // sidecar revoke with the fresh session's subject.)
      // (A subject set earlier in this request names whose sessions end; the fresh session
      // stays untagged.)
      this._revoke = "all";
    } else {
      this._subject = null; // the tag goes with the session
      this._flush = true;
    }
  }

  // Login: the same data under a new key (session fixation).
  cycle() {
    this._changing();
    this._cycle = true;
  }

  // Tags the session (e.g. with the user id at login); "" removes the tag.
  setSubject(subject) {
    this._changing();
    if (typeof subject !== "string" || subject.length > 200 || !/^[!-~]*$/.test(subject)) {
      throw new RangeError('a subject is 1 to 200 visible ASCII characters, or ""');
    }
    if (this._revoke !== null) {
      // The sidecar revokes with the subject the session has at the end of the answer.
      throw new Error("setSubject() after revokeOthers()/revokeAll(): tag the session first");
    }
    this._subject = subject;
    this.subject = subject || null;
  }

  // Django's set_expiry: seconds of inactivity (integer > 0), 0 (until the browser closes),
  // a Date (at that instant) or "default" (the configured policy).
  setExpiry(when) {
    this._changing();
    let value;
    if (when === "default") value = "default";
    else if (Number.isSafeInteger(when) && when >= 0) value = String(when);
    else if (when instanceof Date && !Number.isNaN(when.getTime())) value = when.toISOString();
    else throw new RangeError('setExpiry() takes an integer >= 0, a Date or "default"');
    this._expiry = value;
  }

  // Ends every other session of this session's subject (after a password change).
  revokeOthers() {
    this._changing();
    if (this._revoke === null) this._revoke = "others";
  }

  // Ends every session of this session's subject, this one too; data changed after this starts
  // a fresh, untagged session.
  revokeAll() {
    this._changing();
    // X-Session-Subject beside X-Session-Revoke: all names whose sessions end (a subject set
    // earlier in this request) and tags nothing: the fresh session is untagged.
    const afterFlush = this._flush && !this._subject;
    this._clearData();
    if (afterFlush) return; // after a flush there is no subject to end: a second flush
    this._revoke = "all";
  }


  // ---- answering ----

  // The response headers to add, as [name, value] pairs in the order the sidecar applies them
  // (Set, Delete, Incr, Append, then Flush, Cycle, Subject, Expiry, Revoke), which gives the
  // result of the calls in program order. After this, changing the session throws.
  headers() {
    this._emitted = true;
    const out = [];
    if (this._set.size) out.push(["X-Session-Set", encodeMap(this._set)]);
    if (this._delete.length) out.push(["X-Session-Delete", encode(this._delete)]);
    if (this._incr.size) out.push(["X-Session-Incr", encodeMap(this._incr)]);
    if (this._append.size) out.push(["X-Session-Append", encodeMap(this._append)]);
    if (this._flush) out.push(["X-Session-Flush", "1"]);
    if (this._cycle) out.push(["X-Session-Cycle", "1"]);
    if (this._subject !== null) out.push(["X-Session-Subject", this._subject]);
    if (this._expiry !== null) out.push(["X-Session-Expiry", this._expiry]);
    if (this._revoke !== null) out.push(["X-Session-Revoke", this._revoke]);
    return out;
  }

  // Adds the headers to res (an http.ServerResponse) before its head is sent: call it before
  // res.writeHead(), res.write() or res.end(). Throws when the head is gone already.
  applyTo(res) {
    if (res.headersSent) {
      throw new Error("applyTo(res) after the response head was sent: the session change is lost");
    }
    for (const [name, value] of this.headers()) {
      if (typeof res.appendHeader === "function") res.appendHeader(name, value);
      else res.setHeader(name, value);
    }
  }
}

module.exports = { SidecarSession, sessionSignatureOk, parseJson, encode };
