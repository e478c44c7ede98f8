# websocket_chat_channel_prefix: room R travels on the Redis channel
# <prefix>R (default prefix "wschat:"). Redis pub/sub ignores SELECT, so two
# deployments sharing one Redis keep their rooms apart only through the
# prefix.
#
# nginx -t (first, so that it runs even before the directive exists):
# * refuses an empty prefix, a prefix with a space, a tab, a newline or a
#   control character (\x01, \x7f), and a duplicate directive in one block,
#   each with an error naming the file and line and the directive;
# * accepts the directive in http, server and location, and a location
#   value overriding the http one.
#
# One Redis, one nginx (worker_processes 1):
#   server 1 (PORT):  websocket_chat_channel_prefix blue: (server level)
#       /a  inherits blue:
#       /b  websocket_chat_channel_prefix green:
#   server 2 (PORT2):
#       /c  websocket_chat_channel_prefix blue:
#       /d  no prefix anywhere: the default wschat:
# Every member is in room "lobby". /a and /c share the room (blue:lobby);
# /b (green:lobby) and /d (wschat:lobby) are rooms of their own:
# * PUBSUB CHANNELS shows blue:lobby and green:lobby and no wschat:lobby
#   while only /a, /b, /c have members; once /d has one, wschat:lobby too;
#   each channel has exactly one subscriber (the one worker);
# * a message sent in /a or /c reaches every /a and /c member, one from /b
#   every /b member, one from /d the /d member;
# * after those deliveries, a bounded wait for leaks: nobody receives a
#   message, or a join, from another prefix, and nobody gets a message twice.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

# ---------------------------------------------------------------- nginx -t

sub conf {
    my (%o) = @_;
    my $http = $o{http} // '';
    my $server = $o{server} // '';
    my $loc = $o{location} // '';
    return <<"EOT";
events { }
http {
    websocket_chat_redis 127.0.0.1:6379;
$http
    server {
        listen 127.0.0.1:%%PORT%%;
$server
        location = /ws {
            websocket_chat;
$loc
        }
    }
}
EOT
}

sub fails {
    my ($name, $conf, $nth) = @_;
    my $needle = 'websocket_chat_channel_prefix';
    my ($code, $out, $path) = test_config($conf);
    isnt($code, 0, "$name: nginx -t fails");
    my $line = line_of($path, $needle, $nth // 1);
    like($out, qr/\Q$path\E:$line\b/, "$name: message names $path:$line") or diag($out);
    unlike($out, qr/unknown directive/, "$name: the directive is known")
        or diag($out);
    like($out, qr/websocket_chat_channel_prefix/, "$name: message mentions the directive")
        or diag($out);
}

fails('empty prefix', conf(location => 'websocket_chat_channel_prefix "";'));
fails('prefix with a space', conf(location => 'websocket_chat_channel_prefix "blue chat:";'));
fails('prefix with a tab', conf(location => 'websocket_chat_channel_prefix "blue\t";'));
fails('prefix with a newline', conf(location => 'websocket_chat_channel_prefix "blue\n:";'));
fails('prefix with a control character (\x01)',
      conf(location => "websocket_chat_channel_prefix blue\x01:;"));
fails('prefix with DEL (\x7f)', conf(http => "websocket_chat_channel_prefix blue\x7f:;"));
fails('duplicate in a location',
      conf(location => "websocket_chat_channel_prefix blue:;\n"
                     . "            websocket_chat_channel_prefix green:;"), 2);
fails('duplicate at http level',
      conf(http => "websocket_chat_channel_prefix blue:;\n"
                 . "    websocket_chat_channel_prefix blue:;"), 2);

for my $case (['http', http => 'websocket_chat_channel_prefix app-1:;'],
              ['server', server => 'websocket_chat_channel_prefix app.2/;'],
              ['location', location => 'websocket_chat_channel_prefix x;'],
              ['http and location (override)',
               http => 'websocket_chat_channel_prefix blue:;',
               location => 'websocket_chat_channel_prefix green:;']) {
    my ($what, @o) = @$case;
    my ($code, $out) = test_config(conf(@o));
    is($code, 0, "websocket_chat_channel_prefix at $what level passes nginx -t") or diag($out);
}

# ---------------------------------------------------------------- runtime

my $redis = start_redis();
my $PORT2 = free_port();

my $template = <<'EOT';
worker_processes 1;
events { worker_connections 1024; }
http {
    access_log %%PREFIX%%/logs/access.log;
    websocket_chat_redis 127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT%%;
        websocket_chat_channel_prefix blue:;

        location = /a {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
        }
        location = /b {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_channel_prefix green:;
        }
        location / { return 404; }
    }

    server {
        listen 127.0.0.1:%%PORT2%%;

        location = /c {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_channel_prefix blue:;
        }
        location = /d {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
        }
        location / { return 404; }
    }
}
EOT

my $nginx = start_nginx_ok('nginx starts with websocket_chat_channel_prefix at server and location level',
    $template, redis => $redis, PORT2 => $PORT2);

# group of each location: who must hear whom
my %group_of = (a => 'blue', b => 'green', c => 'blue', d => 'default');
my %port_of  = (a => $nginx->port, b => $nginx->port, c => $PORT2, d => $PORT2);

