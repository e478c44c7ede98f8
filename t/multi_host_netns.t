# Several hosts on one machine: network namespaces (iproute2's `ip netns`)
# stand for a Redis host and two nginx hosts A and B, with history and
# presence on (the defaults) and websocket_chat_redis_timeout 2s.
#
# Topology, all made by this file and removed at exit (even on failure):
#
#     ns <tag>-redis  eth0 10.231.0.1 --+
#     ns <tag>-a      eth0 10.231.0.2 --+-- br0 in ns <tag>-sw (the switch)
#     ns <tag>-b      eth0 10.231.0.3 --+   (switch ports p-redis, p-a, p-b)
#
# <tag> holds the test's pid, so parallel runs do not clash. Each veth pair is
# created from inside the switch namespace straight into its host namespace,
# so no interface, address or route ever appears in the test's own
# namespace, and the 10.231.0.0/24 addresses exist only in these namespaces.
# redis-server and nginx run in their hosts' namespaces (`ip netns exec`);
# each nginx listens on 127.0.0.1 of its own host. The WebSocket clients are
# the usual WSClient objects of this process: each one's socket is created
# inside its host's namespace (setns(2) there and back around the connect;
# a socket keeps the namespace it was made in), so the clients are "local
# users" of host A or B and the test keeps WSClient's helpers, without
# client processes or a veth into the test's own namespace. "Cutting host
# B's link" is `ip link set p-b down` at the switch: silent, no RST, as a
# pulled cable; B finds out by its Redis timeout / keepalive PING.
#
# Checks: (1) members on A and B share a room: joins, messages with the same
# ids on both hosts, a later joiner on B gets the history (A's messages
# included) and a member list with A's members; (2) B cut off: A's members
# keep chatting, each message within 2 s, and B's members get one
# redis_unavailable error; (3) link back: B's members get redis_available,
# then every message sent on A during the cut exactly once, in order, with
# A's ids, before anything newer; what B's members typed during the cut
# (backlog) reaches everyone once; ids strictly increase everywhere, no gap.
# Skips when not root or when namespaces cannot be created.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX qw(WNOHANG);
use IO::Socket::INET ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatIds;
use ChatFault;

my $ROOM  = 'mh';
my $RPORT = 6379;                                   # inside the Redis host only
my %ADDR  = (redis => '10.231.0.1', a => '10.231.0.2', b => '10.231.0.3');
my %PORT  = (a => 8081, b => 8082);                 # on each host's own loopback
my $TAG   = "wschat$$";
my %NS    = map { $_ => "$TAG-$_" } qw(sw redis a b);
my $PARENT = $$;
my $CLONE_NEWNET = 0x40000000;

my (@CLIENTS, %HOST, $REDIS, @SPAWNED, %MADE);

