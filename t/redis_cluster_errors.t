# Redis Cluster: bad input and bad configuration.
#  1. nginx -t refuses a bad `websocket_chat_redis cluster=...` (empty list,
#     empty seed, unix socket seed, a /db), naming file and line; good lists
#     (plain, with credentials, at location level) pass.
#  2. Seeds where nothing listens: sessions open (101) and get the
#     redis_unavailable error event, the error log names the seeds, retries
#     back off. A dead seed listed before a live seed of a real cluster does
#     not stop the room from working (nor earn its members an error event).
#  3. A seed that is a plain (non-cluster) redis-server: the error log says so,
#     sessions get redis_unavailable, the map is asked for with backoff, and
#     the server is not used for the room (no subscription, no keys).
#  4. A fake cluster node (a RESP server forked here) whose map gives every
#     slot to itself but which answers every keyed command with MOVED to
#     itself (a redirect loop); then one whose map points at a dead port.
#     The real-cluster counterpart of a map naming a dead node is 5.
#  5. A real primary (no replica) is killed: members of rooms on its shard get
#     redis_unavailable, members of rooms on the other shards keep chatting,
#     retries back off, and once the node is back its rooms work again.
# Each part checks that no worker crashed (the same worker pids, ChatTest's
# error-log check at stop).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET ();
use IO::Select ();
use POSIX ();
use Digest::SHA qw(sha1_hex);
use Time::HiRes qw(time);
use Test::More;
use ChatTest;
use WSClient;
use ChatFault;

# Length of the windows over which retries are counted (from the first
# failure, when retries are densest), and the bounds. A worker has two
# connections (subscriber, command) to each node it tries; backoff doubling
# from 100 ms makes at most ~7 attempts per connection in such a window, a
# fixed 100 ms retry 40, a busy loop thousands. So: fewer than 10 log lines
# per connection and node.
my $WINDOW   = 4;
my $MAX_CMDS = 200;     # commands a (fake or plain) node receives, per window
sub max_lines { 2 * 10 * $_[0] }    # error-log lines naming $_[0] nodes, per window

my $REDIS_TIMEOUT = "    websocket_chat_redis_timeout 1s;\n";

# ---------------------------------------------------------------------------
# helpers

# A port P such that P and its cluster bus port P+10000 are both free (the
# bus port of an ephemeral port from free_port could be past 65535).
sub cluster_port {
    for (1 .. 200) {
        my $p = 20000 + int rand 10000;
        my @s = map {
            IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $_,
                                  Proto => 'tcp', Listen => 1, ReuseAddr => 1)
        } $p, $p + 10000;
        next unless $s[0] && $s[1];
        close $_ for @s;
        return $p;
    }
    die "no free port pair for a cluster node\n";
}

# Error-log lines of level error or warn from the module naming 127.0.0.1:$port.
sub node_lines {
    my ($nginx, $port) = @_;
    return log_lines($nginx, qr/\[(?:error|warn)\] .*websocket_chat: .*127\.0\.0\.1:$port(?!\d)/);
}

# The [error] lines a part provokes on purpose: the module's lines naming
# one of the nodes under test.
sub allow_nodes {
    my $ports = join '|', @_;
    return qr/\[error\] \d+#\d+: (?:\*\d+ )?websocket_chat: .*127\.0\.0\.1:(?:$ports)(?!\d)/;
}

