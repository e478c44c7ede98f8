# Presence ids never repeat in a room: its counter (wschat:<room>:presence)
# is deleted when the room empties and lost when Redis restarts without its
# data, and a counter made anew starts from Redis's clock, so a client that
# remembers the ids it has shown (the page does) never takes a new join or
# leave for one it has seen. Checked: ids of joins and leaves keep growing
# across the room emptying, and across a Redis restart with sessions open
# (whose re-registration is silent); each id is unique.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $port = $redis->port;
my $nginx = start_nginx_ok('nginx starts', chat_config(
    http => 'websocket_chat_redis_timeout 1s;',
), redis => $redis, allow_errors => [
    qr/\[error\] .*connection to Redis 127\.0\.0\.1:$port lost: /]);

sub id_num { ($_[0] // '') =~ /^p(\d+)$/ ? $1 : undef }

# The presence ids $c has received so far, in order.
sub presence_ids {
    my $c = shift;
    map { id_num($_->{id}) } grep { ($_->{type} // '') =~ /^(?:join|leave)$/ } $c->events;
}

my @seen;

# Round 1: two members, one leaves, then the other: the room is empty.
my $m1 = WSClient->join(port => $nginx->port, room => 'ids', nick => 'a');
my $m2 = WSClient->join(port => $nginx->port, room => 'ids', nick => 'b');
ok($m1->wait_for(sub { ($_[0]{type} // '') eq 'join' && $_[0]{user} eq 'b' }, 5), 'a sees b join');
$m2->send_close(1000);
ok($m1->wait_for(sub { ($_[0]{type} // '') eq 'leave' && $_[0]{user} eq 'b' }, 5), 'a sees b leave');
push @seen, presence_ids($m1);
is(scalar(@seen), 3, 'round 1: three presence ids (a, b join; b leaves)') or diag("@seen");
$m1->send_close(1000);
ok(wait_until(sub { !$redis->cmd('EXISTS', 'wschat:ids:presence') }, 5),
   'the emptied room has no counter in Redis');

# Round 2: the room starts over; its ids go on from above round 1's.
my $c = WSClient->join(port => $nginx->port, room => 'ids', nick => 'c');
my $d = WSClient->join(port => $nginx->port, room => 'ids', nick => 'd');
ok($c->wait_for(sub { ($_[0]{type} // '') eq 'join' && $_[0]{user} eq 'd' }, 5), 'c sees d join');
my @round2 = presence_ids($c);
is(scalar(@round2), 2, 'round 2: two joins') or diag("@round2");
cmp_ok($round2[0] // 0, '>', $seen[-1] // 0, 'round 2 starts above round 1 (the counter made anew)');
push @seen, @round2;

# Round 3: Redis restarts empty while c and d stay; then e joins and d leaves.
$redis->restart;
ok($c->wait_type('notice', 10), 'c is told delivery resumed');
my $e = WSClient->join(port => $nginx->port, room => 'ids', nick => 'e');
ok($c->wait_for(sub { ($_[0]{type} // '') eq 'join' && $_[0]{user} eq 'e' }, 5), 'c sees e join');
$d->send_close(1000);
ok($c->wait_for(sub { ($_[0]{type} // '') eq 'leave' && $_[0]{user} eq 'd' }, 5), 'c sees d leave');
my @round3 = presence_ids($c);
splice(@round3, 0, scalar @round2);
is(scalar(@round3), 2, 'round 3: e joins, d leaves') or diag("@round3");
cmp_ok($round3[0] // 0, '>', $seen[-1] // 0, 'after the Redis restart the ids go on above the ones before');
push @seen, @round3;

is(scalar(grep { !defined } @seen), 0, 'every presence id is p and digits (no float notation)');
my %count;
$count{$_ // ''}++ for @seen;
is_deeply([grep { $count{$_} > 1 } keys %count], [], 'no presence id was used twice');
is_deeply(\@seen, [sort { $a <=> $b } @seen], 'ids grow in the order they were sent');

$_->disconnect for $c, $e;
$nginx->stop;
done_testing;
