<?php
/**
 * SidecarSession: Django-style sessions for a PHP app behind session-sidecar.
 *
 * One file, standard library only (json, hash): copy it into your app and require it.
 * Works under mod_php, PHP-FPM and PHP's built-in server: it reads the request headers from
 * $_SERVER (HTTP_X_SESSION, ...) and answers with response headers (docs/HEADERS.md), under the
 * sidecar's default header_prefix, X-Session.
 *
 *     require __DIR__ . '/SidecarSession.php';
 *     $s = new SidecarSession(signingKey: getenv('SIDECAR_SIGNING_KEY') ?: null);
 *     if (!$s->trusted) { http_response_code(403); exit("forged session headers refused\n"); }
 *     $n = $s->get('visits', 0) + 1;
 *     $s->incr('visits');
 *     $s->send();                      // BEFORE the first byte of output
 *     echo "You have visited this page $n times.\n";
 *
 * PHP traps this file deals with (each is explained where it is handled):
 *  - headers only before output: send() checks headers_sent() and throws, naming the file and
 *    line where output started, instead of letting PHP drop the headers with a mere warning;
 *  - header() replaces by name: send() removes its own names first, then adds each once, so
 *    calling it twice sends the latest state, never a stale or doubled header;
 *  - json_encode: non-ASCII must be \uXXXX (never JSON_UNESCAPED_UNICODE), 1.0 must stay 1.0
 *    (JSON_PRESERVE_ZERO_FRACTION), a PHP array with keys 0..n-1 is a JSON list, so the top
 *    level of Set/Incr/Append is always written as an object by hand; invalid UTF-8, NAN and
 *    INF throw (JSON_THROW_ON_ERROR) rather than sending a broken header;
 *  - json_decode: integers beyond PHP_INT_MAX are read as their exact digits in a string
 *    (JSON_BIGINT_AS_STRING), never as a silently rounded float; a JSON object is read as an
 *    associative array, so an empty nested {} reads as [] (write (object) [] to store {});
 *  - $_SERVER names: X-Session and X_Session are both HTTP_X_SESSION. The sidecar removes every
 *    spelling a client sends, and with a signing key the value read is the one the sidecar
 *    signed, so the spelling cannot be used to slip in a value;
 *  - the order of response headers is not the app's to decide: PHP and Apache keep it, but a
 *    proxy or server between the app and the sidecar may not (Python's waitress sorts headers
 *    by name), and the sidecar applies X-Session-Set, -Delete, -Incr and -Append name by name
 *    in the order it meets them. So no key is ever in two of these headers: per key at most one
 *    operation is pending, composed locally (set then incr 5 goes out as one Set of the sum,
 *    delete then append as one Set of the one-item list), and the answer means the same in any
 *    header order. See headers().
 */
final class SidecarSession
{
    /** False when a signing key was given and the request's X-Session-Signature does not verify:
     *  then data, status, subject and the rest read as absent (a new, empty, anonymous visitor).
     *  True when it verifies, or when no key was given (the app then trusts its network). */
    public readonly bool $trusted;
    /** "new" or "existing" (X-Session-Status), as the sidecar sent it. */
    public readonly string $status;
    /** Seconds until the session expires (X-Session-Expiry-Age), or null. */
    public readonly ?int $expiryAge;
    /** The subject the session is tagged with (X-Session-Subject), or null. */
    public readonly ?string $subject;
    /** The CSRF token to put in forms (X-Session-Csrf), or null. */
    public readonly ?string $csrfToken;
    /** The session key (X-Session-Id, only with expose_id = true), or null. */
    public readonly ?string $id;

    private const JSON_OUT = JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR;
    private const JSON_IN = JSON_BIGINT_AS_STRING | JSON_THROW_ON_ERROR;
    private const NAMES = ['X-Session-Set', 'X-Session-Delete', 'X-Session-Incr', 'X-Session-Append',
        'X-Session-Flush', 'X-Session-Cycle', 'X-Session-Subject', 'X-Session-Expiry', 'X-Session-Revoke'];

