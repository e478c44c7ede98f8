# Presence leases: an nginx instance killed with SIGKILL (master and
# workers together, as a host that loses power) says no goodbye, yet its
# members leave every list. Two instances A and B (worker_processes 2 each)
# share one Redis; room "ls" has 2 members on A and 3 on B. After kill -9 of
# B's master and workers:
# * B's clients see their connections end;
# * within 25 s (lease 15 s, renewed every 5 s, a renewal on A sweeps B's
#   expired leases), every member on A receives one leave per member of B,
#   with its session and user;
# * wschat:ls:members then holds only A's members, B's lease entries are
#   gone from wschat:nodes, and a new joiner on A gets a welcome whose
#   count (3) and members exclude B's members;
# * the time from the kill to the last leave is noted.
# B cannot be stopped (it is dead): its master is reaped here, it is marked
# stopped so the harness sends no signal to a pid that may be reused, and
# its error log, written before the kill, is checked here with the
# harness's own rules (a SIGKILLed master writes nothing about its workers).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use POSIX qw(WNOHANG WIFSIGNALED WTERMSIG);
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $ROOM  = 'ls';
my $BOUND = 25;    # seconds from the kill to the last leave

my $redis = start_redis();
my $A = start_nginx_ok('nginx A starts (2 workers)', chat_config(workers => 2, listen => 'reuseport'),
                       redis => $redis, workers => 2);
my $B = start_nginx_ok('nginx B starts (2 workers)', chat_config(workers => 2, listen => 'reuseport'),
                       redis => $redis, workers => 2);

sub members_in_redis {
    my $h = $redis->cmd('HGETALL', "wschat:$ROOM:members") // [];
    my %m;
    for (my $i = 0; $i < @$h; $i += 2) { $m{ $h->[$i] } = $h->[$i + 1] }
    return \%m;
}

my (@onA, @onB);
push @onA, WSClient->join(port => $A->port, room => $ROOM, nick => "a$_") for 1 .. 2;
push @onB, WSClient->join(port => $B->port, room => $ROOM, nick => "b$_") for 1 .. 3;
my %sidB = map { ($_->welcome->{session} => $_->welcome->{user}) } @onB;
my %sidA = map { ($_->welcome->{session} => $_->welcome->{user}) } @onA;
is($onB[-1]->welcome->{count}, 5, 'the last joiner\'s welcome counts 5 members');
is_deeply([sort keys %{ members_in_redis() }], [sort keys %sidA, keys %sidB],
          "wschat:$ROOM:members holds the 5 sessions");

# every member on A has seen B's three joins (so that later leaves are new)
for my $c (@onA) {
    my $last = $onB[-1]->welcome->{session};
    $c->wait_type('join', 5, sub { $_[0]{session} eq $last });
}

my @nodes_before = @{ $redis->cmd('ZRANGE', 'wschat:nodes', 0, -1) };
note('leases before the kill: ' . join(', ', @nodes_before));

# --- kill -9 B: master and workers at once
my @victims = ($B->pid, $B->child_pids);
ok(@victims >= 3, 'B: master and its workers (' . join(' ', @victims) . ')');
my $b_log_before = $B->error_log_text;
is(kill('KILL', @victims), scalar(@victims), 'SIGKILL sent to B\'s master and workers');
my $t0 = time;

my $st;
wait_until(sub { my $r = waitpid($B->pid, WNOHANG); $st = $? if $r == $B->pid; $r != 0 }, 5, 0.02);
ok(defined $st && WIFSIGNALED($st) && WTERMSIG($st) == 9, 'B\'s master died of SIGKILL');
ok(wait_until(sub { !grep { pid_running($_) } @victims }, 5), 'B\'s processes are all gone');
$B->{stopped} = 1;    # dead: the harness must not signal these pids later

my $eofs = 0;
for my $c (@onB) { $eofs++ if $c->is_closed_by_server(5) }
is($eofs, 3, 'B\'s clients see their connections end');

