# websocket_chat_send_buffer: a member that never reads is closed with 1008
# "slow consumer" once more than send_buffer bytes are queued for it, while
# the other members of the room receive every message, in order; the
# worker's memory does not grow with what the slow member failed to read.
#
# Setup: worker_processes 1, send_buffer 256k. Members: "reader" (only
# reads), "p1" and "p2" (publish and read), "slow" (small SO_RCVBUF, never
# reads after its welcome). p1 and p2 each publish 1000 messages of 10 KB
# (20 MB in all), paced at 100 messages/s each. One polling loop sends on
# schedule and reads whatever has arrived for the three reading members.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

# Cutting a slow consumer off is an error-level line.
ChatTest::allow_errors_in_file(qr/: closing session of "slow" in "slow": 1008 slow consumer, client: /);

my $SEND_BUFFER = 256 * 1024;
my $N           = 1000;         # messages per publisher
my $SIZE        = 10 * 1024;    # text bytes per message
my $RATE        = 100;          # messages per second per publisher
my $ROOM        = 'slow';

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with websocket_chat_send_buffer 256k',
    chat_config(workers => 1, http => 'websocket_chat_send_buffer 256k;'), redis => $redis);
my $port = $nginx->port;
my ($worker) = $nginx->worker_pids;
ok($worker, "worker pid $worker");

my %c;
$c{$_} = WSClient->join(port => $port, room => $ROOM, nick => $_) for qw(reader p1 p2);
my @readers = qw(reader p1 p2);

# Per reader: next expected sequence number per publisher, counts, problems.
my (%next, %count, %problem, %join_seen, %leave_seen, %closed);

sub text_for { my ($pub, $i) = @_; my $h = sprintf '%s-%06d-', $pub, $i; $h . ('x' x ($SIZE - length $h)) }

