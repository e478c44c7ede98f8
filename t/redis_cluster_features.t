# Features that must work on a Redis Cluster as on one Redis
# (websocket_chat_redis cluster=...): 3 primaries, no replicas, history on,
# 2 workers (listen ... reuseport), a room on each primary with at least 2
# members on each worker.
# (1) resume: a member that saw m1..m3 leaves and comes back with
#     ?since=<id of m3>: welcome, then a history of exactly m4..m6 with
#     their ids (those of the stream on the room's primary), no gap, then
#     live messages only; in the room on each shard;
# (2) websocket_chat_publish to the room on each shard: 201 {id, room}; every
#     member on both workers gets it with that id; it is in the stream on
#     the room's primary and in a later joiner's history;
# (3) presence leases: each room's lease keys are wschat:{<tag>}nodes (and
#     wschat:{<tag>}node:<id>) on the room's primary, in the room's slot,
#     naming both workers; after kill -9 of one worker (members in rooms on
#     all 3 shards), every member on the other worker gets one leave per
#     member of the dead one in its room within 25 s (lease 15 s, renewed
#     every 5 s), the members hashes hold only the living, and the dead
#     worker's lease is gone from each room's slot;
# (4) TLS: a cluster whose nodes have TLS ports and a TLS cluster bus
#     (tls-cluster yes), certificates made here with openssl; nginx with
#     cluster=rediss://<TLS ports> and a trusted CA: chat and history in a
#     room on each shard, the worker connected to TLS ports only; with a
#     CA that did not sign the nodes' certificate: a log line naming the
#     node, retries, redis_unavailable to every session, which stays open,
#     and the worker lives.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;
use ChatCluster;
use ChatIds;

my $JSON = JSON::PP->new->utf8;
my $T0 = time;
my $LEASE_BOUND  = 25;   # seconds from the kill to the last leave
my $MAX_PER_ROOM = 30;   # bound on the joins needed to spread a room over both workers
my $WINDOW       = 4;    # seconds over which retries against a bad CA are counted
my $MAX_LINES    = 60;   # their bound: under 10 per connection (2) and node (3)

sub chan { "wschat:{$_[0]}" }