    // The pending data operations. A key is in at most one of $sets, $deletes, $incrs and
    // $appends (see headers()).
    private array $data = [];
    private array $sets = [];      // key => value
    private array $exact = [];     // key => true: $sets[key] is an integer beyond PHP_INT_MAX, as
                                   // digits, written as a JSON number (an incr composed onto a set)
    private array $deletes = [];   // key => true
    private array $incrs = [];     // key => int (the sum)
    private array $appends = [];   // key => list of items, in call order
    private bool $flush = false;
    private bool $cycle = false;
    private ?string $newSubject = null;   // null: unchanged; "": remove the tag
    private ?string $expiry = null;
    private ?string $revoke = null;       // null, "others" or "all"

    /**
     * @param array|null  $server     the request's $_SERVER (default: $_SERVER)
     * @param string|null $signingKey the sidecar's [security] upstream_signing_key, or null
     * @param int         $window     seconds the signature's time may differ from ours
     */
    public function __construct(?array $server = null, ?string $signingKey = null, int $window = 60)
    {
        $server ??= $_SERVER;
        if ($signingKey === '') {
            throw new InvalidArgumentException('SidecarSession: empty signing key (pass null for none)');
        }
        $signed = null;   // the header names the signature covers; null: no key, trust them all
        if ($signingKey !== null) {
            $signed = self::verify($server, $signingKey, $window);
        }
        $this->trusted = $signingKey === null || $signed !== null;
        // Only the headers the sidecar signed are read: one added beside a replayed signature
        // (X-Session-Subject: admin) is ignored.
        $read = function (string $name) use ($server, $signed): ?string {
            if (!$this->trusted || ($signed !== null && !in_array($name, $signed, true))) {
                return null;
            }
            $value = $server[self::var($name)] ?? null;
            return is_string($value) ? $value : null;
        };
        $raw = $read('x-session');
        if ($raw !== null && $raw !== '') {
            $data = json_decode($raw, true, 512, self::JSON_IN);
            if (!is_array($data) || ltrim($raw)[0] !== '{') {
                throw new UnexpectedValueException('SidecarSession: X-Session is not a JSON object');
            }
            $this->data = $data;
        }
        $this->status = $read('x-session-status') === 'existing' ? 'existing' : 'new';
        $age = $read('x-session-expiry-age');
        $this->expiryAge = $age !== null && ctype_digit($age) ? (int) $age : null;
        $subject = $read('x-session-subject');
        $this->subject = $subject !== null && $subject !== '' ? $subject : null;
        $this->csrfToken = $read('x-session-csrf');
        $this->id = $read('x-session-id');
    }

    /** The $_SERVER name PHP gives a request header: HTTP_, upper case, '-' as '_'. */
    private static function var(string $name): string
    {
        return 'HTTP_' . strtoupper(str_replace('-', '_', $name));
    }

    /**
     * docs/SIGNING.md's check, returning the names signed (null when it fails), so that only
     * those headers are trusted.
     */
    private static function verify(array $server, string $key, int $window): ?array
    {
        $parts = array_map('trim', explode(';', (string) ($server['HTTP_X_SESSION_SIGNATURE'] ?? '')));
        if (array_shift($parts) !== 'v1') return null;
        $f = [];
        foreach ($parts as $p) { [$k, $v] = array_pad(explode('=', $p, 2), 2, ''); $f[$k] = $v; }
        if (!isset($f['t'], $f['h'], $f['s']) || !ctype_digit($f['t'])) return null;
        if (abs(time() - (int) $f['t']) > $window) return null;
        $names = explode(' ', $f['h']);
        $msg = "v1\n" . $f['t'] . "\n";
        foreach ($names as $name) {
            $var = self::var($name);
            if (!isset($server[$var]) || !is_string($server[$var])) return null;
            $msg .= $name . ':' . $server[$var] . "\n";
        }
        return hash_equals(hash_hmac('sha256', $msg, $key), $f['s']) ? $names : null;
    }

    // ---- reading ---------------------------------------------------------------------------

    /** The session's data as this request sees it (changes made in this request included). */
    public function data(): array
    {
        return $this->data;
    }

    public function get(string $key, mixed $default = null): mixed
    {
        return array_key_exists($key, $this->data) ? $this->data[$key] : $default;
    }

