package ChatCluster;

# A Redis Cluster on loopback for the cluster tests, built from
# ChatTest::start_redis nodes (so they are stopped with the others).
#
#   my $cl = ChatCluster->start(primaries => 3, replicas => 1, node_timeout => 2000);
#   chat_config(redis => 'cluster=' . $cl->seeds, ...);
#   my $p = $cl->node_for_slot($cl->slot_of('wschat:{lobby}'));  # a ChatTest::Redis
#   my $rooms = $cl->rooms_on_each_primary(2, 'r');   # {port => [room, room]}
#   $cl->kill_primary($p); my $new = $cl->wait_failover($p, 20);
#   $cl->migrate_slot($slot, $from, $to, step => sub { my $stage = shift; ... });
#   $cl->shardnumsub('wschat:{lobby}');   # on the owning primary (or ..., $node)
#
# Design choices
# * Every node gets its own directory (ChatTest's), nodes.conf there, no
#   persistence, and a cluster bus port of its own from free_port
#   (cluster-port), rather than port + 10000, which may be taken or > 65535.
# * cluster-require-full-coverage no: with the default, every node refuses
#   every command while one shard's primary is down, so rooms on the shards
#   that are fine could not keep chatting during a failover, which is what
#   the failover test is about. Override with full_coverage => 1.
# * The topology is never cached: primaries, node_for_slot and friends ask a
#   live node (CLUSTER SLOTS / CLUSTER NODES) each time, so they stay right
#   after a failover or a migration.
# * "Ready" (after start, wait_failover, migrate_slot) means: cluster_state:ok
#   on every live node, every live node reporting the same slot owners for
#   all 16384 slots, and (with replicas) every replica's link to its primary
#   up, so that a failover can happen.
# * Every wait is a poll against a deadline; the cluster creation by
#   redis-cli is bounded by a timeout.

use strict;
use warnings;

use ChatTest ();
use Time::HiRes qw(time);
use Carp qw(croak);

my $SLOTS = 16384;

sub start {
    my ($class, %o) = @_;
    my $np = $o{primaries} // 3;
    my $nr = $o{replicas} // 0;
    my $timeout = $o{node_timeout} // 2000;
    my $coverage = $o{full_coverage} ? 'yes' : 'no';
    croak 'ChatCluster: redis-cli --cluster create needs at least 3 primaries' if $np < 3;
    my $self = bless { node_timeout => $timeout, nodes => [], dead => {} }, $class;

    my %taken;
    my $port = sub {
        my $p;
        do { $p = ChatTest::free_port() } while $taken{$p}++;
        return $p;
    };
    for (1 .. $np * (1 + $nr)) {
        my ($p, $bus) = ($port->(), $port->());
        push @{ $self->{nodes} }, ChatTest::start_redis(port => $p, args => [
            '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
            '--cluster-node-timeout', $timeout, '--cluster-port', $bus,
            '--cluster-require-full-coverage', $coverage,
            # a replica's first full sync would otherwise wait 5 s for others to join it
            '--repl-diskless-sync-delay', 0]);
    }
    my @addrs = map { '127.0.0.1:' . $_->port } @{ $self->{nodes} };
    my $t_create = time;
    my ($code, $out) = ChatTest::_run_cmd(30, 'redis-cli', '--cluster', 'create', @addrs,
        '--cluster-replicas', $nr, '--cluster-yes');
    croak "ChatCluster: redis-cli --cluster create failed (exit $code):\n$out" if $code != 0;
    $self->{create_output} = $out;
    $self->{create_seconds} = time - $t_create;
    my $why;
    ChatTest::wait_until(sub { !defined($why = $self->_not_ready($np, $nr)) }, 30, 0.1)
        or croak "ChatCluster: not ready 30 s after creation: $why\n$out";
    $self->{want_replicas} = $nr;
    return $self;
}

sub node_timeout { $_[0]{node_timeout} }

# "127.0.0.1:p1,127.0.0.1:p2,..." of the current primaries.
sub seeds { join ',', map { '127.0.0.1:' . $_->port } $_[0]->primaries }

# The live nodes (ChatTest::Redis objects), in creation order.
sub nodes {
    my $self = shift;
    return grep { !$self->{dead}{ $_->port } } @{ $self->{nodes} };
}