sub short { my $s = join ' ', map { $_ // 'undef' } @_; length $s > 300 ? substr($s, 0, 300) . '...' : $s }

sub types { join ' ', map { type_of($_) . (type_of($_) eq 'error' ? "($_->{code})" : '') } @_ }

sub wait_text {
    my ($c, $text, $timeout) = @_;
    return (grep { type_of($_) eq 'message' && $_->{text} eq $text } $c->events)[0]
        // $c->wait_for(sub { type_of($_[0]) eq 'message' && $_[0]{text} eq $text }, $timeout // 5);
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

sub hist_msgs {
    my $h = shift;
    return () unless type_of($h) eq 'history' && ref $h->{messages} eq 'ARRAY';
    return @{ $h->{messages} };
}

# Keys matching $pattern on one node (SCAN, bounded to 100 rounds).
sub scan_keys {
    my ($node, $pattern) = @_;
    my ($cursor, @keys) = (0);
    for (1 .. 100) {
        my ($next, $batch) = @{ $node->cmd('SCAN', $cursor, 'MATCH', $pattern, 'COUNT', 1000) };
        push @keys, @$batch;
        $cursor = $next;
        last if $cursor eq '0';
    }
    return @keys;
}

my $PUBLISH = <<'EOT';
        location = /publish {
            websocket_chat_publish;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_user;
        }
EOT

# ================================================================ cluster, nginx

my $cl = ChatCluster->start(primaries => 3, replicas => 0, node_timeout => 2000);
my @P = $cl->primaries;
is(scalar @P, 3, 'cluster of 3 primaries is up');
my %node = map { $_->port => $_ } @P;

my $by = $cl->rooms_on_each_primary(1, 'cf');
my %owner = map { my $p = $_; map { ($_ => $p) } @{ $by->{$p} } } keys %$by;
my @rooms = sort keys %owner;
my %slot = map { $_ => $cl->room_slot($_) } @rooms;
is(scalar(keys %{ { map { $_ => 1 } values %owner } }), 3,
   'a room on each primary: ' . join(', ', map { "$_ (slot $slot{$_}) on $owner{$_}" } @rooms));

my $nginx = start_nginx_ok('nginx starts: cluster=<3 seeds>, 2 workers, history on, a publish location',
    chat_config(workers => 2, listen => 'reuseport', redis => 'cluster=' . $cl->seeds,
                http => 'websocket_chat_history 50 1h;', server => $PUBLISH), workers => 2);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;
is(scalar @workers, 2, 'two workers');
my ($victim, $survivor) = @workers;

# Members: {c, w (worker pid), nick, sid}. reuseport spreads connections by
# a hash of the client's port: join until each worker holds 2 per room.
my %mem;
for my $r (@rooms) {
    my ($n, %on) = (0);
    while ($n < $MAX_PER_ROOM) {
        my $nick = "$r-" . $n++;
        my $c = WSClient->join(port => $port, room => $r, nick => $nick);
        my $w = client_worker($nginx, $c, @workers) // 0;
        push @{ $mem{$r} }, { c => $c, w => $w, nick => $nick, sid => $c->welcome->{session} };
        $on{$w}++;
        last unless grep { ($on{$_} // 0) < 2 } @workers;
    }
    ok(!grep({ ($on{$_} // 0) < 2 } @workers),
       "$r: at least 2 members on each worker ($n joined: " . join(', ', map { "$_: " . ($on{$_} // 0) } @workers) . ')');
}

sub on_worker { my ($r, $w) = @_; grep { $_->{w} == $w } @{ $mem{$r} } }

# ================================================================ (1) resume

my %left_before;    # sessions that left on their own before the kill
for my $r (@rooms) {
    my $t = "(1) $r (on $owner{$r})";
    my ($s) = on_worker($r, $survivor);
    my ($rd) = on_worker($r, $victim);
    my @seen;
    for my $i (1 .. 3) {
        $s->{c}->send_text("$r:m$i");
        my $m = wait_text($rd->{c}, "$r:m$i", 5);
        push @seen, $m && $m->{id};
    }
    ok(!grep({ !is_pos($_) } @seen), "$t: the reader (worker $victim) saw m1..m3");
    my $x = $seen[2];
    $rd->{c}->send_close(1000);
    ok($rd->{c}->recv_close(5), "$t: the reader left");
    $left_before{ $rd->{sid} } = 1;
    @{ $mem{$r} } = grep { $_ != $rd } @{ $mem{$r} };

    $s->{c}->send_text("$r:m$_") for 4 .. 6;
    my @missed = map { my $m = wait_text($s->{c}, "$r:m$_", 5); $m ? $m->{id} : undef } 4 .. 6;
    is(scalar(grep { is_pos($_) } @missed), 3, "$t: m4..m6 sent while it was away");

    my $back = WSClient->connect(port => $port, welcome => 1,
        path => "/ws?room=$r&nick=$r-back&since=" . WSClient::uri_escape($x // ''));
    my $bw = client_worker($nginx, $back, @workers) // 0;
    my @ev = opening($back);
    is(types(@ev), 'welcome history', "$t: resume with since=<m3's id> (on worker $bw): welcome, history, no gap");
    my @h = hist_msgs($ev[-1]);
    is_deeply([map { $_->{text} } @h], ["$r:m4", "$r:m5", "$r:m6"], "$t: the history is exactly m4..m6, in order");
    is_deeply([map { $_->{id} } @h], \@missed, "$t: with the ids the members saw");
    my $xr = $node{ $owner{$r} }->cmd('XRANGE', chan($r), "($x", '+');
    is_deeply([map { $_->[0] } @$xr], \@missed, "$t: those are the entries after m3 in the stream on the room's primary");
    $s->{c}->send_text("$r:m7");
    ok(wait_text($back, "$r:m7", 5), "$t: then live messages");
    is_deeply([map { $_->{text} } live_messages($back)], ["$r:m7"], "$t: nothing of the history again live");
    push @{ $mem{$r} }, { c => $back, w => $bw, nick => "$r-back", sid => $back->welcome->{session} };
}

# ================================================================ (2) publish

for my $r (@rooms) {
    my $t = "(2) $r (on $owner{$r})";
    my $text = "$r:published";
    my $res = WSClient::http_request(port => $port, method => 'POST',
                                     path => "/publish?room=$r&user=backend", body => $text);
    is($res && $res->{status}, 201, "$t: POST -> 201") or diag('response: ' . short($res ? $res->{body} : 'none'));
    my $j = eval { $JSON->decode($res->{body}) } // {};
    ok(is_pos($j->{id}), "$t: the answer carries a message id (" . ($j->{id} // 'undef') . ')');
    is($j->{room}, $r, "$t: and the room");
    my @bad;
    for my $m (@{ $mem{$r} }) {
        my $e = wait_text($m->{c}, $text, 5);
        push @bad, "$m->{nick} (worker $m->{w}): " . ($e ? "id $e->{id}, user $e->{user}" : 'nothing')
            unless $e && ($e->{id} // '') eq ($j->{id} // '-') && $e->{user} eq 'backend';
    }
    ok(!@bad, "$t: every member (" . scalar(@{ $mem{$r} }) . ', both workers) receives it from backend with that id')
        or diag(join "\n", @bad);
    my $entry = is_pos($j->{id}) ? $node{ $owner{$r} }->cmd('XRANGE', chan($r), $j->{id}, $j->{id}) : [];
    my %f = @{ $entry->[0][1] // [] };
    ok(@$entry == 1 && index($f{h} // '', $text) >= 0, "$t: the stream on the room's primary holds it under that id");
    my $late = WSClient->join(port => $port, room => $r, nick => "$r-late");
    my @lh = hist_msgs($late->wait_type('history', 5));
    is_deeply([map { [$_->{id}, $_->{text}] } @lh[-1 .. -1]], [[$j->{id}, $text]],
              "$t: a later joiner's history ends with it");
    $left_before{ $late->welcome->{session} } = 1;
    $late->send_close(1000);
    $late->recv_close(5);
}

# ================================================================ (3) presence leases

my (%victims, %survivors);    # room => [members]
for my $r (@rooms) {
    $victims{$r}   = [on_worker($r, $victim)];
    $survivors{$r} = [on_worker($r, $survivor)];
}
my @vrooms = grep { @{ $victims{$_} } && @{ $survivors{$_} } } @rooms;
my %vshards = map { $owner{$_} => 1 } @vrooms;
ok(keys %vshards >= 2, '(3) worker ' . $victim . ' to be killed has members in rooms on '
   . scalar(keys %vshards) . ' shards, with members on worker ' . $survivor . ' too');

# The lease keys, found by SCAN on every primary (their tag is the module's).
my (%nodes_key, %lease_before, @stray);
for my $p (@P) {
    for my $k (scan_keys($p, 'wschat:*nodes')) {
        my $s = $cl->slot_of($k);
        my ($r) = grep { $slot{$_} == $s } @rooms;
        if ($r && $k =~ /^wschat:\{[^{}]+\}nodes$/) { push @{ $nodes_key{$r} }, $k }
        else { push @stray, "$k (slot $s on " . $p->port . ')' }
    }
}
ok(!@stray, '(3) no lease key outside the rooms\' slots (no unscoped wschat:nodes)') or diag(join "\n", @stray);
for my $r (@rooms) {
    my $t = "(3) $r (on $owner{$r}, slot $slot{$r})";
    my @k = @{ $nodes_key{$r} // [] };
    is(scalar @k, 1, "$t: one lease key in the room's slot: @k");
    next unless @k == 1;
    my $ids = $node{ $owner{$r} }->cmd('ZRANGE', $k[0], 0, -1);
    $lease_before{$r} = { key => $k[0], ids => $ids };
    is(scalar @$ids, 2, "$t: it names both workers' leases (" . join(', ', @$ids) . ')');
    (my $scope = $k[0]) =~ s/nodes$//;
    my @hashes = grep { $node{ $owner{$r} }->cmd('EXISTS', "${scope}node:$_") } @$ids;
    is(scalar @hashes, scalar @$ids, "$t: each lease has its ${scope}node:<id> hash there");
}

allow_killed_worker($nginx, $victim);
ok(kill('KILL', $victim), "(3) kill -9 worker $victim");
my $t_kill = time;
my @vclients = map { $_->{c} } map { @{ $victims{$_} } } @rooms;
is(scalar(grep { $_->is_closed_by_server(5) } @vclients), scalar @vclients,
   '(3) the dead worker\'s ' . scalar(@vclients) . ' clients see their connections end');

my @sclients = map { $_->{c} } map { @{ $survivors{$_} } } @rooms;
my @sroom    = map { my $r = $_; map { $r } @{ $survivors{$r} } } @rooms;
my %vsid     = map { my $r = $_; ($r => { map { ($_->{sid} => $_->{nick}) } @{ $victims{$r} } }) } @rooms;
sub leaves_of { grep { type_of($_) eq 'leave' } $_[0]->events }
my $all_left = sub {
    for my $i (0 .. $#sclients) {
        my %got = map { ($_->{session} => 1) } leaves_of($sclients[$i]);
        return 0 if grep { !$got{$_} } keys %{ $vsid{ $sroom[$i] } };
    }
    return 1;
};
ChatCluster::pump(\@sclients, $t_kill + $LEASE_BOUND + 1 - time, $all_left);
my ($t_last, @bad_leave);
my %living = map { ($_->{sid} => 1) } map { @{ $survivors{$_} } } @rooms;
for my $i (0 .. $#sclients) {
    my ($c, $r) = ($sclients[$i], $sroom[$i]);
    my %n;
    for my $l (leaves_of($c)) {
        $n{ $l->{session} }++;
        push @bad_leave, "$r: a leave for $l->{user}, who is still there" if $living{ $l->{session} };
        if (my $nick = $vsid{$r}{ $l->{session} }) {
            push @bad_leave, "$r: the leave of $nick names user $l->{user}" if $l->{user} ne $nick;
            $t_last = $l->{_t} if defined $l->{_t} && (!defined $t_last || $l->{_t} > $t_last);
        }
    }
    for my $sid (sort keys %{ $vsid{$r} }) {
        my $k = $n{$sid} // 0;
        push @bad_leave, "$r: member " . $c->welcome->{user} . " got $k leave(s) for $vsid{$r}{$sid}" if $k != 1;
    }
}
my $took = defined $t_last ? $t_last - $t_kill : undef;
ok(!@bad_leave, '(3) every member on worker ' . $survivor . ' got exactly one leave, with its user, for each member '
   . 'the dead worker had in its room, and none for the living') or diag(join "\n", @bad_leave);
ok(defined $took && $took <= $LEASE_BOUND, sprintf('(3) in rooms on %d shards, within %d s (the last after %s)',
   scalar(keys %vshards), $LEASE_BOUND, defined $took ? sprintf('%.1f s', $took) : 'never'));

for my $r (@rooms) {
    my $t = "(3) $r (on $owner{$r})";
    my $pn = $node{ $owner{$r} };
    my @want = sort map { $_->{sid} } @{ $survivors{$r} };
    my @have;
    ok(wait_until(sub { @have = sort @{ $pn->cmd('HKEYS', chan($r) . ':members') }; "@have" eq "@want" }, 5),
       "$t: the members hash holds only the " . scalar(@want) . ' members of the living worker')
        or diag("have @have; want @want");
    my $lb = $lease_before{$r} or next;
    my ($after, @gone);
    wait_until(sub {
        $after = $pn->cmd('ZRANGE', $lb->{key}, 0, -1);
        my %now = map { $_ => 1 } @$after;
        @gone = grep { !$now{$_} } @{ $lb->{ids} };
        @gone == 1;
    }, 5);
    is(scalar @gone, 1, "$t: one of the two leases is gone from $lb->{key} (left: @$after)");
    (my $scope = $lb->{key}) =~ s/nodes$//;
    is(scalar(grep { $pn->cmd('EXISTS', "${scope}node:$_") } @gone), 0, "$t: and its node hash with it");
    my $got;
    ok(wait_until(sub { ($got = $cl->shardnumsub(chan($r), $pn)) == 1 }, 5),
       "$t: SHARDNUMSUB 1 on the room's primary: only the living worker follows it (got $got)");
}
# The living worker still chats in every room.
for my $r (@rooms) {
    my ($s, @rest) = @{ $survivors{$r} };
    $s->{c}->send_text("$r:after-kill");
    my $n = grep { wait_text($_->{c}, "$r:after-kill", 5) } $s, @rest;
    is($n, 1 + @rest, "(3) $r: its members on the living worker still chat");
}
$_->send_close(1000) for @sclients;
$_->recv_close(5) for @sclients;
$nginx->stop;

# ================================================================ (4) TLS

my $dir = ChatTest::_tempdir('certs');
sub openssl {
    my ($code, $out) = ChatTest::_run_cmd(20, 'openssl', @_);
    BAIL_OUT("openssl @_ failed ($code): $out") unless $code == 0;
    return $out;
}
# One config for every certificate, so that no system openssl.cnf default
# changes what they say. The nodes' certificate serves both ends of the
# cluster bus, hence clientAuth too.
ChatTest::_spurt("$dir/openssl.cnf", <<'EOT');
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:redis.test
EOT
my @EC = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');
for my $ca (qw(ca1 ca2)) {
    openssl('req', '-x509', '-config', "$dir/openssl.cnf", '-extensions', 'ca', @EC,
            '-keyout', "$dir/$ca.key", '-out', "$dir/$ca.pem", '-days', 2, '-subj', "/CN=wschat cluster test $ca");
}
openssl('req', '-new', '-config', "$dir/openssl.cnf", @EC, '-keyout', "$dir/server.key",
        '-out', "$dir/server.csr", '-subj', '/CN=redis.test');
openssl('x509', '-req', '-in', "$dir/server.csr", '-CA', "$dir/ca1.pem", '-CAkey', "$dir/ca1.key",
        '-set_serial', 100, '-days', 2, '-out', "$dir/server.pem", '-extfile', "$dir/openssl.cnf",
        '-extensions', 'server');
my ($v_ok)  = ChatTest::_run_cmd(10, 'openssl', 'verify', '-CAfile', "$dir/ca1.pem", "$dir/server.pem");
my ($v_bad) = ChatTest::_run_cmd(10, 'openssl', 'verify', '-CAfile', "$dir/ca2.pem", "$dir/server.pem");
ok($v_ok == 0 && $v_bad != 0, '(4) certificates: CA 1 signs the nodes\' certificate, CA 2 does not')
    or BAIL_OUT('the generated certificates are not what the test needs');

my $tcl = ChatCluster->start_tls(primaries => 3, cert => "$dir/server.pem", key => "$dir/server.key",
                                 ca => "$dir/ca1.pem");
my @TP = $tcl->primaries;
is(scalar @TP, 3, sprintf('(4) TLS cluster (TLS bus) of 3 primaries is up (created in %.1fs)', $tcl->{create_seconds}));
my %tnode = map { $_->port => $_ } @TP;
my %tls_of = map { ($_->port => $tcl->tls_port($_)) } @TP;
my $tby = $tcl->rooms_on_each_primary(1, 'tls');
my %towner = map { my $p = $_; map { ($_ => $p) } @{ $tby->{$p} } } keys %$tby;
my @trooms = sort keys %towner;
my $seeds = 'cluster=rediss://' . $tcl->tls_seeds;

sub tls_conf {
    my ($ca) = @_;
    return chat_config(workers => 1, redis => $seeds, http => join("\n    ",
        'websocket_chat_history 50 1h;',
        "websocket_chat_redis_ssl_trusted_certificate $dir/$ca.pem;",
        'websocket_chat_redis_ssl_name redis.test;',
        'websocket_chat_redis_timeout 1s;'));
}

my $tn = start_nginx_ok("(4) nginx starts: $seeds, CA 1, ssl_name redis.test", tls_conf('ca1'));
my ($twpid) = $tn->worker_pids;
my @topen;    # kept until the connections are counted, so that every room is followed
for my $r (@trooms) {
    my $t = "(4) $r (on " . $towner{$r} . ", TLS $tls_of{ $towner{$r} })";
    my @c = map { WSClient->join(port => $tn->port, room => $r, nick => "$r-$_") } qw(a b);
    $c[0]->send_text("$r:hello");
    $c[1]->send_text("$r:reply");
    my $n = 0;
    for my $c (@c) { $n++ if wait_text($c, "$r:hello", 5) && wait_text($c, "$r:reply", 5) }
    is($n, 2, "$t: both members receive both messages");
    my $late = WSClient->join(port => $tn->port, room => $r, nick => "$r-late");
    my @h = hist_msgs($late->wait_type('history', 5));
    is_deeply([sort map { $_->{text} } @h], ["$r:hello", "$r:reply"], "$t: a later joiner's history holds both");
    my $xlen = $tnode{ $towner{$r} }->cmd('XLEN', chan($r));
    is($xlen, 2, "$t: the stream is on the room's primary");
    is($tcl->shardnumsub(chan($r), $tnode{ $towner{$r} }), 1, "$t: SSUBSCRIBEd there");
    push @topen, @c, $late;
}
{
    my (%tls_conns, %plain_conns);
    for my $p (@TP) {
        my %t = redis_conns_by_pid($tls_of{ $p->port }, $twpid);
        my %q = redis_conns_by_pid($p->port, $twpid);
        $tls_conns{ $p->port } = $t{$twpid} // 0;
        $plain_conns{ $p->port } = $q{$twpid} // 0;
    }
    my $show = join ', ', map { "$_: TLS $tls_conns{$_}, plain $plain_conns{$_}" } sort keys %tls_conns;
    my $total = 0;
    $total += $_ for values %tls_conns;
    ok(!grep({ $_ < 1 || $_ > 2 } values %tls_conns) && $total <= 6,
       "(4) the worker holds 1 or 2 connections to each node's TLS port, at most 6 in all ($show)");
    ok(!grep({ $_ } values %plain_conns), '(4) and none to a plain port');
}
$_->send_close(1000) for @topen;
$_->recv_close(5) for @topen;
$tn->stop;

# --- a CA that did not sign the nodes' certificate
{
    my $bad = start_nginx_ok('(4) nginx starts: the same cluster with CA 2 trusted', tls_conf('ca2'));
    my @w = $bad->worker_pids;
    my @s = map { WSClient->connect(port => $bad->port, path => "/ws?room=$_&nick=$_-x") } @trooms;
    my $node_re = join '|', map { "127\\.0\\.0\\.1:$_(?!\\d)" } values %tls_of;
    my $node_lines = sub { log_lines($bad, qr/\[(?:error|warn)\] .*websocket_chat: .*(?:$node_re)/) };
    my @a;
    ok(wait_until(sub { @a = grep { /certificate verify/ } $node_lines->(); @a >= 1 }, 10),
       '(4) wrong CA: an error-log line (warn or error) names the node and the certificate error')
        or diag(join "\n", log_lines($bad, qr/websocket_chat|SSL/));
    note("(4) $_") for @a[0 .. ($#a < 1 ? $#a : 1)];
    # Counted over a window from the first failure, when retries are
    # densest: backoff from 100 ms gives a few attempts per connection, a
    # busy loop thousands (the wait ends early at the bound).
    my $start = () = $node_lines->();
    wait_until(sub { $node_lines->() - $start >= $MAX_LINES }, $WINDOW, 0.1);
    my $n_lines = $node_lines->() - $start;
    cmp_ok($n_lines, '>=', 1, "(4) wrong CA: tried again ($n_lines lines in ${WINDOW}s)");
    cmp_ok($n_lines, '<', $MAX_LINES, "(4) wrong CA: ... fewer than $MAX_LINES, with backoff");
    my $n = 0;
    for my $i (0 .. $#s) {
        my $e = $s[$i]->wait_type('error', 5);
        $n++ if $e && $e->{code} eq 'redis_unavailable';
    }
    is($n, scalar @s, '(4) wrong CA: a session in the room on each shard gets redis_unavailable');
    my $open = grep { (ping_pong($_, 5))[0] } @s;
    is($open, scalar @s, '(4) wrong CA: the sessions stay open (ping answered)');
    my @welcomed = grep { my $c = $_; grep { type_of($_) =~ /^(?:welcome|notice)$/ } $c->events, $c->skipped } @s;
    is(scalar @welcomed, 0, '(4) wrong CA: no welcome, no redis_available');
    is_deeply([$bad->worker_pids], \@w, '(4) wrong CA: the worker is the same process');
    $_->send_close(1000) for @s;
    $bad->stop;
}

note(sprintf 'total %.1fs', time - $T0);
done_all();
