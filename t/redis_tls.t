# websocket_chat_redis rediss://: Redis over TLS, on nginx's own SSL layer.
# Certificates are made here with openssl: CA 1 signs the server certificate
# (SAN DNS:redis.test) and a client certificate; CA 2 is unrelated. Each
# redis-server has a plain port (the harness's inspection: CLIENT LIST,
# PUBSUB, CLIENT KILL) and a TLS port (the module's).
# (7) nginx -t refuses: verify on without a trusted certificate, a client
#     certificate without its key, a trusted-certificate file that is not
#     there; it accepts verify off without a trusted certificate.
# (1) verified TLS end to end with 2 workers: chat across workers, history,
#     websocket_chat_publish, websocket_chat_status connections_up 4, and the
#     4 connections in CLIENT LIST on the TLS port.
# (3)(4)(5) failures, several nginx at once: a certificate from the wrong CA,
#     the wrong name (configured, and the default: the address), rediss:// to
#     a plain port, redis:// to a TLS port: each logged with its reason,
#     retried, sessions get redis_unavailable and no welcome, workers live;
#     verify off makes the wrong-CA/wrong-name setup work.
# (2) a Redis that requires client certificates: refused without one,
#     works with websocket_chat_redis_ssl_certificate/_key.
# (6) Redis restarts on the same TLS port: redis_available, the messages
#     sent meanwhile delivered exactly once, in order.
# (8) 30 reconnect cycles (CLIENT KILL of the TLS connections) do not grow
#     the workers' RSS by more than a few MB, and chat still works.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $JSON = JSON::PP->new->utf8;
my $T0 = time;

my $MIN_MEMBERS = 4;     # members of the main room, on both workers
my $MAX_CONNECT = 40;    # bound on the connections opened to get there
my $MAX_SECONDS = 10;    # bound on the time spent connecting
my $CYCLES      = 30;    # reconnect cycles of part (8)
my $WARMUP      = 5;     # cycles before the first RSS reading
my $RSS_LIMIT   = 4096;  # kB of growth allowed over $CYCLES cycles

# ---------------------------------------------------------------- certificates

my $dir = ChatTest::_tempdir('certs');

sub openssl {
    my ($code, $out) = ChatTest::_run_cmd(20, 'openssl', @_);
    BAIL_OUT("openssl @_ failed ($code): $out") unless $code == 0;
    return $out;
}

# One config for every certificate, so no system openssl.cnf default
# (extensions added by req -x509) changes what the certificates say.
ChatTest::_spurt("$dir/openssl.cnf", <<'EOT');
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:redis.test
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
EOT
my @EC = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');
for my $ca (qw(ca1 ca2)) {
    openssl('req', '-x509', '-config', "$dir/openssl.cnf", '-extensions', 'ca', @EC,
            '-keyout', "$dir/$ca.key", '-out', "$dir/$ca.pem", '-days', 2,
            '-subj', "/CN=wschat test $ca");
}
my $serial = 100;
for my $leaf ([server => '/CN=redis.test'], [client => '/CN=wschat-nginx']) {
    my ($name, $subj) = @$leaf;
    openssl('req', '-new', '-config', "$dir/openssl.cnf", @EC, '-keyout', "$dir/$name.key",
            '-out', "$dir/$name.csr", '-subj', $subj);
    openssl('x509', '-req', '-in', "$dir/$name.csr", '-CA', "$dir/ca1.pem", '-CAkey', "$dir/ca1.key",
            '-set_serial', $serial++, '-days', 2, '-out', "$dir/$name.pem",
            '-extfile', "$dir/openssl.cnf", '-extensions', $name);
}
# The test's premises: CA 1 vouches for both leaves, CA 2 for neither.
my ($v_ok) = ChatTest::_run_cmd(10, 'openssl', 'verify', '-CAfile', "$dir/ca1.pem",
                                "$dir/server.pem", "$dir/client.pem");
my ($v_bad) = ChatTest::_run_cmd(10, 'openssl', 'verify', '-CAfile', "$dir/ca2.pem", "$dir/server.pem");
ok($v_ok == 0 && $v_bad != 0, 'certificates: CA 1 signs server and client, CA 2 does not')
    or BAIL_OUT('the generated certificates are not what the test needs');

