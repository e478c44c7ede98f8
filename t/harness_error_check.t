# Self-test of ChatTest's stop-time error-log check against plain nginx (the
# module is not loaded): an unexpected [error] line is a problem, and the
# allow_errors option and method excuse exactly the lines they match.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest '-no_module', '-no_redis';
use WSClient;

my $conf = <<'EOF2';
worker_processes 1;
events { worker_connections 64; }
http {
    access_log %%PREFIX%%/logs/access.log;
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { root %%PREFIX%%/html; }
    }
}
EOF2
sub get { WSClient::raw_handshake($_[0]->port, "GET $_[1] HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") }
my $missing = qr/\[error\] \d+#\d+: \*\d+ open\(\) "[^"]*\/missing" failed \(2: No such file or directory\)/;

my $n = start_nginx($conf);
is(scalar($n->_log_problems), 0, 'fresh instance: no problems');
my ($st) = get($n, '/missing');
is($st, 404, '404 for a missing file');
ok(wait_until(sub { $n->error_log_text =~ /missing/ }, 5), 'error line written');
my @p = $n->_log_problems;
is(scalar(@p), 1, 'an unexpected [error] line is a problem') or diag(join "\n", @p);
like($p[0] // '', $missing, '... the open() line');
ok(!eval { $n->allow_errors('missing'); 1 }, 'a plain string is refused') and note($@);
is($n->allow_errors($missing), $n, 'allow_errors returns the object');
is(scalar($n->_log_problems), 0, 'allowed later by method: no problem');
$n->stop;

my $m = start_nginx($conf, allow_errors => [$missing]);
get($m, '/missing');
get($m, '/other');
ok(wait_until(sub { $m->error_log_text =~ /other/ }, 5), 'both lines written');
@p = $m->_log_problems;
is(scalar(@p), 1, 'option allows /missing, /other is still a problem') or diag(join "\n", @p);
like($p[0] // '', qr/\/other"/, '... the /other line');
$m->allow_errors(qr/open\(\) "[^"]*\/other" failed/);
is(scalar($m->_log_problems), 0, 'both allowed');
ok(!eval { start_nginx($conf, allow_errors => qr/x/); 1 }, 'allow_errors must be an array ref') and note($@);
done_all();
