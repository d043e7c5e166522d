#!/usr/bin/perl
# The example app as one Perl CGI script, run by lighttpd's mod_cgi (see lighttpd.conf.in:
# every path is rewritten to /app.cgi/PATH, so the page is PATH_INFO). One process per request,
# as CGI is: nothing is shared between requests but what the sidecar keeps in the session.
use strict;
use warnings;
use FindBin ();
use lib "$FindBin::RealBin/../../../helpers/perl";
use SidecarSession;

binmode STDOUT;
binmode STDIN;

# lighttpd starts CGI scripts with its own environment: SIDECAR_SIGNING_KEY is there only
# because lighttpd.conf passes it (setenv.add-environment). Unset or empty: no key, nothing
# checked (the helper refuses an empty key), and a line on stderr, which mod_cgi hands to
# lighttpd's own stderr (not server.errorlog), once per request.
my $key = $ENV{SIDECAR_SIGNING_KEY};
if (!defined $key || $key eq '') {
    print STDERR "app.cgi: SIDECAR_SIGNING_KEY is not set: session headers are not checked\n";
    $key = undef;
}
my $s = SidecarSession->new(key => $key, window => 60);

# Headers first, then the empty line, then the body: whatever is printed before the empty
# line is a header to lighttpd, and a session header printed after it would be page text.
sub respond {
    my ($status, $type, $body, @extra) = @_;
    utf8::encode($body);
    print "Status: $status\r\n", "Content-Type: $type\r\n";
    print "$_->[0]: $_->[1]\r\n" for @extra;
    print $s->header_lines if $status =~ /^2/;    # only a page that succeeded changes the session
    print "\r\n";
    print $body unless ($ENV{REQUEST_METHOD} // '') eq 'HEAD';
    exit 0;
}

sub text { respond('200 OK', 'text/plain; charset=utf-8', join('', map { "$_\n" } @_)) }

# application/x-www-form-urlencoded, as characters (UTF-8 decoded).
sub parse_form {
    my ($raw) = @_;
    my %f;
    for my $pair (split /[&;]/, $raw // '') {
        my ($k, $v) = split /=/, $pair, 2;
        next unless defined $k && length $k;
        for ($k, $v) {
            $_ = '' unless defined;
            tr/+/ /;
            s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
            utf8::decode($_);
        }
        $f{$k} = $v unless exists $f{$k};
    }
    return \%f;
}

if (!$s->trusted) {
    respond('403 Forbidden', 'text/plain; charset=utf-8', "forged session headers refused\n");
}

my $method = $ENV{REQUEST_METHOD} // 'GET';
my $path = $ENV{PATH_INFO} // '/';
$path = '/' if $path eq '';
my $query = parse_form($ENV{QUERY_STRING});
my $read = $method eq 'GET' || $method eq 'HEAD';

if ($path eq '/' && $read) {
    my $n = $s->get('visits', 0) + 1;
    $s->incr('visits');
    text("You have visited this page $n " . ($n == 1 ? 'time.' : 'times.'));
}
if ($path eq '/cart/add' && $read) {
    my $item = $query->{item} // '';
    $s->append(cart => "$item");
    text("added $item");
}
if ($path eq '/cart' && $read) {
    my $cart = $s->get('cart', []);
    text('cart: ' . join(',', ref $cart eq 'ARRAY' ? @$cart : ()));
}
if ($path eq '/login' && $read) {
    my $user = $query->{user} // '';
    $s->cycle;
    $s->set_subject($user);
    $s->set(user => "$user");
    text("logged in as $user");
}
if ($path eq '/whoami' && $read) {
    my @lines = ('user: ' . ($s->get('user') // 'anonymous'), 'subject: ' . ($s->subject // 'none'));
    my $flash = $s->get('flash');
    if (defined $flash) {
        push @lines, "flash: $flash";
        $s->delete('flash');
    }
    text(@lines);
}
if ($path eq '/logout' && $read) {
    $s->flush;
    $s->set(flash => 'You have been logged out.');
    text('logged out');
}
if ($path eq '/password' && $method eq 'POST') {
    $s->revoke_others;
    $s->cycle;
    text('password changed');
}
if ($path eq '/logout-everywhere' && $read) {
    $s->revoke_all;
    $s->set(flash => 'You were logged out everywhere.');
    text('logged out everywhere');
}
if ($path eq '/test-cookie' && $read) {
    if ($s->status eq 'existing' && exists $s->data->{testcookie}) {
        $s->delete('testcookie');
        text('cookies work');
    }
    $s->set(testcookie => 'worked');
    text('test cookie set');
}
if ($path eq '/form' && $read) {
    respond('200 OK', 'text/html; charset=utf-8', <<"HTML");
<!DOCTYPE html>
<html><head><title>Comment</title></head><body>
<form method="post" action="/form">
@{[ $s->csrf_field ]}
<input type="text" name="comment">
<button type="submit">Send</button>
</form>
</body></html>
HTML
}
if ($path eq '/form' && $method eq 'POST') {
    my $body = '';
    my $len = $ENV{CONTENT_LENGTH} // 0;
    while ($len > length $body) {
        my $got = read(STDIN, $body, $len - length $body, length $body);
        last unless $got;
    }
    my $comment = parse_form($body)->{comment} // '';
    $s->set(comment => "$comment");
    text("form accepted: $comment");
}
if ($path eq '/expiry' && $read) {
    my $seconds = $query->{seconds} // '';
    $s->set_expiry($seconds);    # croaks (500) on anything but N, 0, default, a timestamp
    $s->set(expiry => "$seconds");
    text("expiry: $seconds");
}
if ($path eq '/status' && $read) {
    text('status: ' . $s->status, 'expiry-age: ' . ($s->expiry_age // 'none'),
        'keys: ' . join(',', sort keys %{ $s->data }));
}
if ($path eq '/big' && $read) {
    my $bytes = $query->{bytes} // '';
    $bytes = 0 unless $bytes =~ /\A[0-9]{1,7}\z/;
    $s->set(big => 'x' x $bytes);
    text("stored $bytes");
}
if ($path eq '/big/size' && $read) {
    my $big = $s->get('big', '');
    text('big: ' . length $big);
}
if ($path eq '/sequence' && $read) {
    # Calls on the same keys in one request: the session ends as these calls say, whatever
    # order the headers reach the sidecar in (the helper never puts one key in two headers).
    $s->set(n => 10);
    $s->incr(n => 5);
    $s->delete('seq');
    $s->append(seq => 'a');
    $s->append(seq => 'b');
    $s->set(gone => 1);
    $s->delete('gone');
    text('sequence done');
}
if ($path eq '/sequence/check' && $read) {
    my $seq = $s->get('seq', []);
    text('n: ' . ($s->get('n') // 'none'), 'seq: ' . join(',', ref $seq eq 'ARRAY' ? @$seq : ()),
        'gone: ' . ($s->get('gone') // 'none'));
}
my %known = map { $_ => 1 } qw(/ /cart/add /cart /login /whoami /logout /password /logout-everywhere
    /test-cookie /form /expiry /status /big /big/size /sequence /sequence/check);
if ($known{$path}) {
    respond('405 Method Not Allowed', 'text/plain; charset=utf-8', "method not allowed\n",
        [ Allow => $path eq '/password' ? 'POST' : $path eq '/form' ? 'GET, HEAD, POST' : 'GET, HEAD' ]);
}
respond('404 Not Found', 'text/plain; charset=utf-8', "not found\n");