    public function has(string $key): bool
    {
        return array_key_exists($key, $this->data);
    }

    public function isNew(): bool
    {
        return $this->status === 'new';
    }

    // ---- changing --------------------------------------------------------------------------

    public function set(string $key, mixed $value): void
    {
        self::encode($value);   // throws now, at the call, for a value JSON cannot carry
        $this->dropPending($key);
        $this->sets[$key] = $value;
        $this->data[$key] = $value;
    }

    public function delete(string $key): void
    {
        $this->dropPending($key);
        $this->deletes[$key] = true;
        unset($this->data[$key]);
    }

    /**
     * Adds $by to the integer at $key (a missing key counts as 0), atomically in the store:
     * concurrent requests all count. Integers only: the sidecar refuses anything else (502).
     * After a set() or delete() of $key in this request the result is known here, and it goes
     * out as one X-Session-Set of that result instead (see headers()).
     */
    public function incr(string $key, mixed $by = 1): void
    {
        if (!is_int($by)) {   // not `int $by`: PHP would quietly turn 1.5 or "2" into an int
            throw new InvalidArgumentException('SidecarSession::incr(): the increment must be an int');
        }
        $known = array_key_exists($key, $this->sets) || isset($this->deletes[$key]);   // the value is ours
        $current = array_key_exists($key, $this->data) ? $this->data[$key] : 0;
        if (is_int($current)) {
            $sum = $current + $by;   // PHP turns an overflowing sum into a float: go exact instead
            $value = is_int($sum) ? $sum : self::addDigits((string) $current, (string) $by);
        } elseif (self::isBigInt($current) && (!$known || isset($this->exact[$key]))) {
            // Digits read from the store (JSON_BIGINT_AS_STRING) or composed here; a string the
            // app set() is a string in the store too, and the sidecar would refuse to add to it.
            $value = self::addDigits($current, (string) $by);
        } else {
            throw new LogicException("SidecarSession::incr(): '$key' does not hold an integer");
        }
        if ($known) {
            $this->dropPending($key);
            $this->sets[$key] = $value;
            if (is_string($value)) {
                $this->exact[$key] = true;
            }
        } else {
            $pending = ($this->incrs[$key] ?? 0) + $by;
            if (!is_int($pending)) {
                throw new OverflowException("SidecarSession::incr(): the increments of '$key' overflow");
            }
            $this->incrs[$key] = $pending;
        }
        $this->data[$key] = $value;
    }

    /**
     * Appends $item to the list at $key (a missing key starts one), atomically in the store.
     * After a set() or delete() of $key in this request the list is known here, and it goes out
     * as one X-Session-Set of the whole list instead (see headers()).
     */
    public function append(string $key, mixed $item): void
    {
        self::encode($item);
        $current = $this->data[$key] ?? [];
        if (!is_array($current) || !array_is_list($current)) {
            throw new LogicException("SidecarSession::append(): '$key' does not hold a list");
        }
        $current[] = $item;
        if (array_key_exists($key, $this->sets) || isset($this->deletes[$key])) {
            $this->dropPending($key);
            $this->sets[$key] = $current;
        } else {
            $this->appends[$key][] = $item;
        }
        $this->data[$key] = $current;
    }

    /** Forgets what is pending for $key, before one new operation on it takes its place. */
    private function dropPending(string $key): void
    {
        unset($this->sets[$key], $this->exact[$key], $this->deletes[$key], $this->incrs[$key], $this->appends[$key]);
    }

    /** Logout: the session ends; what is set after this goes into a fresh one. */
    public function flush(): void
    {
        if ($this->revoke === 'others') {
            // The others, then this one: all of them. A subject set earlier in this request
            // names whose sessions end; the fresh session stays untagged.
            $this->revoke = 'all';
        }
        $this->dropData();
        $this->flush = true;
    }

    /** Login: same data under a new key (session fixation). */
    public function cycle(): void
    {
        $this->cycle = true;
    }

