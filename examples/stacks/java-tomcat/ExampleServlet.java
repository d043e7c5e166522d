// The example app as a servlet on Tomcat 10.1 (jakarta.servlet), using helpers/java/SidecarSession.java.
// run.sh compiles both into the exploded ROOT webapp; WEB-INF/web.xml maps this servlet to "/".
//
// Every page builds its whole body first, then writes the session headers, then the body: once
// the body is written past the response buffer (or flushed), the response is committed and
// Tomcat silently drops any header set afterwards (SidecarSession.writeTo throws instead).

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;

public class ExampleServlet extends HttpServlet {
    private static final long serialVersionUID = 1L;

    private static final String TEXT = "text/plain; charset=utf-8";
    private static final String READ = "GET, HEAD";
    private static final Map<String, String> ALLOWED = Map.ofEntries(
        Map.entry("/", READ), Map.entry("/cart/add", READ), Map.entry("/cart", READ),
        Map.entry("/login", READ), Map.entry("/whoami", READ), Map.entry("/logout", READ),
        Map.entry("/password", "POST"), Map.entry("/logout-everywhere", READ),
        Map.entry("/test-cookie", READ), Map.entry("/form", "GET, HEAD, POST"),
        Map.entry("/expiry", READ), Map.entry("/status", READ), Map.entry("/big", READ),
        Map.entry("/big/size", READ), Map.entry("/sequence", READ),
        Map.entry("/sequence/check", READ));

    private static final String FORM = "<!DOCTYPE html>\n"
        + "<html><head><meta charset=\"utf-8\"><title>Comment</title></head><body>\n"
        + "<form method=\"post\" action=\"/form\">\n"
        + "%s\n"
        + "<input type=\"text\" name=\"comment\">\n"
        + "<button type=\"submit\">Send</button>\n"
        + "</form>\n"
        + "</body></html>\n";

    // The sidecar's [security] upstream_signing_key; unset or empty: no signature check (the
    // helper refuses an empty key, with which anyone could sign).
    private String signingKey;

    // web.xml's <load-on-startup> runs this when Tomcat starts, so the warning comes at start.
    @Override
    public void init() {
        String key = System.getenv("SIDECAR_SIGNING_KEY");
        signingKey = key == null || key.isEmpty() ? null : key;
        if (signingKey == null) {
            System.err.println("ExampleServlet: SIDECAR_SIGNING_KEY is unset or empty: session "
                + "headers are not checked, so this port must be reachable by the sidecar only");
        }
    }

    // One entry for every method, so that the signature check comes first and every answer is
    // this app's own (HttpServlet's doPut() and friends would answer with Tomcat's error page).
    // HEAD runs the GET page, as HttpServlet.doHead() would: the page's changes apply (a HEAD of
    // the visit counter counts, as in Django), and Tomcat's connector sends no body.
    @Override
    protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        // The form body's encoding: Debian's conf/web.xml sets <request-character-encoding>UTF-8,
        // but without it a form is decoded as ISO-8859-1: each UTF-8 byte of a non-ASCII letter
        // becomes a character of its own. It has to be set before the first getParameter().
        if (req.getCharacterEncoding() == null) req.setCharacterEncoding("UTF-8");

