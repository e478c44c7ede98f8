# websocket_chat_send_buffer counts only bytes that really wait for a client
# that is not taking them: members that read promptly are never closed as
# slow consumers, not even when the worker hands them a burst larger than the
# limit in one turn (Redis delivering many events in one read), and a member
# that stops reading is still closed with 1008 "slow consumer".
#
# Setup: worker_processes 2 with listen ... reuseport (members spread over
# both workers as the kernel decides), default websocket_chat_send_buffer
# (256k). Members in one room: r1 and r2 read as fast as they can; p1 and p2
# publish and read everything they receive; "small" has SO_RCVBUF 4096 and
# reads steadily. One polling loop sends on schedule and reads for all.
#   (a)+(b) p1 and p2 send 16 KB messages, paced at 2 MB/s in all (120 msg/s)
#       for 600 messages, then at 10 MB/s (610 msg/s) for 1200: every member,
#       small included, receives all 1800, in order per publisher, nobody is
#       closed.
#   (d) "slow" (SO_RCVBUF 4096) joins and never reads after its welcome while
#       p1 and p2 go on at 2 MB/s: it is closed with 1008 "slow consumer"
#       within 15 s (the others see it leave), its close frame follows its
#       queued data, and the others receive everything and stay open.
#   (c) the test PUBLISHes 48 message events of 16 KB (768 KB, three times
#       the limit) to wschat:<room> in ONE pipelined write on its own Redis
#       connection: every prompt member receives all 48 and is not closed;
#       then three more such bursts, one after the other, while reading (a
#       member closed by a burst is replaced by a fresh connection before the
#       next one, so that each burst is judged on its own).
#   The workers' VmRSS grows by well under 64 MB over the test.
# (d) runs before (c) so that it is checked with the members of (a) whatever
# the bursts do to them.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Socket ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

# Cutting a slow consumer off is an error-level line.
ChatTest::allow_errors_in_file(qr/: closing session of "slow" in "sburst": 1008 slow consumer, client: /);

my $SIZE = 16 * 1024;
my $ROOM = 'sburst';
my @PHASES = ([300, 60], [600, 305]);    # per publisher: messages, messages/s
my $N_PUB = 0;
$N_PUB += $_->[0] for @PHASES;           # 900 per publisher
my $BURST = 48;

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts: 2 workers, reuseport, default send_buffer',
    chat_config(workers => 2, listen => 'reuseport'), redis => $redis, workers => 2);
my $port = $nginx->port;
my @workers = $nginx->worker_pids;
is(scalar @workers, 2, 'two workers');

my %c;
my @members = qw(r1 r2 p1 p2 small);
for my $who (@members) {
    $c{$who} = WSClient->join(port => $port, room => $ROOM, nick => $who,
                              ($who eq 'small' ? (rcvbuf => 4096) : ()));
}
my $rb = unpack 'i', getsockopt($c{small}->socket, Socket::SOL_SOCKET(), Socket::SO_RCVBUF());
note("small member's effective SO_RCVBUF: $rb");
my $subs = $redis->numsub($ROOM);
note("wschat:$ROOM has $subs subscriber(s): the members are on "
     . ($subs == 2 ? 'both workers' : 'one worker'));

my %rss0 = map { ($_ => proc_rss_kb($_)) } @workers;

# Per member: next sequence number and count per source, first problem,
# close code, times of the slow member's join and leave events.
my (%next, %count, %problem, %closed, %join_seen, %leave_seen);

sub text_for {
    my ($src, $i) = @_;
    my $h = sprintf '%s-%06d-', $src, $i;
    return $h . ('x' x ($SIZE - length $h));
}

