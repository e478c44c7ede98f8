# nginx -t on the ISSUE3 directives: bad values (rate, sizes, times, an
# idle_timeout not larger than ping_interval, origin without arguments,
# duplicates) fail with a message naming file:line; valid values pass at
# http, server and location level; a send buffer smaller than the longest
# message passes with a warning naming the location.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest '-no_redis';

# A minimal configuration; %o: http, server, location (extra directives).
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

# nginx -t must fail, naming the file and the line holding $needle.
sub rejects {
    my ($name, $conf, $needle, $nth) = @_;
    my ($code, $out, $path) = test_config($conf);
    isnt($code, 0, "$name: nginx -t fails");
    my $line = line_of($path, $needle, $nth);
    ok($line, "$name: (test) offending line found in the written config");
    like($out, qr/\Q$path\E:$line\b/, "$name: message names $path:$line") or diag($out);
    unlike($out, qr/unknown directive/, "$name: the directive itself is known") or diag($out);
}

sub accepts {
    my ($name, $conf) = @_;
    my ($code, $out) = test_config($conf);
    is($code, 0, "$name: nginx -t passes") or diag($out);
}

# --- websocket_chat_flush_delay
rejects('flush_delay "soon"', conf(http => 'websocket_chat_flush_delay soon;'), 'websocket_chat_flush_delay');
rejects('flush_delay over 1s', conf(server => 'websocket_chat_flush_delay 2s;'), 'websocket_chat_flush_delay');
rejects('flush_delay twice', conf(location => "websocket_chat_flush_delay 5ms;\nwebsocket_chat_flush_delay 6ms;"),
        'websocket_chat_flush_delay', 2);
accepts("flush_delay $_", conf(location => "websocket_chat_flush_delay $_;")) for qw(off 0 1ms 20ms 1s);

# --- websocket_chat_rate
rejects('rate "fast"', conf(http => 'websocket_chat_rate fast;'), 'websocket_chat_rate');
rejects('rate "10"', conf(http => 'websocket_chat_rate 10;'), 'websocket_chat_rate');
rejects('rate "10r/h"', conf(http => 'websocket_chat_rate 10r/h;'), 'websocket_chat_rate');
rejects('rate "0r/s"', conf(http => 'websocket_chat_rate 0r/s;'), 'websocket_chat_rate');
rejects('rate "-1r/s"', conf(http => 'websocket_chat_rate -1r/s;'), 'websocket_chat_rate');
rejects('rate with burst=x', conf(http => 'websocket_chat_rate 10r/s burst=x;'), 'websocket_chat_rate');
rejects('rate with burst=-1', conf(http => 'websocket_chat_rate 10r/s burst=-1;'), 'websocket_chat_rate');
rejects('rate with an unknown parameter', conf(http => 'websocket_chat_rate 10r/s nodelay=1;'),
        'websocket_chat_rate');
rejects('rate without arguments', conf(http => 'websocket_chat_rate;'), 'websocket_chat_rate');
rejects('rate with too many arguments', conf(http => 'websocket_chat_rate 10r/s burst=5 burst=6;'),
        'websocket_chat_rate');

# --- sizes
rejects('max_message 0', conf(http => 'websocket_chat_max_message 0;'), 'websocket_chat_max_message');
rejects('max_message "big"', conf(http => 'websocket_chat_max_message big;'), 'websocket_chat_max_message');
rejects('max_message -1', conf(http => 'websocket_chat_max_message -1;'), 'websocket_chat_max_message');
rejects('send_buffer "lots"', conf(location => 'websocket_chat_send_buffer lots;'),
        'websocket_chat_send_buffer');
rejects('send_buffer 0', conf(location => 'websocket_chat_send_buffer 0;'), 'websocket_chat_send_buffer');
rejects('send_buffer with a bad burst', conf(location => 'websocket_chat_send_buffer 64k burst=lots;'),
        'websocket_chat_send_buffer');
rejects('send_buffer with an unknown parameter', conf(location => 'websocket_chat_send_buffer 64k max=1m;'),
        'websocket_chat_send_buffer');
accepts('send_buffer with burst=', conf(location => 'websocket_chat_send_buffer 64k burst=512k;'));
accepts('send_buffer with burst=0', conf(http => 'websocket_chat_send_buffer 1m burst=0;'));

