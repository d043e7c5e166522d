package SidecarSession;

# Sessions from session-sidecar for Perl CGI scripts (and anything else that sees the request
# headers as CGI variables, HTTP_X_SESSION and so on). Copy this one file next to your script;
# it needs only modules that ship with Perl (JSON::PP, Digest::SHA, Math::BigInt).
#
#   use lib '/path/to/dir/of/this/file';
#   use SidecarSession;
#   my $s = SidecarSession->new(key => $ENV{SIDECAR_SIGNING_KEY} || undef);   # '' would die
#   if (!$s->trusted) { print "Status: 403 Forbidden\r\n\r\n"; exit }
#   my $n = $s->get('visits', 0) + 1;
#   $s->incr('visits');
#   print "Status: 200 OK\r\n", "Content-Type: text/plain\r\n", $s->header_lines, "\r\n";
#   print "visit $n\n";
#
# The header contract is docs/HEADERS.md, the signature docs/SIGNING.md.
#
# Perl and CGI traps this file takes care of, or that the caller must:
# - CGI: the response headers are the lines the script prints before the first empty line.
#   Print $s->header_lines together with Status and Content-Type, before the empty line and
#   before any byte of the body; after that they are body text. Make every change first.
# - CGI: a header value must not hold a line break, or it ends the header (header injection).
#   JSON escapes line breaks; set_subject and set_expiry refuse values that are not safe.
# - Perl scalars carry no type: JSON::PP writes 12 when the scalar was last used as a number
#   and "12" when it is a string (a query parameter, a regex capture). Store 0 + $x for a
#   number and "$x" for a string. incr() checks its argument and always writes a JSON integer.
# - Perl numbers beyond 64 bits become floats (1.23456789012346e+22). X-Session is decoded
#   with allow_bignum, so big integers arrive as Math::BigInt objects, and incr() sums with
#   Math::BigInt: an integer of any size stays exact.
# - Strings: X-Session is decoded to Perl character strings. Give set() character strings
#   too (utf8::decode a UTF-8 form field first), and encode the page you print
#   (utf8::encode). Headers are written ASCII-only (\uXXXX), as a header value must be.
# - lighttpd, Apache and others start CGI scripts with an environment of their own: pass
#   SIDECAR_SIGNING_KEY through explicitly (lighttpd: setenv.add-environment; Apache:
#   PassEnv). Without a key no signature is checked, so check that it arrives. An empty key
#   is refused (new() dies): anyone can sign with it. Pass undef to check nothing.
# - Header order: lighttpd passes the script's headers on in the order printed, but a server
#   or proxy between the app and the sidecar may not (Python's waitress sorts them by name, so
#   X-Session-Incr would arrive before X-Session-Set), and the sidecar applies the data headers
#   name by name in the order each name first arrives. So this file never puts one key in two
#   data headers: it keeps at most one pending operation per key, composed here (see incr and
#   append below), and what it sends means the same in any header order.

use strict;
use warnings;
use Carp qw(croak);
use Digest::SHA qw(hmac_sha256_hex);
use JSON::PP ();
use Math::BigInt;

our $VERSION = '1.0';

my $PREFIX = 'X-Session';

# Decoding keeps integers of any size exact (Math::BigInt) and numbers such as 1.10 as
# Math::BigFloat only when they do not fit a Perl number.
my $JSON_IN = JSON::PP->new->allow_bignum;
# Encoding: compact (JSON::PP's default), ASCII only, keys sorted, Math::BigInt as digits.
my $JSON_OUT = JSON::PP->new->ascii->canonical->allow_bignum->allow_nonref;

