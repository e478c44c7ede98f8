# Leak check: worker_processes 1; 500 warm-up cycles, then 10,000 cycles of
# connect -> handshake -> welcome -> send one message -> receive it ->
# close frame -> close reply -> close. The worker's VmRSS after the cycles
# must be within 4 MB of its value after the warm-up.
#
# 8 cycles run at a time, driven by one select loop; each slot uses its
# own room, so every cycle also subscribes and unsubscribes the room's
# channel. Every step of a cycle has a 5 s deadline. All of it twice: with
# the HTTP request kept to the end (access log at close) and freed after the
# upgrade.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $WARMUP     = 500;
my $CYCLES     = 10_000;
my $SLOTS      = 8;
my $STEP_LIMIT = 5;       # seconds for each step of a cycle
my $MAX_FAIL   = 20;      # give up after this many failed cycles
my $RSS_LIMIT  = 4096;    # kB

my $redis = start_redis();
my ($nginx, $port, $worker);

my (%fail, @fail_samples);
my $sel = IO::Select->new;
my @slot;

sub failed {
    my ($s, $why) = @_;
    $fail{ $s->{state} }++;
    push @fail_samples, "slot $s->{n} cycle $s->{cycle} in $s->{state}: $why" if @fail_samples < 5;
    finish($s);
}

sub finish {
    my $s = shift;
    if ($s->{sock}) {
        $sel->remove($s->{sock});
        close $s->{sock};
    }
    $s->{sock} = undef;
    $s->{state} = 'idle';
}

sub start_cycle {
    my ($s, $cycle) = @_;
    $s->{cycle} = $cycle;
    $s->{state} = 'connect';
    $s->{buf} = '';
    $s->{deadline} = time + $STEP_LIMIT;
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                     Proto => 'tcp', Timeout => $STEP_LIMIT);
    return failed($s, "connect: $!") unless $sock;
    binmode $sock;
    $s->{sock} = $sock;
    my $nick = "s$s->{n}c$cycle";
    my ($req, $key) = WSClient::handshake_request(port => $port,
        path => "/ws?room=leak$s->{n}&nick=$nick");
    $s->{accept} = WSClient::accept_for($key);
    $s->{text} = "leak $s->{n} $cycle";
    $s->{state} = 'handshake';
    send_all($s, $req) or return;
    $sel->add($sock);
}

sub send_all {
    my ($s, $bytes) = @_;
    my $off = 0;
    while ($off < length $bytes) {
        my $n = syswrite($s->{sock}, $bytes, length($bytes) - $off, $off);
        if (!defined $n) { failed($s, "write: $!"); return 0 }
        $off += $n;
    }
    return 1;
}

