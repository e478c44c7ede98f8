# websocket_chat_publish: the HTTP endpoint a backend POSTs a chat message to.
# (1) 201 {"id","room"}: the message reaches every member on both workers as a
#     message event with the configured user, a session of its own and the id
#     of the answer; POSTs interleaved with a member's chat messages keep one
#     order for all members; the messages are in the room's history and a
#     resume with since=<id> gets those after it;
# (2) a chunked body (split inside UTF-8 characters) arrives intact; an empty
#     user becomes guest-NNNN;
# (3) 400 bad_request for invalid UTF-8, an empty body (Content-Length 0 or
#     chunked), a room with a control character or of 65 characters (64 pass);
# (4) 413 with websocket_chat_max_message 1k for 1025 bytes (Content-Length,
#     answered before the body is sent; chunked), 1024 bytes pass both ways;
# (5) 405 with Allow: POST for GET and PUT;
#     after each refusal, nothing reached the room and the endpoint still works;
# (6) Redis down, websocket_chat_redis_backlog 1k: POSTs wait while the backlog
#     has room, the first that does not fit gets 503 redis_unavailable at once;
#     with Redis back the waiting ones get 201 and a member connected before
#     the outage receives exactly them, once each, in order.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use IO::Select;
use JSON::PP ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatIds;
use ChatFault;

my $JSON = JSON::PP->new->utf8;
# test names and diagnostics carry the UTF-8 text of part (2)
binmode(Test::More->builder->$_, ':encoding(UTF-8)') for qw(output failure_output todo_output);

# ---------------------------------------------------------------- HTTP client
# A raw HTTP/1.1 client, so that the test controls the framing of the body
# (Content-Length, chunked, headers without the body) and can keep requests
# open while their answers are pending.

