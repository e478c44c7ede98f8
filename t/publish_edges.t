# websocket_chat_publish at its edges (t/publish_api.t covers the contract):
# (3) 500 POSTs pipelined 10 deep on 50 kept-alive connections to 2 workers:
#     each answered 201 with an id of its own; every member (on both
#     workers) receives all 500 once each, in the order of their ids;
# (4) HTTP framing: a POST, a GET and a POST pipelined on one connection and
#     one more POST on it; HTTP/1.0; Expect: 100-continue (and an oversized
#     Content-Length refused without the body); a body sent in pieces (under
#     client_body_timeout it passes, a stalled one ends in nginx's 408);
#     nginx's own 413 (client_max_body_size under websocket_chat_max_message)
#     next to the module's; HEAD and OPTIONS get 405; a Redis error 502;
#     nothing refused reaches the room;
# (5) the access log of publish requests: $websocket_chat_room, _user and
#     _session_id (the session the members see), $status 201;
# (6) websocket_chat_status counts the module's answers by status, exactly
#     those this file provoked (nginx's own 408 and 413 are not the module's);
# (1) Redis down: POSTs whose clients went (FIN, RST) while they waited are
#     still published once when Redis is back, the worker lives on, later
#     POSTs work, the backlog's limit refuses the POST that does not fit;
# (2) reload and graceful shutdown (worker_shutdown_timeout 2s) with POSTs
#     waiting for Redis: the old worker exits in time, without "open socket
#     left" alerts or a crash; each POST is answered 201 or its connection
#     closed (the README promises nothing more for this case).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use IO::Select;
use JSON::PP ();
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatIds;
use ChatFault;

my $JSON = JSON::PP->new->utf8;

my $N_CONN      = 50;    # kept-alive connections of part (3)
my $DEPTH       = 10;    # POSTs pipelined on each
my $MIN_MEMBERS = 4;     # members of the room, on both workers
my $MAX_CONNECT = 40;    # bound on the connections opened to get there
my $SHUTDOWN    = 2;     # worker_shutdown_timeout of part (2), seconds
my $MARGIN      = 2;     # what an exit may take beyond it, seconds
my $FILL_MAX    = 10;    # bound on the POSTs sent to fill the backlog

# ---------------------------------------------------------------- HTTP client
# A raw HTTP/1.1 client: the test decides the framing (pipelining, HTTP/1.0,
# Expect, a body in pieces) and reads responses in order off one buffer per
# connection, so several may be in flight on it.

sub hconnect {
    my $port = shift;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5)
        or die "hconnect: cannot connect to 127.0.0.1:$port: $!\n";
    binmode $s;
    return { sock => $s, buf => '', methods => [], interim => [] };
}

