# A WebSocket handshake over HTTP/2 (cleartext, prior knowledge) to a server
# with `http2 on`: a GET carrying every RFC 6455 header and no body. HTTP/2
# has no Upgrade and its streams share one connection, so the request is
# refused with 400 before anything is taken over; the worker survives and the
# same server keeps serving HTTP/1.1 WebSocket clients. (Before the fix, this
# one request crashed the worker.)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(server => "        http2 on;\n"), redis => $redis);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;

# HPACK: a literal header field without indexing, plain (not Huffman) strings.
sub hpack_int {
    my ($n) = @_;
    return chr($n) if $n < 127;
    my $out = chr(127);
    $n -= 127;
    while ($n >= 128) { $out .= chr(($n & 127) | 128); $n >>= 7 }
    return $out . chr($n);
}
sub hpack_literal { my ($k, $v) = @_; "\x00" . hpack_int(length $k) . $k . hpack_int(length $v) . $v }
sub h2_frame {
    my ($type, $flags, $stream, $payload) = @_;
    return substr(pack('N', length $payload), 1) . pack('CCN', $type, $flags, $stream) . $payload;
}

my @headers = (
    ':method' => 'GET', ':scheme' => 'http', ':path' => '/ws?room=h2&nick=h2',
    ':authority' => "127.0.0.1:$port", 'upgrade' => 'websocket', 'connection' => 'upgrade',
    'sec-websocket-key' => 'dGhlIHNhbXBsZSBub25jZQ==', 'sec-websocket-version' => '13',
);
my $block = '';
$block .= hpack_literal(splice @headers, 0, 2) while @headers;

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp')
    or die "connect: $!";
# Preface, empty SETTINGS, then HEADERS on stream 1 with END_STREAM | END_HEADERS.
my $out = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" . h2_frame(4, 0, 0, '') . h2_frame(1, 0x5, 1, $block);
syswrite($s, $out) == length $out or die "short write";

# Read frames until the response HEADERS of stream 1.
my ($buf, $status) = ('');
my $sel = IO::Select->new($s);
my $deadline = time + 5;
while (!defined $status && time < $deadline) {
    last unless $sel->can_read($deadline - time);
    sysread($s, $buf, 65536, length $buf) or last;
    while (length $buf >= 9) {
        my ($len_hi, $len_lo, $type, $flags, $stream) = unpack('CnCCN', $buf);
        my $len = ($len_hi << 16) | $len_lo;
        last if length $buf < 9 + $len;
        my $payload = substr($buf, 9, $len);
        substr($buf, 0, 9 + $len) = '';
        next unless $type == 1 && ($stream & 0x7fffffff) == 1;
        # nginx sends :status first: indexed (static table 8-14) or a literal
        # with the :status name (index 8) and a 3-digit value.
        my %indexed = (8 => 200, 9 => 204, 10 => 206, 11 => 304, 12 => 400, 13 => 404, 14 => 500);
        my $first = ord $payload;
        $status = $first & 0x80 ? $indexed{ $first & 0x7f }
                : substr($payload, 1, 1) eq "\x03" ? substr($payload, 2, 3) : 'unparsed';
    }
}
is($status, 400, 'a WebSocket handshake over HTTP/2 is refused with 400');
close $s;

ok(wait_until(sub { $nginx->error_log_text =~ /handshake rejected: WebSocket handshake requires HTTP\/1\.1.*HTTP\/2\.0/ }, 5),
   'the refusal is logged with the reason');
is_deeply([sort { $a <=> $b } $nginx->worker_pids], \@workers, 'the worker is still the same: it did not crash');

my $c = WSClient->join(port => $port, room => 'h2', nick => 'h1');
$c->send_text('over HTTP/1.1');
my $ev = $c->wait_for(sub { $_[0]{type} eq 'message' }, 5);
is($ev && $ev->{text}, 'over HTTP/1.1', 'the same server still chats over HTTP/1.1');

done_all();
