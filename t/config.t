# Configuration checks by nginx -t: invalid websocket_chat_redis addresses,
# duplicated directives, arguments to websocket_chat and an unknown
# websocket_chat_access_log value fail with file:line;
# unix: and redis:// addresses are accepted.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest '-no_redis';

sub conf {
    my (%o) = @_;
    my $http = $o{http} // '';
    my $loc = $o{location} // "websocket_chat;\n";
    return <<"EOT";
events { }
http {
$http
    server {
        listen 127.0.0.1:%%PORT%%;
        location = /ws {
$loc
        }
    }
}
EOT
}

sub fails {
    my ($name, $conf, $needle, $nth, $mention) = @_;
    my ($code, $out, $path) = test_config($conf);
    isnt($code, 0, "$name: nginx -t fails");
    my $line = line_of($path, $needle, $nth);
    like($out, qr/\Q$path\E:$line\b/, "$name: message names $path:$line") or diag($out);
    unlike($out, qr/unknown directive/, "$name: directive is known (module loaded)");
    like($out, $mention, "$name: message mentions the offending directive or value") or diag($out)
        if $mention;
}

fails('unparsable address', conf(http => 'websocket_chat_redis "not a host:port:x";'),
      'websocket_chat_redis', 1, qr/websocket_chat_redis|not a host:port:x/);
fails('port out of range', conf(http => 'websocket_chat_redis 127.0.0.1:99999;'),
      'websocket_chat_redis', 1, qr/websocket_chat_redis|99999/);
fails('non-numeric db', conf(http => 'websocket_chat_redis redis://h:1/notanumber;'),
      'websocket_chat_redis', 1, qr/websocket_chat_redis|notanumber/);
fails('duplicate websocket_chat_redis',
      conf(http => "websocket_chat_redis 127.0.0.1:6379;\n    websocket_chat_redis 127.0.0.1:6380;"),
      'websocket_chat_redis', 2, qr/websocket_chat_redis/);
fails('duplicate websocket_chat_room',
      conf(location => "websocket_chat;\nwebsocket_chat_room \$arg_room;\nwebsocket_chat_room \$arg_r2;"),
      'websocket_chat_room', 2, qr/websocket_chat_room/);
fails('websocket_chat with an argument', conf(location => 'websocket_chat on;'),
      'websocket_chat on', 1, qr/websocket_chat/);
fails('websocket_chat_access_log with an unknown value',
      conf(location => "websocket_chat;\nwebsocket_chat_access_log always;"),
      'websocket_chat_access_log', 1, qr/websocket_chat_access_log.*close or upgrade|close or upgrade.*websocket_chat_access_log/);

for my $addr ('unix:/tmp/x.sock', 'redis://user:pw@127.0.0.1:6379/2') {
    my ($code, $out) = test_config(conf(http => "websocket_chat_redis $addr;"));
    is($code, 0, "websocket_chat_redis $addr passes nginx -t") or diag($out);
}
{
    my ($code, $out) = test_config(conf(location =>
        "websocket_chat;\nwebsocket_chat_redis unix:/tmp/x.sock;\nwebsocket_chat_room \$arg_room;\nwebsocket_chat_user \$arg_nick;"));
    is($code, 0, 'directives at location level pass nginx -t') or diag($out);
}
for my $when (qw(close upgrade)) {
    my ($code, $out) = test_config(conf(http => "websocket_chat_access_log $when;"));
    is($code, 0, "websocket_chat_access_log $when passes nginx -t") or diag($out);
}

done_all();
