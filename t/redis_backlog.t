# websocket_chat_redis_backlog 1k (the minimum): during a Redis outage a
# member sends ~300-byte messages until one does not fit the backlog; that
# one is refused with a "backlog_full" error event to its sender and is
# never delivered; the messages accepted before it are delivered to the
# other member (and the sender) once Redis is back, in order.
# A message longer than the whole backlog: with Redis reachable it is
# published; during the outage it is taken while no more than the backlog
# waits, and the next one is refused (at most the backlog and one message
# more), and it too is delivered once Redis is back.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

# A message refused for a full backlog is an error-level line.
ChatTest::allow_errors_in_file(qr/: message of "alice" in "backlog" not sent: the queue to Redis is full, client: /);

my $ROOM = 'backlog';
my $MAX  = 20;    # bound on the messages sent while waiting for the refusal

my $redis = start_redis();
my $rport = $redis->port;
# The outage below (redis-server stopped) drops both connections of the link.
my $nginx = start_nginx_ok('nginx starts with websocket_chat_redis_backlog 1k',
    chat_config(workers => 1,
                http => "websocket_chat_redis_timeout 1s;\n    websocket_chat_redis_backlog 1k;"),
    redis => $redis,
    allow_errors => [qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport lost: connection closed; retrying in \d+ ms$/]);
my $port = $nginx->port;

my $alice = WSClient->join(port => $port, room => $ROOM, nick => 'alice');
my $bob   = WSClient->join(port => $port, room => $ROOM, nick => 'bob');
ok($_->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), 'bob\'s join seen') for $alice, $bob;

ok($alice->send_text('long-' . ('z' x 3000)), 'Redis reachable: alice sends 3005 bytes, more than the backlog');
for my $x ([alice => $alice], [bob => $bob]) {
    ok($x->[1]->wait_type('message', 5, sub { $_[0]{text} =~ /^long-z+$/ && length $_[0]{text} == 3005 }),
       "$x->[0] receives it");
}
is(scalar(grep { ($_->{code} // '') eq 'backlog_full' } $alice->events), 0, '... and alice no backlog_full');

$redis->stop;
for my $x ([alice => $alice], [bob => $bob]) {
    my $e = $x->[1]->wait_type('error', 10);
    is($e && $e->{code}, 'redis_unavailable', "$x->[0] gets redis_unavailable");
}

sub text_for { my $i = shift; my $h = sprintf 'bl-%02d-', $i; $h . ('x' x (300 - length $h)) }

# Send one message at a time. After each, a ping: the module handles the
# client's frames in order, so a refusal of the message comes before the
# pong. Stop at the first backlog_full error.
my (@accepted, $refused, $refusal, @other_events);
for my $i (1 .. $MAX) {
    ok($alice->send_text(text_for($i)), "alice sends message $i (300 bytes)") or last;
    my ($pong, @ev) = ping_pong($alice, 5);
    my ($full) = grep { ($_->{type} // '') eq 'error' && ($_->{code} // '') eq 'backlog_full' } @ev;
    push @other_events, grep { !($full && $_ == $full) } @ev;
    if ($full) {
        $refused = $i;
        $refusal = $full;
        last;
    }
    ok($pong, "alice: message $i accepted (pong, no backlog_full error)") or last;
    push @accepted, $i;
}
ok($refused, "alice gets a backlog_full error within $MAX messages")
    or do { diag("no backlog_full refusal; nothing more to check"); done_all(); exit };
note('accepted before the refusal: ' . scalar(@accepted) . " message(s); refused: message $refused");
ok(@accepted >= 1, 'at least one 300-byte message fits a 1k backlog');
ok(@accepted <= 3, 'at most three 300-byte messages fit a 1k backlog');
is($refusal->{type}, 'error', 'refusal is an error event');
is($refusal->{room}, $ROOM, 'backlog_full names the room');
ok(defined $refusal->{message} && length $refusal->{message}, 'backlog_full has a message');
is(scalar(@other_events), 0, 'no other events while sending during the outage')
    or diag(join "\n", map { $_->{type} . ' ' . ($_->{code} // '') } @other_events);
my $b_err = grep { ($_->{code} // '') eq 'backlog_full' } $bob->events;
is($b_err, 0, 'bob (who sent nothing) got no backlog_full error');

sub long_for { my $h = sprintf 'bl-%02d-', $_[0]; $h . ('y' x (4000 - length $h)) }
sub refused { grep { ($_->{type} // '') eq 'error' && ($_->{code} // '') eq 'backlog_full' } @_ }
ok($alice->send_text(long_for(50)), 'alice sends 4000 bytes, more than the whole backlog');
my ($pong, @ev) = ping_pong($alice, 5);
ok($pong && !refused(@ev), '... it is taken: no more than the backlog waits') and push @accepted, 50;
ok($alice->send_text(long_for(51)), 'alice sends another 4000 bytes');
($pong, @ev) = ping_pong($alice, 5);
ok(scalar refused(@ev), '... that one is refused: the backlog is past its size');

# --- Redis back
$redis->restart;
my (%got, %notice);
for my $x ([alice => $alice], [bob => $bob]) {
    my ($who, $c) = @$x;
    $notice{$who} = $c->wait_type('notice', 15, sub { $_[0]{code} eq 'redis_available' });
    ok($notice{$who}, "$who gets the redis_available notice");
}
# a marker after the notice: everything of the backlog is published before it
$alice->send_text('marker');
for my $x ([alice => $alice], [bob => $bob]) {
    my ($who, $c) = @$x;
    ok($c->wait_type('message', 10, sub { $_[0]{text} eq 'marker' }), "$who receives the marker");
    my @seq = map { $_->{text} =~ /^bl-(\d\d)-/ ? 0 + $1 : () }
              grep { ($_->{type} // '') eq 'message' } $c->events;
    is_deeply(\@seq, \@accepted,
              "$who receives exactly the accepted messages (" . join(',', @accepted)
              . "), in order, and not the refused message $refused")
        or diag("$who received: @seq");
    my ($one) = grep { ($_->{type} // '') eq 'message' && $_->{text} =~ /^bl-/ } $c->events;
    is($one && length $one->{text}, 300, "$who: backlog message text intact") if @accepted;
}

$_->send_close(1000) for $alice, $bob;
ok($_->is_closed_by_server(5), 'closed') for $alice, $bob;
done_all();
