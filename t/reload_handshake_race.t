# Reload and shutdown racing with WebSocket handshakes (worker_processes 2).
#
# Each round starts nginx and, for about 3 s, opens handshakes continuously
# (non-blocking, many in flight, about 70 a second) while the test sends HUP
# (reload) twice and then QUIT to the master; handshakes keep arriving after
# the QUIT (they meet a closed listener). To make the race certain rather
# than likely, right before each signal a batch of connections is opened and
# accepted by the current workers (checked through /proc): half of them have
# sent all of their handshake but its final CRLF, half nothing yet. Once
# those workers are shutting down, the batch sends the rest, so the
# handshakes complete on workers that are already exiting.
#
# Every client must end cleanly, one of:
# * 101, then a close frame with code 1001 (the test answers it), whether
#   the session was on an old worker at a reload, on a new worker at QUIT,
#   or opened on a worker that was already exiting;
# * a refusal before the upgrade: an HTTP status >= 400 (e.g. 503), or the
#   connection refused / closed before any response byte (listener closed).
# Failures: 101 then EOF or reset without a close frame (what a browser
# reports as 1006), 101 then another close code, an incomplete or non-101
# non-error response, or no outcome within the deadline.
# Also: no [alert] line in the error log (in particular no "open socket ...
# left in connection"), the old workers of both reloads exit, the master
# exits after QUIT. The outcome counts are printed with note().
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use Socket qw(PF_INET SOCK_STREAM SOL_SOCKET SO_ERROR IPPROTO_TCP inet_aton
              pack_sockaddr_in unpack_sockaddr_in);
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK);
use Errno qw(EINPROGRESS EAGAIN EWOULDBLOCK EINTR);
use ChatTest;
use WSClient;
use ChatFault;

my $ROUNDS     = 2;
my $OPEN_FOR   = 3.0;     # seconds of continuous handshakes per round
my $RATE       = 70;      # stream handshakes per second
my $BATCH      = 20;      # staged connections before each signal
my $MAX_PER_ROUND = 300;
my @SIGNALS    = ([0.6, 'HUP'], [1.4, 'HUP'], [2.2, 'QUIT']);
my $SETTLE     = 8;       # seconds after the last handshake for every client to end

my $redis = start_redis();
my $template = chat_config(workers => 2);

# ---------------------------------------------------------------- clients

my @clients;    # every client of the current round
my $t_round;

sub phase_name {
    my $n = shift;    # signals sent so far
    return ('before HUP#1', 'after HUP#1', 'after HUP#2', 'after QUIT')[$n];
}
my $signals_sent = 0;

