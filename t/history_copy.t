# A worker's copy of a room's history: a member joining a room the worker
# already follows (no since=) gets its history from what the worker saw go
# by: without presence with no fetch at all, with presence with a fetch of
# the members only. The oracle throughout is Redis (XRANGE on the stream).
# (a) messages from this worker, from another nginx (another host) and from
#     a backend writing to Redis directly: a joiner's history is the newest
#     5 (websocket_chat_history 5), equal to Redis's; history_cached counts
#     it and history_fetches does not; with presence on, the same history,
#     and the member list;
# (b) the seam: 20 members join one after another while messages are in
#     flight from the other host, half with presence on; each joiner's
#     history then live messages are exactly the tail of what a member
#     present from the start got (no gap, no duplicate), with a full
#     history; all 20 come from the copy;
# (c) a history whose keep time passed (websocket_chat_history 5 1s): once
#     Redis has dropped the stream, a joiner gets an empty history; after a
#     new message, only that one;
# (d) Redis restarted empty: the copy is dropped; the next joiner fetches
#     and gets Redis's (empty) history, not what the worker had seen;
# (e) the room stays subscribed a moment after its last member leaves: a
#     member back at once is served from the copy; later the channel is
#     unsubscribed and a joiner fetches;
# (f) since=, and a history larger than the copy keeps (5 x 60 KB, send
#     buffer 1 MB) fetch, and get all of it;
# (g) the copy's first fetch, with messages in flight: 30 rooms take a
#     message every ms or two from the other host while on this one a first
#     member joins each (its fetch starts the copy) and then a second (from
#     the copy): each member's history then live messages are the room's
#     whole stream, in order, once;
# (h) the copy dropped while a member's fetch of the members only is out
#     (Redis asleep, then killed and restarted empty): the member is sent
#     Redis's history, not the worker's.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP;
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $JSON = JSON::PP->new->utf8;

my $LOC = q{
        location = /%s {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            %s
        }
};
my $server = join '',
    sprintf($LOC, 'ws5', 'websocket_chat_presence off; websocket_chat_history 5;'),
    sprintf($LOC, 'ref5', 'websocket_chat_history 5;'),
    sprintf($LOC, 'short', 'websocket_chat_presence off; websocket_chat_history 5 1s;'),
    sprintf($LOC, 'ws1k', 'websocket_chat_presence off; websocket_chat_history 1000;'),
    sprintf($LOC, 'big', 'websocket_chat_presence off; websocket_chat_history 5; websocket_chat_send_buffer 1m;'),
    "        location = /status { websocket_chat_status; }\n";

