# README "Operations" -> "Redis contract", proved with the real module under
# the least Redis ACL user the README gives (its ACL SETUSER line, read from
# README.md at run time, so that the test breaks when the README changes
# without it):
# (1) the line's user "chat" (prefix chat-prod:) is created as written; nginx A
#     (2 workers, reuseport) connects as redis://chat:secret@127.0.0.1:PORT,
#     nginx B (1 worker) with database /0, so that SELECT runs too;
# (2) members on both workers of A and on B: welcome with the member list,
#     messages with ids, websocket_chat_publish (201 {"id"}), a later joiner's
#     history, a since= resume, leave events; Redis holds what the README's
#     table says under the prefix and nothing else; afterwards (nginx stopped,
#     so its goodbyes count too) ACL LOG is empty: every command the module
#     ran was allowed; the stop checks A's and B's error logs for [error];
# (3) the README's "backend that publishes directly" recipe, run as EVAL by
#     the default user: members receive the event with the id XADD gave, and
#     a later joiner sees it in its history;
# (4) a user "chat2" with the same line without +xadd (nginx C): a member's
#     message gets error publish_refused and reaches nobody, a POST gets
#     502 redis_refused; that member stays connected and still receives,
#     the chat user's locations on the same worker keep working, and ACL LOG
#     names chat2 only.
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
my $PREFIX = 'chat-prod:';
my $ROOM = 'lobby';
my $CHANNEL = "$PREFIX$ROOM";

