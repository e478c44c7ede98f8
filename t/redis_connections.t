# Redis connection economy: 100 clients in 10 rooms on one worker use at most
# 2 Redis connections; when everybody has gone no room channel is subscribed.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(workers => 1), redis => $redis);
my $port = $nginx->port;

my @rooms = map { "room$_" } 0 .. 9;
my @c;
for my $i (0 .. 99) {
    my $c = eval { WSClient->join(port => $port, room => $rooms[$i % 10], nick => "n$i") };
    if (!$c) { diag("client $i: $@"); last }
    push @c, $c;
}
is(scalar @c, 100, '100 clients joined');

# make sure both kinds of connection exist: one message per room
for my $r (0 .. 9) {
    $c[$r]->send_text("hi $rooms[$r]");
    my $m = $c[$r]->wait_type('message', 5);
    is($m && $m->{room}, $rooms[$r], "message delivered in $rooms[$r]");
}

my @cl = $redis->client_list;
ok(@cl >= 1 && @cl <= 2, 'CLIENT LIST: at most 2 connections from nginx (' . scalar(@cl) . ')')
    or diag(join "\n", map { "addr=$_->{addr} flags=$_->{flags} sub=$_->{sub} cmd=$_->{cmd}" } @cl);
is($redis->numsub($_), 1, "wschat:$_ has one subscriber") for @rooms;

# half leave with a close frame, half just drop the connection
for my $i (0 .. $#c) {
    if ($i % 2) { $c[$i]->send_close(1000) } else { $c[$i]->disconnect }
}
for my $r (@rooms) {
    my $n;
    wait_until(sub { $n = $redis->numsub($r); $n == 0 }, 10);
    is($n, 0, "PUBSUB NUMSUB wschat:$r is 0 after everybody left");
}
@cl = $redis->client_list;
ok(@cl <= 2, 'still at most 2 Redis connections after everybody left');

done_all();
