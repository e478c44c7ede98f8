# Redis Cluster slot migration (websocket_chat_redis cluster=...): 3 primaries,
# history on, 2 workers (listen ... reuseport). Room "A" has two members
# chatting at a steady rate (each sends a numbered message every ~100 ms);
# mid-stream A's slot is migrated to another primary the standard way
# (SETSLOT IMPORTING / MIGRATING, MIGRATE ... KEYS one key at a time, SETSLOT
# NODE on every primary), with traffic going on between every two of those
# steps. Room "C", on the third primary, chats the same way meanwhile.
# Afterwards:
# * in A every message reached every member exactly once, and both members
#   saw the same sequence (same order, same ids), each sender's in order;
# * A's stream and members hash are on the new primary; PUBSUB SHARDNUMSUB
#   there counts the workers with members in A, on the old primary it is 0;
# * C is unaffected: everything once, in order, no error or notice, no pause
#   of a second;
# * per worker at most 2 connections per primary it has rooms on (at most
#   the seed connection to a primary it has none on).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;
use ChatCluster;

my $TICK = 0.05;    # one message every tick, the two members of a room in turn
my $STEP = 0.15;    # traffic between two migration steps, seconds

my $cl = ChatCluster->start(primaries => 3, replicas => 0, node_timeout => 2000);
my @P = $cl->primaries;
is(scalar @P, 3, 'cluster of 3 primaries is up');
my %node = map { $_->port => $_ } @P;

# A on X, C on Z; A moves to Y.
my $by = $cl->rooms_on_each_primary(1, 'mg');
my ($X, $Y, $Z) = @P;
my ($A) = @{ $by->{ $X->port } };
my ($C) = @{ $by->{ $Z->port } };
my $slot = $cl->room_slot($A);
note("room $A (slot $slot) on " . $X->port . ', to move to ' . $Y->port . "; room $C on " . $Z->port);

my $nginx = start_nginx_ok('nginx starts with cluster=<3 seeds>, 2 workers, history on',
    chat_config(workers => 2, listen => 'reuseport', redis => 'cluster=' . $cl->seeds,
                http => 'websocket_chat_history 1000 1h;'),
    workers => 2);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;

