# Redis Cluster failover (websocket_chat_redis cluster=...): 3 primaries with
# one replica each (cluster-node-timeout 2000 ms), history on, 2 workers
# (listen ... reuseport). Two rooms on every shard, in each one sender
# sending a numbered message every ~50 ms and two readers. One primary is
# killed (kill -9) mid-stream and its replica takes over. Checks:
# * rooms on the other shards never get redis_unavailable (nor any error or
#   notice) and keep receiving, in order and without a pause of a second,
#   through the whole failover;
# * every member of a room on the killed shard gets redis_unavailable, then
#   redis_available within node_timeout + 5 s of the replica taking over;
# * afterwards every numbered message was either received exactly once by
#   every reader of its room, or its sender got an error event (counted:
#   never fewer such errors than messages nobody received); no reader has
#   a message the other lacks; every member receives each sender's
#   messages in the order sent;
# * the error log has only lines about the killed node and the messages
#   refused during its outage.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;
use ChatCluster;

my $NODE_TIMEOUT = 2000;    # ms
my $TICK = 0.05;            # seconds between two messages of a sender
my $MAX_SECONDS = 30;       # bound on the whole stream, failover included

my $cl = ChatCluster->start(primaries => 3, replicas => 1, node_timeout => $NODE_TIMEOUT);
my @P = $cl->primaries;
is(scalar @P, 3, 'cluster of 3 primaries with a replica each is up');

my $by = $cl->rooms_on_each_primary(2, 'fo');
my %owner = map { my $p = $_; map { ($_ => $p) } @{ $by->{$p} } } keys %$by;
my @rooms = sort keys %owner;
my $victim = $P[0];
my $kport = $victim->port;
my %hit = map { $_ => ($owner{$_} == $kport) } @rooms;
note('rooms: ' . join(', ', map { "$_ on $owner{$_}" . ($hit{$_} ? ' (to be killed)' : '') } @rooms));

my $nginx = start_nginx_ok('nginx starts with cluster=<3 seeds>, 2 workers, history on',
    chat_config(workers => 2, listen => 'reuseport', redis => 'cluster=' . $cl->seeds,
                http => "websocket_chat_history 1000 1h;\n    websocket_chat_redis_timeout 1s;"),
    workers => 2);
my $port = $nginx->port;
# The outage's own lines: the killed node named, and messages it refused.
$nginx->allow_errors(qr/\[error\] .*websocket_chat: .*127\.0\.0\.1:$kport(?!\d)/);
my $hit_rooms = join '|', map { quotemeta } grep { $hit{$_} } @rooms;
$nginx->allow_errors(qr/\[error\] .*message of "[^"]*" in "(?:$hit_rooms)" not sent/);

