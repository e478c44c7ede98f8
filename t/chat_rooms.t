# Rooms: isolation between rooms, default room and user, URL-decoded
# room and nick.
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

binmode Test::More->builder->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

# --- isolation
my $a1 = WSClient->join(port => $port, room => 'ra', nick => 'a1');
my $b1 = WSClient->join(port => $port, room => 'rb', nick => 'b1');
my $b2 = WSClient->join(port => $port, room => 'rb', nick => 'b2');

$a1->send_text('secret of room a');
my $m = $a1->wait_type('message', 5);
is($m && $m->{text}, 'secret of room a', 'sender in room a gets its message (it was delivered)');

$b2->send_text('marker b');
$m = $b1->wait_type('message', 5);
is($m && $m->{text}, 'marker b', 'first message event in room b is room b\'s marker');
is($m && $m->{room}, 'rb', 'marker carries room rb');
ok(!(grep { ($_->{room} // '') ne 'rb' || ($_->{user} // '') eq 'a1' } $b1->events),
   'b1 received no event of room a')
    or diag(explain([$b1->events]));
ok(!(grep { ($_->{user} // '') =~ /^b/ } $a1->events), 'a1 received no event of room b');

# --- defaults
{
    my $c = WSClient->connect(port => $port, path => '/ws', welcome => 1);
    is($c->welcome->{room}, 'lobby', 'no room argument -> lobby');
    like($c->welcome->{user}, qr/^guest-\d{4}$/, 'no nick argument -> guest-NNNN');
    $c->send_text('in the lobby');
    my $e = $c->wait_type('message', 5);
    is($e && $e->{room}, 'lobby', 'message event in room lobby');
    like($e && $e->{user}, qr/^guest-\d{4}$/, 'message user is the guest name');
    is($e && $e->{user}, $c->welcome->{user}, 'same guest name as in welcome');
    $c->send_close(1000);
}
{
    my $c = WSClient->connect(port => $port, path => '/ws?room=&nick=', welcome => 1);
    is($c->welcome->{room}, 'lobby', 'empty room argument -> lobby');
    like($c->welcome->{user}, qr/^guest-\d{4}$/, 'empty nick argument -> guest-NNNN');
    $c->send_close(1000);
}

# --- URL decoding
{
    my $c = WSClient->connect(port => $port, path => '/ws?room=caf%C3%A9%20bar&nick=J%C3%BCrgen',
                              welcome => 1);
    is($c->welcome->{user}, 'Jürgen', 'nick J%C3%BCrgen decoded in welcome');
    is($c->welcome->{room}, 'café bar', 'room caf%C3%A9%20bar decoded in welcome');
    $c->send_text('grüß dich');
    my $e = $c->wait_type('message', 5);
    is($e && $e->{user}, 'Jürgen', 'decoded nick in message event');
    is($e && $e->{text}, 'grüß dich', 'text intact');
    is($redis->numsub('café bar'), 1, 'channel uses the decoded room name');
    $c->send_close(1000);
}

$_->send_close(1000) for $a1, $b1, $b2;
done_all();
