# Redis host names looked up again through nginx's resolver on reconnects.
#
# With `resolver` at http level and `websocket_chat_redis localhost:PORT`:
#   1. the first connect uses the address resolved at configuration time
#      (the system resolver: 127.0.0.1); the DNS server is not asked;
#   2. after the connection is lost, the name is looked up through the
#      resolver before reconnecting: the DNS server (a tiny one in this file,
#      run as a child) now says 127.0.0.3, the module logs "is now at" and
#      moves to the Redis listening there; members see the outage end and
#      every message once;
#   3. when the lookup fails (SERVFAIL) the module logs "could not resolve"
#      and keeps reconnecting to the address it had;
#   4. without `resolver` (a second nginx) the name is never looked up again:
#      no DNS query, the Redis on 127.0.0.3 gets no connection, and the
#      module keeps at 127.0.0.1 until a Redis is back there.
# Both Redis servers of a pair listen on the same port number, one on
# 127.0.0.1, the other on 127.0.0.3, so only the address tells them apart.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET ();
use IO::Select ();
use Socket qw(inet_aton);
use POSIX ();
use ChatTest;
use WSClient;
use ChatFault;

my $ROOM = 'resolve';

# ---------------------------------------------------------------------------
# Redis bound to another loopback address. ChatTest::Redis always binds
# 127.0.0.1 and talks to it; a later --bind wins in redis-server, and only
# the client side needs to know the address.
package BoundRedis {
    our @ISA = ('ChatTest::Redis');
    my @ALL;
    sub start {
        my ($class, $host, $port) = @_;
        my $self = bless { host => $host, port => $port, args => ['--bind', $host],
                           dir => ChatTest::_tempdir('redis') }, $class;
        $self->_start;
        push @ALL, $self;
        return $self;
    }
    sub _connect {
        my $self = shift;
        my $s = IO::Socket::INET->new(PeerAddr => $self->{host}, PeerPort => $self->{port},
                                      Proto => 'tcp', Timeout => 2)
            or die "redis connect $self->{host}:$self->{port}: $!\n";
        binmode $s;
        $self->{sock} = $s;
        $self->{rbuf} = '';
    }
    sub kill_all { $_->kill for grep { $_->{pid} } @ALL }
}

# A port number free for TCP on both 127.0.0.1 and 127.0.0.3.
sub port_free_on_both {
    for (1 .. 50) {
        my $p = free_port();
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.3', LocalPort => $p,
                                      Proto => 'tcp', Listen => 1, ReuseAddr => 1) or next;
        close $s;
        return $p;
    }
    die "no port free on both 127.0.0.1 and 127.0.0.3\n";
}

# ---------------------------------------------------------------------------
# The DNS server: answers A queries for "localhost" with what the answer file
# says (an IPv4 address, or "servfail"), TTL 1; any other name is NXDOMAIN,
# other types get no records. Every query is appended to the query log as
# "NAME QTYPE ANSWER".
my $DIR = ChatTest::_tempdir('dns');
my $ANSWER = "$DIR/answer";
my $QLOG = "$DIR/queries.log";

# Replaced whole (rename), so the server never reads a half-written file.
sub set_answer {
    ChatTest::_spurt("$ANSWER.new", "$_[0]\n");
    rename "$ANSWER.new", $ANSWER or die "rename $ANSWER: $!";
}

sub queries {
    my $t = ChatTest::_slurp($QLOG);
    return grep { /^localhost 1 / } split /\n/, $t;
}

