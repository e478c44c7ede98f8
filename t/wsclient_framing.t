# Self-test of the test client t/lib/WSClient.pm (no nginx involved): frame
# encoding (RFC 6455 examples), 16/64-bit lengths, frames split across reads,
# several frames in one read, fragmentation, close frames, and a handshake
# whose response carries the first frame in the same segment.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);
use IO::Handle;
use IO::Socket::INET;
use IO::Select;
use POSIX ();
use Time::HiRes qw(time);
use WSClient;

$SIG{PIPE} = 'IGNORE';

sub pair_client {
    socketpair(my $a, my $b, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
    binmode $_ for $a, $b;
    $_->autoflush(1) for $a, $b;
    my $c = bless { sock => $a, buf => '', timeout => 2, events => [], skipped => [],
                    auto_pong => 1 }, 'WSClient';
    return ($c, $b);
}

# Read exactly $n bytes from $fh within 5s.
sub read_n {
    my ($fh, $n) = @_;
    my $buf = '';
    my $deadline = time + 5;
    my $sel = IO::Select->new($fh);
    while (length $buf < $n) {
        my $left = $deadline - time;
        last if $left <= 0 || !$sel->can_read($left);
        my $r = sysread($fh, $buf, $n - length $buf, length $buf);
        last unless $r;
    }
    return $buf;
}

sub server_frame {    # unmasked frame as a server sends it
    my ($op, $payload, $fin) = @_;
    $fin //= 1;
    my $len = length $payload;
    my $h = chr(($fin ? 0x80 : 0) | $op);
    if    ($len < 126)   { $h .= chr($len) }
    elsif ($len < 65536) { $h .= chr(126) . pack('n', $len) }
    else                 { $h .= chr(127) . pack('NN', 0, $len) }
    return $h . $payload;
}

# RFC 6455 5.7: masked "Hello" with key 37 fa 21 3d
{
    my ($c, $s) = pair_client();
    $c->send_frame(opcode => 1, payload => 'Hello', mask_key => "\x37\xfa\x21\x3d");
    is(unpack('H*', read_n($s, 11)), '818537fa213d7f9f4d5158', 'masked Hello matches RFC 6455 example');

    $c->send_frame(opcode => 1, payload => 'Hel', fin => 0, mask => 0);
    is(unpack('H*', read_n($s, 5)), '010348656c', 'unmasked fragment, fin=0');

    $c->send_frame(opcode => 1, payload => 'x' x 300, mask => 0);
    is(unpack('H*', substr(read_n($s, 304), 0, 4)), '817e012c', '16-bit length encoding');

    $c->send_frame(opcode => 2, payload => 'y' x 70000, mask => 0);
    is(unpack('H*', substr(read_n($s, 70010), 0, 10)), '827f0000000000011170', '64-bit length encoding');

    $c->send_frame(opcode => 1, payload => 'ab', declared_len => 1000, mask => 0, rsv => 4);
    is(unpack('H*', read_n($s, 6)), 'c17e03e86162', 'declared length and rsv bits are sent as given');

    $c->send_close(1000, 'bye');
    my $f = read_n($s, 11);
    is(unpack('H*', substr($f, 0, 2)), '8885', 'close frame header');
    my $key = substr($f, 2, 4);
    my $p = substr($f, 6) ^ substr($key x 2, 0, 5);
    is($p, pack('n', 1000) . 'bye', 'close payload: code + reason');

    $c->send_text("\x{263a}");
    $f = read_n($s, 9);
    is(ord(substr($f, 1, 1)) & 0x7f, 3, 'send_text sends UTF-8 bytes');
}

# receiving: several frames in one read, 16/64-bit lengths, fragmentation
{
    my ($c, $s) = pair_client();
    syswrite($s, server_frame(1, '{"type":"a"}') . server_frame(1, '{"type":"b"}')
               . server_frame(9, 'pp') . server_frame(1, '{"type":"c"}'));
    is($c->recv_json(2)->{type}, 'a', 'first of several frames in one read');
    is($c->recv_json(2)->{type}, 'b', 'second frame');
    is($c->recv_json(2)->{type}, 'c', 'third frame after a ping');
    is(unpack('H*', substr(read_n($s, 8), 0, 2)), '8a82', 'ping answered with a masked pong');

    my $big = '{"type":"big","t":"' . ('z' x 1000) . '"}';
    syswrite($s, server_frame(1, $big));
    is(length($c->recv_json(2)->{t}), 1000, '16-bit length frame');

    my $huge = '{"type":"huge","t":"' . ('h' x 70000) . '"}';
    # both ends are in this process: the socket buffer holds the whole frame
    ok(WSClient::_write_all($s, server_frame(1, $huge), 5), 'wrote a 70000-byte frame');
    is(length($c->recv_json(5)->{t}), 70000, '64-bit length frame');

    syswrite($s, server_frame(1, '{"type":"fr', 0) . server_frame(0, 'ag"}', 1));
    is($c->recv_json(2)->{type}, 'frag', 'fragmented message joined');

    syswrite($s, server_frame(1, 'not json'));
    is($c->recv_json(2)->{type}, '_invalid_json', 'invalid JSON reported as event');

    # split frame: header byte only, then the rest after we saw it buffered
    my $frame = server_frame(1, '{"type":"split"}');
    syswrite($s, substr($frame, 0, 1));
    ok(!defined $c->recv_frame(0.2), 'incomplete frame: nothing returned yet');
    is(length $c->{buf}, 1, 'partial frame kept in the buffer');
    syswrite($s, substr($frame, 1, 5));
    ok(!defined $c->recv_frame(0.2), 'still incomplete');
    syswrite($s, substr($frame, 6));
    is($c->recv_json(2)->{type}, 'split', 'frame split over three reads');

    # 16-bit length split inside the extended length field
    $frame = server_frame(1, $big);
    syswrite($s, substr($frame, 0, 3));
    ok(!defined $c->recv_frame(0.2), 'split inside extended length');
    syswrite($s, substr($frame, 3));
    is($c->recv_json(2)->{type}, 'big', 'completed after extended length arrives');

    ok(!defined $c->recv_json(0.2), 'timeout returns undef');
    ok(!$c->eof, 'timeout is not eof');

    syswrite($s, server_frame(1, '{"type":"x","n":1}') . server_frame(1, '{"type":"y"}')
               . server_frame(1, '{"type":"x","n":2}'));
    my $ev = $c->wait_for(sub { $_[0]{type} eq 'y' }, 2);
    ok($ev, 'wait_for finds event');
    is(scalar($c->skipped), 1, 'skipped event collected');
    is($c->wait_type('x', 2)->{n}, 2, 'wait_type');

    syswrite($s, server_frame(8, pack('n', 1001) . 'going'));
    ok(!defined $c->recv_json(2), 'close frame ends recv_json');
    is($c->close_code, 1001, 'close_code parsed');
    is($c->close_reason, 'going', 'close reason parsed');

    close $s;
    ok($c->is_closed_by_server(2), 'EOF detected');
}

# handshake over TCP with the first frame in the same segment as the 101
{
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 5,
                                  Proto => 'tcp', ReuseAddr => 1) or die $!;
    my $port = $l->sockport;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $deadline = time + 10;
        for my $n (1 .. 2) {
            last unless IO::Select->new($l)->can_read($deadline - time);
            my $a = $l->accept or last;
            my $req = '';
            while ($req !~ /\r\n\r\n/ && time < $deadline) {
                last unless IO::Select->new($a)->can_read($deadline - time);
                sysread($a, $req, 4096, length $req) or last;
            }
            my ($key) = $req =~ /Sec-WebSocket-Key: (\S+)/i;
            if ($n == 1) {
                syswrite($a, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    . "Connection: upgrade\r\nSec-WebSocket-Accept: " . WSClient::accept_for($key)
                    . "\r\n\r\n" . server_frame(1, '{"type":"welcome","room":"r"}'));
                read_n($a, 1);    # until the client closes
            } else {
                syswrite($a, "HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nbad");
            }
            close $a;
        }
        POSIX::_exit(0);
    }
    close $l;
    my $c = eval { WSClient->connect(port => $port, path => '/ws', welcome => 1, timeout => 5) };
    ok($c && $c->welcome && $c->welcome->{room} eq 'r', 'welcome in the same segment as 101')
        or diag($@);
    $c->disconnect if $c;
    my ($st, $h, $raw) = WSClient::raw_handshake($port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    is($st, 400, 'raw_handshake status');
    is($h->{'x-a'}, '1, 2', 'repeated headers joined');
    like($raw, qr/\r\n\r\nbad$/, 'raw response includes the body');
    waitpid($pid, 0);
}

