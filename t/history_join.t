# History on join (websocket_chat_history):
# (a) a new member's first events are welcome, then one history event with
#     the room's messages in order (text, ids increasing, the sender's user
#     and session on each; the ids are those of the room's Redis stream),
#     then live events;
# (b) websocket_chat_history 5 in a location: a joiner gets only the newest
#     5; websocket_chat_send_buffer 4k: only the newest messages that fit;
#     send_buffer 4k burst=0, with four messages whose events just fit in
#     4096 bytes: the history leaves room for its own frame and what is
#     queued before it, so the joiner gets fewer of them and is not closed;
# (c) the seam: while one publisher sends continuously (forked child, 100/s
#     for 3 s), 15 members join one by one on 2 workers (listen ... reuseport);
#     for each joiner the ids of its history then its live messages are
#     strictly increasing (no duplicate), its history is the newest messages
#     up to its last one, and every message after that arrives live (no gap),
#     compared with members present from the start; what each joiner sends
#     right after its welcome reaches it;
# (d) websocket_chat_history off: no history event, no stream in Redis,
#     messages still flow with ids that are not stream positions;
# (e) the history survives a reload (HUP): a member joining afterwards sees
#     the earlier messages.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatIds;
use ChatFault;

# ---------------------------------------------------------------- helpers

sub history_events { grep { type_of($_) eq 'history' } $_[0]->events }

# Wait until $c has received a message with text $text; returns it.
sub wait_text {
    my ($c, $text, $timeout) = @_;
    return (grep { type_of($_) eq 'message' && $_->{text} eq $text } $c->events)[0]
        // $c->wait_for(sub { type_of($_[0]) eq 'message' && $_[0]{text} eq $text }, $timeout // 5);
}

sub short { my $s = join ' ', @_; length $s > 300 ? substr($s, 0, 300) . '...' : $s }

# Read whatever is there on every client, for $secs seconds.
sub drain {
    my ($clients, $secs) = @_;
    my $deadline = time + $secs;
    my %by = map { (fileno($_->socket) => $_) } grep { $_->socket && !$_->eof } @$clients;
    return unless %by;
    my $sel = IO::Select->new(map { $_->socket } values %by);
    while ((my $left = $deadline - time) > 0) {
        for my $s ($sel->can_read($left)) {
            my $c = $by{ fileno $s };
            my $n = 0;
            while ($n++ < 1000 && defined $c->recv_json(0.001)) { }
            $sel->remove($s) if $c->eof;
        }
    }
}

my $LOC_TEMPLATE = q{
        location = /%s {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            %s
        }
};
my $extra = sprintf($LOC_TEMPLATE, 'ws5', 'websocket_chat_history 5;')
          . sprintf($LOC_TEMPLATE, 'small', 'websocket_chat_send_buffer 4k;')
          . sprintf($LOC_TEMPLATE, 'tight', 'websocket_chat_send_buffer 4k burst=0;')
          . sprintf($LOC_TEMPLATE, 'nohist', 'websocket_chat_history off;');

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts: 2 workers, reuseport, locations with history 5, send_buffer 4k, history off',
    chat_config(workers => 2, listen => 'reuseport', server => $extra),
    redis => $redis, workers => 2);
my $port = $nginx->port;

