// SidecarSession.java: the session-sidecar helper for Java. One file, JDK 17 standard library only.
//
// Copy this file into your sources (add your own `package` line) and use it in a servlet:
//
//     SidecarSession s = new SidecarSession(request::getHeader, signingKey);   // null: no check
//     if (!s.isTrusted()) { response.sendError(403); return; }   // forged or stale session headers
//     long visits = s.getLong("visits", 0) + 1;
//     s.incr("visits");
//     s.writeTo(response::setHeader, response::isCommitted);    // BEFORE the first byte of the body
//     response.getWriter().write("You have visited this page " + visits + " times.\n");
//
// It reads the session the sidecar sends (docs/HEADERS.md section 1), checks X-Session-Signature
// (docs/SIGNING.md) when given a signing key, keeps a local view of the changes made during the
// request, and turns those changes into the response headers of section 2. It does not depend on
// the servlet API (jakarta.servlet or javax.servlet alike): it takes a header reader
// (`request::getHeader`) and a header writer (`response::setHeader`), so it also serves
// com.sun.net.httpserver (`exchange.getRequestHeaders()::getFirst`, `...getResponseHeaders()::set`)
// or any other Java HTTP server.
//
// Servlet traps, and what this class does about them:
// - A response is COMMITTED (status line and headers sent) as soon as the body outgrows the
//   response buffer (8 KiB by default in Tomcat: 8 KiB through getOutputStream(), about 16 KiB of
//   text through getWriter(), which buffers characters first), or on flushBuffer(), sendError(),
//   sendRedirect(). After that, Tomcat's setHeader()/addHeader() do nothing at all: no exception,
//   no log line, and the session change is silently lost. writeTo(setHeader, isCommitted) therefore throws
//   IllegalStateException when the response is already committed and there is something to write.
//   Call it after the last change and before writing the body.
// - addHeader vs setHeader: pass setHeader. Every header this class writes is one complete value
//   per name (all pending sets in one X-Session-Set, and so on), so calling writeTo twice replaces
//   instead of repeating. With addHeader a second call would send X-Session-Incr twice and the
//   sidecar would add twice.
// - Header order. Tomcat sends response headers in the order they were set, but a filter, a
//   front server or another container may not (Python's waitress sorts them by name, so
//   X-Session-Incr arrives before X-Session-Set), and the sidecar applies the data headers name by
//   name in the order each name first arrives. So this class never puts one key in two data
//   headers: it keeps at most one pending operation per key, composed locally. set() or delete()
//   replaces whatever was pending for the key; incr() after a pending set or delete becomes a set
//   of the result (known here: the value set plus n, or n), and after a pending incr adds to it;
//   append() after a pending set or delete becomes a set of that list plus the item ([item] after
//   a delete), and after a pending append adds the item to it; flush() drops everything pending
//   (the sidecar applies Flush before any data, whatever the order). X-Session-Set,
//   -Delete, -Incr and -Append therefore mean the same in any order.
// - A change made after the headers were taken would be lost without a word: once headers() or
//   writeTo() has run, every change method throws IllegalStateException.
// - Header values are ISO-8859-1 in Tomcat. request.getHeader() decodes each byte as one char,
//   so the signature is computed over getBytes(ISO_8859_1): the very bytes that arrived. On the
//   way out, a char up to U+00FF is sent as that one byte (an e-acute written raw into a
//   hand-made X-Session-Set reaches the sidecar as the byte 0xE9, invalid UTF-8: 502), and a
//   header holding a char above U+00FF is removed with only a WARNING in Tomcat's log. This class writes only visible ASCII (JSON with \\uXXXX
//   escapes; setSubject() refuses anything else), so no value is mangled either way.
// - request.getHeader("X-Session") does not match a client's "X_Session" header (Tomcat compares
//   names case-insensitively but keeps '_' and '-' apart), and with a signing key only the headers
//   named in the signature are read at all.
//
// JSON values map to Java as: object -> LinkedHashMap<String, Object>, array -> ArrayList<Object>,
// string -> String, integer -> Long (BigInteger when it does not fit in a long), other numbers ->
// BigDecimal (exact: 1.10 keeps its zero; 1E3 is the same number and is written back as 1E+3),
// true/false -> Boolean, null -> null. set() and append() accept those types and also Integer, Short,
// Byte, Double, Float (finite), any Map with String keys, any Iterable, and Object[].
//
// Not thread-safe: make one per request.

