# The module's embedded variables in log_format and map:
# $websocket_chat_room, _user, _session_id, _messages_in, _messages_out,
# _close_code.
# * websocket_chat_access_log close: the line has the final values:
#   messages counted per session (own echoes included, the history batch on
#   join not), the close code of whoever closed first (client 1000, 4001, a
#   close frame without code 1005, a dropped TCP connection 1006, the server's
#   1009 for an oversized message), the session id of the welcome;
# * the default (upgrade): the line is written while the session is open,
#   with room, user and session id, 0 messages and no close code (-);
# * a map on $websocket_chat_room classifies rooms in the log;
# * outside a chat session (a plain location) each variable is not found (-).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my @FIELDS = qw(uri status room user sid in out close class);

my $redis = start_redis();

# $mode undef: websocket_chat_access_log is left out (the default).
sub start {
    my ($name, $mode) = @_;
    my $log_mode = defined $mode ? "websocket_chat_access_log $mode;" : '';
    return start_nginx_ok($name, chat_config(
        http => <<'EOT' . "    $log_mode\n",
    websocket_chat_max_message 1k;
    map $websocket_chat_room $room_class {
        default other;
        ~^vip-  vip;
    }
    log_format vars 'uri=$request_uri status=$status room=$websocket_chat_room '
                    'user=$websocket_chat_user sid=$websocket_chat_session_id '
                    'in=$websocket_chat_messages_in out=$websocket_chat_messages_out '
                    'close=$websocket_chat_close_code class=$room_class';
EOT
        server => "        access_log %%PREFIX%%/logs/vars.log vars;\n"
                . "        location = /plain { return 200 \"ok\"; }\n",
    ), redis => $redis);
}

