# Self-test of t/lib/ChatTest.pm against plain nginx (the module is not
# loaded) and a real redis-server: process control, RESP client, reload,
# config test, log access.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest '-no_module';
use WSClient;

my $redis = start_redis();
ok($redis->port > 0, 'redis started');
is($redis->cmd('PING'), 'PONG', 'PING');
is($redis->cmd('SET', 'k', "v\r\nx"), 'OK', 'SET with CRLF in value');
is($redis->cmd('GET', 'k'), "v\r\nx", 'GET bulk string');
is($redis->cmd('GET', 'nokey'), undef, 'nil bulk');
is($redis->cmd('INCR', 'n'), 1, 'integer reply');
is_deeply($redis->cmd('PUBSUB', 'NUMSUB', 'wschat:none'), ['wschat:none', 0], 'array reply');
is($redis->numsub('none'), 0, 'numsub helper');
ok(!eval { $redis->cmd('NOSUCHCOMMAND'); 1 } && $@ =~ /unknown command/i, 'error reply dies');
is(scalar($redis->client_list), 0, 'client_list excludes own connection');

$redis->restart;
is($redis->cmd('PING'), 'PONG', 'PING after restart on the same port');

my $pw = start_redis(requirepass => 's3cret');
is($pw->cmd('PING'), 'PONG', 'AUTH with requirepass');
my $pwpid = $pw->{pid};
$pw->kill;
ok(!kill(0, $pwpid), "redis killed");

my $conf = <<'EOF';
worker_processes 2;
events { worker_connections 256; }
http {
    access_log %%PREFIX%%/logs/access.log;
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { return 200 "pid=$pid redis=%%REDIS_PORT%% x=%%X%%\n"; }
    }
}
EOF
my $n = start_nginx($conf, redis => $redis, X => 'hello', workers => 2);
my @w = $n->worker_pids;
is(scalar @w, 2, 'two workers found via /proc');
my ($st, $h, $raw) = WSClient::raw_handshake($n->port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
is($st, 200, 'plain request served');
like($raw, qr/redis=\d+ x=hello/, 'template variables substituted');
my ($pid) = $raw =~ /pid=(\d+)/;
ok((grep { $_ == $pid } @w), 'served by one of the workers');
ok(wait_until(sub { $n->access_log_text =~ /GET \/ HTTP/ }, 5), 'access log readable');

my @new = $n->reload;
is(scalar @new, 2, 'two workers after reload');
ok(!(grep { my $o = $_; grep { $_ == $o } @w } @new), 'all workers replaced');

my ($code, $out, $path) = test_config("events {}\nhttp { bogus_directive; }\n");
isnt($code, 0, 'nginx -t fails on bad config');
like($out, qr/\Q$path\E:\d+/, 'output names file and line');
($code, $out) = test_config("events {}\nhttp { }\n");
is($code, 0, 'nginx -t passes on good config') or diag($out);

ok(!eval { test_template_var(); 1 }, 'unknown template variable dies');
sub test_template_var { start_nginx("events {}\nhttp { %%NOPE%% }\n") }

my $n2 = start_nginx("events {}\nhttp { server { listen 127.0.0.1:%%PORT%%; } }\n");
$n2->stop;    # explicit stop records its own checks
ok(!kill(0, $n2->pid), 'master gone after stop');

done_all();