my %m;    # nick => client
sub member {
    my ($loc, $nick) = @_;
    my $c = eval { WSClient->join(port => $port_of{$loc}, location => "/$loc",
                                  room => 'lobby', nick => $nick) };
    ok($c, "$nick joins room lobby through /$loc") or diag($@);
    is($c && $c->welcome->{room}, 'lobby', "$nick: welcome names room lobby") if $c;
    $m{$nick} = $c if $c;
    return $c;
}
sub loc_of   { substr($_[0], 0, 1) }               # a1 -> a
sub group_of { $group_of{ loc_of($_[0]) } }

sub channels {
    my $r = $redis->cmd('PUBSUB', 'CHANNELS', '*');
    return sort @$r;
}
sub numsub {
    my $ch = shift;
    return $redis->cmd('PUBSUB', 'NUMSUB', $ch)->[1];
}

member($_->[0], $_->[1]) for [a => 'a1'], [a => 'a2'], [b => 'b1'], [b => 'b2'], [c => 'c1'];

{
    my @ch;
    ok(wait_until(sub { @ch = channels(); grep({ $_ eq 'blue:lobby' } @ch) && grep({ $_ eq 'green:lobby' } @ch) }, 5),
       'PUBSUB CHANNELS: blue:lobby and green:lobby are subscribed')
        or diag("channels: @ch");
    is_deeply(\@ch, ['blue:lobby', 'green:lobby'],
              'PUBSUB CHANNELS: exactly blue:lobby and green:lobby (no wschat:lobby)')
        or diag("channels: @ch");
    is(numsub('blue:lobby'), 1, 'blue:lobby has one subscriber (the worker, shared by /a and /c)');
    is(numsub('green:lobby'), 1, 'green:lobby has one subscriber');
    is(numsub('wschat:lobby'), 0, 'wschat:lobby has no subscriber');
}

member(d => 'd1');
{
    my @ch;
    ok(wait_until(sub { @ch = channels(); grep { $_ eq 'wschat:lobby' } @ch }, 5),
       'a location without the directive uses the default: wschat:lobby is subscribed')
        or diag("channels: @ch");
    is_deeply(\@ch, ['blue:lobby', 'green:lobby', 'wschat:lobby'],
              'PUBSUB CHANNELS: blue:lobby, green:lobby, wschat:lobby')
        or diag("channels: @ch");
}

if (keys(%m) != 6) {
    diag('not every member joined; the delivery checks need all six');
    $nginx->stop;
    done_all();
    exit;
}

# Expected deliveries: everyone in the sender's group.
my @senders = qw(a1 c1 b1 d1);
my %expect;    # nick => {text => 1}
for my $s (@senders) {
    my $text = "from $s (" . group_of($s) . ')';
    ok($m{$s}->send_text($text), "$s sends a message");
    my $deadline = time + 5;
    for my $r (sort grep { group_of($_) eq group_of($s) } keys %m) {
        $expect{$r}{$text} = 1;
        my $left = $deadline - time;
        $left = 0.2 if $left < 0.2;
        my $got = $m{$r}->wait_type('message', $left, sub { ($_[0]{text} // '') eq $text });
        ok($got, "$r (/" . loc_of($r) . ") receives \"$text\"");
        is($got && $got->{room}, 'lobby', "$r: the message is in room lobby") if $got;
    }
}

# Leak window: every positive delivery has arrived; read whatever else comes
# within one more second (shared by all members).
{
    my $deadline = time + 1;
    for my $nick (sort keys %m) {
        my $left = $deadline - time;
        $left = 0.05 if $left < 0.05;
        $m{$nick}->wait_for(sub { 0 }, $left);    # records everything it reads
    }
}

for my $nick (sort keys %m) {
    my $c = $m{$nick};
    my @ev = $c->events;
    my @msgs = grep { ($_->{type} // '') eq 'message' } @ev;
    my %texts;
    $texts{ $_->{text} // '' }++ for @msgs;
    is_deeply([sort keys %texts], [sort keys %{ $expect{$nick} }],
              "$nick (" . group_of($nick) . "): received exactly the messages of its own prefix")
        or diag(explain([map { $_->{_raw} } @msgs]));
    ok(!grep({ $_ > 1 } values %texts), "$nick: no message received twice")
        or diag(explain(\%texts));
    my @foreign = grep {
        defined $_->{user} && $_->{user} =~ /^[a-d]\d$/ && group_of($_->{user}) ne group_of($nick)
    } @ev;
    ok(!@foreign, "$nick: no event (message, join, leave) from a member of another prefix")
        or diag(explain([map { $_->{_raw} } @foreign]));
    ok(!grep({ ($_->{type} // '') eq 'error' } @ev), "$nick: no error event");
}

$_->send_close(1000) for values %m;
$_->is_closed_by_server(3) for values %m;
ok(wait_until(sub { !grep { /lobby$/ } channels() }, 5),
   'after everyone left: no lobby channel is subscribed any more')
    or diag('channels: ' . join ' ', channels());
$nginx->stop;
done_all();
