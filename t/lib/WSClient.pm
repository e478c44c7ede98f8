package WSClient;

# A small raw WebSocket (RFC 6455) client for tests, over IO::Socket::INET.
#
#   my $c = WSClient->connect(port => $p, path => '/ws?room=a&nick=bob',
#                             welcome => 1);   # also wait for the welcome event
#   $c->send_text("héllo");                    # Perl character string
#   my $ev = $c->wait_for(sub { $_[0]{type} eq 'message' }, 5);
#
# Everything read goes through one buffer, so frames split over several TCP
# reads and several frames in one read are both handled. Every read is bounded
# by a timeout.
#
# permessage-deflate (RFC 7692, no context takeover): connect(deflate => 1)
# offers it (extensions => [...] sends other offers, one header line each).
# When the 101 agrees (->deflate_agreed), messages whose first frame has
# RSV1 are inflated as they arrive and their events carry _compressed => 1
# and _wire (the compressed bytes as received); an RSV1 message on a
# connection that agreed to nothing keeps its bytes (and fails JSON).
# send_compressed sends one compressed message; deflate_payload and
# inflate_payload are the codec, for tests that build frames themselves.

use strict;
use warnings;

use IO::Socket::INET ();
use IO::Select ();
use Socket qw(SOL_SOCKET SO_LINGER SO_RCVBUF inet_aton pack_sockaddr_in);
use Digest::SHA qw(sha1);
use MIME::Base64 qw(encode_base64 decode_base64);
use JSON::PP ();
use Time::HiRes qw(time);
use Carp qw(croak);
use Compress::Raw::Zlib ();

$SIG{PIPE} = 'IGNORE';

our $GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
my $JSON = JSON::PP->new->utf8;

sub accept_for {
    my $key = shift;
    return encode_base64(sha1($key . $GUID), '');
}

sub _random_bytes {
    my $n = shift;
    my $b = '';
    if (open my $fh, '<:raw', '/dev/urandom') {
        read $fh, $b, $n;
        close $fh;
    }
    $b .= chr(int rand 256) while length $b < $n;
    return $b;
}

