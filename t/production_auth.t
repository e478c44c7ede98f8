# The chat behind the pieces an operator puts in front of it, in one config:
# * identity from auth_request: an auth service (a second server here) answers
#   204 + X-User for a good bearer token, 403 for a banned one, 401 otherwise;
#   websocket_chat_user takes $chat_user from auth_request_set. Refused
#   clients get the auth service's status and no session (no join, no entry in
#   Redis's member list); an accepted one is the user the service named, not
#   the nick in its URL;
# * limit_conn 3 per client address: the fourth concurrent session from
#   127.0.0.1 gets 503 while 127.0.0.2 still connects, and a closed session
#   gives its slot back (exactly one). Run with websocket_chat_access_log
#   upgrade (the default, where nginx's request is freed after the 101) and
#   close: the count must last as long as the session in both;
# * websocket_chat_status behind allow/deny: 403 from 127.0.0.1, the JSON
#   from 127.0.0.2.
# WSClient always connects from 127.0.0.1, so the 127.0.0.2 client is a plain
# socket bound to that address (request_from below).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET ();
use IO::Select ();
use JSON::PP ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my %AUTH = map { ($_ => { Authorization => "Bearer $_-token" }) } qw(alice bob banned);

# $mode undef: websocket_chat_access_log is left out (the default).
sub config {
    my ($mode) = @_;
    my $log_mode = defined $mode ? "websocket_chat_access_log $mode;" : '';
    return <<"EOT";
worker_processes 1;
events { worker_connections 1024; }
http {
    access_log %%PREFIX%%/logs/access.log;
    websocket_chat_redis 127.0.0.1:%%REDIS_PORT%%;
    limit_conn_zone \$binary_remote_addr zone=peraddr:1m;

    map \$http_authorization \$token_user {
        "Bearer alice-token" alice;
        "Bearer bob-token"   bob;
        default              "";
    }

    # The auth service.
    server {
        listen 127.0.0.1:%%AUTH_PORT%%;
        access_log %%PREFIX%%/logs/auth.log;
        location = /check {
            if (\$token_user) {
                add_header X-User \$token_user always;
                return 204;
            }
            if (\$http_authorization = "Bearer banned-token") {
                return 403;
            }
            return 401;
        }
    }

    server {
        listen 127.0.0.1:%%PORT%%;

        location = /ws {
            auth_request /_auth;
            auth_request_set \$chat_user \$upstream_http_x_user;
            limit_conn peraddr 3;
            limit_conn_status 503;
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$chat_user;
            $log_mode
        }

        location = /_auth {
            internal;
            proxy_pass http://127.0.0.1:%%AUTH_PORT%%/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }

        location = /status {
            websocket_chat_status;
            allow 127.0.0.2;
            deny all;
        }

        location / { return 404; }
    }
}
EOT
}

my $redis = start_redis();

sub start {
    my ($name, $mode) = @_;
    return start_nginx_ok($name, config($mode), redis => $redis, AUTH_PORT => free_port());
}

sub handshake {
    my ($port, $path, $who) = @_;
    my ($req) = WSClient::handshake_request(port => $port, path => $path,
                                            headers => $who ? $AUTH{$who} : {});
    return WSClient::raw_handshake($port, $req, 5);
}

# Reads from $sock into $$buf until $done->() is true, EOF or the deadline.
sub read_until {
    my ($sock, $buf, $done, $timeout) = @_;
    my $deadline = time + $timeout;
    my $sel = IO::Select->new($sock);
    until ($done->()) {
        my $left = $deadline - time;
        return 0 if $left <= 0 || !$sel->can_read($left);
        my $n = sysread($sock, $$buf, 65536, length $$buf);
        return 0 unless $n;
    }
    return 1;
}

# Sends $request to nginx from source address $src. Returns (status, head,
# socket, rest): rest is what followed the response head.
sub request_from {
    my ($src, $port, $request) = @_;
    my $s = IO::Socket::INET->new(LocalAddr => $src, PeerAddr => '127.0.0.1',
                                  PeerPort => $port, Proto => 'tcp', Timeout => 5)
        or return (undef, "cannot connect from $src: $!");
    binmode $s;
    syswrite($s, $request) == length $request or return (undef, "write: $!");
    my $buf = '';
    read_until($s, \$buf, sub { index($buf, "\r\n\r\n") >= 0 }, 5)
        or return (undef, "no response head: '$buf'");
    my $i = index($buf, "\r\n\r\n");
    my $head = substr($buf, 0, $i + 4);
    my ($status) = $head =~ m{^HTTP/\d\.\d (\d{3})};
    return ($status, $head, $s, substr($buf, $i + 4));
}

# The first JSON event matching $pred on a raw WebSocket from request_from.
sub raw_event {
    my ($s, $rest, $pred, $timeout) = @_;
    my $found;
    read_until($s, $rest, sub {
        while (my $f = WSClient::parse_frame($rest)) {
            next unless $f->{opcode} == 1;
            my $ev = eval { JSON::PP->new->utf8->decode($f->{payload}) } or next;
            return $found = $ev if $pred->($ev);
        }
        return 0;
    }, $timeout);
    return $found;
}

# Members in Redis's list of a room, as "user/session" strings.
sub redis_members {
    my $room = shift;
    my $h = $redis->cmd('HGETALL', "wschat:$room:members") // [];
    my @m;
    for (my $i = 1; $i < @$h; $i += 2) {
        my $v = eval { JSON::PP->new->utf8->decode($h->[$i]) } // {};
        push @m, ($v->{user} // '?') . '/' . ($v->{session} // '?');
    }
    return sort @m;
}

sub close_ok {
    my ($c, $name) = @_;
    $c->send_close(1000);
    ok($c->recv_close(5) && $c->is_closed_by_server(5), "$name: close handshake");
}

# ---------------------------------------------------------------------------
# identity from auth_request; refusals make no session; the status location
{
    my $nginx = start('nginx starts with auth_request, limit_conn and a status location');
    my $port = $nginx->port;
    $nginx->allow_errors(qr/access forbidden by rule, client: 127\.0\.0\.1, .*"GET \/status /);

    # --- 1. refused handshakes
    my $bob = WSClient->join(port => $port, room => 'gate', nick => 'bob', headers => $AUTH{bob});
    my $bob_sid = $bob->welcome->{session};
    ok($bob->wait_type('join', 5, sub { $_[0]{session} eq $bob_sid }), 'bob sees his own join');

    my ($st) = handshake($port, '/ws?room=gate&nick=anon');
    is($st, 401, 'no Authorization: 401 (the auth service said so), no 101');
    ($st) = handshake($port, '/ws?room=gate&nick=banned', 'banned');
    is($st, 403, 'banned token: 403, no 101');

    # Joins and member entries go out in order on the worker's Redis
    # connections, so any from the refused clients would come before alice's.
    my $alice = WSClient->join(port => $port, room => 'gate', nick => 'x', headers => $AUTH{alice});
    my $alice_sid = $alice->welcome->{session};
    ok($bob->wait_type('join', 5, sub { $_[0]{session} eq $alice_sid }), 'bob sees alice join');
    my @joins = map { "$_->{user}/$_->{session}" } grep { ($_->{type} // '') eq 'join' } $bob->events;
    is_deeply(\@joins, ["bob/$bob_sid", "alice/$alice_sid"],
              'the refused clients made no join: bob saw only his own and alice\'s');
    my @want = sort("bob/$bob_sid", "alice/$alice_sid");
    my @members;
    ok(wait_until(sub { @members = redis_members('gate'); grep { $_ eq "alice/$alice_sid" } @members }, 5),
       'alice is in Redis\'s member list');
    is_deeply(\@members, \@want, 'Redis\'s member list holds bob and alice only')
        or diag("wschat:gate:members: @members");
    close_ok($_->[0], $_->[1]) for [$alice, 'gate: alice'], [$bob, 'gate: bob'];

    # --- 2. the user is who the auth service named
    my $a = WSClient->join(port => $port, room => 'r', nick => 'mallory', headers => $AUTH{alice});
    is($a->welcome->{user}, 'alice', 'alice-token with nick=mallory: welcome user is alice');
    my $b = WSClient->join(port => $port, room => 'r', nick => 'alice', headers => $AUTH{bob});
    is($b->welcome->{user}, 'bob', 'bob-token with nick=alice: welcome user is bob');
    $a->send_text('signed by the token');
    my $m = $b->wait_type('message', 5, sub { $_[0]{text} eq 'signed by the token' });
    is($m && $m->{user}, 'alice', 'bob sees alice\'s message from user alice');
    is($m && $m->{session}, $a->welcome->{session}, '... and from her session');

    # --- 4. the status location
    my $status_req = "GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    ($st) = WSClient::raw_handshake($port, $status_req, 5);
    is($st, 403, 'GET /status from 127.0.0.1: 403 (deny all)');
    my ($st2, $head, $sock, $body) = request_from('127.0.0.2', $port, $status_req);
    is($st2, 200, 'GET /status from 127.0.0.2: 200 (allowed)') or diag($head);
    read_until($sock, \$body, sub { 0 }, 5) if $sock;    # HTTP/1.0: the body ends at EOF
    my $json = eval { JSON::PP->new->utf8->decode($body // '') };
    ok(ref $json eq 'HASH' && defined $json->{connections} && !ref $json->{connections}
       && $json->{connections} =~ /^\d+$/, 'status body is JSON with a numeric connections field')
        or diag("body: " . ($body // ''));

    close_ok($_->[0], $_->[1]) for [$a, 'r: alice'], [$b, 'r: bob'];
    $nginx->stop;
}

# ---------------------------------------------------------------------------
# 3. limit_conn peraddr 3, in both access-log modes
for my $mode (undef, 'close') {
    my $tag = defined $mode ? "access_log $mode" : 'access_log default (upgrade)';
    my $nginx = start("$tag: nginx starts", $mode);
    my $port = $nginx->port;
    $nginx->allow_errors(qr/limiting connections by zone "peraddr", client: 127\.0\.0\.1,/);
    my $room = defined $mode ? "lim-$mode" : 'lim-default';
    my $path = "/ws?room=$room";

    my @c = map { WSClient->join(port => $port, room => $room, nick => "n$_",
                                 headers => $AUTH{alice}) } 1 .. 3;
    $c[$_]->send_text("hello $_") for 0 .. 2;
    for my $i (0 .. 2) {
        my %seen;
        $c[$i]->wait_type('message', 5, sub { $seen{ $_[0]{text} } = 1; keys %seen == 3 });
        is(scalar(keys %seen), 3, "$tag: session $i of 3 from 127.0.0.1 chats (gets all three messages)");
    }
    # Every session has had its welcome and messages: the point where the
    # default mode would free nginx's request (and limit_conn's slot with
    # it) is behind them.
    my ($st) = handshake($port, "$path&nick=n4", 'alice');
    is($st, 503, "$tag: the fourth session from 127.0.0.1 gets 503, no 101");

    my ($st2, $head, $other, $rest) = request_from('127.0.0.2', $port,
        (WSClient::handshake_request(port => $port, path => "$path&nick=far", headers => $AUTH{bob}))[0]);
    is($st2, 101, "$tag: a session from 127.0.0.2 gets 101 (the limit is per address)") or diag($head);
    my $w = $other && raw_event($other, \$rest, sub { $_[0]{type} eq 'welcome' }, 5);
    is($w && $w->{user}, 'bob', "$tag: ... and is bob's chat session");

    $c[0]->send_text('still under the limit');
    ok($c[1]->wait_type('message', 5, sub { $_[0]{text} eq 'still under the limit' }),
       "$tag: the three sessions still chat after the refusal");
    ok($other && raw_event($other, \$rest, sub { $_[0]{type} eq 'message'
                                                 && $_[0]{text} eq 'still under the limit' }, 5),
       "$tag: ... and the 127.0.0.2 session hears them");

    close_ok($c[2], "$tag: session 3");
    my ($again, $tries);
    ok(wait_until(sub {
        $tries++;
        my ($s, undef, undef, $sock) = handshake($port, "$path&nick=n5", 'alice');
        $again = $sock if ($s // 0) == 101;
        return $again;
    }, 10, 0.1), "$tag: after a close handshake a new session from 127.0.0.1 gets 101");
    note("$tag: $tries handshake(s) until the slot was free");
    ($st) = handshake($port, "$path&nick=n6", 'alice');
    is($st, 503, "$tag: the slot came back once: the next one is refused again");

    $nginx->stop;
}

$redis->stop;
done_all();
