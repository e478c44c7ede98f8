# Locations with the same Redis and the same channel prefix share their
# rooms, and so each room's history. When they keep it differently, nginx -t
# passes but warns, naming both locations' file:line, both settings and the
# prefix:
# * a default location beside one with history off, or beside a
#   websocket_chat_publish location with a history of its own;
# * a location overriding a history that the others inherit.
# No warning where nothing is shared or nothing differs:
# * another channel prefix, another Redis;
# * the same history set in each location, or inherited by all.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest '-no_redis';

# Locations %o{a}, %o{b}: [redis, extra directives, handler]; %o{server}:
# directives at server level.
sub conf {
    my (%o) = @_;
    my $server = $o{server} // '';
    my $locs = '';
    for my $name (qw(a b)) {
        my ($redis, $extra, $handler) = @{ $o{$name} };
        $handler //= 'websocket_chat';
        $locs .= <<"EOT";
        location = /$name {
            $handler;  # at $name
            websocket_chat_redis $redis;
            $extra
        }
EOT
    }
    return <<"EOT";
events { }
http {
    server {
        listen 127.0.0.1:%%PORT%%;
$server
$locs
    }
}
EOT
}

my $R = '127.0.0.1:6379';

sub warns {
    my ($name, $conf, $first, $second, $prefix) = @_;
    my ($code, $out, $path) = test_config($conf);
    is($code, 0, "$name: nginx -t passes") or diag($out);
    my ($la, $lb) = (line_of($path, '# at a'), line_of($path, '# at b'));
    ok($la && $lb, "$name: (test) both locations found in the written config");
    like($out,
         qr/\[warn\].*"websocket_chat_history" is \Q$first\E in the location at \Q$path\E:$la and \Q$second\E in the one at \Q$path\E:$lb\b.*channel prefix "\Q$prefix\E"/,
         "$name: warns with both places, both settings and the prefix") or diag($out);
}

sub quiet {
    my ($name, $conf) = @_;
    my ($code, $out) = test_config($conf);
    is($code, 0, "$name: nginx -t passes") or diag($out);
    unlike($out, qr/websocket_chat_history/, "$name: no warning") or diag($out);
}

warns('default beside off', conf(a => [$R, ''], b => [$R, 'websocket_chat_history off;']),
      '100 3600s', 'off', 'wschat:');
warns('chat beside a publish location keeping less',
      conf(a => [$R, ''], b => [$R, 'websocket_chat_history 10 5m;', 'websocket_chat_publish']),
      '100 3600s', '10 300s', 'wschat:');
warns('a location overriding the inherited history',
      conf(server => 'websocket_chat_history 20; websocket_chat_channel_prefix team:;',
           a => [$R, ''], b => [$R, 'websocket_chat_history 20 1500ms;']),
      '20 3600s', '20 1500ms', 'team:');

quiet('another channel prefix',
      conf(a => [$R, ''], b => [$R, 'websocket_chat_history off; websocket_chat_channel_prefix other:;']));
quiet('another Redis', conf(a => [$R, ''], b => ['127.0.0.1:6380', 'websocket_chat_history off;']));
quiet('the same history in each location',
      conf(a => [$R, 'websocket_chat_history 50 10m;'], b => [$R, 'websocket_chat_history 50 600s;']));
quiet('one history inherited by both', conf(server => 'websocket_chat_history off;', a => [$R, ''], b => [$R, '']));

done_testing();
