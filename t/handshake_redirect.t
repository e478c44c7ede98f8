# The chat location reached by an internal redirect (`rewrite ... last`,
# `error_page 404 = /ws`) works like a direct request, with the request kept
# or freed after the upgrade; a subrequest into it (`mirror`) is declined and
# harms nothing.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

my $redis = start_redis();
for my $mode (qw(close upgrade)) {
    my $nginx = start_nginx(chat_config(
        location => "websocket_chat_access_log $mode;",
        server => "        location /r { rewrite ^ /ws last; }\n"
                . "        location /e { error_page 404 = /ws; return 404; }\n"
                . "        location /m { mirror /ws; return 204; }\n",
    ), redis => $redis);
    my $port = $nginx->port;
    for my $loc ('/r', '/e') {
        my $c = eval { WSClient->join(port => $port, room => 'redir', nick => 'n', location => $loc) };
        ok($c, "$mode: $loc reaches the chat through an internal redirect") or diag($@);
        next unless $c;
        $c->send_text("hi via $loc");
        my $ev = $c->wait_for(sub { $_[0]{type} eq 'message' }, 5);
        is($ev && $ev->{text}, "hi via $loc", "$mode: $loc chats");
        $c->send_close(1000, 'bye');
        my $close = $c->recv_close(5);
        is($close && $close->{close_code}, 1000, "$mode: $loc closes cleanly");
    }
    my $m = eval { WSClient->connect(port => $port, path => '/m?room=redir&nick=m') };
    like($@, qr/failed: HTTP\/1\.1 204/, "$mode: the mirrored location answers for itself, no upgrade");
    $nginx->stop;
}
done_all();