import java.math.BigDecimal;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.time.format.DateTimeFormatter;
import java.time.format.DateTimeParseException;
import java.util.AbstractMap;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.BiConsumer;
import java.util.function.BooleanSupplier;
import java.util.function.Function;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

public final class SidecarSession {
    /** Seconds a signature stays valid by default (docs/SIGNING.md, step 2). */
    public static final long DEFAULT_WINDOW = 60;

    private static final String[] RECEIVED = {
        "x-session", "x-session-status", "x-session-expiry-age", "x-session-subject",
        "x-session-csrf", "x-session-id",
    };

    private final boolean trusted;
    private final Map<String, Object> data;
    private final String status;
    private final Long expiryAge;
    private String subject;
    private final String csrfToken;
    private final String id;

    // Pending changes, each value already JSON text (validated when the call is made). A key is
    // in one of the four at most (see "Header order" at the top of this file).
    private final LinkedHashMap<String, String> sets = new LinkedHashMap<>();
    private final LinkedHashSet<String> deletes = new LinkedHashSet<>();
    private final LinkedHashMap<String, BigInteger> incrs = new LinkedHashMap<>();
    private final LinkedHashMap<String, List<String>> appends = new LinkedHashMap<>();
    private boolean flush;
    private boolean cycle;
    private String newSubject;
    private String expiry;
    private String revoke;
    private boolean written;

    /** Reads the session without checking signatures (an app that only the sidecar can reach). */
    public SidecarSession(Function<String, String> header) {
        this(header, null, DEFAULT_WINDOW);
    }

    /**
     * Reads the session; with a signing key (the sidecar's upstream_signing_key), checks
     * X-Session-Signature first. A null key means no check; an empty one is refused
     * (IllegalArgumentException), as it is always a configuration mistake.
     */
    public SidecarSession(Function<String, String> header, String signingKey) {
        this(header, signingKey, DEFAULT_WINDOW);
    }

    /** As above, with the number of seconds a signature may be away from this machine's clock. */
    public SidecarSession(Function<String, String> header, String signingKey, long windowSeconds) {
        Function<String, String> read = header;
        boolean ok = true;
        if (signingKey != null) {
            if (signingKey.isEmpty()) {
                throw new IllegalArgumentException("empty signing key (pass null for none)");
            }
            Set<String> signed = signedNames(header, signingKey.getBytes(StandardCharsets.UTF_8),
                windowSeconds);
            ok = signed != null;
            // Only what the sidecar signed is read: an unsigned X-Session-Subject added to a
            // replayed request is ignored, and an unverified request reads as no session at all.
            read = ok ? name -> signed.contains(name) ? header.apply(name) : null : name -> null;
        }
        trusted = ok;
        String json = read.apply(RECEIVED[0]);
        Map<String, Object> parsed = new LinkedHashMap<>();
        if (json != null && !json.isEmpty()) {
            Object value = parseJson(json);
            if (!(value instanceof Map)) {
                throw new IllegalArgumentException("X-Session is not a JSON object");
            }
            @SuppressWarnings("unchecked")
            Map<String, Object> map = (Map<String, Object>) value;
            parsed = map;
        }
        data = parsed;
        status = "existing".equalsIgnoreCase(trim(read.apply(RECEIVED[1]))) ? "existing" : "new";
        String age = trim(read.apply(RECEIVED[2]));
        expiryAge = age != null && age.matches("-?[0-9]{1,18}") ? Long.valueOf(age) : null;
        subject = read.apply(RECEIVED[3]);
        csrfToken = read.apply(RECEIVED[4]);
        id = read.apply(RECEIVED[5]);
    }

    // ---------------------------------------------------------------- reading

    /** False when a signing key was given and X-Session-Signature did not verify: then the
     *  session reads as empty and new, with no subject, token or id, and nothing is written. */
    public boolean isTrusted() { return trusted; }

