# websocket_chat_presence off: members are not told of joins and leaves, and
# messages still flow.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx(chat_config(location => "            websocket_chat_presence off;\n"),
                        redis => $redis);
my $port = $nginx->port;

my $a = WSClient->join(port => $port, room => 'quiet', nick => 'alice');
my $b = WSClient->join(port => $port, room => 'quiet', nick => 'bob');
$b->disconnect;
my $c = WSClient->join(port => $port, room => 'quiet', nick => 'carol');

# A marker message closes the window: everything before it has been seen.
$c->send_text('marker');
my @seen;
my $marker = $a->wait_for(sub { push @seen, $_[0]{type}; $_[0]{type} eq 'message' }, 5);
is($marker && $marker->{text}, 'marker', 'messages are delivered with presence off');
is_deeply([grep { $_ eq 'join' || $_ eq 'leave' } @seen], [],
          'no join or leave events reached a member')
    or diag("events: @seen");

$nginx->stop;
$redis->stop;
done_testing;