sub new {
    my ($class, %opt) = @_;
    my $env = $opt{env} || \%ENV;
    my $key = $opt{key};
    my $window = defined $opt{window} ? $opt{window} : 60;
    my $self = bless {
        env => $env,
        trusted => 1,
        signed => undef,    # names the signature covers (lower case), when a key is given
        data => {},
        status => 'new',
        expiry_age => undef,
        subject => undef,
        csrf_token => undef,
        id => undef,
        # pending data changes: at most one per key, key => [op, value], op one of
        # set, delete, incr (the sum), append (the items); keys in the order first changed
        pending => {}, order => [],
        flush => 0, cycle => 0, new_subject => undef, expiry => undef, revoke => undef,
    }, $class;
    if (defined $key) {
        # An empty key is a configuration mistake, and anyone can sign with it.
        croak 'SidecarSession: the signing key is empty (pass undef to check nothing)'
            unless length $key;
        my $signed = _signature_ok($env, $key, $window);
        if (!$signed) {
            $self->{trusted} = 0;
            return $self;    # untrusted: empty session, status new, no subject
        }
        $self->{signed} = { map { $_ => 1 } @$signed };
    }
    my $raw = $self->_header($PREFIX);
    if (defined $raw) {
        my $data = eval { $JSON_IN->decode($raw) };
        $self->{data} = $data if ref $data eq 'HASH';
    }
    my $status = $self->_header("$PREFIX-Status");
    $self->{status} = 'existing' if defined $status && $status eq 'existing';
    my $age = $self->_header("$PREFIX-Expiry-Age");
    $self->{expiry_age} = 0 + $age if defined $age && $age =~ /\A[0-9]{1,15}\z/;
    $self->{subject} = $self->_header("$PREFIX-Subject");
    $self->{csrf_token} = $self->_header("$PREFIX-Csrf");
    $self->{id} = $self->_header("$PREFIX-Id");
    return $self;
}

# A request header as CGI passes it (X-Session-Status -> HTTP_X_SESSION_STATUS). With a key,
# only the headers the signature covers count.
sub _header {
    my ($self, $name) = @_;
    return undef if $self->{signed} && !$self->{signed}{ lc $name };
    return $self->{env}{ 'HTTP_' . uc($name =~ tr/-/_/r) };
}