    /** The session as this request sees it (with this request's changes), read-only. */
    public Map<String, Object> data() { return Collections.unmodifiableMap(data); }

    public boolean has(String key) { return data.containsKey(key); }

    /** The value at key, or null. */
    public Object get(String key) { return data.get(key); }

    /** The value at key, or def when the key is missing. */
    public Object get(String key, Object def) { return data.containsKey(key) ? data.get(key) : def; }

    /** The string at key, or def when missing; IllegalStateException when it is not a string. */
    public String getString(String key, String def) {
        Object v = data.get(key);
        if (v == null) return def;
        if (!(v instanceof String)) throw new IllegalStateException("session key " + key + " is not a string");
        return (String) v;
    }

    /** The integer at key, or def when missing; IllegalStateException when it is not an integer
     *  that fits in a long. */
    public long getLong(String key, long def) {
        Object v = data.get(key);
        if (v == null) return def;
        BigInteger n = integer(v);
        if (n == null || n.bitLength() > 63) {
            throw new IllegalStateException("session key " + key + " is not an integer of 64 bits");
        }
        return n.longValue();
    }

    /** The list at key (a copy), or an empty list when missing; IllegalStateException when it is
     *  not a list. */
    public List<Object> getList(String key) {
        Object v = data.get(key);
        if (v == null) return new ArrayList<>();
        if (!(v instanceof List)) throw new IllegalStateException("session key " + key + " is not a list");
        return new ArrayList<>((List<?>) v);
    }

    /** "new" or "existing" (X-Session-Status). */
    public String status() { return status; }

    public boolean isNew() { return !"existing".equals(status); }

    /** Whole seconds until the session expires (X-Session-Expiry-Age), or null. */
    public Long expiryAge() { return expiryAge; }

    /** The subject the session is tagged with (X-Session-Subject), or null; after setSubject(),
     *  flush() or revokeAll() in this request, what they make it. */
    public String subject() { return subject; }

    /** The CSRF token (X-Session-Csrf), or null. */
    public String csrfToken() { return csrfToken; }

    /** The session key (X-Session-Id, only with the sidecar's expose_id), or null. */
    public String id() { return id; }

    /** The hidden form field carrying the CSRF token, or "" when there is none. */
    public String csrfField() {
        if (csrfToken == null || csrfToken.isEmpty()) return "";
        return "<input type=\"hidden\" name=\"csrfmiddlewaretoken\" value=\"" + escapeHtml(csrfToken) + "\">";
    }

    // ---------------------------------------------------------------- changing

    /** Sets key to value (X-Session-Set). Drops this request's pending delete, incr and append of key. */
    public void set(String key, Object value) {
        changing();
        String json = toJson(value);
        requireKey(key);
        deletes.remove(key);
        incrs.remove(key);
        appends.remove(key);
        sets.put(key, json);
        data.put(key, parseJson(json));
    }

    /** Removes key (X-Session-Delete); a missing key is not an error. Drops pending set, incr, append of key. */
    public void delete(String key) {
        changing();
        requireKey(key);
        sets.remove(key);
        incrs.remove(key);
        appends.remove(key);
        deletes.add(key);
        data.remove(key);
    }

    /** Adds 1 to the integer at key (X-Session-Incr: atomic in the store, so concurrent requests all count). */
    public void incr(String key) { incr(key, BigInteger.ONE); }

    public void incr(String key, long n) { incr(key, BigInteger.valueOf(n)); }

    /** Adds n to the integer at key; a missing key counts as 0. Throws IllegalStateException when
     *  the value this request sees is not an integer (the sidecar would refuse the answer). After
     *  a set() or delete() of key in this request, it is sent as a set of the result (see "Header
     *  order" at the top of this file). */
    public void incr(String key, BigInteger n) {
        changing();
        requireKey(key);
        if (n == null) throw new IllegalArgumentException("incr by null");
        Object current = data.get(key);
        BigInteger base = current == null ? BigInteger.ZERO : integer(current);
        if (base == null || appends.containsKey(key)) {
            throw new IllegalStateException("session key " + key + " is not an integer");
        }
        BigInteger result = base.add(n);
        if (sets.containsKey(key) || deletes.contains(key)) {
            // The value is known here (what was set, or nothing after a delete): send the result.
            deletes.remove(key);
            sets.put(key, result.toString());
        } else {
            incrs.merge(key, n, BigInteger::add);
        }
        data.put(key, normalize(result));
    }

