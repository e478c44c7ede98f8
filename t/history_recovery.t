# Recovery after a Redis outage, with history: two nginx instances A and B
# (2 workers each, listen ... reuseport) on one Redis, members of one room on
# all four workers. B reaches Redis through a small TCP relay run by the
# test, so that B can be kept away from Redis for longer than A.
#
# Phase 1: Redis is stopped; members on every worker send messages (they
# wait in each worker's backlog); Redis comes back on the same port (empty:
# no persistence).
# Phase 2: the same, but B stays cut off (relay down) after Redis is back:
# A's workers publish their backlog and A's members chat on while B's
# workers cannot hear it; then B comes back and must fetch what it missed
# from the room's history.
#
# After each phase: every member receives every outage message exactly once,
# all members see the same message ids in the same (stream) order, each
# sender's messages keep their order, the messages sent before and after the
# outage arrive once each, no gap event (nothing was lost), one
# redis_unavailable error and one redis_available notice per member; the new
# stream holds each message sent since the restart once.
#
# Which worker holds a client follows from the kernel's reuseport hash; the
# test connects fresh clients (bounded in number and time) until each of the
# four workers holds at least two members, learning the worker of each from
# /proc (ChatFault::client_workers). Not spreading within the bound fails.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatIds;
use ChatFault;

my $ROOM = 'rec';
my $PER_WORKER = 2;      # members per worker that send during an outage
my $MAX_CLIENTS = 48;    # bound on the connections opened
my $MAX_SECONDS = 20;    # bound on the time spent connecting
my $OUTAGE_MSGS = 3;     # messages each of those sends during an outage

sub has_text {
    my ($c, $text) = @_;
    return grep { type_of($_) eq 'message' && $_->{text} eq $text } $c->events;
}

