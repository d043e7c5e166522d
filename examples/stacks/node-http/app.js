"use strict";
// The example pages on Node's http module, no npm packages: `node app.js PORT WORKDIR`.
//
// A primary process forks WORKERS (default 2) workers with the cluster module, as a production
// setup without a process manager would; they share 127.0.0.1:PORT. The pid file and the access
// log go to WORKDIR. SIGTERM (or SIGINT) to the primary stops the workers gracefully, then it.
// The session comes from session-sidecar in request headers and goes back in response headers,
// through helpers/node/sidecar-session.js.

const cluster = require("cluster");
const fs = require("fs");
const http = require("http");
const path = require("path");

// The helper lives in helpers/node/ of this repository; an app of your own keeps its copy
// beside it: require("./sidecar-session").
const { SidecarSession } = require(path.join(__dirname, "..", "..", "..", "helpers", "node",
  "sidecar-session.js"));

const PORT = Number(process.argv[2]);
const WORKDIR = process.argv[3];
const WORKERS = Number(process.env.WORKERS || 2);
// The sidecar's [security] upstream_signing_key; without it nothing is checked.
const SIGNING_KEY = process.env.SIDECAR_SIGNING_KEY || null;

const TEXT = "text/plain; charset=utf-8";
const MAX_BODY_BYTES = 1 << 20;
// Node refuses (431) a request whose head (request line and every header) is over
// maxHeaderSize, 16 KiB by default. The sidecar lets clients send heads of up to
// max_header_bytes (64 KiB) and adds its own headers (X-Session alone up to 8 KiB): a browser
// with big cookies and a big session would get Node's 431 through the sidecar.
const MAX_HEADER_SIZE = 80 * 1024;
// Above the sidecar's 60 s for idle upstream connections (Node's default is 5 s). The sidecar
// retries a request on a new connection when an idle one turns out closed, so this saves
// connects rather than errors.
const KEEP_ALIVE_MS = 75 * 1000;

const FORM = (csrf) => `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Comment</title></head><body>
<form method="post" action="/form">
${csrf}
<input type="text" name="comment">
<button type="submit">Send</button>
</form>
</body></html>
`;

const READ = ["GET", "HEAD"]; // HEAD runs the GET page; Node sends no body
const ALLOWED = new Map([["/password", ["POST"]], ["/form", ["GET", "HEAD", "POST"]]]);
for (const p of ["/", "/cart/add", "/cart", "/login", "/whoami", "/logout", "/logout-everywhere",
  "/test-cookie", "/expiry", "/status", "/big", "/big/size", "/sequence", "/sequence/check"])
  ALLOWED.set(p, READ);

function page(req, body, s) {
  const url = new URL(req.url, "http://localhost");
  const q = url.searchParams;
  const method = req.method;
  const get = READ.includes(method);
  const p = url.pathname;
  const ok = (text, type = TEXT) => [200, type, text];
  const bad = (text) => [400, TEXT, text];
  if (!ALLOWED.has(p)) return [404, TEXT, "not found\n"];
  if (!ALLOWED.get(p).includes(method)) {
    return [405, TEXT, "method not allowed\n", { Allow: ALLOWED.get(p).join(", ") }];
  }

  if (p === "/" && get) {
    const visits = s.get("visits", 0) + 1;
    s.incr("visits");
    return ok(`You have visited this page ${visits} time${visits === 1 ? "" : "s"}.\n`);
  }
  if (p === "/cart/add" && get) {
    const item = q.get("item");
    if (!item) return bad("item missing\n");
    s.append("cart", item);
    return ok(`added ${item}\n`);
  }
  if (p === "/cart" && get) return ok(`cart: ${s.get("cart", []).join(",")}\n`);
  if (p === "/login" && get) {
    const user = q.get("user");
    if (!user) return bad("user missing\n");
    s.cycle();
    s.setSubject(user);
    s.set("user", user);
    return ok(`logged in as ${user}\n`);
  }
  if (p === "/whoami" && get) {
    let text = `user: ${s.get("user", "anonymous")}\nsubject: ${s.subject || "none"}\n`;
    if (s.has("flash")) {
      text += `flash: ${s.get("flash")}\n`;
      s.delete("flash");
    }
    return ok(text);
  }
  if (p === "/logout" && get) {
    s.flush();
    s.set("flash", "You have been logged out.");
    return ok("logged out\n");
  }
  if (p === "/password" && method === "POST") {
    s.revokeOthers();
    s.cycle();
    return ok("password changed\n");
  }
  if (p === "/logout-everywhere" && get) {
    s.revokeAll();
    s.set("flash", "You were logged out everywhere.");
    return ok("logged out everywhere\n");
  }
  if (p === "/test-cookie" && get) {
    if (s.status === "existing" && s.has("testcookie")) {
      s.delete("testcookie");
      return ok("cookies work\n");
    }
    s.set("testcookie", "worked");
    return ok("test cookie set\n");
  }
  if (p === "/form" && get) return ok(FORM(s.csrfField()), "text/html; charset=utf-8");
  if (p === "/form" && method === "POST") {
    const comment = new URLSearchParams(body.toString("utf8")).get("comment") ?? "";
    s.set("comment", comment);
    return ok(`form accepted: ${comment}\n`);
  }
  if (p === "/expiry" && get) {
    const seconds = q.get("seconds") ?? "";
    if (seconds === "default") s.setExpiry("default");
    else if (/^\d+$/.test(seconds)) s.setExpiry(Number(seconds));
    else return bad("seconds: a number or default\n");
    s.set("expiry", seconds);
    return ok(`expiry: ${seconds}\n`);
  }
  if (p === "/status" && get) {
    const age = s.expiryAge === null ? "none" : String(s.expiryAge);
    const keys = Object.keys(s.data).sort().join(",");
    return ok(`status: ${s.status}\nexpiry-age: ${age}\nkeys: ${keys}\n`);
  }
  if (p === "/big" && get) {
    const n = q.get("bytes") ?? "";
    if (!/^\d+$/.test(n)) return bad("bytes: a number\n");
    s.set("big", "x".repeat(Number(n)));
    return ok(`stored ${Number(n)}\n`);
  }
  if (p === "/big/size" && get) return ok(`big: ${s.get("big", "").length}\n`);
  if (p === "/sequence" && get) {
    // Calls on the same keys in one request: the result is the calls' in this order, whatever
    // order a server would send the headers in.
    s.set("n", 10);
    s.incr("n", 5);
    s.delete("seq");
    s.append("seq", "a");
    s.append("seq", "b");
    s.set("gone", 1);
    s.delete("gone");
    return ok("sequence done\n");
  }
  if (p === "/sequence/check" && get) {
    const gone = s.has("gone") ? s.get("gone") : "none";
    return ok(`n: ${s.get("n")}\nseq: ${s.get("seq", []).join(",")}\ngone: ${gone}\n`);
  }
  throw new Error(`no page for ${method} ${p}`);
}

