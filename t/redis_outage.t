# Redis outage: the sessions stay open (a ping still gets its pong), every
# member gets one "redis_unavailable" error event; what members send during
# the outage waits in the backlog; once Redis is back on the same port every
# member gets a "redis_available" notice and each outage message exactly
# once, in per-sender order; a new message goes through within 2 s of Redis
# being back. The error log tells the story.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $ROOM = 'outage';

my $redis = start_redis();
my $rport = $redis->port;
# The outage below (redis-server stopped) drops both connections of the link.
my $nginx = start_nginx_ok('nginx starts with websocket_chat_redis_timeout 1s',
    chat_config(workers => 1, http => 'websocket_chat_redis_timeout 1s;'), redis => $redis,
    allow_errors => [qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport lost: connection closed; retrying in \d+ ms$/]);
my $port = $nginx->port;

my %c;
$c{alice} = WSClient->join(port => $port, room => $ROOM, nick => 'alice');
$c{bob}   = WSClient->join(port => $port, room => $ROOM, nick => 'bob');
ok($c{$_}->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), "$_ sees bob join") for qw(alice bob);
ok(wait_until(sub { $redis->numsub($ROOM) == 1 }, 5), 'room channel subscribed');

# Every event each client received after the outage began, in order.
my %seen = (alice => [], bob => []);

# Read events for $who until $pred is true for one of them (that one
# included) or $timeout seconds pass; returns the matching event.
sub collect {
    my ($who, $pred, $timeout) = @_;
    my $deadline = time + $timeout;
    while (1) {
        my $left = $deadline - time;
        return undef if $left <= 0;
        my $ev = $c{$who}->recv_json($left) or return undef;
        push @{ $seen{$who} }, $ev;
        return $ev if $pred->($ev);
    }
}

# --- outage
my $t_stop = time;
$redis->stop;
note(sprintf 'redis-server stopped in %.2fs', time - $t_stop);

for my $who (qw(alice bob)) {
    my $e = collect($who, sub { ($_[0]{type} // '') eq 'error' }, 10);
    ok($e, "$who gets an error event when Redis goes away");
    is($e && $e->{code}, 'redis_unavailable', "$who: code redis_unavailable");
    is($e && $e->{room}, $ROOM, "$who: error event names the room");
    ok($e && defined $e->{message} && length $e->{message}, "$who: error event has a message");
}

for my $who (qw(alice bob)) {
    my ($pong, @ev) = ping_pong($c{$who}, 5);
    push @{ $seen{$who} }, @ev;
    ok($pong, "$who: still connected during the outage (ping answered with pong)");
    ok(!$c{$who}->eof && !$c{$who}->got_close, "$who: no close frame, TCP connection open");
}

# three messages each, interleaved
for my $i (1 .. 3) {
    for my $who (qw(alice bob)) {
        ok($c{$who}->send_text("$who-outage-$i"), "$who sends outage message $i");
    }
}

# let the worker fail at least one reconnect attempt (warn level) first
my $failed_re = qr/\[warn\] .*websocket_chat: \w+ connection to Redis 127\.0\.0\.1:$rport failed: .*; retrying in \d+ ms/;
ok(wait_until(sub { log_lines($nginx, $failed_re) >= 1 }, 5),
   'error log: a failed reconnect attempt during the outage ("... failed: ...; retrying in N ms", warn)')
    or diag(join "\n", log_lines($nginx, qr/websocket_chat/));

# --- Redis comes back on the same port
my $t_back = time;    # deadlines below count from the restart, its start-up included
my $outage = $t_back - $t_stop;
$redis->restart;
note(sprintf 'redis-server back on port %d after an outage of %.2fs (start-up took %.2fs)',
     $rport, $outage, time - $t_back);

for my $who (qw(alice bob)) {
    my $n = collect($who, sub { ($_[0]{type} // '') eq 'notice' }, 15);
    ok($n, "$who gets a notice after Redis is back");
    is($n && $n->{code}, 'redis_available', "$who: code redis_available");
    is($n && $n->{room}, $ROOM, "$who: notice names the room");
    note(sprintf "$who: notice %.2fs after the restart began", time - $t_back) if $n;
}

# a new message after the notice
ok($c{alice}->send_text('after-outage'), 'alice sends a message after the notice');
for my $who (qw(alice bob)) {
    my $m = collect($who, sub { ($_[0]{type} // '') eq 'message' && $_[0]{text} eq 'after-outage' }, 10);
    my $dt = time - $t_back;
    ok($m, "$who receives the message sent after the notice");
    ok($m && $dt <= 2, sprintf("$who: it arrived within 2 s of the restart of Redis (%.2fs)", $dt));
}

# --- every outage message exactly once, in per-sender order
for my $who (qw(alice bob)) {
    my @texts = map { $_->{text} } grep { ($_->{type} // '') eq 'message' } @{ $seen{$who} };
    my @outage = grep { /-outage-/ } @texts;
    for my $sender (qw(alice bob)) {
        my @from = grep { /^\Q$sender\E-outage-/ } @outage;
        is_deeply(\@from, [map { "$sender-outage-$_" } 1 .. 3],
                  "$who receives $sender\'s 3 outage messages once each, in order")
            or diag("$who received: @texts");
    }
    is(scalar(@outage), 6, "$who receives exactly 6 outage messages");
    my @errors = grep { ($_->{type} // '') eq 'error' } @{ $seen{$who} };
    is(scalar(@errors), 1, "$who got the redis_unavailable error once")
        or diag(join "\n", map { $_->{_raw} // $_->{type} } @errors);
    my @notices = grep { ($_->{type} // '') eq 'notice' } @{ $seen{$who} };
    is(scalar(@notices), 1, "$who got the redis_available notice once");
    my @other = grep { ($_->{type} // '') !~ /^(?:message|error|notice)$/ } @{ $seen{$who} };
    is(scalar(@other), 0, "$who: no other events during the outage")
        or diag(join "\n", map { $_->{_raw} // $_->{type} } @other);
}

ok(wait_until(sub { $redis->numsub($ROOM) == 1 }, 5), 'room channel subscribed again');

# --- error log
my @lost = log_lines($nginx, qr/websocket_chat: subscriber connection to Redis 127\.0\.0\.1:$rport lost: .*; retrying in \d+ ms/);
ok(@lost >= 1, 'error log: "subscriber connection to Redis 127.0.0.1:PORT lost ...; retrying in N ms"')
    or diag($nginx->error_log_text);
ok((grep { /\[error\]/ } @lost) == @lost, 'the "lost" line is at level error') or diag(join "\n", @lost);
my @back = log_lines($nginx, qr/websocket_chat: Redis 127\.0\.0\.1:$rport is available again/);
ok(@back >= 1, 'error log: "Redis 127.0.0.1:PORT is available again"')
    or diag(join "\n", grep { /websocket_chat/ } split /\n/, $nginx->error_log_text);
note($_) for log_lines($nginx, qr/websocket_chat: .*Redis/);

$_->send_close(1000) for values %c;
ok($c{$_}->is_closed_by_server(5), "$_ closed") for sort keys %c;
done_all();
