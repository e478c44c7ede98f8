# Presence in a busy room (more than 100 members): joins and leaves are no
# longer announced one by one but summed up in at most one `presence` event
# per worker per second, with the exact count. One nginx (worker_processes
# 2, listen ... reuseport), room "busy"; every member's socket is read all
# along (IO::Select), so nobody falls behind, and none may be closed.
# * 100 members join one by one: each welcome lists all members so far with
#   the exact count; member i gets exactly one join per member from i on
#   (its own included), none for a member who was there before it (already
#   in its welcome), and no presence event;
# * 10 more join quickly (101..110): nobody gets a join for them; each of
#   them is welcomed with 100 members listed (itself among them) and the
#   exact count; the early members get presence summaries instead, fewer
#   than 10 each (at most 2 x workers x seconds elapsed + 2), which name
#   exactly the 10 newcomers in `joined` (no `left`, nothing in `more`), and
#   whose count reaches 110 exactly; a member's running count (set by each
#   summary, +1/-1 by join/leave) ends at 110;
# * joiner 111 gets 100 members (itself among them) and count 111;
# * 20 members leave quickly: the others see summaries with `left` (the
#   room is busy until it is back to 100) and then `leave` events; between
#   them each remaining member learns of exactly the 20 who left, once each,
#   and its running count drops to exactly 91; wschat:busy:members holds
#   91 sessions.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Time::HiRes qw(time);
use JSON::PP ();
use ChatTest;
use WSClient;
use ChatFault;

my $ROOM    = 'busy';
my $WORKERS = 2;
my $BUSY    = 100;
my $LATE    = 10;     # joiners past $BUSY
my $GONE    = 20;     # members who leave at the end

my $JSON = JSON::PP->new->utf8;

my $redis = start_redis();
my $nginx = start_nginx_ok("nginx starts ($WORKERS workers, listen ... reuseport)",
    chat_config(workers => $WORKERS, listen => 'reuseport'), redis => $redis, workers => $WORKERS);
my $port = $nginx->port;

my (@c, @sid, @ev, @gone);   # clients, their sessions, their events, left on purpose
my %by_fd;

