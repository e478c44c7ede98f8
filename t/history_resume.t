# Resuming with since=<id> (or a Last-Event-ID header):
# (a) a member that saw messages up to X, left, and comes back with since=X
#     gets welcome, then a history of exactly what it missed, in order, no
#     gap event, then live messages;
# (b) the same with the Last-Event-ID header;
# (c) websocket_chat_history 5, 12 missed: a gap event {since: X} just
#     before a history of the newest 5;
# (d) a since newer than anything: empty history, no gap;
# (e) a malformed since (abc, 1-2-3, 5000 bytes; as argument or header):
#     error bad_since, then the recent history; the worker survives and the
#     room keeps chatting;
# (f) since pointing at an entry Redis trimmed (MAXLEN ~ with history 5 and
#     300 messages): a gap; also through a location keeping 100, where
#     fewer were missed than it keeps but one of them was trimmed;
# (g) websocket_chat_history 100 1s: once a room's history has expired,
#     a member that missed messages from before that gets a gap, also
#     when newer messages have been stored since.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatIds;

# ---------------------------------------------------------------- helpers

sub wait_text {
    my ($c, $text, $timeout) = @_;
    return (grep { type_of($_) eq 'message' && $_->{text} eq $text } $c->events)[0]
        // $c->wait_for(sub { type_of($_[0]) eq 'message' && $_[0]{text} eq $text }, $timeout // 5);
}

sub hist_msgs {
    my $h = shift;
    return () unless type_of($h) eq 'history' && ref $h->{messages} eq 'ARRAY';
    return @{ $h->{messages} };
}

