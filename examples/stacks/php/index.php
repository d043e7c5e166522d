<?php
// The example app behind session-sidecar, for every PHP stack (mod_php under Apache, PHP's
// built-in server): one front controller for every path. Its session lives in the sidecar; the
// app reads it from request headers and answers changes in response headers, through the
// helper in helpers/php/.
require __DIR__ . '/../../../helpers/php/SidecarSession.php';

// The key shared with the sidecar ([security] upstream_signing_key). Under Apache it reaches
// PHP through `PassEnv SIDECAR_SIGNING_KEY` (then in $_SERVER and getenv()); the built-in
// server inherits the environment. Unset or empty: no signature check.
$key = getenv('SIDECAR_SIGNING_KEY');
$s = new SidecarSession(signingKey: is_string($key) && $key !== '' ? $key : null);

function answer(SidecarSession $s, string $body, int $code = 200, string $type = 'text/plain; charset=utf-8'): void
{
    http_response_code($code);
    header('Content-Type: ' . $type);
    $s->send();   // the session headers, before the first byte of the body
    echo $body;
}

if (!$s->trusted) {
    // Nothing of the request's session is trusted, and nothing is changed.
    answer($s, "forged session headers refused\n", 403);
    return;
}

$method = $_SERVER['REQUEST_METHOD'];
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
$get = ['GET', 'HEAD'];
$allowed = match ($path) {
    '/password' => ['POST'],
    '/form' => ['GET', 'HEAD', 'POST'],
    '/', '/cart/add', '/cart', '/login', '/whoami', '/logout', '/logout-everywhere',
    '/test-cookie', '/expiry', '/status', '/big', '/big/size', '/sequence', '/sequence/check' => $get,
    default => null,
};
if ($allowed === null) {
    answer($s, "not found\n", 404);
    return;
}
if (!in_array($method, $allowed, true)) {
    header('Allow: ' . implode(', ', $allowed));
    answer($s, "method not allowed\n", 405);
    return;
}
$q = fn(string $name): string => is_string($_GET[$name] ?? null) ? $_GET[$name] : '';

switch ($path) {
    case '/':
        $visits = $s->get('visits', 0) + 1;
        $s->incr('visits');   // X-Session-Incr: concurrent visits all count
        answer($s, "You have visited this page $visits time" . ($visits === 1 ? '' : 's') . ".\n");
        break;

    case '/cart/add':
        $item = $q('item');
        $s->append('cart', $item);   // X-Session-Append: two tabs adding at once keep both
        answer($s, "added $item\n");
        break;

    case '/cart':
        answer($s, 'cart: ' . implode(',', $s->get('cart', [])) . "\n");
        break;

    case '/login':
        $user = $q('user');
        $s->cycle();   // a new key: no session fixation
        $s->setSubject($user);
        $s->set('user', $user);
        answer($s, "logged in as $user\n");
        break;

    case '/whoami':
        $body = 'user: ' . $s->get('user', 'anonymous') . "\n" . 'subject: ' . ($s->subject ?? 'none') . "\n";
        if ($s->has('flash')) {
            $body .= 'flash: ' . $s->get('flash') . "\n";
            $s->delete('flash');   // shown once
        }
        answer($s, $body);
        break;

    case '/logout':
        $s->flush();
        $s->set('flash', 'You have been logged out.');   // in the fresh session
        answer($s, "logged out\n");
        break;

    case '/password':
        // Django's update_session_auth_hash: the other devices are logged out, this one stays
        // under a new key.
        $s->revokeOthers();
        $s->cycle();
        answer($s, "password changed\n");
        break;

    case '/logout-everywhere':
        $s->revokeAll();
        $s->set('flash', 'You were logged out everywhere.');
        answer($s, "logged out everywhere\n");
        break;

    case '/test-cookie':
        if (!$s->isNew() && $s->has('testcookie')) {
            $s->delete('testcookie');
            answer($s, "cookies work\n");
        } else {
            $s->set('testcookie', 'worked');
            answer($s, "test cookie set\n");
        }
        break;

    case '/form':
        if ($method === 'POST') {
            // The sidecar has already checked csrfmiddlewaretoken (or X-CSRF-Token).
            $comment = is_string($_POST['comment'] ?? null) ? $_POST['comment'] : '';
            $s->set('comment', $comment);
            answer($s, "form accepted: $comment\n");
        } else {
            answer($s, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Comment</title></head><body>\n"
                . "<form method=\"post\" action=\"/form\">\n"
                . $s->csrfField() . "\n"
                . "<input type=\"text\" name=\"comment\">\n"
                . "<button type=\"submit\">Send</button>\n"
                . "</form>\n</body></html>\n", 200, 'text/html; charset=utf-8');
        }
        break;

    case '/expiry':
        $seconds = $q('seconds');
        if (!ctype_digit($seconds) && $seconds !== 'default') {
            answer($s, "expiry: seconds, 0 or default\n", 400);
            break;
        }
        $s->setExpiry($seconds === 'default' ? 'default' : (int) $seconds);
        $s->set('expiry', $seconds);
        answer($s, "expiry: $seconds\n");
        break;

    case '/status':
        $keys = array_map('strval', array_keys($s->data()));
        sort($keys, SORT_STRING);
        answer($s, "status: $s->status\nexpiry-age: " . ($s->expiryAge ?? 'none') . "\nkeys: " . implode(',', $keys) . "\n");
        break;

    case '/big':
        $bytes = (int) $q('bytes');
        $s->set('big', str_repeat('x', max(0, $bytes)));
        answer($s, "stored $bytes\n");
        break;

    case '/big/size':
        answer($s, 'big: ' . strlen((string) $s->get('big', '')) . "\n");
        break;

    case '/sequence':
        // Calls on the same keys in one request: the session ends as the calls say in this
        // order, whatever order a server sends the headers in.
        $s->set('n', 10);
        $s->incr('n', 5);
        $s->delete('seq');
        $s->append('seq', 'a');
        $s->append('seq', 'b');
        $s->set('gone', 1);
        $s->delete('gone');
        answer($s, "sequence done\n");
        break;

    case '/sequence/check':
        $gone = $s->has('gone') ? json_encode($s->get('gone')) : 'none';
        answer($s, 'n: ' . $s->get('n') . "\nseq: " . implode(',', $s->get('seq', [])) . "\ngone: $gone\n");
        break;
}
