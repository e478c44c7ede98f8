# Two worker processes: members of one room spread over both workers all get
# a message, whichever worker the sender is on; each worker subscribes to the
# room and holds its own two Redis connections.
#
# Which worker serves a connection is made deterministic enough to rely on:
# the server listens with "reuseport", so each worker has its own listening
# socket and the kernel spreads connections over them by a hash of the
# client's address and port. The test keeps opening fresh connections
# (bounded in count and time) until both workers hold members, learning each
# session's worker from the socket's owner (/proc, ChatFault::client_workers).
# Members on only one worker after the bound is a failure, not a skip.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $MIN_CLIENTS = 20;    # at least this many members in the room
my $MAX_CLIENTS = 60;    # bound on the connections opened
my $MAX_SECONDS = 20;    # bound on the time spent connecting

my $redis = start_redis();
my $rport = $redis->port;
my $nginx = start_nginx_ok('nginx starts with 2 workers, listen ... reuseport',
    chat_config(workers => 2, listen => 'reuseport'), redis => $redis, workers => 2);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;
is(scalar(@workers), 2, 'two workers running');

# Connect until there are $MIN_CLIENTS members and both workers hold some.
my (@c, @owner, %on);
my $t0 = time;
while (@c < $MAX_CLIENTS && time - $t0 < $MAX_SECONDS) {
    push @c, WSClient->join(port => $port, room => 'wk', nick => 'u' . scalar(@c));
    @owner = client_workers($nginx, \@c, @workers);
    %on = ();
    push @{ $on{ $owner[$_] // '' } }, $_ for 0 .. $#c;
    last if @c >= $MIN_CLIENTS && !grep { !$on{$_} } @workers;
}
note(sprintf '%d clients connected in %.2fs; members per worker: %s', scalar(@c), time - $t0,
     join(', ', map { ($_ eq '' ? 'unattributed' : $_) . ': ' . scalar @{ $on{$_} } } sort keys %on));
ok(!$on{''}, 'every session is attributed to one of the two workers')
    or diag('unattributed clients: ' . join ' ', @{ $on{''} });
ok(@c >= $MIN_CLIENTS, "at least $MIN_CLIENTS members joined (" . scalar(@c) . ')');
my @spread = grep { $on{$_} } @workers;
is(scalar(@spread), 2, "members on both workers (within $MAX_CLIENTS connections and ${MAX_SECONDS}s)")
    or diag('members per worker: ' . join(', ', map { "$_: " . scalar @{ $on{$_} // [] } } @workers));

ok(wait_until(sub { $redis->numsub('wk') >= 1 }, 5), 'room channel subscribed');
my $numsub;
ok(wait_until(sub { ($numsub = $redis->numsub('wk')) == 2 }, 5), 'both workers subscribed to wschat:wk')
    or diag("PUBSUB NUMSUB wschat:wk = $numsub");

# A sender on each worker: c[0], and the first member on the other worker.
my ($other) = defined $owner[0]
    ? grep { defined $owner[$_] && $owner[$_] != $owner[0] } 0 .. $#c
    : ();

$c[0]->send_text('to everybody');
my $got = 0;
for my $i (0 .. $#c) {
    my $m = $c[$i]->wait_type('message', 5);
    $got++ if $m && $m->{text} eq 'to everybody' && $m->{user} eq 'u0';
}
is($got, scalar @c, 'every client receives the message of a member on the first worker');

# a message from a member on the other worker reaches all too
ok(defined $other, 'a member on the other worker than u0 exists');
my $sender = defined $other ? $other : $#c;
$c[$sender]->send_text('from the other worker');
$got = 0;
for my $cl (@c) {
    my $m = $cl->wait_type('message', 5);
    $got++ if $m && $m->{text} eq 'from the other worker' && $m->{user} eq "u$sender";
}
is($got, scalar @c, "every client receives the message of u$sender (on the other worker)");

# per-worker Redis connections: 4 in all, 2 owned by each worker
my @cl;
ok(wait_until(sub { @cl = $redis->client_list; @cl == 4 }, 5),
   'CLIENT LIST: 4 connections from nginx (2 per worker)')
    or diag(join "\n", map { "addr=$_->{addr} flags=$_->{flags} sub=$_->{sub} cmd=$_->{cmd}" } @cl);
my %rc;
ok(wait_until(sub { %rc = redis_conns_by_pid($rport, @workers);
                    !grep { ($rc{$_} // 0) != 2 } @workers }, 5),
   'each worker owns 2 established connections to Redis')
    or diag(join ', ', map { ($_ eq '' ? 'other' : $_) . ": $rc{$_}" } sort keys %rc);

$_->send_close(1000) for @c;
ok(wait_until(sub { $redis->numsub('wk') == 0 }, 10), 'unsubscribed after all left');

done_all();
