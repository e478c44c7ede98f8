# A seeded, bounded soak of hostile permessage-deflate clients
# (websocket_chat_deflate on, websocket_chat_max_message 16k, 2 workers with
# reuseport, 3 rooms): 60 of them, each with one behaviour drawn from
# compressed garbage, truncated streams, a valid stream then junk, BFINAL
# then more blocks, stored blocks with a wrong NLEN or a huge LEN, deflate
# bombs, messages inflating to exactly the limit and one byte more, many
# tiny fragments with control frames between, a close or a new data frame
# inside a compressed message, a compressed message never finished, RSV
# bits where they are not allowed, RSV1 without the extension, and odd
# Sec-WebSocket-Extensions offers; written byte by byte (slow drip), frame by
# frame, in random chunks, or together with the handshake in one write, and
# some cut off abruptly mid-frame. Meanwhile 6 well-behaved members (a
# deflate and a plain one per room, on different workers) chat.
#
# Each hostile client's expected fate is worked out when its plan is made:
# what a compressed payload becomes is what zlib makes of it with the server's
# rules (tail put back, a final block ends it, over 16k is 1009, a zlib error
# is 1007, then the text must be UTF-8), so truncations and junk that happen
# to inflate must be delivered as exactly that text, and everything else must
# get its close code (1002, 1007, 1009, or the echo of the client's own
# close) followed by the TCP close. Nothing a client sent after its violation,
# nor a message it never finished, may reach anyone.
#
# At the end: every well-behaved member got every message of its room's
# members exactly once, in order, with the exact text, and was never closed;
# the workers are the same processes, their RSS within 4 MB of before, and
# the status endpoint counts only the well-behaved sessions.
#
# SOAK_SEED=<n> replays the plans of a run (timing still differs).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Select;
use IO::Socket::INET;
use Socket qw(IPPROTO_TCP TCP_NODELAY SOL_SOCKET SO_LINGER);
use Errno qw(EAGAIN EWOULDBLOCK EINTR);
use Time::HiRes qw(time);
use Encode ();
use JSON::PP ();
use Compress::Raw::Zlib ();
use Test::More;
use ChatTest;
use WSClient;
use ChatFault;

my $seed = $ENV{SOAK_SEED} // 20261201;
binmode(Test::More->builder->$_, ':encoding(UTF-8)') for qw(output failure_output todo_output);
srand($seed);
note("seed $seed (SOAK_SEED=$seed replays these plans)");

my $LIMIT   = 16384;
my $HOSTILE = 60;
my $SOAK    = 30;      # seconds of chatting while the hostile clients run
my @ROOMS   = qw(r1 r2 r3);
my $AGREED  = 'permessage-deflate; server_no_context_takeover; client_no_context_takeover';
my $JSON    = JSON::PP->new->utf8;

my @ASCII_WORDS = qw(alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo
    lima mike november oscar papa quebec romeo sierra tango uniform victor whiskey xray
    yankee zulu);
my @WORDS = (@ASCII_WORDS, "h\x{e9}llo", "w\x{f6}rld", "\x{65e5}\x{672c}\x{8a9e}", "\x{2713}",
             "\x{1f389}", "na\x{ef}ve", "\x{2014}");

# ---------------------------------------------------------------- helpers

sub rbytes { join '', map { chr int rand 256 } 1 .. shift }
sub ascii  { join '', map { chr(32 + int rand 95) } 1 .. shift }
sub words  { my $n = shift; join ' ', map { $WORDS[int rand @WORDS] } 1 .. $n }
sub enc    { Encode::encode('UTF-8', $_[0]) }

sub frame { WSClient::frame_bytes(mask_key => rbytes(4), @_) }

# Raw deflate of $bytes ending in a final block (BFINAL), as zlib's Z_FINISH.
sub deflate_final {
    my ($d) = Compress::Raw::Zlib::Deflate->new(-WindowBits => -15, -AppendOutput => 1);
    my $out = '';
    $d->deflate($_[0], $out);
    $d->flush($out, Compress::Raw::Zlib::Z_FINISH());
    return $out;
}

# $s cut into $n non-empty pieces (fewer if it is shorter).
sub pieces {
    my ($s, $n) = @_;
    $n = length $s if $n > length $s;
    $n = 1 if $n < 1;
    my %cut;
    $cut{ 1 + int rand(length($s) - 1) } = 1 while keys(%cut) < $n - 1;
    my @at = (0, sort({ $a <=> $b } keys %cut), length $s);
    return map { substr($s, $at[$_], $at[$_ + 1] - $at[$_]) } 0 .. $#at - 1;
}