    /** Tags the session with a subject (1 to 200 visible ASCII characters); "" removes the tag. */
    public function setSubject(string $subject): void
    {
        if ($subject !== '' && !preg_match('/\A[\x21-\x7e]{1,200}\z/', $subject)) {
            throw new InvalidArgumentException('SidecarSession::setSubject(): 1 to 200 visible ASCII characters');
        }
        if ($this->revoke === 'all') {
            throw new LogicException('SidecarSession::setSubject() after revokeAll() cannot be said in one answer');
        }
        $this->newSubject = $subject;
    }

    /**
     * Django's set_expiry: seconds of inactivity (> 0), 0 (until the browser closes), a
     * DateTimeInterface (at that instant), or "default" (back to the sidecar's policy).
     */
    public function setExpiry(int|string|DateTimeInterface $when): void
    {
        if ($when instanceof DateTimeInterface) {
            $value = DateTimeImmutable::createFromInterface($when)
                ->setTimezone(new DateTimeZone('UTC'))->format('Y-m-d\TH:i:s\Z');
        } elseif (is_int($when) && $when >= 0) {
            $value = (string) $when;
        } elseif ($when === 'default') {
            $value = 'default';
        } else {
            throw new InvalidArgumentException('SidecarSession::setExpiry(): seconds >= 0, a DateTimeInterface or "default"');
        }
        $this->expiry = $value;
    }

    /** Ends every other session of this session's subject (after a password change). */
    public function revokeOthers(): void
    {
        if ($this->revoke !== 'all') {
            $this->revoke = 'others';
        }
    }

    /** Ends every session of this session's subject, this one too; what is set after this goes
     *  into a fresh, untagged session. */
    public function revokeAll(): void
    {
        $this->dropData();
        $this->revoke = 'all';
    }

    private function dropData(): void
    {
        $this->sets = $this->exact = $this->deletes = $this->incrs = $this->appends = [];
        $this->data = [];
        $this->newSubject = null;   // the tag goes with the session
        $this->expiry = null;       // and so does its expiry (as in Django)
    }

    // ---- answering -------------------------------------------------------------------------

    /**
     * The response headers for the changes made so far, as [name, value] pairs: Set, Delete,
     * Incr, Append, Flush, Cycle, Subject, Expiry, Revoke, but any order means the same.
     *
     * The sidecar applies Flush and Cycle first and Revoke last whatever the order, but the
     * four data headers name by name in the order it meets them, and between the app and the
     * sidecar a server or proxy may reorder headers (waitress sorts them by name: Incr before
     * Set). So the calls are composed per key into at most one pending operation, and no key
     * is in two data headers:
     *  - set() or delete() replaces whatever was pending for the key;
     *  - incr() after a set() or delete() of the key is a set of the result (the set's value +
     *    n, or n), after an incr() one incr of the sum; append() after a set() or delete() is a
     *    set of the whole list (that list + [x], or [x]), after an append() one append of the
     *    items in call order; incr() on a list and append() on an integer throw;
     *  - flush() and revokeAll() drop everything pending (what follows fills the fresh session).
     * Only a lone incr() or append() of a key reaches the store as Incr or Append, and stays
     * atomic against concurrent requests; once the request set or deleted the key, its value
     * is the request's anyway.
     */
    public function headers(): array
    {
        $out = [];
        if ($this->sets) $out[] = ['X-Session-Set', self::object($this->sets, $this->exact)];
        if ($this->deletes) {
            $out[] = ['X-Session-Delete', json_encode(array_map('strval', array_keys($this->deletes)), self::JSON_OUT)];
        }
        if ($this->incrs) $out[] = ['X-Session-Incr', self::object($this->incrs)];
        if ($this->appends) $out[] = ['X-Session-Append', self::object($this->appends)];
        if ($this->flush) $out[] = ['X-Session-Flush', '1'];
        if ($this->cycle) $out[] = ['X-Session-Cycle', '1'];
        if ($this->newSubject !== null) $out[] = ['X-Session-Subject', $this->newSubject];
        if ($this->expiry !== null) $out[] = ['X-Session-Expiry', $this->expiry];
        if ($this->revoke !== null) $out[] = ['X-Session-Revoke', $this->revoke];
        return $out;
    }

