# Protocol violations close the connection with the documented code:
# 1002 protocol error, 1007 invalid UTF-8, 1003 binary frame, 1009 too big.
# The room keeps working for the other members afterwards.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

my $watcher = WSClient->join(port => $port, room => 'cc', nick => 'watcher');

# Send a bad frame; expect a close frame with $code and then TCP close.
sub closes_with {
    my ($name, $code, %frame) = @_;
    my $c = WSClient->join(port => $port, room => 'cc', nick => 'bad');
    $c->send_frame(%frame);
    my $f;
    while (my $m = $c->recv_message(5)) {
        if ($m->{opcode} == 8) { $f = $m; last }
        if ($m->{opcode} == 1 && $m->{payload} =~ /"type":"message"/) {
            diag("$name: the bad frame was relayed as a message: $m->{payload}");
        }
    }
    is($f && $f->{close_code}, $code, "$name -> close code $code")
        or diag($c->eof ? 'connection closed without close frame' : 'no close frame within 5s');
    ok($c->is_closed_by_server(5), "$name: server closes the TCP connection");
}

closes_with('unmasked client frame', 1002, opcode => 1, payload => 'hi', mask => 0);
closes_with('RSV1 set without extension', 1002, opcode => 1, payload => 'hi', rsv => 4);
closes_with('reserved opcode 3', 1002, opcode => 3, payload => 'hi');
closes_with('reserved control opcode 11', 1002, opcode => 11, payload => '');
closes_with('fragmented ping', 1002, opcode => 9, payload => 'p', fin => 0);
closes_with('control frame payload of 126 bytes', 1002, opcode => 9, payload => 'p' x 126);
closes_with('continuation without a start', 1002, opcode => 0, payload => 'x');
closes_with('invalid UTF-8 text', 1007, opcode => 1, payload => "ab\xff\xfecd");
closes_with('overlong UTF-8 encoding', 1007, opcode => 1, payload => "\xc0\xaf");
closes_with('UTF-16 surrogate in UTF-8', 1007, opcode => 1, payload => "\xed\xa0\x80");
closes_with('binary frame', 1003, opcode => 2, payload => "\x00\x01\x02");
closes_with('declared length of 2^40 bytes', 1009, opcode => 1, payload => '',
            declared_len => 2**40);

# the room still works for the remaining member
$watcher->send_text('still alive');
my $m = $watcher->wait_type('message', 5, sub { $_[0]{user} eq 'watcher' });
is($m && $m->{text}, 'still alive', 'room keeps working after the bad clients');
ok(!(grep { ($_->{type} // '') eq 'message' && $_->{user} eq 'bad' } $watcher->events),
   'no bad frame was relayed as a message');

# a ping is answered with a pong carrying the same data
{
    my $c = WSClient->join(port => $port, room => 'cc', nick => 'pinger');
    $c->send_ping('abc');
    my $pong;
    while (my $f = $c->recv_frame(5)) {
        if ($f->{opcode} == 10) { $pong = $f; last }
    }
    is($pong && $pong->{payload}, 'abc', 'ping answered with pong "abc"');
    $c->send_close(1000);
}

$watcher->send_close(1000);
done_all();