# The frames of one compressed message (RSV1 on the first frame only).
sub compressed_frames {
    my ($payload, $nfrag, $opcode) = @_;
    my @p = pieces($payload, $nfrag // 1);
    @p = ('') unless @p;
    return map { frame(opcode => $_ ? 0 : ($opcode // 1), rsv => $_ ? 0 : 4,
                       fin => $_ == $#p ? 1 : 0, payload => $p[$_]) } 0 .. $#p;
}

my $UTF8 = qr/\A(?:[\x00-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]
    |[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}
    |[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})*\z/x;

# What the server must make of a compressed message payload: (code) when
# the connection must be closed, (undef, text) when the message is good.
# zlib decides, fed one byte at a time so that a bomb stops at the limit:
# the tail is put back, a final block ends the message, an error is 1007,
# more than $LIMIT bytes is 1009, and a text message must be UTF-8 (1007).
sub payload_fate {
    my ($payload) = @_;
    return (1009) if length($payload) > $LIMIT + 4 + 1024;
    my ($inf) = Compress::Raw::Zlib::Inflate->new(-WindowBits => -15, -AppendOutput => 1,
                                                  -ConsumeInput => 1);
    my $all = $payload . "\x00\x00\xff\xff";
    my $out = '';
    for my $i (0 .. length($all) - 1) {
        my $in = substr($all, $i, 1);
        my $st = $inf->inflate($in, $out);
        return (1009) if length $out > $LIMIT;
        last if $st == Compress::Raw::Zlib::Z_STREAM_END();
        next if $st == Compress::Raw::Zlib::Z_OK() || $st == Compress::Raw::Zlib::Z_BUF_ERROR();
        return (1007);
    }
    return (1007) unless $out =~ $UTF8;
    return (undef, Encode::decode('UTF-8', $out));
}

my $tokens = 0;
sub forbidden_token { sprintf 'FORBIDDEN-%d-%d', $seed, ++$tokens }

# ---------------------------------------------------------------- plans

# A behaviour returns {frames => [...], fate => [close => code] | [text => chars]
# | ['open'], pings => [payloads], forbidden => [tokens], and optionally
# offers/agreed/window/response for the handshake}.
my %KIND;

$KIND{garbage} = sub {
    my $g = rbytes(1 + int rand 4000);
    my ($code) = payload_fate($g);
    # Random bytes may inflate; a first block of type 3 never does.
    substr($g, 0, 1) = chr(ord(substr $g, 0, 1) | 0x06) if !defined $code;
    ($code) = payload_fate($g);
    return { frames => [compressed_frames($g, rand() < 0.3 ? 2 + int rand 4 : 1)],
             fate => [close => $code] };
};

# A payload whose fate zlib decides: a close, or the text it inflates to.
sub judged {
    my ($payload, %o) = @_;
    my ($code, $text) = payload_fate($payload);
    return { frames => [compressed_frames($payload, $o{frags} // 1)],
             fate => defined $code ? [close => $code] : [text => $text],
             forbidden => $o{forbidden} };
}

$KIND{truncated} = sub {
    my $c = WSClient::deflate_payload(enc(words(5 + int rand 200)));
    return judged(substr($c, 0, 1 + int rand(length($c) - 1)), frags => 1 + int rand 3);
};

$KIND{valid_then_junk} = sub {
    return judged(WSClient::deflate_payload(enc(words(3 + int rand 100))) . rbytes(1 + int rand 40));
};

$KIND{bfinal_then_more} = sub {
    my $tok = forbidden_token();
    my $rest = rand() < 0.5 ? WSClient::deflate_payload(enc("$tok " . words(10))) : rbytes(1 + int rand 40);
    return judged(deflate_final(enc(words(3 + int rand 60))) . $rest, forbidden => [$tok],
                  frags => 1 + int rand 2);
};

$KIND{stored_bad_nlen} = sub {
    my $len = int rand 300;
    my $nlen = (~$len & 0xffff) ^ (1 << int rand 16);
    return judged(chr(int rand 2) . pack('vv', $len, $nlen) . ascii($len));
};

$KIND{stored_huge_len} = sub {
    my $len = 1000 + int rand 64536;
    return judged("\x00" . pack('vv', $len, ~$len & 0xffff) . ascii(int rand 3000),
                  frags => 1 + int rand 3);
};

$KIND{stored_exact} = sub {
    my $len = int rand 3000;
    return judged("\x00" . pack('vv', $len, ~$len & 0xffff) . ascii($len));
};

$KIND{bomb} = sub {
    my $mb = 1 + int rand 6;
    my $plain = (rand() < 0.5 ? "\0" : 'a') x ($mb * 1024 * 1024);
    my $c = WSClient::deflate_payload($plain);
    return judged($c, frags => rand() < 0.5 ? 1 : 2 + int rand 8);
};

sub text_of_length {
    my $n = shift;
    my $t = '';
    $t .= $ASCII_WORDS[int rand @ASCII_WORDS] . ' ' while length $t < $n;
    return substr($t, 0, $n);
}

$KIND{limit_exact} = sub {
    judged(WSClient::deflate_payload(text_of_length($LIMIT)), frags => 1 + int rand 4);
};

$KIND{limit_plus_one} = sub {
    judged(WSClient::deflate_payload(text_of_length($LIMIT + 1)), frags => 1 + int rand 4);
};

# Many 1-3 byte fragments, pings and unsolicited pongs between them.
$KIND{tiny_fragments} = sub {
    my $text = words(20 + int rand 200);
    my $c = WSClient::deflate_payload(enc($text));
    my @p;
    push @p, substr($c, 0, 1 + int rand 3, '') while length $c;
    my (@frames, @pings);
    for my $i (0 .. $#p) {
        push @frames, frame(opcode => $i ? 0 : 1, rsv => $i ? 0 : 4, fin => $i == $#p ? 1 : 0,
                            payload => $p[$i]);
        next unless $i < $#p && rand() < 0.1;
        if (rand() < 0.7) {
            push @pings, 'p' . scalar(@pings) . '-' . int rand 1e6;
            push @frames, frame(opcode => 9, payload => $pings[-1]);
        } else {
            push @frames, frame(opcode => 10, payload => 'unasked');
        }
    }
    return { frames => \@frames, fate => [text => $text], pings => \@pings };
};

# A close frame inside a compressed message: the close is echoed, the
# message never delivered.
$KIND{close_mid_message} = sub {
    my $tok = forbidden_token();
    my @f = compressed_frames(WSClient::deflate_payload(enc("$tok " . words(30))), 3);
    my $code = rand() < 0.5 ? 1000 : 4000 + int rand 100;
    return { frames => [@f[0 .. 1], frame(opcode => 8, payload => pack('n', $code) . 'bye')],
             fate => [close => $code], forbidden => [$tok] };
};

$KIND{never_finished} = sub {
    my $tok = forbidden_token();
    my @f = compressed_frames(WSClient::deflate_payload(enc("$tok " . words(40))), 4);
    return { frames => [@f[0 .. int rand 3]], fate => ['open'], forbidden => [$tok] };
};

$KIND{reserved_bits} = sub {
    my $tok = forbidden_token();
    my $c = WSClient::deflate_payload(enc("$tok " . words(10)));
    my ($a, $b) = (substr($c, 0, 4), substr($c, 4));
    my @variants = (
        ['RSV1 on the continuation of a compressed message',
         frame(opcode => 1, rsv => 4, fin => 0, payload => $a), frame(opcode => 0, rsv => 4, payload => $b)],
        ['RSV1 on the continuation of a plain message',
         frame(opcode => 1, fin => 0, payload => "$tok a"), frame(opcode => 0, rsv => 4, payload => 'b')],
        ['RSV1 on a ping', frame(opcode => 9, rsv => 4, payload => 'ping')],
        ['RSV1 on a pong', frame(opcode => 10, rsv => 4, payload => 'pong')],
        ['RSV1 on a close', frame(opcode => 8, rsv => 4, payload => pack('n', 1000))],
        ['RSV2 on a text frame', frame(opcode => 1, rsv => 2, payload => "$tok rsv2")],
        ['RSV3 on a text frame', frame(opcode => 1, rsv => 1, payload => "$tok rsv3")],
        ['RSV1+RSV2 on a compressed message', frame(opcode => 1, rsv => 6, payload => $c)],
        ['RSV1+RSV3 on a compressed message', frame(opcode => 1, rsv => 5, payload => $c)],
        ['RSV3 on the continuation of a compressed message',
         frame(opcode => 1, rsv => 4, fin => 0, payload => $a), frame(opcode => 0, rsv => 1, payload => $b)],
        ['RSV2 on a ping', frame(opcode => 9, rsv => 2, payload => '')],
    );
    my ($what, @frames) = @{ $variants[int rand @variants] };
    return { what => $what, frames => \@frames, fate => [close => 1002], forbidden => [$tok] };
};

# RFC 6455 5.4: a data frame inside a fragmented message fails the
# connection; inside a compressed one too.
$KIND{data_inside_compressed} = sub {
    my ($t1, $t2) = (forbidden_token(), forbidden_token());
    my @f = compressed_frames(WSClient::deflate_payload(enc("$t1 " . words(30))), 2);
    my @variants = (
        ['a plain text frame', frame(opcode => 1, payload => enc("$t2 plain, inside"))],
        ['a compressed text frame',
         compressed_frames(WSClient::deflate_payload(enc("$t2 compressed, inside")))],
        ['a plain message of two fragments',
         frame(opcode => 1, fin => 0, payload => "$t2 plain"), frame(opcode => 0, payload => ' start')],
    );
    my ($what, @inside) = @{ $variants[int rand @variants] };
    return { what => "$what between the 2 fragments of a compressed message",
             frames => [$f[0], @inside, $f[1]], fate => [close => 1002], forbidden => [$t1, $t2] };
};

$KIND{rsv1_not_agreed} = sub {
    my $tok = forbidden_token();
    my @offers = ([], ['permessage-deflate; server_max_window_bits=8'], ['x-webkit-deflate-frame'])[int rand 3];
    return { offers => $offers[0], agreed => 0,
             frames => [compressed_frames(WSClient::deflate_payload(enc("$tok " . words(8))))],
             fate => [close => 1002], forbidden => [$tok] };
};

# Odd offers within nginx's header limits (lines under 7000 bytes, three
# long ones at most); the 101 must answer each as negotiation says.
$KIND{odd_offers} = sub {
    my $what;
    my @variants = (
        sub {    # long garbage
            $what = 'long garbage';
            ([map { ascii(2000 + int rand 5000) } 1 .. 1 + int rand 3], undef);
        },
        sub {    # hundreds of unknown parameters: declined; maybe a good offer next
            $what = 'hundreds of unknown parameters';
            my @o = ('permessage-deflate; ' . join('; ', map { "p$_=v$_" } 1 .. 100 + int rand 500));
            return rand() < 0.5 ? ([@o, 'permessage-deflate; server_max_window_bits=12'], 12)
                                : (\@o, undef);
        },
        sub {    # one parameter repeated: declined
            $what = 'a repeated parameter';
            (['permessage-deflate' . '; client_max_window_bits' x (2 + int rand 250)], undef);
        },
        sub {    # the same good offer in many header lines
            $what = 'the same offer in many lines';
            my @good = (['permessage-deflate', 15], ['permessage-deflate; client_max_window_bits', 15],
                        ['permessage-deflate; server_max_window_bits=10', 10]);
            my $g = $good[int rand @good];
            ([($g->[0]) x (20 + int rand 80)], $g->[1]);
        },
        sub {    # not UTF-8: the whole line is ignored; maybe a good line next
            $what = 'a line that is not UTF-8';
            my $junk = join '', map { chr(0x80 + int rand 128) } 1 .. 200 + int rand 3000;
            my @o = ("\xff$junk, permessage-deflate");
            return rand() < 0.5 ? ([@o, 'permessage-deflate; server_max_window_bits=9'], 9)
                                : (\@o, undef);
        },
        sub {    # thousands of other offers, a good one last
            $what = 'thousands of offers';
            my @o = map { join ', ', map { 'x' . int rand 100 } 1 .. 1300 } 1 .. 1 + int rand 3;
            $o[-1] .= ', permessage-deflate; server_max_window_bits=11';
            (\@o, 11);
        },
        sub {    # empty offers and stray separators
            $what = 'empty offers';
            ([',,, ;;, ; ,permessage-deflate'], 15);
        },
    );
    my ($offers, $window) = $variants[int rand @variants]->();
    my $plan = { what => $what, offers => $offers, agreed => defined $window ? 1 : 0,
                 window => $window };
    if (defined $window) {
        my $text = words(20 + int rand 60);
        $plan->{frames} = [compressed_frames(WSClient::deflate_payload(enc($text)))];
        $plan->{fate} = [text => $text];
    } else {
        my $tok = forbidden_token();
        $plan->{frames} = [compressed_frames(WSClient::deflate_payload(enc("$tok " . words(8))))];
        $plan->{fate} = [close => 1002];
        $plan->{forbidden} = [$tok];
    }
    return $plan;
};

my @KINDS = sort keys %KIND;

# Writes of @bytes in the plan's manner: [seconds to wait before, bytes].
sub chunks_for {
    my ($mode, $gap, @frames) = @_;
    my $all = join '', @frames;
    return map { [$gap, $_] } split //, $all if $mode eq 'drip';
    return map { [$gap, $_] } @frames if $mode eq 'frames';
    return map { [$gap, $_] } pieces($all, 1 + int(length($all) / (1 + int rand 700)));
}

sub make_plan {
    my ($i, $kind) = @_;
    my $b = $KIND{$kind}->();
    my $p = {
        i => $i, kind => $kind, what => $b->{what}, nick => "h$i", room => $ROOMS[int rand @ROOMS],
        start => 0.3 + $i * 22 / $HOSTILE + rand 0.2,
        offers => $b->{offers} // [$WSClient::DEFLATE_OFFER], agreed => $b->{agreed} // 1,
        window => $b->{window} // 15, forbidden => $b->{forbidden} // [], pings => [],
    };
    $p->{response} = !$p->{agreed} ? undef
                   : $p->{window} == 15 ? $AGREED : "$AGREED; server_max_window_bits=$p->{window}";

    my @steps;    # [send => [frames]] and [echo => text]
    if (rand() < 0.3) {    # a good message first: the session worked before
        my $text = words(5 + int rand 40);
        my $f = $p->{agreed} ? [compressed_frames(WSClient::deflate_payload(enc($text)))]
                             : [frame(opcode => 1, payload => enc($text))];
        push @steps, [send => $f], [echo => $text];
    }
    push @steps, [send => $b->{frames}];
    my ($fate, $arg) = @{ $b->{fate} };
    if ($fate eq 'text') {
        push @steps, [echo => $arg];
        $p->{pings} = $b->{pings} // [];
        my $r = rand;
        $p->{end} = $r < 0.5 ? [close => 1000] : $r < 0.7 ? ['idle'] : ['drop'];
    } elsif ($fate eq 'close') {
        $p->{end} = [expect => $arg];
        if (rand() < 0.5) {    # what follows a violation must be ignored
            my $tok = forbidden_token();
            push @{ $p->{forbidden} }, $tok;
            push @steps, [send => [frame(opcode => 9, payload => 'after'),
                                   frame(opcode => 1, payload => "$tok after the violation")]];
        }
    } else {
        $p->{end} = rand() < 0.6 ? ['idle'] : ['drop'];
    }

    my $total = 0;
    $total += length join '', @{ $_->[1] } for grep { $_->[0] eq 'send' } @steps;
    my $r = rand;
    $p->{mode} = $total <= 1500 && $r < 0.35 ? 'drip' : $r < 0.55 ? 'one' : $r < 0.75 ? 'frames' : 'chunks';
    my $gap = $p->{mode} eq 'drip' ? 0.001 + rand 0.002 : rand 0.02;
    my $how = $p->{mode} eq 'one' ? 'chunks' : $p->{mode};    # 'one': the first send joins the handshake
    $_ = [send => [chunks_for($how, $gap, @{ $_->[1] })]] for grep { $_->[0] eq 'send' } @steps;

    # Some are cut off abruptly, mid-frame.
    if ($fate ne 'open' && rand() < 0.15) {
        my $cut = 1 + int rand $total;
        my @kept;
        for my $s (@steps) {
            last if $cut <= 0;
            if ($s->[0] eq 'echo') { push @kept, $s; next }
            my @c;
            for my $c (@{ $s->[1] }) {
                last if $cut <= 0;
                my $take = substr($c->[1], 0, $cut);
                $cut -= length $take;
                push @c, [$c->[0], $take];
            }
            push @kept, [send => \@c];
            last if $cut <= 0;
        }
        @steps = @kept;
        $p->{end} = ['drop'];
        $p->{pings} = [];
        $p->{cut} = 1;
    }
    $p->{rst} = rand() < 0.5;
    $p->{steps} = \@steps;
    return $p;
}

my @order = map { $KINDS[$_ % @KINDS] } 0 .. $HOSTILE - 1;
for my $i (reverse 1 .. $#order) {    # seeded shuffle
    my $j = int rand($i + 1);
    @order[$i, $j] = @order[$j, $i];
}
my @H = map { make_plan($_, $order[$_]) } 0 .. $HOSTILE - 1;
note(sprintf '%d hostile plans: %s', scalar @H,
     join ', ', map { my $k = $_; "$k " . grep { $_->{kind} eq $k } @H } @KINDS);

# ---------------------------------------------------------------- nginx

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts: 2 workers, reuseport, deflate on, max_message 16k',
    chat_config(workers => 2, listen => 'reuseport',
                location => "            websocket_chat_deflate on;\n"
                          . "            websocket_chat_max_message 16k;\n",
                server => "        location = /status { websocket_chat_status; }\n"),
    redis => $redis, workers => 2);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;
is(scalar(@workers), 2, 'two workers running');

sub status_json {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp',
                                  Timeout => 5) or return undef;
    WSClient::_write_all($s, "GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", 5) or return undef;
    my ($buf, $deadline, $sel) = ('', time + 5, IO::Select->new($s));
    while ($sel->can_read($deadline - time)) { sysread($s, $buf, 65536, length $buf) or last }
    my (undef, $body) = split /\r\n\r\n/, $buf, 2;
    my $j = eval { $JSON->decode($body // '') };
    return ref $j eq 'HASH' ? $j : undef;
}

# ---------------------------------------------------------------- the well-behaved

# Per room a deflate member and a plain one, on different workers (a few
# attempts each), so that their messages also cross workers through Redis.
my @W;
for my $room (@ROOMS) {
    my $d = WSClient->join(port => $port, room => $room, nick => "wd-$room", deflate => 1);
    my ($dw) = client_workers($nginx, [$d], @workers);
    my ($p, $pw);
    for my $try (1 .. 12) {
        $p = WSClient->join(port => $port, room => $room, nick => "wp-$room");
        ($pw) = client_workers($nginx, [$p], @workers);
        last if defined $dw && defined $pw && $pw != $dw;
        $p->send_close(1000);
        $p->recv_close(5);
        $p->disconnect;
    }
    note("room $room: deflate member on worker " . ($dw // '?') . ', plain member on ' . ($pw // '?'));
    push @W, { c => $d, nick => "wd-$room", room => $room, deflate => 1, worker => $dw },
             { c => $p, nick => "wp-$room", room => $room, deflate => 0, worker => $pw };
}
ok(scalar(grep { $_->deflate_agreed } map { $_->{c} } grep { $_->{deflate} } @W) == 3
   && !grep({ $_->{c}->deflate_agreed } grep { !$_->{deflate} } @W),
   'well-behaved: three agreed to permessage-deflate, three did not offer it');
is(scalar(grep { defined $W[2 * $_]{worker} && defined $W[2 * $_ + 1]{worker}
                 && $W[2 * $_]{worker} != $W[2 * $_ + 1]{worker} } 0 .. $#ROOMS), scalar(@ROOMS),
   "each room's two well-behaved members are on different workers");

# Their messages, made now so that the seed fixes them: every 0.2-0.4 s;
# deflate members send most compressed, some plain, some in three
# compressed fragments with a ping between.
for my $k (0 .. $#W) {
    my $w = $W[$k];
    my @plan;
    for my $n (1 .. int($SOAK / 0.2) + 1) {
        my $text = "$w->{nick} #$n " . words(1 + int rand(rand() < 0.2 ? 150 : 15));
        my $how = !$w->{deflate} ? 'plain' : (qw(compressed compressed compressed plain fragments))[int rand 5];
        push @plan, [0.2 + rand 0.2, $text, $how];
    }
    @$w{qw(plan sent got bad)} = (\@plan, [], {}, []);
}

sub wb_send {
    my $w = shift;
    my ($gap, $text, $how) = @{ shift @{ $w->{plan} } };
    my $c = $w->{c};
    if ($how eq 'plain') {
        $c->send_text($text);
    } elsif ($how eq 'compressed') {
        $c->send_compressed($text);
    } else {
        my $cz = WSClient::deflate_payload(enc($text));
        my @p = pieces($cz, 3);
        $c->send_frame(opcode => 1, rsv => 4, fin => @p == 1 ? 1 : 0, payload => $p[0]);
        $c->send_ping('mid');
        $c->send_frame(opcode => 0, fin => $_ == $#p ? 1 : 0, payload => $p[$_]) for 1 .. $#p;
    }
    push @{ $w->{sent} }, $text;
    $w->{next} = time + $gap;
}

sub wb_read {
    my $w = shift;
    my $c = $w->{c};
    for my $f ($c->pending_frames(0)) {
        my $op = $f->{opcode};
        if ($op == 9) { $c->send_pong($f->{payload}); next }
        next if $op == 10;
        if ($op == 8) { $w->{closed} //= 'close frame ' . ($f->{close_code} // '(no code)'); next }
        if ($op == 0 || !$f->{fin}) { push @{ $w->{bad} }, "fragmented server frame (opcode $op)"; next }
        my $payload = $f->{payload};
        if ($f->{rsv} & 4) {
            if (!$c->deflate_agreed) { push @{ $w->{bad} }, 'RSV1 frame without the extension'; next }
            $payload = WSClient::inflate_payload($payload, $c->deflate_window);
            if (!defined $payload) { push @{ $w->{bad} }, "RSV1 frame that does not inflate"; next }
        }
        my $ev = eval { $JSON->decode($payload) };
        if (ref $ev ne 'HASH') { push @{ $w->{bad} }, 'a frame that is not a JSON event'; next }
        next unless ($ev->{type} // '') eq 'message';
        push @{ $w->{got}{ $ev->{user} } }, $ev->{text};
        push @{ $w->{all_texts} }, $ev->{text};
    }
    $w->{closed} //= 'TCP closed' if $c->eof;
}

# ---------------------------------------------------------------- the hostile

sub h_fail { my ($h, $why) = @_; push @{ $h->{fail} }, $why }

sub h_start {
    my $h = shift;
    my ($req) = WSClient::handshake_request(port => $port,
        path => "/ws?room=$h->{room}&nick=$h->{nick}",
        extra_headers => [map { ['Sec-WebSocket-Extensions' => $_] } @{ $h->{offers} }]);
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp',
                                  Timeout => 5);
    if (!$s) { h_fail($h, "cannot connect: $!"); $h->{phase} = 'done'; return }
    binmode $s;
    setsockopt($s, IPPROTO_TCP, TCP_NODELAY, 1);    # a drip is one segment per byte
    $s->blocking(0);
    $h->{started} = 1;
    @$h{qw(sock rbuf q echoes pongs fail)} = ($s, '', [[0, $req]], [], [], $h->{fail} // []);
    if ($h->{mode} eq 'one' && @{ $h->{steps} } && $h->{steps}[0][0] eq 'send') {
        $h->{q}[0][1] .= join '', map { $_->[1] } @{ shift(@{ $h->{steps} })->[1] };
    }
    $h->{next_due} = time;
    $h->{phase} = 'handshake';
}

sub h_disconnect {
    my $h = shift;
    return unless $h->{sock};
    setsockopt($h->{sock}, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0)) if $h->{rst};
    close $h->{sock};
    delete $h->{sock};
}

sub h_write {
    my $h = shift;
    while (@{ $h->{q} } && $h->{sock} && time >= $h->{next_due}) {
        my $c = $h->{q}[0];
        my $n = syswrite($h->{sock}, $c->[1]);
        if (!defined $n) {
            return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
            $h->{write_error} = "$!";    # the server has gone: still read its close
            $h->{q} = [];
            return;
        }
        substr($c->[1], 0, $n, '');
        last if length $c->[1];
        shift @{ $h->{q} };
        $h->{next_due} = time + ($h->{q}[0] ? $h->{q}[0][0] : 0);
    }
}

# The plan's next step once what was queued has been written.
sub h_advance {
    my $h = shift;
    return if @{ $h->{q} } || $h->{phase} ne 'run';
    while (my $s = $h->{steps}[0]) {
        if ($s->[0] eq 'send') {
            shift @{ $h->{steps} };
            $h->{q} = [map { [@$_] } @{ $s->[1] }];
            $h->{next_due} = time + ($h->{q}[0] ? $h->{q}[0][0] : 0);
            return;
        }
        $h->{echo_deadline} //= time + 8;
        if (@{ $h->{echoes} }) {
            my $got = shift @{ $h->{echoes} };
            if ($got ne $s->[1]) {
                h_fail($h, 'its message came back as ' . substr($got, 0, 60) . ' instead of '
                           . substr($s->[1], 0, 60));
                $h->{steps} = [];
                last;
            }
            shift @{ $h->{steps} };
            delete $h->{echo_deadline};
            next;
        }
        return if time < $h->{echo_deadline};
        h_fail($h, 'its message did not come back within 8s: ' . substr($s->[1], 0, 60));
        $h->{steps} = [];
    }
    my ($end, $code) = @{ $h->{end} };
    if ($end eq 'drop') {
        h_disconnect($h);
        $h->{phase} = 'done';
    } elsif ($end eq 'idle') {
        $h->{phase} = 'idle';
    } else {
        $h->{q} = [[0, frame(opcode => 8, payload => pack('n', $code))]] if $end eq 'close';
        $h->{next_due} = time;
        $h->{phase} = 'await';
        $h->{await_deadline} = time + 8;
    }
}

sub h_frames {
    my $h = shift;
    while (my $f = WSClient::parse_frame(\$h->{rbuf})) {
        my $op = $f->{opcode};
        if ($op == 8) {
            $h->{got_close} //= $f->{close_code} // 1005;
            # Nothing more is sent after the server's close.
            @$h{qw(q steps)} = ([], []);
            $h->{phase} = 'await' if $h->{phase} ne 'done';
            $h->{await_deadline} //= time + 8;
            next;
        }
        if ($op == 10) { push @{ $h->{pongs} }, $f->{payload}; next }
        next if $op == 9;
        my $payload = $f->{payload};
        if ($f->{rsv} & 4) {
            if (!$h->{agreed}) { h_fail($h, 'got an RSV1 frame without the extension'); next }
            $payload = WSClient::inflate_payload($payload, $h->{window});
            if (!defined $payload) { h_fail($h, 'got an RSV1 frame that does not inflate'); next }
        }
        my $ev = eval { $JSON->decode($payload) } or next;
        push @{ $h->{echoes} }, $ev->{text}
            if ($ev->{type} // '') eq 'message' && ($ev->{user} // '') eq $h->{nick};
    }
}

sub h_read {
    my $h = shift;
    my $n = sysread($h->{sock}, $h->{rbuf}, 262144, length $h->{rbuf});
    if (!defined $n) {
        return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        $h->{read_error} = "$!";
    }
    if (!$n) {
        $h->{eof} = 1;
        h_disconnect($h);
    }
    if ($h->{phase} eq 'handshake') {
        my $i = index($h->{rbuf}, "\r\n\r\n");
        if ($i < 0) {
            if ($h->{eof}) { h_fail($h, 'no handshake response'); $h->{phase} = 'done' }
            return;
        }
        my ($status, $hdr) = WSClient::_parse_head(substr($h->{rbuf}, 0, $i + 4, ''));
        if (($status // 0) != 101) {
            h_fail($h, 'handshake answered ' . ($status // 'nothing') . ' instead of 101');
            h_disconnect($h);
            $h->{phase} = 'done';
            return;
        }
        my $ext = $hdr->{'sec-websocket-extensions'};
        h_fail($h, 'Sec-WebSocket-Extensions ' . ($ext // 'absent') . ' instead of '
                   . ($h->{response} // 'absent'))
            unless ($ext // '') eq ($h->{response} // '');
        $h->{phase} = 'run';
    }
    h_frames($h);
    $h->{phase} = 'done' if $h->{eof};
}

# ---------------------------------------------------------------- the soak

my %rss0 = map { $_ => proc_rss_kb($_) } @workers;
my $t0 = time;
$_->{next} = $t0 + rand 0.3 for @W;
$_->{phase} = 'pending' for @H;

# One pass of the loop: start, write, read, and move plans on.
sub tick {
    my ($chatting) = @_;
    my $now = time;
    for my $h (@H) {
        h_start($h) if $h->{phase} eq 'pending' && $now >= $t0 + $h->{start};
    }
    if ($chatting) {
        wb_send($_) for grep { @{ $_->{plan} } && time >= $_->{next} } @W;
    }
    my (%of, $wait);
    $wait = 0.01;
    for my $h (grep { $_->{sock} } @H) {
        h_write($h);
        h_advance($h) if $h->{phase} eq 'run';
        if ($h->{phase} eq 'await' && time > $h->{await_deadline}) {
            h_disconnect($h);
            $h->{phase} = 'done';
        }
        next unless $h->{sock};
        $of{ fileno $h->{sock} } = [h => $h];
        if (@{ $h->{q} }) {
            my $d = $h->{next_due} - time;
            $wait = $d if $d < $wait;
        }
    }
    for my $w (grep { $_->{c}->socket && !$_->{c}->eof } @W) {
        $of{ fileno $w->{c}->socket } = [w => $w];
        my $d = $w->{next} - time;
        $wait = $d if $chatting && @{ $w->{plan} } && $d < $wait;
    }
    $wait = 0 if $wait < 0;
    my $sel = IO::Select->new(map { $_->[0] eq 'h' ? $_->[1]{sock} : $_->[1]{c}->socket } values %of);
    for my $s ($sel->can_read($wait)) {
        my ($what, $x) = @{ $of{ fileno $s } };
        $what eq 'h' ? h_read($x) : wb_read($x);
    }
}

tick(1) while time < $t0 + $SOAK;
note(sprintf 'soak: %.1fs; well-behaved sent %s', time - $t0,
     join(', ', map { "$_->{nick} " . scalar @{ $_->{sent} } } @W));

# The idle ones stayed open the whole time; now they leave.
for my $h (grep { $_->{phase} eq 'idle' } @H) {
    $h->{stayed_open} = 1;
    h_disconnect($h);
    $h->{phase} = 'done';
}

# Drain: the hostile clients' last closes and every well-behaved message.
my $all_in = sub {
    for my $w (@W) {
        for my $s (grep { $_->{room} eq $w->{room} } @W) {
            return 0 if @{ $w->{got}{ $s->{nick} } // [] } < @{ $s->{sent} };
        }
    }
    return 1;
};
my $drain_until = time + 12;
while (time < $drain_until) {
    tick(0);
    last if $all_in->() && !grep { $_->{phase} ne 'done' } @H;
}
for my $h (grep { $_->{phase} ne 'done' } @H) {
    h_disconnect($h);
    $h->{phase} = 'done';
}

# ---------------------------------------------------------------- verdicts

is(scalar(grep { $_->{started} } @H), $HOSTILE, "all $HOSTILE hostile clients were started");

sub expected_text {
    my $h = shift;
    my ($end, $code) = @{ $h->{end} };
    return 'cut off mid-stream' if $h->{cut};
    return $end eq 'expect' ? "close $code" : $end eq 'close' ? "its own close $code echoed"
         : $end eq 'idle' ? 'left open' : 'disconnected';
}

my %bad_of_kind;
for my $h (@H) {
    my @why = @{ $h->{fail} // [] };
    my ($end, $code) = @{ $h->{end} };
    if ($end eq 'expect' || $end eq 'close') {
        if (!defined $h->{got_close}) {
            push @why, $h->{eof} ? 'TCP closed without a close frame'
                               : 'no close frame within 8s of its last write';
            push @why, "its write failed: $h->{write_error}" if $h->{write_error};
            push @why, "its read failed: $h->{read_error}" if $h->{read_error};
        } elsif ($h->{got_close} != $code) {
            push @why, "close $h->{got_close}";
        } elsif (!$h->{eof}) {
            push @why, 'no TCP close after the close frame';
        }
    } elsif ($end eq 'idle') {
        push @why, 'closed during the soak' . (defined $h->{got_close} ? " with $h->{got_close}" : '')
            unless $h->{stayed_open};
    }
    my @pongs = @{ $h->{pongs} // [] };
    for my $p (@{ $h->{pings} }) {
        shift @pongs while @pongs && $pongs[0] ne $p;
        if (!@pongs) { push @why, "no pong for ping '$p'"; last }
        shift @pongs;
    }
    next unless @why;
    push @{ $bad_of_kind{ $h->{kind} } }, sprintf 'h%d (%s%s, %s, room %s): expected %s; %s',
        $h->{i}, $h->{kind}, $h->{what} ? ": $h->{what}" : '', $h->{mode}, $h->{room},
        expected_text($h), join('; ', @why);
}
for my $k (@KINDS) {
    my @of = grep { $_->{kind} eq $k } @H;
    my $bad = $bad_of_kind{$k} // [];
    ok(!@$bad, sprintf '%s: %d clients, each got what it should (%s)', $k, scalar @of,
       join(', ', map { expected_text($_) } @of))
        or diag(join "\n", "seed $seed", @$bad);
}

my %forbidden;
for my $h (@H) { $forbidden{$_} = $h for @{ $h->{forbidden} } }
my @leaked;
for my $w (@W) {
    for my $t (@{ $w->{all_texts} // [] }) {
        while ($t =~ /(FORBIDDEN-\d+-\d+)/g) {
            my $h = $forbidden{$1} or next;
            push @leaked, "$w->{nick} got '" . substr($t, 0, 50) . "' from h$h->{i} ($h->{kind}"
                        . ($h->{what} ? ": $h->{what}" : '') . ", $h->{mode})";
        }
    }
}
ok(!@leaked, 'nothing sent after a violation, inside a bad message or never finished reached anyone')
    or diag(join "\n", "seed $seed", @leaked);

# The well-behaved.
for my $w (@W) {
    my @why;
    push @why, "closed: $w->{closed}" if $w->{closed};
    push @why, @{ $w->{bad} }[0 .. ($#{ $w->{bad} } < 4 ? $#{ $w->{bad} } : 4)] if @{ $w->{bad} };
    for my $s (grep { $_->{room} eq $w->{room} } @W) {
        my ($sent, $got) = ($s->{sent}, $w->{got}{ $s->{nick} } // []);
        next if "@$sent" eq "@$got" && @$sent == @$got;
        my $i = 0;
        $i++ while $i < @$sent && $i < @$got && $sent->[$i] eq $got->[$i];
        push @why, sprintf 'from %s: sent %d, got %d; first difference at #%d: sent %s, got %s',
            $s->{nick}, scalar @$sent, scalar @$got, $i + 1,
            map { defined $_ ? "'" . substr($_, 0, 50) . "'" : 'nothing' } $sent->[$i], $got->[$i];
    }
    ok(!@why, sprintf '%s (%s): never closed; got all %s of its room, exactly once, in order, exact text',
       $w->{nick}, $w->{deflate} ? 'deflate' : 'plain',
       join(' + ', map { scalar @{ $_->{sent} } } grep { $_->{room} eq $w->{room} } @W))
        or diag(join "\n", "seed $seed", @why);
}

is_deeply([sort { $a <=> $b } $nginx->worker_pids], \@workers,
          'the same two workers are still running: none crashed');

my $st;
ok(wait_until(sub { $st = status_json(); $st && $st->{connections} == @W }, 10, 0.2),
   'status: connections back to the ' . scalar(@W) . ' well-behaved')
    or diag('status connections: ' . ($st ? $st->{connections} : 'no answer'));

for my $pid (@workers) {
    my $r1 = proc_rss_kb($pid);
    note("worker $pid RSS: $rss0{$pid} kB before the soak, $r1 kB after");
    cmp_ok($r1 - $rss0{$pid}, '<', 4096, "worker $pid: RSS after the soak within 4 MB of before");
}

for my $w (@W) {
    $w->{c}->send_close(1000);
    my $f = $w->{c}->recv_close(5);
    is($f && $f->{close_code}, 1000, "$w->{nick} closes normally at the end");
}

$nginx->stop;
$redis->stop;
done_testing;
