# permessage-deflate (RFC 7692) with websocket_chat_deflate:
# (1) negotiation: for each offer (accepted, declined, several in one header
#     or in several headers) the exact Sec-WebSocket-Extensions of the 101,
#     or none, and the session works either way; never with the directive
#     absent (the default) or off; a bad value is refused by nginx -t;
# (2) one worker: two deflate members get byte-identical compressed frames
#     (compressed once, no context per connection);
# (3) the RFC 7692 7.2.3 example payloads (and a BFINAL block without the
#     RFC's extra octet) are accepted;
# (4) errors, another member chatting on after each: invalid deflate data
#     1007; a deflate bomb 1009 without the worker's peak memory growing by
#     MBs; the limit counts inflated bytes (64k passes, 64k + 1 is 1009);
#     RSV1 on a continuation or a control frame, RSV2, RSV3, RSV1 without
#     the extension: 1002;
# (5) history: a deflate joiner's history event is compressed and valid;
# (6) two workers (reuseport), deflate and plain members of one room on
#     both: compressed messages (short, long, UTF-8, three fragments with a
#     ping in between) and an uncompressed one from a deflate client reach
#     everyone with the exact text; deflate members get RSV1 frames for
#     events of 64 bytes and more that deflate shrinks, plain members never
#     an RSV1 frame; server_max_window_bits=9 is kept to (its frames inflate
#     with a 512-byte window, a 15-bit member's frames of the same message
#     need more);
# (7) memory: worker RSS per idle session, deflate vs plain, just joined and
#     after one message each (noted; deflate may cost at most 512 bytes
#     more: it keeps no zlib state between messages).
#
# Frames are checked on the client with a fresh raw inflater per message
# (no context takeover). Whether a sender kept to a window is checked with
# WSClient's own decoder (inflate_payload(..., window_only => 1)): zlib
# accepts any distance back into what one call has written.
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use Encode qw(encode_utf8);
use ChatTest;
use WSClient;
use ChatFault;

my $AGREED = 'permessage-deflate; server_no_context_takeover; client_no_context_takeover';

# ---------------------------------------------------------------- helpers

# Expect a close frame with $code (and $reason), then the TCP close.
sub closed_with {
    my ($c, $code, $name, $reason) = @_;
    my $f = $c->recv_close(5);
    is($f && $f->{close_code}, $code, "$name -> close code $code")
        or diag($f ? 'close payload: ' . unpack('H*', $f->{payload})
                   : $c->eof ? 'TCP closed without a close frame' : 'no close frame in time');
    is($f && $f->{close_reason}, $reason, "$name: reason '$reason'") if defined $reason;
    ok($c->is_closed_by_server(5), "$name: server closes the TCP connection");
}

