# websocket_chat_status: the module's live numbers, summed over every worker
# process of the instance (a shared memory zone), as JSON or in Prometheus's
# text format. With worker_processes 2 and sessions on both workers:
# * connections, workers, rooms and the Redis connections are the sums over
#   both workers, whichever worker answers the scrape; JSON and Prometheus
#   (HELP/TYPE for every family, numeric values, the documented label sets)
#   agree on every number; ?format= and Accept choose the format;
# * message and byte counters grow by exactly what the clients sent and got;
# * each way a session ends is counted once, in its (code, reason) bucket;
# * refused handshakes are counted by status; history fetches one per join;
# * a Redis outage shows as connections down, then reconnects;
# * counters survive `nginx -s reload` (the sessions it ends count as
#   1001 shutdown) and start from zero in a new nginx;
# * only GET and HEAD are answered.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use JSON::PP ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $MIN_CLIENTS = 6;     # members of the room spread over both workers
my $MAX_CLIENTS = 40;    # bound on the connections opened to spread them
my $MAX_SECONDS = 15;    # bound on the time spent spreading them

my $JSON = JSON::PP->new->utf8;

# Every (code, reason) bucket, in the documented order.
my @CLOSES = ([1000, 'normal'], [1001, 'going_away'], [1001, 'idle_timeout'],
              [1001, 'shutdown'], [1002, 'protocol_error'], [1003, 'unsupported_data'],
              [1005, 'no_status'], [1006, 'abnormal'], [1007, 'invalid_data'],
              [1008, 'slow_consumer'], [1008, 'rate_limit'], [1008, 'room_refused'],
              [1009, 'too_big'], [0, 'other']);
my @REFUSALS = qw(400 403 426 503 500);
my @PUBLISH  = qw(201 400 405 413 502 503);
my @TOP = qw(workers connections rooms sessions_opened messages_received messages_sent
             bytes_received bytes_sent closes handshake_refusals publish_requests
             history_fetches history_cached redis);
my @REDIS_KEYS = qw(connections_up connections_down reconnects backlog_bytes);
my %GAUGE = map { ("websocket_chat_$_" => 1) }
            qw(workers connections rooms redis_connections redis_backlog_bytes);
my @FAMILIES = map { "websocket_chat_$_" } qw(workers connections rooms
    sessions_opened_total messages_received_total messages_sent_total
    received_bytes_total sent_bytes_total closes_total handshake_refusals_total
    publish_requests_total history_fetches_total history_cached_total redis_connections
    redis_reconnects_total redis_backlog_bytes);

# Pings would add bytes between two scrapes: only /ws-idle has them.
my $server = <<'EOT';
        location = /status { websocket_chat_status; }
        location = /ws-idle {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_ping_interval 1s;
            websocket_chat_idle_timeout 2s;
        }
        location = /ws-rate {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_rate 1r/m;
        }
        location = /ws-quiet {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_presence off;
        }
        location = /ws-origin {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_origin https://a.example;
        }
EOT
my $template = chat_config(workers => 2, listen => 'reuseport', server => $server,
    http => "websocket_chat_redis_timeout 1s;\n"
          . "    websocket_chat_ping_interval 10m;\n    websocket_chat_idle_timeout 20m;");

my $redis = start_redis();
my $rport = $redis->port;
# The outage of part 6 (redis-server stopped) drops every connection of the link.
my $lost = qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport lost: connection closed; retrying in \d+ ms$/;
my $nginx = start_nginx_ok('nginx starts: 2 workers, reuseport, websocket_chat_status',
    $template, redis => $redis, workers => 2, allow_errors => [$lost]);