sub node_by_port {
    my ($self, $port) = @_;
    my ($n) = grep { $_->port == $port } $self->nodes;
    return $n;
}

# A command on the first live node that answers.
sub _any {
    my ($self, @cmd) = @_;
    my $err;
    for my $n ($self->nodes) {
        my $r = eval { $n->cmd(@cmd) };
        return $r unless $@;
        $err = $@;
    }
    croak "ChatCluster: no live node answers @cmd: " . ($err // 'no live node');
}

# CLUSTER SLOTS of $node as [[start, end, primary port], ...] sorted by start.
sub _slot_map {
    my ($self, $node) = @_;
    my $r = $node->cmd('CLUSTER', 'SLOTS');
    my @m;
    for my $e (@$r) {
        my ($s, $e2, $p) = @$e;
        push @m, [0 + $s, 0 + $e2, 0 + $p->[1]];
    }
    return [sort { $a->[0] <=> $b->[0] } @m];
}

sub _map_text {
    my $m = shift;
    return join ' ', map { "$_->[0]-$_->[1]:$_->[2]" } @$m;
}

# CLUSTER NODES of $node as hashrefs: id, port, flags, master (id or '-'),
# master_port (when known), link.
sub _cluster_nodes {
    my ($self, $node) = @_;
    my @e;
    for my $l (split /\r?\n/, $node->cmd('CLUSTER', 'NODES')) {
        my ($id, $addr, $flags, $master, undef, undef, undef, $link) = split / /, $l;
        next unless defined $link;
        my ($port) = $addr =~ /:(\d+)/;
        push @e, { id => $id, port => $port, flags => $flags, master => $master, link => $link };
    }
    my %port_of = map { $_->{id} => $_->{port} } @e;
    $_->{master_port} = $port_of{ $_->{master} } for grep { $_->{master} ne '-' } @e;
    return @e;
}

# undef when ready (see the header), else why not.
sub _not_ready {
    my ($self, $np, $nr) = @_;
    my ($text, $map);
    for my $n ($self->nodes) {
        my $info = eval { $n->cmd('CLUSTER', 'INFO') } // return "node " . $n->port . ": $@";
        return "node " . $n->port . ": not cluster_state:ok" unless $info =~ /^cluster_state:ok\r?$/m;
        my $m = eval { $self->_slot_map($n) } // return "node " . $n->port . ": $@";
        my $t = _map_text($m);
        $text //= $t;
        $map //= $m;
        return "nodes disagree on the slot owners: '$text' vs '$t' (node " . $n->port . ')'
            if $t ne $text;
    }
    return 'no live node' unless $map;
    my $next = 0;
    for my $e (@$map) {
        return "slot $next has no owner" if $e->[0] != $next;
        $next = $e->[1] + 1;
    }
    return "slots from $next on have no owner" if $next != $SLOTS;
    my %owners = map { $_->[2] => 1 } @$map;
    return scalar(keys %owners) . " primaries own slots, not $np"
        if defined $np && keys %owners != $np;
    if ($nr) {
        for my $n ($self->nodes) {
            next if $owners{ $n->port };
            my $rep = eval { $n->cmd('INFO', 'replication') } // return "node " . $n->port . ": $@";
            return "replica " . $n->port . ' has no link up to its primary'
                unless $rep =~ /^master_link_status:up\r?$/m;
        }
        # CLUSTER SLOTS leaves out a replica until its replication offset
        # is gossiped as non-zero (up to repl-ping-replica-period); CLUSTER
        # NODES tells at once who follows whom.
        for my $n ($self->nodes) {
            my %rep;
            for my $e (eval { $self->_cluster_nodes($n) }) {
                $rep{ $e->{master_port} }++ if $e->{flags} =~ /\bslave\b/ && $e->{flags} !~ /fail/
                                             && defined $e->{master_port};
            }
            for my $p (sort keys %owners) {
                return "node " . $n->port . " sees " . ($rep{$p} // 0) . " replica(s) of $p, not $nr"
                    if ($rep{$p} // 0) != $nr;
            }
        }
    }
    return undef;
}

# The current primaries (live nodes owning slots), in creation order.
sub primaries {
    my $self = shift;
    my $m = $self->_slot_map_any;
    my %own = map { $_->[2] => 1 } @$m;
    return grep { $own{ $_->port } } $self->nodes;
}

sub _slot_map_any {
    my $self = shift;
    my $err;
    for my $n ($self->nodes) {
        my $m = eval { $self->_slot_map($n) };
        return $m if $m;
        $err = $@;
    }
    croak "ChatCluster: no live node answers CLUSTER SLOTS: " . ($err // '');
}

# The primary (ChatTest::Redis) owning $slot, as a live node sees it.
sub node_for_slot {
    my ($self, $slot) = @_;
    for my $e (@{ $self->_slot_map_any }) {
        return $self->node_by_port($e->[2]) if $slot >= $e->[0] && $slot <= $e->[1];
    }
    return undef;
}

sub slot_of {
    my ($self, $key) = @_;
    return $self->_any('CLUSTER', 'KEYSLOT', $key);
}

# The slot of room $room's channel and keys (default prefix wschat:).
sub room_slot {
    my ($self, $room, $prefix) = @_;
    return $self->slot_of(($prefix // 'wschat:') . "{$room}");
}

sub room_node { my ($self, @a) = @_; $self->node_for_slot($self->room_slot(@a)) }

# Room names "$prefix<i>" such that each current primary owns $n of them:
# {primary port => [names]}. Bounded: croaks after 100 * $n * primaries tries.
sub rooms_on_each_primary {
    my ($self, $n, $prefix) = @_;
    $prefix //= 'room';
    my $map = $self->_slot_map_any;
    my %rooms = map { $_->[2] => [] } @$map;
    my $left = $n * keys %rooms;
    my $max = 100 * $left;
    for (my $i = 0; $left > 0; $i++) {
        croak "ChatCluster: rooms_on_each_primary($n, $prefix): not found in $max tries" if $i >= $max;
        my $room = "$prefix$i";
        my $slot = $self->room_slot($room);
        my ($e) = grep { $slot >= $_->[0] && $slot <= $_->[1] } @$map;
        my $list = $rooms{ $e->[2] };
        next if @$list >= $n;
        push @$list, $room;
        $left--;
    }
    return \%rooms;
}

# Node id of a node (CLUSTER MYID).
sub node_id {
    my ($self, $node) = @_;
    return $node->cmd('CLUSTER', 'MYID');
}

# kill -9 a primary; remembers its slots and replicas for wait_failover.
sub kill_primary {
    my ($self, $node) = @_;
    my $port = $node->port;
    my $map = $self->_slot_map_any;
    my @mine = grep { $_->[2] == $port } @$map;
    croak "ChatCluster: kill_primary: $port owns no slots" unless @mine;
    my %replicas = map { $_->{port} => 1 }
                   grep { ($_->{master_port} // 0) == $port } $self->_cluster_nodes($node);
    $self->{killed}{$port} = { ranges => [map { [$_->[0], $_->[1]] } @mine], replicas => \%replicas };
    $node->kill;
    $self->{dead}{$port} = 1;
    return time;
}

# One check: the new primary (ChatTest::Redis) when a former replica of the
# killed $old owns all its slots and the cluster is ready again, else undef.
sub failover_done {
    my ($self, $old) = @_;
    my $k = $self->{killed}{ $old->port } or croak 'ChatCluster: failover_done: not killed here';
    my $map = eval { $self->_slot_map_any } or return undef;
    my %new;
    for my $r (@{ $k->{ranges} }) {
        for my $e (@$map) {
            next if $e->[1] < $r->[0] || $e->[0] > $r->[1];
            $new{ $e->[2] } = 1;
        }
    }
    return undef unless keys %new == 1;
    my ($port) = keys %new;
    return undef unless $k->{replicas}{$port};
    my $np = keys %{ { map { $_->[2] => 1 } @$map } };
    # The old primary's replicas are gone with their primary's slots moved.
    return undef if defined eval { $self->_not_ready($np, 0) };
    return $self->node_by_port($port);
}

# Poll failover_done for $deadline seconds (default 20).
sub wait_failover {
    my ($self, $old, $deadline) = @_;
    return ChatTest::wait_until(sub { $self->failover_done($old) }, $deadline // 20, 0.05);
}

# Move $slot from primary $from to primary $to the way redis-cli does:
# SETSLOT IMPORTING on $to, SETSLOT MIGRATING on $from, MIGRATE ... KEYS of
# $o{batch} (default 1) keys at a time until the slot is empty on $from,
# then SETSLOT NODE on $to, on $from and on the other primaries. $o{step},
# when given, is called with a stage name after each of those commands
# ('importing', 'migrating', 'migrated <key>', 'node <port>'), so that a
# test can keep traffic going between them. Waits (10 s) until the cluster
# is ready with $to owning the slot; returns true then.
sub migrate_slot {
    my ($self, $slot, $from, $to, %o) = @_;
    my $step = $o{step} // sub {};
    my $batch = $o{batch} // 1;
    my ($from_id, $to_id) = ($self->node_id($from), $self->node_id($to));
    my @primaries = $self->primaries;
    my $np = @primaries;
    $to->cmd('CLUSTER', 'SETSLOT', $slot, 'IMPORTING', $from_id);
    $step->('importing');
    $from->cmd('CLUSTER', 'SETSLOT', $slot, 'MIGRATING', $to_id);
    $step->('migrating');
    my $rounds = 0;
    while (1) {
        my $keys = $from->cmd('CLUSTER', 'GETKEYSINSLOT', $slot, $batch);
        last unless @$keys;
        croak "ChatCluster: migrate_slot $slot: keys still there after $rounds rounds" if ++$rounds > 1000;
        my $r = $from->cmd('MIGRATE', '127.0.0.1', $to->port, '', 0, 5000, 'KEYS', @$keys);
        croak "ChatCluster: MIGRATE of @$keys: $r" unless $r eq 'OK' || $r eq 'NOKEY';
        $step->("migrated @$keys");
    }
    for my $n ($to, $from, grep { $_->port != $to->port && $_->port != $from->port } @primaries) {
        $n->cmd('CLUSTER', 'SETSLOT', $slot, 'NODE', $to_id);
        $step->('node ' . $n->port);
    }
    my $why;
    my $ok = ChatTest::wait_until(sub {
        return 0 if defined($why = $self->_not_ready($np, 0));
        my $owner = $self->node_for_slot($slot);
        $why = "slot $slot owned by " . ($owner ? $owner->port : 'nobody');
        return $owner && $owner->port == $to->port;
    }, 10, 0.05);
    croak "ChatCluster: migrate_slot $slot: not settled after 10 s: $why" unless $ok;
    return 1;
}

# PUBSUB SHARDNUMSUB $channel on $node, by default the primary owning the
# channel's slot: the number of subscribers there.
sub shardnumsub {
    my ($self, $channel, $node) = @_;
    $node //= $self->node_for_slot($self->slot_of($channel));
    my $r = $node->cmd('PUBSUB', 'SHARDNUMSUB', $channel);
    return $r->[1];
}

# Established connections from each of @pids to each live node:
# {pid => {node port => n}} (ChatFault::redis_conns_by_pid on every node).
sub conns_by_pid {
    my ($self, @pids) = @_;
    require ChatFault;
    my %c = map { $_ => {} } @pids;
    for my $n ($self->nodes) {
        my %by = ChatFault::redis_conns_by_pid($n->port, @pids);
        for my $pid (@pids) {
            $c{$pid}{ $n->port } = $by{$pid} if $by{$pid};
        }
    }
    return \%c;
}

# Read whatever arrives on @$clients (WSClient objects) for $secs seconds,
# or until $until->() is true (checked after each read, and at least every
# 50 ms); each event read gets _t, the time it was read. Returns the
# events read as [client index, event] pairs.
sub pump {
    my ($clients, $secs, $until) = @_;
    require IO::Select;
    my $deadline = time + $secs;
    my %by = map { (fileno($clients->[$_]->socket) => $_) }
             grep { $clients->[$_]->socket && !$clients->[$_]->eof } 0 .. $#$clients;
    my $sel = IO::Select->new(map { $clients->[$_]->socket } values %by);
    my @got;
    while (1) {
        # Frames already buffered by an earlier read come first.
        for my $i (values %by) {
            while ($clients->[$i]{buf} ne '' and my $ev = $clients->[$i]->recv_json(0)) {
                $ev->{_t} = time;
                push @got, [$i, $ev];
            }
        }
        return \@got if $until && $until->();
        my $left = $deadline - time;
        return \@got if $left <= 0;
        for my $s ($sel->can_read($left < 0.05 ? $left : 0.05)) {
            my $i = $by{ fileno $s };
            my $c = $clients->[$i];
            my $n = 0;
            while ($n++ < 1000 and my $ev = $c->recv_json(0.001)) {
                $ev->{_t} = time;
                push @got, [$i, $ev];
            }
            $sel->remove($s) if $c->eof;
        }
    }
}

# ---------------------------------------------------------------------------
# TLS (for t/redis_cluster_features.t)
#
#   my $cl = ChatCluster->start_tls(primaries => 3, cert => $pem, key => $key, ca => $ca_pem);
#   chat_config(redis => 'cluster=rediss://' . $cl->tls_seeds, ...);
#   $cl->tls_port($node);    # the TLS port of a node (ChatTest::Redis)
#
# Like start, and every node also has a TLS port (tls-cluster yes: the
# cluster bus is TLS too; tls-replication yes), while its plain port stays
# for the harness, whose ChatTest::Redis speaks plain RESP. Redis names
# nodes (CLUSTER SLOTS, MOVED) by their TLS ports to a client connected
# over TLS and by their plain ports to a plain one, so every method above
# works unchanged on the plain ports and a TLS client is only ever sent to
# TLS ports. Clients need no certificate (tls-auth-clients no).
sub start_tls {
    my ($class, %o) = @_;
    my $np = $o{primaries} // 3;
    my $nr = $o{replicas} // 0;
    my $timeout = $o{node_timeout} // 2000;
    my $coverage = $o{full_coverage} ? 'yes' : 'no';
    croak 'ChatCluster: redis-cli --cluster create needs at least 3 primaries' if $np < 3;
    croak 'ChatCluster: start_tls needs cert, key and ca' unless $o{cert} && $o{key} && $o{ca};
    my $self = bless { node_timeout => $timeout, nodes => [], dead => {}, tls_port => {} }, $class;
    my %taken;
    my $port = sub {
        my $p;
        do { $p = ChatTest::free_port() } while $taken{$p}++;
        return $p;
    };
    for (1 .. $np * (1 + $nr)) {
        my ($p, $bus, $tp) = ($port->(), $port->(), $port->());
        push @{ $self->{nodes} }, ChatTest::start_redis(port => $p, args => [
            '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
            '--cluster-node-timeout', $timeout, '--cluster-port', $bus,
            '--cluster-require-full-coverage', $coverage,
            '--repl-diskless-sync-delay', 0,
            '--tls-port', $tp, '--tls-cluster', 'yes', '--tls-replication', 'yes',
            '--tls-cert-file', $o{cert}, '--tls-key-file', $o{key},
            '--tls-ca-cert-file', $o{ca}, '--tls-auth-clients', 'no']);
        $self->{tls_port}{$p} = $tp;
    }
    my @addrs = map { '127.0.0.1:' . $_->port } @{ $self->{nodes} };
    my $t_create = time;
    my ($code, $out) = ChatTest::_run_cmd(30, 'redis-cli', '--cluster', 'create', @addrs,
        '--cluster-replicas', $nr, '--cluster-yes');
    croak "ChatCluster: redis-cli --cluster create (TLS bus) failed (exit $code):\n$out" if $code != 0;
    $self->{create_output} = $out;
    $self->{create_seconds} = time - $t_create;
    my $why;
    ChatTest::wait_until(sub { !defined($why = $self->_not_ready($np, $nr)) }, 30, 0.1)
        or croak "ChatCluster: not ready 30 s after creation: $why\n$out";
    $self->{want_replicas} = $nr;
    return $self;
}

# The TLS port of $node (a ChatTest::Redis of a start_tls cluster).
sub tls_port {
    my ($self, $node) = @_;
    return $self->{tls_port}{ $node->port } // croak 'ChatCluster: tls_port: not a start_tls node';
}

# "127.0.0.1:t1,127.0.0.1:t2,..." of the current primaries' TLS ports.
sub tls_seeds {
    my $self = shift;
    return join ',', map { '127.0.0.1:' . $self->tls_port($_) } $self->primaries;
}

1;