function serve(log) {
  const server = http.createServer({ maxHeaderSize: MAX_HEADER_SIZE }, (req, res) => {
    // Read the whole body before answering: the form page needs it, and the answer then
    // follows the whole request, as every proxy expects. (A body left unread is drained by
    // Node itself, and the connection kept.)
    const chunks = [];
    let size = 0;
    req.on("data", (c) => {
      size += c.length;
      if (size <= MAX_BODY_BYTES) chunks.push(c);
    });
    req.on("end", () => {
      let status, type, text, extra;
      try {
        const s = new SidecarSession(req, { key: SIGNING_KEY });
        if (!s.trusted) {
          [status, type, text] = [403, TEXT, "forged session headers refused\n"];
        } else {
          [status, type, text, extra] = page(req, Buffer.concat(chunks), s);
          s.applyTo(res); // before writeHead: afterwards setHeader throws ERR_HTTP_HEADERS_SENT
        }
      } catch (e) {
        console.error(e);
        [status, type, text, extra] = [500, TEXT, "internal error\n"];
      }
      const body = Buffer.from(text, "utf8");
      res.writeHead(status, { ...extra, "Content-Type": type, "Content-Length": body.length });
      res.end(body);
      log.write(`${new Date().toISOString()} ${req.socket.remoteAddress} "${req.method} ${req.url} ` +
        `HTTP/${req.httpVersion}" ${status} ${body.length}\n`);
    });
  });
  server.keepAliveTimeout = KEEP_ALIVE_MS;
  server.headersTimeout = 60 * 1000;
  server.listen(PORT, "127.0.0.1");
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
    setTimeout(() => process.exit(1), 10 * 1000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

if (!(PORT > 0) || !WORKDIR) {
  console.error("usage: node app.js PORT WORKDIR");
  process.exit(2);
}

if (cluster.isPrimary) {
  fs.mkdirSync(WORKDIR, { recursive: true });
  const pidFile = path.join(WORKDIR, "node.pid");
  fs.writeFileSync(pidFile, `${process.pid}\n`);
  let stopping = false;
  const fork = () => cluster.fork();
  for (let i = 0; i < WORKERS; i++) fork();
  cluster.on("listening", (w) => console.error(`worker ${w.process.pid} serving on 127.0.0.1:${PORT}`));
  cluster.on("exit", (w, code, signal) => {
    if (stopping) {
      if (Object.keys(cluster.workers).length === 0) {
        fs.rmSync(pidFile, { force: true });
        process.exit(0);
      }
      return;
    }
    console.error(`worker ${w.process.pid} died (${signal || code}); starting another`);
    setTimeout(fork, 1000);
  });
  const stop = () => {
    if (stopping) return;
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill("SIGTERM");
    if (Object.keys(cluster.workers).length === 0) process.exit(0);
    setTimeout(() => process.exit(1), 15 * 1000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
} else {
  serve(fs.createWriteStream(path.join(WORKDIR, "access.log"), { flags: "a" }));
}