sub take {
    my ($who, @frames) = @_;
    for my $f (@frames) {
        my $op = $f->{opcode};
        if ($op == 8) { $closed{$who} //= ($f->{close_code} // 'empty') . ' ' . ($f->{close_reason} // ''); next }
        if ($op == 9) { $c{$who}->send_pong($f->{payload}); next }
        next unless $op == 1;
        my $head = substr($f->{payload}, 0, 200);
        next unless $head =~ /"type":"(\w+)"/;
        my $type = $1;
        if ($type eq 'join' || $type eq 'leave') {
            if ($head =~ /"user":"slow"/) {
                ($type eq 'join' ? \%join_seen : \%leave_seen)->{$who} //= time;
            }
            next;
        }
        # The (empty) history a member gets on joining is not live traffic.
        next if $type eq 'history';
        if ($type ne 'message') {
            $problem{$who} //= 'unexpected event: ' . substr($head, 0, 120);
            next;
        }
        my ($src, $seq) = $head =~ /"text":"(p[12]|b\d+)-(\d{6})-/;
        if (!defined $src) {
            $problem{$who} //= 'unexpected message: ' . substr($head, 0, 120);
            next;
        }
        my $exp = $next{$who}{$src} // 0;
        $problem{$who} //= "$src: got #$seq, expected #$exp" if $seq != $exp;
        $problem{$who} //= "$src #$seq: text of " . length($f->{payload}) . ' bytes'
            if length($f->{payload}) < $SIZE;
        $next{$who}{$src} = $seq + 1;
        $count{$who}{$src}++;
    }
}

my @readers = @members;    # every member that is read (all but "slow")

# Read whatever is there for every reader, waiting at most $wait seconds for
# the first socket to become readable.
sub pump {
    my $wait = shift;
    my @open = grep { !$c{$_}->eof } @readers;
    return unless @open;
    my %by_fd = map { (fileno($c{$_}->socket) => $_) } @open;
    my $sel = IO::Select->new(map { $c{$_}->socket } @open);
    for my $s ($sel->can_read($wait > 0 ? $wait : 0)) {
        my $who = $by_fd{ fileno $s };
        my $cl = $c{$who};
        # read on while it yields bytes (bounded), so that the small-buffer
        # member is emptied as fast as the server fills it
        for (1 .. 64) {
            my $before = length $cl->{buf};
            my @f = $cl->pending_frames(0);
            take($who, @f);
            last if $cl->eof || (!@f && length $cl->{buf} == $before);
        }
    }
}

sub got_all {
    my ($src, $n, @who) = @_;
    return !grep { ($count{$_}{$src} // 0) < $n } @who;
}

sub counts {
    my @src = @_;
    return join '; ', map { my $w = $_; "$w: " . join(' ', map { "$_=" . ($count{$w}{$_} // 0) } @src)
                            . ($closed{$w} ? " (closed $closed{$w})" : '')
                            . ($c{$w}->eof ? ' (EOF)' : '') } @readers;
}

sub healthy {
    my $who = shift;
    return !$closed{$who} && !$c{$who}->eof;
}

# --- (a) + (b): paced publishing, 2 MB/s then 10 MB/s
my %sent = (p1 => 0, p2 => 0);
sub due_at {
    my $t = shift;
    my ($due, $start) = (0, 0);
    for my $ph (@PHASES) {
        my ($n, $rate) = @$ph;
        my $len = $n / $rate;
        if ($t < $start + $len) { return $due + int(($t - $start) * $rate) + 1 }
        $due += $n;
        $start += $len;
    }
    return $due;
}

my $t0 = time;
my $max_lag = 0;
while (time < $t0 + 25) {
    my $due = due_at(time - $t0);
    $due = $N_PUB if $due > $N_PUB;
    for my $p (qw(p1 p2)) {
        while ($sent{$p} < $due) {
            $c{$p}->send_text(text_for($p, $sent{$p}))
                or do { $problem{$p} //= "send of #$sent{$p} failed"; $sent{$p} = $N_PUB; last };
            $sent{$p}++;
        }
    }
    my $lag = $sent{p1} - ($count{small}{p1} // 0);
    $max_lag = $lag if $lag > $max_lag;
    my $all_sent = $sent{p1} >= $N_PUB && $sent{p2} >= $N_PUB;
    last if $all_sent && got_all('p1', $N_PUB, @readers) && got_all('p2', $N_PUB, @readers);
    last if grep { !healthy($_) } @readers;
    pump($all_sent ? 0.05 : 0.002);
}
note(sprintf 'paced phase: %d + %d messages of %d bytes in %.1fs; small member lagged by up to %d messages of p1',
     $sent{p1}, $sent{p2}, $SIZE, time - $t0, $max_lag);
is($sent{$_}, $N_PUB, "(a) $_ published $N_PUB messages") for qw(p1 p2);
for my $who (@readers) {
    my $tag = $who eq 'small' ? '(b)' : '(a)';
    ok(got_all('p1', $N_PUB, $who) && got_all('p2', $N_PUB, $who),
       "$tag $who received all " . 2 * $N_PUB . ' paced messages')
        or diag(counts('p1', 'p2'));
    ok(!$problem{$who}, "$tag $who: complete and in order per publisher") or diag($problem{$who});
    ok(healthy($who), "$tag $who was not closed") or diag("$who: " . ($closed{$who} // 'EOF'));
}

# --- (d): a member that stops reading is still closed with 1008
my $slow = WSClient->join(port => $port, room => $ROOM, nick => 'slow', rcvbuf => 4096);
ok(wait_until(sub { pump(0.02); keys(%join_seen) == @readers }, 5, 0),
   '(d) every member saw the slow member join');
my %sent_d = (p1 => 0, p2 => 0);
my $td = time;
my $slow_deadline = $td + 15;
while (time < $slow_deadline) {
    my $due = int((time - $td) * 60) + 1;    # 2 MB/s in all
    for my $p (qw(p1 p2)) {
        while ($sent_d{$p} < $due) {
            $c{$p}->send_text(text_for($p, $N_PUB + $sent_d{$p})) or last;
            $sent_d{$p}++;
        }
    }
    last if keys(%leave_seen) == @readers;
    last if grep { !healthy($_) } @readers;
    pump(0.005);
}
my $t_leave = (sort { $a <=> $b } values %leave_seen)[0];
note(sprintf '(d) slow member: leave seen %s; %d + %d messages published meanwhile',
     defined $t_leave ? sprintf('%.2fs after it joined', $t_leave - $td) : 'never',
     $sent_d{p1}, $sent_d{p2});
ok(defined $t_leave && $t_leave - $td < 15, '(d) the member that stopped reading is dropped within 15s');
# the readers get everything published meanwhile
ok(wait_until(sub { pump(0.02);
                    got_all('p1', $N_PUB + $sent_d{p1}, @readers)
                    && got_all('p2', $N_PUB + $sent_d{p2}, @readers) }, 10, 0),
   '(d) the other members receive every message published meanwhile')
    or diag(counts('p1', 'p2'));
ok(wait_until(sub { pump(0.02); keys(%leave_seen) == @readers }, 5, 0),
   '(d) every member saw the slow member leave');
for my $who (@readers) {
    ok(healthy($who) && !$problem{$who}, "(d) $who still open, nothing missing")
        or diag("$who: " . ($closed{$who} // ($c{$who}->eof ? 'EOF' : '')) . ' ' . ($problem{$who} // ''));
}
# its socket: whatever was queued, then the close frame, then EOF
{
    my ($close, $after, $msgs) = (undef, 0, 0);
    my $deadline = time + 20;
    while (time < $deadline && !$slow->eof) {
        for my $f ($slow->pending_frames(0.2)) {
            $after++ if $close;
            if ($f->{opcode} == 8) { $close //= $f }
            elsif ($f->{opcode} == 1) { $msgs++ }
        }
    }
    note("(d) slow member drained: $msgs data frames, then " . ($close ? 'a close frame' : 'no close frame'));
    is($close && $close->{close_code}, 1008, '(d) slow member closed with 1008');
    is($close && $close->{close_reason}, 'slow consumer', '(d) reason "slow consumer"');
    is($after, 0, '(d) nothing after the close frame');
    ok($slow->eof, '(d) server closed the slow member\'s TCP connection');
}

# --- (c): bursts published straight to Redis in one pipelined write
my $rconn = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $redis->port,
                                  Proto => 'tcp', Timeout => 5)
    or BAIL_OUT("cannot connect to redis: $!");
$rconn->blocking(0);

my $eid = 0;
sub burst_request {
    my $tag = shift;
    my $req = '';
    my $chan = "wschat:$ROOM";
    for my $i (0 .. $BURST - 1) {
        my $ev = qq({"type":"message","room":"$ROOM","user":"redis","text":")
               . text_for($tag, $i) . qq(","ts":) . now_ms() . qq(,"id":"t-) . ++$eid . qq("});
        $req .= "*3\r\n\$7\r\nPUBLISH\r\n\$" . length($chan) . "\r\n$chan\r\n\$"
              . length($ev) . "\r\n$ev\r\n";
    }
    return $req;
}

# A member closed by an earlier burst is replaced by a fresh connection
# under the same name, so that every burst is checked on its own.
my $rejoined = 0;
sub replace_closed {
    for my $who (grep { !healthy($_) } @readers) {
        my $old = $c{$who};
        $c{$who} = WSClient->join(port => $port, room => $ROOM, nick => $who,
                                  ($who eq 'small' ? (rcvbuf => 4096) : ()));
        $old->disconnect;
        delete $_->{$who} for \%next, \%count, \%problem, \%closed;
        $rejoined++;
    }
    # (join returns after the welcome: from then on the new connection
    # receives everything published in the room)
}

sub run_burst {
    my $tag = shift;
    replace_closed();
    my $req = burst_request($tag);
    my $replies = '';
    my $subs_now = $redis->numsub($ROOM);
    my $tb = time;
    my $ok = wait_until(sub {
        while (length $req) {
            my $n = syswrite($rconn, $req);
            last unless $n;
            substr($req, 0, $n, '');
        }
        while (1) { my $n = sysread($rconn, $replies, 65536, length $replies); last unless $n }
        pump(0.002);
        return !length($req) && got_all($tag, $BURST, grep { healthy($_) } @readers)
            && ($replies =~ tr/\n//) >= $BURST;
    }, 10, 0);
    my @n = $replies =~ /^:(\d+)\r$/mg;
    note(sprintf '%s: %d events of %d bytes in one pipelined write; %.3fs; PUBLISH replies: %s',
         $tag, $BURST, $SIZE, time - $tb, join(',', sort { $a <=> $b } keys %{{ map { $_ => 1 } @n }}));
    is(scalar(grep { $_ == $subs_now } @n), $BURST, "$tag: every PUBLISH reached the $subs_now subscribing worker(s)");
    for my $who (@readers) {
        my $label = $who eq 'small' ? "$tag: small (SO_RCVBUF 4096)" : "$tag: $who";
        ok(healthy($who), "$label was not closed")
            or diag("$who: " . ($closed{$who} // 'EOF') . '; ' . counts($tag));
        is($count{$who}{$tag} // 0, $BURST, "$label received all $BURST burst events");
    }
}

run_burst('b1');
run_burst("b$_") for 2 .. 4;
is($rejoined, 0, '(c) no member had to be replaced between bursts');
for my $who (@readers) {
    ok(!$problem{$who}, "(c) $who: burst events complete and in order") or diag($problem{$who});
}

# --- memory
my $growth = 0;
for my $w (@workers) {
    my $r = proc_rss_kb($w);
    next unless defined $r && defined $rss0{$w};
    note("worker $w VmRSS $rss0{$w} kB -> $r kB");
    $growth += $r - $rss0{$w};
}
ok($growth < 64 * 1024, "workers' VmRSS grew by $growth kB in all (< 64 MB)");

for my $who (grep { healthy($_) } @readers) {
    $c{$who}->send_close(1000);
}
ok(wait_until(sub { !grep { !$c{$_}->is_closed_by_server(0.05) } @readers }, 10), 'members closed');
done_all();