sub type_of { $_[0]{type} // '' }

# Take what a client read for itself (welcome and whatever came with it).
sub absorb {
    my $i = shift;
    push @{ $ev[$i] }, map { $_->{_t} = time; $_ } $c[$i]->events;
}

sub closed { $_[0]->eof || $_[0]->got_close }

# Record the frames read for member $i (answering pings).
sub take {
    my ($i, @frames) = @_;
    for my $f (@frames) {
        if ($f->{opcode} == 9) { $c[$i]->send_pong($f->{payload}); next }
        next unless $f->{opcode} == 1;
        my $e = eval { $JSON->decode($f->{payload}) };
        $e = { type => '_invalid_json', raw => $f->{payload} } unless ref $e eq 'HASH';
        $e->{_t} = time;
        push @{ $ev[$i] }, $e;
    }
}

# Read every member's socket for up to $secs seconds (0: only what is there),
# or until $cond returns true.
sub pump {
    my ($secs, $cond) = @_;
    my $deadline = time + $secs;
    my $rounds = 0;
    while (1) {
        return 1 if $cond && $cond->();
        my @open = grep { !$gone[$_] && $c[$_]->socket && !$c[$_]->eof } 0 .. $#c;
        my $left = $deadline - time;
        my @ready = IO::Select->new(map { $c[$_]->socket } @open)->can_read($left > 0 ? ($left < 0.05 ? $left : 0.05) : 0);
        if (!@ready) {
            return 0 if $left <= 0;
            next;
        }
        for my $s (@ready) {
            my $i = $by_fd{ fileno $s };
            take($i, $c[$i]->pending_frames(0));
        }
        return 0 if ++$rounds > 200_000;
    }
}

sub add_member {
    my $n = scalar @c;
    my $cl = eval { WSClient->join(port => $port, room => $ROOM, nick => "m$n") };
    if (!$cl) { diag("m$n could not join: $@"); return undef }
    push @c, $cl;
    push @sid, $cl->welcome->{session};
    $by_fd{ fileno $cl->socket } = $n;
    absorb($n);
    # frames read together with the welcome wait in the client's buffer
    take($n, $cl->pending_frames(0));
    pump(0);
    return $cl;
}

# A member's running count: set by each presence summary (and its
# welcome), one more per join, one less per leave, in arrival order.
sub running_count {
    my $i = shift;
    my $n;
    for my $e (@{ $ev[$i] }) {
        my $t = type_of($e);
        if ($t eq 'welcome' || $t eq 'presence') { $n = $e->{count} }
        elsif ($t eq 'join' && defined $n && $e->{session} ne $sid[$i]) { $n++ }
        elsif ($t eq 'leave' && defined $n) { $n-- }
    }
    return $n;
}

# The join ranks (1-based) of the members a welcome lists, as ranges.
sub listed_ranks {
    my $w = shift;
    my %rank = map { ($sid[$_] => $_ + 1) } 0 .. $#sid;
    my @r = sort { $a <=> $b } map { $rank{ $_->{session} // '' } // 0 } @{ $w->{members} // [] };
    my @out;
    for my $r (@r) {
        if (@out && $out[-1][1] == $r - 1) { $out[-1][1] = $r } else { push @out, [$r, $r] }
    }
    return join(',', map { $_->[0] == $_->[1] ? "#$_->[0]" : "#$_->[0]..#$_->[1]" } @out)
         . ' (in join order)';
}

sub events_of { my ($i, $type, $since) = @_;
    grep { type_of($_) eq $type && (!defined $since || $_->{_t} >= $since) } @{ $ev[$i] } }

sub not_closed_ok {
    my $what = shift;
    my @shut = grep { !$gone[$_] && closed($c[$_]) } 0 .. $#c;
    ok(!@shut, "$what: no member's connection was closed")
        or diag('closed: ' . join(', ', map { "m$_ (code " . ($c[$_]->close_code // 'none') . ')' } @shut));
}

# ---------------------------------------------------------------- 1..100
my $t_start = time;
for (1 .. $BUSY) { add_member() or last }
is(scalar(@c), $BUSY, "$BUSY members joined one by one");
pump(5, sub { grep({ type_of($_) eq 'join' && $_->{session} eq $sid[-1] } @{ $ev[0] }) });
pump(0.3);
note(sprintf '%d members joined in %.2fs', scalar(@c), time - $t_start);
my %on;
$on{ $_ // 'unattributed' }++ for client_workers($nginx, \@c);
note('members per worker: ' . join(', ', map { "$_: $on{$_}" } sort keys %on));

{
    my %rank = map { ($sid[$_] => $_) } 0 .. $#sid;
    my (@bad, @early);
    for my $i (0 .. $#c) {
        my %got;
        $got{ $_->{session} }++ for events_of($i, 'join');
        my @wrong = grep { ($got{ $sid[$_] } // 0) != 1 } $i .. $#c;
        push @bad, "m$i: joins of " . join(' ', map { "m$_ x" . ($got{ $sid[$_] } // 0) } @wrong) if @wrong;
        my @before = grep { !defined $rank{$_} || $rank{$_} < $i } keys %got;
        push @early, "m$i: joins of " . join(' ', map { defined $rank{$_} ? "m$rank{$_}" : $_ } @before)
                   . ' (listed in its welcome: '
                   . join(' ', map { my $s = $_; (grep { $_->{session} eq $s } @{ $c[$i]->welcome->{members} // [] }) ? 'yes' : 'no' } @before)
                   . ')' if @before;
    }
    ok(!@bad, "while the room has at most $BUSY members, member i gets exactly one join per member from i on (its own included)")
        or diag(join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);
    ok(!@early, 'no member gets a join for a member who joined before it (already in its welcome list)')
        or diag(join "\n", @early[0 .. ($#early < 9 ? $#early : 9)]);
    my @pres = grep { events_of($_, 'presence') } 0 .. $#c;
    ok(!@pres, "no presence summary while the room has at most $BUSY members")
        or diag('members with presence events: ' . join ' ', map { "m$_" } @pres);
    my @wc = grep { ($c[$_]->welcome->{count} // -1) != $_ + 1 } 0 .. $#c;
    ok(!@wc, 'each joiner\'s welcome count is its rank (1..100)')
        or diag(join ', ', map { "m$_: " . ($c[$_]->welcome->{count} // 'none') } @wc[0 .. ($#wc < 9 ? $#wc : 9)]);
    my @wl = grep { scalar(@{ $c[$_]->welcome->{members} // [] }) != $_ + 1 } 0 .. $#c;
    ok(!@wl, 'each joiner\'s welcome lists all members so far');
}
not_closed_ok("after $BUSY joins");

# ---------------------------------------------------------------- 101..110
my $t_late = time;
for (1 .. $LATE) { add_member() or last }
my $join_secs = time - $t_late;
is(scalar(@c), $BUSY + $LATE, "$LATE more members joined");
note(sprintf '%d late joiners in %.2fs', $LATE, $join_secs);
my @late = $BUSY .. $#c;
my %late_sid = map { ($sid[$_] => 1) } @late;

# wait until member 0 has seen every late joiner in some summary, and a
# count of 110; then read on for 1.5 s for stragglers
my $named = sub {
    my $i = shift;
    my %n;
    for my $e (events_of($i, 'presence', $t_late)) { $n{ $_->{session} // '' }++ for @{ $e->{joined} // [] } }
    return \%n;
};
pump(6, sub { my $n = $named->(0); !grep({ !$n->{$_} } keys %late_sid)
              && grep { ($_->{count} // 0) == $BUSY + $LATE } events_of(0, 'presence', $t_late) });
pump(1.5);

for my $k (@late) {
    my $w = $c[$k]->welcome;
    is($w->{count}, $k + 1, "m$k (joiner " . ($k + 1) . "): welcome count " . ($k + 1));
    is(scalar(@{ $w->{members} // [] }), $BUSY, "m$k: welcome lists $BUSY members");
    ok((grep { ($_->{session} // '') eq $sid[$k] } @{ $w->{members} // [] }),
       "m$k: the welcome list includes the joiner itself")
        or diag("m${k}'s welcome lists the members who joined " . listed_ranks($w))
        if $k == $late[0] || $k == $late[-1];
}

{
    my $elapsed_max = 0;
    my (@badjoin, @toomany, @notless, @names, @counts, @final);
    for my $i (0 .. $BUSY - 1) {
        my @j = grep { $late_sid{ $_->{session} } } events_of($i, 'join');
        push @badjoin, "m$i: " . scalar(@j) if @j;
        my @p = events_of($i, 'presence', $t_late);
        my $elapsed = @p ? $p[-1]{_t} - $t_late : 0;
        $elapsed_max = $elapsed if $elapsed > $elapsed_max;
        my $bound = 2 * $WORKERS * $elapsed + 2;
        push @toomany, sprintf('m%d: %d summaries in %.2fs (bound %.1f)', $i, scalar(@p), $elapsed, $bound)
            if @p > $bound;
        push @notless, "m$i: " . scalar(@p) if @p >= $LATE;
        my $n = $named->($i);
        my $more = 0;
        $more += ($_->{more} // 0) for @p;
        my $left = 0;
        $left += @{ $_->{left} // [] } for @p;
        push @names, "m$i: joined " . join(',', map { "${_}x$n->{$_}" } sort keys %$n) . " more=$more left=$left"
            if keys(%$n) != $LATE || grep({ !$late_sid{$_} || $n->{$_} != 1 } keys %$n) || $more || $left;
        my ($max) = sort { $b <=> $a } map { $_->{count} // 0 } @p;
        push @counts, "m$i: max " . ($max // 'none') if ($max // 0) != $BUSY + $LATE;
        my $rc = running_count($i);
        push @final, "m$i: " . ($rc // 'undef') . ' (summary counts in arrival order: '
            . join(' ', map { $_->{count} } @p) . ')' if ($rc // -1) != $BUSY + $LATE;
    }
    ok(!@badjoin, 'no early member got a join event for a joiner past 100')
        or diag(join "\n", @badjoin[0 .. ($#badjoin < 9 ? $#badjoin : 9)]);
    ok(!@toomany, "each early member got at most 2 x $WORKERS x seconds elapsed + 2 presence summaries")
        or diag(join "\n", @toomany[0 .. ($#toomany < 9 ? $#toomany : 9)]);
    my @p0 = events_of(0, 'presence', $t_late);
    my %rank = map { ($sid[$_] => $_ + 1) } 0 .. $#sid;
    my %worker_of;
    @worker_of{ @late } = client_workers($nginx, [ @c[@late] ]);
    note(sprintf 'm0 got %d presence summaries for the %d late joiners (joined in %.2fs, last summary %.2fs after the first late join): %s',
         scalar(@p0), $LATE, $join_secs, $elapsed_max,
         join('; ', map { my $p = $_; sprintf '%.2fs: count %d, joined %s', $p->{_t} - $t_late, $p->{count},
                          join(' ', map { my $r = $rank{ $_->{session} } // '?';
                                          "#$r(worker " . ($worker_of{ $r - 1 } // '?') . ')' } @{ $p->{joined} // [] }) } @p0));
    if ($join_secs < 2) {
        ok(!@notless, "the $LATE late joiners (joined in ${\ sprintf '%.2f', $join_secs}s) brought each early member fewer than $LATE summaries")
            or diag(join "\n", @notless[0 .. ($#notless < 9 ? $#notless : 9)]);
    } else {
        note("the late joins took ${join_secs}s: the fewer-than-$LATE check needs them within 2s");
    }
    ok(!@names, "the summaries name exactly the $LATE late joiners in joined, once each (no left, more = 0)")
        or diag(join "\n", @names[0 .. ($#names < 9 ? $#names : 9)]);
    ok(!@counts, 'the summaries\' count reaches ' . ($BUSY + $LATE) . ' exactly')
        or diag(join "\n", @counts[0 .. ($#counts < 9 ? $#counts : 9)]);
    ok(!@final, 'each early member\'s running count (the last summary\'s count) ends at ' . ($BUSY + $LATE))
        or diag(scalar(@final) . ' members off (HLEN wschat:busy:members is '
                . $redis->cmd('HLEN', "wschat:$ROOM:members") . "):\n"
                . join "\n", @final[0 .. ($#final < 4 ? $#final : 4)]);
}
not_closed_ok("after the late joins");

# ---------------------------------------------------------------- 111
my $x = add_member();
ok($x, 'member 111 joins');
if ($x) {
    my $w = $x->welcome;
    is($w->{count}, $BUSY + $LATE + 1, 'member 111: welcome count ' . ($BUSY + $LATE + 1));
    is(scalar(@{ $w->{members} // [] }), $BUSY, "member 111: welcome lists $BUSY members");
    my %s;
    $s{ $_->{session} // '' }++ for @{ $w->{members} // [] };
    ok(!grep({ $_ > 1 } values %s), 'member 111: no member listed twice');
    my %known = map { ($_ => 1) } @sid;
    ok(!grep({ !$known{$_} } keys %s), 'member 111: every listed session is a member\'s');
    ok($s{ $sid[-1] }, 'member 111: the welcome list includes the joiner itself')
        or diag("member 111's welcome lists the members who joined " . listed_ranks($w));
}
pump(1.5);
not_closed_ok('after member 111');

# ---------------------------------------------------------------- 20 leave
my @leavers = 1 .. $GONE;    # m1..m20; m0 stays
my %leaver_sid = map { ($sid[$_] => 1) } @leavers;
my $t_leave = time;
for my $i (@leavers) { $c[$i]->send_close(1000); $gone[$i] = 1 }
my @stay = grep { !$gone[$_] } 0 .. $#c;
my $want = @c - $GONE;
is($want, 91, "$GONE leave, $want stay");

my $learnt = sub {
    my $i = shift;
    my %n;
    $n{ $_->{session} }++ for events_of($i, 'leave', $t_leave);
    for my $e (events_of($i, 'presence', $t_leave)) { $n{ $_->{session} // '' }++ for @{ $e->{left} // [] } }
    return \%n;
};
pump(8, sub { !grep { ( running_count($_) // -1) != $want } @stay });
pump(1.5);
{
    my (@nosum, @wrong, @counts);
    for my $i (@stay) {
        my @p = events_of($i, 'presence', $t_leave);
        push @nosum, "m$i" unless grep { @{ $_->{left} // [] } } @p;
        my $n = $learnt->($i);
        my $more = 0;
        $more += ($_->{more} // 0) for @p;
        push @wrong, "m$i: " . join(',', map { "$_ x$n->{$_}" } sort keys %$n) . " more=$more"
            if keys(%$n) != $GONE || grep({ !$leaver_sid{$_} || $n->{$_} != 1 } keys %$n) || $more;
        my $rc = running_count($i);
        push @counts, "m$i: $rc (events since the leaves: " . join(' ', map {
            type_of($_) eq 'presence' ? "presence(count $_->{count}, left " . scalar(@{ $_->{left} // [] }) . ')'
                                      : type_of($_) } grep { $_->{_t} >= $t_leave } @{ $ev[$i] }) . ')'
            if ($rc // -1) != $want;
    }
    ok(!@nosum, 'every remaining member got a presence summary with left')
        or diag(join ' ', @nosum[0 .. ($#nosum < 9 ? $#nosum : 9)]);
    ok(!@wrong, "every remaining member learnt of exactly the $GONE who left, once each (leave events and summaries' left)")
        or diag(join "\n", @wrong[0 .. ($#wrong < 9 ? $#wrong : 9)]);
    ok(!@counts, "every remaining member's running count drops to exactly $want")
        or diag(scalar(@counts) . " members off:\n" . join "\n", @counts[0 .. ($#counts < 4 ? $#counts : 4)]);
    my @p0 = events_of($stay[0], 'presence', $t_leave);
    note("m$stay[0] after the leaves: " . scalar(@p0) . ' summaries (counts ' . join(' ', map { $_->{count} } @p0)
         . '), ' . scalar(events_of($stay[0], 'leave', $t_leave)) . ' leave events');
}
is($redis->cmd('HLEN', "wschat:$ROOM:members"), $want, "wschat:$ROOM:members holds $want sessions");
not_closed_ok('after the leaves');

$c[$_]->send_close(1000) for @stay;
$gone[$_] = 1 for @stay;
ok(wait_until(sub { $redis->cmd('HLEN', "wschat:$ROOM:members") == 0 }, 10),
   'the member list is empty after everybody left');
done_all();
