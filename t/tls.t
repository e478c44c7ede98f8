# wss:// through nginx's own TLS (listen ... ssl): the handshake, messages of
# every size class (TLS records are 16 KiB) and the close handshake, with the
# module writing through nginx's TLS layer.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use File::Temp qw(tempdir);
use Test::More;
use ChatTest;
use WSClient;

my $openssl = '/usr/bin/openssl';
plan skip_all => 'openssl not found' unless -x $openssl || $ENV{CI};

my $dir = tempdir(CLEANUP => 1);
system($openssl, qw(req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost),
       '-keyout', "$dir/key.pem", '-out', "$dir/cert.pem") == 0
    or BAIL_OUT('openssl could not make a test certificate');

my $redis = start_redis();
my $nginx = start_nginx(chat_config(
    listen => 'ssl',
    server => "        ssl_certificate $dir/cert.pem;\n        ssl_certificate_key $dir/key.pem;\n",
), redis => $redis);
my $port = $nginx->port;

my $a = WSClient->join(port => $port, room => 'tls', nick => 'alice', tls => 1);
my $b = WSClient->join(port => $port, room => 'tls', nick => 'bob', tls => 1);
ok($a && $b, 'two clients joined over TLS');

for my $size (1, 1000, 16_000, 40_000) {
    my $text = 'x' x $size;
    $a->send_text($text);
    for my $c ([alice => $a], [bob => $b]) {
        my $ev = $c->[1]->wait_for(sub { $_[0]{type} eq 'message' }, 5);
        is(length($ev ? $ev->{text} : ''), $size, "$c->[0] received the $size-byte message over TLS");
    }
}

$a->send_close(1000, 'bye');
my $close = $a->recv_close(5);
is($close && $close->{close_code}, 1000, 'close handshake over TLS echoes 1000');
ok($a->is_closed_by_server(5), 'server closes the TLS connection after the close handshake');

my $leave = $b->wait_for(sub { $_[0]{type} eq 'leave' }, 5);
is($leave && $leave->{user}, 'alice', 'the other member sees the leave');

$nginx->stop;
$redis->stop;
done_testing;