sub _socket {
    my ($port, $timeout, $host, $rcvbuf) = @_;
    my $s;
    if (defined $rcvbuf) {
        # SO_RCVBUF must be set before connect() to limit the TCP window.
        $s = IO::Socket::INET->new(Proto => 'tcp')
            or croak "WSClient: socket: $!";
        setsockopt($s, SOL_SOCKET, SO_RCVBUF, pack('i', $rcvbuf))
            or croak "WSClient: setsockopt SO_RCVBUF: $!";
        my $addr = inet_aton($host // '127.0.0.1')
            or croak "WSClient: bad host " . ($host // '127.0.0.1');
        $s->connect(pack_sockaddr_in($port, $addr))
            or croak "WSClient: cannot connect to 127.0.0.1:$port: $!";
    } else {
        $s = IO::Socket::INET->new(PeerAddr => $host // '127.0.0.1', PeerPort => $port,
                                   Proto => 'tcp', Timeout => $timeout // 5)
            or croak "WSClient: cannot connect to 127.0.0.1:$port: $!";
    }
    binmode $s;
    $s->autoflush(1);
    return $s;
}

# TLS over an connected socket (option tls => 1); the test's certificate is
# self-signed, so it is not verified.
sub _start_tls {
    my ($sock, $timeout) = @_;
    require IO::Socket::SSL;
    IO::Socket::SSL->start_SSL($sock,
        SSL_verify_mode => 0, SSL_hostname => 'localhost', Timeout => $timeout // 5)
        or croak "WSClient: TLS handshake failed: " . IO::Socket::SSL::errstr();
    return $sock;
}

sub _write_all {
    my ($sock, $data, $timeout) = @_;
    my $deadline = time + ($timeout // 5);
    my $off = 0;
    my $sel = IO::Select->new($sock);
    while ($off < length $data) {
        my $left = $deadline - time;
        return 0 if $left <= 0 || !$sel->can_write($left);
        my $n = syswrite($sock, $data, length($data) - $off, $off);
        return 0 unless defined $n;    # EPIPE, ECONNRESET...
        $off += $n;
    }
    return 1;
}

# Read until the end of the HTTP response head (or EOF / timeout).
# Returns ($head, $rest) where $head is undef if no complete head arrived.
sub _read_head {
    my ($sock, $timeout) = @_;
    my $deadline = time + $timeout;
    my $sel = IO::Select->new($sock);
    my $buf = '';
    while (1) {
        my $i = index($buf, "\r\n\r\n");
        return (substr($buf, 0, $i + 4), substr($buf, $i + 4)) if $i >= 0;
        my $left = $deadline - time;
        return (undef, $buf) if $left <= 0 || !$sel->can_read($left);
        my $n = sysread($sock, $buf, 65536, length $buf);
        return (undef, $buf) unless $n;
    }
}

# Parse a response head: (status, {lower-case name => value}). Repeated
# headers are joined with ", ".
sub _parse_head {
    my $head = shift;
    my @lines = split /\r\n/, $head;
    my $status_line = shift @lines // '';
    my ($status) = $status_line =~ m{^HTTP/\d\.\d\s+(\d{3})};
    my %h;
    for my $l (@lines) {
        next unless $l =~ /^([^:\s]+)\s*:\s*(.*?)\s*$/;
        my $k = lc $1;
        $h{$k} = exists $h{$k} ? "$h{$k}, $2" : $2;
    }
    return ($status, \%h);
}

# One plain HTTP/1.0 request (nginx closes after the answer, so the body
# ends at EOF): http_request(port => P, path => '/status', method => 'GET',
# headers => {...}, body => '...', sock => an already connected socket).
# Returns {status, headers (lower-case names), body} or undef.
sub http_request {
    my (%o) = @_;
    my $method = $o{method} // 'GET';
    my $s = $o{sock} // IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $o{port},
                                              Proto => 'tcp', Timeout => 5);
    return undef unless $s;
    binmode $s;
    my %h = (Host => "127.0.0.1:$o{port}", %{ $o{headers} // {} });
    $h{'Content-Length'} = length($o{body} // '') if defined $o{body} || $method eq 'POST';
    my $req = "$method $o{path} HTTP/1.0\r\n"
            . join('', map { "$_: $h{$_}\r\n" } sort keys %h) . "\r\n" . ($o{body} // '');
    return undef unless _write_all($s, $req, 5);
    my ($buf, $deadline, $sel) = ('', time + 5, IO::Select->new($s));
    while (1) {
        my $left = $deadline - time;
        last if $left <= 0 || !$sel->can_read($left);
        my $n = sysread($s, $buf, 65536, length $buf);
        last unless $n;
    }
    close $s;
    my $i = index($buf, "\r\n\r\n");
    return undef if $i < 0;
    my ($status, $hdr) = _parse_head(substr($buf, 0, $i + 4));
    return { status => $status, headers => $hdr, body => substr($buf, $i + 4) };
}

# Send a raw request; returns (status, headers hashref, raw response, socket).
# The raw response holds the head plus whatever body arrived (the body is
# read up to Content-Length when present). status is undef without response.
sub raw_handshake {
    my ($port, $request, $timeout) = @_;
    $timeout //= 5;
    my $sock = _socket($port, $timeout);
    _write_all($sock, $request, $timeout);
    my ($head, $rest) = _read_head($sock, $timeout);
    return (undef, {}, $rest, $sock) unless defined $head;
    my ($status, $h) = _parse_head($head);
    if (defined $h->{'content-length'} && $h->{'content-length'} =~ /^\d+$/) {
        my $want = $h->{'content-length'};
        my $deadline = time + $timeout;
        my $sel = IO::Select->new($sock);
        while (length $rest < $want) {
            my $left = $deadline - time;
            last if $left <= 0 || !$sel->can_read($left);
            my $n = sysread($sock, $rest, 65536, length $rest);
            last unless $n;
        }
    }
    return ($status, $h, $head . $rest, $sock);
}

# The text of an opening handshake request and the key it carries.
# %o: port (for Host), path ('/ws'), headers ({name => value}: replaces a
# default header of that name, case-insensitively; undef drops it),
# extra_headers ([[name => value], ...]: appended as they are, so a name
# may repeat).
sub handshake_request {
    my (%o) = @_;
    my $port = $o{port} // 0;
    my $path = $o{path} // '/ws';
    my $key = $o{key} // encode_base64(_random_bytes(16), '');
    my @hdr = (
        [Host                    => "127.0.0.1:$port"],
        [Upgrade                 => 'websocket'],
        [Connection              => 'Upgrade'],
        ['Sec-WebSocket-Key'     => $key],
        ['Sec-WebSocket-Version' => '13'],
    );
    for my $name (sort keys %{ $o{headers} // {} }) {
        my $v = $o{headers}{$name};
        @hdr = grep { lc $_->[0] ne lc $name } @hdr;
        push @hdr, [$name => $v] if defined $v;
    }
    push @hdr, @{ $o{extra_headers} // [] };
    my $req = "GET $path HTTP/1.1\r\n"
            . join('', map { "$_->[0]: $_->[1]\r\n" } @hdr) . "\r\n";
    return ($req, $key);
}

# The browsers' permessage-deflate offer.
our $DEFLATE_OFFER = 'permessage-deflate; client_max_window_bits';

# Options: port, path, timeout, headers, welcome, auto_pong, rcvbuf (bytes,
# SO_RCVBUF set on the socket before connect), deflate (offer
# $DEFLATE_OFFER), extensions ([offer, ...]: one Sec-WebSocket-Extensions
# line each, instead of deflate's).
sub connect {
    my ($class, %o) = @_;
    my $port    = $o{port} or croak 'WSClient->connect: port required';
    my $path    = $o{path} // '/ws';
    my $timeout = $o{timeout} // 5;
    my @offers  = @{ $o{extensions} // ($o{deflate} ? [$DEFLATE_OFFER] : []) };
    my ($req, $key) = handshake_request(port => $port, path => $path,
        headers => $o{headers},
        extra_headers => [map { ['Sec-WebSocket-Extensions' => $_] } @offers]);

    my $sock = _socket($port, $timeout, undef, $o{rcvbuf});
    $sock = _start_tls($sock, $timeout) if $o{tls};
    _write_all($sock, $req, $timeout) or croak "WSClient: cannot send handshake: $!";
    my ($head, $rest) = _read_head($sock, $timeout);
    croak "WSClient: no handshake response within ${timeout}s (got: '$rest')"
        unless defined $head;
    my ($status, $h) = _parse_head($head);
    croak "WSClient: handshake to $path failed: $head" unless ($status // 0) == 101;
    my $want = accept_for($key);
    croak "WSClient: bad Sec-WebSocket-Accept (want $want): $head"
        unless ($h->{'sec-websocket-accept'} // '') eq $want;

    my $self = bless {
        sock => $sock, buf => $rest, port => $port, path => $path,
        timeout => $timeout, headers => $h, events => [], skipped => [],
        auto_pong => $o{auto_pong} // 1, frag => undef,
        deflate => _agreed_window($h->{'sec-websocket-extensions'}),
    }, $class;

    if ($o{welcome}) {
        my $w = $self->wait_for(sub { $_[0]{type} eq 'welcome' }, $timeout);
        croak "WSClient: no welcome event within ${timeout}s on $path" unless $w;
        $self->{welcome} = $w;
    }
    return $self;
}

# The server's window bits (15 unless it said server_max_window_bits) when
# its Sec-WebSocket-Extensions agrees to permessage-deflate, else undef.
sub _agreed_window {
    my $ext = shift;
    return undef unless defined $ext && $ext =~ /^\s*permessage-deflate\s*(?:;|$)/i;
    return $ext =~ /server_max_window_bits\s*=\s*"?(\d+)/i ? 0 + $1 : 15;
}

# Join a chat room: connect to /ws?room=R&nick=N (each URL-encoded, omitted
# when undef) and wait for the welcome event.
sub join {
    my ($class, %o) = @_;
    my @q;
    push @q, 'room=' . uri_escape($o{room}) if defined $o{room};
    push @q, 'nick=' . uri_escape($o{nick}) if defined $o{nick};
    my $path = ($o{location} // '/ws') . (@q ? '?' . join('&', @q) : '');
    return $class->connect(%o, path => $path, welcome => 1);
}

# Percent-encode a Perl character string as UTF-8.
sub uri_escape {
    my $s = shift;
    utf8::encode($s);
    $s =~ s/([^A-Za-z0-9\-._~])/sprintf('%%%02X', ord $1)/ge;
    return $s;
}

sub welcome          { $_[0]{welcome} }
sub response_headers { $_[0]{headers} }
sub socket           { $_[0]{sock} }
sub close_code       { $_[0]{close_code} }
sub close_reason     { $_[0]{close_reason} }
sub got_close        { $_[0]{got_close} }
sub eof              { $_[0]{eof} }
sub events           { @{ $_[0]{events} } }     # every JSON event received so far
sub extensions       { $_[0]{headers}{'sec-websocket-extensions'} }  # the 101's, or undef
sub deflate_agreed   { defined $_[0]{deflate} }
sub deflate_window   { $_[0]{deflate} }          # server_max_window_bits agreed (15 if none)
sub pongs            { @{ $_[0]{pongs} // [] } } # payloads of the pongs recv_message passed
sub skipped          { @{ $_[0]{skipped} } }    # events passed over by wait_for

# ---------------------------------------------------------------- sending

# The bytes of one client frame. Options: opcode (1), payload (''), fin (1),
# mask (1), rsv (0..7, the three RSV bits), declared_len (length written in
# the header; defaults to the payload length), mask_key (4 bytes).
# Callable as a function or as a method.
sub frame_bytes {
    shift if @_ % 2;    # class or object
    my (%o) = @_;
    my $opcode  = $o{opcode} // 1;
    my $payload = $o{payload} // '';
    my $fin     = $o{fin} // 1;
    my $mask    = $o{mask} // 1;
    my $rsv     = $o{rsv} // 0;
    my $len     = $o{declared_len} // length $payload;

    my $frame = chr((($fin ? 1 : 0) << 7) | (($rsv & 7) << 4) | ($opcode & 0xf));
    my $mbit = $mask ? 0x80 : 0;
    if ($len < 126) {
        $frame .= chr($mbit | $len);
    } elsif ($len < 65536) {
        $frame .= chr($mbit | 126) . pack('n', $len);
    } else {
        $frame .= chr($mbit | 127) . pack('NN', int($len / 4294967296), $len % 4294967296);
    }
    if ($mask) {
        my $key = $o{mask_key} // _random_bytes(4);
        $frame .= $key;
        my $k = substr($key x (int(length($payload) / 4) + 1), 0, length $payload);
        $payload = $payload ^ $k;
    }
    return $frame . $payload;
}

sub send_frame {
    my ($self, %o) = @_;
    return _write_all($self->{sock}, frame_bytes(%o), $self->{timeout});
}

# Send raw bytes on the connection (e.g. a frame split in pieces).
sub send_raw { _write_all($_[0]{sock}, $_[1], $_[0]{timeout}) }

# $text is a Perl character string; it is sent UTF-8 encoded.
sub send_text {
    my ($self, $text) = @_;
    my $b = $text;
    utf8::encode($b);
    return $self->send_frame(opcode => 1, payload => $b);
}

# One message compressed (permessage-deflate) in one frame with RSV1, or in
# $o{fragments} frames (RSV1 on the first only). $text is a character string.
sub send_compressed {
    my ($self, $text, %o) = @_;
    my $b = $text;
    utf8::encode($b);
    my $c = deflate_payload($b);
    my $n = $o{fragments} // 1;
    my $size = int(length($c) / $n) || 1;
    my @parts = map { substr($c, $_ * $size, $_ == $n - 1 ? length($c) : $size) } 0 .. $n - 1;
    for my $i (0 .. $#parts) {
        $self->send_frame(opcode => $i ? 0 : 1, rsv => $i ? 0 : 4,
                          fin => $i == $#parts ? 1 : 0, payload => $parts[$i]) or return 0;
    }
    return 1;
}

# $bytes as a permessage-deflate message payload: raw deflate with a
# $window_bits (15) window, sync-flushed, the trailing 00 00 ff ff removed.
sub deflate_payload {
    my ($bytes, $window_bits) = @_;
    my ($d, $st) = Compress::Raw::Zlib::Deflate->new(
        -WindowBits => -($window_bits // 15), -AppendOutput => 1);
    croak "WSClient: deflateInit: $st" unless $d;
    my $out = '';
    $d->deflate($bytes, $out) == Compress::Raw::Zlib::Z_OK() or croak 'WSClient: deflate failed';
    $d->flush($out, Compress::Raw::Zlib::Z_SYNC_FLUSH()) == Compress::Raw::Zlib::Z_OK()
        or croak 'WSClient: deflate flush failed';
    $out =~ s/\x00\x00\xff\xff\z//;
    return $out;
}

# Inflate one message payload (00 00 ff ff put back) with a fresh raw
# inflater of $window_bits (15). With $o{window_only}, a decoder of our own
# that also fails on a back-reference farther than 2^$window_bits bytes:
# zlib cannot tell (it accepts any distance into what one call wrote), and
# that check shows the sender kept to the window. Returns the bytes, or
# undef if they do not inflate (the error is in $WSClient::INFLATE_ERROR).
our $INFLATE_ERROR;
sub inflate_payload {
    my ($data, $window_bits, %o) = @_;
    $window_bits //= 15;
    $INFLATE_ERROR = undef;
    my $in = $data . "\x00\x00\xff\xff";
    if ($o{window_only}) {
        my $out = eval { _inflate_within($in, 1 << $window_bits) };
        $INFLATE_ERROR = $@ =~ s/\n\z//r unless defined $out;
        return $out;
    }
    my ($i, $st) = Compress::Raw::Zlib::Inflate->new(
        -WindowBits => -$window_bits, -AppendOutput => 1, -ConsumeInput => 1);
    croak "WSClient: inflateInit: $st" unless $i;
    my $out = '';
    my $s = $i->inflate($in, $out);
    # A final block (BFINAL) ends the data; what follows is the tail (and
    # the RFC 7692 7.2.3.3 example puts one 00 octet before it).
    return $out if $s == Compress::Raw::Zlib::Z_OK() || $s == Compress::Raw::Zlib::Z_STREAM_END()
                || ($s == Compress::Raw::Zlib::Z_BUF_ERROR() && !length $in);
    $INFLATE_ERROR = "$s";
    return undef;
}

my @LBASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83,
             99, 115, 131, 163, 195, 227, 258);
my @LEXT  = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0);
my @DBASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769,
             1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577);
my @DEXT  = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11,
             12, 12, 13, 13);

# Raw deflate (RFC 1951) decoded in Perl, after zlib's "puff": dies on bad
# data and on a distance over $window. Ends at a final block or where the
# input ends between blocks.
sub _inflate_within {
    my ($data, $window) = @_;
    my @b = unpack 'C*', $data;
    my ($pos, $buf, $cnt, $out) = (0, 0, 0, '');
    my $bits = sub {
        my $need = shift;
        while ($cnt < $need) {
            die "compressed data ends inside a block\n" if $pos >= @b;
            $buf |= $b[$pos++] << $cnt;
            $cnt += 8;
        }
        my $v = $buf & ((1 << $need) - 1);
        $buf >>= $need;
        $cnt -= $need;
        return $v;
    };
    my $huffman = sub {    # code lengths by symbol -> [counts, symbols]
        my @count = (0) x 16;
        $count[$_]++ for @_;
        my @offs = (0, 0);
        $offs[$_ + 1] = $offs[$_] + $count[$_] for 1 .. 15;
        my @sym;
        for my $s (0 .. $#_) { $sym[ $offs[ $_[$s] ]++ ] = $s if $_[$s] }
        return [\@count, \@sym];
    };
    my $decode = sub {
        my ($count, $sym) = @{ $_[0] };
        my ($code, $first, $index) = (0, 0, 0);
        for my $len (1 .. 15) {
            $code |= $bits->(1);
            my $n = $count->[$len];
            return $sym->[ $index + $code - $first ] if $code - $first < $n;
            $index += $n;
            $first = ($first + $n) << 1;
            $code <<= 1;
        }
        die "invalid Huffman code\n";
    };
    my ($fixed_l, $fixed_d) = ($huffman->((8) x 144, (9) x 112, (7) x 24, (8) x 8),
                               $huffman->((5) x 30));
    while ($pos < @b) {
        my $last = $bits->(1);
        my $type = $bits->(2);
        if ($type == 0) {
            ($buf, $cnt) = (0, 0);
            die "compressed data ends inside a stored block\n" if $pos + 4 > @b;
            my ($len, $nlen) = unpack 'vv', pack('C4', @b[$pos .. $pos + 3]);
            die "stored block length does not match its complement\n" if $len != (~$nlen & 0xffff);
            $pos += 4;
            die "compressed data ends inside a stored block\n" if $pos + $len > @b;
            $out .= pack 'C*', @b[$pos .. $pos + $len - 1] if $len;
            $pos += $len;
        } elsif ($type == 3) {
            die "invalid block type\n";
        } else {
            my ($lc, $dc) = ($fixed_l, $fixed_d);
            if ($type == 2) {
                my ($nlen, $ndist, $ncode) = ($bits->(5) + 257, $bits->(5) + 1, $bits->(4) + 4);
                my @cl = (0) x 19;
                $cl[$_] = $bits->(3)
                    for (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)[0 .. $ncode - 1];
                my $clc = $huffman->(@cl);
                my @len;
                while (@len < $nlen + $ndist) {
                    my $sym = $decode->($clc);
                    if    ($sym < 16)  { push @len, $sym }
                    elsif ($sym == 16) { die "repeat with no length\n" unless @len;
                                         push @len, ($len[-1]) x (3 + $bits->(2)) }
                    elsif ($sym == 17) { push @len, (0) x (3 + $bits->(3)) }
                    else               { push @len, (0) x (11 + $bits->(7)) }
                }
                die "too many code lengths\n" if @len > $nlen + $ndist;
                ($lc, $dc) = ($huffman->(@len[0 .. $nlen - 1]), $huffman->(@len[$nlen .. $#len]));
            }
            while (1) {
                my $sym = $decode->($lc);
                last if $sym == 256;
                if ($sym < 256) { $out .= chr $sym; next }
                $sym -= 257;
                die "invalid length code\n" if $sym > 28;
                my $len = $LBASE[$sym] + $bits->($LEXT[$sym]);
                my $ds = $decode->($dc);
                die "invalid distance code\n" if $ds > 29;
                my $dist = $DBASE[$ds] + $bits->($DEXT[$ds]);
                die "distance $dist beyond the output\n" if $dist > length $out;
                die "distance $dist beyond a window of $window bytes\n" if $dist > $window;
                if ($dist >= $len) { $out .= substr($out, -$dist, $len) }
                else { $out .= substr($out, -$dist, 1) for 1 .. $len }
            }
        }
        last if $last;
    }
    return $out;
}

sub send_binary { $_[0]->send_frame(opcode => 2, payload => $_[1]) }
sub send_ping   { $_[0]->send_frame(opcode => 9, payload => $_[1] // '') }
sub send_pong   { $_[0]->send_frame(opcode => 10, payload => $_[1] // '') }

sub send_close {
    my ($self, $code, $reason) = @_;
    my $p = '';
    if (defined $code) {
        $p = pack('n', $code);
        if (defined $reason) { my $r = $reason; utf8::encode($r); $p .= $r }
    }
    $self->{sent_close} = 1;
    return $self->send_frame(opcode => 8, payload => $p);
}

# Close the TCP connection without a close frame. With rst => 1 the kernel
# sends a RST instead of a FIN.
sub disconnect {
    my ($self, %o) = @_;
    return unless $self->{sock};
    setsockopt($self->{sock}, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0)) if $o{rst};
    close $self->{sock};
    delete $self->{sock};
}

# ---------------------------------------------------------------- receiving

# Read more bytes into the buffer. Returns 1 on data, 0 on timeout, and
# undef on EOF or error (sets {eof}).
sub _fill {
    my ($self, $deadline) = @_;
    return undef unless $self->{sock};
    my $left = $deadline - time;
    return 0 if $left <= 0;
    my $sel = IO::Select->new($self->{sock});
    return 0 unless $sel->can_read($left);
    my $n = sysread($self->{sock}, $self->{buf}, 65536, length $self->{buf});
    if (!$n) {
        $self->{eof} = 1;
        $self->{read_error} = $! unless defined $n;
        return undef;
    }
    return 1;
}

# Take one complete frame off the front of $$buf: returns {fin, rsv,
# opcode, masked, payload[, close_code, close_reason]} (unmasked), or undef
# while it is incomplete. A plain function, for tests that read raw sockets.
sub parse_frame {
    my $b = shift;
    return undef if length $$b < 2;
    my ($b0, $b1) = unpack 'CC', $$b;
    my $len = $b1 & 0x7f;
    my $off = 2;
    if ($len == 126) {
        return undef if length $$b < 4;
        $len = unpack 'n', substr($$b, 2, 2);
        $off = 4;
    } elsif ($len == 127) {
        return undef if length $$b < 10;
        my ($hi, $lo) = unpack 'NN', substr($$b, 2, 8);
        $len = $hi * 4294967296 + $lo;
        $off = 10;
    }
    my $masked = $b1 & 0x80;
    my $key;
    if ($masked) {
        return undef if length $$b < $off + 4;
        $key = substr($$b, $off, 4);
        $off += 4;
    }
    return undef if length $$b < $off + $len;
    my $payload = substr($$b, $off, $len);
    substr($$b, 0, $off + $len, '');
    if ($masked) {
        $payload ^= substr($key x (int($len / 4) + 1), 0, $len);
    }
    my $f = { fin => ($b0 >> 7) & 1, rsv => ($b0 >> 4) & 7, opcode => $b0 & 0xf,
              masked => $masked ? 1 : 0, payload => $payload };
    if ($f->{opcode} == 8 && length $payload >= 2) {
        $f->{close_code}   = unpack 'n', $payload;
        $f->{close_reason} = substr($payload, 2);
    }
    return $f;
}

# The next frame off this client's buffer, noting a close frame.
sub _parse_frame {
    my $self = shift;
    my $f = parse_frame(\$self->{buf}) or return undef;
    if ($f->{opcode} == 8) {
        $self->{got_close}    = 1;
        $self->{close_code}   = $f->{close_code};
        $self->{close_reason} = $f->{close_reason};
    }
    return $f;
}

# Next frame as {opcode, payload, fin, rsv, masked[, close_code, close_reason]},
# or undef on timeout or EOF (check ->eof to tell them apart).
sub recv_frame {
    my ($self, $timeout) = @_;
    my $deadline = time + ($timeout // $self->{timeout});
    while (1) {
        my $f = $self->_parse_frame;
        return $f if $f;
        my $r = $self->_fill($deadline);
        return undef unless $r;
    }
}

# Next complete data message (fragments joined), answering pings and skipping
# pongs (their payloads are kept, see ->pongs). Returns {opcode, payload} for
# text/binary, the close frame itself when a close frame arrives, or undef on
# timeout/EOF. A message whose first frame had RSV1 also has compressed => 1
# and wire (its bytes as received); payload is then inflated when deflate
# was agreed (undef if that fails).
sub recv_message {
    my $self = shift;
    my $m = $self->_recv_message(@_);
    return $m unless $m && $m->{opcode} != 8 && ($m->{rsv} // 0) & 4;
    $m = { %$m, compressed => 1, wire => $m->{payload} };
    $m->{payload} = inflate_payload($m->{wire}, 15) if defined $self->{deflate};
    return $m;
}

sub _recv_message {
    my ($self, $timeout) = @_;
    my $deadline = time + ($timeout // $self->{timeout});
    while (1) {
        my $f = $self->recv_frame($deadline - time);
        return undef unless $f;
        my $op = $f->{opcode};
        if ($op == 9) {
            $self->send_pong($f->{payload}) if $self->{auto_pong};
            next;
        }
        if ($op == 10) {
            push @{ $self->{pongs} }, $f->{payload};
            next;
        }
        return $f if $op == 8;
        if ($op == 0) {
            next unless $self->{frag};    # stray continuation: ignore
            $self->{frag}{payload} .= $f->{payload};
            next unless $f->{fin};
            my $m = delete $self->{frag};
            return $m;
        }
        if (!$f->{fin}) {
            $self->{frag} = { opcode => $op, payload => $f->{payload}, fin => 1,
                              rsv => $f->{rsv} };
            next;
        }
        return $f;
    }
}

# Decoded JSON of the next text message. Returns undef on timeout, EOF or a
# close frame. A text message that is not JSON yields
# {type => '_invalid_json', raw => ...}, a binary one {type => '_binary', ...},
# so that assertions fail instead of the test dying.
sub recv_json {
    my ($self, $timeout) = @_;
    my $m = $self->recv_message($timeout);
    return undef unless $m;
    return undef if $m->{opcode} == 8;
    return $self->_record_event($m);
}

# Decode a data message into an event and append it to ->events.
sub _record_event {
    my ($self, $m) = @_;
    my $ev;
    if ($m->{opcode} == 2) {
        $ev = { type => '_binary', raw => $m->{payload} };
    } elsif (!defined $m->{payload}) {
        $ev = { type => '_invalid_deflate', error => $INFLATE_ERROR };
    } else {
        $ev = eval { $JSON->decode($m->{payload}) };
        $ev = { type => '_invalid_json', raw => $m->{payload}, error => "$@" }
            unless ref $ev eq 'HASH';
        $ev->{_raw} = $m->{payload};    # exact bytes as received (inflated)
    }
    if ($m->{compressed}) {
        $ev->{_compressed} = 1;
        $ev->{_wire} = $m->{wire};
    }
    push @{ $self->{events} }, $ev;
    return $ev;
}

# First event for which $pred->($event) is true, within $timeout seconds;
# events passed over are kept in ->skipped. undef on timeout/EOF/close.
sub wait_for {
    my ($self, $pred, $timeout) = @_;
    my $deadline = time + ($timeout // $self->{timeout});
    while (1) {
        my $left = $deadline - time;
        return undef if $left <= 0;
        my $ev = $self->recv_json($left);
        return undef unless $ev;
        local $_ = $ev;
        return $ev if $pred->($ev);
        push @{ $self->{skipped} }, $ev;
    }
}

# First event of the given type (optionally also matching $pred).
sub wait_type {
    my ($self, $type, $timeout, $pred) = @_;
    return $self->wait_for(sub {
        ($_[0]{type} // '') eq $type && (!$pred || $pred->($_[0]))
    }, $timeout);
}

# Read (and discard, except close frames which set close_code) until the
# server closes the TCP connection. True if it did within $timeout.
sub is_closed_by_server {
    my ($self, $timeout) = @_;
    my $deadline = time + ($timeout // $self->{timeout});
    return 1 if $self->{eof};
    return 1 unless $self->{sock};
    while (1) {
        while ($self->_parse_frame) { }
        my $r = $self->_fill($deadline);
        return 1 if !defined $r;
        return 0 if !$r;
    }
}

# Read until the server's close frame and return it ({opcode => 8,
# close_code, close_reason, payload}), or undef on timeout or EOF without a
# close frame. Data messages read on the way are recorded as events (see
# ->events); pings are answered when auto_pong is on.
sub recv_close {
    my ($self, $timeout) = @_;
    my $deadline = time + ($timeout // $self->{timeout});
    while (1) {
        my $m = $self->recv_message($deadline - time);
        return undef unless $m;
        return $m if $m->{opcode} == 8;
        $self->_record_event($m);
    }
}

# Wait at most $timeout seconds (0: do not wait) for the socket to become
# readable, read once, and return every complete frame now in the buffer
# (nothing is answered or recorded). Sets ->eof on EOF.
sub pending_frames {
    my ($self, $timeout) = @_;
    my @f;
    while (my $f = $self->_parse_frame) { push @f, $f }
    return @f if @f || !$self->{sock} || $self->{eof};
    my $sel = IO::Select->new($self->{sock});
    if ($sel->can_read($timeout // 0)) {
        my $n = sysread($self->{sock}, $self->{buf}, 262144, length $self->{buf});
        if (!$n) {
            $self->{eof} = 1;
            $self->{read_error} = $! unless defined $n;
        }
    }
    while (my $f = $self->_parse_frame) { push @f, $f }
    return @f;
}

sub DESTROY {
    my $self = shift;
    close $self->{sock} if $self->{sock};
}

1;