plan skip_all => 'needs root: creates network namespaces (ip netns add)' unless $> == 0;
my ($IP) = grep { -x } map { "$_/ip" } split(/:/, $ENV{PATH} // ''), '/usr/sbin', '/sbin';
plan skip_all => 'needs iproute2 (the ip command) for network namespaces' unless $IP;
my $SYS_SETNS = eval { require 'syscall.ph'; SYS_setns() };
plan skip_all => "needs setns(2) from Perl (syscall.ph): $@" unless $SYS_SETNS;
open my $HOME_NS, '<', '/proc/self/ns/net' or plan skip_all => "cannot open /proc/self/ns/net: $!";

# Interrupted runs still remove what they made (END runs on exit).
$SIG{$_} = sub { diag("caught SIG$_[0]: cleaning up"); exit 1 } for qw(INT TERM HUP);
$SIG{ALRM} = sub { diag('the whole file took over 55 s: giving up'); exit 1 };
alarm 55;

# Runs `ip @args` (bounded); returns undef on success, else what went wrong.
sub ip {
    my ($code, $out) = ChatTest::_run_cmd(10, $IP, @_);
    return undef if $code == 0;
    $out =~ s/\s+$//;
    return "ip @_: exit $code: $out";
}

# Runs $code with this process in host $h's network namespace; sockets made
# meanwhile stay there. Always comes back to the test's own namespace.
sub in_ns {
    my ($h, $code) = @_;
    open my $fh, '<', "/run/netns/$NS{$h}" or die "open /run/netns/$NS{$h}: $!\n";
    syscall($SYS_SETNS, fileno($fh), $CLONE_NEWNET) == 0 or die "setns into $NS{$h}: $!\n";
    my $r = eval { $code->() };
    my $err = $@;
    syscall($SYS_SETNS, fileno($HOME_NS), $CLONE_NEWNET) == 0
        or die "setns back to the test's own namespace: $!\n";
    die $err if $err;
    return $r;
}

sub cleanup {
    return unless $$ == $PARENT;
    $_->disconnect for @CLIENTS;    # sockets pin their namespaces
    @CLIENTS = ();
    for my $n (grep { !$_->{stopped} } @SPAWNED) { eval { $n->stop(in_end => 1) } }
    $REDIS->kill if $REDIS;
    ip('netns', 'del', $NS{$_}) for grep { $MADE{$_} } qw(a b redis sw);
    %MADE = ();
}
END { my $rc = $?; cleanup(); $? = $rc }

# ---------------------------------------------------------------- hosts
{
    my $err = ip('netns', 'add', $NS{sw});
    plan skip_all => "cannot create a network namespace ($err)" if $err;
    $MADE{sw} = 1;
}
my $setup_err;
for my $h (qw(redis a b)) {
    last if $setup_err = ip('netns', 'add', $NS{$h});
    $MADE{$h} = 1;
}
$setup_err = "setns(2) into a namespace failed: $@" if !$setup_err && !eval { in_ns(a => sub { 1 }) };
plan skip_all => "cannot set up the host namespaces: $setup_err" if $setup_err;

my @steps = (
    (map { ['-n', $NS{$_}, 'link', 'set', 'lo', 'up'] } qw(sw redis a b)),
    ['-n', $NS{sw}, 'link', 'add', 'br0', 'type', 'bridge'],
    ['-n', $NS{sw}, 'link', 'set', 'br0', 'up'],
    (map { my $h = $_; (
        ['-n', $NS{sw}, 'link', 'add', "p-$h", 'type', 'veth', 'peer', 'name', 'eth0', 'netns', $NS{$h}],
        ['-n', $NS{sw}, 'link', 'set', "p-$h", 'master', 'br0'],
        ['-n', $NS{sw}, 'link', 'set', "p-$h", 'up'],
        ['-n', $NS{$h}, 'addr', 'add', "$ADDR{$h}/24", 'dev', 'eth0'],
        ['-n', $NS{$h}, 'link', 'set', 'eth0', 'up'],
    ) } qw(redis a b)),
);
for my $s (@steps) { last if $setup_err = ip(@$s) }
ok(!$setup_err, 'three hosts (redis, a, b) on a switch, in network namespaces of this run')
    or do { diag($setup_err); cleanup(); done_testing(); exit };

# Ends the file after a failure that leaves nothing to check.
sub give_up { diag(@_) if @_; cleanup(); done_testing(); exit }

# ChatTest's start_redis / start_nginx spawn in the test's own namespace; these
# reuse its parts (prefix and config rendering, spawning, the ChatTest::Nginx
# object with its stop-time error-log check) and add `ip netns exec`.
sub start_redis_host {
    my $r = bless { port => $RPORT, args => [], dir => ChatTest::_tempdir('redis') }, 'ChatTest::Redis';
    # Protected mode would refuse the nginx hosts (not loopback, no
    # password); the Redis host's only network is this run's switch.
    $r->{pid} = ChatTest::_spawn("$r->{dir}/redis.log", $IP, 'netns', 'exec', $NS{redis},
        'redis-server', '--port', $RPORT, '--bind', $ADDR{redis}, '127.0.0.1', '--save', '',
        '--protected-mode', 'no', '--appendonly', 'no', '--daemonize', 'no', '--dir', $r->{dir});
    $REDIS = $r;
    my $exited;
    my $ok = wait_until(sub {
        if (waitpid($r->{pid}, WNOHANG) == $r->{pid}) { delete $r->{pid}; return $exited = 1 }
        my $pong = eval { in_ns(redis => sub { $r->_disconnect; $r->cmd('PING') }) };
        return defined $pong && $pong eq 'PONG';
    }, 10);
    return $ok && !$exited ? $r : undef;
}

sub start_nginx_host {
    my ($h, @allow) = @_;
    my $conf = chat_config(workers => 1, redis => "$ADDR{redis}:$RPORT",
                           http => 'websocket_chat_redis_timeout 2s;');
    my ($prefix, $v) = ChatTest::_prepare_prefix($conf, { PORT => $PORT{$h} }, {});
    my $n = bless { prefix => $prefix, vars => $v, port => $PORT{$h}, opts => {},
                    allow_errors => [] }, 'ChatTest::Nginx';
    $n->allow_errors(@allow);
    $n->{pid} = ChatTest::_spawn("$prefix/logs/stderr.log", $IP, 'netns', 'exec', $NS{$h},
                                 ChatTest::_nginx_argv($prefix));
    push @SPAWNED, $n;
    my $died;
    my $up = wait_until(sub {
        if (waitpid($n->{pid}, WNOHANG) == $n->{pid}) { $died = 1; $n->{stopped} = 1; return 1 }
        return in_ns($h => sub { ChatTest::_port_accepts($PORT{$h}) });
    }, 10);
    if ($died || !$up) {
        diag("nginx on host $h did not start:\n" . $n->error_log_text
             . ChatTest::_slurp("$prefix/logs/stderr.log"));
        return undef;
    }
    wait_until(sub { $n->worker_pids >= 1 }, 10);
    return $n;
}

my $redis = start_redis_host();
ok($redis, "redis-server runs on the Redis host, $ADDR{redis}:$RPORT")
    or give_up(ChatTest::_slurp("$REDIS->{dir}/redis.log"));
for my $h (qw(a b)) {
    my $s = eval { in_ns($h => sub {
        IO::Socket::INET->new(PeerAddr => $ADDR{redis}, PeerPort => $RPORT, Proto => 'tcp', Timeout => 2)
    }) };
    ok($s, "host \U$h\E reaches $ADDR{redis}:$RPORT over the switch") or give_up($@ || $!);
    close $s;
}

# B's dead link is noticed by a timeout, logged as a lost connection.
my $R = qr/Redis \Q$ADDR{redis}:$RPORT\E/;
my $lost_b = qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to $R lost: no reply within 2000 ms; retrying in \d+ ms$/;
my %ng;
$ng{a} = start_nginx_host('a');
ok($ng{a}, "nginx host A runs (127.0.0.1:$PORT{a} inside A)") or give_up();
$ng{b} = start_nginx_host('b', $lost_b);
ok($ng{b}, "nginx host B runs (127.0.0.1:$PORT{b} inside B)") or give_up();

# ---------------------------------------------------------------- helpers
my %C;    # nick -> client
my (%sender, %sent_by);    # text -> nick; nick -> texts in the order sent

sub say_as {
    my ($who, $text) = @_;
    $sender{$text} = $who;
    push @{ $sent_by{$who} }, $text;
    return $C{$who}->send_text($text);
}

sub join_on {
    my ($h, $nick) = @_;
    my $c = eval { in_ns($h => sub {
        WSClient->join(port => $PORT{$h}, room => $ROOM, nick => $nick, timeout => 5)
    }) };
    ok($c, "$nick joins room $ROOM on host \U$h\E") or give_up($@);
    push @CLIENTS, $c;
    $HOST{$nick} = $h;
    return $C{$nick} = $c;
}

sub on_host { my $h = shift; grep { $HOST{$_} eq $h } sort keys %C }

# The message event with $text that $nick received (waiting for it up to
# the absolute time $deadline).
sub got_text {
    my ($nick, $text, $deadline) = @_;
    my ($m) = grep { $_->{text} eq $text } live_messages($C{$nick});
    return $m if $m;
    my $left = $deadline - time;
    return undef if $left <= 0;
    return $C{$nick}->wait_for(sub { type_of($_[0]) eq 'message' && $_[0]{text} eq $text }, $left);
}

# Every member of @$nicks receives each text of @$texts by $timeout seconds
# from now; returns "nick: text" for what is missing.
sub missing {
    my ($nicks, $texts, $timeout) = @_;
    my $deadline = time + $timeout;
    return map { my $n = $_; map { got_text($n, $_, $deadline) ? () : "$n: $_" } @$texts } @$nicks;
}

sub members_of { map { $_->{user} } @{ $_[0]->welcome->{members} // [] } }

sub b_log { join "\n", log_lines($ng{b}, qr/websocket_chat/) }

# ---------------------------------------------------------------- 1. one room over two hosts
my $alice = join_on(a => 'alice');
ok($alice->wait_type('join', 5, sub { $_[0]{user} eq 'alice' }), 'alice sees her own join');
my $bob = join_on(b => 'bob');
ok((grep { $_ eq 'alice' } members_of($bob)), "bob's welcome on B lists alice of A")
    or diag($bob->welcome->{_raw});
my $carol = join_on(a => 'carol');
my %join_id;
for my $x ([alice => 'bob'], [bob => 'carol'], [carol => 'carol'], [alice => 'carol']) {
    my ($who, $joiner) = @$x;
    my $e = $C{$who}->wait_type('join', 5, sub { $_[0]{user} eq $joiner });
    ok($e, "$who (host \U$HOST{$who}\E) sees $joiner (host \U$HOST{$joiner}\E) join");
    push @{ $join_id{$joiner} }, $e ? $e->{id} : 'none';
}
is($join_id{carol}[0], $join_id{carol}[1], "carol's join has the same id on B and on A ($join_id{carol}[1])");

say_as(alice => 'pre-alice');
say_as(bob => 'pre-bob');
my @pre = qw(pre-alice pre-bob);
my @miss = missing([qw(alice bob carol)], \@pre, 5);
is_deeply(\@miss, [], "messages sent on A and on B reach the members of both hosts");
my %id;    # text -> id as alice saw it
$id{ $_->{text} } = $_->{id} for live_messages($alice);
ok(is_pos($id{$_}), "$_ has a message id ($id{$_})") for grep { defined $id{$_} } @pre;
for my $who (qw(bob carol)) {
    my @diff = map { "$_->{text}: $_->{id} vs $id{ $_->{text} }" }
               grep { ($_->{id} // '') ne ($id{ $_->{text} } // '') } live_messages($C{$who});
    is_deeply(\@diff, [], "$who (host \U$HOST{$who}\E) sees the same message ids as alice (host A)");
}

my $dave = join_on(b => 'dave');
my @dm = members_of($dave);
is_deeply([sort @dm], [qw(alice bob carol dave)],
          "dave's welcome on B lists A's members alice and carol, bob and himself")
    or diag($dave->welcome->{_raw});
is($dave->welcome->{count}, 4, "dave's welcome counts 4 members");
my $hist = $dave->wait_type('history', 5);
ok($hist, 'dave, joining later on B, gets a history');
my @h = map { "$_->{text} $_->{id}" } @{ ($hist && $hist->{messages}) // [] };
is_deeply(\@h, [map { "$_ $id{$_}" } sort { cmp_id($id{$a} // '0-0', $id{$b} // '0-0') } @pre],
          "dave's history holds pre-alice (sent via A) and pre-bob, with the ids alice saw");
for my $who (qw(alice bob carol)) {
    ok($C{$who}->wait_type('join', 5, sub { $_[0]{user} eq 'dave' }), "$who sees dave join");
}

# ---------------------------------------------------------------- 2. B's link cut
my %mark = map { $_ => scalar(my @e = $C{$_}->events) } keys %C;
my $t_cut = time;
ok(!ip('-n', $NS{sw}, 'link', 'set', 'p-b', 'down'), "host B's link is cut (p-b down at the switch)");

my @a_cut;    # what A's members say while B is cut off, in order
sub a_says {
    my ($who, $text) = @_;
    my $t0 = time;
    say_as($who => $text);
    push @a_cut, $text;
    my @m = missing([on_host('a')], [$text], 2);
    ok(!@m, sprintf("while B is cut: %s from %s reaches A's members within 2 s (%.2fs)",
                    $text, $who, time - $t0)) or diag("missing: @m");
}
a_says(alice => 'cut-a-1');
a_says(carol => 'cut-a-2');

for my $who (on_host('b')) {
    my $e = $C{$who}->wait_type('error', 10);
    is($e && $e->{code}, 'redis_unavailable', "$who (host B) gets a redis_unavailable error while cut off")
        or diag(b_log());
    note(sprintf '%s: redis_unavailable %.2fs after the cut', $who, time - $t_cut) if $e;
}

a_says(alice => 'cut-a-3');
a_says(carol => 'cut-a-4');
a_says(alice => 'cut-a-5');

# B's members type during the cut: a pong after their messages shows B has
# read them into its backlog while still cut off.
my %b_cut = (bob => [qw(cut-b-bob-1 cut-b-bob-2)], dave => [qw(cut-b-dave-1)]);
for my $who (sort keys %b_cut) {
    say_as($who => $_) for @{ $b_cut{$who} };
    my ($pong, @ev) = ping_pong($C{$who}, 5);
    ok($pong, "$who (host B) is still connected during the cut (ping answered)");
    is(scalar(@ev), 0, "$who hears nothing while B is cut off")
        or diag(join "\n", map { $_->{_raw} // type_of($_) } @ev);
}
my @b_cut = map { @{ $b_cut{$_} } } sort keys %b_cut;
my %is_b_cut = map { $_ => 1 } @b_cut;
my @early = map { my $n = $_; map { "$n: $_->{text}" } grep { $is_b_cut{ $_->{text} } } live_messages($C{$n}) }
            on_host('a');
is_deeply(\@early, [], "A's members have none of B's cut-off messages yet");
my @heard = map { my $n = $_; my @e = $C{$n}->events;
                  map { "$n: $_->{text}" } grep { type_of($_) eq 'message' } @e[$mark{$n} .. $#e] } on_host('b');
is_deeply(\@heard, [], "B's members have heard no message since the cut");

# Keep B cut off until it has failed a reconnect attempt, so that what
# follows is a recovery from a real outage, not a timely reconnect.
my $failed_b = qr/\[warn\] .*websocket_chat: \w+ connection to $R failed: .*; retrying in \d+ ms/;
ok(wait_until(sub { log_lines($ng{b}, $failed_b) >= 1 }, 10),
   'host B fails a reconnect attempt while cut off ("... failed: ...; retrying in N ms", warn)')
    or diag(b_log());
note(sprintf 'B cut off for %.2fs', time - $t_cut);

# ---------------------------------------------------------------- 3. link back
my $t_up = time;
ok(!ip('-n', $NS{sw}, 'link', 'set', 'p-b', 'up'), "host B's link is back (p-b up)");
for my $who (on_host('b')) {
    my $n = $C{$who}->wait_type('notice', 15);
    is($n && $n->{code}, 'redis_available', "$who (host B) gets redis_available once the link is back")
        or diag(b_log());
    note(sprintf '%s: redis_available %.2fs after the link came back', $who, time - $t_up) if $n;
}
say_as(alice => 'after-1');
@miss = missing([sort keys %C], ['after-1', @b_cut, @a_cut], 15);
is_deeply(\@miss, [], "every member receives A's cut-time messages, B's backlog and a later message")
    or diag(b_log());

# B's members: the notice, then A's cut-time messages in order, once each,
# with A's ids, before anything newer (B's backlog, after-1).
$id{ $_->{text} } //= $_->{id} for live_messages($alice);
for my $who (on_host('b')) {
    my @e = $C{$who}->events;
    my @since = @e[$mark{$who} .. $#e];
    my @types = map { type_of($_) eq 'message' ? 'message' : type_of($_) . '/' . ($_->{code} // '') } @since;
    my ($first_msg) = grep { $types[$_] eq 'message' } 0 .. $#types;
    my ($notice) = grep { $types[$_] eq 'notice/redis_available' } 0 .. $#types;
    ok(defined $notice && defined $first_msg && $notice < $first_msg,
       "$who: the redis_available notice comes before the first message since the cut")
        or diag("$who since the cut: @types");
    my @m = map { $_->{text} } grep { type_of($_) eq 'message' } @since;
    is_deeply([@m[0 .. $#a_cut]], \@a_cut,
              "$who: first come A's " . scalar(@a_cut) . ' cut-time messages, in order, no gap, no duplicate')
        or diag("$who got, since the cut: @m");
    my @rest = @m[@a_cut .. $#m];
    is_deeply([sort @rest], [sort 'after-1', @b_cut], "$who: then B's backlog and after-1, once each")
        or diag("$who got, since the cut: @m");
    my @ids_off = map { "$_->{text}: $_->{id} (A: " . ($id{ $_->{text} } // 'none') . ')' }
                  grep { ($_->{id} // '') ne ($id{ $_->{text} } // '') }
                  grep { type_of($_) eq 'message' } @since;
    is_deeply(\@ids_off, [], "$who: every message since the cut has the id A's members saw");
    my @errs = grep { $_ =~ m{^error/} } @types;
    my @notices = grep { $_ =~ m{^notice/} } @types;
    is_deeply([@errs, @notices], ['error/redis_unavailable', 'notice/redis_available'],
              "$who: one redis_unavailable error and one redis_available notice");
}

# Everyone: each message once, per-sender order, ids strictly increasing
# (the room's stream order), no gap event; A's members were never told of
# an outage.
for my $who (sort keys %C) {
    my @m = live_messages($C{$who});
    my @want = ($who eq 'dave' ? () : @pre, @a_cut, @b_cut, 'after-1');
    my %n;
    $n{ $_->{text} }++ for @m;
    my @off = map { "$_ x" . ($n{$_} // 0) } grep { ($n{$_} // 0) != 1 } @want;
    push @off, map { "unexpected $_" } grep { !exists $sender{$_} } keys %n;
    is_deeply(\@off, [], "$who receives every message exactly once");
    my @ids = map { $_->{id} } @m;
    my $i = first_not_increasing(@ids);
    is($i, -1, "$who: message ids strictly increase (stream order)")
        or diag("at #$i: $ids[$i - 1] ($m[$i - 1]{text}) then $ids[$i] ($m[$i]{text})");
    my %wanted = map { $_ => 1 } @want;
    for my $s (sort keys %sent_by) {
        my @sent = grep { $wanted{$_} } @{ $sent_by{$s} };
        next unless @sent;
        my @got = grep { ($sender{$_} // '') eq $s } map { $_->{text} } @m;
        is("@got", "@sent", "$who gets $s\'s messages in the order sent");
    }
    is(scalar(grep { type_of($_) eq 'gap' } $C{$who}->events), 0, "$who: no gap event");
    if ($HOST{$who} eq 'a') {
        my @o = grep { type_of($_) =~ /^(?:error|notice)$/ } $C{$who}->events;
        is(scalar(@o), 0, "$who (host A) gets no error or notice: A's link never failed")
            or diag(join "\n", map { $_->{_raw} } @o);
    }
}

ok(scalar(log_lines($ng{b}, $lost_b)) >= 1, "host B's error log tells of the lost Redis connection")
    or diag(b_log());
ok(scalar(log_lines($ng{b}, qr/websocket_chat: $R is available again/)) >= 1,
   "host B's error log tells Redis is available again") or diag(b_log());

# ---------------------------------------------------------------- the end
$_->send_close(1000) for values %C;
ok($C{$_}->is_closed_by_server(5), "$_ closed") for sort keys %C;
note("host $_: nginx on port $PORT{$_}") for qw(a b);
$_->stop for @SPAWNED;    # records the error-log checks (alert/crit, unexpected [error])
$REDIS->stop;
cleanup();
my $left = `$IP netns list 2>&1`;
unlike($left, qr/\Q$TAG\E-/, "this run's network namespaces are gone");
done_testing();
