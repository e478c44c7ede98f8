# A Redis ACL that refuses one room's SUBSCRIBE must not take every room
# down.
#
# Redis runs with an ACL user "chat" (password pw) allowed every command but
# only the channels wschat:allowed*; the default user keeps a password
# (requirepass) so that the harness can still run PUBSUB / CLIENT LIST.
# nginx connects as redis://chat:pw@127.0.0.1:PORT (worker_processes 1, so
# there is exactly one subscriber connection to watch).
#
# Redis answers the refused SUBSCRIBE with
#   -NOPERM this user has no permissions to access one of the channels used as arguments
# (no channel name in the reply; the connection stays usable, in subscribed
# mode, and keeps its other subscriptions).
#
# * members of allowed1 and allowed2 chat;
# * a member joins "denied": it gets an error event with code room_refused
#   (room "denied") and no welcome, then a close frame 1008 with the reason
#   "room refused by Redis", and the TCP connection is closed;
# * the error log has an [error] line naming the channel wschat:denied and
#   carrying Redis's NOPERM text;
# * allowed1 / allowed2 keep working: messages sent after the refusal are
#   delivered; nobody there is closed or gets a redis_unavailable event;
#   the subscriber connection was not reset (no "connection to Redis ...
#   lost" line, the same Redis client id in CLIENT LIST before and after,
#   still subscribed to both allowed channels and not to wschat:denied);
# * a second join to "denied" later is refused the same way; a room joined
#   after that (allowed3) works, and so do allowed1/allowed2.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use ChatFault;

my $redis = start_redis(requirepass => 'adminpw',
    args => ['--user', 'chat', 'on', '>pw', '~*', '&wschat:allowed*', '+@all']);
my $rport = $redis->port;

{
    my $acl = join "\n", @{ $redis->cmd('ACL', 'LIST') };
    like($acl, qr/^user chat on .*&wschat:allowed\*/m, 'ACL user "chat" limited to channels wschat:allowed*')
        or diag($acl);
}

my $lost_re = qr/connection to Redis \S*127\.0\.0\.1:$rport lost/;
# Redis's reply is "-NOPERM this user has no permissions to access one of the
# channels used as arguments"; the line names the channel and carries it.
my $nop = qr/NOPERM|no permissions to access/i;
my $refused_log_re = qr/\[error\].*(?:wschat:denied\b.*$nop|$nop.*wschat:denied\b)/;

my $nginx = start_nginx_ok('nginx starts with redis://chat:pw@127.0.0.1:PORT',
    chat_config(workers => 1, redis => 'redis://chat:pw@127.0.0.1:%%REDIS_PORT%%',
                # the subscriber PINGs when quiet this long: PINGs are then
                # interleaved with the SUBSCRIBE replies during the test
                http => 'websocket_chat_redis_timeout 2s;'),
    redis => $redis,
    # the one [error] line each refusal provokes on purpose
    allow_errors => [$refused_log_re]);
my $port = $nginx->port;