# How much each counter grows over the same $WINDOW seconds: pairs of (a sub
# returning the count, its limit). The wait ends early when one reaches its
# limit (a busy loop need not be watched to the end); otherwise it is the
# measurement window itself, not a synchronisation.
sub growth_over_window {
    my @pairs;
    push @pairs, [splice @_, 0, 2] while @_;
    my @start = map { $_->[0]->() } @pairs;
    my $over = sub { grep { $pairs[$_][0]->() - $start[$_] >= $pairs[$_][1] } 0 .. $#pairs };
    wait_until($over, $WINDOW, 0.1);
    my @d = map { $pairs[$_][0]->() - $start[$_] } 0 .. $#pairs;
    return wantarray ? @d : $d[0];
}

# A session that opens (101) while the module has no usable cluster and gets
# the redis_unavailable error event; returns the client.
sub unavailable_session {
    my ($nginx, $room, $what) = @_;
    my $c = eval { WSClient->connect(port => $nginx->port, path => "/ws?room=$room&nick=n") };
    ok($c, "$what: the WebSocket handshake succeeds (101)") or diag($@);
    return undef unless $c;
    my $e = $c->wait_type('error', 10);
    ok($e, "$what: the client gets an error event, not silence")
        or diag("events: " . join(' ', map { $_->{_raw} // $_->{type} } $c->events));
    is($e && $e->{code}, 'redis_unavailable', "$what: its code is redis_unavailable")
        or diag(explain($e));
    return $c;
}

sub session_open {
    my ($c, $what) = @_;
    my ($pong) = ping_pong($c, 5);
    ok($pong, "$what: the session is still open (ping answered)");
}

sub same_workers {
    my ($nginx, $before, $what) = @_;
    is_deeply([sort { $a <=> $b } $nginx->worker_pids], [sort { $a <=> $b } @$before],
              "$what: no worker crashed (same worker pids)");
}

# Redis's INFO as {field => value}.
sub info {
    my ($r, $section) = @_;
    my %h = map { /^([^:#]+):(.*?)\r?$/ ? ($1, $2) : () } split /\n/, $r->cmd('INFO', $section);
    return \%h;
}

# ---------------------------------------------------------------------------
# 1. nginx -t

# $why: words the message should use for the problem, outside the quoted
# value (a generic "invalid address" would not say which seed is wrong or why).
sub refused {
    my ($name, $why, %cfg) = @_;
    my ($code, $out, $path) = test_config(chat_config(%cfg));
    isnt($code, 0, "nginx -t refuses $name");
    my $line = line_of($path, 'websocket_chat_redis');
    like($out, qr/\Q$path\E:$line\b/, "$name: the message names $path:$line") or diag($out);
    like($out, qr/\[emerg\].*(?:websocket_chat_redis|cluster)/, "$name: the message is about the cluster directive")
        or diag($out);
    unlike($out, qr/unknown directive/, "$name: the directive is known (module loaded)");
    return unless $why;
    (my $words = $out) =~ s/"[^"]*"//g;
    like($words, $why, "$name: the message says what is wrong") or diag($out);
}

my $EMPTY = qr/empty|no seed|at least one|missing/i;
my $UNIX  = qr/unix|socket/i;
refused('an empty seed list (cluster=)', $EMPTY, redis => 'cluster=');
refused('an empty seed (cluster=127.0.0.1:1,,127.0.0.1:2)', $EMPTY, redis => 'cluster=127.0.0.1:1,,127.0.0.1:2');
refused('a unix socket seed', $UNIX, redis => 'cluster=unix:/tmp/x.sock');
refused('a database number (Redis Cluster has only 0)', qr/database|\bdb\b|SELECT|only 0/i,
        redis => 'cluster=redis://127.0.0.1:7000/2');
# Every seed is checked, at every level, and the line is the directive's own.
refused('an empty seed at location level', $EMPTY, redis => '',
        location => 'websocket_chat_redis cluster=127.0.0.1:7000,,127.0.0.1:7001;');
refused('a unix socket as a later seed at server level', undef, redis => '',
        server => 'websocket_chat_redis cluster=127.0.0.1:7000,unix:/tmp/x.sock;');

for my $ok (['a seed list' => (redis => 'cluster=127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002')],
            ['credentials on the first seed' => (redis => 'cluster=redis://user:pass@127.0.0.1:7000,127.0.0.1:7001')],
            ['a single seed at location level' => (redis => '', location => 'websocket_chat_redis cluster=127.0.0.1:7000;')]) {
    my ($name, %cfg) = @$ok;
    my ($code, $out) = test_config(chat_config(%cfg));
    is($code, 0, "nginx -t accepts $name") or diag($out);
}

# ---------------------------------------------------------------------------
# a real cluster: 3 primaries, no replicas. Without full coverage required,
# the other shards keep serving while one primary is down (part 5).

my $cdir = ChatTest::_tempdir('cluster');
my @nodes = map {
    my $p = cluster_port();
    start_redis(port => $p, args => ['--cluster-enabled', 'yes',
        '--cluster-config-file', "$cdir/nodes-$p.conf", '--cluster-node-timeout', '2000',
        '--cluster-require-full-coverage', 'no']);
} 1 .. 3;
my @cports = map { $_->port } @nodes;
{
    my ($code, $out) = ChatTest::_run_cmd(30, 'redis-cli', '--cluster', 'create',
        (map { "127.0.0.1:$_" } @cports), '--cluster-yes');
    is($code, 0, 'redis-cli --cluster create') or diag($out);
}
ok(wait_until(sub {
    !grep { my $i = eval { $_->cmd('CLUSTER', 'INFO') } // '';
            $i !~ /cluster_state:ok/ || $i !~ /cluster_known_nodes:3\b/ } @nodes
}, 20, 0.2), 'every node of the cluster says cluster_state:ok and knows 3 nodes')
    or do { diag($_->cmd('CLUSTER', 'INFO')) for @nodes; done_all(); exit };

sub slot_of { $nodes[0]->cmd('CLUSTER', 'KEYSLOT', "wschat:{$_[0]}") }

sub owner_of {
    my $slot = slot_of($_[0]);
    for my $r (@{ $nodes[0]->cmd('CLUSTER', 'SLOTS') }) {
        return $r->[2][1] if $slot >= $r->[0] && $slot <= $r->[1];
    }
    return undef;
}

sub node_at { my $p = shift; (grep { $_->port == $p } @nodes)[0] }

# A room whose slot the primary on $port owns.
sub room_on {
    my ($port, $prefix) = @_;
    for my $i (0 .. 999) {
        return "$prefix$i" if (owner_of("$prefix$i") // 0) == $port;
    }
    die "no room on 127.0.0.1:$port\n";
}

sub shardnumsub {
    my ($room) = @_;
    my $r = node_at(owner_of($room))->cmd('PUBSUB', 'SHARDNUMSUB', "wschat:{$room}");
    return $r->[1];
}

# ---------------------------------------------------------------------------
# 2. seeds where nothing listens

{
    my @dead = (free_port(), free_port());
    my $nginx = start_nginx_ok('dead seeds: nginx starts',
        chat_config(redis => 'cluster=' . join(',', map { "127.0.0.1:$_" } @dead),
                    http => $REDIS_TIMEOUT),
        allow_errors => [allow_nodes(@dead)]);
    my @pids = $nginx->worker_pids;
    my $c = unavailable_session($nginx, 'nowhere', 'dead seeds');

    my $lines = sub { scalar(map { node_lines($nginx, $_) } @dead) };
    ok(wait_until(sub { $lines->() >= 1 }, 10), 'dead seeds: an error-log line names a seed (127.0.0.1:PORT)')
        or diag($nginx->error_log_text);
    note($_) for grep { defined } (map { node_lines($nginx, $_) } @dead)[0 .. 2];
    my $delays = sub { map { /retrying in (\d+) ms/ ? $1 : () } map { node_lines($nginx, $_) } @dead };
    my $n = growth_over_window($lines, max_lines(2));
    cmp_ok($n, '>=', 1, "dead seeds: the seeds are tried again ($n lines in ${WINDOW}s)");
    cmp_ok($n, '<', max_lines(2), "dead seeds: ... fewer than " . max_lines(2) . ", not in a loop");
    my ($first, $last) = ($delays->())[0, -1];
    ok(defined $first && $last > $first && $last >= 1000,
       "dead seeds: the announced retry delay grows (backoff: first ${\($first // '?')} ms, now ${\($last // '?')} ms)");
    session_open($c, 'dead seeds') if $c;
    same_workers($nginx, \@pids, 'dead seeds');
    $nginx->stop;
}

{
    my $dead = free_port();
    my $room = room_on($cports[1], 'mixed');
    my $nginx = start_nginx_ok('a dead seed before a live one: nginx starts',
        chat_config(redis => "cluster=127.0.0.1:$dead,127.0.0.1:$cports[0]", http => $REDIS_TIMEOUT),
        allow_errors => [allow_nodes($dead)]);
    my @pids = $nginx->worker_pids;
    my $ann = eval { WSClient->join(port => $nginx->port, room => $room, nick => 'ann') };
    my $bea = eval { WSClient->join(port => $nginx->port, room => $room, nick => 'bea') };
    ok($ann && $bea, 'dead + live seed: two members join (welcome)') or diag($@);
    # The room is followed on the primary owning its slot (not on the seed).
    ok(wait_until(sub { shardnumsub($room) == 1 }, 10),
       "dead + live seed: wschat:{$room} has one shard subscriber on 127.0.0.1:$cports[1]");
    if ($ann && $bea) {
        $ann->send_text('through the live seed');
        my $m = $bea->wait_type('message', 5, sub { $_[0]{text} eq 'through the live seed' });
        ok($m, 'dead + live seed: a message reaches the other member');
        ok($ann->wait_type('message', 5, sub { $_[0]{text} eq 'through the live seed' }),
           'dead + live seed: ... and its sender');
        ok(!grep({ ($_->{type} // '') eq 'error' } $ann->events, $bea->events),
           'dead + live seed: no error events')
            or diag(join "\n", map { my $w = $_; map { "$w->[0]: $_->{_raw}" } $w->[1]->events }
                                [ann => $ann], [bea => $bea]);
        $_->send_close(1000) for $ann, $bea;
        ok($_->is_closed_by_server(5), 'dead + live seed: member closed') for $ann, $bea;
    }
    same_workers($nginx, \@pids, 'dead + live seed');
    $nginx->stop;
}

# ---------------------------------------------------------------------------
# 3. a plain redis-server as the seed

{
    my $plain = start_redis();
    my $pp = $plain->port;
    my $nginx = start_nginx_ok('plain redis seed: nginx starts',
        chat_config(redis => "cluster=127.0.0.1:$pp", http => $REDIS_TIMEOUT),
        allow_errors => [allow_nodes($pp)]);
    my @pids = $nginx->worker_pids;
    my $c = unavailable_session($nginx, 'plain', 'plain redis seed');

    ok(wait_until(sub { grep { /cluster/i } node_lines($nginx, $pp) }, 10),
       "plain redis seed: an error-log line names 127.0.0.1:$pp and says it is not a cluster")
        or diag($nginx->error_log_text);
    note($_) for grep { defined } (node_lines($nginx, $pp))[0 .. 1];

    # What the module asks of the plain server, from the server's own
    # counters (the test's own INFO calls left out).
    my $conns = sub { info($plain, 'stats')->{total_connections_received} };
    my $cmds  = sub {
        my $st = info($plain, 'commandstats');
        my $sum = 0;
        for my $k (grep { /^cmdstat_/ && $_ ne 'cmdstat_info' } keys %$st) {
            $sum += $1 if $st->{$k} =~ /\bcalls=(\d+)/;
        }
        return $sum;
    };
    my ($c0, $k0) = ($conns->(), $cmds->());
    my $n = growth_over_window(sub { scalar node_lines($nginx, $pp) }, max_lines(1));
    my ($dc, $dk) = ($conns->() - $c0, $cmds->() - $k0);
    cmp_ok($n, '<', max_lines(1), "plain redis seed: $n error-log lines in ${WINDOW}s (backoff)");
    cmp_ok($dk, '>=', 1, "plain redis seed: the map is asked for again ($dk commands in ${WINDOW}s)");
    cmp_ok($dk, '<', $MAX_CMDS, 'plain redis seed: ... not in a loop');
    cmp_ok($dc, '<', max_lines(1), "plain redis seed: $dc new connections in ${WINDOW}s");
    # It is not a cluster node: the room is neither followed nor stored there.
    my $numsub = $plain->cmd('PUBSUB', 'NUMSUB', 'wschat:plain', 'wschat:{plain}');
    my $shard = $plain->cmd('PUBSUB', 'SHARDNUMSUB', 'wschat:{plain}');
    is($numsub->[1] + $numsub->[3] + $shard->[1], 0,
       'plain redis seed: the room is not (S)SUBSCRIBEd on the plain server');
    is_deeply($plain->cmd('KEYS', 'wschat:*'), [], 'plain redis seed: no wschat:* keys written to it');
    my $st = info($plain, 'commandstats');
    note('plain redis seed: the plain server ran ' . join(', ',
        map { /^cmdstat_(.*)/ ? "$1 ($st->{$_})" =~ s/,usec.*\)/)/r : () } sort keys %$st));
    session_open($c, 'plain redis seed') if $c;
    same_workers($nginx, \@pids, 'plain redis seed');
    $nginx->stop;
    $plain->stop;
}

# ---------------------------------------------------------------------------
# 4. a fake cluster node

# CRC16 (XMODEM) of the hash tag, as Redis Cluster computes key slots.
sub key_slot {
    my $k = shift // '';
    my $s = index($k, '{');
    if ($s >= 0) {
        my $e = index($k, '}', $s + 1);
        $k = substr($k, $s + 1, $e - $s - 1) if $e > $s + 1;
    }
    my $crc = 0;
    for my $byte (unpack 'C*', $k) {
        $crc ^= $byte << 8;
        $crc = $crc & 0x8000 ? (($crc << 1) ^ 0x1021) & 0xFFFF : ($crc << 1) & 0xFFFF for 1 .. 8;
    }
    return $crc % 16384;
}

# One command (array of bulk strings, or an inline line) off the front of
# $$buf, or undef while incomplete.
sub next_command {
    my $buf = shift;
    return undef unless length $$buf;
    if (substr($$buf, 0, 1) ne '*') {
        my $i = index($$buf, "\r\n");
        return undef if $i < 0;
        my $l = substr($$buf, 0, $i + 2, '');
        return [split ' ', $l];
    }
    my $pos = 0;
    my $line = sub {
        my $i = index($$buf, "\r\n", $pos);
        return undef if $i < 0;
        my $l = substr($$buf, $pos, $i - $pos);
        $pos = $i + 2;
        return $l;
    };
    my $h = $line->() // return undef;
    my ($n) = $h =~ /^\*(-?\d+)$/ or do { $$buf = ''; return undef };
    my @a;
    for (1 .. $n) {
        my $bh = $line->() // return undef;
        my ($len) = $bh =~ /^\$(\d+)$/ or do { $$buf = ''; return undef };
        return undef if length($$buf) < $pos + $len + 2;
        push @a, substr($$buf, $pos, $len);
        $pos += $len + 2;
    }
    substr($$buf, 0, $pos, '');
    return \@a;
}

sub bulk { my $s = shift; '$' . length($s) . "\r\n$s\r\n" }

# A fake cluster node on a loopback port, in a child that lives at most 40 s.
# Its map gives every slot to 127.0.0.1:$target ($target is its own port
# unless given); every keyed command is answered -MOVED <slot> to $target.
# Each connection and each command is appended as a line to $log.
sub fake_node {
    my ($log, $target) = @_;
    my $srv = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
                                    ReuseAddr => 1, Proto => 'tcp')
        or die "fake node: $!";
    my $port = $srv->sockport;
    $target //= $port;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open my $lf, '>>', $log or POSIX::_exit(1);
        $lf->autoflush(1);
        my $id = 'fa' x 20;
        my $slots = "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n" . bulk('127.0.0.1') . ":$target\r\n" . bulk($id);
        my $nodes = "$id 127.0.0.1:$target\@" . ($target + 10000) . " myself,master - 0 0 1 connected 0-16383\n";
        my $answer = sub {
            my @a = @{ $_[0] };
            my $cmd = uc($a[0] // '');
            my $sub = uc($a[1] // '');
            print $lf $cmd =~ /^(?:CLUSTER|SCRIPT)$/ ? "$cmd $sub\n" : "$cmd\n";
            return "+PONG\r\n" if $cmd eq 'PING';
            return "+OK\r\n" if $cmd =~ /^(?:AUTH|SELECT|READONLY|READWRITE|ASKING|CLIENT)$/;
            return "-ERR unknown command '$a[0]'\r\n" if $cmd eq 'HELLO';
            return "*0\r\n" if $cmd eq 'COMMAND';
            return bulk("# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\n# Cluster\r\ncluster_enabled:1\r\n")
                if $cmd eq 'INFO';
            if ($cmd eq 'SCRIPT') {
                return bulk(sha1_hex($a[2] // '')) if $sub eq 'LOAD';
                return '*' . (@a - 2) . "\r\n" . (":1\r\n" x (@a - 2)) if $sub eq 'EXISTS';
                return "+OK\r\n";
            }
            if ($cmd eq 'CLUSTER') {
                return $slots if $sub eq 'SLOTS';
                return bulk($nodes) if $sub eq 'NODES';
                return bulk($id) if $sub eq 'MYID';
                return ':' . key_slot($a[2]) . "\r\n" if $sub eq 'KEYSLOT';
                return bulk("cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n"
                            . "cluster_known_nodes:1\r\ncluster_size:1\r\n") if $sub eq 'INFO';
                return "-ERR unknown subcommand '$a[1]'\r\n";
            }
            my $key = $cmd =~ /^(?:EVALSHA|EVAL|EVALSHA_RO|EVAL_RO|FCALL)$/
                    ? (($a[2] // 0) > 0 ? $a[3] : '') : $a[1];
            return "-MOVED " . key_slot($key) . " 127.0.0.1:$target\r\n";
        };
        my $sel = IO::Select->new($srv);
        my %buf;
        my $deadline = time + 40;
        while (time < $deadline) {
            for my $fh ($sel->can_read(0.2)) {
                if ($fh == $srv) {
                    my $c = $srv->accept or next;
                    $sel->add($c);
                    $buf{ fileno $c } = '';
                    print $lf "ACCEPT\n";
                    next;
                }
                my $b = \$buf{ fileno $fh };
                my $n = sysread($fh, $$b, 65536, length $$b);
                if (!$n) { $sel->remove($fh); delete $buf{ fileno $fh }; close $fh; next }
                my $out = '';
                while (my $cmd = next_command($b)) { $out .= $answer->($cmd) }
                syswrite($fh, $out) if length $out;
            }
        }
        POSIX::_exit(0);
    }
    close $srv;
    return ($port, $pid);
}

# {name => count} of what the fake received (ACCEPT for connections), and the total of commands.
sub fake_counts {
    my $log = shift;
    my %n;
    open my $fh, '<', $log or return (\%n, 0);
    while (my $l = <$fh>) { chomp $l; $n{$l}++ }
    my $cmds = 0;
    $cmds += $n{$_} for grep { $_ ne 'ACCEPT' } keys %n;
    return (\%n, $cmds);
}

for my $case (['MOVED loop', 0], ['map pointing at a dead node', 1]) {
    my ($what, $deadmap) = @$case;
    my $log = ChatTest::_tempdir('fake') . '/commands.log';
    my $dead = $deadmap ? free_port() : undef;
    my ($fport, $fpid) = fake_node($log, $dead);
    my $named = $deadmap ? $dead : $fport;    # the node the log must name
    my $nginx = start_nginx_ok("$what: nginx starts",
        chat_config(redis => "cluster=127.0.0.1:$fport", http => $REDIS_TIMEOUT),
        allow_errors => [allow_nodes($fport, $deadmap ? $dead : ())]);
    my @pids = $nginx->worker_pids;
    my $c = unavailable_session($nginx, 'fake', $what);

    my $re = $deadmap ? qr/./ : qr/MOVED|redirect|loop/i;
    ok(wait_until(sub { grep { $_ =~ $re } node_lines($nginx, $named) }, 10),
       "$what: an error-log line names 127.0.0.1:$named" . ($deadmap ? '' : ' and the redirect loop'))
        or diag($nginx->error_log_text);
    note($_) for grep { defined } (node_lines($nginx, $named))[0 .. 1];

    my ($seen) = fake_counts($log);
    if ($deadmap) {
        ok($seen->{'CLUSTER SLOTS'}, "$what: the module asked the fake for the map");
    } else {
        ok(($seen->{SSUBSCRIBE} // 0) + ($seen->{SPUBLISH} // 0) + ($seen->{EVALSHA} // 0),
           "$what: the module followed the map to the fake (SSUBSCRIBE/SPUBLISH/EVALSHA received)")
            or diag(explain($seen));
    }
    my ($n, $l) = growth_over_window(sub { (fake_counts($log))[1] }, $MAX_CMDS,
                                     sub { scalar node_lines($nginx, $named) }, max_lines(1));
    cmp_ok($n, '<', $MAX_CMDS, "$what: the fake received $n commands in ${WINDOW}s (no busy loop)")
        or diag(explain((fake_counts($log))[0]));
    cmp_ok($l, '<', max_lines(1), "$what: $l error-log lines naming 127.0.0.1:$named in ${WINDOW}s");
    my $total = (fake_counts($log))[1];
    ok(wait_until(sub { (fake_counts($log))[1] > $total }, 10), "$what: ... and it keeps retrying");
    ($seen) = fake_counts($log);
    note("$what: the fake received " . join(', ', map { "$_ x$seen->{$_}" } sort keys %$seen));
    session_open($c, $what) if $c;
    same_workers($nginx, \@pids, $what);
    $nginx->stop;
    kill 'TERM', $fpid;
    waitpid $fpid, 0;
}

# ---------------------------------------------------------------------------
# 5. a real primary goes away (no replica to take over) and comes back

{
    my ($victim, $other) = ($nodes[2], $nodes[0]);
    my $vp = $victim->port;
    my $rv = room_on($vp, 'gone');
    my $ro = room_on($other->port, 'stays');
    my $nginx = start_nginx_ok('dead primary: nginx starts',
        chat_config(redis => "cluster=127.0.0.1:$cports[0],127.0.0.1:$cports[1]", http => $REDIS_TIMEOUT),
        allow_errors => [allow_nodes($vp)]);
    my @pids = $nginx->worker_pids;
    my %c = map { my ($room, $nick) = @$_;
                  ($nick => eval { WSClient->join(port => $nginx->port, room => $room, nick => $nick) }) }
            [$rv, 'v1'], [$rv, 'v2'], [$ro, 'o1'], [$ro, 'o2'];
    ok(!grep({ !$c{$_} } keys %c), 'dead primary: four members join two rooms (welcome)')
        or do { diag($@); $nginx->stop; done_all(); exit };
    ok(wait_until(sub { shardnumsub($rv) == 1 && shardnumsub($ro) == 1 }, 10),
       'dead primary: both rooms followed on their own primaries');

    $victim->kill;
    for my $who (qw(v1 v2)) {
        my $e = $c{$who}->wait_type('error', 10);
        is($e && $e->{code}, 'redis_unavailable', "dead primary: $who (room on 127.0.0.1:$vp) gets redis_unavailable");
    }
    # Those on another shard are spared: they keep chatting, with no error.
    $c{o1}->send_text('other shard');
    ok($c{o2}->wait_type('message', 5, sub { $_[0]{text} eq 'other shard' }),
       'dead primary: a room on another shard still delivers');
    ok(!grep({ ($_->{type} // '') =~ /^(?:error|notice)$/ } $c{o1}->events, $c{o2}->events),
       'dead primary: members on another shard get no error or notice');

    ok(wait_until(sub { node_lines($nginx, $vp) >= 1 }, 10),
       "dead primary: an error-log line names 127.0.0.1:$vp") or diag($nginx->error_log_text);
    note($_) for grep { defined } (node_lines($nginx, $vp))[0 .. 1];
    my $n = growth_over_window(sub { scalar node_lines($nginx, $vp) }, max_lines(1));
    cmp_ok($n, '<', max_lines(1), "dead primary: $n error-log lines in ${WINDOW}s (backoff)");
    session_open($c{v1}, 'dead primary');

    # Back with its nodes.conf: same slots, same port; the retries find it.
    my $t = time;
    $victim->restart;
    for my $who (qw(v1 v2)) {
        my $notice = $c{$who}->wait_type('notice', 15);
        is($notice && $notice->{code}, 'redis_available', "dead primary back: $who gets redis_available");
    }
    note(sprintf 'redis_available %.1fs after the restart began', time - $t);
    # The node may still answer CLUSTERDOWN until it has rejoined the others:
    # a message sent now is delivered or refused to its sender, never lost.
    $c{v1}->send_text('right after the notice');
    my $got = $c{v1}->wait_for(sub {
        (($_[0]{type} // '') eq 'message' && $_[0]{text} eq 'right after the notice')
            || ($_[0]{type} // '') eq 'error' }, 5);
    ok($got, 'dead primary back: a message sent right after the notice reaches its sender or is refused to it')
        or diag('v1 events: ' . join(' ', map { $_->{_raw} // $_->{type} } $c{v1}->events));
    note('right after the notice: ' . ($got ? $got->{_raw} : 'nothing'));
    ok(wait_until(sub { (eval { $victim->cmd('CLUSTER', 'INFO') } // '') =~ /cluster_state:ok/ }, 15, 0.2),
       'dead primary back: the node has rejoined (cluster_state:ok)');
    $c{v1}->send_text('back again');
    ok($c{v2}->wait_type('message', 5, sub { $_[0]{text} eq 'back again' }),
       'dead primary back: its room delivers again')
        or diag('v2 events: ' . join(' ', map { $_->{_raw} // $_->{type} } $c{v2}->events));
    $_->send_close(1000) for values %c;
    ok($c{$_}->is_closed_by_server(5), "dead primary: $_ closed") for sort keys %c;
    same_workers($nginx, \@pids, 'dead primary');
    $nginx->stop;
}

done_all();