# DEBUG SLEEP for (h), from loopback only.
my $redis = start_redis(args => ['--enable-debug-command', 'local']);
my $rport = $redis->port;
# (d) restarts Redis under both; (h) kills it with bytes unread, so a reset
# may be seen too.
my @outage = (allow_errors => [qr/\[error\] .*websocket_chat: .*Redis 127\.0\.0\.1:$rport/,
    qr/\[error\] \d+#\d+: (?:recv|send|writev)\(\) failed \((?:104: Connection reset by peer|32: Broken pipe)\)/]);
my $a = start_nginx_ok('nginx A starts: 1 worker, locations with presence off and on',
    chat_config(server => $server), redis => $redis, @outage);
my $b = start_nginx_ok('nginx B (another host on the same Redis) starts',
    chat_config(server => $server), redis => $redis, @outage);

sub status_of {
    my $r = WSClient::http_request(port => $a->port, path => '/status');
    return undef unless $r && ($r->{status} // 0) == 200;
    my $j = eval { $JSON->decode($r->{body}) };
    return ref $j eq 'HASH' ? $j : undef;
}

# The counters now, once two scrapes agree (nothing in flight).
sub counters {
    my ($last, $now);
    wait_until(sub {
        $now = status_of() or return 0;
        my $same = $last && $last->{history_fetches} == $now->{history_fetches}
                   && $last->{history_cached} == $now->{history_cached};
        $last = $now;
        $same;
    }, 5, 0.1);
    return { fetched => $now->{history_fetches}, cached => $now->{history_cached} };
}

sub grew {
    my ($before) = @_;
    my $now = counters();
    return { fetched => $now->{fetched} - $before->{fetched}, cached => $now->{cached} - $before->{cached} };
}

sub join_at {
    my ($nginx, $loc, $room, $nick, %q) = @_;
    my $path = "/$loc?room=$room&nick=$nick" . join('', map { "&$_=$q{$_}" } sort keys %q);
    return WSClient->connect(port => $nginx->port, path => $path, welcome => 1);
}

# The ids in the history event that follows the welcome.
sub history_ids {
    my ($c) = @_;
    my $h = $c->wait_type('history', 5);
    return undef unless $h && ref $h->{messages} eq 'ARRAY';
    return [map { $_->{id} } @{ $h->{messages} }];
}

# Waits until $c has the message $text live; its id.
sub live_id {
    my ($c, $text) = @_;
    my $m = (grep { ($_->{type} // '') eq 'message' && ($_->{text} // '') eq $text } $c->events)[0]
        // $c->wait_for(sub { ($_[0]{type} // '') eq 'message' && ($_[0]{text} // '') eq $text }, 5);
    return $m && $m->{id};
}

# The newest $n entry ids of a stream, oldest first.
sub redis_ids {
    my ($room, $n) = @_;
    my $r = $redis->cmd('XREVRANGE', "wschat:$room", '+', '-', 'COUNT', $n);
    return [reverse map { $_->[0] } @{ ref $r eq 'ARRAY' ? $r : [] }];
}

# What a backend does to publish with history on (README: Redis keys).
sub backend_publish {
    my ($room, $text) = @_;
    my $head = qq({"type":"message","room":"$room","user":"backend","session":"backend-1","text":"$text","ts":1,"id":");
    return $redis->cmd('EVAL',
        "local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 5, '*', 'h', ARGV[1], 't', ARGV[2]) "
        . "redis.call('PUBLISH', KEYS[1], ARGV[1] .. id .. ARGV[2]) return id",
        1, "wschat:$room", $head, '"}');
}

sub same_ids {
    my ($got, $want, $what) = @_;
    is_deeply($got, $want, $what) or diag('got [' . join(' ', @{ $got // [] }) . '] want [' . join(' ', @$want) . ']');
}

# ---------------------------------------------------------------- (a)
{
    my $alice = join_at($a, 'ws5', 'ca', 'alice');
    same_ids(history_ids($alice), [], '(a) alice: the new room has no history');
    my $bob = join_at($b, 'ws5', 'ca', 'bob');
    my @seen;
    for my $i (1 .. 3) {
        $alice->send_text("a-alice-$i");
        push @seen, live_id($alice, "a-alice-$i");
        $bob->send_text("a-bob-$i");
        push @seen, live_id($alice, "a-bob-$i");
    }
    ok(backend_publish('ca', 'a-backend'), '(a) a backend wrote a message to Redis directly');
    push @seen, live_id($alice, 'a-backend');
    is(scalar(grep { defined } @seen), 7, '(a) alice got all 7 messages live');
    my $before = counters();
    my $carol = join_at($a, 'ws5', 'ca', 'carol');
    my $got = history_ids($carol);
    is_deeply(grew($before), { fetched => 0, cached => 1 },
              '(a) carol joined from the copy: history_cached +1, no fetch');
    same_ids($got, [@seen[2 .. 6]], "(a) carol's history: the newest 5, in order, the backend's included");
    same_ids($got, redis_ids('ca', 5), "(a) carol's history is Redis's newest 5");
    $before = counters();
    my $ref = join_at($a, 'ref5', 'ca', 'ref');
    same_ids(history_ids($ref), $got, '(a) a joiner with presence on: the same history');
    my $members = $ref->welcome->{members};
    is_deeply([sort map { $_->{user} } @{ ref $members eq 'ARRAY' ? $members : [] }], ['ref'],
              '(a) and the member list from Redis (the others are in without presence)');
    is_deeply(grew($before), { fetched => 1, cached => 1 },
              '(a) presence on: the members fetched, the history from the copy');
    $_->disconnect for $alice, $bob, $carol, $ref;
}

# ---------------------------------------------------------------- (b)
{
    my $alice = join_at($a, 'ws5', 'cb', 'alice');
    my $pub = join_at($b, 'ws5', 'cb', 'pub');
    history_ids($alice);
    $pub->send_text('b-warm');
    ok(live_id($alice, 'b-warm'), '(b) the room is live on A');
    my $before = counters();
    my @joiners;
    for my $i (1 .. 20) {
        # In flight through B and Redis while the next member joins on A.
        $pub->send_text("b-$i");
        push @joiners, join_at($a, $i % 2 ? 'ws5' : 'ref5', 'cb', "j$i");
        $joiners[-1]{hist} = history_ids($joiners[-1]);
    }
    $pub->send_text('b-end');
    my $end = live_id($alice, 'b-end');
    my @all = map { $_->{id} } grep { ($_->{type} // '') eq 'message' } $alice->events;
    is(scalar(@all), 22, "(b) alice (there from the start) got all 22 messages") or diag(scalar @all);
    my %at = map { ($all[$_] => $_) } 0 .. $#all;
    my $bad = 0;
    for my $j (@joiners) {
        live_id($j, 'b-end');
        my @live = map { $_->{id} } grep { ($_->{type} // '') eq 'message' } $j->events;
        my @got = (@{ $j->{hist} // [] }, @live);
        my $k = defined $got[0] ? $at{ $got[0] } : undef;
        my $ok = defined $k && "@got" eq "@all[$k .. $#all]"
                 && @{ $j->{hist} // [] } == ($k + @{ $j->{hist} } >= 5 ? 5 : $k + @{ $j->{hist} });
        $bad++ unless $ok;
        diag("joiner: history [@{ $j->{hist} // [] }] live [@live]; alice [@all]") unless $ok;
    }
    is($bad, 0, '(b) each of 20 joiners: a full history, then every later message once, in order');
    is_deeply(grew($before), { fetched => 10, cached => 20 },
              '(b) all 20 joins came from the copy; the 10 with presence fetched their members');
    $_->disconnect for $alice, $pub, @joiners;
}

# ---------------------------------------------------------------- (c)
{
    my $alice = join_at($a, 'short', 'cc', 'alice');
    history_ids($alice);
    $alice->send_text("c-$_") for 1 .. 2;
    ok(live_id($alice, 'c-2'), '(c) two messages sent');
    ok(wait_until(sub { !$redis->cmd('EXISTS', 'wschat:cc') }, 10),
       '(c) Redis dropped the history after its keep time (1s)');
    my $before = counters();
    my $dave = join_at($a, 'short', 'cc', 'dave');
    same_ids(history_ids($dave), [], '(c) dave, joining after that: an empty history');
    is(grew($before)->{cached}, 1, '(c) from the copy');
    $alice->send_text('c-3');
    my $id = live_id($alice, 'c-3');
    my $erin = join_at($a, 'short', 'cc', 'erin');
    same_ids(history_ids($erin), [$id], '(c) after a new message, a joiner gets only that one');
    same_ids(redis_ids('cc', 5), [$id], '(c) as Redis has it');
    $_->disconnect for $alice, $dave, $erin;
}

# ---------------------------------------------------------------- (d)
{
    my $alice = join_at($a, 'ws5', 'cd', 'alice');
    history_ids($alice);
    $alice->send_text("d-$_") for 1 .. 3;
    ok(live_id($alice, 'd-3'), '(d) three messages sent');
    my $frank = join_at($a, 'ws5', 'cd', 'frank');
    is(scalar(@{ history_ids($frank) // [] }), 3, '(d) the copy holds them');
    $redis->restart;
    ok($alice->wait_for(sub { ($_[0]{code} // '') eq 'redis_available' }, 15),
       '(d) Redis restarted empty; alice is told delivery resumed');
    my $before = counters();
    my $gina = join_at($a, 'ws5', 'cd', 'gina');
    same_ids(history_ids($gina), [], "(d) gina: Redis's history (empty), not the worker's");
    is(grew($before)->{fetched}, 1, '(d) gina fetched');
    my $hal = join_at($a, 'ws5', 'cd', 'hal');
    same_ids(history_ids($hal), [], '(d) hal: the same, from the copy made anew');
    $_->disconnect for $alice, $frank, $gina, $hal;
}

# ---------------------------------------------------------------- (e)
{
    my $alice = join_at($a, 'ws5', 'ce', 'alice');
    history_ids($alice);
    $alice->send_text('e-1');
    my $id = live_id($alice, 'e-1');
    $alice->send_close(1000);
    $alice->recv_close(5);
    my $before = counters();
    my $back = join_at($a, 'ws5', 'ce', 'alice');
    same_ids(history_ids($back), [$id], '(e) alice, back at once: the history');
    is_deeply(grew($before), { fetched => 0, cached => 1 }, '(e) from the copy: the room was still followed');
    $back->send_close(1000);
    $back->recv_close(5);
    ok(wait_until(sub { $redis->numsub('ce') == 0 }, 10), '(e) unsubscribed a moment after the last member left');
    $before = counters();
    my $later = join_at($a, 'ws5', 'ce', 'alice');
    same_ids(history_ids($later), [$id], '(e) a joiner after that: the history');
    is(grew($before)->{fetched}, 1, '(e) fetched');
    $later->disconnect;
}

# ---------------------------------------------------------------- (f)
{
    my $alice = join_at($a, 'ws5', 'cf', 'alice');
    history_ids($alice);
    $alice->send_text('f-1');
    my $id = live_id($alice, 'f-1');
    my $before = counters();
    my $since = join_at($a, 'ws5', 'cf', 'resumer', since => '0-1');
    same_ids(history_ids($since), [$id], '(f) since=: what came after');
    is_deeply(grew($before), { fetched => 1, cached => 0 }, '(f) fetched');

    my $big = join_at($a, 'big', 'cg', 'alice');
    history_ids($big);
    my @ids;
    for my $i (1 .. 5) {
        $big->send_text("g$i-" . ('x' x 60_000));
        push @ids, live_id($big, "g$i-" . ('x' x 60_000));
    }
    is(scalar(grep { defined } @ids), 5, '(f) five 60 KB messages sent');
    $before = counters();
    my $joiner = join_at($a, 'big', 'cg', 'bob');
    same_ids(history_ids($joiner), \@ids, '(f) 5 x 60 KB, more than a copy keeps: all of them');
    is(grew($before)->{fetched}, 1, '(f) fetched');
    $_->disconnect for $alice, $since, $big, $joiner;
}

# ---------------------------------------------------------------- (g)
{
    my @rooms = map { "cg-$_" } 1 .. 30;
    pipe(my $ready_r, my $ready_w) or die "pipe: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $ready_r;
        my %pub = map { ($_ => join_at($b, 'ws1k', $_, 'pub')) } @rooms;
        syswrite $ready_w, "ready\n";
        for my $i (1 .. 300) {
            $pub{$_}->send_text("g-$i") for @rooms;
            select(undef, undef, undef, 0.001);    # pacing, not synchronisation
        }
        $pub{$_}->send_text('g-end') for @rooms;
        $_->disconnect for values %pub;
        POSIX::_exit(0);
    }
    close $ready_w;
    my $line = '';
    my $sel = IO::Select->new($ready_r);
    sysread($ready_r, $line, 6) if $sel->can_read(10);
    is($line, "ready\n", '(g) the other host has a sender in each of 30 rooms, sending');
    my $before = counters();
    my (%first, %second);
    for my $r (@rooms) {
        $first{$r} = join_at($a, 'ws1k', $r, 'first');
        $first{$r}{hist} = history_ids($first{$r});
        $second{$r} = join_at($a, 'ws1k', $r, 'second');
        $second{$r}{hist} = history_ids($second{$r});
    }
    waitpid($pid, 0);
    is($?, 0, '(g) the sender finished');
    my $bad = 0;
    for my $r (@rooms) {
        my $stream = $redis->cmd('XRANGE', "wschat:$r", '-', '+');
        my @want = map { $_->[0] } @{ ref $stream eq 'ARRAY' ? $stream : [] };
        for my $c ($first{$r}, $second{$r}) {
            live_id($c, 'g-end');
            my @live = map { $_->{id} } grep { ($_->{type} // '') eq 'message' } $c->events;
            my @got = (@{ $c->{hist} // [] }, @live);
            next if "@got" eq "@want";
            $bad++;
            diag("$r: history [@{ $c->{hist} // [] }] live [@live]; stream [@want]");
        }
    }
    is($bad, 0, '(g) in each room, both members: history then live = the whole stream, in order, once');
    my $g = grew($before);
    is($g->{fetched} + $g->{cached}, 60, '(g) 60 joins');
    cmp_ok($g->{cached}, '>=', 1, "(g) second members came from the copy ($g->{cached} of 30)");
    $_->disconnect for values %first, values %second;
}

# ---------------------------------------------------------------- (h)
{
    my $alice = join_at($a, 'ws5', 'ch', 'alice');
    history_ids($alice);
    $alice->send_text('h-1');
    ok(live_id($alice, 'h-1'), '(h) a message; the worker has the room\'s copy');
    my $sleeper = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $rport, Proto => 'tcp', Timeout => 2)
        or die "connect to Redis: $!";
    my $cmd = "*3\r\n\$5\r\nDEBUG\r\n\$5\r\nSLEEP\r\n\$1\r\n3\r\n";
    syswrite($sleeper, $cmd) == length $cmd or die "write DEBUG SLEEP: $!";
    # Refused, it would answer at once.
    ok(!IO::Select->new($sleeper)->can_read(0.3), '(h) Redis sleeps (DEBUG SLEEP 3 unanswered after 0.3s)');
    my $before = counters();
    my $ivy = WSClient->connect(port => $a->port, path => '/ref5?room=ch&nick=ivy');
    ok($ivy, '(h) ivy (presence on) is upgraded; her fetch of the members waits on Redis');
    $redis->kill;
    $redis->restart;
    ok($ivy->wait_type('welcome', 15), '(h) Redis killed and restarted empty: ivy is welcomed');
    same_ids(history_ids($ivy), [], "(h) ivy: Redis's history (empty), not the worker's copy");
    cmp_ok(grew($before)->{fetched}, '>=', 2, '(h) the history was fetched after the members');
    $_->disconnect for $alice, $ivy;
}

done_all();