# (head, body) of a request. %o: method (POST), path, version (1.1),
# headers ([[name, value], ...]), body (Content-Length) or chunks
# (arrayref: chunked), close (Connection: close).
sub request_text {
    my (%o) = @_;
    my $head = ($o{method} // 'POST') . " $o{path} HTTP/" . ($o{version} // '1.1')
             . "\r\nHost: 127.0.0.1\r\n";
    $head .= "Connection: close\r\n" if $o{close};
    $head .= "$_->[0]: $_->[1]\r\n" for @{ $o{headers} // [] };
    my $body = '';
    if ($o{chunks}) {
        $head .= "Transfer-Encoding: chunked\r\n";
        $body = join('', map { sprintf("%x\r\n", length) . "$_\r\n" } @{ $o{chunks} }) . "0\r\n\r\n";
    } elsif (defined $o{body}) {
        $head .= 'Content-Length: ' . length($o{body}) . "\r\n";
        $body = $o{body};
    }
    return ("$head\r\n", $body);
}

sub hwrite {
    my ($c, $bytes) = @_;
    my $sel = IO::Select->new($c->{sock});
    my $off = 0;
    while ($off < length $bytes) {
        return 0 unless $sel->can_write(5);
        my $n = syswrite($c->{sock}, $bytes, length($bytes) - $off, $off);
        return 0 unless defined $n;    # the server may answer and close early
        $off += $n;
    }
    return 1;
}

# Writes requests (each a hashref for request_text; send_body => 0 writes
# the head alone) in one write: pipelined when there are several.
sub hsend {
    my ($c, @reqs) = @_;
    my $bytes = '';
    for my $o (@reqs) {
        my ($head, $body) = request_text(%$o);
        $bytes .= $head . (($o->{send_body} // 1) ? $body : '');
        push @{ $c->{methods} }, $o->{method} // 'POST';
    }
    return hwrite($c, $bytes);
}

# One read if the socket is readable within $timeout; sets eof.
sub hread {
    my ($c, $timeout) = @_;
    return if $c->{eof} || !IO::Select->new($c->{sock})->can_read($timeout);
    my $n = sysread($c->{sock}, $c->{buf}, 65536, length $c->{buf});
    $c->{eof} = 1 unless $n;
}

# Takes the next complete final response off the buffer, or undef. Interim
# (1xx) responses go to ->{interim}. A response is {status, headers
# (lower-case names), body (de-chunked), json, raw}.
sub hparse {
    my $c = shift;
    my $buf = \$c->{buf};
    my $i = index($$buf, "\r\n\r\n");
    return undef if $i < 0;
    my ($status_line, @lines) = split /\r\n/, substr($$buf, 0, $i);
    my ($status) = $status_line =~ m{^HTTP/1\.[01] (\d{3})};
    my %h;
    for (@lines) {
        next unless /^([^:\s]+)\s*:\s*(.*?)\s*$/;
        $h{lc $1} = exists $h{lc $1} ? "$h{lc $1}, $2" : $2;
    }
    my $p = $i + 4;
    my $body = '';
    my $bodiless = !defined $status || $status =~ /^1/ || $status == 204 || $status == 304
                || ($c->{methods}[0] // '') eq 'HEAD';
    if ($bodiless) {
    } elsif (($h{'transfer-encoding'} // '') =~ /chunked/i) {
        while (1) {
            my $e = index($$buf, "\r\n", $p);
            return undef if $e < 0;
            my $len = hex substr($$buf, $p, $e - $p);
            return undef if length($$buf) < $e + 2 + $len + 2;
            $body .= substr($$buf, $e + 2, $len);
            $p = $e + 2 + $len + 2;
            last if $len == 0;
        }
    } elsif (defined $h{'content-length'}) {
        return undef if length($$buf) < $p + $h{'content-length'};
        $body = substr($$buf, $p, $h{'content-length'});
        $p += $h{'content-length'};
    } else {
        return undef unless $c->{eof};
        $p = length $$buf;
        $body = substr($$buf, $i + 4);
    }
    my $res = { status => $status, headers => \%h, body => $body, raw => substr($$buf, 0, $p, '') };
    if (defined $status && $status =~ /^1/) {
        push @{ $c->{interim} }, $res;
        return hparse($c);
    }
    shift @{ $c->{methods} };
    my $json = eval { $JSON->decode($body) };
    $res->{json} = $json if ref $json eq 'HASH';
    return $res;
}

# The next response within $timeout seconds; {status => undef, eof => 1}
# when the connection closes without one; undef when none came in time.
sub hnext {
    my ($c, $timeout) = @_;
    my $deadline = time + $timeout;
    my $tried;
    while (1) {
        my $res = hparse($c);
        return $res if $res;
        return { status => undef, eof => 1, raw => $c->{buf} } if $c->{eof};
        my $left = $deadline - time;
        return undef if $left <= 0 && $tried++;    # a timeout of 0 still reads once
        hread($c, $left > 0 ? $left : 0);
    }
}

# The first response of a connection that sent one request, kept once read.
sub answered { my $c = shift; $c->{res} //= hnext($c, 0) }

# One request on a connection of its own (Connection: close); never undef.
sub http1 {
    my ($port, %o) = @_;
    my $c = hconnect($port);
    hsend($c, { %o, close => 1 });
    my $res = hnext($c, 5) // { status => undef, raw => $c->{buf} };
    close $c->{sock};
    return $res;
}

sub post { my ($port, $path, $body, %o) = @_; http1($port, path => $path, body => $body, %o) }

sub short { my $s = join ' ', map { $_ // 'undef' } @_; length $s > 300 ? substr($s, 0, 300) . '...' : $s }

# The module's answer: $status, JSON; returns the object (or {}).
sub answer_is {
    my ($res, $status, $name) = @_;
    $res //= { status => undef };
    is($res->{status}, $status, "$name -> $status")
        or diag('response: ' . short($res->{raw} // ''));
    like($res->{headers}{'content-type'} // '', qr{^application/json\b}, "$name: a JSON answer");
    return $res->{json} // {};
}

# What the status endpoint must count: the module's answers this file
# provoked, per nginx instance.
my $TALLY;
sub tally { my ($status, $n) = @_; $TALLY->{$status} += $n // 1 }

sub publish_counts {
    my $port = shift;
    my $res = http1($port, method => 'GET', path => '/status');
    return $res->{json} && $res->{json}{publish_requests};
}

# Waits until the status endpoint counts exactly the tally (the counters of
# both workers are summed), then checks it.
sub counts_are_tally {
    my ($port, $name) = @_;
    my %want = map { ($_ => $TALLY->{$_} // 0) } qw(201 400 405 413 502 503);
    my $got;
    wait_until(sub {
        $got = publish_counts($port) or return 0;
        return !grep { ($got->{$_} // -1) != $want{$_} } keys %want;
    }, 5);
    is_deeply($got, \%want, "$name: publish_requests counts exactly the answers sent ("
              . join(', ', map { "$_: $want{$_}" } sort keys %want) . ')');
}

# ---------------------------------------------------------------- TCP state
# From /proc/net/tcp: the state and queues of one loopback connection's two
# ends, to know when nginx has read a request and when it has seen a close.
sub tcp_ends {
    my ($server_port, $client_port) = @_;
    my $t = ChatTest::_slurp('/proc/net/tcp');
    my ($server, $client);
    while ($t =~ /^\s*\d+: [0-9A-F]{8}:([0-9A-F]{4}) [0-9A-F]{8}:([0-9A-F]{4}) ([0-9A-F]{2}) ([0-9A-F]{8}):([0-9A-F]{8})/mg) {
        my ($l, $r, $st, $tx, $rx) = (hex $1, hex $2, $3, hex $4, hex $5);
        $server = { state => $st, rx => $rx } if $l == $server_port && $r == $client_port;
        $client = { state => $st, tx => $tx } if $l == $client_port && $r == $server_port;
    }
    return ($server, $client);
}

# Every byte the client sent is acknowledged and read by nginx: nginx has
# the whole request (and ran the body handler, which follows the read).
sub nginx_has_read {
    my ($nginx, $c) = @_;
    my ($s, $cl) = tcp_ends($nginx->port, $c->{sock}->sockport);
    return $s && $cl && $s->{rx} == 0 && $cl->{tx} == 0;
}

# Sends a POST and waits until nginx has read it; returns the connection
# and whether it then stays unanswered (an answer is kept in ->{early}).
sub waiting_post {
    my ($nginx, $path, $text) = @_;
    my $c = hconnect($nginx->port);
    hsend($c, { path => $path, body => $text });
    my $read = wait_until(sub { nginx_has_read($nginx, $c) }, 5);
    $c->{early} = hnext($c, 0.2);
    $c->{text} = $text;
    return ($c, $read && !$c->{early});
}

# ---------------------------------------------------------------- members

# Every member's next messages are exactly @$texts (the last marks the end).
sub members_get_only {
    my ($members, $texts, $name) = @_;
    my ($ok, $bad) = (0);
    for my $i (0 .. $#$members) {
        my ($m) = messages_until($members->[$i], $texts->[-1], 10);
        my @got = map { $_->{text} } @$m;
        if ("@got" eq "@$texts") { $ok++ }
        else { $bad //= "member $i received: " . short(map { length > 40 ? length($_) . ' bytes' : $_ } @got) }
    }
    is($ok, scalar @$members, "$name: every member receives exactly "
       . short(map { length > 20 ? length($_) . ' bytes' : $_ } @$texts)) or diag($bad);
}

# Joins members until both workers hold some (reuseport spreads connections
# by a hash of the client's port; see t/chat_workers.t).
sub members_on_both {
    my ($nginx, $room) = @_;
    my @workers = $nginx->worker_pids;
    my (@members, %on);
    while (@members < $MAX_CONNECT) {
        push @members, WSClient->join(port => $nginx->port, room => $room, nick => 'm' . scalar(@members));
        my @owner = client_workers($nginx, \@members, @workers);
        %on = ();
        $on{ $owner[$_] // '' }++ for 0 .. $#members;
        last if @members >= $MIN_MEMBERS && !grep { !$on{$_} } @workers;
    }
    is(scalar(grep { $on{$_} } @workers), 2, "members of $room on both workers")
        or diag('members per worker: ' . join ', ', map { "$_: $on{$_}" } sort keys %on);
    return @members;
}

# ---------------------------------------------------------------- logs

my $LOG_FORMAT = q{    log_format pub 'uri=$request_uri status=$status room=$websocket_chat_room '
                   'user=$websocket_chat_user sid=$websocket_chat_session_id pid=$pid';};

# Parsed lines of the pub access log whose request URI matches $re.
sub pub_lines {
    my ($nginx, $re) = @_;
    my @l;
    for my $line (split /\n/, ChatTest::_slurp($nginx->prefix . '/logs/pub.log')) {
        my %f = map { /^(\w+)=(.*)$/ ? ($1 => $2) : () } split / /, $line;
        push @l, \%f if ($f{uri} // '') =~ $re;
    }
    return @l;
}

sub lost_re {
    my $rport = shift;
    return qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport lost: connection closed; retrying in \d+ ms$/;
}

sub publish_location {
    my ($name, @extra) = @_;
    return "        location = $name {\n            websocket_chat_publish;\n"
         . "            websocket_chat_room \$arg_room;\n            websocket_chat_user \$arg_user;\n"
         . join('', map { "            $_\n" } @extra) . "        }\n";
}

# ================================================================ main nginx
# Parts (3) to (6): two workers, Redis up.

my $SERVER_A = "        access_log %%PREFIX%%/logs/pub.log pub;\n"
    . publish_location('/publish')
    . publish_location('/publish4k', 'websocket_chat_max_message 4k;')
    . publish_location('/publish-small', 'websocket_chat_max_message 4k;', 'client_max_body_size 1k;')
    . publish_location('/publish-slow', 'client_body_timeout 2s;')
    . "        location = /plain { return 200 \"plain\"; }\n"
    . "        location = /status { websocket_chat_status; }\n";

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts: 2 workers (reuseport), publish locations, a status location',
    chat_config(workers => 2, listen => 'reuseport', server => $SERVER_A, http => $LOG_FORMAT),
    redis => $redis, workers => 2,
    allow_errors => [
        # nginx's own refusals of bodies over client_max_body_size (part 4)
        qr/\[error\] \d+#\d+: \*\d+ client intended to send too large body: 2000 bytes, client: 127\.0\.0\.1, server: , request: "POST \/publish-small\?room=edge&user=big&tag=cmbs-cl HTTP\/1\.1"/,
        qr/\[error\] \d+#\d+: \*\d+ client intended to send too large chunked body: \d+\+\d+ bytes, client: 127\.0\.0\.1, server: , request: "POST \/publish-small\?room=edge&user=big&tag=cmbs-chunked HTTP\/1\.1"/,
        # the Redis error provoked on purpose (part 4): a 502 is Redis trouble
        qr/\[error\] \d+#\d+: websocket_chat: Redis refused a published message for "wrongtype": .*WRONGTYPE/,
    ]);
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;
$TALLY = {};

my @members = members_on_both($nginx, 'edge');
ok(wait_until(sub { $redis->numsub('edge') == 2 }, 5), 'both workers follow the room');

# ---------------------------------------------------------------- (3)
{
    my $N = $N_CONN * $DEPTH;
    my @conns = map { hconnect($port) } 1 .. $N_CONN;
    for my $k (0 .. $#conns) {
        $conns[$k]{first} = $k * $DEPTH;
        hsend($conns[$k], map { +{ path => "/publish?room=edge&user=bulk&tag=p3-$_", body => sprintf('p3-%03d', $_) } }
                          $k * $DEPTH .. $k * $DEPTH + $DEPTH - 1);
    }
    # Members read as answers come, so that nothing piles up for them.
    my (%answer, @seen);
    my %conn_of = map { (fileno($_->{sock}) => $_) } @conns;
    my $deadline = time + 30;
    while (keys %answer < $N && time < $deadline) {
        my @open = map { $_->{sock} } grep { !$_->{eof} } @conns;
        last unless @open;
        for my $s (IO::Select->new(@open)->can_read(0.2)) {
            my $c = $conn_of{ fileno $s };
            hread($c, 0);
            while (my $res = hparse($c)) { $answer{ $c->{first} + $c->{done}++ } = $res }
        }
        for my $i (0 .. $#members) {
            while (my $ev = $members[$i]->recv_json(0.001)) {
                push @{ $seen[$i] }, $ev if type_of($ev) eq 'message';
            }
        }
    }
    is(scalar(keys %answer), $N, "all $N POSTs pipelined $DEPTH deep on $N_CONN connections are answered")
        or diag('connections closed early: ' . scalar(grep { $_->{eof} } @conns));
    my @created = grep { ($answer{$_}{status} // 0) == 201 } keys %answer;
    is(scalar @created, $N, 'every one 201')
        or diag('other answers: ' . short(map { $answer{$_}{status} } grep { ($answer{$_}{status} // 0) != 201 } keys %answer));
    my %ids = map { ($answer{$_}{json}{id} // '') => 1 } @created;
    is(scalar(grep { is_pos($_) } keys %ids), $N, "with $N distinct ids");
    tally(201, scalar @created);
    is(scalar(grep { !$_->{eof} } @conns), $N_CONN, 'every connection stays open (keepalive)');
    close $_->{sock} for @conns;

    is(post($port, '/publish?room=edge&user=bulk&tag=p3-end', 'p3-end')->{status}, 201, 'a POST after them -> 201');
    tally(201);
    my @seqs;
    for my $i (0 .. $#members) {
        my ($m) = messages_until($members[$i], 'p3-end', 15);
        push @seqs, [grep { $_->{text} =~ /^p3-\d{3}$/ } @{ $seen[$i] // [] }, @$m];
    }
    my @by_id = map { sprintf 'p3-%03d', $_ }
                sort { cmp_id($answer{$a}{json}{id}, $answer{$b}{json}{id}) } @created;
    my ($same, $bad) = (0);
    for my $i (0 .. $#seqs) {
        my @texts = map { $_->{text} } @{ $seqs[$i] };
        if ("@texts" eq "@by_id") { $same++; next }
        my %n;
        $n{$_}++ for @texts;
        $bad //= sprintf 'member %d: %d received, %d distinct, %d twice or more; first difference at %s',
            $i, scalar @texts, scalar(keys %n), scalar(grep { $n{$_} > 1 } keys %n),
            (map { "$_: $texts[$_] vs $by_id[$_]" } grep { ($texts[$_] // '') ne ($by_id[$_] // '') } 0 .. $#by_id)[0] // '?';
    }
    is($same, scalar @members, "every member receives all $N exactly once, in one order: that of their ids")
        or diag($bad);
    my $id_match = grep { my $t = $_->{text}; my ($n) = $t =~ /(\d+)$/;
                          ($answer{ 0 + $n }{json}{id} // '') eq ($_->{id} // '-') } @{ $seqs[0] };
    is($id_match, $N, 'each event has the id of its 201');

    # ------------------------------------------------------------ (5)
    my %event_of = map { ($_->{text} => $_) } @{ $seqs[0] };
    my $sessions_agree = grep { my $i = $_; !grep { ($event_of{ $_->{text} }{session} // '') ne ($_->{session} // '-') } @{ $seqs[$i] } } 0 .. $#seqs;
    is($sessions_agree, scalar @seqs, 'every member sees the same session on each POSTed message');
    my @lines;
    wait_until(sub { (@lines = pub_lines($nginx, qr/[?&]tag=p3-\d+$/)) >= $N }, 5);
    is(scalar @lines, $N, "access log: one line per POST ($N)");
    my ($good, $wrong, %sid, %pid) = (0);
    for my $l (@lines) {
        my ($n) = $l->{uri} =~ /tag=p3-(\d+)$/;
        my $ev = $event_of{ sprintf 'p3-%03d', $n } // {};
        $sid{ $l->{sid} }++;
        $pid{ $l->{pid} }++;
        if ($l->{status} eq '201' && $l->{room} eq 'edge' && $l->{user} eq 'bulk'
            && $l->{sid} ne '-' && $l->{sid} eq ($ev->{session} // '')) { $good++ }
        else { $wrong //= short(map { "$_=$l->{$_}" } sort keys %$l) . ' (event session ' . ($ev->{session} // 'none') . ')' }
    }
    is($good, $N, 'access log: status=201 room=edge user=bulk and the session id its members saw')
        or diag("first other line: $wrong");
    is(scalar(keys %sid), $N, 'access log: a session id of its own per POST');
    is_deeply([sort { $a <=> $b } keys %pid], \@workers, 'access log: both workers answered POSTs');
}

# ---------------------------------------------------------------- (4)
# Pipelined and kept alive: a POST, a GET to a plain location and a POST in
# one write, then one more POST on the same connection.
{
    my $c = hconnect($port);
    hsend($c, { path => '/publish?room=edge&user=ka&tag=ka-1', body => 'ka-1' },
              { method => 'GET', path => '/plain' },
              { path => '/publish?room=edge&user=ka&tag=ka-2', body => 'ka-2' });
    my @res = map { hnext($c, 5) } 1 .. 3;
    my $j1 = answer_is($res[0], 201, 'pipelined POST, GET, POST: the first POST');
    is($res[1] && $res[1]{status}, 200, 'pipelined: the GET to a plain location -> 200');
    is($res[1] && $res[1]{body}, 'plain', 'pipelined: the GET gets its own body');
    my $j2 = answer_is($res[2], 201, 'pipelined: the second POST');
    ok(is_pos($j1->{id}) && is_pos($j2->{id}) && cmp_id($j1->{id}, $j2->{id}) < 0,
       'pipelined: the second POST has the later id');
    hsend($c, { path => '/publish?room=edge&user=ka&tag=ka-3', body => 'ka-3' });
    answer_is(hnext($c, 5), 201, 'one more POST on the kept-alive connection');
    ok(!$c->{eof}, 'the connection stays open');
    close $c->{sock};
    tally(201, 3);
    members_get_only(\@members, [qw(ka-1 ka-2 ka-3)], 'pipelined and kept-alive POSTs');
}

# HTTP/1.0 with Content-Length: answered, then the connection is closed.
{
    my $c = hconnect($port);
    hsend($c, { version => '1.0', path => '/publish?room=edge&user=old&tag=h10', body => 'h10' });
    answer_is(hnext($c, 5), 201, 'HTTP/1.0 POST with Content-Length');
    my $after = hnext($c, 5);
    ok($after && $after->{eof}, 'HTTP/1.0: nginx closes the connection after the answer');
    close $c->{sock};
    tally(201);
    members_get_only(\@members, ['h10'], 'HTTP/1.0');
}

# Expect: 100-continue: the 100 comes before the body is sent; a
# Content-Length over the limit is refused without the body.
{
    my $c = hconnect($port);
    hsend($c, { path => '/publish?room=edge&user=exp&tag=exp', body => 'expected',
                headers => [['Expect', '100-continue']], send_body => 0 });
    my $early;
    wait_until(sub { $early //= hnext($c, 0.05); @{ $c->{interim} } || $early }, 5);
    is(@{ $c->{interim} } ? $c->{interim}[0]{status} : undef, 100, 'Expect: 100-continue -> 100 Continue before the body');
    ok(!$early, 'Expect: no final answer before the body');
    hwrite($c, 'expected');
    answer_is(hnext($c, 5), 201, 'Expect: the body sent after the 100');
    close $c->{sock};
    tally(201);
    members_get_only(\@members, ['expected'], 'Expect: 100-continue');

    $c = hconnect($port);
    hsend($c, { path => '/publish4k?room=edge&user=exp&tag=exp-big', body => 'e' x 4097,
                headers => [['Expect', '100-continue']], send_body => 0 });
    my $j = answer_is(hnext($c, 5), 413, 'Expect with Content-Length 4097, limit 4k, no body sent');
    is($j->{error}, 'too_big', 'Expect, too big: error too_big');
    note('before the 413: ' . (@{ $c->{interim} } ? 'a 100 Continue' : 'no interim response'));
    close $c->{sock};
    tally(413);
}

# A body in pieces (client_body_timeout 2s): pauses under the timeout pass;
# a stalled body ends in nginx's 408, and nothing reaches the room.
{
    my $text = 'slow-' . ('s' x 35);
    my $c = hconnect($port);
    hsend($c, { path => '/publish-slow?room=edge&user=slow&tag=slow-ok', body => $text, send_body => 0 });
    my $early;
    for my $piece (unpack '(A10)*', $text) {
        # waiting for an answer that must not come paces the pieces
        $early //= hnext($c, 0.3);
        hwrite($c, $piece);
    }
    ok(!$early, 'a body sent in 4 pieces 0.3 s apart: no answer before its last byte')
        or diag('early answer: ' . short($early->{raw}));
    answer_is(hnext($c, 5), 201, 'a body sent in 4 pieces 0.3 s apart');
    close $c->{sock};
    tally(201);
    members_get_only(\@members, [$text], 'the body sent in pieces, whole');

    $c = hconnect($port);
    hsend($c, { path => '/publish-slow?room=edge&user=slow&tag=slow-stalled', body => 'stalled-' . ('x' x 32), send_body => 0 });
    hwrite($c, 'stalled-');
    my $t0 = time;
    my $res = hnext($c, 2 + 2 * $MARGIN);
    my $took = time - $t0;
    # nginx closes a request whose body timed out without a response (408 in the log)
    ok($res && $res->{eof} && !defined $res->{status}, 'a stalled body: nginx closes the connection')
        or diag('got: ' . short($res ? $res->{raw} : 'nothing in time'));
    ok($took >= 1.5 && $took <= 2 + $MARGIN, sprintf('a stalled body: closed after client_body_timeout 2s (%.1f s)', $took));
    my @l;
    wait_until(sub { @l = pub_lines($nginx, qr/tag=slow-stalled$/) }, 5);
    is(join(',', map { $_->{status} } @l), '408', 'a stalled body: logged once, with status 408');
    close $c->{sock};
}

# client_max_body_size 1k under websocket_chat_max_message 4k: nginx's own
# 413 (its HTML page) before the module sees the request; websocket_chat_max_message
# on its own location: the module's 413. Bodies at the limits pass.
{
    my $r = post($port, '/publish-small?room=edge&user=big&tag=cmbs-cl', 'c' x 2000);
    is($r->{status}, 413, '2000 bytes, client_max_body_size 1k: 413');
    like($r->{headers}{'content-type'} // '', qr{^text/html}, "2000 bytes, client_max_body_size 1k: nginx's own page");
    $r = http1($port, path => '/publish-small?room=edge&user=big&tag=cmbs-chunked', chunks => ['c' x 1000, 'c' x 1000]);
    is($r->{status}, 413, '2000 bytes chunked, client_max_body_size 1k: 413');
    like($r->{headers}{'content-type'} // '', qr{^text/html}, "2000 bytes chunked: nginx's own page");
    answer_is(post($port, '/publish-small?room=edge&user=big&tag=cmbs-ok', 'd' x 1024), 201,
              '1024 bytes, client_max_body_size 1k');
    tally(201);
    my $j = answer_is(post($port, '/publish4k?room=edge&user=big&tag=mm-big', 'e' x 4097), 413,
                      '4097 bytes, websocket_chat_max_message 4k');
    is($j->{error}, 'too_big', '4097 bytes: error too_big');
    tally(413);
    answer_is(post($port, '/publish4k?room=edge&user=big&tag=mm-ok', 'f' x 4096), 201,
              '4096 bytes, websocket_chat_max_message 4k');
    tally(201);
    members_get_only(\@members, ['d' x 1024, 'f' x 4096], 'only the bodies within the limits');
}

# HEAD and OPTIONS get 405 (HEAD without a body), and the connection goes
# on to a POST pipelined after them.
{
    my $c = hconnect($port);
    hsend($c, { method => 'HEAD', path => '/publish?room=edge&user=m&tag=head' },
              { method => 'OPTIONS', path => '/publish?room=edge&user=m&tag=options' },
              { path => '/publish?room=edge&user=m&tag=after-405', body => 'after-405' });
    my @res = map { hnext($c, 5) } 1 .. 3;
    for my $x (['HEAD', $res[0]], ['OPTIONS', $res[1]]) {
        my ($method, $r) = @$x;
        is($r && $r->{status}, 405, "$method -> 405") or diag(short($r && $r->{raw}));
        is($r && $r->{headers}{allow}, 'POST', "$method: Allow: POST");
    }
    is($res[0] && length $res[0]{body}, 0, 'HEAD: no body');
    is($res[1] && $res[1]{json} && $res[1]{json}{error}, 'method_not_allowed', 'OPTIONS: error method_not_allowed');
    answer_is($res[2], 201, 'a POST pipelined after HEAD and OPTIONS');
    close $c->{sock};
    tally(405, 2);
    tally(201);
    members_get_only(\@members, ['after-405'], 'after HEAD and OPTIONS');
}

# The module's 400s, and a 502: Redis refuses the append (the room's
# history key holds a string).
{
    answer_is(post($port, '/publish?room=edge&user=m&tag=utf8', "bad \xff"), 400, 'invalid UTF-8');
    answer_is(post($port, '/publish?room=bad%01room&user=m&tag=room', 'x'), 400, 'a room with a control character');
    tally(400, 2);
    $redis->cmd('SET', 'wschat:wrongtype', 'not a stream');
    my $j = answer_is(post($port, '/publish?room=wrongtype&user=m&tag=wrongtype', 'refused'), 502,
                      'Redis refuses the message (WRONGTYPE)');
    is($j->{error}, 'redis_refused', '502: error redis_refused');
    tally(502);
    answer_is(post($port, '/publish?room=edge&user=m&tag=after-errors', 'after-errors'), 201, 'a POST after them');
    tally(201);
    members_get_only(\@members, ['after-errors'], 'after the 400s, 408, 413s and 502');
}

# ---------------------------------------------------------------- (6)
counts_are_tally($port, 'main nginx');

$_->send_close(1000) for @members;
is(scalar(grep { $_->recv_close(5) } @members), scalar @members, 'members closed');
$nginx->stop;

# ================================================================ (1) clients gone during an outage
# One worker, so that one backlog holds every waiting POST.
my $redis_b = start_redis();
my $rb = $redis_b->port;
my $nb = start_nginx_ok('outage nginx starts: 1 worker, websocket_chat_redis_backlog 4k',
    chat_config(workers => 1,
                http => "websocket_chat_redis_timeout 1s;\n    websocket_chat_redis_backlog 4k;\n$LOG_FORMAT",
                server => "        access_log %%PREFIX%%/logs/pub.log pub;\n" . publish_location('/publish')
                        . "        location = /status { websocket_chat_status; }\n"),
    redis => $redis_b,
    allow_errors => [lost_re($rb),
        qr/\[error\] \d+#\d+: \*\d+ websocket_chat: publish refused: 503 Redis is unreachable and the queue to it is full, client: 127\.0\.0\.1, server: , request: "POST \/publish\?room=gone&user=backend&tag=fill-\d+ HTTP\/1\.1"/]);
$TALLY = {};
{
    my $pb = $nb->port;
    my ($wpid) = $nb->worker_pids;
    my $watcher = WSClient->join(port => $pb, room => 'gone', nick => 'watcher');
    ok(wait_until(sub { $redis_b->numsub('gone') == 1 }, 5), 'outage: the worker follows the room');
    $redis_b->stop;
    my $e = $watcher->wait_type('error', 10);
    is($e && $e->{code}, 'redis_unavailable', 'outage: the member is told Redis is unavailable');
    ok(wait_until(sub { log_lines($nb, qr/command connection to Redis 127\.0\.0\.1:$rb lost/) }, 10),
       'outage: the command connection is lost');

    my ($fin, $fin_waits) = waiting_post($nb, '/publish?room=gone&user=backend&tag=fin', 'gone-fin');
    ok($fin_waits, 'outage: a POST is read and waits');
    my $fin_port = $fin->{sock}->sockport;
    close $fin->{sock};
    my ($rst, $rst_waits) = waiting_post($nb, '/publish?room=gone&user=backend&tag=rst', 'gone-rst');
    ok($rst_waits, 'outage: another POST is read and waits');
    my $rst_port = $rst->{sock}->sockport;
    setsockopt($rst->{sock}, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
    close $rst->{sock};
    # Both closes reach nginx's ends while the POSTs wait: the FIN leaves
    # its socket in CLOSE_WAIT (08), the RST takes it out of the table.
    ok(wait_until(sub { my ($s) = tcp_ends($pb, $fin_port); $s && $s->{state} eq '08' }, 5),
       "outage: the first client closed its socket (FIN): nginx's end is in CLOSE_WAIT");
    ok(wait_until(sub { my ($s) = tcp_ends($pb, $rst_port); !$s }, 5),
       "outage: the second client reset its connection (RST): nginx's end is gone");

    my (@kept, $refused);
    for my $i (1 .. $FILL_MAX) {
        my $text = sprintf('fill-%02d-', $i) . ('x' x 992);
        my ($c, $waits) = waiting_post($nb, "/publish?room=gone&user=backend&tag=fill-$i", $text);
        if (!$waits) { $refused = $c; last }
        push @kept, $c;
    }
    ok($refused && $refused->{early}, "outage: one of $FILL_MAX POSTs of 1000 bytes is answered at once (the backlog is full)");
    ok(@kept >= 1, 'outage: a 1000-byte POST fits the backlog next to the two waiting ones (' . scalar(@kept) . ' did)');
    my $j = answer_is($refused && $refused->{early}, 503, 'outage: the POST that does not fit');
    is($j->{error}, 'redis_unavailable', 'outage: error redis_unavailable');
    tally(503);
    is(scalar(grep { !answered($_) } @kept), scalar @kept, 'outage: the POSTs that fit are still waiting');
    is_deeply([$nb->worker_pids], [$wpid], 'outage: the worker is the same');

    $redis_b->restart;
    ok(wait_until(sub { !grep { !answered($_) } @kept }, 15), 'Redis back: every waiting POST is answered');
    answer_is(answered($_), 201, "Redis back: the waiting $_->{text}" =~ s/(fill-\d+)-x+/$1/r) for @kept;
    # The answers to the clients that went are made (and counted) too: the
    # write to their sockets fails.
    tally(201, 2 + @kept);
    answer_is(post($pb, '/publish?room=gone&user=backend&tag=after', 'after'), 201, 'Redis back: a new POST');
    tally(201);

    my ($got) = messages_until($watcher, 'after', 10);
    my @want = ('gone-fin', 'gone-rst', (map { $_->{text} =~ /^(fill-\d+)/ } @kept), 'after');
    is_deeply([map { $_->{text} =~ /^(fill-\d+)-/ ? $1 : $_->{text} } @$got], \@want,
              'the member receives the POSTs of the clients that went, then the others, once each, in order')
        or diag('received: ' . short(map { substr($_->{text}, 0, 12) } @$got));
    is_deeply([$nb->worker_pids], [$wpid], 'Redis back: the worker is the same');
    my @l;
    my $n_posts = 2 + @kept + 2;    # fin, rst, the kept ones, the refused one and after
    wait_until(sub { (@l = pub_lines($nb, qr/[?&]tag=(?:fin|rst|fill-\d+|after)$/)) >= $n_posts }, 5);
    my %per;
    $per{ $_->{uri} =~ /tag=(.*)$/ ? $1 : '' }++ for @l;
    is(scalar(grep { $_ == 1 } values %per), $n_posts, "access log: each of the $n_posts POSTs once")
        or diag(short(map { "$_: $per{$_}" } sort keys %per));
    note('access log of the clients that went: ' . short(map { "$_->{uri} $_->{status}" } grep { $_->{uri} =~ /tag=(?:fin|rst)$/ } @l));
    note("error log on the writes to them:\n" . join("\n", log_lines($nb, qr/while sending|failed \(/)));
    counts_are_tally($pb, 'outage nginx');
    $watcher->send_close(1000);
    ok($watcher->recv_close(5), 'outage member closed');
}
$nb->stop;
$redis_b->stop;

# ================================================================ (2) reload and shutdown
my $redis_c = start_redis();
my $rc = $redis_c->port;
my $nc = start_nginx_ok("nginx starts: 1 worker, worker_shutdown_timeout ${SHUTDOWN}s",
    "worker_shutdown_timeout ${SHUTDOWN}s;\n"
    . chat_config(workers => 1, http => "websocket_chat_redis_timeout 1s;", server => publish_location('/publish')),
    redis => $redis_c, allow_errors => [lost_re($rc)]);
{
    my $pc = $nc->port;
    my $open_socket = qr/open socket #\d+ left in connection/;

    # Several POSTs waiting for Redis on the worker, which is then made to stop.
    my $wait_on = sub {
        my ($room, $what) = @_;
        my ($w) = $nc->worker_pids;
        is(post($pc, "/publish?room=$room&user=backend&tag=$room-up", "$room-up")->{status}, 201,
           "$what: a POST with Redis up -> 201");
        my $before = () = log_lines($nc, qr/\[error\] \Q$w\E#\d+: websocket_chat: command connection to Redis 127\.0\.0\.1:$rc lost/);
        $redis_c->stop;
        ok(wait_until(sub { log_lines($nc, qr/\[error\] \Q$w\E#\d+: websocket_chat: command connection to Redis 127\.0\.0\.1:$rc lost/) > $before }, 10),
           "$what: the worker's command connection is lost");
        my @w = map { [waiting_post($nc, "/publish?room=$room&user=backend&tag=$room-$_", "$room-$_")] } 1 .. 3;
        is(scalar(grep { $_->[1] } @w), 3, "$what: 3 POSTs wait for Redis");
        return ($w, map { $_->[0] } @w);
    };
    # Each ends within its time: answered, or its connection closed. A 201
    # is only right for a message Redis has (in the room's history).
    my $outcome = sub {
        my ($what, $room, $redis_up, @conns) = @_;
        my @res = map { hnext($_, 2) } @conns;
        is(scalar(grep { $_ } @res), scalar @conns, "$what: each waiting POST is answered or its connection closed");
        my @created = grep { $res[$_] && ($res[$_]{status} // 0) == 201 } 0 .. $#res;
        my $history = !$redis_up ? '' : join ' ', map { join ' ', @{ $_->[1] } }
                                        @{ $redis_c->cmd('XRANGE', "wschat:$room", '-', '+') };
        is(scalar(grep { $history =~ /"text":"\Q$conns[$_]{text}\E"/ } @created), scalar @created,
           "$what: every 201 is for a message in the room's history (" . scalar(@created) . ' answered 201)');
        note("$what: " . join(', ', map { $conns[$_]{text} . ' ' . (!$res[$_] ? 'no answer' : $res[$_]{eof} ? 'closed without an answer'
                                                                   : "answered $res[$_]{status}") } 0 .. $#res));
        close $_->{sock} for @conns;
    };

    # -- reload: Redis comes back at once, while the old worker may still run
    my ($old, @rl) = $wait_on->('rl', 'reload');
    my $t0 = time;
    $nc->reload;
    $redis_c->restart;
    my $gone = wait_until(sub { !pid_running($old) }, $SHUTDOWN + $MARGIN);
    ok($gone, sprintf("reload: the old worker exits within worker_shutdown_timeout + ${MARGIN}s (%.1f s)", time - $t0));
    $outcome->('reload', 'rl', 1, @rl);
    my @alerts = log_lines($nc, $open_socket);
    is(scalar @alerts, 0, 'reload: no "open socket left" alert') or diag(join "\n", @alerts);
    is(scalar(log_lines($nc, qr/exited on signal/)), 0, 'reload: no worker crashed');
    is(post($pc, '/publish?room=rl&user=backend&tag=rl-new', 'rl-new')->{status}, 201, 'reload: the new worker answers 201');

    # -- graceful shutdown with POSTs waiting (Redis stays down)
    my (undef, @sd) = $wait_on->('sd', 'quit');
    $t0 = time;
    $nc->stop;    # QUIT, then the exit and error-log tests
    my $took = time - $t0;
    ok($took <= $SHUTDOWN + $MARGIN, sprintf("quit: nginx exits within worker_shutdown_timeout + ${MARGIN}s (%.1f s)", $took));
    $outcome->('quit', 'sd', 0, @sd);
    @alerts = log_lines($nc, $open_socket);
    is(scalar @alerts, 0, 'quit: no "open socket left" alert') or diag(join "\n", @alerts);
    is(scalar(log_lines($nc, qr/exited on signal/)), 0, 'quit: no worker crashed');
}

done_all();
