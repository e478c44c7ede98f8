#!/usr/bin/env perl
# Worker memory per idle wss:// session, for each websocket_chat_access_log
# mode: starts the built nginx with `listen ... ssl` and a private Redis
# (t/lib), opens N idle TLS sessions and prints the worker's RSS growth per
# session. A measurement, not a test.
#
#   perl bench/tls-idle-memory.pl [N]        # default 800 sessions
#
# TEST_NGINX_BINARY / TEST_NGINX_MODULE pick another build, as for t/.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../t/lib";
use File::Temp qw(tempdir);
use Test::More;
use ChatTest;
use WSClient;

my $n = shift // 800;
my $dir = tempdir(CLEANUP => 1);
system('openssl', qw(req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost),
       '-keyout', "$dir/key.pem", '-out', "$dir/cert.pem") == 0
    or die "openssl could not make a certificate\n";
my $redis = start_redis();
for my $mode (qw(close upgrade)) {
    my $nginx = start_nginx(chat_config(
        listen => 'ssl',
        worker_connections => $n + 100,
        server => "        ssl_certificate $dir/cert.pem;\n        ssl_certificate_key $dir/key.pem;\n",
        location => "websocket_chat_access_log $mode;",
    ), redis => $redis);
    my ($worker) = $nginx->worker_pids;
    # The first session pays for the worker's one-off allocations.
    WSClient->join(port => $nginx->port, room => 'warm', nick => 'w', tls => 1);
    my $before = proc_rss_kb($worker);
    my @clients = map {
        WSClient->join(port => $nginx->port, room => "r$_", nick => "n$_", tls => 1)
    } 1 .. $n;
    # With `upgrade`, each session's request is freed (and its line logged)
    # on its first write event after the welcome.
    wait_until(sub {
        $mode eq 'close' || (() = $nginx->access_log_text =~ /" 101 /g) > $n
    }, 10) or die "not every session logged its upgrade\n";
    note(sprintf 'websocket_chat_access_log %s: %.0f bytes of worker RSS per idle TLS session',
         $mode, (proc_rss_kb($worker) - $before) * 1024 / $n);
    $_->disconnect for @clients;
    $nginx->stop;
}
done_all();