# ---------------------------------------------------------------- Redis

sub tls_redis {
    my ($auth_clients) = @_;
    my $tport = free_port();
    my $r = start_redis(args => ['--tls-port', $tport,
        '--tls-cert-file', "$dir/server.pem", '--tls-key-file', "$dir/server.key",
        '--tls-ca-cert-file', "$dir/ca1.pem", '--tls-auth-clients', $auth_clients]);
    return ($r, $tport);
}

my ($redis, $tport) = tls_redis('no');
my $rport = $redis->port;

# ---------------------------------------------------------------- helpers

my $STATUS_PUBLISH = <<'EOT';
        location = /status { websocket_chat_status; }
        location = /publish {
            websocket_chat_publish;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_user;
        }
EOT

# http-level TLS directives. %o: trusted (ca1/ca2 or a path; undef: none),
# name, verify (on/off), cert (1: the client certificate and key),
# cert_only (1: the certificate without its key), timeout.
sub tls_http {
    my (%o) = @_;
    my @d;
    if (defined $o{trusted}) {
        my $f = $o{trusted} =~ m{/} ? $o{trusted} : "$dir/$o{trusted}.pem";
        push @d, "websocket_chat_redis_ssl_trusted_certificate $f;";
    }
    push @d, "websocket_chat_redis_ssl_name $o{name};" if defined $o{name};
    push @d, "websocket_chat_redis_ssl_verify $o{verify};" if defined $o{verify};
    push @d, "websocket_chat_redis_ssl_certificate $dir/client.pem;" if $o{cert} || $o{cert_only};
    push @d, "websocket_chat_redis_ssl_certificate_key $dir/client.key;" if $o{cert};
    push @d, "websocket_chat_redis_timeout $o{timeout};" if defined $o{timeout};
    return join "\n    ", @d;
}

sub config {
    my ($redis_arg, %o) = @_;
    my $workers = delete $o{workers} // 1;
    return chat_config(workers => $workers, listen => ($workers > 1 ? 'reuseport' : undef),
                       redis => $redis_arg, http => tls_http(%o), server => $STATUS_PUBLISH);
}

sub rx { quotemeta $_[0] }

# "... connection to Redis <display> failed|lost: <why>; retrying in N ms" lines.
sub attempts {
    my ($nginx, $display, $why_re) = @_;
    my $d = rx($display);
    return log_lines($nginx,
        qr/websocket_chat: (?:subscriber|command) connection to Redis $d (?:failed|lost): $why_re; retrying in \d+ ms$/);
}

# One HTTP/1.0 request (see WSClient::http_request).
sub http_req {
    my ($port, $method, $path, $body) = @_;
    WSClient::http_request(port => $port, method => $method, path => $path, body => $body);
}

sub status_json {
    my $r = http_req($_[0], 'GET', '/status');
    return undef unless $r && $r->{status} == 200;
    my $j = eval { $JSON->decode($r->{body}) };
    return ref $j eq 'HASH' ? $j : undef;
}