    /** Appends item to the list at key (X-Session-Append: atomic in the store, so two tabs adding
     *  at once both keep their item); a missing key starts an empty list. After a set() or
     *  delete() of key in this request, it is sent as a set of the whole list (see "Header order"
     *  at the top of this file). */
    public void append(String key, Object item) {
        changing();
        String json = toJson(item);
        requireKey(key);
        Object current = data.get(key);
        if ((current != null && !(current instanceof List)) || incrs.containsKey(key)) {
            throw new IllegalStateException("session key " + key + " is not a list");
        }
        String pendingSet = sets.get(key);
        if (pendingSet != null) {
            // The list was set in this request (compact JSON from toJson: "[]" or "[a,b]"):
            // send it with the item added, as the set's own text, so that no value is rewritten.
            String head = pendingSet.substring(0, pendingSet.length() - 1);
            sets.put(key, head + (head.length() > 1 ? "," : "") + json + "]");
        } else if (deletes.remove(key)) {
            sets.put(key, "[" + json + "]");
        } else {
            appends.computeIfAbsent(key, k -> new ArrayList<>()).add(json);
        }
        List<Object> list = current == null ? new ArrayList<>() : new ArrayList<>((List<?>) current);
        list.add(parseJson(json));
        data.put(key, list);
    }

    /** Logout (X-Session-Flush): the session and its cookie go. Changes made before this call in
     *  the same request are forgotten (data, tag, expiry); changes made after it go into a
     *  fresh session, as the sidecar applies them. After revokeOthers(), ends them all
     *  (X-Session-Revoke: all, which ends this session too). */
    public void flush() {
        changing();
        if (revoke != null) {
            // The others, then this one: all of them. (A Flush beside Revoke: others would make
            // the sidecar revoke with the fresh session's subject, which has none.)
            // (A subject set earlier in this request names whose sessions end; the fresh session
            // stays untagged.)
            forgetSession();
            revoke = "all";
        } else {
            forgetSession();
            newSubject = null;   // the tag goes with the session
            flush = true;
        }
    }

    /** Login (X-Session-Cycle): the same data under a new key (against session fixation). */
    public void cycle() {
        changing();
        cycle = true;
    }

