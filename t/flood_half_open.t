# 500 connections that send half a handshake and stall do not stop a fresh
# client from joining and exchanging a message within 1s.
# (worker_connections 2048, client_header_timeout 30s so that nginx keeps the
# stalled connections for the whole test; 500 sockets here and 500 in the
# worker stay far below the 20,000 open files allowed.)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $FLOOD = 500;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(worker_connections => 2048,
                                    server => 'client_header_timeout 30s;'),
                        redis => $redis);
my $port = $nginx->port;
my ($worker) = $nginx->worker_pids;

sub fd_count {
    opendir my $d, "/proc/$_[0]/fd" or return -1;
    my $n = grep { /^\d+$/ } readdir $d;
    closedir $d;
    return $n;
}
my $fds_before = fd_count($worker);

my @half;
my $t0 = time;
for my $i (1 .. $FLOOD) {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5);
    if (!$s) { diag("flood connection $i failed: $!"); last }
    syswrite($s, "GET /ws HTTP/1.1\r\nHost: x\r\n");
    push @half, $s;
}
is(scalar @half, $FLOOD, "$FLOOD half-open handshakes sent");
note(sprintf '%d connections opened in %.2fs', scalar @half, time - $t0);

# The worker has accepted them all (its open descriptors grew by >= 500).
my $fds;
ok(wait_until(sub { $fds = fd_count($worker); $fds - $fds_before >= $FLOOD }, 10),
   "worker accepted the stalled connections (fds $fds_before -> $fds)");

# None of them got an answer or was closed: they are really pending.
my $sel = IO::Select->new(@half);
my @answered = $sel->can_read(0);
is(scalar @answered, 0, 'no stalled connection was answered or closed');

# A fresh pair of clients joins and exchanges a message within 1s.
my $start = time;
my ($a, $b, $m);
eval {
    $a = WSClient->join(port => $port, room => 'flood', nick => 'fresh-a', timeout => 1);
    $b = WSClient->join(port => $port, room => 'flood', nick => 'fresh-b', timeout => 1);
    $a->send_text('through the flood');
    $m = $b->wait_type('message', 1, sub { $_[0]{user} eq 'fresh-a' });
};
my $took = time - $start;
ok(!$@, 'fresh clients joined despite the stalled connections') or diag($@);
is($m && $m->{text}, 'through the flood', 'fresh client received the message');
ok($took < 1, sprintf('join of two clients and message exchange took %.3fs (< 1s)', $took));

# and the worker still holds the stalled connections
@answered = $sel->can_read(0);
is(scalar @answered, 0, 'stalled connections still pending after the exchange');

# close them all
close $_ for @half;
@half = ();
ok(wait_until(sub { fd_count($worker) - $fds_before < 10 }, 10),
   'worker released the connections after the clients closed them')
    or diag('worker fds now ' . fd_count($worker) . ", before $fds_before");
$_->send_close(1000) for grep { $_ } $a, $b;
done_all();
