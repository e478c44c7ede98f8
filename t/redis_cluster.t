# Redis Cluster with sharded pub/sub (websocket_chat_redis cluster=...), on a
# 3-primary cluster, first with 1 worker, then with 2 (listen ... reuseport):
# * rooms are picked so that each primary owns some; every message reaches
#   every member of its room exactly once and no member of another room;
# * each room is followed with SSUBSCRIBE on the primary owning its slot
#   (PUBSUB SHARDNUMSUB there = the number of workers with members in it, 0
#   on the other primaries, and no plain SUBSCRIBE anywhere);
# * history and presence work in a room on every shard: a late joiner's
#   welcome lists the members, its history holds the room's messages in
#   order; the stream and the members hash live on the room's primary;
#   join and leave reach the room;
# * connections: per worker at most 2 per primary it has rooms on, whether
#   3 rooms or 60 rooms and 200 clients (the count does not grow);
# * when every member has left, SHARDNUMSUB is 0 (unsubscribed).
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

my $cl = ChatCluster->start(primaries => 3, replicas => 0, node_timeout => 2000);
my @P = $cl->primaries;
is(scalar @P, 3, 'cluster of 3 primaries is up');
my %node = map { $_->port => $_ } @P;

sub chan   { "wschat:{$_[0]}" }
sub type_of { $_[0]{type} // '' }

# Room => port of its primary, from a ->rooms_on_each_primary answer.
sub owners_of {
    my $by = shift;
    return map { my $p = $_; map { ($_ => $p) } @{ $by->{$p} } } keys %$by;
}

# Read events on $c until every text of @texts has arrived (as a message),
# at most $timeout seconds. True when they all did.
sub wait_texts {
    my ($c, $timeout, @texts) = @_;
    my %want = map { $_ => 1 } @texts;
    my $deadline = time + $timeout;
    while (1) {
        delete $want{ $_->{text} } for grep { type_of($_) eq 'message' } $c->events;
        return 1 unless %want;
        my $left = $deadline - time;
        return 0 if $left <= 0;
        $c->recv_json($left) or return 0;
    }
}

# Close every client and read until the server's close, so that ->events
# holds everything it was sent; then check that each client got the texts
# of %$expect{its room} exactly once and no other message.
sub close_and_check_delivery {
    my ($label, $clients, $room_of, $expect) = @_;
    $_->send_close(1000) for @$clients;
    my ($closed, @bad) = (0);
    for my $i (0 .. $#$clients) {
        my $c = $clients->[$i];
        $closed++ if $c->recv_close(5);
        my $room = $room_of->[$i];
        my %n;
        for my $m (grep { type_of($_) eq 'message' } $c->events) {
            push @bad, "client $i ($room) got a message of room $m->{room}: $m->{text}"
                if $m->{room} ne $room;
            $n{ $m->{text} }++;
        }
        for my $t (@{ $expect->{$room} }) {
            my $k = delete $n{$t} // 0;
            push @bad, "client $i ($room) got '$t' $k times" if $k != 1;
        }
        push @bad, map { "client $i ($room) got unexpected '$_'" } sort keys %n;
    }
    is($closed, scalar @$clients, "$label: every client closed cleanly");
    ok(!@bad, "$label: every message reached every member of its room exactly once, and no other room")
        or diag(join "\n", @bad[0 .. ($#bad < 19 ? $#bad : 19)]);
}

# Connections per worker to the cluster's nodes, checked against 2 per
# primary the worker has rooms on. $rooms_of->{pid} = [room, ...]. Waits
# (5 s) for every in-use primary to have at least one connection of the
# worker, so that "at most" is not measured before the connections exist.
# Returns {pid => total}.
sub check_conns {
    my ($label, $pids, $rooms_of, $owner) = @_;
    my %in_use = map { my $pid = $_; ($pid => { map { ($owner->{$_} => 1) } @{ $rooms_of->{$pid} } }) } @$pids;
    my $c;
    wait_until(sub {
        $c = $cl->conns_by_pid(@$pids);
        !grep { my $pid = $_; grep { !$c->{$pid}{$_} } keys %{ $in_use{$pid} } } @$pids;
    }, 5);
    my %total;
    for my $pid (@$pids) {
        my $per = $c->{$pid};
        my $n_use = keys %{ $in_use{$pid} };
        $total{$pid} = 0;
        $total{$pid} += $_ for values %$per;
        my $show = join(', ', map { "$_: $per->{$_}" } sort keys %$per) || 'none';
        ok(!grep({ !$per->{$_} } keys %{ $in_use{$pid} }),
           "$label: worker $pid is connected to each of the $n_use primaries it has rooms on")
            or diag("connections: $show");
        ok(!grep({ $_ > 2 } values %$per), "$label: worker $pid has at most 2 connections to any node")
            or diag("connections: $show");
        ok($total{$pid} <= 2 * $n_use,
           "$label: worker $pid holds $total{$pid} connections to the cluster, at most 2 x $n_use")
            or diag("connections: $show");
    }
    return \%total;
}

# Join $n_per_room members into each room of @$rooms, in turns; returns
# (clients, room of each).
sub join_members {
    my ($port, $rooms, $n, $tag) = @_;
    my (@c, @room);
    for my $i (0 .. $n - 1) {
        my $r = $rooms->[$i % @$rooms];
        my $c = eval { WSClient->join(port => $port, room => $r, nick => "$tag$i") };
        if (!$c) { diag("client $tag$i in $r: $@"); last }
        push @c, $c;
        push @room, $r;
    }
    return (\@c, \@room);
}

# SHARDNUMSUB of each room on its owner, and 0 on the other primaries.
sub check_shardnumsub {
    my ($label, $rooms, $owner, $want) = @_;
    my @bad;
    for my $r (@$rooms) {
        my $w = ref $want ? $want->{$r} : $want;
        my $got;
        wait_until(sub { ($got = $cl->shardnumsub(chan($r), $node{ $owner->{$r} })) == $w }, 10);
        push @bad, "$r on its primary $owner->{$r}: $got, not $w" if $got != $w;
        for my $p (grep { $_ != $owner->{$r} } keys %node) {
            my $o = $cl->shardnumsub(chan($r), $node{$p});
            push @bad, "$r on primary $p (not its owner): $o" if $o;
        }
    }
    ok(!@bad, "$label") or diag(join "\n", @bad[0 .. ($#bad < 19 ? $#bad : 19)]);
}

my $HTTP = 'websocket_chat_history 50 1h;';
my $REDIS = 'cluster=' . $cl->seeds;

# =============================================================== one worker
my $nginx = start_nginx_ok('nginx starts with websocket_chat_redis cluster=<3 seeds>, 1 worker',
    chat_config(workers => 1, redis => $REDIS, http => $HTTP));
my $port = $nginx->port;
my ($wpid) = $nginx->worker_pids;

my $by = $cl->rooms_on_each_primary(1, 'a');
my %owner = owners_of($by);
my @rooms = sort keys %owner;
is(scalar(keys %{ { map { $_ => 1 } values %owner } }), 3, 'rooms a*: one on each primary: '
   . join(', ', map { "$_ on $owner{$_}" } @rooms));

# --- three members per room; presence
my (%m, @all, @room_of);
for my $r (@rooms) {
    for my $i (0 .. 2) {
        my $c = WSClient->join(port => $port, room => $r, nick => "$r-m$i");
        push @{ $m{$r} }, $c;
        push @all, $c;
        push @room_of, $r;
    }
}
for my $r (@rooms) {
    my $w = $m{$r}[2]->welcome;
    my @listed = sort map { $_->{user} } @{ $w->{members} // [] };
    is_deeply(\@listed, [map { "$r-m$_" } 0 .. 2], "$r (on $owner{$r}): the third member's welcome lists the three members");
    is($w->{count}, 3, "$r: welcome count 3");
    ok($m{$r}[0]->wait_type('join', 5, sub { $_[0]{user} eq "$r-m2" }), "$r: the first member sees the third one's join");
    is($node{ $owner{$r} }->cmd('HLEN', chan($r) . ':members'), 3,
       "$r: the members hash is on the room's primary with the 3 members");
}

check_shardnumsub('1 worker: each room is SSUBSCRIBEd (SHARDNUMSUB 1) on its primary only',
                  \@rooms, \%owner, 1);
my @plain = grep { $_->[1] } map { my $n = $_; map { [$_, $n->cmd('PUBSUB', 'NUMSUB', chan($_))->[1]] } @rooms } @P;
ok(!@plain, 'no plain SUBSCRIBE of a room channel on any node')
    or diag(join ', ', map { "$_->[0]: $_->[1]" } @plain);

# --- chat: every member sends one message
my %expect;
for my $r (@rooms) {
    for my $i (0 .. 2) {
        my $t = "$r:m$i:hello";
        $m{$r}[$i]->send_text($t);
        push @{ $expect{$r} }, $t;
    }
}
for my $r (@rooms) {
    my $ok = grep { wait_texts($_, 5, @{ $expect{$r} }) } @{ $m{$r} };
    is($ok, 3, "$r: all three members receive the room's three messages");
}

# --- history on each shard: a late joiner gets the messages in order
for my $r (@rooms) {
    my $late = WSClient->join(port => $port, room => $r, nick => "$r-late");
    my $h = $late->wait_type('history', 5);
    my @texts = map { $_->{text} } @{ $h ? $h->{messages} : [] };
    my @ids = map { $_->{id} } @{ $h ? $h->{messages} : [] };
    # the order is the room's order, the one its members saw
    my @seen = map { $_->{text} } grep { type_of($_) eq 'message' } $m{$r}[0]->events;
    is_deeply(\@texts, \@seen, "$r (on $owner{$r}): the late joiner's history is the room's 3 messages in order")
        or diag("history: @texts; member 0 saw: @seen");
    my $xr = $node{ $owner{$r} }->cmd('XRANGE', chan($r), '-', '+');
    is_deeply([map { $_->[0] } @$xr], \@ids, "$r: history ids are those of the stream on the room's primary");
    is(scalar(@{ $late->welcome->{members} // [] }), 4, "$r: the late joiner's welcome lists 4 members");
    my $j = $m{$r}[1]->wait_type('join', 5, sub { $_[0]{user} eq "$r-late" });
    ok($j, "$r: a member sees the late joiner's join");
    $late->send_close(1000);
    ok($late->recv_close(5), "$r: the late joiner closes");
    my $l = $m{$r}[1]->wait_type('leave', 5, sub { $_[0]{user} eq "$r-late" });
    is($l && $l->{session}, $late->welcome->{session}, "$r: the members see its leave, with its session");
    ok(wait_until(sub { $node{ $owner{$r} }->cmd('HLEN', chan($r) . ':members') == 3 }, 5),
       "$r: the members hash is back to 3");
}
my $small = check_conns('1 worker, 3 rooms', [$wpid], { $wpid => \@rooms }, \%owner);

# --- 60 rooms, 200 clients: the same connections
my $big_by = $cl->rooms_on_each_primary(20, 'b');
my %big_owner = owners_of($big_by);
my @big_rooms = sort keys %big_owner;
my $t0 = time;
my ($bc, $broom) = join_members($port, \@big_rooms, 200, 'b');
is(scalar @$bc, 200, sprintf('200 clients joined 60 rooms (%.1fs)', time - $t0));
my %big_expect;
my %first;
for my $i (0 .. $#$bc) { $first{ $broom->[$i] } //= $i }
for my $r (@big_rooms) {
    my $t = "$r:hi";
    $bc->[ $first{$r} ]->send_text($t);
    $big_expect{$r} = [$t];
}
my $got = grep { wait_texts($bc->[$_], 5, @{ $big_expect{ $broom->[$_] } }) } 0 .. $#$bc;
is($got, scalar @$bc, 'every one of the 200 clients receives its room\'s message');
check_shardnumsub('1 worker: each of the 60 rooms is SSUBSCRIBEd on its primary only', \@big_rooms, \%big_owner, 1);
my %all_owner = (%owner, %big_owner);
my $large = check_conns('1 worker, 63 rooms, 209 clients', [$wpid], { $wpid => [@rooms, @big_rooms] }, \%all_owner);
ok($large->{$wpid} <= $small->{$wpid},
   "1 worker: the connection count did not grow ($small->{$wpid} with 3 rooms, $large->{$wpid} with 63)");

close_and_check_delivery('1 worker, 60 rooms', $bc, $broom, \%big_expect);
close_and_check_delivery('1 worker, 3 rooms', \@all, \@room_of, \%expect);
check_shardnumsub('1 worker: all members left: SHARDNUMSUB 0 for every room', [@rooms, @big_rooms], \%all_owner, 0);
$nginx->stop;

# =============================================================== two workers
$nginx = start_nginx_ok('nginx starts with cluster=<3 seeds>, 2 workers, listen ... reuseport',
    chat_config(workers => 2, listen => 'reuseport', redis => $REDIS, http => $HTTP), workers => 2);
$port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;
is(scalar @workers, 2, 'two workers running');

$by = $cl->rooms_on_each_primary(1, 'c');
%owner = owners_of($by);
@rooms = sort keys %owner;

# Members per room until both workers hold some (the kernel spreads
# connections by a hash of the client's port): bounded by 30 per room.
my (%mw, %on);
(@all, @room_of) = ();
for my $r (@rooms) {
    my $n = 0;
    while ($n < 30) {
        my $c = WSClient->join(port => $port, room => $r, nick => "$r-" . $n++);
        my $w = client_worker($nginx, $c, @workers);
        push @{ $mw{$r} }, [$c, $w];
        push @all, $c;
        push @room_of, $r;
        $on{$r}{$w // ''}++;
        last if $n >= 3 && !grep { !$on{$r}{$_} } @workers;
    }
    is(scalar(grep { $on{$r}{$_} } @workers), 2, "$r (on $owner{$r}): members on both workers ($n joined)");
}
check_shardnumsub('2 workers: each room has SHARDNUMSUB 2 on its primary, 0 elsewhere', \@rooms, \%owner, 2);

# A sender on each worker in each room.
%expect = ();
for my $r (@rooms) {
    for my $w (@workers) {
        my ($s) = grep { ($_->[1] // 0) == $w } @{ $mw{$r} };
        next unless $s;
        my $t = "$r:from-$w";
        $s->[0]->send_text($t);
        push @{ $expect{$r} }, $t;
    }
}
for my $r (@rooms) {
    my $n = @{ $mw{$r} };
    my $ok = grep { wait_texts($_->[0], 5, @{ $expect{$r} }) } @{ $mw{$r} };
    is($ok, $n, "$r: all $n members, on both workers, receive the message sent on each worker");
}
my %rooms_of = map { my $w = $_; ($w => [grep { $on{$_}{$w} } @rooms]) } @workers;
$small = check_conns('2 workers, 3 rooms', \@workers, \%rooms_of, \%owner);

$big_by = $cl->rooms_on_each_primary(20, 'd');
%big_owner = owners_of($big_by);
@big_rooms = sort keys %big_owner;
($bc, $broom) = join_members($port, \@big_rooms, 200, 'd');
is(scalar @$bc, 200, '2 workers: 200 clients joined 60 rooms');
my @bw = client_workers($nginx, $bc, @workers);
my %workers_in;
$workers_in{ $broom->[$_] }{ $bw[$_] // '' } = 1 for 0 .. $#$bc;
%first = ();
%big_expect = ();
for my $i (0 .. $#$bc) { $first{ $broom->[$i] } //= $i }
for my $r (@big_rooms) {
    my $t = "$r:hi";
    $bc->[ $first{$r} ]->send_text($t);
    $big_expect{$r} = [$t];
}
$got = grep { wait_texts($bc->[$_], 5, @{ $big_expect{ $broom->[$_] } }) } 0 .. $#$bc;
is($got, scalar @$bc, '2 workers: every one of the 200 clients receives its room\'s message');
check_shardnumsub('2 workers: each of the 60 rooms has SHARDNUMSUB = its number of workers with members',
                  \@big_rooms, \%big_owner, { map { $_ => scalar keys %{ $workers_in{$_} } } @big_rooms });
%all_owner = (%owner, %big_owner);
my %all_rooms_of;
for my $w (@workers) {
    $all_rooms_of{$w} = [@{ $rooms_of{$w} }, grep { $workers_in{$_}{$w} } @big_rooms];
}
$large = check_conns('2 workers, 63 rooms, 200+ clients', \@workers, \%all_rooms_of, \%all_owner);
for my $w (@workers) {
    # Only comparable when the worker already had rooms on every primary.
    my %had = map { $owner{$_} => 1 } @{ $rooms_of{$w} };
    next unless keys %had == 3;
    ok($large->{$w} <= $small->{$w},
       "2 workers: worker $w: the connection count did not grow ($small->{$w} with 3 rooms, $large->{$w} with 63)");
}

close_and_check_delivery('2 workers, 60 rooms', $bc, $broom, \%big_expect);
close_and_check_delivery('2 workers, 3 rooms', \@all, \@room_of, \%expect);
check_shardnumsub('2 workers: all members left: SHARDNUMSUB 0 for every room', [@rooms, @big_rooms], \%all_owner, 0);

done_all();
