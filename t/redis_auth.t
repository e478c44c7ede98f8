# Redis with a password (--requirepass s3cret).
# * redis://:s3cret@127.0.0.1:PORT: members chat normally.
# * a wrong password: the handshake still succeeds (101), the member gets a
#   "redis_unavailable" error event and no welcome; the error log has the
#   "refused the subscriber connection's AUTH" line with Redis' reason
#   (and the same for the command connection)
#   and the worker retries at a backed-off pace, not in a busy loop (counted
#   in the error log and in Redis' AUTH call count over 3 s).
# * redis://user:password@127.0.0.1:PORT/2 with an ACL user: members chat,
#   and the worker's connections are authenticated as that user on db 2.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $redis = start_redis(requirepass => 's3cret');
my $rport = $redis->port;

sub auth_calls {
    my $s = $redis->cmd('INFO', 'commandstats');
    return $s =~ /^cmdstat_auth:calls=(\d+)/m ? $1 : 0;
}

# Two members chat through $port; returns true when both got the message.
sub chat_ok {
    my ($port, $room, $what) = @_;
    my ($a, $b) = eval {
        (WSClient->join(port => $port, room => $room, nick => 'ann'),
         WSClient->join(port => $port, room => $room, nick => 'ben'));
    };
    ok($a && $b, "$what: two members joined (welcome)") or do { diag($@); return };
    $b->send_text("hello from ben ($what)");
    for my $x ([ann => $a], [ben => $b]) {
        my $m = $x->[1]->wait_type('message', 5);
        is($m && $m->{text}, "hello from ben ($what)", "$what: $x->[0] receives the message");
    }
    return ($a, $b);
}

