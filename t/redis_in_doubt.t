# A message in flight when the connection to Redis drops (single Redis,
# one worker, history on, so a message is one EVALSHA on the command
# connection). Redis is put to sleep with DEBUG SLEEP 3 from a connection
# of the test's own; alice then sends a message, which nginx writes to the
# command connection and Redis leaves unread (seen in /proc/net/tcp as
# bytes queued at Redis's end of that connection); Redis is killed (-9)
# while asleep and restarted on the same port. Checks:
# * alice, the sender, gets an error event with code message_in_doubt, once;
# * bob, in the same room on the same worker (the same command connection),
#   gets no message_in_doubt;
# * both get redis_unavailable, then redis_available after the restart;
# * the message in doubt reaches nobody twice; messages sent after the
#   recovery, by either member, reach both;
# * the worker is the same process throughout.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $ROOM  = 'doubt';
my $SLEEP = 3;     # seconds DEBUG SLEEP holds Redis
# Long enough that the queued bytes cannot be anything but the message
# (a lease renewal or a PING is far shorter).
my $TEXT  = 'in-doubt:' . ('x' x 600);

sub type_of { $_[0]{type} // '' }
sub codes   { join ' ', map { "$_->{type}($_->{code})" } grep { type_of($_) =~ /^(?:error|notice)$/ } @_ }

# DEBUG is refused by default (enable-debug-command no); "local" allows it
# from loopback connections only.
my $redis = start_redis(args => ['--enable-debug-command', 'local']);
my $rport = $redis->port;

my $nginx = start_nginx_ok('nginx starts: 1 worker, history on',
    chat_config(workers => 1, http => 'websocket_chat_history 50 1h;'), redis => $redis,
    # Redis dies with unread bytes in its socket: the kernel resets the
    # connections, so nginx may see a reset as well as a close.
    allow_errors => [
        qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport lost: [^;]+; retrying in \d+ ms$/,
        qr/\[error\] \d+#\d+: (?:recv|send|writev)\(\) failed \((?:104: Connection reset by peer|32: Broken pipe)\)/]);
my $port = $nginx->port;
my @workers = $nginx->worker_pids;
is(scalar @workers, 1, 'one worker');
my $wpid = $workers[0];

my $alice = WSClient->join(port => $port, room => $ROOM, nick => 'alice');
my $bob   = WSClient->join(port => $port, room => $ROOM, nick => 'bob');
ok($alice->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), 'alice sees bob join');
# A first message loads the history script, so that the one in doubt is a
# plain EVALSHA queued behind nothing.
$alice->send_text('warm-up');
for my $c ($alice, $bob) {
    ok($c->wait_type('message', 5, sub { $_[0]{text} eq 'warm-up' }),
       $c->welcome->{user} . ' receives the warm-up message');
}

# Bytes Redis has not read yet on the connections the worker holds to it:
# the receive queue of Redis's end of each (/proc/net/tcp, "tx:rx" column).
sub unread_at_redis {
    my $own = socket_owners($wpid);
    my %worker_port = map { $_->{local_port} => 1 }
                      grep { $_->{remote_port} == $rport && $own->{ $_->{inode} } } tcp_connections($rport);
    return unread_from(\%worker_port);
}

# Receive queue at Redis's end of the connections from the client ports %$from.
sub unread_from {
    my $from = shift;
    open my $fh, '<', '/proc/net/tcp' or return 0;
    my $n = 0;
    while (<$fh>) {
        next unless /^\s*\d+: [0-9A-F]{8}:([0-9A-F]{4}) [0-9A-F]{8}:([0-9A-F]{4}) 01 [0-9A-F]{8}:([0-9A-F]{8})/;
        $n += hex $3 if hex($1) == $rport && $from->{ hex $2 };
    }
    return $n;
}

is(unread_at_redis(), 0, 'before the sleep Redis has read everything nginx sent');

# --- Redis asleep
my $sleeper = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $rport, Proto => 'tcp', Timeout => 2)
    or die "connect to Redis: $!";
binmode $sleeper;
my $cmd = "*3\r\n\$5\r\nDEBUG\r\n\$5\r\nSLEEP\r\n\$1\r\n$SLEEP\r\n";
syswrite($sleeper, $cmd) == length $cmd or die "write DEBUG SLEEP: $!";
my $t_sleep = time;
# Redis has taken the command off the socket (and runs it at once): asleep.
ok(wait_until(sub { unread_from({ $sleeper->sockport => 1 }) == 0 }, 1, 0.01),
   "Redis has read DEBUG SLEEP $SLEEP");
ok(!IO::Select->new($sleeper)->can_read(0), 'and not answered it: it sleeps');

# --- alice's message reaches Redis's socket, unread
ok($alice->send_text($TEXT), 'alice sends a message while Redis sleeps');
my $unread = 0;
ok(wait_until(sub { ($unread = unread_at_redis()) >= length $TEXT }, 1, 0.01),
   'nginx has written the message to Redis, which has not read it (' . $unread . ' bytes queued)');
ok(time - $t_sleep < $SLEEP - 0.5, sprintf('this is %.2fs into the %ds sleep', time - $t_sleep, $SLEEP));

# --- kill -9 while asleep, then start again on the same port
$redis->kill;
close $sleeper;
my $t_kill = time;
note(sprintf 'Redis killed %.2fs into its sleep', $t_kill - $t_sleep);

# Everything each member receives from the kill on.
my %seen = (alice => [], bob => []);
my %c = (alice => $alice, bob => $bob);
sub collect {
    my ($who, $pred, $timeout) = @_;
    my $found = (grep { $pred->($_) } @{ $seen{$who} })[0];
    return $found if $found;
    my $deadline = time + $timeout;
    while ((my $left = $deadline - time) > 0) {
        my $ev = $c{$who}->recv_json($left) or return undef;
        push @{ $seen{$who} }, $ev;
        return $ev if $pred->($ev);
    }
    return undef;
}
sub code_is { my $code = shift; sub { type_of($_[0]) =~ /^(?:error|notice)$/ && ($_[0]{code} // '') eq $code } }

my $doubt = collect('alice', code_is('message_in_doubt'), 5);
ok($doubt, 'alice gets an error event message_in_doubt') or diag('alice got: ' . codes(@{ $seen{alice} }));
is($doubt && $doubt->{type}, 'error', 'message_in_doubt is an error event');
is($doubt && $doubt->{room}, $ROOM, 'it names the room');
ok($doubt && length($doubt->{message} // ''), 'it has a message');
for my $who (qw(alice bob)) {
    ok(collect($who, code_is('redis_unavailable'), 10), "$who gets redis_unavailable")
        or diag("$who got: " . codes(@{ $seen{$who} }));
}

my $t_restart = time;
$redis->restart;
note(sprintf 'Redis back on port %d %.2fs after the kill', $rport, time - $t_kill);
for my $who (qw(alice bob)) {
    ok(collect($who, code_is('redis_available'), 15), "$who gets redis_available after the restart")
        or diag("$who got: " . codes(@{ $seen{$who} }));
}

# --- after recovery: both directions work
$bob->send_text('after-1');
$alice->send_text('after-2');
for my $who (qw(alice bob)) {
    for my $t (qw(after-1 after-2)) {
        ok(collect($who, sub { type_of($_[0]) eq 'message' && $_[0]{text} eq $t }, 5),
           "$who receives $t, sent after the recovery");
    }
}

for my $who (qw(alice bob)) {
    my @doubts = grep { code_is('message_in_doubt')->($_) } @{ $seen{$who} };
    is(scalar @doubts, $who eq 'alice' ? 1 : 0,
       $who eq 'alice' ? 'alice got message_in_doubt once' : 'bob, who sent nothing, got no message_in_doubt');
    my $copies = grep { type_of($_) eq 'message' && $_->{text} eq $TEXT } @{ $seen{$who} };
    ok($copies <= 1, "$who received the message in doubt at most once ($copies)");
    note("$who: " . codes(@{ $seen{$who} }));
}
is_deeply([$nginx->worker_pids], [$wpid], 'the worker is the same process');
my @lost = log_lines($nginx, qr/websocket_chat: .*127\.0\.0\.1:$rport\b.*(?:lost|may be lost)/);
ok(@lost >= 1, 'the error log tells of the connection lost to 127.0.0.1:' . $rport)
    or diag(join "\n", log_lines($nginx, qr/websocket_chat/));
note($_) for @lost;

$_->send_close(1000) for $alice, $bob;
ok($_->is_closed_by_server(5), 'member closed') for $alice, $bob;
done_all();