sub new_client {
    my ($port, %o) = @_;
    my $c = { kind => $o{kind} // 'stream', state => 'connecting', buf => '',
              opened => time, opened_phase => phase_name($signals_sent), hold => $o{hold} };
    my $s;
    socket($s, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
    my $fl = fcntl($s, F_GETFL, 0) or die "fcntl: $!";
    fcntl($s, F_SETFL, $fl | O_NONBLOCK) or die "fcntl: $!";
    $c->{sock} = $s;
    my ($req, $key) = WSClient::handshake_request(port => $port, path => "/ws?room=race&nick=c" . scalar(@clients));
    $c->{req} = $req;
    $c->{accept} = WSClient::accept_for($key);
    $c->{port} = $port;
    if (connect($s, pack_sockaddr_in($port, inet_aton('127.0.0.1')))) {
        on_connected($c);
    } elsif ($! == EINPROGRESS || $! == EAGAIN) {
        # wait for writability
    } else {
        finish($c, 'connect refused/failed before any response', "$!");
    }
    push @clients, $c;
    return $c;
}

sub finish {
    my ($c, $outcome, $detail) = @_;
    return if $c->{outcome};
    $c->{outcome} = $outcome;
    $c->{detail} = $detail;
    $c->{ended} = time;
    $c->{state} = 'done';
    close $c->{sock} if $c->{sock};
    delete $c->{sock};
}

sub write_or_finish {
    my ($c, $data) = @_;
    my $n = syswrite($c->{sock}, $data);
    return 1 if defined $n && $n == length $data;
    # a fresh loopback socket takes a few hundred bytes at once; a failure is
    # the server having closed (or reset) the connection
    read_some($c);
    finish($c, $c->{got_bytes} ? 'incomplete response' : 'closed before any response byte',
           'write: ' . ($! // 'short write')) unless $c->{outcome};
    return 0;
}

sub on_connected {
    my $c = shift;
    $c->{state} = 'sent';
    $c->{connected} = time;
    if (($c->{hold} // '') eq 'partial') {
        $c->{state} = 'held';
        write_or_finish($c, substr($c->{req}, 0, length($c->{req}) - 2));
    } elsif (($c->{hold} // '') eq 'silent') {
        $c->{state} = 'held';
    } else {
        write_or_finish($c, $c->{req});
    }
}

sub release {
    my $c = shift;
    return unless $c->{state} eq 'held';
    $c->{state} = 'sent';
    $c->{released_phase} = phase_name($signals_sent);
    write_or_finish($c, $c->{hold} eq 'partial' ? "\r\n" : $c->{req});
}

# Read what is there; returns 0 on EOF/error (and sets {eof}).
sub read_some {
    my $c = shift;
    return 0 unless $c->{sock};
    my $n = sysread($c->{sock}, $c->{buf}, 65536, length $c->{buf});
    if (defined $n && $n > 0) { $c->{got_bytes} += $n; return 1 }
    return 1 if !defined $n && ($! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR);
    $c->{eof} = defined $n ? 'EOF' : "$!";
    return 0;
}

sub on_readable {
    my $c = shift;
    my $alive = read_some($c);
    if ($c->{state} eq 'sent' || $c->{state} eq 'held') {
        my $i = index($c->{buf}, "\r\n\r\n");
        if ($i < 0) {
            return if $alive;
            return finish($c, $c->{got_bytes} ? 'incomplete response' : 'closed before any response byte',
                          $c->{eof});
        }
        my $head = substr($c->{buf}, 0, $i + 4, '');
        my ($status, $h) = WSClient::_parse_head($head);
        $status //= 0;
        if ($status == 101) {
            if (($h->{'sec-websocket-accept'} // '') ne $c->{accept}) {
                return finish($c, '101 with a wrong Sec-WebSocket-Accept', $head);
            }
            $c->{state} = 'open';
            $c->{upgraded} = time;
            $c->{upgraded_phase} = phase_name($signals_sent);
        } elsif ($status >= 400) {
            return finish($c, 'refused before the upgrade: HTTP >= 400', $status);
        } else {
            return finish($c, 'other HTTP response', $head);
        }
    }
    if ($c->{state} eq 'open') {
        while (my $f = WSClient::parse_frame(\$c->{buf})) {
            if ($f->{opcode} == 8) {
                my $code = $f->{close_code} // 'none';
                # answer the close, as a browser would
                syswrite($c->{sock}, WSClient::frame_bytes(opcode => 8, payload => $f->{payload} // ''))
                    if $c->{sock};
                return finish($c, $code eq '1001' ? '101 then close 1001' : "101 then close $code",
                              $f->{close_reason});
            }
            if ($f->{opcode} == 9) {
                syswrite($c->{sock}, WSClient::frame_bytes(opcode => 10, payload => $f->{payload}));
            }
        }
        finish($c, '101 then EOF/reset without a close frame (1006)', $c->{eof}) unless $alive;
    }
}

sub on_writable {
    my $c = shift;
    my $err = getsockopt($c->{sock}, SOL_SOCKET, SO_ERROR);
    my $e = $err ? unpack('i', $err) : 0;
    if ($e) {
        local $! = $e;
        return finish($c, 'connect refused/failed before any response', "$!");
    }
    on_connected($c);
}

# One turn of the event loop: wait up to $timeout for any socket.
sub pump {
    my $timeout = shift;
    my ($rin, $win) = ('', '');
    my (%r, %w);
    for my $c (@clients) {
        next unless $c->{sock};
        my $fd = fileno $c->{sock};
        if ($c->{state} eq 'connecting') { vec($win, $fd, 1) = 1; $w{$fd} = $c }
        else { vec($rin, $fd, 1) = 1; $r{$fd} = $c }
    }
    if (!%r && !%w) {
        select(undef, undef, undef, $timeout) if $timeout > 0;
        return;
    }
    my ($rout, $wout);
    my $n = select($rout = $rin, $wout = $win, undef, $timeout);
    return if $n <= 0;
    for my $fd (keys %w) { on_writable($w{$fd}) if vec($wout, $fd, 1) }
    for my $fd (keys %r) { on_readable($r{$fd}) if vec($rout, $fd, 1) && $r{$fd}{sock} }
}

# The continuous stream: open the handshakes that are due (at most
# $MAX_PER_ROUND per round, none after $OPEN_FOR seconds).
my ($stream_port, $next_stream);
sub tick {
    my $now = time;
    return if !$stream_port || $now - $t_round >= $OPEN_FOR;
    while ($next_stream <= $now && @clients < $MAX_PER_ROUND) {
        new_client($stream_port);
        $next_stream += 1 / $RATE;
    }
}

# wait_until that keeps the clients (and the stream) going while it waits.
sub pump_until {
    my ($cond, $timeout) = @_;
    return wait_until(sub { tick(); pump(0.005); $cond->() }, $timeout, 0);
}

# Local port of a client -> worker pid holding the server side (or undef).
sub owners {
    my ($nginx, @pids) = @_;
    my $own = socket_owners(@pids);
    my %by_port;
    for my $t (tcp_connections($nginx->port)) {
        next unless $t->{local_port} == $nginx->port;
        my $pid = $own->{ $t->{inode} } or next;
        $by_port{ $t->{remote_port} } = $pid;
    }
    return \%by_port;
}

sub local_port {
    my $c = shift;
    return undef unless $c->{sock};
    my $a = getsockname($c->{sock}) or return undef;
    my ($port) = unpack_sockaddr_in($a);
    return $port;
}

# ---------------------------------------------------------------- a round

my (%total, @all_bad);
for my $round (1 .. $ROUNDS) {
    @clients = ();
    $signals_sent = 0;
    my $nginx = start_nginx_ok("round $round: nginx starts (2 workers)", $template,
                               redis => $redis, workers => 2);
    my $master = $nginx->pid;
    my $port = $nginx->port;
    my @gen = ([ $nginx->worker_pids ]);
    is(scalar(@{ $gen[0] }), 2, "round $round: two workers");
    my @staged_ok;

    $t_round = time;
    $stream_port = $port;
    $next_stream = $t_round;
    my @todo = @SIGNALS;
    while (time - $t_round < $OPEN_FOR && @clients < $MAX_PER_ROUND) {
        tick();
        if (@todo && time - $t_round >= $todo[0][0]) {
            my (undef, $sig) = @{ shift @todo };
            my @cur = @{ $gen[-1] };
            # staged batch, accepted by the current workers before the signal
            my @batch = map { new_client($port, kind => "staged before $sig#" . ($signals_sent + 1),
                                          hold => $_ % 2 ? 'partial' : 'silent') } 1 .. $BATCH;
            my $accepted = pump_until(sub {
                my $own = owners($nginx, @cur);
                !grep { $_->{state} eq 'connecting'
                        || ($_->{state} eq 'held' && !$own->{ local_port($_) // 0 }) } @batch;
            }, 3);
            push @staged_ok, $accepted ? 1 : 0;
            note(sprintf 'round %d: %s batch: %d/%d held on the current workers', $round, $sig,
                 scalar(grep { $_->{state} eq 'held' } @batch), $BATCH);
            kill $sig, $master or die "kill $sig $master: $!";
            $signals_sent++;
            # the old workers start shutting down (QUIT: the master closes
            # the listeners and all workers shut down)
            my $down = pump_until(sub {
                !grep { pid_running($_) && ChatTest::_proc_title($_) !~ /shutting down/ } @cur
            }, 5);
            ok($down, "round $round: $sig#$signals_sent: the workers (@cur) are shutting down");
            if ($sig eq 'HUP') {
                my @new;
                pump_until(sub {
                    @new = grep { my $p = $_; !grep { $_ == $p } @cur } $nginx->worker_pids;
                    @new >= 2
                }, 5);
                is(scalar(@new), 2, "round $round: HUP#$signals_sent: two new workers (@new)");
                push @gen, [@new];
            }
            # now complete the batch's handshakes, on the exiting workers
            release($_) for grep { $_->{hold} eq 'partial' } @batch;
            pump(0.02);
            release($_) for grep { $_->{hold} eq 'silent' } @batch;
        }
        pump(0.005);
    }
    $stream_port = undef;
    my $n = @clients;
    note(sprintf 'round %d: %d handshakes opened in %.2fs', $round, $n, time - $t_round);
    ok($n >= 150, "round $round: at least 150 handshakes were attempted ($n)");
    is(scalar(@todo), 0, "round $round: both reloads and the QUIT were sent");
    is(scalar(grep { !$_ } @staged_ok), 0,
       "round $round: each staged batch was accepted by the workers before their signal");

    # every client ends
    my $ended = pump_until(sub { !grep { !$_->{outcome} } @clients }, $SETTLE);
    for my $c (grep { !$_->{outcome} } @clients) {
        finish($c, "no outcome within ${SETTLE}s (state $c->{state})", '');
    }

    my $master_gone = wait_until(sub { !pid_running($master) }, 5);
    ok($master_gone, "round $round: the master exited after QUIT");
    my @old = map { @$_ } @gen;
    my $workers_gone = wait_until(sub { !grep { pid_running($_) } @old }, 5);
    ok($workers_gone, "round $round: every worker of every generation exited (@old)")
        or diag('still running: ' . join ' ', grep { pid_running($_) } @old);

    # outcomes
    my (%count, %by_kind);
    $count{ $_->{outcome} }++ for @clients;
    $by_kind{"$_->{kind} | " . ($_->{upgraded_phase} ? "101 $_->{upgraded_phase}" : 'no 101')
             . " | $_->{outcome}"}++ for @clients;
    $total{$_} += $count{$_} for keys %count;
    note("round $round outcomes:\n" . join "\n", map { sprintf '  %4d  %s', $count{$_}, $_ } sort keys %count);
    note("round $round by kind:\n" . join "\n", map { sprintf '  %4d  %s', $by_kind{$_}, $_ } sort keys %by_kind);
    my @newest = grep { $_->{kind} eq 'stream' && ($_->{upgraded_phase} // '') eq 'after HUP#2' } @clients;
    note(sprintf 'round %d: %d sessions upgraded on the newest workers (after HUP#2, before QUIT), '
         . '%d of them closed with 1001', $round, scalar(@newest),
         scalar(grep { $_->{outcome} eq '101 then close 1001' } @newest));
    ok(@newest > 0, "round $round: sessions were upgraded on the newest workers before QUIT");
    is(scalar(grep { $_->{outcome} ne '101 then close 1001' } @newest), 0,
       "round $round: every session on the newest workers got 1001 at QUIT");

    my $clean = qr/^(?:101 then close 1001|refused before the upgrade: HTTP >= 400|connect refused\/failed before any response|closed before any response byte)$/;
    my @bad = grep { $_->{outcome} !~ $clean } @clients;
    push @all_bad, @bad;
    is(scalar(@bad), 0, "round $round: every client ended cleanly (1001 after 101, or refused before the upgrade)")
        or diag(join "\n", map {
            sprintf '%s, opened %.2fs (%s)%s%s: %s%s', $_->{kind}, $_->{opened} - $t_round, $_->{opened_phase},
                $_->{released_phase} ? ", released $_->{released_phase}" : '',
                $_->{upgraded_phase} ? ", 101 $_->{upgraded_phase}" : '',
                $_->{outcome}, defined $_->{detail} && length $_->{detail} ? " [$_->{detail}]" : ''
        } @bad[0 .. ($#bad < 19 ? $#bad : 19)]);
    my $upgraded_staged = grep { $_->{kind} =~ /^staged/ && $_->{upgraded} } @clients;
    note("round $round: $upgraded_staged staged handshakes completed with 101 on exiting workers");
    ok((grep { $_->{outcome} eq '101 then close 1001' } @clients) > 0,
       "round $round: some sessions were upgraded and closed with 1001");

    my @alerts = log_lines($nginx, qr/\[alert\]/);
    is(scalar(@alerts), 0, "round $round: no [alert] line in the error log")
        or diag(join "\n", @alerts[0 .. ($#alerts < 9 ? $#alerts : 9)]);
    is(scalar(log_lines($nginx, qr/open socket .* left in connection/)), 0,
       "round $round: no \"open socket ... left in connection\" line");
    $nginx->stop;    # the master is gone; records the log checks
}

note("all rounds:\n" . join "\n", map { sprintf '  %4d  %s', $total{$_}, $_ } sort keys %total);
done_all();
