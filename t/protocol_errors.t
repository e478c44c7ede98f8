# Protocol errors (RFC 6455): every violation listed in ISSUE3 gets a close
# frame with the exact code (1002 protocol error, 1007 invalid UTF-8, 1003
# binary) and then the server closes the TCP connection; valid close codes
# are echoed; frames after a close frame are ignored; nothing from a bad
# client is relayed to the room.
#
# All cases run side by side: each one joins its own client and sends its
# frames, then the answers are collected against one shared deadline, so a
# module that hangs on some cases cannot make the file slow.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

my $ROOM = 'perr';
my $watcher = WSClient->join(port => $port, room => $ROOM, nick => 'watcher');

my @cases;    # {name, code (expected close code; 'empty_or_1000'), frames, raw, nick, reason}

sub case {
    my ($name, $code, @frames) = @_;
    push @cases, { name => $name, code => $code, frames => \@frames };
}

# --- 1002 protocol errors
case('unmasked text frame', 1002, { opcode => 1, payload => 'hi', mask => 0 });
case('unmasked ping', 1002, { opcode => 9, payload => 'p', mask => 0 });
case('RSV1 set', 1002, { opcode => 1, payload => 'hi', rsv => 4 });
case('RSV2 set', 1002, { opcode => 1, payload => 'hi', rsv => 2 });
case('RSV3 set', 1002, { opcode => 1, payload => 'hi', rsv => 1 });
case('RSV1 on a ping', 1002, { opcode => 9, payload => 'p', rsv => 4 });
for my $op (3 .. 7, 0xB .. 0xF) {
    case(sprintf('reserved opcode 0x%X', $op), 1002, { opcode => $op, payload => $op < 8 ? 'data' : '' });
}
case('ping of 126 bytes', 1002, { opcode => 9, payload => 'p' x 126 });
case('pong of 126 bytes', 1002, { opcode => 10, payload => 'p' x 126 });
case('close of 126 bytes (code 1000 + 124-byte reason)', 1002,
     { opcode => 8, payload => pack('n', 1000) . ('r' x 124) });
# only the header declaring a too-long control frame: no need to wait for it
push @cases, { name => 'ping header declaring 126 bytes (payload not sent)', code => 1002,
               raw => WSClient::frame_bytes(opcode => 9, payload => '', declared_len => 126) };
push @cases, { name => 'close header declaring 65536 bytes (payload not sent)', code => 1002,
               raw => WSClient::frame_bytes(opcode => 8, payload => '', declared_len => 65536) };
case('fragmented ping (FIN=0)', 1002, { opcode => 9, payload => 'p', fin => 0 });
case('fragmented close (FIN=0)', 1002, { opcode => 8, payload => pack('n', 1000), fin => 0 });
case('continuation without a message started', 1002, { opcode => 0, payload => 'x' });
case('continuation (FIN=0) without a message started', 1002, { opcode => 0, payload => 'x', fin => 0 });
case('text frame inside a fragmented message', 1002,
     { opcode => 1, payload => 'start', fin => 0 }, { opcode => 1, payload => 'again' });
case('text frame inside a fragmented message after a continuation', 1002,
     { opcode => 1, payload => 'a', fin => 0 }, { opcode => 0, payload => 'b', fin => 0 },
     { opcode => 1, payload => 'c', fin => 0 });
for my $cc (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535) {
    case("close code $cc", 1002, { opcode => 8, payload => pack('n', $cc) });
}
case('close with a 1-byte payload', 1002, { opcode => 8, payload => "\x03" });

# --- 1007 invalid UTF-8
case('invalid UTF-8 text (single frame)', 1007, { opcode => 1, payload => "ab\xff\xfecd" });
# "\xE2\x82" is a valid but incomplete prefix of U+20AC; "(cd" is plain ASCII.
# Only together are they invalid (0x28 is not a continuation byte).
case('invalid UTF-8 split across fragments', 1007,
     { opcode => 1, payload => "ab\xE2\x82", fin => 0 }, { opcode => 0, payload => '(cd' });
case('invalid UTF-8 split over three fragments', 1007,
     { opcode => 1, payload => "x\xF0\x9F", fin => 0 }, { opcode => 0, payload => "\x98", fin => 0 },
     { opcode => 0, payload => 'Ay' });
