# WebSocket opening handshake: every rejection gets its exact status and no
# upgrade; the accept key is right; header values are case-insensitive.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

my $RFC_KEY    = 'dGhlIHNhbXBsZSBub25jZQ==';
my $RFC_ACCEPT = 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=';
my $KEY2       = 'AQIDBAUGBwgJCgsMDQ4PEA==';    # 16 bytes 01..10

# Build a request. Headers are [name, value] pairs in order; %o: method,
# version, path, headers (replaces defaults), drop (names to omit),
# set (name => value overrides), add (extra pairs).
sub request {
    my (%o) = @_;
    my @h = (
        [Host                    => "127.0.0.1:$port"],
        [Upgrade                 => 'websocket'],
        [Connection              => 'Upgrade'],
        ['Sec-WebSocket-Key'     => $RFC_KEY],
        ['Sec-WebSocket-Version' => '13'],
    );
    my %drop = map { lc($_) => 1 } @{ $o{drop} // [] };
    @h = grep { !$drop{ lc $_->[0] } } @h;
    for my $k (keys %{ $o{set} // {} }) {
        $_->[1] = $o{set}{$k} for grep { lc $_->[0] eq lc $k } @h;
    }
    push @h, @{ $o{add} // [] };
    my $method  = $o{method} // 'GET';
    my $version = $o{version} // '1.1';
    my $path    = $o{path} // '/ws?room=hs&nick=hs';
    return "$method $path HTTP/$version\r\n"
         . join('', map { "$_->[0]: $_->[1]\r\n" } @h) . "\r\n";
}

# After a rejection: send a masked WebSocket text frame and read what comes
# back within 2s. Returns the bytes (empty on EOF/timeout without data).
sub after_rejection {
    my $sock = shift;
    my $frame = "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";    # "Hello"
    syswrite($sock, $frame);
    my $buf = '';
    my $deadline = time + 2;
    my $sel = IO::Select->new($sock);
    while (time < $deadline) {
        last unless $sel->can_read($deadline - time);
        my $n = sysread($sock, $buf, 4096, length $buf);
        last unless $n;
        last if $buf =~ /\r\n\r\n/;
    }
    return $buf;
}

sub rejected {
    my ($name, $req, $want, $check) = @_;
    my ($st, $h, $raw, $sock) = WSClient::raw_handshake($port, $req);
    is($st, $want, "$name -> $want") or diag("response:\n$raw");
    ok(!defined $h->{'sec-websocket-accept'}
       && ($h->{upgrade} // '') !~ /websocket/i, "$name: no upgrade headers");
    $check->($h, $raw) if $check;
    my $after = after_rejection($sock);
    # Either nothing, or nginx answering the frame bytes as a (bad) HTTP request;
    # never a WebSocket frame.
    ok($after eq '' || $after =~ m{^HTTP/1\.[01] [45]\d\d }, "$name: connection does not speak WebSocket")
        or diag('got after rejection: ' . unpack('H*', substr($after, 0, 64)));
    close $sock;
}

sub accepted {
    my ($name, $req, $key) = @_;
    $key //= $RFC_KEY;
    my ($st, $h, $raw, $sock) = WSClient::raw_handshake($port, $req);
    is($st, 101, "$name -> 101") or diag("response:\n$raw");
    is($h->{'sec-websocket-accept'}, WSClient::accept_for($key), "$name: accept key");
    close $sock;
}

rejected('POST', request(method => 'POST', add => [['Content-Length' => 0]]), 405);
rejected('POST over HTTP/1.0 (method checked first)',
         request(method => 'POST', version => '1.0', add => [['Content-Length' => 0]]), 405);
rejected('HTTP/1.0', request(version => '1.0'), 400);
rejected('missing Upgrade', request(drop => ['Upgrade']), 400);
rejected('Upgrade: h2c', request(set => { Upgrade => 'h2c' }), 400);
rejected('Connection without upgrade token', request(set => { Connection => 'keep-alive' }), 400);
rejected('Connection: upgraded (not the token)', request(set => { Connection => 'upgraded' }), 400);
accepted('Connection: keep-alive, Upgrade', request(set => { Connection => 'keep-alive, Upgrade' }));
accepted('Upgrade token list h2c, websocket', request(set => { Upgrade => 'h2c, websocket' }));

rejected('missing key', request(drop => ['Sec-WebSocket-Key']), 400);
rejected('key of 15 bytes', request(set => { 'Sec-WebSocket-Key' => 'AQIDBAUGBwgJCgsMDQ4P' }), 400);
rejected('key of 17 bytes', request(set => { 'Sec-WebSocket-Key' => 'AQIDBAUGBwgJCgsMDQ4PEBE=' }), 400);
rejected('non-base64 key', request(set => { 'Sec-WebSocket-Key' => '!!!!!!!!!!!!!!!!!!!!!!==' }), 400);
rejected('two key headers', request(add => [['Sec-WebSocket-Key' => $KEY2]]), 400);
rejected('bad key with version 8 (key checked before version)',
         request(set => { 'Sec-WebSocket-Key' => 'short', 'Sec-WebSocket-Version' => '8' }), 400);

my $v13 = sub {
    my ($h, $raw) = @_;
    is($h->{'sec-websocket-version'}, '13', 'Sec-WebSocket-Version: 13 in the 426 response');
};
rejected('missing version', request(drop => ['Sec-WebSocket-Version']), 426, $v13);
rejected('version 8', request(set => { 'Sec-WebSocket-Version' => '8' }), 426, $v13);

# success with the RFC 6455 example key
{
    my ($st, $h, $raw, $sock) = WSClient::raw_handshake($port, request());
    is($st, 101, 'valid handshake -> 101');
    like($raw, qr{^HTTP/1\.1 101 Switching Protocols\r\n}, 'status line');
    is($h->{'sec-websocket-accept'}, $RFC_ACCEPT, 'exact accept key for the RFC example key');
    like($h->{upgrade} // '', qr/^websocket$/i, 'Upgrade: websocket');
    like($h->{connection} // '', qr/^upgrade$/i, 'Connection: upgrade');
    # and it does speak WebSocket: the welcome event arrives
    my $c = bless { sock => $sock, buf => substr($raw, index($raw, "\r\n\r\n") + 4),
                    timeout => 5, events => [], skipped => [], auto_pong => 1 }, 'WSClient';
    my $w = $c->wait_type('welcome', 5);
    ok($w, 'welcome frame after 101');
    $c->send_close(1000);
}

accepted('case-insensitive values (WebSocket, UPGRADE)',
         request(set => { Upgrade => 'WebSocket', Connection => 'UPGRADE' }));
accepted('lower-case header names', request() =~ s/^([^:\r\n]+):/lc($1) . ':'/gmer);

done_all();