sub short { my $s = join ' ', map { $_ // 'undef' } @_; length $s > 400 ? substr($s, 0, 400) . '...' : $s }

# ---------------------------------------------------------------- README

# The fenced block whose first line starts with "ACL SETUSER chat": its lines.
sub readme_acl_block {
    open my $fh, '<', repo_root() . '/README.md' or return;
    my (@blocks, $cur);
    while (my $l = <$fh>) {
        chomp $l;
        if ($l =~ /^\s*```/) {
            if ($cur) { push @blocks, $cur; undef $cur } else { $cur = [] }
            next;
        }
        push @$cur, $l if $cur;
    }
    my @acl = grep { @$_ && $_->[0] =~ /^\s*ACL SETUSER chat\s/ } @blocks;
    return @acl == 1 ? @{ $acl[0] } : ();
}

my @block = readme_acl_block();
is(scalar(grep { /\S/ } @block), 1, 'README: one fenced block holds exactly one "ACL SETUSER chat" line')
    or diag("block: @block");
my @acl = split ' ', $block[0] // '';
splice(@acl, 0, 2);    # ACL SETUSER
note("README ACL line: ACL SETUSER @acl");
# The module's address and prefix below are those the README's line is for.
is($acl[0], 'chat', 'README: the ACL user is "chat"');
ok((grep { $_ eq '>secret' } @acl), 'README: its password is "secret"');
ok((grep { $_ eq "&$PREFIX*" } @acl) && (grep { $_ eq "~$PREFIX*" } @acl),
   "README: channels and keys of prefix $PREFIX only");
is(scalar(grep { $_ eq '+xadd' } @acl), 1, 'README: the line grants +xadd once (part 4 takes it away)');

my $redis = start_redis();
my $rport = $redis->port;
is($redis->cmd('ACL', 'SETUSER', @acl), 'OK', 'Redis accepts the README\'s ACL SETUSER line as written');
is($redis->cmd('ACL', 'LOG', 'RESET'), 'OK', 'ACL LOG reset');

sub acl_log { map { +{ @$_ } } @{ $redis->cmd('ACL', 'LOG') } }

sub calls {
    my $cmd = shift;
    return $redis->cmd('INFO', 'commandstats') =~ /^cmdstat_\Q$cmd\E:calls=(\d+)/m ? $1 : 0;
}

# ---------------------------------------------------------------- HTTP

# POST $body to $path; {status, body, json} (status undef without answer).
sub post {
    my ($port, $path, $body) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5)
        or return { status => undef, raw => "connect: $!" };
    binmode $s;
    my $b = $body;
    utf8::encode($b);
    syswrite($s, "POST $path HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n"
               . 'Content-Length: ' . length($b) . "\r\n\r\n$b");
    my ($raw, $deadline, $sel) = ('', time + 5, IO::Select->new($s));
    while ((my $left = $deadline - time) > 0) {
        last unless $sel->can_read($left);
        last unless sysread($s, $raw, 65536, length $raw);
    }
    close $s;
    my ($head, $rest) = split /\r\n\r\n/, $raw, 2;
    my ($status) = ($head // '') =~ m{^HTTP/1\.[01] (\d{3})};
    $rest //= '';
    if (($head // '') =~ /^transfer-encoding:\s*chunked/mi) {
        my $body = '';
        while ($rest =~ s/^([0-9a-f]+)\r\n//i && hex $1) {
            $body .= substr($rest, 0, hex $1, '');
            $rest =~ s/^\r\n//;
        }
        $rest = $body;
    }
    my $json = eval { $JSON->decode($rest) };
    return { status => $status, body => $rest, json => ref $json eq 'HASH' ? $json : undef, raw => $raw };
}

# ---------------------------------------------------------------- members

# For each client, the first message event with $text within $timeout
# seconds shared by all (undef where none came).
sub receive_all {
    my ($clients, $text, $timeout) = @_;
    my $deadline = time + ($timeout // 5);
    return map {
        my $left = $deadline - time;
        $_->wait_type('message', $left > 0.2 ? $left : 0.2, sub { $_[0]{text} eq $text });
    } @$clients;
}

# Every client receives $text once with the same id, from $user (and
# $session when given); returns that id.
sub all_get {
    my ($clients, $text, $user, $session, $name) = @_;
    my @got = receive_all($clients, $text, 5);
    my @ok = grep { $_ && $_->{user} eq $user && $_->{room} eq $ROOM && is_pos($_->{id})
                    && ($_->{ts} // '') =~ /^\d+$/ && (!defined $session || $_->{session} eq $session) } @got;
    my %ids = map { $_->{id} => 1 } @ok;
    ok(@ok == @$clients && keys %ids == 1,
       "$name: all " . scalar(@$clients) . " members receive it from $user with one message id")
        or diag(short(map { $_ ? $_->{_raw} : 'nothing' } @got));
    return @ok ? $ok[0]{id} : undef;
}

sub history_of {
    my $h = shift;
    return $h && ref $h->{messages} eq 'ARRAY' ? @{ $h->{messages} } : ();
}

my $PUBLISH = q{
        location = /publish {
            websocket_chat_publish;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_user;
        }
};
my $HTTP = "websocket_chat_channel_prefix $PREFIX;";

# ================================================================ (1) (2) (3)

my $A = start_nginx_ok('nginx A starts: 2 workers, reuseport, redis://chat:secret@127.0.0.1:PORT',
    chat_config(workers => 2, listen => 'reuseport', http => $HTTP, server => $PUBLISH,
                redis => 'redis://chat:secret@127.0.0.1:%%REDIS_PORT%%'),
    redis => $redis, workers => 2);
my $pa = $A->port;
my @workers = sort { $a <=> $b } $A->worker_pids;

# reuseport spreads connections by a hash of the client's port: keep joining
# until both workers hold members (see t/chat_workers.t).
my $MIN_MEMBERS = 4;
my $MAX_CONNECT = 30;
my $MAX_SECONDS = 15;
my (@m, @owner, %on);
my $t0 = time;
while (@m < $MAX_CONNECT && time - $t0 < $MAX_SECONDS) {
    push @m, WSClient->join(port => $pa, room => $ROOM, nick => 'a' . scalar(@m));
    @owner = client_workers($A, \@m, @workers);
    %on = ();
    $on{ $owner[$_] // '' }++ for 0 .. $#m;
    last if @m >= $MIN_MEMBERS && !grep { !$on{$_} } @workers;
}
is(scalar(grep { $on{$_} } @workers), 2, 'A: members on both workers')
    or diag('members per worker: ' . join ', ', map { "$_: $on{$_}" } sort keys %on);
my ($w1) = grep { ($owner[$_] // 0) == $workers[0] } 0 .. $#m;
my ($w2) = grep { ($owner[$_] // 0) == $workers[1] } 0 .. $#m;

sub welcome_ok {
    my $c = shift;
    my $w = $c->welcome;
    return ref $w->{members} eq 'ARRAY' && ($w->{count} // 0) >= 1
        && grep { ($_->{session} // '') eq $w->{session} } @{ $w->{members} };
}
is(scalar(grep { welcome_ok($_) } @m), scalar(@m), 'A: every welcome has a member list and count, the joiner in it');
is(calls('select'), 0, 'no SELECT so far: A\'s address has no database');

my $B = start_nginx_ok('nginx B starts: redis://chat:secret@127.0.0.1:PORT/0',
    chat_config(workers => 1, http => $HTTP, server => $PUBLISH,
                redis => 'redis://chat:secret@127.0.0.1:%%REDIS_PORT%%/0'),
    redis => $redis);
my $pb = $B->port;
my $b0 = WSClient->join(port => $pb, room => $ROOM, nick => 'b0');
ok(welcome_ok($b0), 'B: the welcome has a member list and count, the joiner in it');
ok(wait_until(sub { calls('select') >= 2 }, 5), 'B: SELECT ran on its connections (' . calls('select') . ' calls)');

{
    my @cl;
    ok(wait_until(sub { @cl = $redis->client_list; @cl == 6 }, 5),
       'CLIENT LIST: 6 connections (2 per worker of A and B)')
        or diag(join "\n", map { "user=$_->{user} db=$_->{db} cmd=$_->{cmd}" } @cl);
    is(scalar(grep { ($_->{user} // '') eq 'chat' } @cl), scalar(@cl), 'all of them authenticated as "chat"');
}

# Presence: a member is in Redis's list once its own join came back from
# Redis, so once all have, a new joiner's welcome lists them all.
my @everyone = (@m, $b0);
is(scalar(grep { my $s = $_->welcome->{session}; $_->wait_type('join', 5, sub { $_[0]{session} eq $s }) } @everyone),
   scalar(@everyone), 'every member receives its own join event');
my $watch = WSClient->join(port => $pa, room => $ROOM, nick => 'watch');
push @everyone, $watch;
{
    my $w = $watch->welcome;
    my @want = sort map { $_->welcome->{session} } @everyone;
    is_deeply([sort map { $_->{session} } @{ $w->{members} // [] }], \@want,
              'a new joiner\'s welcome lists every member of A (both workers) and B, itself included');
    is($w->{count}, scalar(@everyone), 'and counts them (' . scalar(@everyone) . ')');
    my %user_of = map { $_->welcome->{session} => $_->welcome->{user} } @everyone;
    is(scalar(grep { ($user_of{ $_->{session} } // '') eq $_->{user} } @{ $w->{members} // [] }),
       scalar(@everyone), 'with their user names');
}

# --- chat from each worker of A and from B
my (@texts, @ids);
for my $s ([$m[$w1 // 0], 'worker 1 of A'], [$m[$w2 // 0], 'worker 2 of A'], [$b0, 'B']) {
    my ($c, $where) = @$s;
    my $text = "hello from $where";
    $c->send_text($text);
    push @texts, $text;
    push @ids, all_get(\@everyone, $text, $c->welcome->{user}, $c->welcome->{session}, "message from $where");
}

# --- websocket_chat_publish through A and through B
for my $n ([$pa, 'A'], [$pb, 'B']) {
    my ($port, $name) = @$n;
    my $text = "posted through $name";
    my $r = post($port, "/publish?room=$ROOM&user=backend", $text);
    is($r->{status}, 201, "POST to $name\'s publish location -> 201") or diag(short($r->{raw}));
    ok(is_pos($r->{json} && $r->{json}{id}), "$name: the answer carries a message id")
        or diag(short($r->{body}));
    my $id = all_get(\@everyone, $text, 'backend', undef, "POST through $name");
    is($id, $r->{json} && $r->{json}{id}, "$name: members see the id of the 201");
    push @texts, $text;
    push @ids, $id;
}

# --- (3) the README's recipe for a backend that publishes directly
{
    my $js = JSON::PP->new->allow_nonref;    # character strings: ChatTest encodes the arguments
    my ($user, $session, $text, $ts) = ('backend-lua', 'lua-1', "from Lua: \"quoted\" caf\x{e9}", now_ms());
    my $head = '{"type":"message","room":' . $js->encode($ROOM) . ',"user":' . $js->encode($user)
             . ',"session":' . $js->encode($session) . ',"text":' . $js->encode($text)
             . ',"ts":' . $ts . ',"id":"';
    my $script = <<'LUA';
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'h', ARGV[2], 't', ARGV[3])
redis.call('PUBLISH', KEYS[1], ARGV[2] .. id .. ARGV[3])
return id
LUA
    my $id = eval { $redis->cmd('EVAL', $script, 1, $CHANNEL, 100, $head, '"}') };
    ok(is_pos($id), 'the recipe\'s EVAL (XADD then PUBLISH) returns a stream id') or diag($@);
    my @got = receive_all(\@everyone, $text, 5);
    my @ok = grep { $_ && $_->{id} eq ($id // '') && $_->{user} eq $user && $_->{session} eq $session
                    && $_->{room} eq $ROOM && ($_->{ts} // 0) == $ts } @got;
    is(scalar(@ok), scalar(@everyone),
       'every member (both workers of A, B) receives it as a message event with the id XADD gave')
        or diag(short(map { $_ ? $_->{_raw} : 'nothing' } @got));
    push @texts, $text;
    push @ids, $id;
}
is(first_not_increasing(@ids), -1, 'the ids of the room\'s messages increase: ' . short(@ids));

# --- history: a later joiner, and a resume after the first message
{
    my $late = WSClient->join(port => $pa, room => $ROOM, nick => 'late');
    my @h = history_of($late->wait_type('history', 5));
    is_deeply([map { $_->{text} } @h], \@texts,
              'a later joiner\'s history: the chat, the POSTs and the recipe\'s message, in order')
        or diag(short(map { $_->{text} } @h));
    is_deeply([map { $_->{id} } @h], \@ids, 'with their ids');

    my $back = WSClient->connect(port => $pa, welcome => 1,
        path => "/ws?room=$ROOM&nick=back&since=" . WSClient::uri_escape($ids[0] // ''));
    my $hist = $back->wait_type('history', 5);
    @h = history_of($hist);
    is_deeply([map { $_->{text} } @h], [@texts[1 .. $#texts]], 'since=<first id>: exactly the later messages')
        or diag(short(map { $_->{text} } @h));
    ok(!grep({ type_of($_) eq 'gap' } $back->events), 'since=<first id>: no gap');
    for my $c ($late, $back) {
        $c->send_close(1000);
        ok($c->recv_close(5), 'history client closed');
    }
}

# --- what Redis holds, as the README's table says
{
    is($redis->cmd('TYPE', $CHANNEL), 'stream', "$CHANNEL is a stream");
    my $entries = $redis->cmd('XRANGE', $CHANNEL, '-', '+');
    is_deeply([map { $_->[0] } @$entries], \@ids, 'its entry ids are the message ids');
    my $fields_ok = grep {
        my %f = @{ $_->[1] };
        keys %f == 2 && defined $f{h} && $f{h} =~ /^\{"type":"message",.*"id":"\z/s && ($f{t} // '') eq '"}'
    } @$entries;
    is($fields_ok, scalar(@$entries), 'each entry has exactly h (the event up to "id":") and t ("})');
    ok($redis->cmd('PTTL', $CHANNEL) > 0, 'the stream expires');

    # the history clients' leaves may still be on their way
    my %h;
    ok(wait_until(sub { %h = @{ $redis->cmd('HGETALL', "$CHANNEL:members") }; keys %h == @everyone }, 5),
       "$CHANNEL:members has one field per member") or diag(short(keys %h));
    my %want = map { $_->welcome->{session} => $_->welcome->{user} } @everyone;
    my $good = grep {
        my $v = eval { $JSON->decode($h{$_}) } // {};
        exists $want{$_} && ($v->{session} // '') eq $_ && ($v->{user} // '') eq $want{$_}
    } keys %h;
    is($good, scalar(@everyone), 'session id -> {"user","session"} of each member');
    is($redis->cmd('TYPE', "$CHANNEL:presence"), 'string', "$CHANNEL:presence is a string (the counter)");
    my $nodes = $redis->cmd('ZRANGE', "${PREFIX}nodes", 0, -1);
    is($redis->cmd('TYPE', "${PREFIX}nodes"), 'zset', "${PREFIX}nodes is a sorted set");
    ok(@$nodes >= 3, 'with an entry for each of the 3 workers (' . scalar(@$nodes) . ')');
    my @held = grep { $redis->cmd('TYPE', "${PREFIX}node:$_") eq 'hash' } @$nodes;
    is(scalar(@held), 3, "a ${PREFIX}node:<id> hash for each of the 3 workers holding members");
    my $sum = 0;
    $sum += $redis->cmd('HLEN', "${PREFIX}node:$_") for @held;
    is($sum, scalar(@everyone), 'between them they hold every member');
    my @keys = @{ $redis->cmd('KEYS', '*') };
    is(scalar(grep { index($_, $PREFIX) != 0 } @keys), 0, "no key outside the prefix $PREFIX")
        or diag(short(@keys));
    is_deeply([sort @{ $redis->cmd('PUBSUB', 'CHANNELS', '*') }], [$CHANNEL],
              "the only channel followed is $CHANNEL");
}

# --- leaves: b0 (on B) and a member of A
for my $who ([$b0, 'b0 on B'], [$m[0], 'a0 on A']) {
    my ($c, $name) = @$who;
    my $s = $c->welcome->{session};
    @everyone = grep { $_ != $c } @everyone;
    $c->send_close(1000);
    ok($c->recv_close(5), "$name closes");
    my $got = grep { $_->wait_type('leave', 5, sub { $_[0]{session} eq $s && $_[0]{user} eq $c->welcome->{user} }) }
              @everyone;
    is($got, scalar(@everyone), "every remaining member gets the leave of $name");
}
ok(wait_until(sub { $redis->cmd('HLEN', "$CHANNEL:members") == @everyone }, 5),
   'the member list shrank by the two who left');

$_->send_close(1000) for @everyone;
is(scalar(grep { $_->recv_close(5) } @everyone), scalar(@everyone), 'the other members close');
$A->stop;
$B->stop;
{
    my @log = acl_log();
    is(scalar(@log), 0, 'ACL LOG is empty: Redis allowed every command A and B ran, their shutdown included')
        or diag(explain(\@log));
}

# ================================================================ (4) no +xadd

my @acl2 = ('chat2', grep { $_ ne '+xadd' } @acl[1 .. $#acl]);
is(scalar(@acl2), scalar(@acl) - 1, 'chat2: the README\'s line without +xadd');
is($redis->cmd('ACL', 'SETUSER', @acl2), 'OK', 'Redis accepts it');

my $at2 = qr/Redis redis:\/\/chat2:\S*\@127\.0\.0\.1:$rport/;
# Redis's words for a command its ACL denies inside a script: 7.0 says
# "ERR The user executing the script can't run this command or subcommand",
# later versions "NOPERM User chat2 has no permissions to run the 'xadd' command".
my $noperm = qr/(?:can't run this command or subcommand|NOPERM .*'xadd')/i;
my $ws_refused = qr/\[error\] \d+#\d+: \*\d+ websocket_chat: $at2 refused the message of "x" in "r4" \(channel \S+\): .*$noperm.*, client: 127\.0\.0\.1,/;
my $post_refused = qr/\[error\] \d+#\d+: websocket_chat: Redis refused a published message for "r4": .*$noperm/;
my $C = start_nginx_ok('nginx C starts: locations as chat and as chat2 (no +xadd)',
    chat_config(workers => 1, http => $HTTP, redis => 'redis://chat:secret@127.0.0.1:%%REDIS_PORT%%',
                server => $PUBLISH . q{
        location = /ws-noxadd {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_redis redis://chat2:secret@127.0.0.1:%%REDIS_PORT%%;
        }
        location = /publish-noxadd {
            websocket_chat_publish;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_user;
            websocket_chat_redis redis://chat2:secret@127.0.0.1:%%REDIS_PORT%%;
        }
}),
    redis => $redis,
    # Redis's refusal of each message, and of the POST
    allow_errors => [$ws_refused, $post_refused]);
my $pc = $C->port;

# Same prefix: x (as chat2) and y (as chat) are in one room r4.
my $x = WSClient->join(port => $pc, location => '/ws-noxadd', room => 'r4', nick => 'x');
my $y = WSClient->join(port => $pc, room => 'r4', nick => 'y');
my @z = map { WSClient->join(port => $pc, room => 'r5', nick => "z$_") } 1, 2;

{
    $x->send_text('refused 1');
    my $e = $x->wait_type('error', 5);
    is($e && $e->{code}, 'publish_refused', 'chat2: the sender gets error publish_refused')
        or diag(short(map { $_->{_raw} } $x->events));
    is($e && $e->{room}, 'r4', 'the error names the room');
    my @l;
    ok(wait_until(sub { @l = log_lines($C, $ws_refused) }, 5),
       'error log: Redis refused a PUBLISH, in Redis\'s words')
        or diag(join "\n", log_lines($C, qr/\[error\]/));
    # README, wire protocol: refusals are logged "with Redis's own words and the channel"
    like($l[0] // '', qr/\Q${PREFIX}\Er4\b/, "the refused PUBLISH's line names the channel ${PREFIX}r4");

    my $r = post($pc, '/publish-noxadd?room=r4&user=backend', 'refused post');
    is($r->{status}, 502, 'chat2: POST -> 502') or diag(short($r->{raw}));
    is($r->{json} && $r->{json}{error}, 'redis_refused', 'with error redis_refused') or diag(short($r->{body}));
    ok(log_lines($C, $post_refused), 'error log: Redis refused the published message, with its words')
        or diag(join "\n", log_lines($C, qr/\[error\]/));

    # What follows in r4 arrives; what was refused never did.
    $y->send_text('y after the refusals');
    my @got = receive_all([$x, $y], 'y after the refusals', 5);
    is(scalar(grep { $_ } @got), 2, 'the refused sender and the other member still receive the room\'s messages');
    $r = post($pc, '/publish?room=r4&user=backend', 'accepted post');
    is($r->{status}, 201, 'the chat user\'s POST to the same room -> 201') or diag(short($r->{raw}));
    @got = receive_all([$x, $y], 'accepted post', 5);
    is(scalar(grep { $_ } @got), 2, 'and both members receive it');
    my @leak = grep { type_of($_) eq 'message' && $_->{text} =~ /^refused/ } $x->events, $y->events;
    ok(!@leak, 'neither refused message reached anyone') or diag(short(map { $_->{_raw} } @leak));

    ok(!$x->got_close && !$x->eof, 'the refused sender\'s connection is still open');
    $x->send_text('refused 2');
    $e = $x->wait_type('error', 5);
    is($e && $e->{code}, 'publish_refused', 'its next message is refused the same way');

    $z[0]->send_text('r5 still works');
    @got = receive_all(\@z, 'r5 still works', 5);
    is(scalar(grep { $_ } @got), 2, 'another room on the same worker keeps working');
}
{
    my @log = acl_log();
    ok(@log && !grep({ ($_->{username} // '') ne 'chat2' } @log), 'ACL LOG: only chat2 was refused anything')
        or diag(explain(\@log));
    ok((grep { ($_->{object} // '') eq 'xadd' } @log), 'ACL LOG: chat2 was refused xadd');
}

$_->send_close(1000) for $x, $y, @z;
is(scalar(grep { $_->recv_close(5) } $x, $y, @z), 4, 'C: members close');
$C->stop;
done_all();