# A send buffer smaller than the longest message passes with a warning that
# names the location; one as large, or a shorter longest message, with none.
sub small_buffer_warning {
    my ($conf) = @_;
    my ($code, $out, $path) = test_config($conf);
    my $line = line_of($path, 'websocket_chat;');
    return ($code, $out =~ /\[warn\].*"websocket_chat_send_buffer" \(4096 bytes with its burst\) is smaller than "websocket_chat_max_message" \(65536 bytes\) in the location at \Q$path\E:$line\b/ ? 1 : 0, $out);
}
{
    my ($code, $warned, $out) = small_buffer_warning(conf(location => 'websocket_chat_send_buffer 4k burst=0;'));
    is($code, 0, 'send_buffer 4k burst=0: nginx -t passes') or diag($out);
    ok($warned, 'send_buffer 4k burst=0: warns, naming the sizes and the location') or diag($out);
    for my $case (['send_buffer 4k burst=60k', 'websocket_chat_send_buffer 4k burst=60k;'],
                  ['send_buffer 4k burst=0 with max_message 4k',
                   "websocket_chat_send_buffer 4k burst=0;\nwebsocket_chat_max_message 4k;"]) {
        my ($code, undef, $out) = small_buffer_warning(conf(location => $case->[1]));
        is($code, 0, "$case->[0]: nginx -t passes") or diag($out);
        unlike($out, qr/websocket_chat_send_buffer/, "$case->[0]: no warning") or diag($out);
    }
}

# --- times
rejects('ping_interval "often"', conf(http => 'websocket_chat_ping_interval often;'),
        'websocket_chat_ping_interval');
rejects('idle_timeout "never"', conf(http => 'websocket_chat_idle_timeout never;'),
        'websocket_chat_idle_timeout');
rejects('idle_timeout 10s with the default ping_interval 30s',
        conf(location => 'websocket_chat_idle_timeout 10s;'), 'websocket_chat_idle_timeout');
rejects('idle_timeout equal to ping_interval',
        conf(location => "websocket_chat_ping_interval 5s;\nwebsocket_chat_idle_timeout 5s;"),
        'websocket_chat_idle_timeout');
rejects('ping_interval 70s with the default idle_timeout 60s',
        conf(location => 'websocket_chat_ping_interval 70s;'), 'websocket_chat_ping_interval');

# --- origin
rejects('origin without arguments', conf(location => 'websocket_chat_origin;'), 'websocket_chat_origin');

# --- duplicates in one block
rejects('duplicate max_message',
        conf(http => "websocket_chat_max_message 1k;\n    websocket_chat_max_message 2k;"),
        'websocket_chat_max_message', 2);
rejects('duplicate rate',
        conf(location => "websocket_chat_rate 1r/s;\nwebsocket_chat_rate 2r/s;"),
        'websocket_chat_rate', 2);

# --- valid values
accepts('all directives at http level', conf(http => join "\n    ",
    'websocket_chat_max_message 1k;', 'websocket_chat_ping_interval 1s;',
    'websocket_chat_idle_timeout 3s;', 'websocket_chat_send_buffer 256k;',
    'websocket_chat_rate 5r/s burst=5;', 'websocket_chat_origin https://a.example http://localhost:8080;'));
accepts('all directives at server level', conf(server => join "\n        ",
    'websocket_chat_max_message 2m;', 'websocket_chat_ping_interval 10s;',
    'websocket_chat_idle_timeout 1m;', 'websocket_chat_send_buffer 1m;',
    'websocket_chat_rate 60r/m;', 'websocket_chat_origin any;'));
accepts('all directives at location level', conf(location => join "\n",
    'websocket_chat_max_message 65536;', 'websocket_chat_ping_interval 500ms;',
    'websocket_chat_idle_timeout 2s;', 'websocket_chat_send_buffer 64k;',
    'websocket_chat_rate 10r/s burst=20;', 'websocket_chat_origin https://chat.example.com;'));
accepts('rate with burst=0', conf(http => 'websocket_chat_rate 1r/s burst=0;'));
accepts('idle_timeout 90s with the default ping_interval', conf(location => 'websocket_chat_idle_timeout 90s;'));
accepts('ping 40s inherited from http, idle 50s in location',
        conf(http => 'websocket_chat_ping_interval 40s;', location => 'websocket_chat_idle_timeout 50s;'));

done_all();
