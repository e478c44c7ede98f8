# The closing handshake survives unread input. When the server closes a
# session (1009 message too big, 1008 rate limit...) while the client is
# still sending, the client must still receive the close frame, and the
# connection must end with a FIN, not a RST: a socket closed with unread
# input makes the kernel answer with RST, which discards whatever of ours
# the client has not acknowledged yet (the close frame among it) and turns
# the client's next read or write into ECONNRESET. The server must close
# lingering, as nginx does for HTTP (lingering_close): stop writing, keep
# reading and dropping the client's bytes for a while, then close.
#
# Scenarios, each on its own connection, run at most $LANES at a time:
#   big     x5  a frame header declaring 1 MB (limit 16k), then its payload
#               streamed at ~512 KB/s for ~2 s while reading: close 1009
#               "message too big", then FIN; no ECONNRESET/EPIPE at all.
#   backlog x3  the same, but the client has SO_RCVBUF 4096, 64 KB of room
#               messages are on their way to it when it sends the header, and
#               it is busy for 0.3 s before it reads again: the messages and
#               the close frame wait in the server's socket buffer, and a RST
#               destroys them (the client then reads no close frame at all).
#   flood   x2  websocket_chat_rate 1r/s burst=1, batches of 30 small
#               messages every 20 ms: close 1008 "rate limit exceeded"
#               (after 10 refusals in a row), then FIN; the client keeps
#               sending 1 s after the close frame.
#   forever x1  (alongside all the others) declares 1 GB and keeps sending
#               after the close frame: the server must still end the
#               connection (its writes fail) within 40 s; how long it took is
#               noted. lingering_time 10s / lingering_timeout 2s are set in the
#               server block for an implementation that follows them.
#
# A client "sees a reset" when a read or a write fails with ECONNRESET or
# EPIPE, or SO_ERROR holds ECONNRESET when it is done.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Socket qw(SOL_SOCKET SO_ERROR);
use Errno qw(EAGAIN EWOULDBLOCK EINTR ECONNRESET EPIPE);
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $LANES = 3;

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with max_message 16k and a rate-limited location',
    chat_config(
        workers  => 1,
        server   => <<'EOS',
        lingering_time 10s;
        lingering_timeout 2s;
        location = /flood {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_rate 1r/s burst=1;
        }
EOS
        location => 'websocket_chat_max_message 16k;',
    ),
    redis => $redis);
my $port = $nginx->port;

# ------------------------------------------------------------------ streamer

package Streamer;

use Errno qw(EAGAIN EWOULDBLOCK EINTR ECONNRESET EPIPE);
use Socket qw(SOL_SOCKET SO_ERROR);
use Time::HiRes qw(time);

# Cutting a flooding client off is an error-level line, as nginx's limit_req is.
ChatTest::allow_errors_in_file(qr/: closing session of "flood\d" in "flood\d": 1008 rate limit exceeded, client: /);

# %o: name, client (a joined WSClient), header (bytes sent first), rate
# (payload bytes/s), total (payload bytes; undef = until the connection
# fails), chunk (bytes of one write; for 'flood' a sub returning the next
# batch), max_write (s of writing at most), after_close (s to go on writing
# after the close frame arrived; undef = regardless of it), wait_eof (s to
# wait for the end once writing stopped).
sub new {
    my ($class, %o) = @_;
    my $self = bless { %o }, $class;
    $self->{sock} = $o{client}->socket;
    $self->{sock}->blocking(0);
    $self->{buf}  = \$o{client}{buf};    # bytes already read past the welcome
    $self->{out}  = $o{header} // '';
    $self->{t0}   = time;
    $self->{made} = 0;                   # payload bytes generated so far
    $self->{msgs} = 0;                   # data frames read before the close
    $self->{after} = 0;                  # frames read after the close frame
    $self->{written} = 0;
    return $self;
}

sub sock { $_[0]{sock} }
sub finished { $_[0]{finished} }

sub _reset {
    my ($self, $where, $err) = @_;
    $self->{reset} //= { where => $where, err => "$err", t => time - $self->{t0},
                         before_close => !$self->{close} };
}

sub _stop_writing {
    my ($self, $why) = @_;
    return if $self->{write_done};
    $self->{write_done} = time;
    $self->{write_stop} = $why;
}