sub short { my $s = join ' ', map { $_ // 'undef' } @_; length $s > 400 ? substr($s, 0, 400) . '...' : $s }

# Wait until every client of @$clients has received a message with each
# text of @$texts; returns the clients still missing some.
sub wait_texts {
    my ($clients, $texts, $timeout) = @_;
    my $deadline = time + $timeout;
    my @missing;
    for my $c (@$clients) {
        for my $t (@$texts) {
            next if has_text($c, $t);
            my $left = $deadline - time;
            my $m = $left > 0
                ? $c->wait_for(sub { type_of($_[0]) eq 'message' && $_[0]{text} eq $t }, $left)
                : undef;
            if (!$m) { push @missing, $c; last }
        }
    }
    return @missing;
}

# Each client of @$clients waits for an event of $type with $code; returns
# the clients that got none within $timeout seconds (in all).
sub wait_code {
    my ($clients, $type, $code, $timeout) = @_;
    my $deadline = time + $timeout;
    my @missing;
    for my $c (@$clients) {
        my $left = $deadline - time;
        my $e = $left > 0
            ? $c->wait_for(sub { type_of($_[0]) eq $type && ($_[0]{code} // '') eq $code }, $left)
            : undef;
        push @missing, $c unless $e;
    }
    return @missing;
}

# ---------------------------------------------------------------- the relay
# A forked TCP relay 127.0.0.1:$listen -> 127.0.0.1:$to: when one side of a
# pair closes, the other is shut down for writing and read until its EOF (so
# that the kernel sends no RST for unread bytes). TERM closes every pair so,
# within 1 s, and ends the relay; it lives at most 60 s.
my ($RELAY_PID, $PARENT) = (undef, $$);

sub start_relay {
    my ($listen, $to) = @_;
    my $ls = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $listen, Listen => 16,
                                   ReuseAddr => 1, Proto => 'tcp')
        or die "relay: cannot listen on 127.0.0.1:$listen: $!";
    my $pid = fork;
    die "fork: $!" unless defined $pid;
    if ($pid) { close $ls; $RELAY_PID = $pid; return $pid }
    my $stop = 0;
    $SIG{TERM} = sub { $stop = 1 };
    my (%peer, %closing);
    my $sel = IO::Select->new($ls);
    my $wind_down = sub {    # shut $_[0] down for writing, read it until EOF
        my $s = shift;
        shutdown($s, 1);
        $closing{"$s"} = time + 1;
    };
    my $end = time + 60;
    my $stop_by;
    while (time < $end) {
        if ($stop && !$stop_by) {
            $stop_by = time + 1;
            $sel->remove($ls);
            close $ls;
            for my $s ($sel->handles) { delete $peer{"$s"}; $wind_down->($s) }
        }
        last if $stop_by && (time > $stop_by || !$sel->count);
        for my $s ($sel->handles) {    # gave up waiting for an EOF
            next unless $closing{"$s"} && time > $closing{"$s"};
            $sel->remove($s); delete $closing{"$s"}; close $s;
        }
        for my $s ($sel->can_read(0.2)) {
            if (!$stop_by && $s == $ls) {
                my $c = $ls->accept or next;
                my $u = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $to, Proto => 'tcp');
                $sel->add($c);
                if (!$u) { $wind_down->($c); next }
                $peer{"$c"} = $u;
                $peer{"$u"} = $c;
                $sel->add($u);
                next;
            }
            my $n = sysread($s, my $buf, 65536);
            if ($closing{"$s"}) {
                next if $n;
                $sel->remove($s); delete $closing{"$s"}; close $s;
                next;
            }
            my $o = $peer{"$s"} or next;
            if ($n) {
                my $off = 0;
                while ($off < $n) {
                    my $w = syswrite($o, $buf, $n - $off, $off);
                    last unless $w;
                    $off += $w;
                }
                next if $off == $n;
            }
            delete @peer{ "$s", "$o" };
            $sel->remove($s);
            close $s;
            $wind_down->($o);
        }
    }
    POSIX::_exit(0);
}

sub stop_relay {
    return unless $RELAY_PID;
    kill 'TERM', $RELAY_PID;
    wait_until(sub { waitpid($RELAY_PID, WNOHANG) != 0 }, 5) or do { kill 'KILL', $RELAY_PID; waitpid($RELAY_PID, 0) };
    undef $RELAY_PID;
}

END { if ($$ == $PARENT && $RELAY_PID) { kill 'KILL', $RELAY_PID; waitpid($RELAY_PID, 0) } }

# ---------------------------------------------------------------- setup
my $redis = start_redis();
my $rport = $redis->port;
my $pport = free_port();
start_relay($pport, $rport);

my @ng;
for my $i (0, 1) {
    my $name = qw(A B)[$i];
    my $via = $i ? $pport : $rport;
    my $lost = qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$via lost: connection closed; retrying in \d+ ms$/;
    push @ng, start_nginx_ok("nginx $name starts: 2 workers, listen ... reuseport, Redis on port $via",
        chat_config(workers => 2, listen => 'reuseport', http => 'websocket_chat_redis_timeout 1s;',
                    redis => "127.0.0.1:$via"),
        workers => 2, allow_errors => [$lost]);
}
my %wname;    # worker pid -> A1, A2, B1, B2
my @all_workers;
for my $i (0, 1) {
    my @w = sort { $a <=> $b } $ng[$i]->worker_pids;
    is(scalar(@w), 2, 'nginx ' . qw(A B)[$i] . ': two workers');
    $wname{ $w[$_] } = qw(A B)[$i] . ($_ + 1) for 0 .. $#w;
    push @all_workers, @w;
}

# --- spread members over the four workers
my (@c, %by_worker, %worker_of, %inst_of);
my $t0 = time;
my $n = 0;
while ($n < $MAX_CLIENTS && time - $t0 < $MAX_SECONDS) {
    my $i = $n % 2;
    my $nick = "m$n";
    $n++;
    my $cl = eval { WSClient->join(port => $ng[$i]->port, room => $ROOM, nick => $nick) };
    if (!$cl) { diag("client $nick: $@"); next }
    push @c, $cl;
    $inst_of{$cl} = $i;
    my ($pid) = client_workers($ng[$i], [$cl]);
    if (!defined $pid) { diag("client $nick: no worker found"); next }
    $worker_of{$cl} = $pid;
    push @{ $by_worker{$pid} }, $cl;
    last unless grep { @{ $by_worker{$_} // [] } < $PER_WORKER } @all_workers;
}
note(sprintf '%d clients in %.2fs; members per worker: %s', scalar(@c), time - $t0,
     join(', ', map { "$wname{$_} ($_): " . scalar @{ $by_worker{$_} // [] } } @all_workers));
my @short = grep { @{ $by_worker{$_} // [] } < $PER_WORKER } @all_workers;
ok(!@short, "each of the 4 workers holds at least $PER_WORKER members of room $ROOM "
          . "(within $MAX_CLIENTS connections and ${MAX_SECONDS}s)")
    or do {
        diag('workers short of members: ' . join ' ', map { $wname{$_} } @short);
        $_->send_close(1000) for @c;
        stop_relay();
        done_all();
        exit;
    };
is(scalar(grep { !defined $worker_of{$_} } @c), 0, 'every member is attributed to a worker');
ok(wait_until(sub { $redis->numsub($ROOM) == 4 }, 5), 'the room is subscribed by all 4 workers');

my @senders = map { my $w = $_; map { [$w, $_] } @{ $by_worker{$w} }[0 .. $PER_WORKER - 1] } @all_workers;
my @on_a = grep { $inst_of{$_} == 0 } @c;
my @on_b = grep { $inst_of{$_} == 1 } @c;

sub who { my $cl = shift; ($wname{ $worker_of{$cl} // '' } // '?') . ' ' . $cl->welcome->{user} }

# One message from the first member of each worker of @workers.
sub one_each {
    my ($tag, @workers) = @_;
    my @t;
    for my $w (@workers) {
        my $t = "$tag-$wname{$w}";
        $by_worker{$w}[0]->send_text($t);
        push @t, $t;
    }
    return @t;
}

# Everyone has read what was said before.
my @pre = one_each('pre', @all_workers);
is(scalar(wait_texts(\@c, \@pre, 10)), 0, 'before the outages: every member receives a message from each worker');

# What the senders of @$senders send while Redis is away: texts in order,
# and per sender.
sub outage_sends {
    my ($phase, $senders, $sent_by) = @_;
    my @texts;
    for my $s (@$senders) {
        my ($w, $cl) = @$s;
        for my $k (1 .. $OUTAGE_MSGS) {
            my $t = sprintf '%s-%s-%s-%d', $phase, $wname{$w}, $cl->welcome->{user}, $k;
            $cl->send_text($t) or next;
            push @texts, $t;
            push @{ $sent_by->{"$cl"} }, $t;
        }
    }
    # A pong after them: the worker has read them (into its backlog).
    my (@no_pong, @ev);
    for my $s (@$senders) {
        my ($pong, @e) = ping_pong($s->[1], 5);
        push @no_pong, who($s->[1]) unless $pong;
        push @ev, @e;
    }
    is(scalar(@texts), @$senders * $OUTAGE_MSGS, "$phase: " . scalar(@texts) . ' messages sent during the outage by '
       . scalar(@$senders) . ' members on 4 workers');
    is_deeply(\@no_pong, [], "$phase: the senders are still connected (ping answered)");
    is(scalar(@ev), 0, "$phase: no event reaches the senders while their worker has no Redis")
        or diag(join "\n", map { $_->{_raw} // $_->{raw} // type_of($_) } @ev);
    return @texts;
}

# The checks after an outage. $mark: number of events each client had when
# the outage began; @texts: every message text sent since then.
my %sent_by;
sub check_phase {
    my ($phase, $mark, $texts, $since_restart) = @_;
    my (@dup, @order, @per_sender, @ids_bad, @gaps, @notes, @diff);
    my (%id_of, @ref_seq, $ref_name);
    my %want = map { $_ => 1 } @pre, @$texts;
    for my $cl (@c) {
        my $who = who($cl);
        my @m = live_messages($cl);
        my %count;
        $count{ $_->{text} }++ for @m;
        my @not_once = grep { ($count{$_} // 0) != 1 } @pre, @$texts;
        push @dup, "$who: " . short(map { "$_ x" . ($count{$_} // 0) } @not_once) if @not_once;
        my @ids = map { $_->{id} } @m;
        if ((my $i = first_not_increasing(@ids)) >= 0) {
            push @order, "$who: at #$i: $ids[$i - 1] ($m[$i - 1]{text}) then $ids[$i] ($m[$i]{text})";
        }
        for my $sender (@c) {
            my $sent = $sent_by{"$sender"} or next;
            my %mine = map { $_ => 1 } @$sent;
            my @got = grep { $mine{$_} } map { $_->{text} } @m;
            push @per_sender, "$who, from " . who($sender) . ': ' . short(@got) unless "@got" eq "@$sent";
        }
        for my $x (@m) {
            push @ids_bad, "$who: $x->{text} has id " . ($x->{id} // 'undef') unless is_pos($x->{id});
            if (defined $id_of{ $x->{text} } && $id_of{ $x->{text} } ne ($x->{id} // '')) {
                push @diff, "$who: $x->{text} has id $x->{id}, elsewhere $id_of{ $x->{text} }";
            }
            $id_of{ $x->{text} } //= $x->{id};
        }
        my @seq = map { "$_->{id} $_->{text}" } @m;
        if (!$ref_name) { @ref_seq = @seq; $ref_name = $who }
        elsif ("@seq" ne "@ref_seq") {
            my $i = 0;
            $i++ while $i < @seq && $i < @ref_seq && $seq[$i] eq $ref_seq[$i];
            push @diff, "$who differs from $ref_name at #$i: " . ($seq[$i] // 'end') . ' vs ' . ($ref_seq[$i] // 'end');
        }
        my @ev = $cl->events;
        my @after = @ev[$mark->{"$cl"} .. $#ev];
        if (my @g = grep { type_of($_) eq 'gap' } @after) {
            my ($last) = reverse grep { type_of($_) eq 'message' } @ev[0 .. $mark->{"$cl"} - 1];
            push @gaps, "$who: " . scalar(@g) . ' gap event(s), since ' . short(map { $_->{since} } @g)
                . '; the last message it had before the outage: ' . ($last ? $last->{id} : 'none');
        }
        my $errs = grep { type_of($_) eq 'error' } @after;
        my $notices = grep { type_of($_) eq 'notice' } @after;
        push @notes, "$who: $errs error(s), $notices notice(s): "
            . short(map { $_->{_raw} } grep { type_of($_) =~ /^(?:error|notice)$/ } @after)
            unless $errs == 1 && $notices == 1;
    }
    is_deeply(\@dup, [], "$phase: every member receives each message (before, during, after the outage) exactly once")
        or diag(join "\n", @dup);
    is_deeply(\@order, [], "$phase: every member's message ids are strictly increasing (stream order)")
        or diag(join "\n", @order);
    is_deeply(\@diff, [], "$phase: all members see the same message ids in the same order")
        or diag(join "\n", @diff);
    is_deeply(\@per_sender, [], "$phase: each sender's messages arrive in the order sent, everywhere")
        or diag(join "\n", @per_sender);
    is_deeply(\@ids_bad, [], "$phase: every message id is a stream id <ms>-<seq>") or diag(join "\n", @ids_bad);
    # (gap is documented for a resuming client, before its history; here
    # nobody resumes and every message arrives)
    is_deeply(\@gaps, [], "$phase: no gap event: nothing was lost") or diag(join "\n", @gaps);
    is_deeply(\@notes, [], "$phase: each member got one redis_unavailable error and one redis_available notice")
        or diag(join "\n", @notes);
    # Redis came back empty: the stream holds what was sent since, once each.
    my %later = map { $_ => 1 } @$since_restart;
    my @want = map { $_->[0] } grep { $later{ $_->[1] } } map { [split / /, $_, 2] } @ref_seq;
    my $entries = $redis->cmd('XRANGE', "wschat:$ROOM", '-', '+');
    is_deeply([map { $_->[0] } @$entries], \@want,
              "$phase: the new stream holds each message sent since the restart once, under the id members saw")
        or diag('stream: ' . scalar(@$entries) . ' entries; sent since the restart: ' . scalar(@$since_restart));
    ok(wait_until(sub { $redis->numsub($ROOM) == 4 }, 5), "$phase: all 4 workers subscribed again");
}

sub marks { return { map { ("$_" => scalar(my @e = $_->events)) } @c } }

# ---------------------------------------------------------------- phase 1
{
    my $mark = marks();
    $redis->stop;
    my @m = wait_code(\@c, 'error', 'redis_unavailable', 10);
    is(scalar(@m), 0, 'phase 1: every member gets an error event redis_unavailable')
        or diag('missing on: ' . join ' ', map { who($_) } @m);
    my @outage = outage_sends('p1', \@senders, \%sent_by);
    my $t_back = time;
    $redis->restart;
    @m = wait_code(\@c, 'notice', 'redis_available', 15);
    is(scalar(@m), 0, 'phase 1: every member gets a notice redis_available')
        or diag('missing on: ' . join ' ', map { who($_) } @m);
    note(sprintf 'phase 1: all notices within %.2fs of the restart', time - $t_back);
    my @post = one_each('p1post', @all_workers);
    my @late = wait_texts(\@c, [@outage, @post], 15);
    is(scalar(@late), 0, 'phase 1: every member receives every outage message and every later message')
        or diag(join "\n", map { my $cl = $_; who($cl) . ' misses: ' . short(grep { !has_text($cl, $_) } @outage, @post) } @late);
    check_phase('phase 1', $mark, [@outage, @post], [@outage, @post]);
    push @pre, @outage, @post;    # said before phase 2
}

# ---------------------------------------------------------------- phase 2
{
    my $mark = marks();
    my @a_workers = grep { $wname{$_} =~ /^A/ } @all_workers;
    stop_relay();       # B is cut off first...
    $redis->stop;       # ...then Redis goes away for everyone
    my @m = wait_code(\@c, 'error', 'redis_unavailable', 10);
    is(scalar(@m), 0, 'phase 2: every member gets an error event redis_unavailable')
        or diag('missing on: ' . join ' ', map { who($_) } @m);
    my @outage = outage_sends('p2', \@senders, \%sent_by);
    my $t_back = time;
    $redis->restart;    # back for A only
    @m = wait_code(\@on_a, 'notice', 'redis_available', 15);
    is(scalar(@m), 0, "phase 2: A's members get a notice redis_available while B is still cut off")
        or diag('missing on: ' . join ' ', map { who($_) } @m);
    my @a_out = grep { /^p2-A/ } @outage;
    my @mid = one_each('p2mid', @a_workers);
    @m = wait_texts(\@on_a, [@a_out, @mid], 15);
    is(scalar(@m), 0, "phase 2: A's members receive A's outage messages and more, live, while B is cut off")
        or diag(join "\n", map { my $cl = $_; who($cl) . ' misses: ' . short(grep { !has_text($cl, $_) } @a_out, @mid) } @m);
    # B has heard none of it: it must come from the history.
    for my $cl (@on_b) { 1 while $cl->recv_json(0.01) }
    my @heard = map { my $cl = $_; map { who($cl) . ": $_->{text}" } grep { $_->{text} =~ /^p2/ } live_messages($cl) } @on_b;
    is_deeply(\@heard, [], "phase 2: B's members have heard nothing said since the outage (B is cut off)");
    is($redis->numsub($ROOM), 2, 'phase 2: only A\'s 2 workers are subscribed meanwhile');

    start_relay($pport, $rport);
    @m = wait_code(\@on_b, 'notice', 'redis_available', 15);
    is(scalar(@m), 0, "phase 2: B's members get a notice redis_available once B reaches Redis again")
        or diag('missing on: ' . join ' ', map { who($_) } @m);
    note(sprintf 'phase 2: B back %.2fs after the restart of Redis', time - $t_back);
    my @post = one_each('p2post', @all_workers);
    my @late = wait_texts(\@c, [@outage, @mid, @post], 15);
    is(scalar(@late), 0, 'phase 2: every member receives every outage message, the ones said while B was away, and every later message')
        or diag(join "\n", map { my $cl = $_; who($cl) . ' misses: ' . short(grep { !has_text($cl, $_) } @outage, @mid, @post) } @late);
    check_phase('phase 2', $mark, [@outage, @mid, @post], [@outage, @mid, @post]);
}

for my $i (0, 1) {
    my $via = $i ? $pport : $rport;
    my %lost;
    for (log_lines($ng[$i], qr/websocket_chat: subscriber connection to Redis 127\.0\.0\.1:$via lost/)) {
        $lost{$1}++ if /\[error\] (\d+)#/;
    }
    is(scalar(keys %lost), 2, 'nginx ' . qw(A B)[$i] . ': both workers logged the lost subscriber connection')
        or diag(join "\n", log_lines($ng[$i], qr/websocket_chat/));
}

$_->send_close(1000) for @c;
$_->is_closed_by_server(5) for @c;
stop_relay();
done_all();