sub dns_reply {
    my ($q) = @_;
    return undef if length $q < 17;
    my ($id, $flags, $qdcount) = unpack 'n n n', $q;
    return undef if $flags & 0x8000 || $qdcount != 1;
    my ($off, @labels) = (12);
    while ($off < length $q) {
        my $len = ord substr($q, $off++, 1);
        last if $len == 0;
        return undef if $len > 63;
        push @labels, substr($q, $off, $len);
        $off += $len;
    }
    return undef if $off + 4 > length $q;
    my ($qtype, $qclass) = unpack 'n n', substr($q, $off, 4);
    my $question = substr($q, 12, $off + 4 - 12);
    my $name = lc join '.', @labels;
    my $answer = ChatTest::_slurp($ANSWER);
    $answer =~ s/\s+//g;
    if (open my $fh, '>>', $QLOG) { print $fh "$name $qtype $answer\n"; close $fh }

    my ($rcode, @rr) = (0);
    if ($name ne 'localhost') {
        $rcode = 3;
    } elsif ($answer eq 'servfail') {
        $rcode = 2;
    } elsif ($qtype == 1 && $qclass == 1 && $answer =~ /^\d+\.\d+\.\d+\.\d+$/) {
        # name: pointer to the question's name at offset 12
        push @rr, pack('n n n N n', 0xC00C, 1, 1, 1, 4) . inet_aton($answer);
    }
    my $rflags = 0x8000 | 0x0400 | ($flags & 0x0100) | 0x0080 | $rcode;
    return pack('n n n n n n', $id, $rflags, 1, scalar(@rr), 0, 0) . $question . join('', @rr);
}

set_answer('127.0.0.1');
my $dns = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'udp')
    or die "DNS socket: $!";
my $dns_port = $dns->sockport;
my $parent = $$;
my $dns_pid = fork // die "fork: $!";
if ($dns_pid == 0) {
    my $sel = IO::Select->new($dns);
    # Ends with the test, however the test ends.
    while (getppid() == $parent) {
        next unless $sel->can_read(0.5);
        my $from = recv($dns, my $q, 4096, 0);
        next unless defined $from;
        my $r = eval { dns_reply($q) };
        send($dns, $r, 0, $from) if defined $r;
    }
    POSIX::_exit(0);
}
close $dns;

END {
    if ($$ == $parent) {
        my $rc = $?;
        kill 'TERM', $dns_pid if $dns_pid;
        waitpid($dns_pid, 0) if $dns_pid;
        BoundRedis::kill_all();
        $? = $rc;
    }
}

# ---------------------------------------------------------------------------
# helpers

# The module's connections on a Redis (CLIENT LIST without the harness's own).
sub module_conns { my @c = $_[0]->client_list; return scalar @c }