# Open a connection and write a request; returns the connection state for
# http_poll. %o: port, method (POST), path, body (bytes), chunks (arrayref of
# byte strings: sent chunked), headers (arrayref of [name, value]),
# send_body (1; 0 writes only the head).
sub http_send {
    my (%o) = @_;
    my $method = $o{method} // 'POST';
    my $head = "$method $o{path} HTTP/1.1\r\nHost: 127.0.0.1:$o{port}\r\nConnection: close\r\n";
    $head .= "$_->[0]: $_->[1]\r\n" for @{ $o{headers} // [] };
    my $body = '';
    if ($o{chunks}) {
        $head .= "Transfer-Encoding: chunked\r\n";
        $body = join('', map { sprintf("%x\r\n", length) . "$_\r\n" } @{ $o{chunks} }) . "0\r\n\r\n";
    } elsif (defined $o{body}) {
        $head .= 'Content-Length: ' . length($o{body}) . "\r\n";
        $body = $o{body};
    }
    my $req = "$head\r\n" . (($o{send_body} // 1) ? $body : '');
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $o{port},
                                  Proto => 'tcp', Timeout => 5)
        or die "http_send: cannot connect to 127.0.0.1:$o{port}: $!\n";
    binmode $s;
    my $conn = { sock => $s, buf => '', t0 => time };
    my $sel = IO::Select->new($s);
    my $off = 0;
    while ($off < length $req) {
        last unless $sel->can_write(5);
        my $n = syswrite($s, $req, length($req) - $off, $off);
        last unless defined $n;    # the server may answer and close early
        $off += $n;
    }
    return $conn;
}

# The response once complete (read within $timeout seconds), else undef:
# {status, headers (lower-case names), body (bytes, de-chunked), json, elapsed}.
# A connection closed without a response gives {status => undef}.
sub http_poll {
    my ($conn, $timeout) = @_;
    return $conn->{res} if $conn->{res};
    my $deadline = time + ($timeout // 0);
    my $sel = IO::Select->new($conn->{sock});
    while (1) {
        my $res = _parse_response($conn->{buf}, $conn->{eof});
        if ($res) {
            $res->{elapsed} = time - $conn->{t0};
            close $conn->{sock};
            return $conn->{res} = $res;
        }
        my $left = $deadline - time;
        return undef unless $sel->can_read($left > 0 ? $left : 0);
        my $n = sysread($conn->{sock}, $conn->{buf}, 65536, length $conn->{buf});
        $conn->{eof} = 1 unless $n;
    }
}

sub _parse_response {
    my ($buf, $eof) = @_;
    my $i = index($buf, "\r\n\r\n");
    if ($i < 0) { return $eof ? { status => undef, raw => $buf } : undef }
    my ($head, $rest) = (substr($buf, 0, $i), substr($buf, $i + 4));
    my ($status_line, @lines) = split /\r\n/, $head;
    my ($status) = $status_line =~ m{^HTTP/1\.[01] (\d{3})};
    my %h;
    for (@lines) {
        next unless /^([^:\s]+)\s*:\s*(.*?)\s*$/;
        $h{lc $1} = exists $h{lc $1} ? "$h{lc $1}, $2" : $2;
    }
    my $body;
    if (($h{'transfer-encoding'} // '') =~ /chunked/i) {
        $body = '';
        my $p = 0;
        while (1) {
            my $e = index($rest, "\r\n", $p);
            return $eof ? { status => undef, raw => $buf } : undef if $e < 0;
            my $len = hex substr($rest, $p, $e - $p);
            return $eof ? { status => undef, raw => $buf } : undef
                if length($rest) < $e + 2 + $len + 2;
            last if $len == 0;
            $body .= substr($rest, $e + 2, $len);
            $p = $e + 2 + $len + 2;
        }
    } elsif (defined $h{'content-length'}) {
        return undef if length($rest) < $h{'content-length'} && !$eof;
        $body = substr($rest, 0, $h{'content-length'});
    } else {
        return undef unless $eof;
        $body = $rest;
    }
    my $json = eval { $JSON->decode($body) };
    return { status => $status, headers => \%h, body => $body,
             json => ref $json eq 'HASH' ? $json : undef, raw => $buf };
}

# Send a request and wait (5 s) for its response; never undef.
sub http {
    my (%o) = @_;
    my $conn = http_send(%o);
    return http_poll($conn, $o{timeout} // 5) // { status => undef, raw => $conn->{buf} };
}

sub post { my ($port, $path, $body, %o) = @_; http(port => $port, path => $path, body => $body, %o) }

sub short { my $s = join ' ', map { $_ // 'undef' } @_; length $s > 300 ? substr($s, 0, 300) . '...' : $s }

# The answer has $status and a JSON object body with Content-Type
# application/json; returns the object (or {}).
sub answer_is {
    my ($res, $status, $name) = @_;
    is($res->{status}, $status, "$name -> $status")
        or diag('response: ' . short($res->{raw} // ''));
    like($res->{headers}{'content-type'} // '', qr{^application/json\b}, "$name: Content-Type application/json");
    ok($res->{json}, "$name: the body is a JSON object") or diag('body: ' . short($res->{body}));
    return $res->{json} // {};
}

# ---------------------------------------------------------------- members

# Every member's next message events are exactly @texts (the last one
# marks the end). Returns each member's events.
sub members_get_only {
    my ($members, $texts, $name) = @_;
    my ($ok, @all, $first_bad) = (0);
    for my $i (0 .. $#$members) {
        my ($m) = messages_until($members->[$i], $texts->[-1], 10);
        push @all, $m;
        my @got = map { $_->{text} } @$m;
        if (join("\0", @got) eq join("\0", @$texts)) { $ok++ }
        else { $first_bad //= "member $i received: " . short(map { length > 40 ? substr($_, 0, 40) . '...' : $_ } @got) }
    }
    is($ok, scalar @$members, "$name: every member receives exactly " . short(map { length > 20 ? length($_) . ' bytes' : $_ } @$texts))
        or diag($first_bad);
    return @all;
}

my $PUBLISH = q{
        location = /publish {
            websocket_chat_publish;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_user;
        }
        location = /publish1k {
            websocket_chat_publish;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_user;
            websocket_chat_max_message 1k;
        }
};

# ================================================================ main nginx

my $MIN_MEMBERS = 4;     # members in room r1, on both workers
my $MAX_CONNECT = 40;    # bound on the connections opened to get there
my $MAX_SECONDS = 15;    # bound on the time spent connecting

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with 2 workers (reuseport) and websocket_chat_publish locations',
    chat_config(workers => 2, listen => 'reuseport', server => $PUBLISH), redis => $redis, workers => 2);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;

# reuseport spreads connections by a hash of the client's port: keep joining
# until both workers hold members (see t/chat_workers.t).
my (@members, %on);
my $t0 = time;
while (@members < $MAX_CONNECT && time - $t0 < $MAX_SECONDS) {
    push @members, WSClient->join(port => $port, room => 'r1', nick => 'm' . scalar(@members));
    my @owner = client_workers($nginx, \@members, @workers);
    %on = ();
    $on{ $owner[$_] // '' }++ for 0 .. $#members;
    last if @members >= $MIN_MEMBERS && !grep { !$on{$_} } @workers;
}
is(scalar(grep { $on{$_} } @workers), 2, 'members of r1 on both workers')
    or diag('members per worker: ' . join ', ', map { "$_: " . ($on{$_} // 0) } sort keys %on);
ok(wait_until(sub { $redis->numsub('r1') == 2 }, 5), 'both workers follow r1');
my %member_session = map { ($_->welcome->{session} // '') => 1 } @members;

# ---------------------------------------------------------------- (1)
my $r = post($port, '/publish?room=r1&user=backend', 'text',
             headers => [['Content-Type', 'application/x-www-form-urlencoded']]);
my $j = answer_is($r, 201, 'POST text');
ok(is_pos($j->{id}), 'the 201 carries a message id like those of events (' . ($j->{id} // 'undef') . ')');
is($j->{room}, 'r1', 'the 201 names the room');
my $first_id = $j->{id};

{
    my ($ok, @sessions, $bad) = (0);
    for my $i (0 .. $#members) {
        my ($m) = messages_until($members[$i], 'text', 5);
        my $e = $m->[-1];
        if (@$m == 1 && $e->{user} eq 'backend' && ($e->{id} // '') eq ($first_id // '-')
            && $e->{room} eq 'r1' && ($e->{ts} // '') =~ /^\d+$/) {
            $ok++;
            push @sessions, $e->{session};
        } else {
            $bad //= "member $i: " . short(map { $_->{_raw} } @$m);
        }
    }
    is($ok, scalar @members, 'every member on both workers receives it once: user backend, room r1, ts, the same id')
        or diag($bad);
    my %s = map { ($_ // '') => 1 } @sessions;
    ok(keys(%s) == 1 && length((keys %s)[0]), 'the message has one session, the same for all members')
        or diag('sessions: ' . short(@sessions));
    ok(!grep({ $member_session{$_} } keys %s), "the publisher's session is none of the members'");
}

# Interleaved: a member's chat message, then a POST, five times. Which of
# each pair Redis gets first is not fixed; every member must see one order.
my (@seq_sent, %post_id);
for my $i (1 .. 5) {
    $members[0]->send_text("c$i");
    my $p = post($port, '/publish?room=r1&user=backend', "p$i");
    is($p->{status}, 201, "POST p$i -> 201") or diag(short($p->{raw}));
    $post_id{"p$i"} = $p->{json} && $p->{json}{id};
}
# c5 back at its sender means c1..c5 are published: a POST now comes after all ten.
my ($m0_part) = messages_until($members[0], 'c5', 5);
is(post($port, '/publish?room=r1&user=backend', 'end-1')->{status}, 201, 'POST end-1 -> 201');
my @seqs;
for my $i (0 .. $#members) {
    my ($m, $found) = messages_until($members[$i], 'end-1', 10);
    $m = [@$m0_part, @$m] if $i == 0;
    push @seqs, $m;
}
{
    my @texts0 = map { $_->{text} } @{ $seqs[0] };
    my @ten = grep { /^[cp]\d$/ } @texts0;
    is_deeply([sort @ten], [sort map { ("c$_", "p$_") } 1 .. 5], 'member 0 receives c1..c5 and p1..p5 once each')
        or diag("member 0: @texts0");
    is_deeply([grep { /^p/ } @ten], [map { "p$_" } 1 .. 5], 'the POSTs arrive in the order they were answered');
    is_deeply([grep { /^c/ } @ten], [map { "c$_" } 1 .. 5], 'the chat messages arrive in the order they were sent');
    is($texts0[-1], 'end-1', 'member 0: end-1 last');
    is(scalar(@texts0), 11, 'member 0: nothing else');
    note("order seen: @texts0");
    my $same = grep { join(' ', map { $_->{text} } @$_) eq "@texts0" } @seqs;
    is($same, scalar @members, 'every member sees the same sequence')
        or diag(join "\n", map { join ' ', map { $_->{text} } @$_ } @seqs);
    my $incr = grep { first_not_increasing(map { $_->{id} } @$_) == -1 } @seqs;
    is($incr, scalar @members, 'ids increase along every member\'s sequence');
    my @p = grep { $_->{text} =~ /^p\d$/ } @{ $seqs[0] };
    my $match = grep { defined $post_id{ $_->{text} } && $_->{id} eq $post_id{ $_->{text} }
                       && $_->{user} eq 'backend' } @p;
    is($match, 5, "each POST's event has the id of its 201 and user backend");
    my $c_user = grep { $_->{text} =~ /^c\d$/ && $_->{user} eq 'm0' } @{ $seqs[0] };
    is($c_user, 5, 'the chat messages have their member\'s user');
}
{
    # The publisher is no member: no join, leave or presence names it.
    my $n = 0;
    for my $c (@members) {
        $n += grep { type_of($_) =~ /^(?:join|leave)$/ && ($_->{user} // '') eq 'backend'
                     || type_of($_) eq 'presence' && $_->{_raw} =~ /"backend"/ } $c->events;
    }
    is($n, 0, 'no join, leave or presence event for the publisher');
}

# History: a later joiner finds the POSTs; a resume since the first gets the rest.
my @room_texts = ('text', map { $_->{text} } @{ $seqs[0] });
my @room_ids = ($first_id, map { $_->{id} } @{ $seqs[0] });
{
    my $late = WSClient->join(port => $port, room => 'r1', nick => 'late');
    my $h = $late->wait_type('history', 5);
    my @hm = $h && ref $h->{messages} eq 'ARRAY' ? @{ $h->{messages} } : ();
    is_deeply([map { $_->{text} } @hm], \@room_texts, 'a later joiner\'s history holds the POSTed messages in order')
        or diag(short(map { $_->{text} } @hm));
    is_deeply([map { $_->{id} } @hm], \@room_ids, 'with the same ids');
    is(scalar(grep { $_->{user} eq 'backend' } @hm), 7, 'and user backend on the 7 POSTed ones');

    my $back = WSClient->connect(port => $port, welcome => 1,
        path => '/ws?room=r1&nick=back&since=' . WSClient::uri_escape($first_id // ''));
    $h = $back->wait_type('history', 5);
    @hm = $h && ref $h->{messages} eq 'ARRAY' ? @{ $h->{messages} } : ();
    is_deeply([map { $_->{text} } @hm], [@room_texts[1 .. $#room_texts]],
              'resume with since=<id of the first POST>: exactly the later messages')
        or diag(short(map { $_->{text} } @hm));
    $_->send_close(1000) for $late, $back;
    ok($_->recv_close(5), 'history client closed') for $late, $back;
}

# ---------------------------------------------------------------- (2)
{
    my $text = "h\x{e9}llo w\x{f6}rld \x{2713} \x{65e5}\x{672c} \x{1F389}";
    my $bytes = $text;
    utf8::encode($bytes);
    # cut inside the é (bytes 1-2) and inside the final 4-byte emoji
    my @chunks = (substr($bytes, 0, 2), substr($bytes, 2, length($bytes) - 4), substr($bytes, -2));
    my $res = http(port => $port, path => '/publish?room=r1&user=backend', chunks => \@chunks,
                   headers => [['Content-Type', 'text/plain; charset=utf-8']]);
    my $j = answer_is($res, 201, 'chunked POST of UTF-8 text cut inside characters');
    ok(is_pos($j->{id}), 'chunked: an id');
    my @m = members_get_only(\@members, [$text], 'chunked UTF-8');
    is(scalar(grep { @$_ && $_->[-1]{id} eq ($j->{id} // '') } @m), scalar @members, 'chunked: with the id of the 201');

    $res = post($port, '/publish?room=r1&user=', 'from a guest');
    answer_is($res, 201, 'POST with an empty user');
    @m = members_get_only(\@members, ['from a guest'], 'empty user');
    my %names = map { (@$_ ? $_->[-1]{user} : '') => 1 } @m;
    ok(keys(%names) == 1 && (keys %names)[0] =~ /^guest-\d{4}$/,
       'an empty user value becomes one guest-NNNN name') or diag('users: ' . join ' ', keys %names);
}

# ---------------------------------------------------------------- (3)
{
    my %bad = (
        'invalid UTF-8 body'           => [post => '/publish?room=r1&user=backend', "ok \xff\xfe"],
        'empty body (Content-Length 0)' => [post => '/publish?room=r1&user=backend', ''],
        'empty chunked body'           => [chunks => '/publish?room=r1&user=backend', []],
        'room with a control character' => [post => '/publish?room=r%01&user=backend', 'x'],
        'room of 65 characters'        => [post => '/publish?room=' . ('x' x 65) . '&user=backend', 'x'],
    );
    for my $name (sort keys %bad) {
        my ($how, $path, $body) = @{ $bad{$name} };
        my $res = $how eq 'chunks' ? http(port => $port, path => $path, chunks => $body)
                                   : post($port, $path, $body);
        my $j = answer_is($res, 400, $name);
        is($j->{error}, 'bad_request', "$name: error bad_request");
    }
    my $res = post($port, '/publish?room=' . ('y' x 64) . '&user=backend', 'long room');
    my $j = answer_is($res, 201, 'room of 64 characters');
    is($j->{room}, 'y' x 64, 'room of 64 characters: named in the 201');
    is(post($port, '/publish?room=r1&user=backend', 'after-400')->{status}, 201, 'a good POST after the 400s -> 201');
    members_get_only(\@members, ['after-400'], 'after the 400s');
}

# ---------------------------------------------------------------- (4)
{
    my $path = '/publish1k?room=r1&user=backend';
    my $res = post($port, $path, 'z' x 1025);
    answer_is($res, 413, '1025 bytes with Content-Length, limit 1k');
    # Only the head is sent: an answer shows the length was checked before reading.
    my $conn = http_send(port => $port, path => $path, body => 'z' x 1025, send_body => 0);
    $res = http_poll($conn, 5) // { status => undef };
    answer_is($res, 413, 'Content-Length 1025 without the body sent');
    $res = http(port => $port, path => $path, chunks => ['z' x 500, 'z' x 500, 'z' x 25]);
    answer_is($res, 413, '1025 bytes chunked (500+500+25), limit 1k');
    $res = post($port, $path, 'a' x 1024);
    answer_is($res, 201, '1024 bytes with Content-Length, limit 1k');
    $res = http(port => $port, path => $path, chunks => ['b' x 1000, 'b' x 24]);
    answer_is($res, 201, '1024 bytes chunked, limit 1k');
    members_get_only(\@members, ['a' x 1024, 'b' x 1024], 'limit 1k');
}

# ---------------------------------------------------------------- (5)
{
    for my $m (['GET', undef], ['PUT', 'put body']) {
        my ($method, $body) = @$m;
        my $res = http(port => $port, method => $method, path => '/publish?room=r1&user=backend', body => $body);
        answer_is($res, 405, $method);
        is($res->{headers}{allow}, 'POST', "$method: Allow: POST");
    }
    is(post($port, '/publish?room=r1&user=backend', 'after-405')->{status}, 201, 'a POST after the 405s -> 201');
    members_get_only(\@members, ['after-405'], 'after the 405s');
}

$_->send_close(1000) for @members;
is(scalar(grep { $_->recv_close(5) } @members), scalar @members, 'members closed');
$nginx->stop;

# ================================================================ (6) Redis down
# One worker: the backlog is per worker, so which POST no longer fits is
# only predictable when all go to the same one.
my $OUT_MAX = 10;    # bound on the POSTs sent while waiting for the 503
my $redis2 = start_redis();
my $rport2 = $redis2->port;
my $n2 = start_nginx_ok('nginx starts with websocket_chat_redis_backlog 1k',
    chat_config(workers => 1, server => $PUBLISH,
                http => "websocket_chat_redis_timeout 1s;\n    websocket_chat_redis_backlog 1k;"),
    redis => $redis2,
    # Stopping redis-server drops both connections of the link; the module
    # logs the 503 it answers then at error level (Redis trouble, not the client's).
    allow_errors => [qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport2 lost: connection closed; retrying in \d+ ms$/,
                     qr/\[error\] \d+#\d+: \*\d+ websocket_chat: publish refused: 503 Redis is unreachable and the queue to it is full, client: 127\.0\.0\.1, server: , request: "POST \/publish\?room=out&user=backend HTTP\/1\.1"/]);
my $port2 = $n2->port;

my $member = WSClient->join(port => $port2, room => 'out', nick => 'watcher');
ok(wait_until(sub { $redis2->numsub('out') == 1 }, 5), 'outage: the worker follows the room');

$redis2->stop;
my $e = $member->wait_type('error', 10);
is($e && $e->{code}, 'redis_unavailable', 'outage: the member is told Redis is unavailable');
ok(wait_until(sub { log_lines($n2, qr/command connection to Redis 127\.0\.0\.1:$rport2 lost/) }, 10),
   'outage: the error log says the command connection is lost');

sub out_text { my $i = shift; my $h = sprintf 'out-%02d-', $i; $h . ('x' x (300 - length $h)) }

my (@waiting, $refused);
for my $i (1 .. $OUT_MAX) {
    my $conn = http_send(port => $port2, path => '/publish?room=out&user=backend', body => out_text($i));
    # A POST the backlog takes stays unanswered; one it cannot take is answered at once.
    my $res = http_poll($conn, 1.5);
    if ($res) {
        $refused = { i => $i, res => $res };
        last;
    }
    push @waiting, { i => $i, conn => $conn };
}
ok($refused, "outage: one of $OUT_MAX POSTs of 300 bytes is answered within 1.5 s")
    or do { diag('no answer during the outage; error log: ' . $n2->error_log_text) };
note('waiting before the refusal: ' . scalar(@waiting) . ', answered: POST ' . ($refused ? $refused->{i} : 'none'));
ok(@waiting >= 1, 'outage: at least the first POST waits (the backlog has room)');
ok(@waiting <= 3, 'outage: at most three 300-byte POSTs fit a 1k backlog');
if ($refused) {
    my $j = answer_is($refused->{res}, 503, "outage: POST $refused->{i} (backlog full)");
    is($j->{error}, 'redis_unavailable', 'outage: error redis_unavailable');
    is(scalar(log_lines($n2, qr/publish refused: 503 /)), 1, 'outage: the 503 is logged once');
}
is(scalar(grep { !http_poll($_->{conn}, 0) } @waiting), scalar @waiting,
   'outage: the waiting POSTs are still unanswered');

$redis2->restart;
ok(wait_until(sub { !grep { !http_poll($_->{conn}, 0) } @waiting }, 15),
   'Redis back: every waiting POST is answered');
my @ids;
for my $w (@waiting) {
    my $res = http_poll($w->{conn}, 0) // { status => undef };
    my $j = answer_is($res, 201, "Redis back: waiting POST $w->{i}");
    push @ids, $j->{id};
}
is(post($port2, '/publish?room=out&user=backend', 'after-outage')->{status}, 201, 'Redis back: a new POST -> 201');
my ($got) = messages_until($member, 'after-outage', 10);
my @want = ((map { out_text($_->{i}) } @waiting), 'after-outage');
is_deeply([map { $_->{text} =~ /^out-(\d\d)-/ ? "out-$1" : $_->{text} } @$got],
          [map { /^out-(\d\d)-/ ? "out-$1" : $_ } @want],
          'the member receives exactly the waiting POSTs, once each, in order, not the refused one')
    or diag('received: ' . short(map { substr($_->{text}, 0, 12) } @$got));
is_deeply([map { $_->{id} } @$got[0 .. $#waiting]], \@ids, 'with the ids of their 201s') if @$got > @waiting;
is(scalar(grep { length $_->{text} == 300 } @$got), scalar @waiting, 'their texts intact (300 bytes)');

$member->send_close(1000);
ok($member->recv_close(5), 'outage member closed');
done_all();