# ---------------------------------------------------------------- (a)
my @a_texts = map { "a-message-$_" } 1 .. 5;
my (@a_ids, $alice_sid);
{
    my $alice = WSClient->join(port => $port, room => 'hj-a', nick => 'alice');
    $alice_sid = $alice->welcome->{session};
    ok(defined $alice_sid && length $alice_sid, '(a) alice: welcome carries a session id');
    my $h = $alice->recv_json(5);
    is(type_of($h), 'history', '(a) alice: the event right after welcome is history');
    is_deeply($h && $h->{messages}, [], '(a) alice: the history of a new room is empty');
    is($h && $h->{room}, 'hj-a', '(a) alice: history names the room');
    ok($h && defined $h->{ts} && $h->{ts} =~ /^\d+$/, '(a) alice: history has a ts');

    $alice->send_text($_) for @a_texts;
    for my $t (@a_texts) {
        my $m = wait_text($alice, $t, 5);
        ok($m, "(a) alice receives '$t' live");
        push @a_ids, $m ? $m->{id} : undef;
    }
    ok(!grep({ !is_pos($_) } @a_ids), '(a) message ids are stream ids <ms>-<seq>') or diag("ids: @a_ids");
    is(first_not_increasing(@a_ids), -1, '(a) ids increase in sending order') or diag("ids: @a_ids");
    my $stream = $redis->cmd('XRANGE', 'wschat:hj-a', '-', '+');
    is_deeply([map { $_->[0] } @$stream], \@a_ids, '(a) the ids are the entry ids of the stream wschat:hj-a')
        or diag(explain($stream));

    my $bob = WSClient->join(port => $port, room => 'hj-a', nick => 'bob');
    is(scalar($bob->skipped), 0, '(a) bob: welcome is the first event');
    my $bh = $bob->recv_json(5);
    is(type_of($bh), 'history', '(a) bob: the second event is history');
    my @msgs = $bh && ref $bh->{messages} eq 'ARRAY' ? @{ $bh->{messages} } : ();
    is_deeply([map { $_->{text} } @msgs], \@a_texts, '(a) bob: history holds the 5 messages, oldest first');
    is_deeply([map { $_->{id} } @msgs], \@a_ids, '(a) bob: history ids are the live ids, increasing');
    is(scalar(grep { type_of($_) eq 'message' } @msgs), 5, '(a) bob: each history entry is a message event');
    is(scalar(grep { ($_->{session} // '') eq $alice_sid && ($_->{user} // '') eq 'alice' } @msgs), 5,
       "(a) bob: each history entry carries alice's user and session id");
    is(scalar(grep { ($_->{room} // '') eq 'hj-a' && ($_->{ts} // '') =~ /^\d+$/ } @msgs), 5,
       '(a) bob: each history entry has room and ts');

    ok($bob->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), '(a) bob: then live events: his own join');
    $alice->send_text('a-live');
    my $live = wait_text($bob, 'a-live', 5);
    ok($live, '(a) bob receives a live message after the history');
    ok($live && is_pos($live->{id}) && cmp_id($a_ids[-1], $live->{id}) < 0,
       '(a) its id is greater than the last history id');
    push @a_texts, 'a-live';
    push @a_ids, $live ? $live->{id} : undef;
    is(scalar(history_events($bob)), 1, '(a) bob got exactly one history event');
    is(scalar(grep { $_->{text} =~ /^a-message-/ } live_messages($bob)), 0,
       '(a) bob: the history messages do not come again live');
    $_->send_close(1000) for $alice, $bob;
    $_->is_closed_by_server(5) for $alice, $bob;
}

# ---------------------------------------------------------------- (b)
{
    my $s = WSClient->join(port => $port, location => '/ws5', room => 'hj-b', nick => 'sender');
    my @ids;
    $s->send_text("b-$_") for 1 .. 12;
    for my $i (1 .. 12) {
        my $m = wait_text($s, "b-$i", 5);
        push @ids, $m ? $m->{id} : undef;
    }
    is(scalar(grep { defined } @ids), 12, '(b) history 5: the sender receives its 12 messages');
    my $j = WSClient->join(port => $port, location => '/ws5', room => 'hj-b', nick => 'joiner');
    my $h = $j->recv_json(5);
    is(type_of($h), 'history', '(b) history 5: welcome, then history');
    my @m = $h && ref $h->{messages} eq 'ARRAY' ? @{ $h->{messages} } : ();
    is_deeply([map { $_->{text} } @m], [map { "b-$_" } 8 .. 12], '(b) history 5: only the newest 5, oldest first');
    is_deeply([map { $_->{id} } @m], [@ids[7 .. 11]], '(b) history 5: with their live ids');
    $_->send_close(1000) for $s, $j;

    # send buffer 4k: the newest messages whose events fit in 4096 bytes
    my $big = WSClient->join(port => $port, location => '/small', room => 'hj-b4', nick => 'big');
    my @raw;
    for my $i (1 .. 10) {
        $big->send_text(sprintf('b4-%02d-', $i) . ('x' x 1000));
        my $tag = sprintf 'b4-%02d-', $i;
        my $m = $big->wait_for(sub { type_of($_[0]) eq 'message' && index($_[0]{text}, $tag) == 0 }, 5);
        push @raw, $m ? $m->{_raw} : undef;
    }
    is(scalar(grep { defined } @raw), 10, '(b) send_buffer 4k: the sender receives its 10 messages of 1 KB');
    my ($fit, $used) = (0, 0);
    for my $r (reverse grep { defined } @raw) {
        last if $used + length($r) + 1 > 4096;
        $used += length($r) + 1;
        $fit++;
    }
    my $j4 = WSClient->join(port => $port, location => '/small', room => 'hj-b4', nick => 'j4');
    my $h4 = $j4->recv_json(5);
    is(type_of($h4), 'history', '(b) send_buffer 4k: welcome, then history');
    my @m4 = $h4 && ref $h4->{messages} eq 'ARRAY' ? @{ $h4->{messages} } : ();
    is_deeply([map { substr($_->{text}, 0, 5) } @m4], [map { sprintf 'b4-%02d', $_ } 11 - $fit .. 10],
              "(b) send_buffer 4k: the newest $fit messages that fit in 4096 bytes, oldest first");
    ok($fit >= 2 && $fit < 10, "(b) send_buffer 4k: the budget cuts the history ($fit of 10 fit)");
    $_->send_close(1000) for $big, $j4;
}

# ---------------------------------------------------------------- (b) burst=0
{
    my $room = 'hj-tight';
    my $big = WSClient->join(port => $port, location => '/tight', room => $room, nick => 'big');
    # What an event adds to its text, to size the texts so that four events
    # take 4064 of the 4096 bytes: 32 bytes too few for the history's frame.
    $big->send_text('t-00-' . ('x' x 100));
    my $probe = $big->wait_for(sub { type_of($_[0]) eq 'message' && index($_[0]{text}, 't-00-') == 0 }, 5);
    my $overhead = $probe ? length($probe->{_raw}) - 105 : 0;
    ok($overhead > 50, "(b) burst=0: an event adds $overhead bytes to its text");
    my @raw;
    for my $i (1 .. 6) {
        my $tag = sprintf 't-%02d-', $i;
        $big->send_text($tag . ('x' x (1015 - $overhead - length $tag)));
        my $m = $big->wait_for(sub { type_of($_[0]) eq 'message' && index($_[0]{text}, $tag) == 0 }, 5);
        push @raw, $m ? $m->{_raw} : undef;
    }
    is_deeply([map { defined $_ ? length $_ : undef } @raw], [(1015) x 6],
              '(b) burst=0: six events of 1015 bytes, four of which fill 4064 of 4096 bytes');
    my $j = WSClient->join(port => $port, location => '/tight', room => $room, nick => 'tight');
    my $h = $j->recv_json(5);
    is(type_of($h), 'history', '(b) burst=0: welcome, then history');
    my @m = $h && ref $h->{messages} eq 'ARRAY' ? @{ $h->{messages} } : ();
    ok(@m >= 1 && @m < 4, '(b) burst=0: the history leaves out what would not fit with its frame (' . scalar(@m) . ' of 4)');
    is_deeply([map { substr($_->{text}, 0, 4) } @m], [map { sprintf 't-%02d', $_ } 7 - @m .. 6],
              '(b) burst=0: the newest messages, oldest first');
    $big->send_text('t-live');
    ok(wait_text($j, 't-live', 5), '(b) burst=0: the joiner gets the next message live');
    ok(!defined $j->close_code && !$j->eof, '(b) burst=0: the joiner is not closed')
        or diag('close code ' . ($j->close_code // 'none'));
    $_->send_close(1000) for $big, $j;
}

# ---------------------------------------------------------------- (c) the seam
{
    # 100 messages a second for 3 s (HISTORY_SEAM_RATE=N: N a second, to stress it)
    my $RATE = $ENV{HISTORY_SEAM_RATE} || 100;
    my $N_PUB = 3 * $RATE;
    my $N_JOIN = 15;
    my $room = 'hj-seam';
    my @workers = sort { $a <=> $b } $nginx->worker_pids;

    my $pub = WSClient->join(port => $port, room => $room, nick => 'pub');
    my $ref = WSClient->join(port => $port, room => $room, nick => 'ref');
    ok($pub->wait_type('join', 5, sub { $_[0]{user} eq 'ref' }), '(c) publisher sees the reference member join');

    my $t0 = time;
    my $child = fork;
    die "fork: $!" unless defined $child;
    if ($child == 0) {
        # The publisher: only writes on its socket; the parent reads it.
        for my $i (1 .. $N_PUB) {
            my $d = $t0 + ($i - 1) / $RATE - time;
            select(undef, undef, undef, $d) if $d > 0;
            $pub->send_text("seam-$i") or POSIX::_exit(1);
        }
        POSIX::_exit(0);
    }

    my @joiners;
    my @all = ($pub, $ref);
    for my $k (1 .. $N_JOIN) {
        my $due = $t0 + 0.1 + ($k - 1) * 0.19;
        drain(\@all, $due - time) if $due > time;
        my $j = eval { WSClient->join(port => $port, room => $room, nick => "j$k") };
        if (!$j) { diag("(c) joiner $k: $@"); last }
        $j->send_text("hello-j$k");
        push @joiners, $j;
        push @all, $j;
    }
    note(sprintf '(c) %d joiners joined within %.2fs of the first message', scalar(@joiners), time - $t0);
    my $status;
    wait_until(sub {
        drain(\@all, 0.05);
        my $r = waitpid($child, WNOHANG);
        $status = $? if $r == $child;
        return $r == $child || $r == -1;
    }, 15) or do { kill 'KILL', $child; waitpid($child, 0) };
    is($status, 0, "(c) the publisher sent $N_PUB messages");
    is(scalar(@joiners), $N_JOIN, "(c) $N_JOIN members joined one by one while it sent");
    my @owner = client_workers($nginx, \@joiners, @workers);
    my %per;
    $per{ $_ // 'unknown' }++ for @owner;
    note('(c) joiners per worker: ' . join(', ', map { "$_: $per{$_}" } sort keys %per));
    is(scalar(grep { $per{$_} } @workers), 2, '(c) joiners on both workers');

    # Every hello has reached the reference member; then an end marker.
    ok(wait_until(sub {
        drain([$ref], 0.05);
        my %t = map { $_->{text} => 1 } live_messages($ref);
        !grep { !$t{"hello-j$_"} } 1 .. @joiners;
    }, 10), "(c) the reference member got every joiner's hello");
    $pub->send_text('seam-end');
    my $ended = 0;
    for my $c (@all) {
        $ended++ if wait_text($c, 'seam-end', 10);
    }
    is($ended, scalar(@all), '(c) every member receives the end marker');

    # What a member received, as ids: history, then live, up to the end marker.
    my $upto_end = sub {
        my @l;
        for my $m (live_messages($_[0])) { push @l, $m; last if $m->{text} eq 'seam-end' }
        return @l;
    };
    my @ref_live = $upto_end->($ref);
    my @ref_ids = map { $_->{id} } @ref_live;
    my %ref_idx = map { ($ref_ids[$_] => $_) } 0 .. $#ref_ids;
    is(scalar(@ref_ids), $N_PUB + @joiners + 1, '(c) the reference member received every message once')
        or diag('texts: ' . short(map { $_->{text} } @ref_live));
    is(first_not_increasing(@ref_ids), -1, '(c) reference: ids strictly increasing');
    is_deeply([map { $_->{text} } grep { $_->{text} =~ /^seam-\d+$/ } @ref_live],
              [map { "seam-$_" } 1 .. $N_PUB], '(c) reference: the publisher\'s messages in order');
    is_deeply([map { $_->{id} } $upto_end->($pub)], \@ref_ids,
              '(c) the publisher received the same ids in the same order');

    my (@bad_order, @bad_hist, @bad_live, @no_hello, @bad_start, @sizes);
    for my $k (1 .. @joiners) {
        my $j = $joiners[$k - 1];
        my @ev = $j->events;
        my $wsid = $j->welcome->{session};
        push @bad_start, "j$k: " . short(map { type_of($_) } @ev[0 .. 2])
            unless type_of($ev[0]) eq 'welcome' && type_of($ev[1]) eq 'history'
                && scalar(history_events($j)) == 1;
        my $h = type_of($ev[1]) eq 'history' ? $ev[1] : { messages => [] };
        my @h = map { $_->{id} } @{ $h->{messages} // [] };
        my @l = map { $_->{id} } $upto_end->($j);
        push @sizes, scalar(@h);
        if ((my $i = first_not_increasing(@h, @l)) >= 0) {
            my @s = (@h, @l);
            push @bad_order, "j$k: history " . scalar(@h) . ", live " . scalar(@l)
                . ", at #$i: $s[$i - 1] then $s[$i]";
        }
        # The history: the newest messages (up to 100) up to its last one.
        my $last = @h ? $ref_idx{ $h[-1] } : -1;
        if (@h && !defined $last) {
            push @bad_hist, "j$k: last history id $h[-1] unknown to the reference";
            next;
        }
        my $from = $last - 99 < 0 ? 0 : $last - 99;
        my @want_h = $last >= 0 ? @ref_ids[$from .. $last] : ();
        push @bad_hist, "j$k: history " . short(@h) . ' want ' . short(@want_h)
            unless "@h" eq "@want_h";
        # Live: exactly everything after it.
        my @want_l = @ref_ids[$last + 1 .. $#ref_ids];
        if ("@l" ne "@want_l") {
            my %got = map { $_ => 1 } @l;
            my %want = map { $_ => 1 } @want_l;
            my @missing = grep { !$got{$_} } @want_l;
            my @extra = grep { !$want{$_} } @l;
            push @bad_live, "j$k: live " . scalar(@l) . ' want ' . scalar(@want_l)
                . '; missing ' . short(@missing) . '; unexpected ' . short(@extra);
        }
        push @no_hello, "j$k" unless grep { $_->{text} eq "hello-j$k" && ($_->{session} // '') eq $wsid }
            live_messages($j);
    }
    note("(c) history sizes of the joiners: @sizes");
    is_deeply(\@bad_start, [], '(c) each joiner: welcome, then exactly one history') or diag(join "\n", @bad_start);
    is_deeply(\@bad_order, [], '(c) each joiner: ids strictly increasing across history then live (no duplicate)')
        or diag(join "\n", @bad_order);
    is_deeply(\@bad_hist, [], '(c) each joiner: the history is the newest messages up to its last one')
        or diag(join "\n", @bad_hist);
    is_deeply(\@bad_live, [], '(c) each joiner: every message after its history arrives live (no gap)')
        or diag(join "\n", @bad_live);
    is_deeply(\@no_hello, [], '(c) each joiner receives the message it sent right after its welcome')
        or diag(join "\n", @no_hello);
    ok((grep { $_ > 0 } @sizes) >= @joiners - 1, '(c) the joiners came while the room was busy (non-empty histories)');
    $_->send_close(1000) for @all;
    $_->is_closed_by_server(5) for @all;
}

# ---------------------------------------------------------------- (d) off
{
    my $x = WSClient->join(port => $port, location => '/nohist', room => 'hj-off', nick => 'x');
    my $y = WSClient->join(port => $port, location => '/nohist', room => 'hj-off', nick => 'y');
    ok($x->wait_type('join', 5, sub { $_[0]{user} eq 'y' }), '(d) history off: x sees y join');
    $x->send_text("off-$_") for 1 .. 3;
    my @m = map { wait_text($y, "off-$_", 5) } 1 .. 3;
    is(scalar(grep { defined } @m), 3, '(d) history off: messages still flow');
    my @ids = map { $_ ? $_->{id} : undef } @m;
    ok(!grep({ !defined $_ || !length $_ || is_pos($_) } @ids), '(d) history off: ids are not stream positions')
        or diag("ids: @{[map { $_ // 'undef' } @ids]}");
    my %u = map { ($_ // '') => 1 } @ids;
    is(scalar(keys %u), 3, '(d) history off: ids are unique');
    for my $c ([x => $x], [y => $y]) {
        is(scalar(history_events($c->[1])), 0, "(d) history off: $c->[0] got no history event");
        isnt(type_of(($c->[1]->events)[1]), 'history', "(d) history off: $c->[0]'s second event is not history");
    }
    is($redis->cmd('EXISTS', 'wschat:hj-off'), 0, '(d) history off: no stream in Redis for the room');
    $_->send_close(1000) for $x, $y;
}

# ---------------------------------------------------------------- (e) reload
{
    my @new = eval { $nginx->reload(workers => 2) };
    is(scalar(@new), 2, '(e) reload: two new workers') or diag($@);
    my $c = WSClient->join(port => $port, room => 'hj-a', nick => 'after');
    my $h = $c->recv_json(5);
    is(type_of($h), 'history', '(e) after reload: welcome, then history');
    my @m = $h && ref $h->{messages} eq 'ARRAY' ? @{ $h->{messages} } : ();
    is_deeply([map { $_->{text} } @m], \@a_texts, '(e) after reload: the history holds the earlier messages');
    is_deeply([map { $_->{id} } @m], \@a_ids, '(e) after reload: with the same ids');
    $c->send_text('after-reload');
    my $l = wait_text($c, 'after-reload', 5);
    ok($l && is_pos($l->{id}) && cmp_id($a_ids[-1], $l->{id}) < 0, '(e) after reload: a new message follows them');
    $c->send_close(1000);
    $c->is_closed_by_server(5);
}

done_all();