    /** Tags the session with a subject (1 to 200 visible ASCII characters); "" removes the tag. */
    public void setSubject(String s) {
        changing();
        if (s == null) throw new IllegalArgumentException("subject is null (use \"\" to remove it)");
        if (s.length() > 200) throw new IllegalArgumentException("subject longer than 200 characters");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c < 0x21 || c > 0x7e) throw new IllegalArgumentException("subject is not visible ASCII");
        }
        if (revoke != null) {
            // The sidecar revokes with the subject the session has at the end of the answer.
            throw new IllegalStateException("setSubject() after revokeOthers()/revokeAll(): tag the session first");
        }
        newSubject = s;
        subject = s.isEmpty() ? null : s;
    }

    /** Expires the session after this many seconds of inactivity; 0 = when the browser closes. */
    public void setExpiry(long seconds) {
        changing();
        if (seconds < 0) throw new IllegalArgumentException("negative expiry");
        expiry = Long.toString(seconds);
    }

    /** Expires the session at this instant. */
    public void setExpiry(Instant at) {
        changing();
        expiry = DateTimeFormatter.ISO_INSTANT.format(at);
    }

    /** "default" (back to the sidecar's policy), a number of seconds, or an RFC 3339 timestamp. */
    public void setExpiry(String value) {
        changing();
        if (value == null) throw new IllegalArgumentException("expiry is null");
        if (value.equalsIgnoreCase("default")) {
            expiry = "default";
        } else if (value.matches("[0-9]{1,18}")) {
            setExpiry(Long.parseLong(value));
        } else {
            try {
                OffsetDateTime.parse(value);
            } catch (DateTimeParseException e) {
                throw new IllegalArgumentException("expiry is not default, seconds or an RFC 3339 timestamp: " + value);
            }
            expiry = value;
        }
    }

    /** Ends every other session of this session's subject (after a password change). The sidecar
     *  uses the subject the session has once this response is applied. */
    public void revokeOthers() {
        changing();
        if (revoke == null) revoke = "others";
    }

    /** Ends every session of the subject, this one too (as flush() does): changes made after
     *  this call go into a fresh, untagged session. */
    public void revokeAll() {
        changing();
        // X-Session-Subject beside X-Session-Revoke: all names whose sessions end (a subject set
        // earlier in this request) and tags nothing: the fresh session is untagged.
        boolean afterFlush = flush && newSubject == null;
        forgetSession();
        if (!afterFlush) revoke = "all";   // after a flush there is no subject left to end
    }

    private void forgetSession() {
        sets.clear();
        deletes.clear();
        incrs.clear();
        appends.clear();
        data.clear();
        expiry = null;   // as in Django, the expiry was the old session's
        subject = null;
    }

    // Once the headers are out, a change would be lost silently: refuse it.
    private void changing() {
        if (written) {
            throw new IllegalStateException("the session changed after its headers were taken "
                + "(headers() or writeTo()): make every change first");
        }
    }

    // ---------------------------------------------------------------- writing

    /**
     * The response headers for this request's changes: X-Session-Set, -Delete, -Incr, -Append
     * (each key in one of them at most, so their order does not matter), then Flush, Cycle,
     * Subject, Expiry, Revoke. Empty when nothing changed, and when the request is not trusted.
     * Any change after this call throws IllegalStateException.
     */
    public List<Map.Entry<String, String>> headers() {
        written = true;
        List<Map.Entry<String, String>> out = new ArrayList<>();
        if (!trusted) return out;
        if (!sets.isEmpty()) {
            StringBuilder b = new StringBuilder("{");
            for (Map.Entry<String, String> e : sets.entrySet()) {
                if (b.length() > 1) b.append(',');
                writeString(b, e.getKey());
                b.append(':').append(e.getValue());
            }
            out.add(entry("X-Session-Set", b.append('}').toString()));
        }
        if (!deletes.isEmpty()) out.add(entry("X-Session-Delete", toJson(deletes)));
        if (!incrs.isEmpty()) {
            StringBuilder b = new StringBuilder("{");
            for (Map.Entry<String, BigInteger> e : incrs.entrySet()) {
                if (b.length() > 1) b.append(',');
                writeString(b, e.getKey());
                b.append(':').append(e.getValue());
            }
            out.add(entry("X-Session-Incr", b.append('}').toString()));
        }
        if (!appends.isEmpty()) {
            StringBuilder b = new StringBuilder("{");
            for (Map.Entry<String, List<String>> e : appends.entrySet()) {
                if (b.length() > 1) b.append(',');
                writeString(b, e.getKey());
                b.append(":[").append(String.join(",", e.getValue())).append(']');
            }
            out.add(entry("X-Session-Append", b.append('}').toString()));
        }
        if (flush) out.add(entry("X-Session-Flush", "1"));
        if (cycle) out.add(entry("X-Session-Cycle", "1"));
        if (newSubject != null) out.add(entry("X-Session-Subject", newSubject));
        if (expiry != null) out.add(entry("X-Session-Expiry", expiry));
        if (revoke != null) out.add(entry("X-Session-Revoke", revoke));
        return out;
    }

    /** Writes headers() with a setter that replaces (a servlet's response::setHeader). */
    public void writeTo(BiConsumer<String, String> setHeader) {
        for (Map.Entry<String, String> h : headers()) setHeader.accept(h.getKey(), h.getValue());
    }

    /**
     * Writes headers() with response::setHeader, after checking response::isCommitted: a servlet
     * container silently drops headers set on a committed response, so this throws
     * IllegalStateException instead of losing the change.
     */
    public void writeTo(BiConsumer<String, String> setHeader, BooleanSupplier isCommitted) {
        List<Map.Entry<String, String>> hs = headers();
        if (!hs.isEmpty() && isCommitted.getAsBoolean()) {
            throw new IllegalStateException("response already committed: the session change "
                + "would be lost (write the session headers before the body)");
        }
        for (Map.Entry<String, String> h : hs) setHeader.accept(h.getKey(), h.getValue());
    }

    // ---------------------------------------------------------------- the signature

    /**
     * docs/SIGNING.md's check: true when X-Session-Signature verifies under key within window
     * seconds of this machine's clock.
     */
    public static boolean signatureOk(Function<String, String> header, byte[] key, long window) {
        return signedNames(header, key, window) != null;
    }

    // The names the signature covers, or null when it does not verify.
    private static Set<String> signedNames(Function<String, String> header, byte[] key, long window) {
        String sig = header.apply("x-session-signature");
        if (sig == null) return null;
        String[] parts = sig.split(";");
        if (!parts[0].trim().equals("v1")) return null;
        Map<String, String> f = new HashMap<>();
        for (int i = 1; i < parts.length; i++) {
            String p = parts[i].trim();
            int eq = p.indexOf('=');
            if (eq > 0) f.put(p.substring(0, eq), p.substring(eq + 1));
        }
        String t = f.get("t"), h = f.get("h"), s = f.get("s");
        if (t == null || h == null || s == null || !t.matches("[0-9]{1,18}")) return null;
        if (Math.abs(System.currentTimeMillis() / 1000 - Long.parseLong(t)) > window) return null;
        StringBuilder msg = new StringBuilder("v1\n").append(t).append('\n');
        Set<String> names = new HashSet<>();
        for (String name : h.split(" ")) {
            String value = header.apply(name);
            if (value == null) return null;
            msg.append(name).append(':').append(value).append('\n');
            names.add(name.toLowerCase(java.util.Locale.ROOT));
        }
        byte[] ours;
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(key, "HmacSHA256"));
            ours = mac.doFinal(msg.toString().getBytes(StandardCharsets.ISO_8859_1));
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException("HmacSHA256 unavailable", e);
        }
        StringBuilder hex = new StringBuilder(64);
        for (byte b : ours) hex.append(Character.forDigit((b >> 4) & 15, 16)).append(Character.forDigit(b & 15, 16));
        boolean same = MessageDigest.isEqual(hex.toString().getBytes(StandardCharsets.US_ASCII),
            s.getBytes(StandardCharsets.US_ASCII));
        return same ? names : null;
    }

    // ---------------------------------------------------------------- JSON

    /** Compact, ASCII-only JSON: every character outside 0x20-0x7E is written \\uXXXX (a character
     *  beyond U+FFFF as its surrogate pair). Throws IllegalArgumentException for a value that JSON
     *  cannot hold (NaN, a map key that is not a String, a lone surrogate, another type). */
    public static String toJson(Object value) {
        StringBuilder b = new StringBuilder();
        writeValue(b, value, 0);
        return b.toString();
    }

    /** Parses one JSON value (RFC 8259), see the mapping at the top of this file. Throws
     *  IllegalArgumentException on malformed input. */
    public static Object parseJson(String text) {
        Parser p = new Parser(text);
        p.ws();
        Object v = p.value(0);
        p.ws();
        if (p.i != text.length()) throw p.error("trailing characters");
        return v;
    }

    private static final int MAX_DEPTH = 512;

    private static void writeValue(StringBuilder b, Object v, int depth) {
        if (depth > MAX_DEPTH) throw new IllegalArgumentException("JSON nested too deep (or a cycle)");
        if (v == null) {
            b.append("null");
        } else if (v instanceof String || v instanceof Character) {
            writeString(b, v.toString());
        } else if (v instanceof Boolean) {
            b.append(v.toString());
        } else if (v instanceof Long || v instanceof Integer || v instanceof Short
                || v instanceof Byte || v instanceof BigInteger) {
            b.append(v.toString());
        } else if (v instanceof BigDecimal) {
            b.append(v.toString());
        } else if (v instanceof Double || v instanceof Float) {
            double d = ((Number) v).doubleValue();
            if (Double.isNaN(d) || Double.isInfinite(d)) throw new IllegalArgumentException("JSON has no " + d);
            b.append(v.toString());
        } else if (v instanceof Map) {
            b.append('{');
            boolean first = true;
            for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
                if (!(e.getKey() instanceof String)) {
                    throw new IllegalArgumentException("JSON object keys must be strings: " + e.getKey());
                }
                if (!first) b.append(',');
                first = false;
                writeString(b, (String) e.getKey());
                b.append(':');
                writeValue(b, e.getValue(), depth + 1);
            }
            b.append('}');
        } else if (v instanceof Iterable || v instanceof Object[]) {
            Iterable<?> items = v instanceof Object[] ? java.util.Arrays.asList((Object[]) v) : (Iterable<?>) v;
            b.append('[');
            boolean first = true;
            for (Object item : items) {
                if (!first) b.append(',');
                first = false;
                writeValue(b, item, depth + 1);
            }
            b.append(']');
        } else {
            throw new IllegalArgumentException("no JSON form for " + v.getClass().getName());
        }
    }

    private static void writeString(StringBuilder b, String s) {
        b.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                case '\b': b.append("\\b"); break;
                case '\f': b.append("\\f"); break;
                default:
                    if (c >= 0x20 && c < 0x7f) {
                        b.append(c);
                    } else {
                        if (Character.isHighSurrogate(c)) {
                            if (i + 1 >= s.length() || !Character.isLowSurrogate(s.charAt(i + 1))) {
                                throw new IllegalArgumentException("lone surrogate in string");
                            }
                            unicodeEscape(b, c);
                            c = s.charAt(++i);
                        } else if (Character.isLowSurrogate(c)) {
                            throw new IllegalArgumentException("lone surrogate in string");
                        }
                        unicodeEscape(b, c);
                    }
            }
        }
        b.append('"');
    }

    private static void unicodeEscape(StringBuilder b, char c) {
        b.append("\\u");
        for (int shift = 12; shift >= 0; shift -= 4) b.append(Character.forDigit((c >> shift) & 15, 16));
    }

    private static final class Parser {
        final String s;
        int i;

        Parser(String s) { this.s = s; }

        IllegalArgumentException error(String what) {
            return new IllegalArgumentException("malformed JSON: " + what + " at offset " + i);
        }

        void ws() {
            while (i < s.length()) {
                char c = s.charAt(i);
                if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
                i++;
            }
        }

        Object value(int depth) {
            if (depth > MAX_DEPTH) throw error("nested too deep");
            if (i >= s.length()) throw error("unexpected end");
            char c = s.charAt(i);
            switch (c) {
                case '{': return object(depth);
                case '[': return array(depth);
                case '"': return string();
                case 't': return literal("true", Boolean.TRUE);
                case 'f': return literal("false", Boolean.FALSE);
                case 'n': return literal("null", null);
                default:
                    if (c == '-' || (c >= '0' && c <= '9')) return number();
                    throw error("unexpected character");
            }
        }

        Object literal(String word, Object v) {
            if (!s.startsWith(word, i)) throw error("unexpected character");
            i += word.length();
            return v;
        }

        Map<String, Object> object(int depth) {
            Map<String, Object> m = new LinkedHashMap<>();
            i++;
            ws();
            if (i < s.length() && s.charAt(i) == '}') { i++; return m; }
            while (true) {
                ws();
                if (i >= s.length() || s.charAt(i) != '"') throw error("expected a string key");
                String k = string();
                ws();
                if (i >= s.length() || s.charAt(i) != ':') throw error("expected ':'");
                i++;
                ws();
                m.put(k, value(depth + 1));
                ws();
                if (i >= s.length()) throw error("unexpected end");
                char c = s.charAt(i++);
                if (c == '}') return m;
                if (c != ',') { i--; throw error("expected ',' or '}'"); }
            }
        }

        List<Object> array(int depth) {
            List<Object> a = new ArrayList<>();
            i++;
            ws();
            if (i < s.length() && s.charAt(i) == ']') { i++; return a; }
            while (true) {
                ws();
                a.add(value(depth + 1));
                ws();
                if (i >= s.length()) throw error("unexpected end");
                char c = s.charAt(i++);
                if (c == ']') return a;
                if (c != ',') { i--; throw error("expected ',' or ']'"); }
            }
        }

        String string() {
            StringBuilder b = new StringBuilder();
            i++;
            while (true) {
                if (i >= s.length()) throw error("unterminated string");
                char c = s.charAt(i++);
                if (c == '"') return b.toString();
                if (c < 0x20) { i--; throw error("control character in string"); }
                if (c != '\\') { b.append(c); continue; }
                if (i >= s.length()) throw error("unterminated string");
                char e = s.charAt(i++);
                switch (e) {
                    case '"': b.append('"'); break;
                    case '\\': b.append('\\'); break;
                    case '/': b.append('/'); break;
                    case 'b': b.append('\b'); break;
                    case 'f': b.append('\f'); break;
                    case 'n': b.append('\n'); break;
                    case 'r': b.append('\r'); break;
                    case 't': b.append('\t'); break;
                    case 'u':
                        // UTF-16 code units: a surrogate pair (\\ud83d\\ude00) becomes the two
                        // chars of one supplementary character, as Java strings hold it.
                        if (i + 4 > s.length()) throw error("short \\u escape");
                        int cp = 0;
                        for (int k = 0; k < 4; k++) {
                            int d = Character.digit(s.charAt(i++), 16);
                            if (d < 0) { i--; throw error("bad \\u escape"); }
                            cp = cp * 16 + d;
                        }
                        b.append((char) cp);
                        break;
                    default:
                        i--;
                        throw error("bad escape");
                }
            }
        }

        Object number() {
            int start = i;
            boolean integer = true;
            if (s.charAt(i) == '-') i++;
            if (i < s.length() && s.charAt(i) == '0') {
                i++;
            } else if (i < s.length() && s.charAt(i) >= '1' && s.charAt(i) <= '9') {
                digits();
            } else {
                throw error("bad number");
            }
            if (i < s.length() && s.charAt(i) == '.') {
                integer = false;
                i++;
                if (digits() == 0) throw error("bad number");
            }
            if (i < s.length() && (s.charAt(i) == 'e' || s.charAt(i) == 'E')) {
                integer = false;
                i++;
                if (i < s.length() && (s.charAt(i) == '+' || s.charAt(i) == '-')) i++;
                if (digits() == 0) throw error("bad number");
            }
            String text = s.substring(start, i);
            return integer ? normalize(new BigInteger(text)) : new BigDecimal(text);
        }

        int digits() {
            int n = 0;
            while (i < s.length() && s.charAt(i) >= '0' && s.charAt(i) <= '9') { i++; n++; }
            return n;
        }
    }

    // ---------------------------------------------------------------- small things

    private static Object normalize(BigInteger n) {
        return n.bitLength() <= 63 ? (Object) n.longValue() : n;
    }

    // The value as a BigInteger when it is a JSON integer, else null.
    private static BigInteger integer(Object v) {
        if (v instanceof BigInteger) return (BigInteger) v;
        if (v instanceof Long || v instanceof Integer || v instanceof Short || v instanceof Byte) {
            return BigInteger.valueOf(((Number) v).longValue());
        }
        return null;
    }

    private static void requireKey(String key) {
        if (key == null) throw new IllegalArgumentException("session key is null");
    }

    private static String trim(String s) { return s == null ? null : s.trim(); }

    private static Map.Entry<String, String> entry(String name, String value) {
        return new AbstractMap.SimpleImmutableEntry<>(name, value);
    }

    /** HTML-escapes text for an element or a quoted attribute. */
    public static String escapeHtml(String text) {
        StringBuilder b = new StringBuilder(text.length());
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            switch (c) {
                case '&': b.append("&amp;"); break;
                case '<': b.append("&lt;"); break;
                case '>': b.append("&gt;"); break;
                case '"': b.append("&quot;"); break;
                case '\'': b.append("&#x27;"); break;
                default: b.append(c);
            }
        }
        return b.toString();
    }
}