is(WSClient::accept_for('dGhlIHNhbXBsZSBub25jZQ=='), 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=', 'accept key of RFC example');

# frame_bytes: the same bytes send_frame writes; declared length without payload
{
    my %o = (opcode => 1, payload => 'Hello', mask_key => "\x37\xfa\x21\x3d");
    is(unpack('H*', WSClient::frame_bytes(%o)), '818537fa213d7f9f4d5158', 'frame_bytes as a function');
    my ($c, $s) = pair_client();
    is(unpack('H*', $c->frame_bytes(%o)), '818537fa213d7f9f4d5158', 'frame_bytes as a method');
    $c->send_frame(%o);
    is(unpack('H*', read_n($s, 11)), '818537fa213d7f9f4d5158', 'send_frame writes frame_bytes');
    my $h = WSClient::frame_bytes(opcode => 9, declared_len => 10 * 1024 * 1024, mask_key => 'abcd');
    is(unpack('H*', $h), '89ff0000000000a0000061626364', '10 MB declared, header only');
    is(unpack('H*', WSClient::frame_bytes(opcode => 1, payload => 'x', rsv => 2, mask => 0, fin => 0)),
       '210178', 'rsv bits, no mask, no fin');
}

# handshake_request
{
    my ($req, $key) = WSClient::handshake_request(port => 7, path => '/ws?a=b',
        headers => { Origin => 'https://a.example', 'Sec-WebSocket-Version' => undef });
    like($req, qr{^GET /ws\?a=b HTTP/1\.1\r\n}, 'handshake_request: request line');
    like($req, qr{\r\nOrigin: https://a\.example\r\n}, 'handshake_request: extra header');
    unlike($req, qr{Sec-WebSocket-Version}i, 'handshake_request: undef drops a header');
    like($req, qr{\r\nSec-WebSocket-Key: \Q$key\E\r\n}, 'handshake_request: returns its key');
    like($req, qr{\r\n\r\n\z}, 'handshake_request: ends with an empty line');
}

# recv_close records the events before the close frame; pending_frames
{
    my ($c, $s) = pair_client();
    syswrite($s, server_frame(1, '{"type":"message","text":"a"}') . server_frame(8, pack('n', 1008) . 'slow'));
    my $f = $c->recv_close(2);
    is($f && $f->{close_code}, 1008, 'recv_close returns the close frame');
    is($f && $f->{close_reason}, 'slow', 'recv_close: reason');
    is(join(',', map { $_->{text} } $c->events), 'a', 'recv_close recorded the message before it');

    ($c, $s) = pair_client();
    is(scalar($c->pending_frames(0)), 0, 'pending_frames: nothing yet, no wait');
    syswrite($s, server_frame(9, 'p') . server_frame(1, 'x', 0) . substr(server_frame(0, 'yz'), 0, 2));
    my @f = $c->pending_frames(1);
    is(join(',', map { "$_->{opcode}:$_->{payload}" } @f), '9:p,1:x', 'pending_frames: complete frames only');
    syswrite($s, 'yz');
    @f = $c->pending_frames(1);
    is(join(',', map { "$_->{opcode}:$_->{payload}" } @f), '0:yz', 'pending_frames: rest of a split frame');
    close $s;
    @f = $c->pending_frames(1);
    ok(!@f && $c->eof, 'pending_frames: EOF sets eof');
}

# rcvbuf: SO_RCVBUF is set before connect
{
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1, Proto => 'tcp')
        or die "listen: $!";
    my $s = WSClient::_socket($l->sockport, 5, undef, 4096);
    my $rb = unpack 'i', getsockopt($s, Socket::SOL_SOCKET(), Socket::SO_RCVBUF());
    ok($rb >= 4096 && $rb <= 16384, "rcvbuf 4096 -> effective SO_RCVBUF $rb");
    ok($s->connected, 'socket with rcvbuf is connected');
    close $s;
}

done_testing;
