# Two nginx instances (different ports) sharing one Redis: members of the same
# room on different hosts see each other's joins and messages.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $n1 = start_nginx(chat_config(), redis => $redis);
my $n2 = start_nginx(chat_config(), redis => $redis);
isnt($n1->port, $n2->port, 'two instances on different ports');

my $c1 = WSClient->join(port => $n1->port, room => 'cl', nick => 'one');
my $c2 = WSClient->join(port => $n2->port, room => 'cl', nick => 'two');
is($redis->numsub('cl'), 2, 'both instances subscribed to wschat:cl');

ok($c1->wait_type('join', 5, sub { $_[0]{user} eq 'two' }), 'join on host 2 seen on host 1');

$c1->send_text('hello from host 1');
my %id;
for my $c ([c1 => $c1], [c2 => $c2]) {
    my $m = $c->[1]->wait_type('message', 5);
    is($m && "$m->{user}|$m->{text}", 'one|hello from host 1', "$c->[0] receives host 1's message");
    $id{ $c->[0] } = $m && $m->{id};
}
ok(defined $id{c1} && $id{c1} eq ($id{c2} // ''), 'same id on both hosts');

$c2->send_text('hello from host 2');
for my $c ([c1 => $c1], [c2 => $c2]) {
    my $m = $c->[1]->wait_type('message', 5);
    is($m && "$m->{user}|$m->{text}", 'two|hello from host 2', "$c->[0] receives host 2's message");
    isnt($m && $m->{id}, $id{c1}, "$c->[0]: ids differ across hosts") if $m;
}

# a second member on host 1 is also reached by host 2
my $c3 = WSClient->join(port => $n1->port, room => 'cl', nick => 'three');
$c2->send_text('to all');
for my $c ([c1 => $c1], [c2 => $c2], [c3 => $c3]) {
    my $m = $c->[1]->wait_type('message', 5);
    is($m && $m->{text}, 'to all', "$c->[0] receives the message");
}

$_->send_close(1000) for $c1, $c2, $c3;
ok(wait_until(sub { $redis->numsub('cl') == 0 }, 10), 'both instances unsubscribed after all left');

done_all();
