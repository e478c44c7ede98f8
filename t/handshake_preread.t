# A client may send its first frames in the same packet as the handshake:
# nginx has them in its header buffer already, and the module must parse
# them before reading the socket. Messages sent before `welcome` are held and
# published right after the member's join, in order. Checked with the request
# kept (access log at close) and freed after the upgrade (access log at
# upgrade), which also frees nginx's header buffer; and once more as the
# second request of a keepalive connection.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET;
use IO::Select;
use JSON::PP;
use Time::HiRes qw(time);
use Test::More;
use ChatTest;
use ChatFault;
use WSClient;

my $redis = start_redis();

for my $mode (qw(close upgrade)) {
    my $nginx = start_nginx(chat_config(location => "websocket_chat_access_log $mode;"),
                            redis => $redis);
    my $port = $nginx->port;


    my $watcher = WSClient->join(port => $port, room => 'pre', nick => 'watcher');

    my ($req) = WSClient::handshake_request(port => $port, path => '/ws?room=pre&nick=eager');
    my $packet = $req
        . WSClient->frame_bytes(opcode => 1, payload => 'first, with the handshake')
        . WSClient->frame_bytes(opcode => 1, payload => 'second, same packet');
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp')
        or die "connect: $!";
    syswrite($s, $packet) == length $packet or die "short write";

    # Read the 101 and then events until both messages came back.
    my ($buf, @texts, @types) = ('');
    my $sel = IO::Select->new($s);
    my $deadline = time + 5;
    while (@texts < 2 && time < $deadline) {
        last unless $sel->can_read($deadline - time);
        sysread($s, $buf, 65536, length $buf) or last;
        if ($buf =~ s/\A(HTTP\/1\.1 (\d+)[^\r]*\r\n.*?\r\n\r\n)//s) {
            is($2, 101, "$mode: the handshake is answered with 101");
        }
        next if $buf =~ /\AHTTP/;
        while (my $f = parse_frame(\$buf)) {
            next unless $f->{opcode} == 1;
            my $ev = decode_json($f->{payload});
            push @types, $ev->{type};
            push @texts, $ev->{text} if $ev->{type} eq 'message';
        }
    }
    is_deeply(\@texts, ['first, with the handshake', 'second, same packet'],
              "$mode: both frames sent with the handshake were relayed, in order");
    is($types[0], 'welcome', "$mode: welcome came first") or diag("events: @types");

    my @seen;
    for (1 .. 2) {
        my $ev = $watcher->wait_for(sub { $_[0]{type} eq 'message' && $_[0]{user} eq 'eager' }, 5);
        push @seen, $ev ? $ev->{text} : undef;
    }
    is_deeply(\@seen, ['first, with the handshake', 'second, same packet'],
              "$mode: the other member received them too");

    close $s;

    # The handshake as the second request of a keepalive connection whose
    # first request needed a large header buffer: nginx has recycled its
    # buffers by then, and the session (which may free them) starts cleanly.
    my $k = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp')
        or die "connect: $!";
    syswrite($k, "GET /other HTTP/1.1\r\nHost: x\r\nCookie: k=" . ('c' x 3000) . "\r\n\r\n");
    my $ksel = IO::Select->new($k);
    my $kbuf = '';
    $deadline = time + 5;
    while ($kbuf !~ m{</html>} && time < $deadline) {
        last unless $ksel->can_read($deadline - time);
        sysread($k, $kbuf, 65536, length $kbuf) or last;
    }
    like($kbuf, qr{\AHTTP/1\.1 404}, "$mode: a keepalive request first");
    my ($kreq) = WSClient::handshake_request(port => $port, path => '/ws?room=pre&nick=again');
    syswrite($k, $kreq . WSClient->frame_bytes(opcode => 1, payload => 'after keepalive'));
    $kbuf = '';
    $deadline = time + 5;
    while ($kbuf !~ /after keepalive/ && time < $deadline) {
        last unless $ksel->can_read($deadline - time);
        sysread($k, $kbuf, 65536, length $kbuf) or last;
    }
    like($kbuf, qr{\AHTTP/1\.1 101}, "$mode: then the handshake on the same connection");
    like($kbuf, qr/after keepalive/, "$mode: and its message comes back");
    close $k;
    $nginx->stop;
}

$redis->stop;
done_testing;