sub type_of { $_[0]{type} // '' }
sub chan { "wschat:{$_[0]}" }

my (%m, @all);
for my $r ($A, $C) {
    for my $k (0, 1) {
        my $c = WSClient->join(port => $port, room => $r, nick => "$r-m$k");
        push @{ $m{$r} }, $c;
        push @all, $c;
    }
    ok($m{$r}[0]->wait_type('join', 5, sub { $_[0]{user} eq "$r-m1" }), "$r: the first member sees the second join");
}
my %worker_of;
@worker_of{ 0 .. $#all } = client_workers($nginx, \@all, @workers);
my %workers_in;
for my $i (0 .. $#all) { $workers_in{ $i < 2 ? $A : $C }{ $worker_of{$i} // '' } = 1 }
note("workers with members: $A: " . join(' ', sort keys %{ $workers_in{$A} })
     . "; $C: " . join(' ', sort keys %{ $workers_in{$C} }));
ok(wait_until(sub { $cl->shardnumsub(chan($A), $X) == keys %{ $workers_in{$A} } }, 5),
   "before: SHARDNUMSUB of $A on its primary " . $X->port . ' = its number of workers');

# --- the stream
my %sent;          # "room-mk" => number sent
my $turn = 0;
my $next = time;
sub send_tick {
    return if time < $next;
    $next += $TICK;
    $next = time + $TICK if $next < time;
    my $k = $turn++ % 2;
    for my $r ($A, $C) {
        my $who = "$r-m$k";
        my $n = ++$sent{$who};
        $m{$r}[$k]->send_text("$who#$n");
    }
}
sub stream_for {
    my $secs = shift;
    my $end = time + $secs;
    while (time < $end) {
        send_tick();
        my $wait = $next - time;
        ChatCluster::pump(\@all, $wait > 0 ? $wait : 0);
    }
}

stream_for(1);
my @stages;
my $t_mig = time;
my $migrated = eval {
    $cl->migrate_slot($slot, $X, $Y, step => sub { push @stages, $_[0]; stream_for($STEP) });
};
ok($migrated, sprintf('slot %d migrated from %d to %d (%.2fs, steps: %s)', $slot, $X->port, $Y->port,
                      time - $t_mig, join(', ', @stages))) or diag($@);
my $t_mig_end = time;
stream_for(1.5);

for my $r ($A, $C) { $m{$r}[0]->send_text("$r#end") }
sub all_ended {
    return !grep { my $i = $_; my $r = $i < 2 ? $A : $C;
                   !grep { type_of($_) eq 'message' && $_->{text} eq "$r#end" } $all[$i]->events } 0 .. $#all;
}
ChatCluster::pump(\@all, 15, \&all_ended);
ok(all_ended(), 'every member receives its room\'s last message');
# --- subscriptions and connections, the members still there
is($cl->node_for_slot($slot)->port, $Y->port, "slot $slot is owned by " . $Y->port);
ok(wait_until(sub { $cl->shardnumsub(chan($A), $Y) == keys %{ $workers_in{$A} } }, 10),
   "SHARDNUMSUB of $A on its new primary " . $Y->port . ' = its number of workers ('
   . scalar(keys %{ $workers_in{$A} }) . ')') or diag('got ' . $cl->shardnumsub(chan($A), $Y));
is($cl->shardnumsub(chan($A), $X), 0, "SHARDNUMSUB of $A on its old primary " . $X->port . ' is 0');
is($cl->shardnumsub(chan($C), $Z), scalar(keys %{ $workers_in{$C} }), "SHARDNUMSUB of $C on its primary unchanged");
is($Y->cmd('HLEN', chan($A) . ':members'), 2, "$A: its members hash is on " . $Y->port);

my %in_use;
for my $i (0 .. $#all) {
    next unless defined $worker_of{$i};
    $in_use{ $worker_of{$i} }{ $i < 2 ? $Y->port : $Z->port } = 1;
}
for my $w (sort keys %in_use) {
    my $per;
    my $ok = wait_until(sub {
        $per = $cl->conns_by_pid($w)->{$w};
        my @over = grep { ($per->{$_} // 0) > ($in_use{$w}{$_} ? 2 : 1) } keys %$per;
        my @missing = grep { !$per->{$_} } keys %{ $in_use{$w} };
        return !@over && !@missing;
    }, 5);
    my $show = join(', ', map { "$_: $per->{$_}" . ($in_use{$w}{$_} ? ' (in use)' : '') } sort keys %$per) || 'none';
    # A primary it has no rooms on may still hold the seed connection.
    ok($ok, "worker $w: at most 2 connections to each primary it has rooms on ("
       . join(' ', sort keys %{ $in_use{$w} }) . '), at most 1 to any other')
        or diag("connections: $show\nCLIENT LIST of the old primary " . $X->port . ":\n"
                . join("\n", map { "  addr=$_->{addr} flags=$_->{flags} cmd=$_->{cmd} ssub=" . ($_->{ssub} // '?') } $X->client_list));
    note("worker $w connections: $show");
}
$_->send_close(1000) for @all;
is(scalar(grep { $_->recv_close(5) } @all), scalar @all, 'every member closes cleanly');

# --- delivery
for my $r ($A, $C) {
    my @seq = map { [grep { type_of($_) eq 'message' } $_->events] } @{ $m{$r} };
    for my $k (0, 1) {
        my $name = "$r-m$k";
        my %n;
        $n{ $_->{text} }++ for @{ $seq[$k] };
        my @bad;
        for my $s (0, 1) {
            my $who = "$r-m$s";
            for my $i (1 .. $sent{$who}) {
                my $c = delete $n{"$who#$i"} // 0;
                push @bad, "$who#$i x$c" if $c != 1;
            }
            my @order = map { /#(\d+)$/ ? $1 : () } grep { /^\Q$who\E#/ } map { $_->{text} } @{ $seq[$k] };
            my @out = grep { $order[$_] <= $order[$_ - 1] } 1 .. $#order;
            ok(!@out, "$name receives $who\'s messages in the order sent");
        }
        delete $n{"$r#end"};
        push @bad, map { "unexpected $_" } sort keys %n;
        ok(!@bad, "$name: every message of the room exactly once ("
           . ($sent{"$r-m0"} + $sent{"$r-m1"}) . ')') or diag(join ', ', @bad[0 .. ($#bad < 19 ? $#bad : 19)]);
    }
    is_deeply([map { "$_->{id} $_->{text}" } @{ $seq[1] }], [map { "$_->{id} $_->{text}" } @{ $seq[0] }],
              "$r: both members saw the same messages in the same order, with the same ids");
    my @other = map { my $k = $_; map { "$r-m$k: $_->{type} " . ($_->{code} // '') }
                      grep { type_of($_) =~ /^(?:error|notice|gap)$/ } $m{$r}[$k]->events } 0, 1;
    if ($r eq $C) {
        ok(!@other, "$C (not migrated): no error, notice or gap") or diag(join "\n", @other);
        for my $k (0, 1) {
            my @t = map { $_->{_t} } grep { type_of($_) eq 'message' && ($_->{_t} // 0) >= $t_mig - 0.5
                                                    && $_->{_t} <= $t_mig_end + 0.5 } $m{$C}[$k]->events;
            my $gap = 0;
            for my $i (1 .. $#t) { $gap = $t[$i] - $t[$i - 1] if $t[$i] - $t[$i - 1] > $gap }
            ok(@t >= 2 && $gap < 1, sprintf("$C-m$k: kept receiving during the migration (%d messages, longest pause %.2fs)",
                                           scalar @t, $gap));
        }
    } else {
        note("$A: events other than messages during the migration: " . (join(', ', @other) || 'none'));
        my @errs = grep { /: error / && !/redis_unavailable/ } @other;
        ok(!@errs, "$A: no error event for a message") or diag(join "\n", @errs);
    }
}

# --- where A lives now
ok($Y->cmd('XLEN', chan($A)) >= $sent{"$A-m0"} + $sent{"$A-m1"}, "$A: its stream moved to " . $Y->port . ' with every message');

ok(wait_until(sub { $cl->shardnumsub(chan($A), $Y) == 0 && $cl->shardnumsub(chan($C), $Z) == 0 }, 10),
   'everybody left: SHARDNUMSUB 0 for both rooms');

done_all();
