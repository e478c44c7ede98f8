# Graceful shutdown and reload: connected clients get close code 1001 and the
# TCP connection is closed; after a reload new clients chat normally.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $redis = start_redis();

# --- reload
{
    my $nginx = start_nginx(chat_config(workers => 2), redis => $redis, workers => 2);
    my @c = map { WSClient->join(port => $nginx->port, room => 'rl', nick => "r$_") } 1 .. 4;
    my @new = $nginx->reload(workers => 2);
    is(scalar @new, 2, 'two new workers after reload');
    for my $i (0 .. $#c) {
        my $closed = $c[$i]->is_closed_by_server(10);
        ok($closed, "client $i: connection closed after reload");
        is($c[$i]->close_code, 1001, "client $i: close code 1001 on reload");
    }
    ok(wait_until(sub { !grep { /shutting down/ } map { ChatTest::_proc_title($_) } $nginx->child_pids }, 10),
       'old workers exited');
    my $a = WSClient->join(port => $nginx->port, room => 'rl', nick => 'after1');
    my $b = WSClient->join(port => $nginx->port, room => 'rl', nick => 'after2');
    $a->send_text('after reload');
    for my $x ([a => $a], [b => $b]) {
        my $m = $x->[1]->wait_type('message', 5);
        is($m && $m->{text}, 'after reload', "$x->[0] chats after reload");
    }
    $_->send_close(1000) for $a, $b;
    $nginx->stop;
}

# --- graceful shutdown (QUIT) with clients connected
{
    my $nginx = start_nginx(chat_config(), redis => $redis);
    my @c = map { WSClient->join(port => $nginx->port, room => 'sd', nick => "s$_") } 1 .. 3;
    my $t0 = time;
    $nginx->stop;    # QUIT; records "exited within 10s" and log checks
    for my $i (0 .. $#c) {
        ok($c[$i]->is_closed_by_server(5), "client $i: closed on shutdown");
        is($c[$i]->close_code, 1001, "client $i: close code 1001 on shutdown");
    }
    ok(time - $t0 < 5, 'shutdown did not wait for the clients');
    ok(wait_until(sub { $redis->numsub('sd') == 0 }, 5), 'no subscriber left after shutdown');
}

done_all();
