# websocket_chat_access_log: when nginx writes a session's access-log line.
# close: when the session ends, with every byte sent;
# upgrade (the default): right after the 101, when the HTTP request is freed and the
# session goes on without it (messages, a large handshake's buffers,
# heartbeats, protocol errors, the close handshake, graceful shutdown).
# The memory that frees is checked against the same clients kept at close.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();

# $mode undef: the directive is left out (the default).
sub start {
    my ($mode, %o) = @_;
    my $directive = defined $mode ? "websocket_chat_access_log $mode;" : '';
    return start_nginx(chat_config(
        http => "log_format wsc '\$request_uri \$status \$bytes_sent';\n"
              . "    websocket_chat_ping_interval 1s;\n    websocket_chat_idle_timeout 3s;",
        location => "access_log %%PREFIX%%/logs/sessions.log wsc;\n"
                  . "            $directive",
        worker_connections => 4096,
        %o,
    ), redis => $redis);
}

sub session_line {
    my ($nginx, $nick) = @_;
    my $log = ChatTest::_slurp($nginx->prefix . '/logs/sessions.log') // '';
    return $log =~ m{^(/ws\?room=\w+&nick=$nick (\d+) (\d+))$}m ? { status => $2, bytes => $3 } : undef;
}

my $big = 'z' x 2000;

# --- close: the line comes when the session ends, with the frames counted
{
    my $nginx = start('close');
    my $a = WSClient->join(port => $nginx->port, room => 'c', nick => 'c1');
    $a->send_text($big);
    ok($a->wait_for(sub { $_[0]{type} eq 'message' }, 5), 'close: the session chats');
    ok(!session_line($nginx, 'c1'), 'close: no access-log line while the session is open');
    $a->send_close(1000, 'bye');
    ok($a->recv_close(5), 'close: close handshake');
    ok(wait_until(sub { session_line($nginx, 'c1') }, 5), 'close: the line is written at the end');
    my $line = session_line($nginx, 'c1');
    is($line && $line->{status}, 101, 'close: status 101');
    cmp_ok($line ? $line->{bytes} : 0, '>', length $big, 'close: bytes sent count the frames');
    $nginx->stop;
}

# --- the default is upgrade: the line comes while the session is open
{
    my $nginx = start(undef);
    my $a = WSClient->join(port => $nginx->port, room => 'd', nick => 'd1');
    ok(wait_until(sub { session_line($nginx, 'd1') }, 5),
       'default: the line is written while the session is open (upgrade)');
    my $line = session_line($nginx, 'd1');
    cmp_ok($line ? $line->{bytes} : 1e9, '<', 1000, 'default: bytes sent are the 101 header');
    $a->send_text('still here');
    ok($a->wait_for(sub { $_[0]{type} eq 'message' && $_[0]{text} eq 'still here' }, 5),
       'default: the session chats on without its request');
    $a->send_close(1000);
    ok($a->recv_close(5), 'default: close handshake');
    $nginx->stop;
}

# --- upgrade: the line comes at once; the session goes on without the request
{
    my $nginx = start('upgrade');
    my $port = $nginx->port;
    my $a = WSClient->join(port => $port, room => 'u', nick => 'u1');
    ok(wait_until(sub { session_line($nginx, 'u1') }, 5),
       'upgrade: the line is written while the session is open');
    my $line = session_line($nginx, 'u1');
    is($line && $line->{status}, 101, 'upgrade: status 101');
    cmp_ok($line ? $line->{bytes} : 1e9, '<', 1000, 'upgrade: bytes sent are the 101 header');

    # A handshake too big for the 1k header buffer takes one of nginx's large
    # header buffers, which goes back with the request.
    my $b = WSClient->join(port => $port, room => 'u', nick => 'u2',
                           headers => { Cookie => 'k=' . ('c' x 3000) });
    ok(wait_until(sub { session_line($nginx, 'u2') }, 5), 'upgrade: a 3 kB handshake is logged too');
    $a->send_text($big);
    for my $c ([u1 => $a], [u2 => $b]) {
        my $ev = $c->[1]->wait_for(sub { $_[0]{type} eq 'message' }, 5);
        is($ev && $ev->{text}, $big, "upgrade: $c->[0] receives a message sent after the request went");
    }

    $b->send_frame(opcode => 1, payload => 'x', rsv => 4);
    my $pc = $b->recv_close(5);
    is($pc && $pc->{close_code}, 1002, 'upgrade: a protocol error is closed 1002');
    ok(wait_until(sub { $nginx->error_log_text =~ /closing session of "u2" in "u": 1002 reserved bits set, client: 127\.0\.0\.1,/ }, 5),
       'upgrade: the error log names the client (and no stale action)');

    my $gone = $a->wait_for(sub { $_[0]{type} eq 'leave' && $_[0]{user} eq 'u2' }, 5);
    ok($gone, 'upgrade: the room hears of the leave');

    # Members that do not read miss their pings too: this comes last.
    my $quiet = WSClient->join(port => $port, room => 'u', nick => 'quiet', auto_pong => 0);
    my ($ping, $close);
    wait_until(sub {
        for my $f ($quiet->pending_frames(0.05)) {
            $ping = 1 if $f->{opcode} == 9;
            $close = $f if $f->{opcode} == 8;
        }
        return $close || $quiet->eof;
    }, 8);
    ok($ping, 'upgrade: heartbeat pings are sent');
    is($close && $close->{close_code}, 1001, 'upgrade: a silent client is closed 1001 on idle timeout');

    my $r = WSClient->join(port => $port, room => 'u', nick => 'u3');
    $nginx->reload;
    my $bye = $r->recv_close(5);
    is($bye && $bye->{close_code}, 1001, 'upgrade: reload closes the session 1001');
    $nginx->stop;
}

# --- the memory freed: worker growth for the same idle clients in each mode
my %per_conn;
for my $mode (qw(close upgrade)) {
    my $nginx = start($mode);
    my ($worker) = $nginx->worker_pids;
    WSClient->join(port => $nginx->port, room => 'warm', nick => 'w');
    my $before = proc_rss_kb($worker);
    my @clients = map { WSClient->join(port => $nginx->port, room => "m$_", nick => "m$_") } 1 .. 1500;
    ok(wait_until(sub { my $n = () = (ChatTest::_slurp($nginx->prefix . '/logs/sessions.log') // '') =~ /nick=m/g;
                        $mode eq 'close' || $n == 1500 }, 10), "$mode: 1500 idle sessions");
    $per_conn{$mode} = (proc_rss_kb($worker) - $before) * 1024 / 1500;
    note(sprintf '%s: worker grew %.0f bytes per idle session', $mode, $per_conn{$mode});
    $_->disconnect for @clients;
    $nginx->stop;
}
cmp_ok($per_conn{close} - $per_conn{upgrade}, '>', 4096,
       'freeing the request saves more than 4 kB per idle session');

$redis->stop;
done_all();
