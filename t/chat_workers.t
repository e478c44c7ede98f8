# Two worker processes: members of one room spread over both workers all get
# a message; each worker holds its own two Redis connections.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(workers => 2), redis => $redis, workers => 2);
my $port = $nginx->port;
is(scalar($nginx->worker_pids), 2, 'two workers running');

# Which worker accepts a connection is up to the kernel. Keep connecting (up
# to 60 clients) until there are 20 and both workers have members, which the
# module shows as two subscribers of the room channel (one per worker).
my @c;
my $spread = 0;
while (@c < 60) {
    push @c, WSClient->join(port => $port, room => 'wk', nick => 'u' . scalar(@c));
    $spread = $redis->numsub('wk') >= 2;
    last if @c >= 20 && $spread;
}
note(scalar(@c) . ' clients connected');
ok($redis->numsub('wk') >= 1, 'room channel subscribed');

$c[0]->send_text('to everybody');
my $got = 0;
for my $i (0 .. $#c) {
    my $m = $c[$i]->wait_type('message', 5);
    $got++ if $m && $m->{text} eq 'to everybody' && $m->{user} eq 'u0';
}
is($got, scalar @c, 'every client receives the message');

# a message from the last client (maybe on the other worker) reaches all too
$c[-1]->send_text('from the last');
$got = 0;
for my $cl (@c) {
    my $m = $cl->wait_type('message', 5);
    $got++ if $m && $m->{text} eq 'from the last';
}
is($got, scalar @c, 'every client receives the last client\'s message');

SKIP: {
    skip 'all clients landed on one worker (kernel accept distribution); '
       . 'per-worker Redis connections not checked', 2 unless $spread;
    is($redis->numsub('wk'), 2, 'both workers subscribed to wschat:wk');
    my @cl;
    my $ok = wait_until(sub { @cl = $redis->client_list; @cl == 4 }, 5);
    is(scalar @cl, 4, 'CLIENT LIST: 4 connections from nginx (2 per worker)')
        or diag(join "\n", map { "addr=$_->{addr} flags=$_->{flags} sub=$_->{sub} cmd=$_->{cmd}" } @cl);
}

$_->send_close(1000) for @c;
ok(wait_until(sub { $redis->numsub('wk') == 0 }, 10), 'unsubscribed after all left');

done_all();