# Advance slot $s with what is in its buffer. Returns when it needs more.
sub advance {
    my $s = shift;
    if ($s->{state} eq 'handshake') {
        my $i = index($s->{buf}, "\r\n\r\n");
        return if $i < 0;
        my $head = substr($s->{buf}, 0, $i);
        substr($s->{buf}, 0, $i + 4, '');
        return failed($s, 'status: ' . (split /\r\n/, $head)[0]) unless $head =~ m{^HTTP/1\.1 101 };
        return failed($s, 'bad Sec-WebSocket-Accept')
            unless $head =~ /^Sec-WebSocket-Accept:\s*\Q$s->{accept}\E\s*$/mi;
        $s->{state} = 'welcome';
        $s->{deadline} = time + $STEP_LIMIT;
    }
    while (my $f = parse_frame(\$s->{buf})) {
        my $op = $f->{opcode};
        if ($op == 9) { send_all($s, WSClient::frame_bytes(opcode => 10, payload => $f->{payload})) or return; next }
        if ($op == 8 && $s->{state} ne 'closing') {
            return failed($s, 'unexpected close frame ' . ($f->{close_code} // ''));
        }
        if ($s->{state} eq 'welcome') {
            next unless $op == 1 && $f->{payload} =~ /^\{"type":"welcome"/;
            send_all($s, WSClient::frame_bytes(opcode => 1, payload => $s->{text})) or return;
            $s->{state} = 'message';
            $s->{deadline} = time + $STEP_LIMIT;
        } elsif ($s->{state} eq 'message') {
            next unless $op == 1 && $f->{payload} =~ /^\{"type":"message"/
                     && index($f->{payload}, qq{"text":"$s->{text}"}) >= 0;
            send_all($s, WSClient::frame_bytes(opcode => 8, payload => pack('n', 1000))) or return;
            $s->{state} = 'closing';
            $s->{deadline} = time + $STEP_LIMIT;
        } elsif ($s->{state} eq 'closing') {
            next unless $op == 8;
            return failed($s, 'close reply with code ' . ($f->{close_code} // 'none'))
                unless ($f->{close_code} // 0) == 1000;
            $s->{done}++;
            return finish($s);
        }
    }
}

# Run $n cycles, $SLOTS at a time; returns (completed, seconds).
sub run_cycles {
    my ($n, $limit) = @_;
    my $t0 = time;
    my $started = 0;
    my $done0 = 0;
    $done0 += $_->{done} for @slot;
    my $failed0 = 0;
    $failed0 += $_ for values %fail;
    my $stop = $t0 + $limit;
    while (1) {
        my $failed = 0;
        $failed += $_ for values %fail;
        last if $failed - $failed0 >= $MAX_FAIL;
        for my $s (@slot) {
            next unless $s->{state} eq 'idle';
            last if $started >= $n || time > $stop;
            start_cycle($s, $started++);
        }
        my @busy = grep { $_->{state} ne 'idle' } @slot;
        last unless @busy;
        my %by = map { (fileno($_->{sock}) => $_) } grep { $_->{sock} } @busy;
        for my $fh ($sel->can_read(0.5)) {
            my $s = $by{ fileno $fh } or next;
            my $r = sysread($fh, $s->{buf}, 65536, length $s->{buf});
            if (!$r) { failed($s, defined $r ? 'EOF' : "read: $!"); next }
            advance($s);
        }
        my $now = time;
        for my $s (grep { $_->{state} ne 'idle' && $now > $_->{deadline} } @slot) {
            failed($s, "no progress within ${STEP_LIMIT}s");
        }
    }
    my $done = -$done0;
    $done += $_->{done} for @slot;
    return ($done, time - $t0);
}

for my $mode (qw(close upgrade)) {
    $nginx = start_nginx_ok("nginx starts (1 worker, access log at $mode)",
        chat_config(workers => 1, location => "websocket_chat_access_log $mode;"), redis => $redis);
    $port = $nginx->port;
    ($worker) = $nginx->worker_pids;
    ok($worker, "$mode: worker pid $worker");
    %fail = ();
    @fail_samples = ();
    @slot = map { { n => $_, state => 'idle', done => 0 } } 0 .. $SLOTS - 1;

    my ($w_done, $w_time) = run_cycles($WARMUP, 20);
    is($w_done, $WARMUP, "$mode: warm-up: $WARMUP cycles completed")
        or diag(join "\n", @fail_samples);
    my $rss0 = proc_rss_kb($worker);
    diag(sprintf "$mode: " . 'warm-up: %d cycles in %.1fs; worker VmRSS after warm-up: %s kB',
         $w_done, $w_time, $rss0 // '?');

    my ($done, $secs) = run_cycles($CYCLES, 50);
    my $rss1 = proc_rss_kb($worker);
    diag(sprintf "$mode: " . '%d cycles in %.1fs (%.0f/s); worker VmRSS after: %s kB; growth %s kB',
         $done, $secs, $done / ($secs || 1), $rss1 // '?',
         defined $rss0 && defined $rss1 ? $rss1 - $rss0 : '?');
    is($done, $CYCLES, "$mode: $CYCLES connect/join/message/close cycles completed");
    my $nfail = 0;
    $nfail += $_ for values %fail;
    is($nfail, 0, "$mode: no cycle failed")
        or diag(join("\n", map({ "$_: $fail{$_}" } sort keys %fail), @fail_samples));
    ok(defined $rss0 && defined $rss1 && $rss1 - $rss0 < $RSS_LIMIT,
       "$mode: worker VmRSS grew by less than $RSS_LIMIT kB over $CYCLES cycles");
    is(scalar(grep { $_->{state} ne 'idle' } @slot), 0, "$mode: no cycle left in flight");
    ok(wait_until(sub { !grep { $redis->numsub("leak$_") } 0 .. $SLOTS - 1 }, 10),
       "$mode: no room channel left subscribed");
    # the server saw every session: one access-log line with status 101 each
    my $sessions;
    wait_until(sub { $sessions = () = $nginx->access_log_text =~ /" 101 /g; $sessions >= $WARMUP + $CYCLES }, 10);
    is($sessions, $WARMUP + $CYCLES, "$mode: access log: one 101 line per cycle");

    $nginx->stop;
}

done_all();