case('text ending inside a multibyte character', 1007,
     { opcode => 1, payload => 'abc', fin => 0 }, { opcode => 0, payload => "\xE2\x82" });
case('invalid UTF-8 in the close reason', 1007,
     { opcode => 8, payload => pack('n', 1000) . "bye\xff" });

# --- 1003 binary
case('binary frame', 1003, { opcode => 2, payload => "\x00\x01\x02" });
case('fragmented binary message', 1003,
     { opcode => 2, payload => "\x00", fin => 0 }, { opcode => 0, payload => "\x01" });

# --- valid close codes are echoed
for my $cc (1000, 1001, 1003, 1007, 1011, 3000, 4999) {
    case("valid close code $cc echoed", $cc, { opcode => 8, payload => pack('n', $cc) . 'bye' });
}
case('empty close answered with an empty close or 1000', 'empty_or_1000', { opcode => 8, payload => '' });

# --- frames after a close frame are ignored (sent in the same TCP write)
push @cases, { name => 'frames after a close frame', code => 1000, after_close => 1,
               raw => WSClient::frame_bytes(opcode => 8, payload => pack('n', 1000))
                    . WSClient::frame_bytes(opcode => 1, payload => 'sent after close')
                    . WSClient::frame_bytes(opcode => 1, payload => "bad utf8 after close \xff") };

# ---------------------------------------------------------------- run
my $n = 0;
for my $c (@cases) {
    $c->{nick} = 'bad' . ++$n;
    $c->{client} = eval { WSClient->join(port => $port, room => $ROOM, nick => $c->{nick}) };
    if (!$c->{client}) { $c->{join_error} = $@; next }
    my $cl = $c->{client};
    if (defined $c->{raw}) {
        $cl->send_raw($c->{raw});
    } else {
        $cl->send_frame(%$_) for @{ $c->{frames} };
    }
}

my $deadline = time + 8;
sub left { my $l = $deadline - time; $l > 0.3 ? $l : 0.3 }

for my $c (@cases) {
    my $name = $c->{name};
    my $cl = $c->{client};
    if (!$cl) {
        fail("$name: join");
        diag($c->{join_error});
        next;
    }
    my $f = $cl->recv_close(left());
    my $got = !$f ? ($cl->eof ? 'TCP closed without a close frame' : 'no close frame (timeout)')
            : !defined $f->{close_code} ? (length $f->{payload} ? 'malformed close payload' : 'empty close')
            : $f->{close_code};
    if ($c->{code} eq 'empty_or_1000') {
        ok($f && (!length $f->{payload} || ($f->{close_code} // 0) == 1000),
           "$name -> close frame, empty or 1000") or diag("got: $got");
    } else {
        is($got, $c->{code}, "$name -> close code $c->{code}");
    }
    ok($f && !$f->{masked} && $f->{fin}, "$name: close frame is a single unmasked frame") if $f;
    if ($f && $c->{code} =~ /^(?:1002|1007|1003)$/ && defined $f->{close_reason}) {
        my $r = $f->{close_reason};
        ok(utf8::decode($r), "$name: close reason is valid UTF-8");
    }
    ok($cl->is_closed_by_server(left()), "$name: server closes the TCP connection");
    my @msgs = grep { ($_->{type} // '') eq 'message' } $cl->events;
    ok(!@msgs, "$name: the client received no message event from its own frames")
        or diag(join "\n", map { $_->{_raw} // '' } @msgs);
}

# Nothing sent by a bad client reached the room: a marker sent by the watcher
# after all of them arrives, and no message event from a bad client came
# before it (Redis keeps the order of publications on the channel).
$watcher->send_text('marker');
my $m = $watcher->wait_type('message', 10, sub { $_[0]{user} eq 'watcher' });
is($m && $m->{text}, 'marker', 'room still works after the bad clients');
my @relayed = grep { ($_->{type} // '') eq 'message' && ($_->{user} // '') =~ /^bad\d+$/ }
              $watcher->events;
ok(!@relayed, 'no frame of a bad client was relayed as a message (incl. frames after close)')
    or diag(join "\n", map { my %n = map { $_->{nick} => $_->{name} } @cases;
                             "$n{$_->{user}}: $_->{_raw}" } @relayed);

$watcher->send_close(1000);
ok($watcher->is_closed_by_server(5), 'watcher closed');
done_all();
