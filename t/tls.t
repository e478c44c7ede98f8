# wss:// through nginx's own TLS (listen ... ssl): the handshake, messages of
# every size class (TLS records are 16 KiB) and the close handshake, with the
# module writing through nginx's TLS layer; with the request kept for the
# access log at close, and freed after the upgrade. A small socket send
# buffer (sndbuf=8k) makes the TLS layer hold back output of its own.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use File::Temp qw(tempdir);
use Test::More;
use ChatTest;
use WSClient;

my $openssl = '/usr/bin/openssl';
plan skip_all => 'openssl not found' unless -x $openssl || $ENV{CI};

my $dir = tempdir(CLEANUP => 1);
system($openssl, qw(req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost),
       '-keyout', "$dir/key.pem", '-out', "$dir/cert.pem") == 0
    or BAIL_OUT('openssl could not make a test certificate');

my $redis = start_redis();

for my $mode (qw(close upgrade)) {
    my $nginx = start_nginx(chat_config(
        listen => 'ssl sndbuf=8k',
        server => "        ssl_certificate $dir/cert.pem;\n        ssl_certificate_key $dir/key.pem;\n",
        location => "websocket_chat_access_log $mode;\n            websocket_chat_send_buffer 4m;",
    ), redis => $redis);
    my $port = $nginx->port;

    my $a = WSClient->join(port => $port, room => 'tls', nick => 'alice', tls => 1);
    my $b = WSClient->join(port => $port, room => 'tls', nick => 'bob', tls => 1);
    ok($a && $b, "$mode: two clients joined over TLS");

    for my $size (1, 1000, 16_000, 40_000) {
        my $text = 'x' x $size;
        $a->send_text($text);
        for my $c ([alice => $a], [bob => $b]) {
            my $ev = $c->[1]->wait_for(sub { $_[0]{type} eq 'message' }, 5);
            is(length($ev ? $ev->{text} : ''), $size, "$mode: $c->[0] received the $size-byte message over TLS");
        }
    }

    $a->send_close(1000, 'bye');
    my $close = $a->recv_close(5);
    is($close && $close->{close_code}, 1000, "$mode: close handshake over TLS echoes 1000");
    ok($a->is_closed_by_server(5), "$mode: server closes the TLS connection after the close handshake");

    my $leave = $b->wait_for(sub { $_[0]{type} eq 'leave' }, 5);
    is($leave && $leave->{user}, 'alice', "$mode: the other member sees the leave");

    # A reader that lets the socket fill: what nginx's TLS layer could not
    # send sits in its own buffer and must still leave once the reader
    # catches up, with nothing else sent after it.
    my $slow = WSClient->join(port => $port, room => 'tls-slow', nick => 'slow', tls => 1,
                              rcvbuf => 4096);
    my $fast = WSClient->join(port => $port, room => 'tls-slow', nick => 'fast', tls => 1);
    my @sent = map { sprintf('%04d', $_) . ('y' x 19_996) } 1 .. 50;
    $fast->send_text($_) for @sent;
    my $echoed = 0;
    $echoed++ while $echoed < @sent && $fast->wait_for(sub { $_[0]{type} eq 'message' }, 5);
    is($echoed, scalar @sent, "$mode: the sender got its 50 messages of 20 kB back");
    my @got;
    while (@got < @sent) {
        my $ev = $slow->wait_for(sub { $_[0]{type} eq 'message' }, 5) or last;
        push @got, substr($ev->{text}, 0, 4);
    }
    is_deeply(\@got, [map { substr($_, 0, 4) } @sent],
              "$mode: the slow TLS reader gets every message, the last one included");

    $nginx->stop;
}

$redis->stop;
done_testing;
