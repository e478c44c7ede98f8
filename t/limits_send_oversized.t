# A message whose event is larger than all that websocket_chat_send_buffer
# lets wait for a member (size + burst) still reaches every member that
# keeps up: the room's frame is one, shared by all, and refusing it would
# cut off every member at once. A member that does not read is still closed
# with 1008 "slow consumer".
#
# Setup: worker_processes 1, websocket_chat_send_buffer 4k burst=0 (the
# default websocket_chat_max_message is 64k). Members of one room: "p"
# publishes and reads, "r" reads, "slow" (SO_RCVBUF 4096) never reads after
# its welcome. p sends 1600 messages of 6000 bytes (9.6 MB, more than the
# kernel buffers of slow's connection hold), paced at 400 a second; one
# polling loop reads for p and r.
# * p and r receive all 1600, in order, and are not closed;
# * slow is closed with 1008 "slow consumer" (the readers see it leave).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

ChatTest::allow_errors_in_file(qr/: closing session of "slow" in "big": 1008 slow consumer, client: /);

my $N = 1600;
my $SIZE = 6000;
my $RATE = 400;
my $ROOM = 'big';

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with websocket_chat_send_buffer 4k burst=0',
    chat_config(workers => 1, location => 'websocket_chat_send_buffer 4k burst=0;'), redis => $redis);
my $port = $nginx->port;

my %c;
$c{$_} = WSClient->join(port => $port, room => $ROOM, nick => $_) for qw(p r);
my @readers = qw(p r);
my (%next, %first, %problem, %closed, %left);

sub text_for { my $h = sprintf 'm-%06d-', $_[0]; $h . ('x' x ($SIZE - length $h)) }

sub take {
    my ($who, @frames) = @_;
    for my $f (@frames) {
        my $op = $f->{opcode};
        if ($op == 8) { $closed{$who} //= $f->{close_code} // 'empty'; next }
        if ($op == 9) { $c{$who}->send_pong($f->{payload}); next }
        next unless $op == 1;
        my $head = substr($f->{payload}, 0, 200);
        $left{$who} = 1 if $head =~ /"type":"leave".*"user":"slow"/;
        next unless $head =~ /"type":"message"/;
        my ($seq) = $head =~ /"text":"m-(\d{6})-/;
        if (!defined $seq) {
            $problem{$who} //= 'unexpected message: ' . substr($head, 0, 120);
            next;
        }
        $first{$who} //= 0 + $seq;
        my $exp = $next{$who} // $seq;
        $problem{$who} //= "got #$seq, expected #$exp" if $seq != $exp;
        $problem{$who} //= "#$seq: payload of " . length($f->{payload}) . ' bytes'
            if length($f->{payload}) < $SIZE;
        $next{$who} = $seq + 1;
    }
}

sub pump {
    my $wait = shift;
    my @live = grep { !$c{$_}->eof } @readers;
    my %by_sock = map { (fileno($c{$_}->socket) => $_) } @live;
    for my $s (IO::Select->new(map { $c{$_}->socket } @live)->can_read($wait > 0 ? $wait : 0)) {
        my $who = $by_sock{ fileno $s };
        take($who, $c{$who}->pending_frames(0));
    }
}

my $slow = WSClient->join(port => $port, room => $ROOM, nick => 'slow', rcvbuf => 4096);

my $t0 = time;
my $sent = 0;
my $deadline = $t0 + 30;
while (time < $deadline) {
    my $due = int((time - $t0) * $RATE) + 1;
    while ($sent < $N && $sent < $due) {
        $c{p}->send_text(text_for($sent)) or do { $problem{p} //= "send of #$sent failed"; $sent = $N; last };
        $sent++;
    }
    last if $sent >= $N && !grep { ($next{$_} // 0) < $N } @readers;
    last if grep { $c{$_}->eof } @readers;
    pump($sent >= $N ? 0.05 : $t0 + $due / $RATE - time);
}
note(sprintf 'sent %d messages of %d bytes in %.1fs', $sent, $SIZE, time - $t0);

for my $who (qw(p r)) {
    is($next{$who} // 0, $N, "$who received every message, to the last");
    is($first{$who}, 0, "$who received the first one");
}
for my $who (@readers) {
    ok(!$problem{$who}, "$who: every message whole and in order") or diag("$who: $problem{$who}");
    ok(!$closed{$who} && !$c{$who}->eof, "$who is still open") or diag("$who closed: " . ($closed{$who} // 'eof'));
}

my $close = $slow->recv_close(10);
is($close && $close->{close_code}, 1008, 'slow is closed with 1008');
like($close && $close->{close_reason}, qr/slow consumer/, '... "slow consumer"');
ok(wait_until(sub { pump(0.05); !grep { !$left{$_} } qw(p r) }, 10, 0), 'p and r see slow leave');

$_->disconnect for values %c;
done_all();