sub _write {
    my ($self, $now) = @_;
    return if $self->{write_done};
    my $elapsed = $now - $self->{t0};
    if ($elapsed >= $self->{max_write}) { return $self->_stop_writing('time') }
    if ($self->{close} && defined $self->{after_close}
        && $now - $self->{close}{t_abs} >= $self->{after_close}) {
        return $self->_stop_writing('after close');
    }
    my $due = $self->{rate} * $elapsed;
    $due = $self->{total} if defined $self->{total} && $due > $self->{total};
    while (length $self->{out} < 65536 && $self->{made} < $due) {
        my $piece = ref $self->{chunk} ? $self->{chunk}->() : 'a' x $self->{chunk};
        $piece = substr($piece, 0, $self->{total} - $self->{made})
            if defined $self->{total} && $self->{made} + length $piece > $self->{total};
        $self->{out} .= $piece;
        $self->{made} += length $piece;
    }
    while (length $self->{out}) {
        my $n = syswrite($self->{sock}, $self->{out});
        if (!defined $n) {
            return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
            my $err = "$!";
            $self->_reset(write => $err) if $! == ECONNRESET || $! == EPIPE;
            $self->{write_error} //= $err;
            return $self->_stop_writing("write error: $err");
        }
        $self->{written} += $n;
        substr($self->{out}, 0, $n, '');
    }
    $self->_stop_writing('all sent')
        if defined $self->{total} && $self->{made} >= $self->{total};
}

sub _read {
    my ($self, $now) = @_;
    return if $self->{eof};
    return if $self->{read_delay} && $now - $self->{t0} < $self->{read_delay};
    for (1 .. 64) {
        my $n = sysread($self->{sock}, ${ $self->{buf} }, 65536, length ${ $self->{buf} });
        if (!defined $n) {
            last if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
            my $err = "$!";
            $self->_reset(read => $err) if $! == ECONNRESET || $! == EPIPE;
            $self->{read_error} //= $err;
            $self->{eof} = $now;
            last;
        }
        if ($n == 0) { $self->{eof} = $now; $self->{fin} = 1; last }
        # frames are taken after every read, so that a close frame read
        # before an error counts as arrived before it
        $self->_frames($now);
    }
}

sub _frames {
    my ($self, $now) = @_;
    while (my $f = WSClient::parse_frame($self->{buf})) {
        if ($self->{close}) { $self->{after}++; next }
        if ($f->{opcode} == 8) {
            $self->{close} = { code => $f->{close_code}, reason => $f->{close_reason},
                               t => $now - $self->{t0}, t_abs => $now };
        } elsif ($f->{opcode} == 1) {
            $self->{msgs}++;
        }
    }
}

sub step {
    my ($self, $now) = @_;
    return if $self->{finished};
    $self->_read($now);
    $self->_write($now);
    $self->_read($now);
    my $end = 0;
    if ($self->{forever}) {
        $end = $self->{write_done};
    } elsif ($self->{write_done}) {
        $end = $self->{eof} || $now - $self->{write_done} >= $self->{wait_eof};
    }
    return unless $end;
    my $e = getsockopt($self->{sock}, SOL_SOCKET, SO_ERROR);
    my $so = defined $e ? unpack('i', $e) : 0;
    if ($so == ECONNRESET) { local $! = $so; $self->_reset(so_error => "$!") }
    $self->{finished} = $now;
    $self->{duration} = $now - $self->{t0};
}