# The parsed log lines whose request is $uri_re.
sub lines_for {
    my ($nginx, $uri_re) = @_;
    my $log = ChatTest::_slurp($nginx->prefix . '/logs/vars.log');
    my @l;
    for my $line (split /\n/, $log) {
        my %f = map { /^(\w+)=(.*)$/ ? ($1 => $2) : () } split / /, $line;
        push @l, \%f if ($f{uri} // '') =~ $uri_re;
    }
    return @l;
}

sub nick_re { qr/[?&]nick=\Q$_[0]\E(?:&|$)/ }

# Waits for the one line of $nick's session; checks it against %want.
sub line_is {
    my ($nginx, $nick, $name, %want) = @_;
    my @l;
    wait_until(sub { @l = lines_for($nginx, nick_re($nick)) }, 5);
    is(scalar(@l), 1, "$name: one access-log line") or return;
    my $got  = { map { ($_ => $l[0]{$_}) } grep { exists $want{$_} } @FIELDS };
    is_deeply($got, \%want, "$name: " . join(' ', map { $_ eq 'sid' ? 'sid=its welcome session' : "$_=$want{$_}" } grep { exists $want{$_} } @FIELDS))
        or diag(explain($l[0]));
}

# Waits until $c holds message events with each of @texts.
sub got_texts {
    my ($c, @texts) = @_;
    my %want = map { $_ => 1 } @texts;
    my %seen = map { $_->{text} => 1 } grep { ($_->{type} // '') eq 'message' && $want{ $_->{text} } }
               $c->events;
    $c->wait_type('message', 5, sub { $seen{ $_[0]{text} } = 1 if $want{ $_[0]{text} };
                                      keys %seen == keys %want })
        if keys %seen < keys %want;
    return keys %seen == keys %want;
}

# ---------------------------------------------------------------------------
# close: final values when the session ends
{
    my $nginx = start('nginx starts with websocket_chat_access_log close and the variables in log_format', 'close');
    my $port = $nginx->port;

    my $a = WSClient->join(port => $port, room => 'r1', nick => 'a');
    my $b = WSClient->join(port => $port, room => 'r1', nick => 'b');
    my @from_a = map { "a says $_" } 1 .. 3;
    my @from_b = map { "b says $_" } 1 .. 2;
    $a->send_text($_) for @from_a;
    $b->send_text($_) for @from_b;
    ok(got_texts($a, @from_a, @from_b), 'a receives all five messages (its own three included)');
    ok(got_texts($b, @from_a, @from_b), 'b receives all five messages (its own two included)');
    ok(!lines_for($nginx, qr/[?&]nick=[ab](?:&|$)/), 'no line while the sessions are open');

    $a->send_close(1000);
    ok($a->recv_close(5), 'a closes with 1000');
    $b->send_close(4001, 'going');
    ok($b->recv_close(5), 'b closes with 4001');
    line_is($nginx, 'a', 'a', status => 101, room => 'r1', user => 'a', sid => $a->welcome->{session},
            in => 3, out => 5, close => 1000, class => 'other');
    line_is($nginx, 'b', 'b', status => 101, room => 'r1', user => 'b', sid => $b->welcome->{session},
            in => 2, out => 5, close => 4001, class => 'other');

    # r1's five messages reach c as its history on join: not counted as out.
    my $c = WSClient->join(port => $port, room => 'r1', nick => 'c');
    my $h = $c->wait_type('history', 5);
    is($h && ref $h->{messages} eq 'ARRAY' && scalar @{ $h->{messages} }, 5, 'c gets the five as history');
    $c->disconnect;
    line_is($nginx, 'c', 'c drops the TCP connection', room => 'r1', user => 'c',
            sid => $c->welcome->{session}, in => 0, out => 0, close => 1006);

    my $d = WSClient->join(port => $port, room => 'r1', nick => 'd');
    $d->send_text('x' x 1025);
    my $f = $d->recv_close(5);
    is($f && $f->{close_code}, 1009, 'd: an oversized message is closed 1009');
    # Answered and closed, as clients do: nginx did not read all of the
    # message, so it lingers (lingering_timeout) until the client closes, and
    # logs after that. The code stays the one the server sent first.
    $d->send_close(1000);
    ok($d->is_closed_by_server(5), 'd: the server closes the TCP connection');
    $d->disconnect;
    line_is($nginx, 'd', 'd, closed by the server', user => 'd', close => 1009);

    my $e = WSClient->join(port => $port, room => 'r1', nick => 'e');
    $e->send_close;
    ok($e->recv_close(5), 'e closes with a close frame without code');
    line_is($nginx, 'e', 'e', user => 'e', in => 0, out => 0, close => 1005);

    my $v = WSClient->join(port => $port, room => 'vip-1', nick => 'v');
    $v->send_text('vip talk');
    ok(got_texts($v, 'vip talk'), 'v chats in vip-1');
    $v->send_close(1000);
    ok($v->recv_close(5), 'v closes');
    line_is($nginx, 'v', 'v in vip-1', room => 'vip-1', in => 1, out => 1, close => 1000, class => 'vip');

    my ($st) = WSClient::raw_handshake($port, "GET /plain HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", 5);
    is($st, 200, 'GET /plain: 200');
    my @p;
    wait_until(sub { @p = lines_for($nginx, qr{^/plain$}) }, 5);
    is(scalar(@p), 1, '/plain: one access-log line');
    is_deeply({ map { ($_ => $p[0]{$_}) } qw(room user sid in out close) },
              { map { ($_ => '-') } qw(room user sid in out close) },
              '/plain: every chat variable is not found (-)')
        or diag(explain($p[0]));
    $nginx->stop;
}

# ---------------------------------------------------------------------------
# upgrade (the default): the line while the session is open
{
    my $nginx = start('nginx starts with the default access-log mode and the variables in log_format');
    my $port = $nginx->port;

    my $g = WSClient->join(port => $port, room => 'r2', nick => 'g');
    line_is($nginx, 'g', 'g, session open', status => 101, room => 'r2', user => 'g',
            sid => $g->welcome->{session}, in => 0, out => 0, close => '-', class => 'other');
    $g->send_text('after the line');
    ok(got_texts($g, 'after the line'), 'g chats on after its line');
    $g->send_close(1000);
    ok($g->recv_close(5) && $g->is_closed_by_server(5), 'g closes');

    # Lines are written in order: once h's is there, a second one for g
    # written at its end would be too.
    my $h = WSClient->join(port => $port, room => 'vip-2', nick => 'h');
    line_is($nginx, 'h', 'h in vip-2, session open', room => 'vip-2', user => 'h',
            sid => $h->welcome->{session}, in => 0, out => 0, close => '-', class => 'vip');
    is(scalar(lines_for($nginx, nick_re('g'))), 1, 'g still has one line after its session ended');
    $h->send_close(1000);
    ok($h->recv_close(5), 'h closes');
    $nginx->stop;
}

$redis->stop;
done_all();
