# A worker killed with SIGKILL (worker_processes 2, members of one room on
# both workers): the master respawns it; the killed worker's clients see
# their TCP connection closed; the members on the other worker keep
# chatting; the dead worker's Redis connections disappear from CLIENT LIST
# (2 connections per live worker once the new worker has a member again).
# The one error-log line the kill causes ("worker process PID exited on
# signal 9") is expected; anything else alarming still fails the file.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $ROOM = 'wk';
my $MAX_CLIENTS = 200;

my $redis = start_redis();
my $rport = $redis->port;
my $nginx = start_nginx_ok('nginx starts with 2 workers', chat_config(workers => 2),
                           redis => $redis, workers => 2);
my $port = $nginx->port;
my @workers = $nginx->worker_pids;
is(scalar(@workers), 2, 'two workers');

# Connections to Redis as seen by /proc/net/tcp and by CLIENT LIST.
sub redis_detail {
    my $own = socket_owners($nginx->worker_pids, $$);
    return join "\n",
        (map { "tcp $_->{local_ip}:$_->{local_port} -> $_->{remote_ip}:$_->{remote_port} st=$_->{state} "
               . "inode=$_->{inode} pid=" . ($own->{ $_->{inode} } // '?') }
         grep { $_->{remote_port} == $rport } tcp_connections($rport)),
        map { "CLIENT LIST addr=$_->{addr} flags=$_->{flags} cmd=$_->{cmd}" } $redis->client_list;
}

sub conns_desc {
    my %n = @_;
    return join(', ', map { ($_ eq '' ? 'unknown' : $_) . ": $n{$_}" } sort keys %n) || 'none';
}

# Connect until there are at least 12 members and both workers hold at least
# 3 of them (which worker accepts is up to the kernel).
my (@c, @owner);
my $i = 0;
while (@c < $MAX_CLIENTS) {
    push @c, WSClient->join(port => $port, room => $ROOM, nick => 'k' . $i++);
    next if @c < 12 || @c % 4;
    @owner = client_workers($nginx, \@c, @workers);
    my %n;
    $n{$_ // ''}++ for @owner;
    last if !grep { ($n{$_} // 0) < 3 } @workers;
}
@owner = client_workers($nginx, \@c, @workers);
my %members;
push @{ $members{ $_ < @owner && defined $owner[$_] ? $owner[$_] : '' } }, $_ for 0 .. $#c;
note(scalar(@c) . ' members: ' . join(', ', map { "$_: " . scalar @{ $members{$_} } } sort keys %members));
ok(!$members{''}, 'every session is attributed to a worker');
my ($victim, $survivor) = @workers;
if (!$members{$victim} || !$members{$survivor}) {
    fail("members on both workers after $MAX_CLIENTS connections");
    done_all();
    exit;
}
pass('members on both workers');

# both workers are subscribed and have their two Redis connections
ok(wait_until(sub { $redis->numsub($ROOM) == 2 }, 5), 'both workers subscribed to the room');
$c[0]->send_text('before the kill');
my $got = grep { my $m = $_->wait_type('message', 5); $m && $m->{text} eq 'before the kill' } @c;
is($got, scalar(@c), 'before the kill: every member receives a message');
my %rc;
ok(wait_until(sub { %rc = redis_conns_by_pid($rport, @workers);
                    ($rc{$victim} // 0) == 2 && ($rc{$survivor} // 0) == 2 }, 5),
   'before the kill: 2 Redis connections per worker')
    or diag(conns_desc(%rc) . "\n" . redis_detail());

my @doomed  = map { $c[$_] } @{ $members{$victim} };
my @staying = map { $c[$_] } @{ $members{$survivor} };
note(sprintf 'killing worker %d (%d members); worker %d keeps %d members',
     $victim, scalar @doomed, $survivor, scalar @staying);

# --- SIGKILL
allow_killed_worker($nginx, $victim, 9);
ok(kill('KILL', $victim), "SIGKILL sent to worker $victim");
my $t0 = time;

# the killed worker's clients: connection closed
my $deadline = $t0 + 5;
while (time < $deadline) {
    my @open = grep { !$_->eof } @doomed;
    last unless @open;
    my %by = map { (fileno($_->socket) => $_) } @open;
    $by{ fileno $_ }->pending_frames(0)
        for IO::Select->new(map { $_->socket } @open)->can_read(0.2);
}
is(scalar(grep { $_->eof } @doomed), scalar(@doomed),
   'every client of the killed worker sees its TCP connection closed');
ok(!grep({ $_->eof || $_->got_close } @staying), 'no client of the other worker was closed');

# the master respawns a worker
my @now;
ok(wait_until(sub { @now = $nginx->worker_pids; @now == 2 && !grep { $_ == $victim } @now }, 10),
   'the master respawns a worker') or diag("workers: @now");
ok(!pid_running($victim), "worker $victim is gone");
my ($fresh) = grep { $_ != $survivor } @now;
ok($fresh && $fresh != $victim, 'a new worker pid (' . ($fresh // 'none') . ') appears')
    and note(sprintf 'new worker %d after %.2fs', $fresh, time - $t0);
ok((grep { $_ == $survivor } @now), "worker $survivor still runs");
like(join("\n", $nginx->error_log_text), qr/worker process $victim exited on signal 9/,
     'error log: the master noticed the killed worker');

# the survivors keep chatting
$staying[-1]->send_text('after the kill');
$got = grep { my $m = $_->wait_type('message', 5, sub { $_[0]{text} eq 'after the kill' }); $m } @staying;
is($got, scalar(@staying), 'after the kill: a message from a member of the other worker reaches all its members');

# the dead worker's Redis connections disappear
my @cl;
ok(wait_until(sub { @cl = $redis->client_list; %rc = redis_conns_by_pid($rport, @now);
                    @cl == 2 && ($rc{$survivor} // 0) == 2 && !$rc{$fresh} }, 10),
   'CLIENT LIST: the killed worker\'s connections are gone (2 left, those of the surviving worker)')
    or diag(scalar(@cl) . " in CLIENT LIST; by pid: " . conns_desc(%rc) . "\n"
            . join "\n", map { "addr=$_->{addr} flags=$_->{flags} cmd=$_->{cmd}" } @cl);
is($redis->numsub($ROOM), 1, 'one subscriber left for the room');

# new members until one lands on the new worker: 2 Redis connections per live worker
my @more;
my $on_fresh;
while (@more < 60 && !$on_fresh) {
    my $m = WSClient->join(port => $port, room => $ROOM, nick => 'n' . scalar(@more));
    push @more, $m;
    my ($w) = client_workers($nginx, [$m], @now);
    $on_fresh = $m if defined $w && $w == $fresh;
}
ok($on_fresh, 'a new member is served by the new worker') or do { done_all(); exit };
ok(wait_until(sub { @cl = $redis->client_list; %rc = redis_conns_by_pid($rport, @now);
                    @cl == 4 && ($rc{$survivor} // 0) == 2 && ($rc{$fresh} // 0) == 2 }, 10),
   'CLIENT LIST: 4 connections, 2 per live worker')
    or diag(scalar(@cl) . " in CLIENT LIST; by pid: " . conns_desc(%rc));
ok(wait_until(sub { $redis->numsub($ROOM) == 2 }, 5), 'both live workers subscribed to the room');
$on_fresh->send_text('from the new worker');
$got = grep { my $m = $_->wait_type('message', 5, sub { $_[0]{text} eq 'from the new worker' }); $m }
       @staying, @more;
is($got, @staying + @more, 'a message from the new worker reaches the members of both workers');

$_->send_close(1000) for @staying, @more;
$_->is_closed_by_server(5) for @staying, @more;
ok(wait_until(sub { $redis->numsub($ROOM) == 0 }, 10), 'unsubscribed after everybody left');
done_all();