sub summary {
    my $self = shift;
    my $c = $self->{close};
    my $r = $self->{reset};
    return sprintf('%s: wrote %d bytes (%s); %d data frames; close %s at %s; %s; %s',
        $self->{name}, $self->{written}, $self->{write_stop} // 'still writing', $self->{msgs},
        $c ? ($c->{code} // 'no code') . " \"$c->{reason}\"" : 'none',
        $c ? sprintf('%.2fs', $c->{t}) : '-',
        $self->{fin} ? sprintf('EOF after %.2fs', $self->{eof} - $self->{t0})
                     : $self->{eof} ? "read error $self->{read_error}" : 'no EOF',
        $r ? sprintf('%s on %s at %.2fs%s', $r->{err}, $r->{where}, $r->{t},
                     $r->{before_close} ? ' (before any close frame)' : '')
           : 'no reset');
}

package main;

# --------------------------------------------------------------------- driver

my @ACTIVE;

# Step every active streamer until $cond is true or $timeout passes; waits
# for readable sockets at most 4 ms at a time (the writers' pacing).
sub drive {
    my ($cond, $timeout) = @_;
    my $deadline = time + $timeout;
    while (1) {
        my $now = time;
        $_->step($now) for @ACTIVE;
        @ACTIVE = grep { !$_->finished } @ACTIVE;
        return 1 if $cond->();
        return 0 if time >= $deadline;
        my @socks = map { $_->sock } grep { !$_->{eof} } @ACTIVE;
        if (@socks) { IO::Select->new(@socks)->can_read(0.004) }
        else { select(undef, undef, undef, 0.004) }
    }
}

my $seq = 0;
sub event_json {
    my ($room, $text) = @_;
    $seq++;
    return qq({"type":"message","room":"$room","user":"redis","text":"$text","ts":)
         . now_ms() . qq(,"id":"t-$seq"});
}

my $PAYLOAD = 1024 * 1024;
my $BACKLOG = 4;    # room messages of 16 KB queued ahead of the close frame

sub big_streamer {
    my ($name, %o) = @_;
    my $room = $name;
    my $c = WSClient->join(port => $port, room => $room, nick => $name,
                           ($o{rcvbuf} ? (rcvbuf => $o{rcvbuf}) : ()));
    if ($o{backlog}) {
        # 64 KB of room messages head for the client before it misbehaves
        for my $i (1 .. $BACKLOG) {
            my $n = $redis->cmd('PUBLISH', "wschat:$room", event_json($room, "$name-$i-" . ('q' x 16000)));
            main::diag("PUBLISH to wschat:$room reached $n subscribers") unless $n == 1;
        }
        # the first of them has reached the client's socket
        IO::Select->new($c->socket)->can_read(5)
            or main::diag("$name: nothing arrived within 5s after the publishes");
    }
    my $hdr = WSClient::frame_bytes(opcode => 1, payload => '',
                                    declared_len => $o{declared} // $PAYLOAD);
    return Streamer->new(name => $name, client => $c, header => $hdr,
        rate => 512 * 1024, total => $o{forever} ? undef : $PAYLOAD, chunk => 2048,
        max_write => $o{forever} ? 45 : 2.5, after_close => undef, wait_eof => 6,
        forever => $o{forever}, read_delay => $o{read_delay});
}

sub flood_streamer {
    my $name = shift;
    my $c = WSClient->join(port => $port, room => $name, nick => $name, location => '/flood');
    my $i = 0;
    my $batch = sub {
        join '', map { WSClient::frame_bytes(opcode => 1, payload => sprintf('flood %06d ', $i++) . ('f' x 480)) } 1 .. 30;
    };
    # 30 messages of ~500 bytes every 20 ms, in one write each
    return Streamer->new(name => $name, client => $c, header => '',
        rate => 50 * length($batch->()), total => undef, chunk => $batch,
        max_write => 5, after_close => 1, wait_eof => 6);
}

# ------------------------------------------------------------------- running

my $forever = big_streamer('forever', declared => 1 << 30, forever => 1);
push @ACTIVE, $forever;

my @plan = ((map { my $n = "big$_"; sub { big_streamer($n) } } 1 .. 5),
            (map { my $n = "backlog$_"; sub { big_streamer($n, rcvbuf => 4096, backlog => 1, read_delay => 0.3) } } 1 .. 3),
            (map { my $n = "flood$_"; sub { flood_streamer($n) } } 1 .. 2));
my @done;
my $t_start = time;
while (@plan || grep { $_ != $forever } @ACTIVE) {
    while (@plan && (grep { $_ != $forever } @ACTIVE) < $LANES) {
        my $s = (shift @plan)->();
        push @ACTIVE, $s;
        push @done, $s;
    }
    my $before = grep { $_ != $forever } @ACTIVE;
    drive(sub { (grep { $_ != $forever } @ACTIVE) < $before }, 15)
        or do { diag('a scenario did not finish within 15s'); last };
}
note(sprintf 'finite scenarios done after %.1fs', time - $t_start);

for my $s (@done) {
    note($s->summary);
    my $name = $s->{name};
    my ($code, $reason) = $name =~ /^flood/ ? (1008, 'rate limit exceeded')
                                            : (1009, 'message too big');
    my $c = $s->{close};
    ok($c, "$name: received a close frame")
        or diag($s->summary);
    is($c && $c->{code}, $code, "$name: close code $code");
    is($c && $c->{reason}, $reason, "$name: close reason \"$reason\"");
    ok(!($s->{reset} && $s->{reset}{before_close}),
       "$name: no ECONNRESET/EPIPE before the close frame")
        or diag($s->summary);
    ok($s->{fin} && !$s->{reset}, "$name: the connection ended with a FIN, not a RST")
        or diag($s->summary);
    is($s->{after}, 0, "$name: nothing after the close frame");
}

# --- the client that never stops
drive(sub { $forever->finished }, 45);
note($forever->summary);
my $fc = $forever->{close};
is($fc && $fc->{code}, 1009, 'forever: close code 1009 while it keeps sending');
ok(!($forever->{reset} && $forever->{reset}{before_close}),
   'forever: no ECONNRESET/EPIPE before the close frame') or diag($forever->summary);
my $cut = $forever->{write_error} && $fc ? $forever->{write_done} - $fc->{t_abs} : undef;
ok(defined $cut && $cut <= 40, 'forever: the server ends the connection within 40s of the close frame')
    or diag($forever->summary);
diag(sprintf 'forever: the server cut the connection off %.1fs after its close frame (%s)',
             $cut, $forever->{write_error}) if defined $cut;

# nginx is healthy: a fresh session works
my $w = WSClient->join(port => $port, room => 'after', nick => 'w');
$w->send_text('still here');
my $m = $w->wait_type('message', 5);
is($m && $m->{text}, 'still here', 'a new session works afterwards');
$w->send_close(1000);
ok($w->is_closed_by_server(5), 'and closes cleanly');

done_all();