sub type_of { $_[0]{type} // '' }

# Per room: [sender, reader, reader], all in one list for the pump.
my (%m, @all, @room_of);
for my $r (@rooms) {
    for my $role (qw(s r1 r2)) {
        my $c = WSClient->join(port => $port, room => $r, nick => "$r-$role");
        push @{ $m{$r} }, $c;
        push @all, $c;
        push @room_of, $r;
    }
}
for my $r (@rooms) {
    ok($m{$r}[0]->wait_type('join', 5, sub { $_[0]{user} eq "$r-r2" }), "$r: the sender sees the last reader join");
}
note('members per worker: ' . join(', ', map { my $w = $_; "$w: " . scalar(grep { ($_ // 0) == $w } client_workers($nginx, \@all)) } $nginx->worker_pids));

# --- the stream
my %sent;         # room => number of messages sent
my %sent_at;      # room => [send time of message n]
my $next = time;
sub send_tick {
    return if time < $next;
    $next += $TICK;
    $next = time + $TICK if $next < time;    # after a long step, do not burst
    for my $r (@rooms) {
        my $n = ++$sent{$r};
        $sent_at{$r}[$n] = time;
        $m{$r}[0]->send_text("$r#$n");
    }
}
sub stream_for {
    my ($secs, $until) = @_;
    my $end = time + $secs;
    while (time < $end) {
        send_tick();
        my $wait = $next - time;
        ChatCluster::pump(\@all, $wait > 0 ? $wait : 0);
        return 1 if $until && $until->();
    }
    return 0;
}

my $t_start = time;
stream_for(1);
my $flowing = grep { my $r = $_; grep { type_of($_) eq 'message' } $m{$r}[1]->events } @rooms;
is($flowing, scalar @rooms, 'messages flow in every room before the kill');

my $t_kill = $cl->kill_primary($victim);
note("killed primary $kport (kill -9)");

# Keep streaming until the replica has taken over and every member of a
# room on the killed shard has its redis_available notice.
my ($new, $t_failover, $last_check) = (undef, undef, 0);
my @hit_members = map { @{ $m{$_} } } grep { $hit{$_} } @rooms;
my $recovered = stream_for($MAX_SECONDS - (time - $t_start) - 5, sub {
    if (!$new && time - $last_check > 0.2) {
        $last_check = time;
        if ($new = $cl->failover_done($victim)) {
            $t_failover = time;
            note(sprintf 'replica %d took over %.2fs after the kill', $new->port, $t_failover - $t_kill);
        }
    }
    return $new && !grep { my $c = $_; !grep { type_of($_) eq 'notice' } $c->events } @hit_members;
});
ok($new, 'a replica of the killed primary took over');
my $t_recovered = time;
ok($recovered, 'every member of the killed shard\'s rooms got a notice, within the bound on the stream');
stream_for(1.5);    # some more traffic on the recovered shard

# --- stop streaming: a last message per room, everybody waits for it
for my $r (@rooms) { $m{$r}[0]->send_text("$r#end") }
sub all_ended {
    return !grep { my $i = $_;
                   !grep { type_of($_) eq 'message' && $_->{text} eq "$room_of[$i]#end" } $all[$i]->events
                 } 0 .. $#all;
}
ChatCluster::pump(\@all, 15, \&all_ended);
my $all_ended = all_ended();
ok($all_ended, 'every member receives its room\'s last message');
$_->send_close(1000) for @all;
my $closed = grep { $_->recv_close(5) } @all;
is($closed, scalar @all, 'every member closes cleanly');

# --- checks
my $t_end_failover = $recovered ? $t_recovered : time;
my $bound = $NODE_TIMEOUT / 1000 + 5;
my ($lost_total, $err_total) = (0, 0);
for my $r (@rooms) {
    my $N = $sent{$r};
    my @ev = map { [$_->events] } @{ $m{$r} };
    my @names = map { "$r-$_" } qw(s r1 r2);
    # numbered messages of each member, in arrival order
    my @nums = map { [map { $_->{text} =~ /#(\d+)$/ ? $1 : () } grep { type_of($_) eq 'message' } @$_] } @ev;
    for my $k (0 .. 2) {
        my @n = @{ $nums[$k] };
        my @out = grep { $n[$_] <= $n[$_ - 1] } 1 .. $#n;
        ok(!@out, "$names[$k]: the sender's messages arrive in the order sent, none twice")
            or diag("out of order/repeated after: " . join ', ', map { "$n[$_ - 1] then $n[$_]" } @out[0 .. ($#out < 9 ? $#out : 9)]);
    }
    my @errs = map { [grep { type_of($_) eq 'error' } @$_] } @ev;
    my @notices = map { [grep { type_of($_) eq 'notice' } @$_] } @ev;
    if (!$hit{$r}) {
        my @bad = map { my $k = $_; map { "$names[$k]: $_->{type} $_->{code}" } @{ $errs[$k] }, @{ $notices[$k] } } 0 .. 2;
        ok(!@bad, "$r (shard $owner{$r}, not killed): no error and no notice during the failover")
            or diag(join "\n", @bad);
        for my $k (0 .. 2) {
            is_deeply($nums[$k], [1 .. $N], "$names[$k]: all $N messages, each once, in order")
                or diag("got " . scalar(@{ $nums[$k] }) . " messages");
            # arrival times of the numbered messages from the kill until the
            # killed shard's members were told it is back
            my @t = map { $_->{_t} } grep { type_of($_) eq 'message' && ($_->{_t} // 0) >= $t_kill - 0.5
                                                    && $_->{_t} <= $t_end_failover + 0.5 } @{ $ev[$k] };
            my $gap = 0;
            for my $i (1 .. $#t) { $gap = $t[$i] - $t[$i - 1] if $t[$i] - $t[$i - 1] > $gap }
            ok(@t >= 2 && $gap < 1, sprintf("$names[$k]: kept receiving through the failover (%d messages, longest pause %.2fs)", scalar @t, $gap));
        }
        next;
    }
    for my $k (0 .. 2) {
        my ($e) = grep { ($_->{code} // '') eq 'redis_unavailable' } @{ $errs[$k] };
        ok($e, "$names[$k] (killed shard): gets an error redis_unavailable");
        my ($n) = grep { ($_->{code} // '') eq 'redis_available' } @{ $notices[$k] };
        ok($n && $e && $n->{_t} >= $e->{_t}, "$names[$k]: then a notice redis_available");
        ok($n && defined $t_failover && $n->{_t} - $t_failover <= $bound,
           sprintf("$names[$k]: the notice within %ds of the replica taking over (%s)", $bound,
                   $n && defined $t_failover ? sprintf('%.2fs', $n->{_t} - $t_failover) : 'none'));
    }
    # each number: in both readers once, or in neither (then an error for it)
    my @r1 = @{ $nums[1] };
    my @r2 = @{ $nums[2] };
    my (%in1, %in2);
    $in1{$_}++ for @r1;
    $in2{$_}++ for @r2;
    my @partial = grep { ($in1{$_} // 0) != ($in2{$_} // 0) } 1 .. $N;
    ok(!@partial, "$r: no numbered message reached one reader and not the other")
        or diag('differ: ' . join ', ', map { "#$_ (" . ($in1{$_} // 0) . ' vs ' . ($in2{$_} // 0) . ')' } @partial[0 .. ($#partial < 9 ? $#partial : 9)]);
    my @lost = grep { !$in1{$_} && !$in2{$_} } 1 .. $N;
    my @msg_errs = grep { ($_->{code} // '') ne 'redis_unavailable' } @{ $errs[0] };
    $lost_total += @lost;
    $err_total += @msg_errs;
    ok(@lost <= @msg_errs, sprintf("$r: %d of %d messages reached no reader, the sender got %d error event(s) for messages (%s)",
                                   scalar @lost, $N, scalar @msg_errs,
                                   join(', ', map { $_->{code} // '?' } @msg_errs) || 'none'))
        or diag('lost: ' . join ' ', map { "#$_" } @lost[0 .. ($#lost < 19 ? $#lost : 19)]);
    my @reader_errs = map { my $k = $_; grep { ($_->{code} // '') ne 'redis_unavailable' } @{ $errs[$k] } } 1, 2;
    ok(!@reader_errs, "$r: the readers, who sent nothing, get no other error")
        or diag(join "\n", map { $_->{_raw} // '' } @reader_errs);
}
note("messages lost on the killed shard: $lost_total; error events for messages: $err_total");

my @lines = grep { /\[(?:error|warn)\]/ && /websocket_chat/ } split /\n/, $nginx->error_log_text;
ok((grep { /127\.0\.0\.1:$kport(?!\d)/ } @lines), "error log: a line names the killed node 127.0.0.1:$kport")
    or diag(join "\n", @lines[0 .. ($#lines < 19 ? $#lines : 19)]);
note("error log: " . scalar(@lines) . " websocket_chat error/warn line(s)");

done_all();