sub connections_up { my $j = status_json($_[0]); $j ? $j->{redis}{connections_up} // -1 : -1 }

# Redis clients connected to its TLS port $p (laddr), as CLIENT LIST gives them.
sub tls_clients {
    my ($r, $p) = @_;
    return grep { ($_->{laddr} // '') eq "127.0.0.1:$p" } $r->client_list;
}

# Members of $room until both workers hold some (see t/chat_workers.t:
# reuseport spreads connections by a hash of the client's port).
sub spread_members {
    my ($nginx, $room, @workers) = @_;
    my (@m, %on);
    my $t0 = time;
    while (@m < $MAX_CONNECT && time - $t0 < $MAX_SECONDS) {
        push @m, WSClient->join(port => $nginx->port, room => $room, nick => 'm' . scalar(@m));
        my @owner = client_workers($nginx, \@m, @workers);
        %on = ();
        push @{ $on{ $owner[$_] // '' } }, $_ for 0 .. $#m;
        last if @m >= $MIN_MEMBERS && !grep { !$on{$_} } @workers;
    }
    return (\@m, \%on);
}

# Every member receives exactly one message $text from $user (within 5 s).
sub all_receive {
    my ($members, $text, $user) = @_;
    my $got = 0;
    for my $c (@$members) {
        my $m = $c->wait_for(sub { ($_[0]{type} // '') eq 'message' && $_[0]{text} eq $text }, 5);
        $got++ if $m && $m->{user} eq $user;
    }
    return $got;
}

# A session on a failing link: it is not welcomed (its room's channel is
# never live), so connect without waiting for a welcome.
sub session {
    my ($nginx, $room, $nick) = @_;
    return WSClient->connect(port => $nginx->port, path => "/ws?room=$room&nick=$nick");
}

# ================================================================ (7) nginx -t

{
    my $rediss = "rediss://127.0.0.1:$tport";
    my ($code, $out) = test_config(config($rediss, name => 'redis.test'));
    isnt($code, 0, '(7) nginx -t: rediss:// with verify on (default) and no trusted certificate is refused');
    like($out, qr/no "websocket_chat_redis_ssl_trusted_certificate" for rediss:\/\//,
         '(7) ... the message names the missing directive') or diag($out);

    ($code, $out) = test_config(config($rediss, trusted => 'ca1', cert_only => 1));
    isnt($code, 0, '(7) nginx -t: a client certificate without its key is refused');
    like($out, qr/"websocket_chat_redis_ssl_certificate" and "websocket_chat_redis_ssl_certificate_key" go together/,
         '(7) ... the message names both directives') or diag($out);

    my $missing = "$dir/no-such-ca.pem";
    ($code, $out) = test_config(config($rediss, trusted => $missing));
    isnt($code, 0, '(7) nginx -t: a trusted-certificate file that does not exist is refused');
    like($out, qr/\Q$missing\E/, '(7) ... the message names the file') or diag($out);

    ($code, $out) = test_config(config($rediss, verify => 'off'));
    is($code, 0, '(7) nginx -t: verify off needs no trusted certificate') or diag($out);

    ($code, $out) = test_config(config($rediss, trusted => 'ca1', name => 'redis.test', cert => 1));
    is($code, 0, '(7) nginx -t: trusted certificate, name, certificate and key together are accepted')
        or diag($out);
}

# ================================================================ (1) verified TLS

my $disp = "rediss://127.0.0.1:$tport";
# Parts (6) and (8) cut the main nginx's connections on purpose; a write
# can meet the cut before a read does (SSL_write's EPIPE/ECONNRESET).
my $main = start_nginx_ok('(1) nginx starts: 2 workers, rediss:// with CA 1 and name redis.test',
    config($disp, workers => 2, trusted => 'ca1', name => 'redis.test', timeout => '1s'),
    workers => 2, allow_errors => [
        qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis \Q$disp\E lost: (?:connection closed|send failed); retrying in \d+ ms$/,
        qr/\[error\] \d+#\d+: SSL_write\(\) failed \((?:32: Broken pipe|104: Connection reset by peer)\)$/]);
my $port = $main->port;
my @workers = sort { $a <=> $b } $main->worker_pids;
is(scalar @workers, 2, '(1) two workers');

my ($members, $on) = spread_members($main, 'tls1', @workers);
is(scalar(grep { $on->{$_} } @workers), 2, '(1) members of tls1 on both workers (welcomed: the link is up over TLS)')
    or diag('members per worker: ' . join ', ', map { "$_: " . scalar @{ $on->{$_} } } sort keys %$on);
ok(wait_until(sub { $redis->numsub('tls1') == 2 }, 5), '(1) both workers subscribed to wschat:tls1 over TLS');

my ($w0, $w1) = map { $on->{$_} ? $on->{$_}[0] : 0 } @workers;
$members->[$w0]->send_text('hello over tls');
is(all_receive($members, 'hello over tls', "m$w0"), scalar @$members,
   "(1) every member receives m$w0\'s message (worker $workers[0])");
$members->[$w1]->send_text('reply over tls');
is(all_receive($members, 'reply over tls', "m$w1"), scalar @$members,
   "(1) every member receives m$w1\'s message (worker $workers[1])");

my $pub = http_req($port, 'POST', '/publish?room=tls1&user=backend', 'published over tls');
is($pub && $pub->{status}, 201, '(1) websocket_chat_publish: 201 once Redis (over TLS) has the message')
    or diag($pub ? $pub->{body} : 'no response');
is(all_receive($members, 'published over tls', 'backend'), scalar @$members,
   '(1) every member receives the published message');

my $late = WSClient->join(port => $port, room => 'tls1', nick => 'late');
my $hist = $late->wait_type('history', 5);
is_deeply([map { $_->{text} } @{ $hist ? $hist->{messages} : [] }],
          ['hello over tls', 'reply over tls', 'published over tls'],
          '(1) a later joiner\'s history holds the three messages, in order (read over TLS)');
push @$members, $late;

my $up;
ok(wait_until(sub { ($up = connections_up($port)) == 4 }, 5),
   '(1) websocket_chat_status: redis.connections_up = 4 (2 workers x 2)') or diag("connections_up = $up");
my @tc;
ok(wait_until(sub { @tc = tls_clients($redis, $tport); @tc == 4 }, 5),
   '(1) CLIENT LIST: 4 connections on the TLS port')
    or diag(join "\n", map { "addr=$_->{addr} laddr=$_->{laddr} cmd=$_->{cmd}" } $redis->client_list);
my @plain = grep { ($_->{laddr} // '') ne "127.0.0.1:$tport" } $redis->client_list;
is(scalar @plain, 0, '(1) ... and none from nginx on the plain port')
    or diag(join "\n", map { "addr=$_->{addr} laddr=$_->{laddr}" } @plain);
my %by_pid = redis_conns_by_pid($tport, @workers);
is_deeply([map { $by_pid{$_} // 0 } @workers], [2, 2], '(1) each worker owns 2 of them');

# ================================================================ (3)(4)(5) failures

# Several failing nginx at once: each waits on its own backoff. An attempt
# that fails (warn, "failed") is what a bad certificate or name gives: the
# link never carried a command. warn => 1: every attempt line must be so.
my $plain_tls = qr/\b127\.0\.0\.1:\Q$tport\E\b/;
my %fail = (
    wrong_ca => {
        redis => $disp, conf => [trusted => 'ca2', name => 'redis.test'], warn => 1,
        display => $disp, what => 'a certificate from another CA',
        # OpenSSL's words for a chain that ends in a root it does not trust
        # (Redis sends CA 1 along, so it is not "unable to get local issuer").
        why => qr/certificate verify error: (?:self-signed certificate in certificate chain|unable to get local issuer certificate)/,
    },
    wrong_name => {
        redis => $disp, conf => [trusted => 'ca1', name => 'other.test'], warn => 1,
        display => $disp, why => qr/certificate does not match the server name/,
        what => 'websocket_chat_redis_ssl_name other.test',
    },
    default_name => {
        redis => $disp, conf => [trusted => 'ca1'], warn => 1,
        display => $disp, why => qr/certificate does not match the server name/,
        what => 'no ssl_name: 127.0.0.1 is checked against DNS:redis.test',
    },
    tls_to_plain => {
        redis => "rediss://127.0.0.1:$rport", conf => [verify => 'off', timeout => '1s'], warn => 1,
        display => "rediss://127.0.0.1:$rport", why => qr/TLS handshake (?:failed|timed out)/,
        what => 'rediss:// to a plain port',
    },
    plain_to_tls => {
        redis => "127.0.0.1:$tport", conf => [timeout => '1s'],
        display => "127.0.0.1:$tport", why => qr/[^;]+/,
        what => 'redis:// to a TLS port',
        # A plain connection counts as up once TCP connects; Redis's TLS
        # port then resets it at the first bytes, which are not TLS.
        allow => [qr/\[error\] \d+#\d+: recv\(\) failed \(104: Connection reset by peer\)$/,
                  qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis $plain_tls lost: connection closed; retrying in \d+ ms$/],
    },
);
my @FAIL = sort keys %fail;
for my $k (@FAIL) {
    my $f = $fail{$k};
    $f->{nginx} = start_nginx_ok("($k) nginx starts: $f->{what}", config($f->{redis}, @{ $f->{conf} }),
                                 allow_errors => $f->{allow} // []);
    $f->{workers} = [sort { $a <=> $b } $f->{nginx}->worker_pids];
    $f->{session} = session($f->{nginx}, 'fail', $k);
}
for my $k (@FAIL) {
    my $f = $fail{$k};
    my @a;
    ok(wait_until(sub { @a = attempts($f->{nginx}, $f->{display}, $f->{why}); @a >= 2 }, 8),
       "($k) at least 2 attempts logged, each with its reason, retried") or do {
        diag(join "\n", log_lines($f->{nginx}, qr/websocket_chat|SSL/));
    };
    note("($k) $_") for @a[0 .. ($#a < 1 ? $#a : 1)];
    my $e = $f->{session}->wait_type('error', 5);
    is($e && $e->{code}, 'redis_unavailable', "($k) the session gets a redis_unavailable error");
    my ($pong, @ev) = ping_pong($f->{session}, 5);
    ok($pong, "($k) the session stays open (ping answered)");
    my @wrong = grep { my $t = $_->{type} // ''; $t eq 'welcome' || $t eq 'notice' }
                ($f->{session}->events, $f->{session}->skipped, @ev);
    is(scalar @wrong, 0, "($k) no welcome and no redis_available: the link never counted as up")
        or diag(join "\n", map { $_->{_raw} // $_->{type} } @wrong);
    is(scalar(log_lines($f->{nginx}, qr/is available again/)), 0, "($k) no \"available again\" line");
    is_deeply([sort { $a <=> $b } $f->{nginx}->worker_pids], $f->{workers}, "($k) the worker is the same process");
}
for my $k (@FAIL) {
    my $f = $fail{$k};
    my @lines = attempts($f->{nginx}, $f->{display}, qr/[^;]+/);
    my %lv;
    $lv{$_}++ for map { /\[(\w+)\] .* (failed|lost): / ? "$1 $2" : '?' } @lines;
    note("($k) attempt lines: " . join(', ', map { "$lv{$_} $_" } sort keys %lv));
    if ($f->{warn}) {
        my @not = grep { !/\[warn\] .* failed: / } @lines;
        is(scalar @not, 0, "($k) every attempt line is \"[warn] ... failed: ...\" (" . scalar(@lines) . ' lines)')
            or diag(join "\n", @not[0 .. ($#not < 3 ? $#not : 3)]);
    }
    $f->{nginx}->stop;
}

# verify off: neither the chain nor the name is checked.
{
    my $n = start_nginx_ok('(3) nginx starts: CA 2, name other.test, websocket_chat_redis_ssl_verify off',
        config($disp, trusted => 'ca2', name => 'other.test', verify => 'off'));
    my $a = WSClient->join(port => $n->port, room => 'off', nick => 'a');
    my $b = WSClient->join(port => $n->port, room => 'off', nick => 'b');
    $a->send_text('unverified');
    is(all_receive([$a, $b], 'unverified', 'a'), 2, '(3) verify off: the same wrong CA and name work');
    is(scalar(attempts($n, $disp, qr/[^;]+/)), 0, '(3) verify off: no failed attempt logged');
    $n->stop;
}

# ================================================================ (2) client certificates

{
    my ($redis2, $tport2) = tls_redis('yes');
    my $disp2 = "rediss://127.0.0.1:$tport2";
    # TLS 1.3: the client's side of the handshake is done before Redis
    # checks for a certificate, so the connection is up (and verified) when
    # Redis's alert ends it: lost, at error. nginx's own SSL layer logs the
    # alert (reason 116 is not among those it logs below crit).
    my $p2 = qr/rediss:\/\/127\.0\.0\.1:\Q$tport2\E/;
    my $n = start_nginx_ok('(2) nginx starts: no client certificate, Redis requires one',
        config($disp2, trusted => 'ca1', name => 'redis.test', timeout => '1s'),
        allow_errors => [
            qr/\[error\] \d+#\d+: SSL_write\(\) failed \((?:32: Broken pipe|104: Connection reset by peer)\)$/,
            qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis $p2 lost: (?:connection closed|send failed); retrying in \d+ ms$/]);
    allow_log_lines($n, qr/\[crit\] \d+#\d+: SSL_read\(\) failed \(SSL: error:0A00045C:SSL routines::tlsv13 alert certificate required:SSL alert number 116\)$/);
    my @w = $n->worker_pids;
    my $s = session($n, 'cc', 'nocert');
    my @a;
    ok(wait_until(sub { @a = attempts($n, $disp2, qr/[^;]+/); @a >= 2 }, 8),
       '(2) without a client certificate: at least 2 attempts logged, retried')
        or diag(join "\n", log_lines($n, qr/websocket_chat|SSL/));
    note("(2) $_") for @a[0 .. ($#a < 1 ? $#a : 1)];
    my $e = $s->wait_type('error', 5);
    is($e && $e->{code}, 'redis_unavailable', '(2) without a client certificate: the session gets redis_unavailable');
    ok(!grep({ ($_->{type} // '') eq 'welcome' } $s->events, $s->skipped),
       '(2) ... and is not welcomed');
    is_deeply([$n->worker_pids], \@w, '(2) ... and the worker is the same process');
    $n->stop;

    $n = start_nginx_ok('(2) nginx starts: with websocket_chat_redis_ssl_certificate and _key',
        config($disp2, trusted => 'ca1', name => 'redis.test', cert => 1));
    my $a = WSClient->join(port => $n->port, room => 'cc', nick => 'a');
    my $b = WSClient->join(port => $n->port, room => 'cc', nick => 'b');
    $a->send_text('with a client certificate');
    is(all_receive([$a, $b], 'with a client certificate', 'a'), 2, '(2) with the client certificate: chat works');
    my @c;
    ok(wait_until(sub { @c = tls_clients($redis2, $tport2); @c == 2 }, 5),
       '(2) ... Redis holds its 2 connections on the TLS port') or diag(scalar @c);
    is(scalar(attempts($n, $disp2, qr/[^;]+/)), 0, '(2) ... no failed attempt logged');
    $n->stop;
    $redis2->stop;
}

# ================================================================ (6) Redis restarts

{
    my %seen = map { ($_ => []) } 0 .. $#$members;
    # Reads member $i's events until $pred holds for one (kept, like all).
    my $collect = sub {
        my ($i, $pred, $timeout) = @_;
        my $deadline = time + $timeout;
        while ((my $left = $deadline - time) > 0) {
            my $ev = $members->[$i]->recv_json($left) or return undef;
            push @{ $seen{$i} }, $ev;
            return $ev if $pred->($ev);
        }
        return undef;
    };
    $redis->stop;
    my $down = 0;
    for my $i (0 .. $#$members) {
        my $e = $collect->($i, sub { ($_[0]{type} // '') eq 'error' }, 10);
        $down++ if $e && $e->{code} eq 'redis_unavailable';
    }
    is($down, scalar @$members, '(6) Redis stopped: every member gets redis_unavailable');
    # a sender on each worker, three messages each, interleaved
    for my $n (1 .. 3) {
        $members->[$_]->send_text("m$_-out-$n") for $w0, $w1;
    }
    ok(wait_until(sub { attempts($main, $disp, qr/[^;]+/) >= 4 }, 5),
       '(6) the workers retry while Redis is down');
    my $t_back = time;
    $redis->restart;
    my $back = 0;
    for my $i (0 .. $#$members) {
        my $n = $collect->($i, sub { ($_[0]{type} // '') eq 'notice' }, 15);
        $back++ if $n && $n->{code} eq 'redis_available';
    }
    is($back, scalar @$members, '(6) Redis back on the same TLS port: every member gets redis_available');
    note(sprintf '(6) all notices %.2fs after the restart began', time - $t_back);
    # A marker from each sender after its outage messages: once a member has
    # both, everything those senders sent before has arrived (per-sender order).
    $members->[$_]->send_text("m$_-marker") for $w0, $w1;
    my $exact = 0;
    for my $i (0 .. $#$members) {
        my %marker;
        $collect->($i, sub { $marker{ $_[0]{text} // '' }++ if ($_[0]{type} // '') eq 'message';
                             $marker{"m$w0-marker"} && $marker{"m$w1-marker"} }, 10);
        my @texts = map { $_->{text} } grep { ($_->{type} // '') eq 'message' && $_->{text} =~ /-out-/ } @{ $seen{$i} };
        my $ok = @texts == 6;
        for my $s ($w0, $w1) {
            $ok &&= "@{[ grep { /^m\Q$s\E-out-/ } @texts ]}" eq join(' ', map { "m$s-out-$_" } 1 .. 3);
        }
        if ($ok) { $exact++ } else { diag("(6) member $i received: @texts") }
    }
    is($exact, scalar @$members,
       '(6) every member receives the 6 messages sent during the outage once each, in per-sender order');
    ok(wait_until(sub { $redis->numsub('tls1') == 2 }, 5), '(6) both workers subscribed again over TLS');
    my @again = log_lines($main, qr/websocket_chat: Redis \Q$disp\E is available again/);
    my %again = map { /\] (\d+)#/ ? ($1 => 1) : () } @again;
    ok((grep { $again{$_} } @workers) == 2,
       '(6) error log: "Redis rediss://127.0.0.1:PORT is available again" from both workers')
        or diag(join "\n", @again);
}

# ================================================================ (8) reconnect cycles

{
    my $room_up = sub {
        my @c = tls_clients($redis, $tport);
        return @c == 4 && $redis->numsub('tls1') == 2 ? { map { ($_->{id} => 1) } @c } : undef;
    };
    my $ids = wait_until($room_up, 5);
    ok($ids, '(8) before the cycles: 4 TLS connections, room subscribed by both workers');
    my ($done, %rss0, $t_cycles) = (0);
    for my $cycle (1 .. $WARMUP + $CYCLES) {
        if ($cycle == $WARMUP + 1) {
            %rss0 = map { ($_ => proc_rss_kb($_)) } @workers;
            $t_cycles = time;
        }
        my $killed = eval { $redis->cmd('CLIENT', 'KILL', 'LADDR', "127.0.0.1:$tport") } // 0;
        last unless $killed >= 1;
        my $old = $ids;
        # new connections (new ids), and the room's channel live again
        $ids = wait_until(sub {
            my $now = $room_up->() or return undef;
            return (grep { $old->{$_} } keys %$now) ? undef : $now;
        }, 5) or last;
        $done++;
    }
    is($done, $WARMUP + $CYCLES, "(8) $done reconnect cycles: each time the 4 TLS connections come back");
    my %rss1 = map { ($_ => proc_rss_kb($_)) } @workers;
    my @grown;
    for my $w (@workers) {
        my $g = defined $rss0{$w} && defined $rss1{$w} ? $rss1{$w} - $rss0{$w} : undef;
        note(sprintf "(8) worker $w: VmRSS %s kB -> %s kB over $CYCLES cycles (%.1fs)",
             $rss0{$w} // '?', $rss1{$w} // '?', time - ($t_cycles // time));
        push @grown, $w unless defined $g && $g < $RSS_LIMIT;
    }
    is(scalar @grown, 0, "(8) no worker's VmRSS grew by $RSS_LIMIT kB or more over $CYCLES TLS reconnects")
        or diag("grown: @grown");
    is_deeply([sort { $a <=> $b } $main->worker_pids], \@workers, '(8) the workers are the same processes');
    $members->[$w1]->send_text('after the cycles');
    is(all_receive($members, 'after the cycles', "m$w1"), scalar @$members,
       '(8) after the cycles every member still receives a message');
}

$_->send_close(1000) for @$members;
$main->stop;
note(sprintf 'whole file: %.1fs', time - $T0);
done_all();