# docs/SIGNING.md's check, taking the environment as a hash; returns the signed names or undef.
sub _signature_ok {
    my ($env, $key, $window) = @_;
    my @parts = map { s/^\s+|\s+$//gr } split /;/, ($env->{HTTP_X_SESSION_SIGNATURE} // '');
    return undef unless @parts && shift(@parts) eq 'v1';
    my %f = map { split /=/, $_, 2 } grep { /=/ } @parts;
    return undef unless defined $f{t} && defined $f{h} && defined $f{s} && $f{t} =~ /^\d+$/;
    return undef if abs(time() - $f{t}) > $window;
    my $msg = "v1\n$f{t}\n";
    my @names = split / /, $f{h};
    for my $name (@names) {
        my $value = $env->{ 'HTTP_' . uc($name =~ tr/-/_/r) };
        return undef unless defined $value;
        $msg .= "$name:$value\n";
    }
    my $mac = hmac_sha256_hex($msg, $key);
    return undef unless length($mac) == length($f{s});
    my $diff = 0;
    $diff |= ord(substr($mac, $_, 1)) ^ ord(substr($f{s}, $_, 1)) for 0 .. length($mac) - 1;
    return $diff == 0 ? [ map { lc } @names ] : undef;
}

# --- reading -------------------------------------------------------------------------------

sub trusted    { $_[0]{trusted} }
sub data       { $_[0]{data} }          # the local view: a hash ref; change it with set() etc.
sub status     { $_[0]{status} }        # 'new' or 'existing'
sub is_new     { $_[0]{status} ne 'existing' }
sub expiry_age { $_[0]{expiry_age} }    # seconds, or undef
sub subject    { $_[0]{subject} }       # undef when untagged
sub csrf_token { $_[0]{csrf_token} }
sub id         { $_[0]{id} }

sub get {
    my ($self, $key, $default) = @_;
    return exists $self->{data}{$key} ? $self->{data}{$key} : $default;
}

sub csrf_field {
    my ($self) = @_;
    my $token = $self->{csrf_token};
    return '' unless defined $token && length $token;
    my %esc = ('&' => '&amp;', '<' => '&lt;', '>' => '&gt;', '"' => '&quot;', "'" => '&#39;');
    $token =~ s/([&<>"'])/$esc{$1}/g;
    return qq{<input type="hidden" name="csrfmiddlewaretoken" value="$token">};
}

# --- changing ------------------------------------------------------------------------------

# One pending operation per key (see "Header order" above): set and delete replace whatever
# was pending; incr and append compose with what is pending.
sub _pending {
    my ($self, $key, $op, $value) = @_;
    push @{ $self->{order} }, $key unless exists $self->{pending}{$key};
    $self->{pending}{$key} = [ $op, $value ];
}

sub _pending_op {
    my ($self, $key) = @_;
    return exists $self->{pending}{$key} ? $self->{pending}{$key}[0] : '';
}

sub set {
    my ($self, $key, $value) = @_;
    $self->_pending($key, set => $value);
    $self->{data}{$key} = $value;
    return $self;
}

sub delete {
    my ($self, $key) = @_;
    $self->_pending($key, delete => undef);
    CORE::delete $self->{data}{$key};
    return $self;
}

sub _is_int {
    my ($v) = @_;
    return 1 if ref $v && eval { $v->isa('Math::BigInt') };
    return defined $v && !ref $v && $v =~ /\A-?[0-9]+\z/;
}

# An integer as JSON::PP should write it: a plain number when it fits, else a Math::BigInt.
sub _int_out {
    my ($big) = @_;
    my $digits = "$big";
    return length($digits) <= 15 ? 0 + $digits : Math::BigInt->new($digits);
}

# Adds the integer $n (default 1) to the integer at $key, a missing key counting as 0. Sent as
# X-Session-Incr (atomic in the store: concurrent requests all count), or, after a set or a
# delete of $key in this request, as an X-Session-Set of the result, which is known then.
sub incr {
    my ($self, $key, $n) = @_;
    $n = 1 unless defined $n;
    croak "incr($key): not an integer: $n" unless _is_int($n);
    my $op = $self->_pending_op($key);
    croak "incr($key): append($key) is pending, the value is a list" if $op eq 'append';
    my $current = exists $self->{data}{$key} ? $self->{data}{$key} : 0;
    croak "incr($key): the stored value is not an integer" unless _is_int($current);
    my $result = _int_out(Math::BigInt->new("$current")->badd(Math::BigInt->new("$n")));
    if ($op eq 'set' || $op eq 'delete') {
        $self->_pending($key, set => $result);
    } else {
        my $sum = Math::BigInt->new($op eq 'incr' ? "$self->{pending}{$key}[1]" : 0)
            ->badd(Math::BigInt->new("$n"));
        $self->_pending($key, incr => $sum);
    }
    $self->{data}{$key} = $result;
    return $result;
}

# Appends $item to the list at $key, a missing key starting an empty list. Sent as
# X-Session-Append (atomic in the store: two tabs adding to one cart both keep their item),
# or, after a set or a delete of $key in this request, as an X-Session-Set of the whole list.
sub append {
    my ($self, $key, $item) = @_;
    my $op = $self->_pending_op($key);
    croak "append($key): incr($key) is pending, the value is an integer" if $op eq 'incr';
    my $current = exists $self->{data}{$key} ? $self->{data}{$key} : [];
    croak "append($key): the stored value is not a list" unless ref $current eq 'ARRAY';
    if ($op eq 'set' || $op eq 'delete') {
        $self->_pending($key, set => [ @$current, $item ]);
    } elsif ($op eq 'append') {
        push @{ $self->{pending}{$key}[1] }, $item;
    } else {
        $self->_pending($key, append => [$item]);
    }
    $self->{data}{$key} = [ @$current, $item ];
    return $self;
}

sub _drop_data {
    my ($self) = @_;
    $self->{pending} = {};    # data before a flush belongs to the old session
    $self->{order} = [];
    $self->{data} = {};
    $self->{new_subject} = undef;    # the tag goes with the old session
    $self->{expiry} = undef;
    $self->{subject} = undef;
}

# Logout: the old session ends; what is set afterwards goes into a fresh one.
sub flush {
    my ($self) = @_;
    if (defined $self->{revoke}) {
        # After revoke_others: the others, then this one, is all of them (X-Session-Revoke:
        # all ends this session too). A Flush beside Revoke: others would end the others of the
        # fresh session's subject, which has none.
        $self->revoke_all;
    } else {
        $self->_drop_data;
        $self->{flush} = 1;
    }
    $self
}

# Login: the same data under a new key.
sub cycle { my ($self) = @_; $self->{cycle} = 1; $self }

sub set_subject {
    my ($self, $subject) = @_;
    $subject = '' unless defined $subject;
    croak 'set_subject: 1-200 visible ASCII characters, or "" to remove'
        unless $subject =~ /\A[\x21-\x7e]{0,200}\z/;
    # The sidecar revokes with the subject the session has at the end of the answer: a tag
    # after a revoke would change whose sessions end. Tag first, or in the next request.
    croak 'set_subject after revoke_others/revoke_all: tag the session first'
        if defined $self->{revoke};
    $self->{new_subject} = $subject;
    $self->{subject} = length $subject ? $subject : undef;
    return $self;
}

# Seconds of inactivity (> 0), 0 (until the browser closes), 'default', an RFC 3339
# timestamp string, or a Time::Piece (written in UTC).
sub set_expiry {
    my ($self, $when) = @_;
    my $value;
    if (ref $when && eval { $when->isa('Time::Piece') }) {
        $value = Time::Piece::gmtime($when->epoch)->datetime . 'Z';    # the same instant, in UTC
    } elsif (defined $when && !ref $when && $when =~ /\A[0-9]{1,12}\z/) {
        $value = 0 + $when;
    } elsif (defined $when && !ref $when && lc $when eq 'default') {
        $value = 'default';
    } elsif (defined $when && !ref $when
        && $when =~ /\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})\z/) {
        $value = $when;
    } else {
        croak 'set_expiry: seconds, 0, "default" or an RFC 3339 timestamp';
    }
    $self->{expiry} = $value;
    return $self;
}

# After a password change: end the subject's other sessions. Applied once the rest of the
# response is stored, with the subject the session has then.
sub revoke_others { my ($self) = @_; $self->{revoke} //= 'others'; $self }

# Logout everywhere: end all the subject's sessions, this one too; what is set afterwards
# goes into a fresh, untagged session.
sub revoke_all {
    my ($self) = @_;
    # A subject set earlier in this request names whose sessions end (the sidecar reads it so
    # beside Revoke: all, and leaves the fresh session untagged).
    my $named = $self->{new_subject};
    $self->_drop_data;
    $self->{new_subject} = $named;
    $self->{revoke} = 'all';
    $self
}

# --- emitting ------------------------------------------------------------------------------

sub _json {
    my ($value) = @_;
    my $text = $JSON_OUT->encode($value);
    $text =~ s/\x7f/\\u007f/g;    # DEL is ASCII but not allowed in a header value
    return $text;
}

# The response headers to add, as a list of [name, value] pairs. No key is in two data
# headers, so the order of X-Session-Set, -Delete, -Incr and -Append does not matter.
sub headers {
    my ($self) = @_;
    my @h;
    my %by_op = (set => [], delete => [], incr => [], append => []);
    push @{ $by_op{ $self->{pending}{$_}[0] } }, $_ for @{ $self->{order} };
    my $p = $self->{pending};
    my @set = @{ $by_op{set} };
    push @h, [ "$PREFIX-Set", _json({ map { $_ => $p->{$_}[1] } @set }) ] if @set;
    my @del = @{ $by_op{delete} };
    push @h, [ "$PREFIX-Delete", _json([@del]) ] if @del;
    my @incr = @{ $by_op{incr} };
    push @h, [ "$PREFIX-Incr", _json({ map { $_ => _int_out($p->{$_}[1]) } @incr }) ] if @incr;
    my @app = @{ $by_op{append} };
    push @h, [ "$PREFIX-Append", _json({ map { $_ => $p->{$_}[1] } @app }) ] if @app;
    push @h, [ "$PREFIX-Flush", '1' ] if $self->{flush};
    push @h, [ "$PREFIX-Cycle", '1' ] if $self->{cycle};
    push @h, [ "$PREFIX-Subject", $self->{new_subject} ] if defined $self->{new_subject};
    push @h, [ "$PREFIX-Expiry", "$self->{expiry}" ] if defined $self->{expiry};
    push @h, [ "$PREFIX-Revoke", $self->{revoke} ] if defined $self->{revoke};
    return @h;
}

# The same as CGI header lines ("Name: value\r\n" each), to print before the empty line.
sub header_lines {
    my ($self) = @_;
    return join '', map { "$_->[0]: $_->[1]\r\n" } $self->headers;
}

1;