# --- the right password
{
    my $nginx = start_nginx_ok('nginx starts with redis://:s3cret@127.0.0.1:PORT',
        chat_config(redis => 'redis://:s3cret@127.0.0.1:%%REDIS_PORT%%'), redis => $redis);
    my @c = chat_ok($nginx->port, 'auth', 'right password');
    is(scalar(log_lines($nginx, qr/refused the \w+ connection's AUTH/)), 0,
       'right password: no refused AUTH line in the error log');
    $_->send_close(1000) for @c;
    $_->is_closed_by_server(5) for @c;
    $nginx->stop;
}

# --- a wrong password
{
    # The refusals this block provokes: each connection's AUTH is refused
    # (with Redis' reason) and the link drops it and retries.
    my $at = qr/websocket_chat: Redis redis:\/\/:\*\*\*\@127\.0\.0\.1:$rport/;
    my $nginx = start_nginx_ok('nginx starts with redis://:wrong@127.0.0.1:PORT',
        chat_config(workers => 1, redis => 'redis://:wrong@127.0.0.1:%%REDIS_PORT%%',
                    http => 'websocket_chat_redis_timeout 1s;'),
        redis => $redis,
        allow_errors => [
            qr/\[error\] \d+#\d+: $at refused the (?:subscriber|command) connection's AUTH: .*(?:WRONGPASS|invalid password|invalid username-password)/,
            qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis redis:\/\/:\*\*\*\@127\.0\.0\.1:$rport lost: command refused; retrying in \d+ ms$/,
        ]);
    my $auth0 = auth_calls();
    my $c = eval { WSClient->connect(port => $nginx->port, path => '/ws?room=auth&nick=carl') };
    ok($c, 'wrong password: the WebSocket handshake succeeds (101)') or diag($@);
    SKIP: {
        skip 'no session', 3 unless $c;
        my $first = $c->wait_for(sub { $_[0]{type} eq 'welcome' || $_[0]{type} eq 'error' }, 5);
        is($first && $first->{type}, 'error', 'wrong password: the member gets an error event, not a welcome')
            or diag(explain($first));
        is($first && $first->{code}, 'redis_unavailable', 'wrong password: code redis_unavailable');
        ok(!$c->wait_type('welcome', 2), 'wrong password: no welcome within 2 s');
    }

    my $refused_re = qr/websocket_chat: Redis \S*127\.0\.0\.1:$rport refused the subscriber connection's AUTH: /;
    my @l;
    ok(wait_until(sub { @l = log_lines($nginx, $refused_re) }, 5),
       'error log: "Redis ...127.0.0.1:PORT refused the subscriber connection\'s AUTH"')
        or diag(join "\n", grep { defined } (log_lines($nginx, qr/websocket_chat/))[0 .. 11]);
    ok(@l && $l[0] =~ /WRONGPASS|invalid password|invalid username-password/i,
       'the refused line carries Redis\' reason (WRONGPASS / invalid password)')
        or diag($l[0] // 'no line');

    # The command connection authenticates even while PUBLISHes wait for the
    # subscriber, so its refusal is logged as well.
    ok(wait_until(sub { log_lines($nginx,
            qr/refused the command connection's AUTH: .*(?:WRONGPASS|invalid)/i) }, 5),
       'error log: the command connection\'s AUTH refusal is logged too');

    # no busy loop: count over 3 s
    my $lines0 = () = log_lines($nginx, $refused_re);
    my $calls0 = auth_calls();
    my $t0 = time;
    # the window ends early only when both limits are already exceeded
    wait_until(sub {
        log_lines($nginx, $refused_re) - $lines0 >= 20 && auth_calls() - $calls0 >= 20
    }, 3, 0.1);
    my $dt = time - $t0;
    my $lines = log_lines($nginx, $refused_re) - $lines0;
    my $calls = auth_calls() - $calls0;
    diag(sprintf 'wrong password: over %.1f s, %d "refused the subscriber connection" lines, '
         . '%d AUTH calls (both connections); %d AUTH calls since nginx started',
         $dt, $lines, $calls, auth_calls() - $auth0);
    ok($lines < 20, "retries are backed off: fewer than 20 refused-subscriber lines in 3 s ($lines)")
        or diag(join "\n", grep { defined } (log_lines($nginx, qr/websocket_chat/))[0 .. 11]);
    ok($calls < 20, "retries are backed off: fewer than 20 AUTH calls in 3 s on both connections ($calls)");

    ok($c && !$c->eof && !$c->got_close, 'wrong password: the session stays open');
    $c->disconnect if $c;
    $nginx->stop;
}

# --- redis://user:password@host:port/db with an ACL user
{
    is($redis->cmd('ACL', 'SETUSER', 'chat', 'reset', 'on', '>chatpw', '~*', '&*', '+@all'), 'OK',
       'ACL user "chat" created');
    my $nginx = start_nginx_ok('nginx starts with redis://chat:chatpw@127.0.0.1:PORT/2',
        chat_config(redis => 'redis://chat:chatpw@127.0.0.1:%%REDIS_PORT%%/2'), redis => $redis);
    my @c = chat_ok($nginx->port, 'acl', 'ACL user, db 2');
    my @cl;
    wait_until(sub { @cl = grep { ($_->{user} // '') eq 'chat' } $redis->client_list; @cl >= 2 }, 5);
    is(scalar(@cl), 2, 'CLIENT LIST: two connections authenticated as user "chat"')
        or diag(join "\n", map { "addr=$_->{addr} user=$_->{user} db=$_->{db} cmd=$_->{cmd}" } $redis->client_list);
    my @db2 = grep { ($_->{db} // '') eq '2' } @cl;
    my ($cmdconn) = grep { ($_->{flags} // '') !~ /P/ } @cl;
    ok($cmdconn && $cmdconn->{db} eq '2', 'the command connection selected db 2')
        or diag(join "\n", map { "addr=$_->{addr} flags=$_->{flags} db=$_->{db} cmd=$_->{cmd}" } @cl);
    $_->send_close(1000) for @c;
    $_->is_closed_by_server(5) for @c;
    $nginx->stop;
}

done_all();
