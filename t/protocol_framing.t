# RFC 6455 fragmentation and control frames: a fragmented text message (any
# number of fragments, 1-byte fragments, a 4-byte UTF-8 character split over
# fragments) is relayed to the other members as one message; a ping between
# fragments is answered at once with the same payload; an unsolicited pong is
# ignored; ping payloads of 0 and 125 bytes are echoed exactly.
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

binmode Test::More->builder->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

my $sender = WSClient->join(port => $port, room => 'frag', nick => 'sender');
my $recv   = WSClient->join(port => $port, room => 'frag', nick => 'recv');
ok($sender->wait_type('join', 5, sub { $_[0]{user} eq 'recv' }), 'sender sees recv join');

# Send $frames (list of [opcode, bytes, fin]) as separate frames, then check
# that recv gets exactly one message event from sender with text $want and
# that the next message from sender is the marker (no partial extra events).
my $marker_no = 0;
sub relayed_as_one {
    my ($name, $frames, $want) = @_;
    for my $f (@$frames) {
        $sender->send_frame(opcode => $f->[0], payload => $f->[1], fin => $f->[2]);
    }
    my $m = $recv->wait_type('message', 5, sub { $_[0]{user} eq 'sender' });
    ok($m, "$name: another member receives a message") or return;
    is($m->{text}, $want, "$name: relayed as one message with the whole text");
    my $marker = 'marker-' . ++$marker_no;
    $sender->send_text($marker);
    my $next = $recv->wait_type('message', 5, sub { $_[0]{user} eq 'sender' });
    is($next && $next->{text}, $marker, "$name: no further message events for the fragments");
}

relayed_as_one('3 fragments',
               [[1, 'Hello', 0], [0, ', frag', 0], [0, 'mented world', 1]],
               'Hello, fragmented world');

my $twenty = 'abcdefghijklmnopqrst';
relayed_as_one('20-byte message in 1-byte fragments',
               [[1, substr($twenty, 0, 1), 0],
                (map { [0, substr($twenty, $_, 1), 0] } 1 .. 18),
                [0, substr($twenty, 19, 1), 1]],
               $twenty);

# U+1F600 is F0 9F 98 80 in UTF-8; split it 2 + 1 + 1 over three fragments.
relayed_as_one('4-byte UTF-8 character split across fragments',
               [[1, "x\xF0\x9F", 0], [0, "\x98", 0], [0, "\x80y", 1]],
               "x\x{1F600}y");
relayed_as_one('each byte of a 4-byte character in its own fragment',
               [[1, "\xF0", 0], [0, "\x9F", 0], [0, "\x98", 0], [0, "\x80", 1]],
               "\x{1F600}");

# --- a ping between fragments is answered at once; the message still arrives
{
    my $p = WSClient->join(port => $port, room => 'frag', nick => 'pinger');
    $p->send_frame(opcode => 1, payload => 'first half, ', fin => 0);
    $p->send_ping('between');
    my ($pong, @other);
    my $deadline = time + 2;
    while (my $f = $p->recv_frame($deadline - time)) {
        if ($f->{opcode} == 10) { $pong = $f; last }
        push @other, $f;
    }
    ok($pong, 'ping between fragments answered with a pong before the message is finished')
        or diag($p->got_close ? "got close " . ($p->close_code // 'none') : 'no pong within 2s');
    is($pong && $pong->{payload}, 'between', 'pong carries the ping payload');
    ok(!grep({ $_->{opcode} == 8 } @other), 'no close frame after the interleaved ping');
    $p->send_frame(opcode => 0, payload => 'second half', fin => 1);
    my $m = $recv->wait_type('message', 5, sub { $_[0]{user} eq 'pinger' });
    is($m && $m->{text}, 'first half, second half',
       'message with an interleaved ping is relayed whole');

    # two pings inside one message, one of them empty
    $p->send_frame(opcode => 1, payload => 'a', fin => 0);
    $p->send_ping('');
    $p->send_frame(opcode => 0, payload => 'b', fin => 0);
    $p->send_ping('p2');
    $p->send_frame(opcode => 0, payload => 'c', fin => 1);
    my @pongs;
    $deadline = time + 3;
    while (@pongs < 2 and my $f = $p->recv_frame($deadline - time)) {
        push @pongs, $f->{payload} if $f->{opcode} == 10;
    }
    is_deeply(\@pongs, ['', 'p2'], 'two pings inside a message answered in order');
    $m = $recv->wait_type('message', 5, sub { $_[0]{user} eq 'pinger' });
    is($m && $m->{text}, 'abc', 'message with two interleaved pings relayed whole');
    $p->send_close(1000);
    ok($p->is_closed_by_server(5), 'pinger closed');
}

# --- an unsolicited pong is ignored; the session stays usable
{
    my $c = WSClient->join(port => $port, room => 'frag', nick => 'ponger');
    ok($c->send_pong('unsolicited'), 'client sends an unsolicited pong');
    $c->send_pong('');
    $c->send_text('after the pong');
    my $m = $recv->wait_type('message', 5, sub { $_[0]{user} eq 'ponger' });
    is($m && $m->{text}, 'after the pong', 'message after unsolicited pongs is relayed');
    my $own = $c->wait_type('message', 5, sub { $_[0]{user} eq 'ponger' });
    ok($own, 'ponger still receives events');
    ok(!$c->got_close && !$c->eof, 'no close after an unsolicited pong');
    $c->send_close(1000);
    ok($c->is_closed_by_server(5), 'ponger closed');
}

# --- ping payloads echoed exactly
{
    my $c = WSClient->join(port => $port, room => 'frag', nick => 'echo');
    my $all = join '', map { chr($_ % 256) } 0 .. 124;    # 125 bytes incl. NUL and 0x80+
    for my $case (['', 'empty ping'], [$all, '125-byte binary ping'], ["\xff\xfe\x00x", 'non-UTF-8 ping']) {
        my ($payload, $name) = @$case;
        $c->send_ping($payload);
        my $pong;
        my $deadline = time + 5;
        while (my $f = $c->recv_frame($deadline - time)) {
            if ($f->{opcode} == 10) { $pong = $f; last }
            last if $f->{opcode} == 8;
        }
        ok($pong, "$name: pong received") or next;
        is(length $pong->{payload}, length $payload, "$name: pong payload length " . length $payload);
        ok($pong->{payload} eq $payload, "$name: pong payload identical");
        ok($pong->{fin} && !$pong->{masked} && !$pong->{rsv}, "$name: pong is a single unmasked frame");
    }
    $c->send_close(1000);
    ok($c->is_closed_by_server(5), 'echo closed');
}

my %partial = map { $_ => 1 } ('Hello', ', frag', 'mented world', 'a', 'b', 'c',
                               'first half, ', 'second half', "x\x{FFFD}");
ok(!grep({ ($_->{type} // '') eq 'message' && $partial{ $_->{text} // '' } } $recv->events),
   'no fragment was relayed on its own');

$_->send_close(1000) for $sender, $recv;
ok($_->is_closed_by_server(5), 'closed after close handshake') for $sender, $recv;
done_all();
