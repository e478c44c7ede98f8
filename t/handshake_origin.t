# websocket_chat_origin: with a list of origins, a handshake whose Origin
# header is in the list (compared case-insensitively) is upgraded (101); any
# other Origin, or none, gets 403 before any upgrade. Without the directive
# (default "any") and with "any", every origin is accepted.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
my $extra = <<'EOT';
        location = /ws-any {
            websocket_chat;
            websocket_chat_origin any;
        }
        location = /ws-default {
            websocket_chat;
        }
EOT
my $nginx = start_nginx_ok('nginx starts with websocket_chat_origin https://a.example http://localhost:8080',
    chat_config(server => $extra,
                location => 'websocket_chat_origin https://a.example http://localhost:8080;'),
    redis => $redis);
my $port = $nginx->port;

# Handshake on $path with Origin $origin (undef: no Origin header).
sub try_origin {
    my ($path, $origin, $want) = @_;
    my ($req, $key) = WSClient::handshake_request(port => $port, path => $path,
                                                  headers => { Origin => $origin });
    my ($st, $h, $raw, $sock) = WSClient::raw_handshake($port, $req);
    my $name = "$path, " . (defined $origin ? "Origin: $origin" : 'no Origin header');
    is($st, $want, "$name -> $want") or diag("response:\n" . substr($raw // '', 0, 400));
    if ($want == 101) {
        is($h->{'sec-websocket-accept'}, WSClient::accept_for($key), "$name: accept key");
    } else {
        ok(!defined $h->{'sec-websocket-accept'} && ($h->{upgrade} // '') !~ /websocket/i,
           "$name: no upgrade headers");
    }
    close $sock if $sock;
}

my $list = '/ws?room=origin&nick=o';
try_origin($list, 'https://a.example', 101);
try_origin($list, 'http://localhost:8080', 101);
try_origin($list, 'HTTPS://A.EXAMPLE', 101);
try_origin($list, 'Https://A.Example', 101);
try_origin($list, 'HTTP://LocalHost:8080', 101);
try_origin($list, 'https://b.example', 403);
try_origin($list, 'http://a.example', 403);              # other scheme
try_origin($list, 'https://a.example:8443', 403);        # other port
try_origin($list, 'https://a.example.evil.com', 403);    # prefix only
try_origin($list, 'https://sub.a.example', 403);         # suffix only
try_origin($list, 'http://localhost:8081', 403);
try_origin($list, 'http://localhost', 403);
try_origin($list, 'null', 403);
try_origin($list, '', 403);
try_origin($list, undef, 403);

# an accepted origin really gets a chat session
{
    my $c = WSClient->connect(port => $port, path => $list, welcome => 1,
                              headers => { Origin => 'https://A.example' });
    is($c->welcome && $c->welcome->{room}, 'origin', 'allowed origin: welcome event received');
    $c->send_close(1000);
}

# 403 comes before any upgrade: the access log records 403 for the rejected one
ok(wait_until(sub { $nginx->access_log_text =~ m{"GET /ws\?room=origin&nick=o HTTP/1\.1" 403 } }, 5),
   'access log has a 403 line for a rejected origin');

for my $path ('/ws-any', '/ws-default') {
    try_origin($path, 'https://anything.example', 101);
    try_origin($path, 'null', 101);
    try_origin($path, undef, 101);
}

done_all();
