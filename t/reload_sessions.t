# Reload and graceful stop with 100 open sessions on worker_processes 2
# (worker_shutdown_timeout 10s):
# * reload (HUP): every session gets close code 1001 and its TCP connection
#   is closed within a few seconds; the old worker processes are gone well
#   within worker_shutdown_timeout; new clients join and chat through the
#   new workers.
# * quit (QUIT): every session gets 1001 and the master exits.
# No [alert] lines: the harness checks the error log when nginx stops.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $N = 100;
my $CLOSE_WITHIN = 5;    # seconds from the signal until every session is closed

my $redis = start_redis();
my $template = "worker_shutdown_timeout 10s;\n" . chat_config(workers => 2);

sub join_many {
    my ($port, $room, $n) = @_;
    my @c;
    for my $i (1 .. $n) {
        my $c = eval { WSClient->join(port => $port, room => $room, nick => "$room$i") };
        if (!$c) { diag("client $i: $@"); last }
        push @c, $c;
    }
    return @c;
}

# Read from every client until each has seen EOF or $deadline passes.
# Returns the number of clients whose connection the server closed.
sub wait_all_closed {
    my ($clients, $deadline) = @_;
    while (1) {
        my @open = grep { !$_->eof } @$clients;
        return scalar(@$clients) unless @open;
        my $left = $deadline - time;
        return @$clients - @open if $left <= 0;
        my %by = map { (fileno($_->socket) => $_) } @open;
        my @ready = IO::Select->new(map { $_->socket } @open)->can_read($left > 0.2 ? 0.2 : $left);
        $by{ fileno $_ }->pending_frames(0) for @ready;
    }
}

sub check_closed {
    my ($what, $clients, $t0) = @_;
    my $closed = wait_all_closed($clients, $t0 + $CLOSE_WITHIN);
    my $dt = time - $t0;
    is($closed, scalar(@$clients), "$what: all $N TCP connections closed by the server within ${CLOSE_WITHIN}s")
        and note(sprintf "$what: all closed after %.2fs", $dt);
    my %codes;
    $codes{ $_->got_close ? ($_->close_code // 'empty') : 'no close frame' }++ for @$clients;
    is_deeply(\%codes, { 1001 => scalar @$clients }, "$what: every session got close code 1001")
        or diag(explain(\%codes));
}

# --- reload
{
    my $nginx = start_nginx_ok('nginx starts (2 workers, worker_shutdown_timeout 10s)',
        $template, redis => $redis, workers => 2);
    my $port = $nginx->port;
    my @old = $nginx->worker_pids;
    is(scalar(@old), 2, 'two workers');
    my @c = join_many($port, 'rl', $N);
    is(scalar(@c), $N, "$N sessions joined");
    my %per;
    $per{ $_ // '?' }++ for client_workers($nginx, \@c, @old);
    note('sessions per worker: ' . join(', ', map { "$_: $per{$_}" } sort keys %per));

    my $t0 = time;
    my @new = eval { $nginx->reload(workers => 2) };
    is(scalar(@new), 2, 'reload: two new workers') or diag($@);
    ok(!(grep { my $n = $_; grep { $_ == $n } @old } @new), 'reload: the new workers are new processes');
    check_closed('reload', \@c, $t0);

    my $gone = wait_until(sub { !grep { pid_running($_) } @old }, 11, 0.05);
    my $dt = time - $t0;
    ok($gone, sprintf 'old worker processes (%s) exited within worker_shutdown_timeout (%.2fs after HUP)',
       "@old", $dt)
        or diag('still running: ' . join ' ', grep { pid_running($_) } @old);

    # new clients join and chat through the new workers
    my @d = join_many($port, 'rl', 10);
    is(scalar(@d), 10, 'after reload: 10 new sessions joined');
    my @owner = client_workers($nginx, \@d, @new);
    is(scalar(grep { defined } @owner), scalar(@d), 'after reload: every new session is on a new worker')
        or diag('owners: ' . join ' ', map { $_ // 'none' } @owner);
    $d[-1]->send_text('after reload');
    my $got = grep { my $m = $_->wait_type('message', 5); $m && $m->{text} eq 'after reload' } @d;
    is($got, scalar(@d), 'after reload: every new member receives a message');
    is(scalar(log_lines($nginx, qr/\[alert\]/)), 0, 'reload: no [alert] line in the error log')
        or diag(join "\n", log_lines($nginx, qr/\[alert\]/));
    $_->send_close(1000) for @d;
    $_->is_closed_by_server(5) for @d;
    $nginx->stop;
}

# --- quit
{
    my $nginx = start_nginx_ok('nginx starts again (2 workers)', $template, redis => $redis, workers => 2);
    my $master = $nginx->pid;
    my @c = join_many($nginx->port, 'qt', $N);
    is(scalar(@c), $N, "$N sessions joined");
    my $t0 = time;
    $nginx->stop;    # QUIT; records "exited within 10s" and the log checks
    note(sprintf 'master exited %.2fs after QUIT', time - $t0);
    ok(!pid_running($master), 'quit: the master process has exited');
    check_closed('quit', \@c, $t0);
    ok(wait_until(sub { $redis->numsub('qt') == 0 }, 5), 'quit: no subscriber left for the room');
}

done_all();
