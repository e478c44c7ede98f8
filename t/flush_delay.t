# websocket_chat_flush_delay: a member sent room events less than the delay
# ago gets the room's next events together, when the delay has passed since
# then; one that has been quiet longer, or was only sent its welcome, gets
# the next event at once, and a sender gets its own message back at once;
# with `off`, every event leaves in the turn it arrives. A delay of 1 s
# makes "held" and "at once" far apart, so the checks do not hang on the
# machine's speed: held means not there 0.3 s later, at once means there
# well before the delay.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

sub texts_until {
    my ($c, $want, $timeout) = @_;
    my @got;
    my $deadline = time + $timeout;
    while (@got < $want && (my $left = $deadline - time) > 0) {
        my $ev = $c->recv_json($left) or last;
        push @got, $ev->{text} if ($ev->{type} // '') eq 'message';
    }
    return @got;
}

# Nothing but pings and presence for $secs: no message event.
sub no_message_within {
    my ($c, $secs) = @_;
    my $deadline = time + $secs;
    while ((my $left = $deadline - time) > 0) {
        my $ev = $c->recv_json($left) or return 1;
        return 0 if ($ev->{type} // '') eq 'message';
    }
    return 1;
}

my $redis = start_redis();

{
    my $nginx = start_nginx(chat_config(location => "websocket_chat_flush_delay 1s;\n"
                                                  . "websocket_chat_presence off;\n"), redis => $redis);
    my $reader = WSClient->join(port => $nginx->port, room => 'fd', nick => 'reader');
    my $writer = WSClient->join(port => $nginx->port, room => 'fd', nick => 'writer');

    # The welcome just written does not hold the first message back.
    my $sent = time;
    $writer->send_text('m1');
    is_deeply([texts_until($reader, 1, 5)], ['m1'], 'the first message after the welcome comes');
    my $first = time;
    cmp_ok($first - $sent, '<', 0.7, 'at once: it was not held');

    $writer->send_text('m2');
    my $t2 = time;
    is_deeply([texts_until($writer, 2, 5)], ['m1', 'm2'], 'the sender gets its own messages back');
    cmp_ok(time - $t2, '<', 0.7, 'its own m2 at once, although it was sent m1 a moment ago: a receipt is never held');
    ok(no_message_within($reader, 0.3), 'the reader\'s m2, right after its m1, is held (not there 0.3 s later)');
    $writer->send_text('m3');
    is_deeply([texts_until($reader, 2, 5)], ['m2', 'm3'], 'then both come, in order, once the delay has passed');
    cmp_ok(time - $first, '>=', 0.5, 'and not before the delay was mostly over');
    is_deeply([texts_until($writer, 1, 5)], ['m3'], 'the sender gets m3 back');

    # A quiet spell longer than the delay: the next message is not held.
    ok(no_message_within($reader, 1.3), 'a quiet spell of 1.3 s');
    $sent = time;
    $writer->send_text('m4');
    is_deeply([texts_until($reader, 1, 5)], ['m4'], 'the message after it arrives');
    cmp_ok(time - $sent, '<', 0.7, 'well before the 1 s delay: it was not held');

    $_->send_close(1000) for $reader, $writer;
    ok($reader->recv_close(5) && $writer->recv_close(5), 'both close cleanly');
    $nginx->stop;
}

# A member's queue is written once it makes a large write (a quarter of the
# send buffer's size + burst), whatever the delay and in the middle of a
# fan-out. Send buffer 64k with a 64k burst (128 KB in all), delay 1 s:
# 15 KB messages, many of them in each read from Redis, would pass that
# limit for a reader that keeps up if they waited for the delay or for the
# end of the turn. A member that stops reading is still closed.
{
    my $nginx = start_nginx(chat_config(location => "websocket_chat_flush_delay 1s;\n"
                                                  . "websocket_chat_send_buffer 64k burst=64k;\n"
                                                  . "websocket_chat_presence off;\n"), redis => $redis)
        ->allow_errors(qr/: closing session of "stalled" in "big": 1008 slow consumer, client: /);
    my $port = $nginx->port;
    my $reader  = WSClient->join(port => $port, room => 'big', nick => 'reader');
    my $stalled = WSClient->join(port => $port, room => 'big', nick => 'stalled', rcvbuf => 4096);
    my $writer  = WSClient->join(port => $port, room => 'big', nick => 'writer');
    # Raw frames: decoding 15 KB of JSON in Perl would make the reader slow.
    my %got = (reader => [], writer => []);
    my $pump = sub {
        for my $who (qw(reader writer)) {
            my $c = $who eq 'reader' ? $reader : $writer;
            for my $f ($c->pending_frames(0)) {
                push @{ $got{$who} }, $1 if $f->{opcode} == 1 && $f->{payload} =~ /"text":"(big-\d+) /;
            }
        }
    };
    my $stalled_closed = sub { $nginx->error_log_text =~ /"stalled" in "big": 1008 slow consumer/ };
    my @sent;
    while (@sent < 400 && !$stalled_closed->()) {
        push @sent, sprintf 'big-%03d', scalar @sent;
        $writer->send_text("$sent[-1] " . ('b' x 15000));
        $pump->();
    }
    note(scalar(@sent) . ' messages of 15 KB sent');
    ok(wait_until(sub { $pump->(); @{ $got{reader} } >= @sent && @{ $got{writer} } >= @sent }, 5, 0.005),
       'the reader and the writer get every message');
    is_deeply($got{reader}, \@sent, 'the reader that keeps up gets them all, in order');
    ok(!$reader->got_close && !$reader->eof, 'and is not closed');
    ok(wait_until($stalled_closed, 10), 'the member that stopped reading is closed as a slow consumer');
    my $close;
    my $drain_deadline = time + 20;
    while (!$close && !$stalled->eof && time < $drain_deadline) {
        ($close) = grep { $_->{opcode} == 8 } $stalled->pending_frames(0.2);
    }
    is($close && $close->{close_code}, 1008, 'its close frame, behind what it had been sent, says 1008');
    $_->send_close(1000) for $reader, $writer;
    ok($reader->recv_close(5) && $writer->recv_close(5), 'the others close cleanly');
    $nginx->stop;
}

{
    my $nginx = start_nginx(chat_config(location => "websocket_chat_flush_delay off;\n"
                                                  . "websocket_chat_presence off;\n"), redis => $redis);
    my $reader = WSClient->join(port => $nginx->port, room => 'fo', nick => 'reader');
    my $writer = WSClient->join(port => $nginx->port, room => 'fo', nick => 'writer');
    $writer->send_text('n1');
    is_deeply([texts_until($reader, 1, 5)], ['n1'], 'off: the first message arrives');
    my $sent = time;
    $writer->send_text('n2');
    is_deeply([texts_until($reader, 1, 5)], ['n2'], 'off: the one right after arrives too');
    cmp_ok(time - $sent, '<', 0.7, 'off: without waiting for any delay');
    $_->send_close(1000) for $reader, $writer;
    $nginx->stop;
}

done_all();