# $timeout seconds shared by all: true for each client that gets the message.
sub receive_all {
    my ($clients, $text, $timeout) = @_;
    my $deadline = time + $timeout;
    return map {
        my $left = $deadline - time;
        $left = 0.2 if $left < 0.2;
        my $m = $_->wait_type('message', $left, sub { ($_[0]{text} // '') eq $text });
        $m ? 1 : 0;
    } @$clients;
}

sub chat_in {
    my ($what, $room, $sender, @members) = @_;
    my $text = "$what in $room";
    ok($sender->send_text($text), "$what: $room: message sent");
    my @got = receive_all(\@members, $text, 5);
    is(scalar(grep { $_ } @got), scalar(@members),
       "$what: $room: all " . scalar(@members) . ' members receive the message')
        or diag("received: @got");
}

# The subscriber connection in CLIENT LIST (user chat, flag P).
sub subscriber {
    my @s = grep { ($_->{user} // '') eq 'chat' && ($_->{flags} // '') =~ /P/ } $redis->client_list;
    return @s == 1 ? $s[0] : undef;
}

# No error event since the previous check, and still open.
my %checked;    # name => events already looked at
sub no_trouble {
    my ($what, %members) = @_;
    for my $name (sort keys %members) {
        my $c = $members{$name};
        my @ev = $c->events;
        my @bad = grep { ($_->{type} // '') eq 'error' } @ev[($checked{$name} // 0) .. $#ev];
        $checked{$name} = @ev;
        ok(!@bad, "$what: $name got no error event (e.g. redis_unavailable)")
            or diag(explain(\@bad));
        ok(!$c->got_close && !$c->eof, "$what: $name is still open");
    }
}

# A member joins "denied" and must be refused: error room_refused, then 1008.
sub refused_join {
    my ($what, $nick) = @_;
    my $d = eval { WSClient->connect(port => $port, path => "/ws?room=denied&nick=$nick") };
    ok($d, "$what: the handshake succeeds (101)") or do { diag($@); return };
    my $first = $d->wait_for(sub { $_[0]{type} eq 'welcome' || $_[0]{type} eq 'error' }, 5);
    is($first && $first->{type}, 'error', "$what: the member gets an error event, not a welcome")
        or diag(explain($first));
    is($first && $first->{code}, 'room_refused', "$what: error code room_refused")
        or diag(explain([$d->events]));
    is($first && $first->{room}, 'denied', "$what: the error event names the room");
    my $close = $d->recv_close(3);
    ok($close, "$what: then a close frame")
        or diag('events: ' . explain([$d->events]) . ' eof: ' . ($d->eof ? 1 : 0));
    is($close && $close->{close_code}, 1008, "$what: close code 1008");
    is($close && $close->{close_reason}, 'room refused by Redis', "$what: close reason");
    ok(!grep({ $_->{type} eq 'welcome' } $d->events), "$what: no welcome at all");
    if ($close) {
        $d->send_close(1008);
        ok($d->is_closed_by_server(3), "$what: the server closes the TCP connection");
    }
    $d->disconnect;
    return $d;
}

# --- allowed rooms chat
my %m;
$m{ann}  = WSClient->join(port => $port, room => 'allowed1', nick => 'ann');
$m{ben}  = WSClient->join(port => $port, room => 'allowed1', nick => 'ben');
$m{cleo} = WSClient->join(port => $port, room => 'allowed2', nick => 'cleo');
$m{dave} = WSClient->join(port => $port, room => 'allowed2', nick => 'dave');
chat_in('before', 'allowed1', $m{ann}, @m{qw(ann ben)});
chat_in('before', 'allowed2', $m{cleo}, @m{qw(cleo dave)});

my $sub0;
ok(wait_until(sub { $sub0 = subscriber(); $sub0 && $sub0->{sub} == 2 }, 5),
   'before: one subscriber connection (user chat) following 2 channels')
    or diag(join "\n", map { "id=$_->{id} user=$_->{user} flags=$_->{flags} sub=$_->{sub} cmd=$_->{cmd}" }
                       $redis->client_list);
note("subscriber connection: id=$sub0->{id} addr=$sub0->{addr}") if $sub0;

# --- first refusal
refused_join('denied #1', 'eve');
my @refused;
ok(wait_until(sub { @refused = log_lines($nginx, $refused_log_re) }, 5),
   'error log: an [error] line naming wschat:denied with Redis\'s NOPERM text')
    or diag(join "\n", grep { defined } (log_lines($nginx, qr/websocket_chat|NOPERM/))[0 .. 15]);
note("refusal line: $refused[0]") if @refused;

chat_in('after denied #1', 'allowed1', $m{ben}, @m{qw(ann ben)});
chat_in('after denied #1', 'allowed2', $m{dave}, @m{qw(cleo dave)});
no_trouble('after denied #1', %m);
is(scalar(log_lines($nginx, $lost_re)), 0, 'after denied #1: no "connection to Redis ... lost" line')
    or diag(join "\n", log_lines($nginx, $lost_re));
{
    my $s = subscriber();
    is($s && $s->{id}, $sub0 && $sub0->{id},
       'after denied #1: the same subscriber connection (Redis client id) as before');
    is($s && $s->{sub}, 2, 'after denied #1: still subscribed to the 2 allowed channels');
    is($redis->numsub('denied'), 0, 'after denied #1: nobody subscribed to wschat:denied');
}

# --- second refusal, then a new allowed room
refused_join('denied #2', 'fay');
$m{gus} = eval { WSClient->join(port => $port, room => 'allowed3', nick => 'gus') };
$m{hal} = eval { WSClient->join(port => $port, room => 'allowed3', nick => 'hal') };
ok($m{gus} && $m{hal}, 'after denied #2: two members join allowed3 (welcome)') or diag($@);
delete $m{$_} for grep { !$m{$_} } keys %m;
chat_in('after denied #2', 'allowed3', $m{gus}, @m{qw(gus hal)}) if $m{gus} && $m{hal};
chat_in('after denied #2', 'allowed1', $m{ann}, @m{qw(ann ben)});
chat_in('after denied #2', 'allowed2', $m{cleo}, @m{qw(cleo dave)});
no_trouble('after denied #2', %m);
is(scalar(log_lines($nginx, $lost_re)), 0, 'at the end: no "connection to Redis ... lost" line')
    or diag(join "\n", log_lines($nginx, $lost_re));
{
    my $s = subscriber();
    is($s && $s->{id}, $sub0 && $sub0->{id},
       'at the end: still the same subscriber connection (Redis client id)');
    is($s && $s->{sub}, 3, 'at the end: subscribed to allowed1, allowed2, allowed3');
}
{
    my $n = 0;
    for my $e (@{ $redis->cmd('ACL', 'LOG') }) {
        my %h = @$e;
        $n += $h{count} // 1 if ($h{object} // '') eq 'wschat:denied';
    }
    note("Redis ACL LOG: $n refused access(es) to channel wschat:denied");
}

$_->send_close(1000) for values %m;
$_->is_closed_by_server(3) for values %m;
$nginx->stop;
done_all();