    /**
     * Adds headers() to the response with header(). Call it before any output: once a byte of
     * the body has gone out, PHP only warns and drops the headers, and the session change would
     * be lost without a trace, so this throws instead. (With output_buffering = 4096, the php.ini
     * default, a late call works until the page outgrows the buffer: do not rely on it.)
     * Calling it again replaces what an earlier call sent.
     */
    public function send(): void
    {
        if (headers_sent($file, $line)) {
            throw new LogicException("SidecarSession::send(): output already started at $file:$line, "
                . 'so the session headers cannot be sent; call send() before any output');
        }
        foreach (self::NAMES as $name) {
            header_remove($name);
        }
        foreach ($this->headers() as [$name, $value]) {
            // header() refuses a value holding a line break; ours are one line of visible ASCII.
            // An empty value (setSubject('')) goes out as "X-Session-Subject:", which is valid.
            header("$name: $value", false);
        }
    }

    /** The hidden form field carrying the CSRF token ("" when there is no token). */
    public function csrfField(): string
    {
        if ($this->csrfToken === null || $this->csrfToken === '') {
            return '';
        }
        $token = htmlspecialchars($this->csrfToken, ENT_QUOTES | ENT_SUBSTITUTE | ENT_HTML5, 'UTF-8');
        return '<input type="hidden" name="csrfmiddlewaretoken" value="' . $token . '">';
    }

    // ---- JSON ------------------------------------------------------------------------------

    /** Compact, ASCII-only JSON (json_encode escapes non-ASCII as \uXXXX unless told not to). */
    private static function encode(mixed $value): string
    {
        return json_encode($value, self::JSON_OUT);
    }

    /**
     * A JSON object whatever the keys: ["0" => 1] would otherwise be written [1]. The values of
     * the keys in $digits are integers held as digits, written as they are: a JSON number.
     */
    private static function object(array $map, array $digits = []): string
    {
        $members = [];
        foreach ($map as $key => $value) {
            $members[] = self::encode((string) $key) . ':' . (isset($digits[$key]) ? $value : self::encode($value));
        }
        return '{' . implode(',', $members) . '}';
    }

    /** A string JSON_BIGINT_AS_STRING made of an integer too large for PHP's int. */
    private static function isBigInt(mixed $value): bool
    {
        return is_string($value) && preg_match('/\A-?[1-9][0-9]*\z/', $value)
            && filter_var($value, FILTER_VALIDATE_INT) === false;
    }

    /** Exact sum of two decimal integers given as strings, in plain digits. */
    private static function addDigits(string $a, string $b): string
    {
        $neg = fn(string $x) => $x !== '' && $x[0] === '-';
        $abs = fn(string $x) => ltrim($neg($x) ? substr($x, 1) : $x, '0');
        $cmp = fn(string $x, string $y) => strlen($x) <=> strlen($y) ?: strcmp($x, $y);
        [$na, $nb, $xa, $xb] = [$neg($a), $neg($b), $abs($a), $abs($b)];
        if ($na === $nb) {
            [$out, $carry] = ['', 0];
            for ($i = strlen($xa) - 1, $j = strlen($xb) - 1; $i >= 0 || $j >= 0 || $carry; $i--, $j--) {
                $d = ($i >= 0 ? (int) $xa[$i] : 0) + ($j >= 0 ? (int) $xb[$j] : 0) + $carry;
                $out = ($d % 10) . $out;
                $carry = intdiv($d, 10);
            }
            $sign = $na;
        } else {
            if ($cmp($xa, $xb) < 0) { [$xa, $xb, $na] = [$xb, $xa, $nb]; }
            [$out, $borrow] = ['', 0];
            for ($i = strlen($xa) - 1, $j = strlen($xb) - 1; $i >= 0; $i--, $j--) {
                $d = (int) $xa[$i] - ($j >= 0 ? (int) $xb[$j] : 0) - $borrow;
                $borrow = $d < 0 ? 1 : 0;
                $out = ($d + 10 * $borrow) . $out;
            }
            $sign = $na;
        }
        $out = ltrim($out, '0');
        if ($out === '') return '0';
        return ($sign ? '-' : '') . $out;
    }
}