sub short { my $s = join ' ', map { $_ // 'undef' } @_; length $s > 300 ? substr($s, 0, 300) . '...' : $s }

sub types { join ' ', map { type_of($_) . (type_of($_) eq 'error' ? "($_->{code})" : '') } @_ }

# $sender sends "$prefix$i" for each $i of @n and waits for each to come back;
# returns their ids.
sub say_all {
    my ($sender, $prefix, @n) = @_;
    $sender->send_text("$prefix$_") for @n;
    return map { my $m = wait_text($sender, "$prefix$_", 5); $m ? $m->{id} : undef } @n;
}

# Connect with since (query argument) or headers; returns the client.
sub resume {
    my (%o) = @_;
    my $path = ($o{location} // '/ws') . "?room=$o{room}&nick=" . ($o{nick} // 'back');
    $path .= '&since=' . WSClient::uri_escape($o{since}) if defined $o{since};
    return WSClient->connect(port => $o{port}, path => $path, headers => $o{headers}, welcome => 1);
}

# The first events after the welcome, up to and including the history
# event (at most 4 events, each within 5 s).
sub opening {
    my $c = shift;
    my @ev = ($c->welcome);
    for (1 .. 4) {
        my $e = $c->recv_json(5) or last;
        push @ev, $e;
        last if type_of($e) eq 'history';
    }
    return @ev;
}

my $redis;

# The fields of XINFO STREAM that tell what was trimmed.
sub xinfo_summary {
    my $info = $redis->cmd('XINFO', 'STREAM', shift);
    my %i;
    for (my $k = 0; $k + 1 < @$info; $k += 2) {
        my $v = $info->[$k + 1];
        $i{ $info->[$k] } = ref $v eq 'ARRAY' ? $v->[0] : $v;
    }
    return join ', ', map { "$_=" . ($i{$_} // 'absent') }
        qw(length entries-added max-deleted-entry-id recorded-first-entry-id first-entry last-generated-id);
}

$redis = start_redis();
my $nginx = start_nginx_ok('nginx starts (locations with websocket_chat_history 5 and 100 1s)',
    chat_config(server => q{
        location = /ws5 {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_history 5;
        }
        location = /ws1s {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_history 100 1s;
        }
}), redis => $redis);
my $port = $nginx->port;

# ---------------------------------------------------------------- (a), (b)
for my $how (['since', 'rs-a'], ['Last-Event-ID', 'rs-b']) {
    my ($kind, $room) = @$how;
    my $t = "($kind)";
    my $bob = WSClient->join(port => $port, room => $room, nick => 'bob');
    my $alice = WSClient->join(port => $port, room => $room, nick => 'alice');
    my @seen = say_all($bob, 'm', 1 .. 3);
    my $x;
    for my $i (1 .. 3) {
        my $m = wait_text($alice, "m$i", 5);
        $x = $m && $m->{id};
    }
    ok(is_pos($x) && $x eq $seen[2], "$t alice read up to m3 (id X = " . ($x // 'undef') . ')');
    $alice->send_close(1000);
    ok($alice->is_closed_by_server(5), "$t alice left");
    my @missed = say_all($bob, 'm', 4 .. 8);
    is(scalar(grep { is_pos($_) } @missed), 5, "$t bob sent m4..m8 while alice was away");

    my $back = $kind eq 'since'
        ? resume(port => $port, room => $room, nick => 'alice', since => $x)
        : resume(port => $port, room => $room, nick => 'alice', headers => { 'Last-Event-ID' => $x });
    my @ev = opening($back);
    is(types(@ev), 'welcome history', "$t resume: welcome, then history (no gap)");
    my @h = hist_msgs($ev[-1]);
    is_deeply([map { $_->{text} } @h], [map { "m$_" } 4 .. 8], "$t resume: the history holds exactly the missed m4..m8, in order");
    is_deeply([map { $_->{id} } @h], \@missed, "$t resume: with their ids");
    $bob->send_text('m9');
    my $l = wait_text($back, 'm9', 5);
    ok($l, "$t resume: then live messages");
    ok($l && cmp_id($missed[-1], $l->{id}) < 0, "$t resume: the live one is newer than the history");
    is(scalar(grep { type_of($_) eq 'gap' } $back->events), 0, "$t resume: no gap event at all");
    is_deeply([map { $_->{text} } live_messages($back)], ['m9'], "$t resume: nothing from the history again live");
    $_->send_close(1000) for $bob, $back;
}

# since= wins over a Last-Event-ID header when both are sent
{
    my $s = WSClient->join(port => $port, room => 'rs-both', nick => 's');
    my @ids = say_all($s, 'p', 1 .. 4);
    my $c = resume(port => $port, room => 'rs-both', since => $ids[2], headers => { 'Last-Event-ID' => $ids[0] });
    my @ev = opening($c);
    is_deeply([map { $_->{text} } hist_msgs($ev[-1])], ['p4'],
              'since= and Last-Event-ID both sent: the query argument decides');
    $_->send_close(1000) for $s, $c;
}

# ---------------------------------------------------------------- (c)
{
    my $bob = WSClient->join(port => $port, location => '/ws5', room => 'rs-c', nick => 'bob');
    my ($x) = (say_all($bob, 'c', 0))[0];
    my @ids = say_all($bob, 'c', 1 .. 12);
    is(scalar(grep { is_pos($_) } $x, @ids), 13, '(c) history 5: X, then 12 more messages');
    my $back = resume(port => $port, location => '/ws5', room => 'rs-c', since => $x);
    my @ev = opening($back);
    is(types(@ev), 'welcome gap history', '(c) 12 missed, 5 kept: welcome, gap, then history');
    my ($gap) = grep { type_of($_) eq 'gap' } @ev;
    is($gap && $gap->{since}, $x, '(c) the gap event names since = X');
    is($gap && $gap->{room}, 'rs-c', '(c) the gap event names the room');
    ok($gap && defined $gap->{message} && length $gap->{message}, '(c) the gap event has a message');
    my @h = hist_msgs($ev[-1]);
    is_deeply([map { $_->{text} } @h], [map { "c$_" } 8 .. 12], '(c) the history holds the newest 5, in order');
    is_deeply([map { $_->{id} } @h], [@ids[7 .. 11]], '(c) with their ids');

    # exactly 5 missed: no gap
    my $back5 = resume(port => $port, location => '/ws5', room => 'rs-c', since => $ids[6]);
    my @ev5 = opening($back5);
    is(types(@ev5), 'welcome history', '(c) exactly 5 missed: no gap');
    is_deeply([map { $_->{text} } hist_msgs($ev5[-1])], [map { "c$_" } 8 .. 12], '(c) exactly 5 missed: all 5');
    $_->send_close(1000) for $bob, $back, $back5;
}

# ---------------------------------------------------------------- (d)
{
    my $s = WSClient->join(port => $port, room => 'rs-d', nick => 's');
    say_all($s, 'd', 1 .. 3);
    my $c = resume(port => $port, room => 'rs-d', since => '99999999999999-0');
    my @ev = opening($c);
    is(types(@ev), 'welcome history', '(d) since newer than anything: welcome, history, no gap');
    is_deeply([hist_msgs($ev[-1])], [], '(d) the history is empty');
    $s->send_text('d-live');
    ok(wait_text($c, 'd-live', 5), '(d) live messages follow');
    my $e = resume(port => $port, room => 'rs-empty', since => '1-0');
    my @eev = opening($e);
    is(types(@eev), 'welcome gap history', '(d) a room with no history at all, since older than its keep time: gap, empty history');
    $_->send_close(1000) for $s, $c, $e;
}

# ---------------------------------------------------------------- (e)
{
    my @workers = $nginx->worker_pids;
    my $bob = WSClient->join(port => $port, room => 'rs-e', nick => 'bob');
    my $carol = WSClient->join(port => $port, room => 'rs-e', nick => 'carol');
    my @recent = say_all($bob, 'e', 1 .. 3);
    my $n = 0;
    for my $bad (['abc', 'since=abc'], ['1-2-3', 'since=1-2-3'], ['1-', 'since=1-'],
                 ['x' x 5000, 'since=5000 bytes'],
                 ['99999999999999999999999-1', 'since=23-digit ms'],
                 ['abc', 'Last-Event-ID: abc', 1], ['y' x 5000, 'Last-Event-ID: 5000 bytes', 1]) {
        my ($since, $what, $header) = @$bad;
        my $c = eval {
            $header ? resume(port => $port, room => 'rs-e', headers => { 'Last-Event-ID' => $since })
                    : resume(port => $port, room => 'rs-e', since => $since);
        };
        ok($c, "(e) $what: the handshake succeeds") or do { diag($@); next };
        my @ev = opening($c);
        is(types(@ev), 'welcome error(bad_since) history', "(e) $what: welcome, error bad_since, then history");
        my ($err) = grep { type_of($_) eq 'error' } @ev;
        ok($err && defined $err->{message} && length $err->{message}, "(e) $what: the error has a message");
        is_deeply([map { $_->{id} } hist_msgs($ev[-1])], \@recent, "(e) $what: the recent history, as on a fresh join");
        $n++;
        $bob->send_text("after-$n");
        ok(wait_text($carol, "after-$n", 5), "(e) $what: the other members keep chatting");
        ok(wait_text($c, "after-$n", 5), "(e) $what: the resumed client gets live messages");
        $c->send_close(1000);
        $c->is_closed_by_server(5);
        # later messages must not show up in the next client's "recent" list
        my ($m) = grep { $_->{text} eq "after-$n" } live_messages($carol);
        push @recent, $m ? $m->{id} : "after-$n (not received)";
    }
    is_deeply([sort $nginx->worker_pids], [sort @workers], '(e) the worker survived (same pid)');
    $_->send_close(1000) for $bob, $carol;
}

# ---------------------------------------------------------------- (f)
{
    my $N = 300;
    my $bob = WSClient->join(port => $port, location => '/ws5', room => 'rs-f', nick => 'bob');
    $bob->send_text("f$_") for 1 .. $N;
    my $last = wait_text($bob, "f$N", 15);
    ok($last, "(f) history 5: bob's $N messages come back");
    my @ids = map { $_->{id} } grep { $_->{text} =~ /^f\d+$/ } live_messages($bob);
    is(scalar(@ids), $N, "(f) bob received all $N");
    my $len = $redis->cmd('XLEN', 'wschat:rs-f');
    my $first = $redis->cmd('XRANGE', 'wschat:rs-f', '-', '+', 'COUNT', 1);
    my $oldest = $first->[0][0];
    my ($oi) = grep { $ids[$_] eq ($oldest // '') } 0 .. $#ids;
    note("(f) the stream keeps $len entries; the oldest is message " . (defined $oi ? $oi + 1 : '?'));
    ok($len < $N && defined $oi && $oi >= 2, '(f) Redis trimmed the stream (MAXLEN ~): f1 and f2 are gone');
    my $x = $ids[1];    # f2: trimmed
    is_deeply($redis->cmd('XRANGE', 'wschat:rs-f', $x, $x), [], "(f) X = f2's id ($x) is no longer in the stream");

    my $back = resume(port => $port, location => '/ws5', room => 'rs-f', since => $x);
    my @ev = opening($back);
    is(types(@ev), 'welcome gap history', '(f) resume at a trimmed id: welcome, gap, history');
    my ($gap) = grep { type_of($_) eq 'gap' } @ev;
    is($gap && $gap->{since}, $x, '(f) the gap names since');
    is_deeply([map { $_->{id} } hist_msgs($ev[-1])], [@ids[$N - 5 .. $N - 1]], '(f) then the newest 5');

    # Through a location keeping 100 (fetching up to 101) fewer are missed
    # than it keeps: only what Redis trimmed can tell that some are lost.
    # Redis 7 leaves max-deleted-entry-id at 0-0 when XADD MAXLEN trims.
    if (defined $oi && $oi >= 2 && $len <= 100) {
        my $lost = $oi;    # f$oi, the newest trimmed entry
        my $c2 = resume(port => $port, room => 'rs-f', since => $ids[$oi - 2]);
        my @e2 = opening($c2);
        is(types(@e2), 'welcome gap history',
           '(f) 100 kept, since = f' . ($oi - 1) . ": gap, as f$lost is no longer in the stream")
            or diag("since=$ids[$oi - 2] (f" . ($oi - 1) . "), f$lost=$ids[$oi - 1] trimmed; XINFO STREAM wschat:rs-f: "
                    . xinfo_summary('wschat:rs-f'));
        is_deeply([map { $_->{id} } hist_msgs($e2[-1])], [@ids[$oi .. $N - 1]],
                  '(f) then all that is kept (f' . ($oi + 1) . "..f$N)");
        # since = the newest trimmed entry: nothing after it is lost (a gap
        # may be reported or not: the history cannot tell this case apart)
        my $c1 = resume(port => $port, room => 'rs-f', since => $ids[$oi - 1]);
        my @e1 = opening($c1);
        like(types(@e1), qr/^welcome (?:gap )?history$/, "(f) since = f$lost (trimmed, the newest such): welcome, [gap,] history");
        is_deeply([map { $_->{id} } hist_msgs($e1[-1])], [@ids[$oi .. $N - 1]],
                  "(f) since = f$lost: everything after it ($len messages)");
        note("(f) since = f$lost: " . types(@e1));
        $_->send_close(1000) for $c1, $c2;
    } else {
        fail("(f) the stream keeps $len entries from message " . (defined $oi ? $oi + 1 : '?')
             . ': expected at most 100 to tell a trimmed gap from a counted one');
    }
    $_->send_close(1000) for $bob, $back;
}

# ---------------------------------------------------------------- (g)
# websocket_chat_history 100 1s: the room's history expires after 1 s of
# quiet; a member that missed messages from before that gets a gap.
{
    my $bob = WSClient->join(port => $port, location => '/ws1s', room => 'rs-g', nick => 'bob');
    my ($x) = say_all($bob, 'g', 1);
    my ($lost) = say_all($bob, 'g', 2);
    ok(is_pos($x) && is_pos($lost), '(g) X = g1, then g2');
    ok(wait_until(sub { !$redis->cmd('EXISTS', 'wschat:rs-g') }, 5),
       '(g) the stream wschat:rs-g expires after 1 s of quiet');
    my $c1 = resume(port => $port, location => '/ws1s', room => 'rs-g', since => $x);
    my @e1 = opening($c1);
    is(types(@e1), 'welcome gap history', '(g) expired, since = g1 (g2 lost): welcome, gap, history');
    is_deeply([hist_msgs($e1[-1])], [], '(g) expired: the history is empty');
    my ($new) = say_all($bob, 'g', 3);
    my $c2 = resume(port => $port, location => '/ws1s', room => 'rs-g', since => $x);
    my @e2 = opening($c2);
    is(types(@e2), 'welcome gap history', '(g) expired, then g3 sent; since = g1 (g2 lost): welcome, gap, history')
        or diag("since=$x, g2=$lost lost with the expired stream, g3=$new; XINFO STREAM wschat:rs-g: "
                . xinfo_summary('wschat:rs-g'));
    is_deeply([map { $_->{text} } hist_msgs($e2[-1])], ['g3'], '(g) the history holds g3 only');
    my $c3 = resume(port => $port, location => '/ws1s', room => 'rs-g', since => $lost);
    my @e3 = opening($c3);
    like(types(@e3), qr/^welcome (?:gap )?history$/, '(g) since = g2, the last before the expiry: [gap,] history');
    is_deeply([map { $_->{text} } hist_msgs($e3[-1])], ['g3'], '(g) since = g2: g3');
    note('(g) since = g2: ' . types(@e3));
    $_->send_close(1000) for $bob, $c1, $c2, $c3;
}

done_all();