# Handle the frames that arrived for reader $who.
sub take {
    my ($who, @frames) = @_;
    for my $f (@frames) {
        my $op = $f->{opcode};
        if ($op == 8) { $closed{$who} //= $f->{close_code} // 'empty'; next }
        if ($op == 9) { $c{$who}->send_pong($f->{payload}); next }
        next unless $op == 1;
        my $head = substr($f->{payload}, 0, 200);
        next unless $head =~ /"type":"(\w+)"/;
        my $type = $1;
        if ($type eq 'join') {
            $join_seen{$who} = 1 if $head =~ /"user":"slow"/;
            next;
        }
        if ($type eq 'leave') {
            $leave_seen{$who} = time if $head =~ /"user":"slow"/;
            next;
        }
        next unless $type eq 'message';
        my ($pub, $seq) = $head =~ /"text":"(p[12]|w[12])-(\d{6})-/;
        if (!defined $pub) {
            $problem{$who} //= 'unexpected message: ' . substr($head, 0, 120);
            next;
        }
        my $exp = $next{$who}{$pub} // 0;
        if ($seq != $exp) {
            $problem{$who} //= "$pub: got #$seq, expected #$exp";
        }
        if (length($f->{payload}) < $SIZE) {
            $problem{$who} //= "$pub #$seq: payload of " . length($f->{payload}) . ' bytes';
        }
        $next{$who}{$pub} = $seq + 1;
        $count{$who}{ substr($pub, 0, 1) }++;
    }
}

# Read what is there for all readers, waiting at most $wait seconds.
sub pump {
    my $wait = shift;
    my $sel = IO::Select->new(map { $c{$_}->socket } grep { !$c{$_}->eof } @readers);
    my %by_sock = map { (fileno($c{$_}->socket) => $_) } @readers;
    for my $s ($sel->can_read($wait > 0 ? $wait : 0)) {
        my $who = $by_sock{ fileno $s };
        take($who, $c{$who}->pending_frames(0));
    }
}

sub all_got {
    my ($kind, $n) = @_;
    return !grep { ($count{$_}{$kind} // 0) < $n } @readers;
}

# --- warm-up without the slow member: 10 messages of 10 KB per publisher
for my $i (0 .. 9) {
    $c{p1}->send_text(text_for('w1', $i));
    $c{p2}->send_text(text_for('w2', $i));
}
wait_until(sub { pump(0.05); all_got('w', 20) }, 10, 0);
ok(all_got('w', 20), 'warm-up: every reader got the 20 warm-up messages')
    or diag(join ', ', map { "$_: " . ($count{$_}{w} // 0) } @readers);

# --- the slow member joins, then never reads again
# (join croaks when there is no welcome)
my $slow = WSClient->join(port => $port, room => $ROOM, nick => 'slow', rcvbuf => 4096);
my $rb = unpack 'i', getsockopt($slow->socket, Socket::SOL_SOCKET(), Socket::SO_RCVBUF());
note("slow member's effective SO_RCVBUF: $rb");
ok(wait_until(sub { pump(0.05); keys(%join_seen) == @readers }, 5, 0),
   'every reader saw the slow member join');

my $rss_before = proc_rss_kb($worker);
note("worker RSS before: $rss_before kB");

# --- publish 2 x $N messages of $SIZE bytes, paced, while reading
my $t0 = time;
my %sent = (p1 => 0, p2 => 0);
my $deadline = $t0 + 40;
while (time < $deadline) {
    my $due = int((time - $t0) * $RATE) + 1;
    for my $p (qw(p1 p2)) {
        while ($sent{$p} < $N && $sent{$p} < $due) {
            $c{$p}->send_text(text_for($p, $sent{$p}))
                or do { $problem{$p} //= "send of #$sent{$p} failed"; $sent{$p} = $N; last };
            $sent{$p}++;
        }
    }
    my $all_sent = $sent{p1} >= $N && $sent{p2} >= $N;
    last if $all_sent && all_got('p', 2 * $N);
    last if grep { $c{$_}->eof } @readers;
    my $wait = $all_sent ? 0.05 : ($t0 + ($due) / $RATE) - time;
    pump($wait);
}
my $elapsed = time - $t0;
note(sprintf 'published %d + %d messages of %d bytes in %.1fs', $sent{p1}, $sent{p2}, $SIZE, $elapsed);
note('readers that saw the slow member leave before it drained: '
     . (join(', ', sort keys %leave_seen) || 'none'));

my $rss_after = proc_rss_kb($worker);
my $limit = 2 * $SEND_BUFFER / 1024 + 4096;
note("worker RSS after: $rss_after kB (growth " . ($rss_after - $rss_before) . " kB, limit $limit kB)");
diag("worker RSS before $rss_before kB, after $rss_after kB, growth "
     . ($rss_after - $rss_before) . " kB (limit < $limit kB)");

is($sent{$_}, $N, "$_ published $N messages") for qw(p1 p2);
for my $who (@readers) {
    is($count{$who}{p} // 0, 2 * $N, "$who received all " . 2 * $N . ' messages');
    ok(!$problem{$who}, "$who: messages complete and in order per publisher")
        or diag($problem{$who});
    ok(!$closed{$who} && !$c{$who}->eof, "$who was not closed")
        or diag("close code: " . ($closed{$who} // 'none'));
}
ok($rss_after - $rss_before < $limit,
   "worker RSS grew by less than 2 x send_buffer + 4 MB ($limit kB)");

# --- the slow member: drain its socket; the close frame comes after the data
# that had been queued before it.
my ($close, $msgs, $bytes, $after_close) = (undef, 0, 0, 0);
my $drain_deadline = time + 20;
while (time < $drain_deadline) {
    for my $f ($slow->pending_frames(0.2)) {
        $bytes += length $f->{payload};
        $after_close++ if $close;
        if ($f->{opcode} == 8) { $close //= $f }
        elsif ($f->{opcode} == 1 && substr($f->{payload}, 0, 30) =~ /"type":"message"/) { $msgs++ }
    }
    last if $slow->eof;
}
note("slow member drained: $msgs message events, $bytes payload bytes before EOF");
ok($close, 'slow member received a close frame after its queued data')
    or diag('no close frame; ' . length($slow->{buf}) . ' bytes of an incomplete frame left at EOF'
            . (length $slow->{buf} ? ' (starts ' . unpack('H*', substr($slow->{buf}, 0, 12)) . ')' : '')
            . ($slow->{read_error} ? "; read error: $slow->{read_error}" : '')
            . "\nerror log lines about the slow member's connection:\n"
            . join("\n", grep { /slow|1008|consumer|send.?buffer/i } split /\n/, $nginx->error_log_text));
is($close && $close->{close_code}, 1008, 'slow member closed with 1008');
is($close && $close->{close_reason}, 'slow consumer', 'close reason "slow consumer"');
ok($slow->eof, 'server closed the slow member\'s TCP connection');
is($after_close, 0, 'nothing after the close frame');
ok($msgs < 2 * $N, "slow member did not get everything ($msgs of " . 2 * $N . ' messages)');
note('worker RSS after draining: ' . (proc_rss_kb($worker) // '?') . ' kB');

# the other members learn that the slow member has gone
wait_until(sub { pump(0.05); keys(%leave_seen) == @readers }, 5, 0);
ok($leave_seen{$_}, "$_ saw a leave event for the slow member") for @readers;
ok(!$closed{$_} && !$c{$_}->eof && !$problem{$_}, "$_ still fine") for @readers;

$c{$_}->send_close(1000) for @readers;
ok($c{$_}->is_closed_by_server(5), "$_ closed") for @readers;
done_all();
