# Closing: a client close frame is echoed and the server closes TCP; an abrupt
# disconnect produces a leave event, and the last one unsubscribes the room.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

# --- close handshake started by the client
{
    my $c = WSClient->join(port => $port, room => 'cls', nick => 'closer');
    ok($c->send_close(1000, 'bye'), 'client sends close 1000 "bye"');
    my $f;
    while (my $m = $c->recv_message(5)) {
        if ($m->{opcode} == 8) { $f = $m; last }
    }
    ok($f, 'server answers with a close frame');
    is($f && $f->{close_code}, 1000, 'close code 1000 echoed');
    ok($f && !$f->{masked}, 'server close frame is not masked');
    ok($c->is_closed_by_server(5), 'server closes the TCP connection');
}

# --- abrupt disconnects
{
    my $a = WSClient->join(port => $port, room => 'abr', nick => 'stay');
    my $b = WSClient->join(port => $port, room => 'abr', nick => 'goes');
    ok($a->wait_type('join', 5, sub { $_[0]{user} eq 'goes' }), 'stay sees goes join');
    $b->disconnect;
    my $l = $a->wait_type('leave', 5);
    ok($l, 'remaining member receives a leave event');
    is($l && $l->{user}, 'goes', 'leave names the member who went');
    is($l && $l->{room}, 'abr', 'leave carries the room');
    ok($l && defined $l->{id} && length $l->{id}, 'leave has an id');

    is($redis->numsub('abr'), 1, 'room still subscribed while a member remains');
    $a->disconnect(rst => 1);
    my $n;
    wait_until(sub { $n = $redis->numsub('abr'); $n == 0 }, 10);
    is($n, 0, 'NUMSUB wschat:abr is 0 after the last member dropped');
}

# --- leave after a clean close too
{
    my $a = WSClient->join(port => $port, room => 'cl2', nick => 'x');
    my $b = WSClient->join(port => $port, room => 'cl2', nick => 'y');
    $b->send_close(1000, 'bye');
    my $l = $a->wait_type('leave', 5);
    is($l && $l->{user}, 'y', 'leave event after a close handshake');
    $a->send_close(1000);
    ok($a->is_closed_by_server(5), 'closed');
}

ok(wait_until(sub { $nginx->access_log_text =~ m{"GET /ws\?room=cls&nick=closer HTTP/1\.1" 101 } }, 5),
   'access log has a 101 line for the session');

done_all();