# --- leaves on A, read from both A members together
my %left;    # A client index => {session => count}
my %leave_user;
my $t_last;
my @sel = map { $_->socket } @onA;
my %idx = map { (fileno($onA[$_]->socket) => $_) } 0 .. $#onA;
my $done = sub {
    for my $i (0 .. $#onA) {
        return 0 if grep { !$left{$i}{$_} } keys %sidB;
    }
    return 1;
};
my $deadline = $t0 + $BOUND + 1;
while (!$done->() && time < $deadline) {
    for my $s (IO::Select->new(@sel)->can_read(0.5)) {
        my $i = $idx{ fileno $s };
        while (defined(my $e = $onA[$i]->recv_json(0.01))) {
            next unless ($e->{type} // '') eq 'leave';
            $left{$i}{ $e->{session} }++;
            $leave_user{ $e->{session} } = $e->{user};
            $t_last = time;
        }
    }
}
my $took = defined $t_last ? $t_last - $t0 : undef;
note(defined $took ? sprintf('the last leave for B\'s members arrived %.1f s after the kill', $took)
                   : 'no leave arrived');
for my $i (0 .. $#onA) {
    my $name = $onA[$i]->welcome->{user};
    my @missing = grep { !$left{$i}{$_} } sort keys %sidB;
    ok(!@missing, "$name (on A) got a leave for each of B's 3 members within ${BOUND}s")
        or diag("missing: @missing; got: " . join(' ', sort keys %{ $left{$i} // {} }));
    my @twice = grep { $left{$i}{$_} > 1 } keys %{ $left{$i} // {} };
    ok(!@twice, "$name: no leave came twice") or diag("twice: @twice");
    my @wrong = grep { !$sidB{$_} } keys %{ $left{$i} // {} };
    ok(!@wrong, "$name: no leave for anybody but B's members") or diag("others: @wrong");
}
is_deeply({ map { ($_ => $leave_user{$_}) } grep { $sidB{$_} } keys %leave_user }, \%sidB,
          'each leave names the user of its session');
ok(defined $took && $took <= $BOUND, sprintf 'swept within %ds (%s)', $BOUND,
   defined $took ? sprintf('%.1f s', $took) : 'never');

is_deeply([sort keys %{ members_in_redis() }], [sort keys %sidA],
          "wschat:$ROOM:members holds only A's members");
my @nodes_after = @{ $redis->cmd('ZRANGE', 'wschat:nodes', 0, -1) };
note('leases after the sweep: ' . join(', ', @nodes_after));
my @b_nodes = grep { my $n = $_; !grep { $_ eq $n } @nodes_after } @nodes_before;
cmp_ok(scalar(@b_nodes), '>=', 1, 'some lease of B was dropped from wschat:nodes');
my @b_node_keys = grep { $redis->cmd('EXISTS', "wschat:node:$_") } @b_nodes;
is_deeply(\@b_node_keys, [], 'the swept nodes\' session hashes are deleted');

# --- a new joiner on A: B's members are not in its welcome
my $late = WSClient->join(port => $A->port, room => $ROOM, nick => 'late');
my $w = $late->welcome;
is($w->{count}, 3, 'a new joiner on A: count 3 (A\'s 2 and itself)');
is_deeply([sort map { $_->{session} } @{ $w->{members} // [] }],
          [sort keys %sidA, $w->{session}],
          'its members are A\'s two and itself, none of B\'s');

# B's error log: what it wrote until it was killed
my @bad = grep { /\[(?:alert|crit|emerg)\]/ || /exited on signal/ || /\[error\]/ }
          split /\n/, $B->error_log_text;
ok(!@bad, 'B\'s error log (until the kill) has no alert/crit/emerg/error/signal lines')
    or diag(join "\n", @bad);
is($B->error_log_text, $b_log_before, 'nothing was written to B\'s log after the kill');

$_->send_close(1000) for @onA, $late;
$_->is_closed_by_server(5) for @onA, $late;
ok(wait_until(sub { $redis->cmd('HLEN', "wschat:$ROOM:members") == 0 }, 10),
   'the member list is empty after A\'s members left');

done_all();