        SidecarSession s = new SidecarSession(req::getHeader, signingKey);
        if (!s.isTrusted()) {
            send(resp, 403, TEXT, "forged session headers refused\n", null);
            return;
        }
        String path = req.getServletPath() + (req.getPathInfo() == null ? "" : req.getPathInfo());
        String method = req.getMethod();
        String allowed = ALLOWED.get(path);
        if (allowed == null) {
            send(resp, 404, TEXT, "not found\n", s);
        } else if (!List.of(allowed.split(", ")).contains(method)) {
            resp.setHeader("Allow", allowed);
            send(resp, 405, TEXT, "method not allowed\n", s);
        } else {
            page(req, resp, s, path, method.equals("POST"));
        }
    }

    private void page(HttpServletRequest req, HttpServletResponse resp, SidecarSession s,
            String path, boolean post) throws IOException {
        switch (path) {
            case "/": {
                long n = s.getLong("visits", 0) + 1;
                s.incr("visits");
                send(resp, 200, TEXT, "You have visited this page " + n + (n == 1 ? " time.\n" : " times.\n"), s);
                return;
            }
            case "/cart/add": {
                String item = req.getParameter("item");
                if (item == null || item.isEmpty()) {
                    send(resp, 400, TEXT, "item missing\n", s);
                    return;
                }
                s.append("cart", item);
                send(resp, 200, TEXT, "added " + item + "\n", s);
                return;
            }
            case "/cart": {
                List<String> items = new ArrayList<>();
                for (Object o : s.getList("cart")) items.add(String.valueOf(o));
                send(resp, 200, TEXT, "cart: " + String.join(",", items) + "\n", s);
                return;
            }
            case "/login": {
                String user = req.getParameter("user");
                if (user == null || user.isEmpty()) {
                    send(resp, 400, TEXT, "user missing\n", s);
                    return;
                }
                s.cycle();
                s.setSubject(user);
                s.set("user", user);
                send(resp, 200, TEXT, "logged in as " + user + "\n", s);
                return;
            }
            case "/whoami": {
                StringBuilder b = new StringBuilder();
                b.append("user: ").append(s.get("user", "anonymous")).append('\n');
                b.append("subject: ").append(s.subject() == null ? "none" : s.subject()).append('\n');
                if (s.has("flash")) {
                    b.append("flash: ").append(s.get("flash")).append('\n');
                    s.delete("flash");
                }
                send(resp, 200, TEXT, b.toString(), s);
                return;
            }
            case "/logout":
                s.flush();
                s.set("flash", "You have been logged out.");
                send(resp, 200, TEXT, "logged out\n", s);
                return;
            case "/password":
                s.revokeOthers();
                s.cycle();
                send(resp, 200, TEXT, "password changed\n", s);
                return;
            case "/logout-everywhere":
                s.revokeAll();
                s.set("flash", "You were logged out everywhere.");
                send(resp, 200, TEXT, "logged out everywhere\n", s);
                return;
            case "/test-cookie":
                if (!s.isNew() && s.has("testcookie")) {
                    s.delete("testcookie");
                    send(resp, 200, TEXT, "cookies work\n", s);
                } else {
                    s.set("testcookie", "worked");
                    send(resp, 200, TEXT, "test cookie set\n", s);
                }
                return;
            case "/form":
                if (post) {
                    String comment = req.getParameter("comment");
                    if (comment == null) comment = "";
                    s.set("comment", comment);
                    send(resp, 200, TEXT, "form accepted: " + comment + "\n", s);
                } else {
                    send(resp, 200, "text/html; charset=utf-8", String.format(FORM, s.csrfField()), s);
                }
                return;
            case "/expiry": {
                String seconds = req.getParameter("seconds");
                if ("default".equals(seconds)) {
                    s.setExpiry("default");
                } else if (seconds != null && seconds.matches("[0-9]{1,18}")) {
                    s.setExpiry(Long.parseLong(seconds));
                } else {
                    send(resp, 400, TEXT, "seconds: a number or default\n", s);
                    return;
                }
                s.set("expiry", seconds);
                send(resp, 200, TEXT, "expiry: " + seconds + "\n", s);
                return;
            }
            case "/status": {
                Long age = s.expiryAge();
                send(resp, 200, TEXT, "status: " + s.status() + "\n"
                    + "expiry-age: " + (age == null ? "none" : age.toString()) + "\n"
                    + "keys: " + String.join(",", new TreeSet<>(s.data().keySet())) + "\n", s);
                return;
            }
            case "/big": {
                String n = req.getParameter("bytes");
                if (n == null || !n.matches("[0-9]{1,8}")) {
                    send(resp, 400, TEXT, "bytes: a number\n", s);
                    return;
                }
                s.set("big", "x".repeat(Integer.parseInt(n)));
                send(resp, 200, TEXT, "stored " + Integer.parseInt(n) + "\n", s);
                return;
            }
            case "/big/size":
                send(resp, 200, TEXT, "big: " + s.getString("big", "").length() + "\n", s);
                return;
            case "/sequence":
                // Calls on the same keys in one request: the result is the calls' in this order,
                // whatever order the headers reach the sidecar in (the helper never puts one key
                // in two data headers).
                s.set("n", 10);
                s.incr("n", 5);
                s.delete("seq");
                s.append("seq", "a");
                s.append("seq", "b");
                s.set("gone", 1);
                s.delete("gone");
                send(resp, 200, TEXT, "sequence done\n", s);
                return;
            case "/sequence/check": {
                List<String> items = new ArrayList<>();
                for (Object o : s.getList("seq")) items.add(String.valueOf(o));
                send(resp, 200, TEXT, "n: " + s.get("n") + "\n"
                    + "seq: " + String.join(",", items) + "\n"
                    + "gone: " + (s.has("gone") ? s.get("gone") : "none") + "\n", s);
                return;
            }
            default:
                throw new IllegalStateException("no page for " + path);
        }
    }

    // Status, type, session headers, Content-Length, then the body: in that order.
    private static void send(HttpServletResponse resp, int status, String type, String body,
            SidecarSession s) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        resp.setStatus(status);
        resp.setContentType(type);
        if (s != null) s.writeTo(resp::setHeader, resp::isCommitted);
        resp.setContentLength(bytes.length);
        resp.getOutputStream().write(bytes);
    }
}
