# A Redis that answers garbage, or announces a reply far larger than any
# chat message, is not trusted: the link drops the connection with an
# error-log line and reconnects (with backoff), the worker survives, and the
# client's session stays open with a redis_unavailable notice. The "Redis"
# here is a small fake server written for this test; the real-Redis paths
# are covered by t/redis_*.t.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use File::Temp qw(tempdir);
use IO::Socket::INET;
use IO::Select;
use POSIX ();
use Time::HiRes qw(time);
use Test::More;
use ChatTest;
use ChatFault;
use WSClient;

# Accepts connections and answers every read with $reply; writes one line
# per accepted connection to $log. Runs until killed.
sub fake_redis {
    my ($reply, $log) = @_;
    my $server = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                       Listen => 64, ReuseAddr => 1, Proto => 'tcp')
        or die "fake redis: $!";
    my $port = $server->sockport;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $sel = IO::Select->new($server);
        my $deadline = time + 60;
        while (time < $deadline) {
            for my $fh ($sel->can_read(0.2)) {
                if ($fh == $server) {
                    my $c = $server->accept or next;
                    $sel->add($c);
                    open my $l, '>>', $log or die; print $l "accept\n"; close $l;
                    next;
                }
                my $n = sysread($fh, my $buf, 65536);
                if (!$n) { $sel->remove($fh); close $fh; next; }
                syswrite($fh, $reply);
            }
        }
        POSIX::_exit(0);
    }
    close $server;
    return ($port, $pid);
}

sub accepts { my $f = shift; open my $h, '<', $f or return 0; my @l = <$h>; scalar @l }

# Each case: the fake's reply, and the reason the link gives for dropping
# the subscriber connection (the one that sends SUBSCRIBE and gets the reply);
# the command connection, which loads the history scripts when it connects,
# gets the same answer.
for my $case (['garbage' => "\@\@\@ not RESP\r\n", qr/unknown RESP type byte 0x40/],
              ['oversized bulk' => "\$999999999\r\nxxxx", qr/RESP value exceeds the configured limits/]) {
    my ($name, $reply, $reason) = @$case;
    my $log = tempdir(CLEANUP => 1) . '/accepts.log';
    my ($port, $fake) = fake_redis($reply, $log);

    my $nginx = start_nginx(chat_config(redis => "127.0.0.1:$port",
                                        http => "    websocket_chat_redis_timeout 1s;\n"),
        allow_errors => [qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$port lost: malformed reply: $reason; retrying in \d+ ms$/]);
    my $c = WSClient->connect(port => $nginx->port, path => '/ws?room=r&nick=n');
    my $notice = $c->wait_for(sub { ($_[0]{code} // '') eq 'redis_unavailable' }, 5);
    ok($notice, "$name: the client is told Redis is unavailable");

    # The link keeps reconnecting, with backoff: more than one connection,
    # and not a busy loop.
    wait_until(sub { accepts($log) >= 4 }, 5);
    my $n = accepts($log);
    cmp_ok($n, '>=', 4, "$name: the link reconnects after dropping the connection");
    cmp_ok($n, '<', 60, "$name: ... with backoff, not in a loop ($n connections)");

    my @lines = log_lines($nginx, qr/malformed reply/);
    ok(@lines, "$name: the error log says the reply was malformed") or diag($nginx->error_log_text);

    my ($pong) = ping_pong($c, 5);
    ok($pong, "$name: the client's session is still open");

    $nginx->stop;
    kill 'TERM', $fake;
    waitpid $fake, 0;
}

done_testing;