# Every event $c received arrived as the extension requires: no RSV1 frame
# without it; with it, compressed frames inflate (within the agreed window)
# and are 64 bytes or more, and an event of 64 bytes or more that deflate
# shrinks clearly (by 10%, so that zlib versions cannot disagree) came
# compressed.
sub check_frames {
    my ($c, $name) = @_;
    my @ev = $c->events;
    my ($n, @bad) = (0);
    for my $e (@ev) {
        my $raw = $e->{_raw};
        my $len = length($raw // '');
        if (!$c->deflate_agreed) {
            push @bad, "$e->{type}: RSV1 frame without the extension" if $e->{_compressed};
            next;
        }
        if ($e->{_compressed}) {
            $n++;
            if (!defined $raw || $e->{type} =~ /^_/) {
                push @bad, "$e->{type}: compressed frame that is no JSON event ("
                         . ($e->{error} // '') . ')';
                next;
            }
            push @bad, "$e->{type} ($len bytes): compressed though under 64 bytes" if $len < 64;
            my $w = WSClient::inflate_payload($e->{_wire}, $c->deflate_window, window_only => 1);
            push @bad, "$e->{type}: does not inflate within a window of 2^" . $c->deflate_window
                unless defined $w && $w eq $raw;
        } elsif ($len >= 64) {
            my $mine = length WSClient::deflate_payload($raw, $c->deflate_window);
            push @bad, "$e->{type} ($len bytes, deflates to $mine): sent uncompressed"
                if $mine < 0.9 * $len;
        }
    }
    ok(!@bad, "$name: every frame as the extension requires (" . scalar(@ev)
              . " events, $n compressed)") or diag(join "\n", @bad);
}

# VmHWM (peak RSS) or VmRSS of a process, in kB.
sub vm_kb {
    my ($pid, $field) = @_;
    open my $fh, '<', "/proc/$pid/status" or return undef;
    while (<$fh>) { return $1 if /^\Q$field\E:\s+(\d+)\s+kB/ }
    return undef;
}

my $redis = start_redis();

my $LOC = q{
        location = /%s {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            %s
        }
};

{
    my ($code, $out) = test_config(chat_config(location => 'websocket_chat_deflate yes;'),
                                   redis => $redis);
    isnt($code, 0, 'nginx -t refuses websocket_chat_deflate yes');
    like($out, qr/websocket_chat_deflate/, 'nginx -t names the directive') or diag($out);
}

my $one = start_nginx_ok('nginx starts: 1 worker, deflate on in /ws, default in /plain, off in /off',
    chat_config(workers => 1, location => 'websocket_chat_deflate on;',
                server => sprintf($LOC, 'plain', '') . sprintf($LOC, 'off', 'websocket_chat_deflate off;')),
    redis => $redis);
my $port = $one->port;

# ---------------------------------------------------------------- (1) negotiation

my @table = (
    # name, location, Sec-WebSocket-Extensions lines, expected answer (undef: none)
    ['bare offer', '/ws', ['permessage-deflate'], $AGREED],
    ["the browsers' offer", '/ws', ['permessage-deflate; client_max_window_bits'], $AGREED],
    ['both no_context_takeover offered', '/ws',
        ['permessage-deflate; server_no_context_takeover; client_no_context_takeover'], $AGREED],
    ['client_max_window_bits=10', '/ws', ['permessage-deflate; client_max_window_bits=10'], $AGREED],
    ['server_max_window_bits=9', '/ws', ['permessage-deflate; server_max_window_bits=9'],
        "$AGREED; server_max_window_bits=9"],
    ['server_max_window_bits=15', '/ws', ['permessage-deflate; server_max_window_bits=15'],
        "$AGREED; server_max_window_bits=15"],
    ['server_max_window_bits=12 with client_max_window_bits', '/ws',
        ['permessage-deflate; server_max_window_bits=12; client_max_window_bits'],
        "$AGREED; server_max_window_bits=12"],
    ['quoted server_max_window_bits="10"', '/ws', ['permessage-deflate; server_max_window_bits="10"'],
        "$AGREED; server_max_window_bits=10"],
    ['first offer declined (=8), second taken', '/ws',
        ['permessage-deflate; server_max_window_bits=8, permessage-deflate; client_max_window_bits'],
        $AGREED],
    ['first acceptable offer wins', '/ws',
        ['permessage-deflate; server_max_window_bits=10, permessage-deflate'],
        "$AGREED; server_max_window_bits=10"],
    ['other extension, then the offer in a second header', '/ws',
        ['x-webkit-deflate-frame', 'permessage-deflate'], $AGREED],
    ['server_max_window_bits=8 (zlib cannot)', '/ws', ['permessage-deflate; server_max_window_bits=8'], undef],
    ['server_max_window_bits=16', '/ws', ['permessage-deflate; server_max_window_bits=16'], undef],
    ['server_max_window_bits=010', '/ws', ['permessage-deflate; server_max_window_bits=010'], undef],
    ['server_max_window_bits without a value', '/ws', ['permessage-deflate; server_max_window_bits'], undef],
    ['client_max_window_bits=7', '/ws', ['permessage-deflate; client_max_window_bits=7'], undef],
    ['client_max_window_bits=16', '/ws', ['permessage-deflate; client_max_window_bits=16'], undef],
    ['server_no_context_takeover=1', '/ws', ['permessage-deflate; server_no_context_takeover=1'], undef],
    ['repeated parameter', '/ws',
        ['permessage-deflate; server_no_context_takeover; server_no_context_takeover'], undef],
    ['unknown parameter', '/ws', ['permessage-deflate; unknown_param'], undef],
    ['another extension only', '/ws', ['x-webkit-deflate-frame'], undef],
    ['every offer declined', '/ws',
        ['permessage-deflate; server_max_window_bits=8, permessage-deflate; foo=1', 'x-other'], undef],
    ['no offer', '/ws', [], undef],
    ["browsers' offer, directive absent (default off)", '/plain',
        ['permessage-deflate; client_max_window_bits'], undef],
    ["browsers' offer, websocket_chat_deflate off", '/off',
        ['permessage-deflate; client_max_window_bits'], undef],
);

my $i = 0;
for my $row (@table) {
    my ($name, $loc, $offers, $want) = @$row;
    my $nick = 'n' . ++$i;
    my $c = eval { WSClient->join(port => $port, room => 'neg', nick => $nick, location => $loc,
                                  extensions => $offers) };
    ok($c, "$name: 101 and welcome") or do { diag($@); next };
    is($c->extensions, $want, "$name: Sec-WebSocket-Extensions " . ($want // 'absent'));
    is($c->deflate_agreed ? 1 : 0, defined $want ? 1 : 0, "$name: client in the agreed mode");
    my $text = "round trip $i: " . ('some compressible words ' x 6);
    $c->deflate_agreed ? $c->send_compressed($text) : $c->send_text($text);
    ok($c->wait_type('message', 5, sub { $_[0]{user} eq $nick && $_[0]{text} eq $text }),
       "$name: a message round-trips (" . ($c->deflate_agreed ? 'compressed' : 'plain') . ')');
    check_frames($c, $name);
    $c->send_close(1000);
}

# ---------------------------------------------------------------- (2) shared frames, one worker

{
    my $s1 = WSClient->join(port => $port, room => 'share', nick => 's1', deflate => 1);
    my $s2 = WSClient->join(port => $port, room => 'share', nick => 's2', deflate => 1);
    my $p  = WSClient->join(port => $port, room => 'share', nick => 'p');
    my $text = 'shared: ' . join(' ', map { "word$_" } 1 .. 80);
    $p->send_text($text);
    my @got = map { $_->wait_type('message', 5, sub { $_[0]{text} eq $text }) } $s1, $s2;
    ok($got[0] && $got[1], 'both deflate members receive the message');
    ok($got[0] && $got[0]{_compressed} && $got[1] && $got[1]{_compressed},
       'both as compressed frames');
    is($got[0] && $got[0]{id}, $got[1] && $got[1]{id}, 'the same event (id)');
    ok($got[0] && $got[1] && defined $got[0]{_wire} && $got[0]{_wire} eq $got[1]{_wire},
       'byte-identical compressed payloads (no per-connection context)');
    check_frames($_, 'shared-frame member') for $s1, $s2;
    $_->send_close(1000) for $s1, $s2, $p;
}

# ---------------------------------------------------------------- (3) RFC 7692 7.2.3 examples

{
    my $w = WSClient->join(port => $port, room => 'rfc', nick => 'rfcw');
    my @examples = (
        ['7.2.3.1 "Hello" in one frame', ['f248cdc9c90700']],
        ['7.2.3.1 "Hello" in two fragments', ['f248cd', 'c9c90700']],
        ['7.2.3.3 a stored (uncompressed) block', ['000500faff48656c6c6f00']],
        ['7.2.3.4 a block with BFINAL set (and the octet 00 after it)', ['f348cdc9c9070000']],
        ['a block with BFINAL set, nothing after it', ['f348cdc9c90700']],
        ['7.2.3.5 two blocks', ['f24805000000ffffcac9c90700']],
    );
    my $k = 0;
    for my $ex (@examples) {
        my ($name, $parts) = @$ex;
        my $nick = 'rfc' . $k++;
        my $c = WSClient->join(port => $port, room => 'rfc', nick => $nick, deflate => 1);
        for my $j (0 .. $#$parts) {
            $c->send_frame(opcode => $j ? 0 : 1, rsv => $j ? 0 : 4, fin => $j == $#$parts ? 1 : 0,
                           payload => pack('H*', $parts->[$j]));
        }
        my $m = $w->wait_type('message', 5, sub { $_[0]{user} eq $nick });
        is($m && $m->{text}, 'Hello', "RFC 7692 $name: another member receives \"Hello\"")
            or do {
                my $f = $c->recv_close(1);
                diag($f ? "sender closed with $f->{close_code} $f->{close_reason}" : 'sender not closed');
            };
        $c->send_close(1000);
    }
    $w->send_close(1000);
}

# ---------------------------------------------------------------- (4) errors

{
    my $watcher  = WSClient->join(port => $port, room => 'err', nick => 'watcher', deflate => 1);
    my $listener = WSClient->join(port => $port, room => 'err', nick => 'listener');
    my $round = 0;
    my $still_chatting = sub {
        my $name = shift;
        my $text = "still chatting after $name " . ('.' x 60) . $round++;
        $watcher->send_compressed($text);
        my @got = grep { $_->wait_type('message', 5, sub { $_[0]{user} eq 'watcher' && $_[0]{text} eq $text }) }
                  $watcher, $listener;
        is(scalar(@got), 2, "after $name: the room's other members chat on");
    };

    my $hello = pack 'H*', 'f248cdc9c90700';
    my @cases = (
        ['invalid deflate data (RSV1)', 1007, { deflate => 1 },
            [{ opcode => 1, rsv => 4, payload => "\xff\xff\xff\xff not deflate" }], 'invalid compressed data'],
        ['RSV1 on a continuation of a plain message', 1002, { deflate => 1 },
            [{ opcode => 1, fin => 0, payload => 'abc' }, { opcode => 0, rsv => 4, payload => 'def' }]],
        ['RSV1 on a continuation of a compressed message', 1002, { deflate => 1 },
            [{ opcode => 1, rsv => 4, fin => 0, payload => substr($hello, 0, 3) },
             { opcode => 0, rsv => 4, payload => substr($hello, 3) }]],
        ['RSV1 on a ping', 1002, { deflate => 1 }, [{ opcode => 9, rsv => 4, payload => 'p' }]],
        ['RSV1 on a pong', 1002, { deflate => 1 }, [{ opcode => 10, rsv => 4, payload => 'p' }]],
        ['RSV1 on a close', 1002, { deflate => 1 }, [{ opcode => 8, rsv => 4, payload => pack('n', 1000) }]],
        ['RSV2 with the extension', 1002, { deflate => 1 }, [{ opcode => 1, rsv => 2, payload => 'hi' }]],
        ['RSV3 with the extension', 1002, { deflate => 1 }, [{ opcode => 1, rsv => 1, payload => 'hi' }]],
        ['RSV1+RSV2 with the extension', 1002, { deflate => 1 }, [{ opcode => 1, rsv => 6, payload => $hello }]],
        ['RSV1 without an offer', 1002, {}, [{ opcode => 1, rsv => 4, payload => $hello }]],
        ['RSV1 after a declined offer', 1002, { extensions => ['permessage-deflate; server_max_window_bits=8'] },
            [{ opcode => 1, rsv => 4, payload => $hello }]],
        ['RSV1 with websocket_chat_deflate off', 1002, { deflate => 1, location => '/off' },
            [{ opcode => 1, rsv => 4, payload => $hello }]],
    );
    my $k = 0;
    for my $case (@cases) {
        my ($name, $code, $opts, $frames, $reason) = @$case;
        my $c = WSClient->join(port => $port, room => 'err', nick => 'bad' . $k++, %$opts);
        $c->send_frame(%$_) for @$frames;
        closed_with($c, $code, $name, $reason);
        $still_chatting->($name);
    }

    # The limit is on what a message inflates to.
    my $exact = WSClient->join(port => $port, room => 'err', nick => 'exact', deflate => 1);
    $exact->send_compressed('x' x 65536);
    my $m = $listener->wait_type('message', 10, sub { $_[0]{user} eq 'exact' });
    is($m && length($m->{text}), 65536, 'a compressed message inflating to exactly 64k passes');
    ok(!$exact->got_close, '64k: sender not closed');
    $exact->send_close(1000);

    my $over = WSClient->join(port => $port, room => 'err', nick => 'over', deflate => 1);
    $over->send_compressed('y' x 65537);
    closed_with($over, 1009, 'a compressed message inflating to 64k + 1');
    $still_chatting->('64k + 1');

    # A bomb: 16 MB of one letter compresses to some 16 KB, well under the
    # limit on the wire. Peak RSS shows whether it was inflated whole.
    my ($pid) = $one->worker_pids;
    my $bomb_plain = 'z' x (16 * 1024 * 1024);
    my $bomb = WSClient::deflate_payload($bomb_plain);
    undef $bomb_plain;
    note(sprintf 'bomb: 16 MB compressed to %d bytes', length $bomb);
    my ($hwm0, $rss0) = (vm_kb($pid, 'VmHWM'), vm_kb($pid, 'VmRSS'));
    my $b = WSClient->join(port => $port, room => 'err', nick => 'bomb', deflate => 1);
    $b->send_frame(opcode => 1, rsv => 4, payload => $bomb);
    closed_with($b, 1009, 'deflate bomb (16 MB in 16 KB)');
    my ($hwm1, $rss1) = (vm_kb($pid, 'VmHWM'), vm_kb($pid, 'VmRSS'));
    note("worker $pid around the bomb: peak RSS $hwm0 -> $hwm1 kB, RSS $rss0 -> $rss1 kB");
    cmp_ok($hwm1 - $hwm0, '<', 4096, "the bomb raised the worker's peak RSS by under 4 MB");
    $still_chatting->('the bomb');

    check_frames($watcher, 'error-case watcher (deflate)');
    check_frames($listener, 'error-case listener (plain)');
    $_->send_close(1000) for $watcher, $listener;
}

# ---------------------------------------------------------------- (5) history

{
    my $p = WSClient->join(port => $port, room => 'hist', nick => 'teller');
    my @texts = map { "history line $_: " . ('told before you came ' x 4) } 1 .. 3;
    for my $t (@texts) {
        $p->send_text($t);
        ok($p->wait_type('message', 5, sub { $_[0]{text} eq $t }), "history message sent: " . substr($t, 0, 14));
    }
    my $d = WSClient->join(port => $port, room => 'hist', nick => 'late', deflate => 1);
    my $h = $d->wait_type('history', 5);
    ok($h, 'a deflate joiner gets a history event');
    ok($h && $h->{_compressed}, 'as a compressed frame');
    is_deeply([map { $_->{text} } @{ $h && $h->{messages} || [] }], \@texts,
              'its messages: the three texts, in order');
    my $q = WSClient->join(port => $port, room => 'hist', nick => 'late-plain');
    my $hq = $q->wait_type('history', 5);
    ok($hq && !$hq->{_compressed}, 'a plain joiner gets it uncompressed');
    is_deeply([map { $_->{text} } @{ $hq && $hq->{messages} || [] }], \@texts, 'with the same texts');
    check_frames($_, 'history joiner') for $d, $q;
    $_->send_close(1000) for $p, $d, $q;
}

# ---------------------------------------------------------------- (6) two workers

my $two = start_nginx_ok('nginx starts: 2 workers, reuseport, websocket_chat_deflate on',
    chat_config(workers => 2, listen => 'reuseport', location => 'websocket_chat_deflate on;'),
    redis => $redis, workers => 2);
{
    my @workers = sort { $a <=> $b } $two->worker_pids;
    is(scalar(@workers), 2, 'two workers running');

    # Alternate deflate and plain members until each worker has both kinds.
    my (@m, %has);
    my $t0 = time;
    while (@m < 40 && time - $t0 < 15) {
        my $deflate = @m % 2 == 0;
        my $nick = ($deflate ? 'd' : 'p') . scalar(@m);
        push @m, { nick => $nick, deflate => $deflate,
                   c => WSClient->join(port => $two->port, room => 'both', nick => $nick,
                                       deflate => $deflate) };
        my @owner = client_workers($two, [map { $_->{c} } @m], @workers);
        %has = ();
        $has{ ($owner[$_] // '') . '/' . ($m[$_]{deflate} ? 'd' : 'p') } = 1 for 0 .. $#m;
        last if 4 == grep { $has{$_} } map { ("$_/d", "$_/p") } @workers;
    }
    is(scalar(grep { $has{$_} } map { ("$_/d", "$_/p") } @workers), 4,
       'deflate and plain members on both workers (' . scalar(@m) . ' members)')
        or diag(join ', ', sort keys %has);
    push @m, { nick => 'w9', deflate => 1,
               c => WSClient->join(port => $two->port, room => 'both', nick => 'w9',
                                   extensions => ['permessage-deflate; server_max_window_bits=9']) };
    is($m[-1]{c}->deflate_window, 9, 'w9 agreed to server_max_window_bits=9');
    my $sender = $m[0]{c};
    my $from = $m[0]{nick};
    ok($sender->deflate_agreed, "sender $from agreed to permessage-deflate");

    my $deadline;
    my $everyone_gets = sub {
        my ($text, $name, $must_compress) = @_;
        $deadline = time + 10;
        my (@missing, @plain, @rsv1);
        for my $x (@m) {
            my $ev = $x->{c}->wait_type('message', 0.2 + ($deadline > time ? $deadline - time : 0),
                sub { $_[0]{user} eq $from && $_[0]{text} eq $text });
            $x->{ev} = $ev;
            if (!$ev) { push @missing, $x->{nick}; next }
            push @rsv1, $x->{nick} if !$x->{deflate} && $ev->{_compressed};
            push @plain, $x->{nick} if $x->{deflate} && $must_compress && !$ev->{_compressed};
        }
        is(scalar(@missing), 0, "$name: all " . scalar(@m) . ' members receive the exact text')
            or diag("missing: @missing");
        is(scalar(@rsv1), 0, "$name: plain members get it uncompressed") or diag("RSV1 to: @rsv1");
        is(scalar(@plain), 0, "$name: deflate members get it compressed") or diag("plain to: @plain")
            if $must_compress;
    };

    $sender->send_compressed('hi');
    $everyone_gets->('hi', 'short compressed message', 0);

    my $long = 'The quick brown fox jumps over the lazy dog. ' x 50;
    $sender->send_compressed($long);
    $everyone_gets->($long, 'long compressed message (2250 bytes)', 1);

    my $utf8 = "héllo wörld — ✓ 日本語のテキスト 🎉 " x 20;
    $sender->send_compressed($utf8);
    $everyone_gets->($utf8, 'compressed UTF-8 multibyte message', 1);

    my $frag = 'fragmented: ' . join(' ', map { sprintf 'w%03d', ($_ * 37) % 101 } 1 .. 150);
    my $cz = WSClient::deflate_payload(encode_utf8($frag));
    my $third = int(length($cz) / 3);
    $sender->send_frame(opcode => 1, rsv => 4, fin => 0, payload => substr($cz, 0, $third));
    $sender->send_ping('mid-message');
    $sender->send_frame(opcode => 0, fin => 0, payload => substr($cz, $third, $third));
    $sender->send_frame(opcode => 0, fin => 1, payload => substr($cz, 2 * $third));
    $everyone_gets->($frag, 'compressed message in 3 fragments, a ping between', 1);
    # the pong goes out at once, the message only after a trip through Redis
    ok(grep({ $_ eq 'mid-message' } $sender->pongs), 'the ping between fragments was answered');

    my $plain = 'uncompressed from a deflate client ' x 4;
    $sender->send_text($plain);
    $everyone_gets->($plain, 'uncompressed (RSV1 clear) message from a deflate client', 1);

    # 700 letters twice: a 15-bit window reaches the first copy from the
    # second, a 9-bit one (512 bytes) cannot.
    srand(7);
    my $block = join '', map { chr(97 + int rand 26) } 1 .. 700;
    ok(!defined WSClient::inflate_payload(WSClient::deflate_payload("$block$block", 15), 9, window_only => 1)
       && WSClient::inflate_payload(WSClient::deflate_payload("$block$block", 9), 9, window_only => 1)
          eq "$block$block",
       'self-check: the 9-bit window check refuses a 15-bit stream of the text and takes a 9-bit one');
    $sender->send_compressed("$block$block");
    $everyone_gets->("$block$block", 'message repeating 700 letters', 1);
    my ($w9) = grep { $_->{nick} eq 'w9' } @m;
    my ($w15) = grep { $_->{deflate} && $_->{nick} ne 'w9' && $_->{ev} } @m;
    ok($w9->{ev} && $w9->{ev}{_compressed}, 'w9 gets it compressed');
    ok($w9->{ev} && defined WSClient::inflate_payload($w9->{ev}{_wire}, 9, window_only => 1),
       "w9's frame inflates with a 512-byte window (server_max_window_bits=9 kept)");
    my $back15 = $w15 && WSClient::inflate_payload($w15->{ev}{_wire}, 9, window_only => 1);
    ok($w15 && !(defined $back15 && $back15 eq $w15->{ev}{_raw}),
       ($w15 ? $w15->{nick} : 'a deflate member') . "'s (15-bit) frame of it does not: the window check can tell");
    ok($w15 && $w9->{ev} && length($w9->{ev}{_wire}) > length($w15->{ev}{_wire}),
       'the 9-bit frame is the larger one');

    check_frames($_->{c}, "member $_->{nick}" . ($_->{deflate} ? ' (deflate)' : ' (plain)')) for @m;
    $_->{c}->send_close(1000) for @m;
}

# ---------------------------------------------------------------- (7) memory

# One nginx per kind, so that both go through the same growth of the
# worker's tables: $WARM sessions first (they also make the worker's zlib
# streams), then $N more, each in its own room (no fan-out), with presence
# and history off. Returns bytes per session just joined and the further
# bytes per session after each sent one 2 KB message and got it back.
my $WARM = 20;
my $N    = 500;
sub memory_run {
    my $deflate = shift;
    my $kind = $deflate ? 'deflate' : 'plain';
    my $n = start_nginx_ok("memory ($kind sessions): nginx starts",
        chat_config(workers => 1, worker_connections => 2048,
                    http => "websocket_chat_deflate on;\n    websocket_chat_presence off;\n"
                          . "    websocket_chat_history off;"),
        redis => $redis);
    my ($pid) = $n->worker_pids;
    my $text = join ' ', map { "idle-session-word-$_" } 1 .. 100;
    my @c;
    my $t0 = time;
    my $join = sub {
        my $i = @c;
        push @c, WSClient->join(port => $n->port, room => "mem$i", nick => "m$i", deflate => $deflate);
    };
    my $talk = sub {
        my $i = shift;
        $deflate ? $c[$i]->send_compressed($text) : $c[$i]->send_text($text);
        return $c[$i]->wait_type('message', 5, sub { $_[0]{text} eq $text });
    };
    for (1 .. $WARM) { $join->(); $talk->($#c) }
    my $r0 = proc_rss_kb($pid);
    $join->() while @c < $WARM + $N && time - $t0 < 20;
    my $r1 = proc_rss_kb($pid);
    is(scalar(@c), $WARM + $N, "memory ($kind): $N more sessions joined");
    is(scalar(grep { ($_->deflate_agreed ? 1 : 0) == ($deflate ? 1 : 0) } @c), scalar(@c),
       "memory ($kind): every session " . ($deflate ? 'agreed to' : 'without') . ' permessage-deflate');
    my $talked = grep { time - $t0 < 40 && $talk->($_) } $WARM .. $#c;
    my $r2 = proc_rss_kb($pid);
    is($talked, $N, "memory ($kind): each sent a 2 KB message and got it back");
    note(sprintf 'memory (%s): worker RSS %d kB with %d sessions, %d kB with %d, %d kB after a message each (%.1fs)',
         $kind, $r0, $WARM, $r1, scalar(@c), $r2, time - $t0);
    $_->send_close(1000) for @c;
    $n->stop;
    return (($r1 - $r0) * 1024 / $N, ($r2 - $r1) * 1024 / $N);
}

my @plain   = memory_run(0);
my @deflate = memory_run(1);
note(sprintf 'per idle session: plain %.0f bytes, deflate %.0f bytes (just joined); '
           . 'after one 2 KB message: plain +%.0f, deflate +%.0f bytes', $plain[0], $deflate[0], $plain[1], $deflate[1]);
cmp_ok($deflate[0] - $plain[0], '<=', 512,
       'an idle deflate session (just joined) costs at most 512 bytes more than a plain one');
cmp_ok($deflate[1] - $plain[1], '<=', 512,
       'after a message, an idle deflate session keeps at most 512 bytes more than a plain one');

done_all();