my $port = $nginx->port;
# Cutting a client off for flooding is an error-level line, as limit_req's are.
$nginx->allow_errors(qr/\[error\] \d+#\d+: \*\d+ websocket_chat: closing session of "fast" in "rl": 1008 rate limit exceeded, client: 127\.0\.0\.1,/);

# ---------------------------------------------------------------- helpers

# One HTTP/1.0 request to this nginx (see WSClient::http_request).
sub http_req { WSClient::http_request(port => $port, @_) }

sub decode_json { my $b = shift; my $j = eval { $JSON->decode($b) }; ref $j eq 'HASH' ? $j : undef }

sub status_json {
    my $r = http_req(path => '/status');
    return $r && ($r->{status} // 0) == 200 ? decode_json($r->{body}) : undef;
}

# Scrape until $cond->($json) holds or $timeout seconds pass; the last
# scrape either way, so the assertions that follow show the real numbers.
sub poll_status {
    my ($cond, $timeout) = @_;
    my $last;
    wait_until(sub { $last = status_json(); $last && $cond->($last) }, $timeout // 10, 0.1);
    return $last // {};
}

sub closes_of {
    my $j = shift;
    return { map { ("$_->{code} $_->{reason}" => $_->{total}) } @{ $j->{closes} // [] } };
}
sub closed { my ($j, $code, $reason) = @_; closes_of($j)->{"$code $reason"} // -1 }
sub redis_of { my ($j, $k) = @_; ($j->{redis} // {})->{$k} // -1 }

# The JSON numbers under their Prometheus sample names (labels sorted).
sub flat_json {
    my $j = shift;
    my %f;
    $f{"websocket_chat_$_"} = $j->{$_} for qw(workers connections rooms);
    $f{"websocket_chat_${_}_total"} = $j->{$_}
        for qw(sessions_opened messages_received messages_sent history_fetches history_cached);
    $f{websocket_chat_received_bytes_total} = $j->{bytes_received};
    $f{websocket_chat_sent_bytes_total} = $j->{bytes_sent};
    for my $c (@{ $j->{closes} // [] }) {
        my $code = $c->{code} == 0 ? 'other' : $c->{code};
        $f{qq{websocket_chat_closes_total{code="$code",reason="$c->{reason}"}}} = $c->{total};
    }
    $f{qq{websocket_chat_handshake_refusals_total{status="$_"}}} = $j->{handshake_refusals}{$_}
        for keys %{ $j->{handshake_refusals} // {} };
    $f{qq{websocket_chat_publish_requests_total{status="$_"}}} = $j->{publish_requests}{$_}
        for keys %{ $j->{publish_requests} // {} };
    my $r = $j->{redis} // {};
    $f{'websocket_chat_redis_connections{state="up"}'} = $r->{connections_up};
    $f{'websocket_chat_redis_connections{state="down"}'} = $r->{connections_down};
    $f{websocket_chat_redis_reconnects_total} = $r->{reconnects};
    $f{websocket_chat_redis_backlog_bytes} = $r->{backlog_bytes};
    return \%f;
}

# Problems with the JSON document's shape (keys, order of closes, integers).
sub json_problems {
    my ($j, $body) = @_;
    return ('not a JSON object') unless $j;
    my @bad;
    push @bad, map { "missing key $_" } grep { !exists $j->{$_} } @TOP;
    push @bad, map { "missing redis.$_" } grep { !exists(($j->{redis} // {})->{$_}) } @REDIS_KEYS;
    push @bad, map { "missing handshake_refusals.$_" }
               grep { !exists(($j->{handshake_refusals} // {})->{$_}) } @REFUSALS;
    push @bad, map { "missing publish_requests.$_" }
               grep { !exists(($j->{publish_requests} // {})->{$_}) } @PUBLISH;
    my @order = map { "$_->{code} $_->{reason}" } @{ ref $j->{closes} eq 'ARRAY' ? $j->{closes} : [] };
    my $want = join ', ', map { "@$_" } @CLOSES;
    push @bad, "closes are [" . join(', ', @order) . "], want [$want]" unless join(', ', @order) eq $want;
    my $f = flat_json($j);
    push @bad, map { "$_ is not an integer: " . ($f->{$_} // 'undef') }
               grep { !defined $f->{$_} || ref $f->{$_} || $f->{$_} !~ /^\d+\z/ } sort keys %$f;
    # The only string values are the close reasons; numbers are plain integers.
    my $strings = () = $body =~ /:\s*"/g;
    push @bad, "$strings string values, want only the " . scalar(@CLOSES) . " reasons"
        unless $strings == @CLOSES;
    push @bad, 'a number with a fraction or exponent' if $body =~ /:\s*-?\d+[.eE]/;
    return @bad;
}

# Prometheus text format 0.0.4: (samples {name{labels} => value}, problems).
sub parse_prom {
    my $text = shift // '';
    my (%help, %type, %samples, @bad);
    my $n = 0;
    for my $line (split /\n/, $text) {
        $n++;
        next if $line eq '';
        if ($line =~ /^# HELP ([a-zA-Z_:][\w:]*) \S/) {
            push @bad, "line $n: a second HELP for $1" if $help{$1}++;
            next;
        }
        if ($line =~ /^# TYPE ([a-zA-Z_:][\w:]*) (\w+)$/) {
            push @bad, "line $n: a second TYPE for $1" if exists $type{$1};
            $type{$1} = $2;
            next;
        }
        next if $line =~ /^# / && $line !~ /^# (?:HELP|TYPE)\b/;
        if ($line =~ /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/) {
            my ($name, $labels, $v) = ($1, $2 // '', $3);
            push @bad, "line $n: $name has no HELP line before it" unless $help{$name};
            push @bad, "line $n: $name has no TYPE line before it" unless $type{$name};
            push @bad, "line $n: value '$v' is not a number"
                unless $v =~ /^-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$/;
            my (@l, $rest);
            $rest = $labels;
            push @l, [$1, $2] while $rest =~ s/^([a-zA-Z_]\w*)="((?:[^"\\\n]|\\.)*)"(?:,|$)//;
            push @bad, "line $n: labels '$labels' do not parse" if length $rest;
            my $key = $name . (@l ? '{' . join(',', map { qq{$_->[0]="$_->[1]"} }
                                              sort { $a->[0] cmp $b->[0] } @l) . '}' : '');
            push @bad, "line $n: a second sample $key" if exists $samples{$key};
            $samples{$key} = $v;
            next;
        }
        push @bad, "line $n: neither a sample nor HELP/TYPE: $line";
    }
    for my $f (@FAMILIES) {
        my $want = $GAUGE{$f} ? 'gauge' : 'counter';
        push @bad, "TYPE of $f is " . ($type{$f} // 'missing') . ", want $want"
            unless ($type{$f} // '') eq $want;
    }
    return (\%samples, \@bad);
}

# Differences between the JSON numbers and the Prometheus samples.
sub disagreements {
    my ($j, $samples) = @_;
    my $f = flat_json($j);
    my @d;
    for my $k (sort keys %{ { %$f, %$samples } }) {
        my ($a, $b) = ($f->{$k}, $samples->{$k});
        next if defined $a && defined $b && $b =~ /^-?[\d.eE+-]+$/ && $a == $b;
        push @d, "$k: JSON " . ($a // 'absent') . ", Prometheus " . ($b // 'absent');
    }
    return @d;
}

# JSON and Prometheus scrapes until two JSON scrapes around a Prometheus one
# are equal (nothing moved in between) and agree with it, or 5 s pass.
sub agreeing_scrape {
    my ($j, $p, $bad, $r);
    wait_until(sub {
        $j = status_json();
        $r = http_req(path => '/status?format=prometheus');
        my $j2 = status_json();
        return 0 unless $j && $j2 && $r;
        ($p, $bad) = parse_prom($r->{body});
        my %a = %{ flat_json($j) };
        my %b = %{ flat_json($j2) };
        return 0 if grep { ($a{$_} // -1) != ($b{$_} // -1) } keys %a;
        return !disagreements($j, $p);
    }, 5, 0.1);
    return ($j, $p, $bad // ['no Prometheus scrape']);
}

# The worker process holding the server side of our TCP connection $sock.
sub worker_of_socket {
    my $sock = shift;
    my $own = socket_owners($nginx->worker_pids);
    for my $c (tcp_connections($port)) {
        next unless $c->{local_port} == $port && $c->{remote_port} == $sock->sockport;
        return $own->{ $c->{inode} } if $own->{ $c->{inode} };
    }
    return undef;
}

# One scrape of $path answered by each worker: {pid => response}. Opens
# connections (at most 30) until both workers hold one.
sub scrape_on_each_worker {
    my $path = shift;
    my (%sock, @spare);
    for (1 .. 30) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                      Proto => 'tcp', Timeout => 5) or last;
        my $w;
        wait_until(sub { $w = worker_of_socket($s) }, 2);
        if ($w && !$sock{$w}) { $sock{$w} = $s } else { push @spare, $s }
        last if keys %sock >= 2;
    }
    close $_ for @spare;
    return { map { ($_ => http_req(path => $path, sock => $sock{$_})) } keys %sock };
}

sub frame_len { my $l = shift; $l + ($l < 126 ? 2 : $l < 65536 ? 4 : 10) }

sub ctype { my $r = shift; lc(($r && $r->{headers}{'content-type'}) // '') =~ s/\s+//gr }
my $PROM_CT = 'text/plain;version=0.0.4;charset=utf-8';

# ---------------------------------------------------------------- 0. a fresh instance
my $j0 = poll_status(sub { $_[0]{workers} == 2 });
is($j0->{workers}, 2, 'fresh: 2 workers report');
is($j0->{connections}, 0, 'fresh: no connections');
is($j0->{sessions_opened}, 0, 'fresh: no sessions opened');

# ---------------------------------------------------------------- 1. sessions on both workers
my @workers = sort { $a <=> $b } $nginx->worker_pids;
my (@c, @owner, %on);
my $t0 = time;
while (@c < $MAX_CLIENTS && time - $t0 < $MAX_SECONDS) {
    push @c, WSClient->join(port => $port, room => 'sum', nick => 'u' . scalar(@c));
    @owner = client_workers($nginx, \@c, @workers);
    %on = ();
    push @{ $on{ $owner[$_] // '' } }, $_ for 0 .. $#c;
    last if @c >= $MIN_CLIENTS && !grep { !$on{$_} } @workers;
}
my $N = @c;
note(sprintf '%d sessions in %.2fs; per worker: %s', $N, time - $t0,
     join(', ', map { ($_ || 'unattributed') . ' ' . scalar @{ $on{$_} } } sort keys %on));
is(scalar(grep { $on{$_} } @workers), 2, "sessions on both workers ($N sessions)");

my $j1 = poll_status(sub { $_[0]{connections} == $N && redis_of($_[0], 'connections_up') == 4 });
is($j1->{connections}, $N, "JSON: connections = $N, the sum over both workers");
is($j1->{workers}, 2, 'JSON: workers = 2');
is($j1->{rooms}, 2, 'JSON: rooms = 2 (one room, members on both workers)');
is(redis_of($j1, 'connections_up'), 4, 'JSON: redis.connections_up = 4 (2 workers x 2)');
is(redis_of($j1, 'connections_down'), 0, 'JSON: redis.connections_down = 0');
is($j1->{sessions_opened}, $N, "JSON: sessions_opened = $N");
is($j1->{history_fetches}, $N, "JSON: history_fetches = $N, one per join");

# Whichever worker answers, the numbers are the instance's.
my $each = scrape_on_each_worker('/status');
is(scalar(keys %$each), 2, 'a scrape answered by each worker');
for my $w (sort keys %$each) {
    my $j = decode_json($each->{$w} ? $each->{$w}{body} : '');
    is($j && $j->{connections}, $N, "scrape answered by worker $w: connections = $N");
}

{
    my $r = http_req(path => '/status');
    is($r && $r->{status}, 200, 'GET /status: 200');
    like(ctype($r), qr{^application/json(?:;|$)}, 'GET /status: Content-Type application/json');
    my @bad = json_problems(decode_json($r ? $r->{body} : ''), $r ? $r->{body} : '');
    ok(!@bad, 'JSON: every key present, closes in the documented order, integers only')
        or diag(join "\n", @bad, substr($r ? $r->{body} : '', 0, 2000));
}
for my $x (['?format=prometheus', {}], ['', { Accept => 'text/plain' }],
           ['', { Accept => 'application/openmetrics-text;q=0.9, text/plain;q=0.5' }]) {
    my ($q, $h) = @$x;
    my $name = "GET /status$q" . (%$h ? " with Accept: $h->{Accept}" : '');
    my $r = http_req(path => "/status$q", headers => $h);
    is($r && $r->{status}, 200, "$name: 200");
    is(ctype($r), $PROM_CT, "$name: Prometheus Content-Type");
    like($r ? $r->{body} : '', qr/^websocket_chat_connections \d+$/m, "$name: Prometheus text");
}
for my $x (['?format=json', { Accept => 'text/plain' }], ['', { Accept => 'application/json' }]) {
    my ($q, $h) = @$x;
    my $r = http_req(path => "/status$q", headers => $h);
    like(ctype($r), qr{^application/json(?:;|$)}, "GET /status$q with Accept: $h->{Accept}: JSON");
    ok(decode_json($r ? $r->{body} : ''), "GET /status$q with Accept: $h->{Accept}: the body is JSON");
}

my ($ja, $pa, $pbad) = agreeing_scrape();
ok(!@$pbad, 'Prometheus: HELP and TYPE for every family, the documented types, numeric values')
    or diag(join "\n", @$pbad);
is($pa->{websocket_chat_connections}, $N, "Prometheus: websocket_chat_connections $N");
is($pa->{websocket_chat_workers}, 2, 'Prometheus: websocket_chat_workers 2');
is($pa->{'websocket_chat_redis_connections{state="up"}'}, 4,
   'Prometheus: websocket_chat_redis_connections{state="up"} 4');
my @dis = $ja ? disagreements($ja, $pa) : ('no JSON');
ok(!@dis, 'JSON and Prometheus agree on every number, with the same label sets')
    or diag(join "\n", @dis);

# ---------------------------------------------------------------- 2. messages and bytes
# Once every member has the last joiner's join event, nothing else is on its
# way to the clients: the byte counters then move only with the messages.
my $last = 'u' . ($N - 1);
my $saw = grep { $c[$_]->wait_type('join', 5, sub { $_[0]{user} eq $last }) } 0 .. $N - 2;
is($saw, $N - 1, "every earlier member saw $last join");
my ($wa, $wb) = @workers;
my ($ia, $ib) = map { ($on{$_} // [0])->[0] } $wa, $wb;
my @senders = ($ia, $ib, $ia, $ib);
my $k = @senders;
my $s2 = poll_status(sub { 1 });
my $sent_frames = 0;
for my $i (0 .. $#senders) {
    my $text = sprintf 'sum-msg-%d', $i;
    $c[ $senders[$i] ]->send_text($text);
    $sent_frames += 6 + length $text;    # masked, short: 2 header + 4 mask bytes
}
my ($delivered, $got_bytes) = (0, 0);
for my $cl (@c) {
    for (1 .. $k) {
        my $m = $cl->wait_type('message', 5, sub { $_[0]{text} =~ /^sum-msg-/ }) or last;
        $delivered++;
        $got_bytes += frame_len(length $m->{_raw});
    }
}
is($delivered, $k * $N, "each of the $N members got the $k messages (senders on both workers)");
my $s3 = poll_status(sub {
    $_[0]{messages_sent} >= $s2->{messages_sent} + $k * $N
        && $_[0]{bytes_sent} >= $s2->{bytes_sent} + $got_bytes });
is($s3->{messages_received} - $s2->{messages_received}, $k, "messages_received grew by $k");
is($s3->{messages_sent} - $s2->{messages_sent}, $k * $N,
   "messages_sent grew by $k x $N (one per recipient, echo included)");
is($s3->{bytes_received} - $s2->{bytes_received}, $sent_frames,
   "bytes_received grew by the $sent_frames bytes of the clients' frames");
is($s3->{bytes_sent} - $s2->{bytes_sent}, $got_bytes,
   "bytes_sent grew by the $got_bytes bytes of the message frames the members got");

# The 101 leaves in the same write as the welcome and history, but is not
# WebSocket traffic: a join adds the bytes of its frames alone.
my $quiet = WSClient->join(port => $port, location => '/ws-quiet', room => 'quiet', nick => 'q1');
ok($quiet->wait_type('history', 5), 'a quiet join gets welcome and history');
my $join_bytes = 0;
$join_bytes += frame_len(length $_->{_raw}) for $quiet->events;
my $s4 = poll_status(sub { $_[0]{bytes_sent} >= $s3->{bytes_sent} + $join_bytes });
is($s4->{bytes_sent} - $s3->{bytes_sent}, $join_bytes,
   "bytes_sent grew by the $join_bytes bytes of the joiner's frames, not its 101");
$quiet->disconnect;

# ---------------------------------------------------------------- 3. closes
my $b3 = poll_status(sub { 1 });
my %want;    # "code reason" => how many sessions this part ends that way
my $idle = WSClient->join(port => $port, location => '/ws-idle', room => 'cl', nick => 'idle',
                          auto_pong => 0);

# Join, do $act, then wait until the "code reason" bucket grew by one.
sub provoke {
    my ($name, $bucket, $act) = @_;
    my $cl = WSClient->join(port => $port, room => 'cl', nick => $name);
    my $before = closes_of(status_json() // {})->{$bucket} // 0;
    $act->($cl);
    $want{$bucket}++;
    my $j = poll_status(sub { (closes_of($_[0])->{$bucket} // 0) > $before }, 10);
    is(closes_of($j)->{$bucket}, $before + 1, "$name: counted under $bucket");
}
# The server closed first: the client answers and closes its end (the
# server lingers until it does), and the server's code is the one counted.
sub answer_close { my ($cl, $code) = @_; $cl->send_close($code); $cl->disconnect }
sub answered {
    my ($cl, $code) = @_;
    my $f = $cl->recv_close(5);
    is($f && $f->{close_code}, $code, "server's close frame has code $code");
    answer_close($cl, $code);
}
provoke('client 1000', '1000 normal', sub { $_[0]->send_close(1000); answered($_[0], 1000) });
provoke('client 1001', '1001 going_away', sub { $_[0]->send_close(1001); $_[0]->recv_close(5) });
provoke('client close without code', '1005 no_status', sub { $_[0]->send_close; $_[0]->recv_close(5) });
provoke('client 4001', '0 other', sub { $_[0]->send_close(4001); $_[0]->recv_close(5) });
provoke('client drop', '1006 abnormal', sub { $_[0]->disconnect });
provoke('unmasked frame', '1002 protocol_error',
        sub { $_[0]->send_frame(opcode => 1, payload => 'hi', mask => 0); answered($_[0], 1002) });
provoke('binary frame', '1003 unsupported_data',
        sub { $_[0]->send_binary("\x00\x01"); answered($_[0], 1003) });
provoke('invalid UTF-8', '1007 invalid_data',
        sub { $_[0]->send_frame(opcode => 1, payload => "a\xff"); answered($_[0], 1007) });
provoke('message over the limit', '1009 too_big',
        sub { $_[0]->send_frame(opcode => 1, payload => '', declared_len => 2**40); answered($_[0], 1009) });

# Rate limit: the first message is under the limit and reaches the room; 10
# refused in a row close the sender.
{
    my $obs = WSClient->join(port => $port, room => 'rl', nick => 'obs');
    my $fast = WSClient->join(port => $port, location => '/ws-rate', room => 'rl', nick => 'fast');
    my $before = closed(status_json() // {}, 1008, 'rate_limit');
    $fast->send_text('first');
    ok($obs->wait_type('message', 5, sub { $_[0]{user} eq 'fast' && $_[0]{text} eq 'first' }),
       'rate: a message under the limit reaches the room');
    # The 10th refusal brings either its error event and the close, or the close alone.
    my $refused = 0;
    for my $i (1 .. 10) {
        last if $fast->got_close || !$fast->send_text("over-$i");
        $refused++ if $fast->wait_type('error', 5, sub { ($_[0]{code} // '') eq 'rate_limited' });
    }
    cmp_ok($refused, '>=', 9, 'rate: the messages over the limit are refused');
    my $f = $fast->got_close ? { close_code => $fast->close_code } : $fast->recv_close(5);
    is($f && $f->{close_code}, 1008, 'rate: closed with 1008 after 10 refusals');
    answer_close($fast, 1008);
    $want{'1008 rate_limit'}++;
    my $j = poll_status(sub { closed($_[0], 1008, 'rate_limit') > $before });
    is(closed($j, 1008, 'rate_limit'), $before + 1, 'rate limit: counted under 1008 rate_limit');
    $obs->send_close(1000);
    $obs->recv_close(5);
    $want{'1000 normal'}++;
}

my $fi = $idle->recv_close(8);
is($fi && $fi->{close_code}, 1001, 'idle client closed with 1001');
answer_close($idle, 1001);
$want{'1001 idle_timeout'}++;

my $e3 = poll_status(sub { $_[0]{connections} == $N && closed($_[0], 1001, 'idle_timeout')
                               >= closed($b3, 1001, 'idle_timeout') + 1 });
is($e3->{connections}, $N, "connections back to $N once those sessions ended");
my ($cb, $ce) = (closes_of($b3), closes_of($e3));
my %delta = map { ("@$_" => ($ce->{"@$_"} // 0) - ($cb->{"@$_"} // 0)) } @CLOSES;
is_deeply(\%delta, { map { ("@$_" => $want{"@$_"} // 0) } @CLOSES },
          'each session counted once, in its bucket; no other bucket moved');

# ---------------------------------------------------------------- 4. handshake refusals
my $b4 = poll_status(sub { 1 });
sub handshake {
    my ($path, %h) = @_;
    my ($req) = WSClient::handshake_request(port => $port, path => $path, headers => \%h);
    my ($st, undef, undef, $sock) = WSClient::raw_handshake($port, $req);
    close $sock if $sock;
    return $st // 0;
}
is(handshake('/ws?room=' . ('r' x 65)), 400, 'a room of 65 characters: 400');
is(handshake('/ws?room=v', 'Sec-WebSocket-Version' => 8), 426, 'Sec-WebSocket-Version 8: 426');
is(handshake('/ws-origin?room=o', Origin => 'https://b.example'), 403, 'a disallowed Origin: 403');
my $allowed = WSClient->connect(port => $port, path => '/ws-origin?room=o&nick=ok', welcome => 1,
                                headers => { Origin => 'https://a.example' });
ok($allowed->welcome, 'the allowed Origin still joins');
my $e4 = poll_status(sub { $_[0]{handshake_refusals}{426} > $b4->{handshake_refusals}{426}
                           && $_[0]{connections} == $N + 1 });
is_deeply({ map { ($_ => $e4->{handshake_refusals}{$_} - $b4->{handshake_refusals}{$_}) } @REFUSALS },
          { 400 => 1, 403 => 1, 426 => 1, 503 => 0, 500 => 0 },
          'handshake_refusals: one each under 400, 403, 426; none under 500, 503');
is_deeply($e4->{publish_requests}, { map { ($_ => 0) } @PUBLISH }, 'publish_requests: all zero');

# ---------------------------------------------------------------- 5. history fetches
my @hist;
for my $i (1 .. 3) {
    my $before = status_json() // {};
    push @hist, WSClient->join(port => $port, room => 'hist', nick => "h$i");
    my $j = poll_status(sub { $_[0]{history_fetches} > ($before->{history_fetches} // 0) });
    is($j->{history_fetches} - ($before->{history_fetches} // 0), 1, "join $i: history_fetches grew by one");
}
my @open = (@c, $allowed, @hist);

# ---------------------------------------------------------------- 6. Redis down and back
my $b6 = poll_status(sub { redis_of($_[0], 'connections_up') == 4 });
is(redis_of($b6, 'connections_up'), 4, 'before the outage: 4 Redis connections up');
$redis->stop;
my $d6 = poll_status(sub { redis_of($_[0], 'connections_down') > 0
                           && redis_of($_[0], 'connections_up') < 4 });
cmp_ok(redis_of($d6, 'connections_down'), '>', 0, 'Redis stopped: connections_down > 0');
cmp_ok(redis_of($d6, 'connections_up'), '<', 4, 'Redis stopped: connections_up drops');
$d6 = poll_status(sub { redis_of($_[0], 'connections_down') == 4 });
is(redis_of($d6, 'connections_up') + redis_of($d6, 'connections_down'), 4,
   'every Redis connection is counted up or down');
is(redis_of($d6, 'connections_down'), 4, 'all 4 Redis connections down');
$c[0]->send_text('during the outage');
my $q6 = poll_status(sub { redis_of($_[0], 'backlog_bytes') > 0 });
cmp_ok(redis_of($q6, 'backlog_bytes'), '>', 0, 'a message sent during the outage waits in the backlog');

$redis->restart;
my $r6 = poll_status(sub { redis_of($_[0], 'connections_up') == 4 && redis_of($_[0], 'connections_down') == 0
                           && redis_of($_[0], 'backlog_bytes') == 0 }, 15);
is(redis_of($r6, 'connections_up'), 4, 'Redis back: connections_up is 4 again');
is(redis_of($r6, 'connections_down'), 0, 'Redis back: connections_down is 0');
is(redis_of($r6, 'reconnects') - redis_of($b6, 'reconnects'), 4,
   'reconnects grew by 4 (each connection re-established once)');
is(redis_of($r6, 'backlog_bytes'), 0, 'the backlog is empty once published');
ok($c[-1]->wait_type('message', 10, sub { $_[0]{text} eq 'during the outage' }),
   'the outage message is delivered after Redis is back');

# ---------------------------------------------------------------- 7. reload, then a new nginx
my $b7 = poll_status(sub { $_[0]{connections} == @open });
is($b7->{connections}, scalar @open, 'before the reload: ' . scalar(@open) . ' sessions open');
$nginx->reload(workers => 2);
my $closed7 = grep { $_->is_closed_by_server(10) && ($_->close_code // 0) == 1001 } @open;
is($closed7, scalar @open, 'reload closes every session with 1001');
my $a7 = poll_status(sub { $_[0]{workers} == 2 && $_[0]{connections} == 0
                           && redis_of($_[0], 'connections_up') == 0 });
is($a7->{workers}, 2, 'after the reload: 2 workers report (the old ones are gone)');
is($a7->{connections}, 0, 'after the reload: no connections');
is(redis_of($a7, 'connections_up'), 0, 'after the reload: the old workers\' Redis connections are gone');
is($a7->{sessions_opened}, $b7->{sessions_opened}, 'reload: sessions_opened kept');
is($a7->{messages_received}, $b7->{messages_received}, 'reload: messages_received kept');
is(closed($a7, 1001, 'shutdown') - closed($b7, 1001, 'shutdown'), scalar @open,
   'reload: the sessions it ended are counted under 1001 shutdown');
my ($fb, $fa) = (flat_json($b7), flat_json($a7));
my @down = grep { /_total/ && ($fa->{$_} // -1) < ($fb->{$_} // 0) } sort keys %$fb;
ok(!@down, 'reload: no counter went down') or diag(join "\n", map { "$_: $fb->{$_} -> $fa->{$_}" } @down);

my $after = WSClient->join(port => $port, room => 'sum', nick => 'after');
my $j7 = poll_status(sub { $_[0]{connections} == 1 && redis_of($_[0], 'connections_up') == 2 });
is($j7->{sessions_opened}, $b7->{sessions_opened} + 1, 'a session after the reload counts on');
is(redis_of($j7, 'connections_up'), 2, 'one new worker serves it, with its 2 Redis connections');
$after->send_close(1000);
$after->recv_close(5);

$nginx->stop;
$nginx = start_nginx_ok('a new nginx with the same configuration starts',
    $template, redis => $redis, workers => 2, PORT => $port);
my $j8 = poll_status(sub { $_[0]{workers} == 2 });
is($j8->{workers}, 2, 'new nginx: 2 workers report');
my $f8 = flat_json($j8);
my @nonzero = grep { $_ ne 'websocket_chat_workers' && ($f8->{$_} // 0) != 0 } sort keys %$f8;
ok(!@nonzero, 'new nginx: every other number starts from zero')
    or diag(join "\n", map { "$_ = $f8->{$_}" } @nonzero);

# ---------------------------------------------------------------- 8. methods
my $post = http_req(method => 'POST', path => '/status');
is($post && $post->{status}, 405, 'POST /status: 405');
my $del = http_req(method => 'DELETE', path => '/status');
is($del && $del->{status}, 405, 'DELETE /status: 405');
my $head = http_req(method => 'HEAD', path => '/status');
is($head && $head->{status}, 200, 'HEAD /status: 200');
is($head && $head->{body}, '', 'HEAD /status: no body');
like(ctype($head), qr{^application/json(?:;|$)}, 'HEAD /status: the Content-Type of GET');

done_all();