# Texts of every message a client has received so far.
sub messages_text {
    my ($c) = @_;
    return map { $_->{text} } grep { ($_->{type} // '') eq 'message' } $c->events;
}

# ---------------------------------------------------------------------------
# 1-3: nginx with a resolver

my $rport = port_free_on_both();
my $redis1 = start_redis(port => $rport);
my $redis2;    # on 127.0.0.3, started once the module has looked the name up

my $lost_re = qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis localhost:$rport lost: connection closed; retrying in \d+ ms$/;
my $nginx = start_nginx_ok('nginx starts with resolver and websocket_chat_redis localhost:PORT',
    chat_config(workers => 1, redis => 'localhost:%%REDIS_PORT%%',
                http => "resolver 127.0.0.1:$dns_port ipv6=off valid=1s;\n"
                      . "    resolver_timeout 2s;\n"
                      . "    websocket_chat_redis_timeout 1s;"),
    REDIS_PORT => $rport,
    # The outages below (redis-server stopped) drop both connections.
    allow_errors => [$lost_re]);
my $port = $nginx->port;

my %c;
$c{alice} = WSClient->join(port => $port, room => $ROOM, nick => 'alice');
$c{bob}   = WSClient->join(port => $port, room => $ROOM, nick => 'bob');
ok($c{alice}->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), 'alice sees bob join');
$c{alice}->send_text('before');
ok($c{bob}->wait_type('message', 5, sub { $_[0]{text} eq 'before' }), 'phase 1: bob receives a message');

ok(wait_until(sub { $redis1->numsub($ROOM) == 1 }, 5), 'phase 1: the room is subscribed on the Redis at 127.0.0.1');
ok(module_conns($redis1) >= 2, 'phase 1: the module\'s connections are on the Redis at 127.0.0.1')
    or diag(join "\n", map { "addr=$_->{addr} cmd=$_->{cmd}" } $redis1->client_list);
is(scalar(queries()), 0, 'phase 1: the first connect asked no DNS server (the configuration-time address)');

# --- 2: the name now points at 127.0.0.3 and the Redis at 127.0.0.1 goes away
set_answer('127.0.0.3');
$redis1->stop;
for my $who (qw(alice bob)) {
    my $e = $c{$who}->wait_type('error', 10);
    is($e && $e->{code}, 'redis_unavailable', "phase 2: $who gets redis_unavailable");
}
# Sent while nothing listens anywhere: they wait in the backlog.
$c{alice}->send_text("alice-moving-$_") for 1 .. 2;
$c{bob}->send_text('bob-moving-1');

my $moved_re = qr/\[notice\] .*websocket_chat: Redis localhost:$rport is now at 127\.0\.0\.3:$rport \(was 127\.0\.0\.1:$rport\)/;
ok(wait_until(sub { scalar(queries()) >= 1 }, 10), 'phase 2: the reconnect asked the DNS server for localhost')
    or diag(ChatTest::_slurp($QLOG));
ok(wait_until(sub { log_lines($nginx, $moved_re) >= 1 }, 10),
   'phase 2: error log: "Redis localhost:PORT is now at 127.0.0.3:PORT (was 127.0.0.1:PORT)" (notice)')
    or diag(join "\n", log_lines($nginx, qr/websocket_chat/));

$redis2 = BoundRedis->start('127.0.0.3', $rport);
for my $who (qw(alice bob)) {
    my $n = $c{$who}->wait_type('notice', 15, sub { $_[0]{code} eq 'redis_available' });
    ok($n, "phase 2: $who gets redis_available once the Redis at 127.0.0.3 is up");
}
ok(wait_until(sub { $redis2->numsub($ROOM) == 1 }, 5), 'phase 2: the room is subscribed on the Redis at 127.0.0.3');
ok(module_conns($redis2) >= 2, 'phase 2: the module\'s connections are on the Redis at 127.0.0.3')
    or diag(join "\n", map { "addr=$_->{addr} cmd=$_->{cmd}" } $redis2->client_list);

$c{bob}->send_text('after-move');
for my $who (qw(alice bob)) {
    ok($c{$who}->wait_type('message', 10, sub { $_[0]{text} eq 'after-move' }),
       "phase 2: $who receives a message sent after the move");
    my @got = grep { /-moving-|^after-move$/ } messages_text($c{$who});
    is_deeply([sort @got], [sort qw(alice-moving-1 alice-moving-2 bob-moving-1 after-move)],
              "phase 2: $who receives the backlog and the new message once each")
        or diag("$who received: @got");
}

# --- 3: the lookup fails; the module keeps the address it has
my $moves = () = log_lines($nginx, $moved_re);
set_answer('servfail');
$redis2->stop;
for my $who (qw(alice bob)) {
    my $e = $c{$who}->wait_type('error', 10);
    is($e && $e->{code}, 'redis_unavailable', "phase 3: $who gets redis_unavailable");
}
my $unresolved_re = qr/\[warn\] .*websocket_chat: could not resolve Redis localhost:$rport \(.+\); trying 127\.0\.0\.3:$rport again/;
# The resolver's cache (valid=1s) answers the first retries; the warning
# comes once it asks the DNS server again.
ok(wait_until(sub { log_lines($nginx, $unresolved_re) >= 1 }, 10),
   'phase 3: error log: "could not resolve Redis localhost:PORT (...); trying 127.0.0.3:PORT again" (warn)')
    or diag(join "\n", log_lines($nginx, qr/websocket_chat/));
ok(scalar(grep { / servfail$/ } queries()) >= 1, 'phase 3: the DNS server was asked and answered SERVFAIL');
note($_) for (log_lines($nginx, $unresolved_re))[0];

$c{alice}->send_text('alice-unresolved-1');
$redis2->restart;
for my $who (qw(alice bob)) {
    my $n = $c{$who}->wait_type('notice', 15, sub { $_[0]{code} eq 'redis_available' });
    ok($n, "phase 3: $who gets redis_available: the module reconnected to the address it had");
}
ok(wait_until(sub { $redis2->numsub($ROOM) == 1 }, 5), 'phase 3: the room is subscribed on the Redis at 127.0.0.3 again');
is(scalar(() = log_lines($nginx, $moved_re)), $moves, 'phase 3: no new "is now at" line');
ok(!log_lines($nginx, qr/is now at (?!127\.0\.0\.3:)/), 'phase 3: the address never changed to anything else');
$c{bob}->send_text('after-unresolved');
for my $who (qw(alice bob)) {
    ok($c{$who}->wait_type('message', 10, sub { $_[0]{text} eq 'after-unresolved' }),
       "phase 3: $who receives a message sent after the recovery");
    my @got = grep { /unresolved/ } messages_text($c{$who});
    is_deeply([sort @got], [qw(after-unresolved alice-unresolved-1)],
              "phase 3: $who receives the outage message and the new one once each")
        or diag("$who received: @got");
}

$_->send_close(1000) for values %c;
ok($c{$_}->is_closed_by_server(5), "$_ closed") for sort keys %c;
$nginx->stop;
$redis2->stop;

# ---------------------------------------------------------------------------
# 4: no resolver: the configuration-time address for ever

set_answer('127.0.0.1');
my $rport4 = port_free_on_both();
my $redis3 = start_redis(port => $rport4);
my $plain = start_nginx_ok('nginx starts without resolver, websocket_chat_redis localhost:PORT',
    chat_config(workers => 1, redis => 'localhost:%%REDIS_PORT%%',
                http => 'websocket_chat_redis_timeout 1s;'),
    REDIS_PORT => $rport4,
    allow_errors => [qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis localhost:$rport4 lost: connection closed; retrying in \d+ ms$/]);
my $carol = WSClient->join(port => $plain->port, room => $ROOM, nick => 'carol');
$carol->send_text('plain-before');
ok($carol->wait_type('message', 5, sub { $_[0]{text} eq 'plain-before' }), 'phase 4: carol chats');
ok(wait_until(sub { $redis3->numsub($ROOM) == 1 }, 5), 'phase 4: the room is subscribed on the Redis at 127.0.0.1');

my $asked4 = () = queries();
set_answer('127.0.0.3');
my $redis4 = BoundRedis->start('127.0.0.3', $rport4);
$redis3->stop;
my $e = $carol->wait_type('error', 10);
is($e && $e->{code}, 'redis_unavailable', 'phase 4: carol gets redis_unavailable');
# Several failed attempts: each one a chance to have gone to 127.0.0.3.
my $failed_re = qr/\[warn\] .*websocket_chat: \w+ connection to Redis localhost:$rport4 failed: .*; retrying in \d+ ms/;
ok(wait_until(sub { log_lines($plain, $failed_re) >= 6 }, 10),
   'phase 4: the module keeps retrying (6 failed attempts logged)')
    or diag(join "\n", log_lines($plain, qr/websocket_chat/));
note($_) for (log_lines($plain, $failed_re))[0];
is(module_conns($redis4), 0, 'phase 4: no connection reached the Redis at 127.0.0.3')
    or diag(join "\n", map { "addr=$_->{addr} cmd=$_->{cmd}" } $redis4->client_list);
is(scalar(() = queries()), $asked4, 'phase 4: no DNS query');
ok(!log_lines($plain, qr/is now at|could not resolve/), 'phase 4: no "is now at" or "could not resolve" line');
my ($pong) = ping_pong($carol, 5);
ok($pong, 'phase 4: carol is still connected (ping answered)');
my @notices = grep { ($_->{type} // '') eq 'notice' } $carol->events;
is(scalar(@notices), 0, 'phase 4: no redis_available while only 127.0.0.3 listens');

# Back on 127.0.0.1: that is where the module was trying.
$redis3->restart;
ok($carol->wait_type('notice', 15, sub { $_[0]{code} eq 'redis_available' }),
   'phase 4: carol gets redis_available once a Redis is back at 127.0.0.1');
ok(wait_until(sub { $redis3->numsub($ROOM) == 1 }, 5), 'phase 4: the room is subscribed on the Redis at 127.0.0.1 again');
is(module_conns($redis4), 0, 'phase 4: still no connection on the Redis at 127.0.0.3');

$carol->send_close(1000);
ok($carol->is_closed_by_server(5), 'carol closed');
$plain->stop;
$redis4->stop;
done_all();
