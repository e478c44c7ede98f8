# websocket_chat_redis unix:/path: the links reach Redis over a unix socket
# and rooms work as over TCP.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use File::Temp qw(tempdir);
use Test::More;
use ChatTest;
use WSClient;

# nginx workers run as an unprivileged user: they must reach the socket.
my $dir = tempdir(CLEANUP => 1);
chmod 0755, $dir;
my $sock = "$dir/redis.sock";
my $redis = start_redis(args => ['--unixsocket', $sock, '--unixsocketperm', '777']);
my $nginx = start_nginx(chat_config(redis => "unix:$sock"), redis => $redis);
my $port = $nginx->port;

my $a = WSClient->join(port => $port, room => 'unix', nick => 'alice');
my $b = WSClient->join(port => $port, room => 'unix', nick => 'bob');
$a->send_text('over a unix socket');
for my $c ([alice => $a], [bob => $b]) {
    my $ev = $c->[1]->wait_for(sub { $_[0]{type} eq 'message' }, 5);
    is($ev && $ev->{text}, 'over a unix socket', "$c->[0] received the message");
}

# The worker's connections are unix-socket clients of this Redis (their
# address is the socket path, not an IP).
my $list = $redis->cmd('CLIENT', 'LIST');
my @over_unix = grep { m{\baddr=/} && !/\bcmd=client\b/ } split /\n/, $list;
is(scalar @over_unix, 2, 'the worker holds its two connections over the unix socket')
    or diag($list);

$nginx->stop;
$redis->stop;
done_testing;
