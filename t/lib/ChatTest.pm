package ChatTest;

# Test harness for the websocket_chat nginx module: finds the binaries,
# runs redis-server and nginx instances in private temporary prefixes and
# checks their error logs when they stop.
#
# Usage from a .t file (run from the repository root or anywhere else):
#
#   use FindBin; use lib "$FindBin::Bin/lib";
#   use Test::More;
#   use ChatTest;                 # bails out unless nginx, module, redis-server exist
#   my $redis = start_redis();
#   my $nginx = start_nginx($template, redis => $redis, ROOM => 'x');
#   ...
#   done_all();                   # stops everything (with log checks), done_testing
#
# Import flags: '-no_module' (do not require/load the module; only used to
# develop the harness against plain nginx), '-no_redis' (do not require
# redis-server).
#
# Design choices
# * nginx is started with `daemon off; master_process on;` prepended to the
#   template, as a direct child of the test process. The harness therefore
#   knows the master pid without a pid-file race, reaps it with waitpid, gets
#   its exact exit status and notices at once when it dies during start-up.
#   master_process stays on so workers, reloads and graceful shutdown behave
#   as in production.
# * The helper prepends (the template must not contain these):
#       load_module <module>;          (unless -no_module / no_module => 1)
#       daemon off;
#       master_process on;
#       pid <prefix>/logs/nginx.pid;
#       error_log <prefix>/logs/error.log info;
#   The template provides everything else (events {}, http {}, worker_processes).
#   Because of the prepended lines, line numbers in nginx messages refer to
#   the written file; test_config() returns its path for that reason.
# * Template variables are %%NAME%% with NAME in [A-Z0-9_]; the harness always
#   provides MODULE, PORT (a free loopback port), PREFIX, and REDIS_PORT when
#   a redis object (redis => $r) or REDIS_PORT is passed. An unknown variable
#   is a fatal error. Lower-case keys passed to start_nginx are options.
# * start_nginx options: redis => $redis_object (sets REDIS_PORT),
#   workers => N (also wait until N workers run), no_module => 1,
#   allow_errors => [qr/.../, ...] (see the error-log check below).
#   Objects: port, pid, worker_pids, child_pids, reload, stop,
#   error_log_text, access_log_text, prefix, conf_path, allow_errors.
#   start_nginx_ok($name, $template, ...) is start_nginx as a test: a
#   failure to start is a failed test (with nginx's output) that ends the file.
# * Error-log check: stop() records a test that the error log holds no
#   problem line. A problem is any [alert], [crit] or [emerg] line, any
#   "exited on signal" line, and any [error] line that matches none of the
#   instance's allowed patterns. [warn], [notice] and [info] lines are never
#   problems. A test that provokes [error] lines on purpose (a Redis outage,
#   an AUTH refusal, a malformed reply, ...) declares them, as narrowly as
#   it can, per nginx instance:
#       my $n = start_nginx($t, redis => $r, allow_errors => [
#           qr/\[error\] .* connection to Redis \S+:$port lost: connection closed;/]);
#       $n->allow_errors(qr/refused the \w+ connection's AUTH/, ...);  # later
#   A file whose subject is such a line in every instance it starts (a
#   slow-consumer cut-off, say) declares it once for all of them:
#       ChatTest::allow_errors_in_file(qr/: 1008 slow consumer$/);
#   Patterns are qr// objects, each matched (unanchored) against every
#   line of the log; anything else (a plain string, say) dies. They only
#   excuse [error] lines (alert/crit/emerg/signal lines cannot be allowed
#   here; ChatFault::allow_log_lines is the tool for a deliberate kill).
#   Allowed lines are reported with note(). An unexpected [error] line fails
#   the test: it is either a bug or a line the test must declare.
# * proc_rss_kb($pid): VmRSS of a process in kB.
# * line_of($file, $needle, $nth): the line number of the $nth line holding
#   $needle, for checking that nginx -t names the right line.
# * start_redis(port => P, requirepass => PW, args => [...]) objects: port,
#   cmd(@args) (dies on error replies; cmd_raw returns them as objects),
#   client_list (CLIENT LIST parsed, own connection excluded), numsub($room)
#   (PUBSUB NUMSUB wschat:<room>), stop, restart, kill, log_text.
# * chat_config(workers => N, http/server/location/events => '...') returns
#   the usual chat template; now_ms() is the current time in ms.
# * Temporary files live in <repo>/t/tmp/ (gitignored) in File::Temp
#   directories removed at exit; set TEST_CHAT_KEEP=1 to keep them.
# * The repository root is found from this file's own location
#   (<repo>/t/lib/ChatTest.pm), never from a fixed path.
# * Every wait is a poll against a deadline (wait_until); nothing relies on
#   sleeping for a fixed time.

use strict;
use warnings;

use Test::More ();
use File::Spec ();
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp ();
use IO::Socket::INET ();
use IO::Select ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time);
use Cwd qw(abs_path);

require Exporter;
our @ISA = ('Exporter');
our @EXPORT = qw(free_port start_redis start_nginx test_config done_all
                 wait_until nginx_binary module_path repo_root chat_config
                 now_ms start_nginx_ok proc_rss_kb line_of);

my $REPO;
BEGIN {
    my $here = File::Spec->rel2abs(__FILE__);
    $REPO = abs_path(File::Spec->catdir(dirname($here), File::Spec->updir,
                                        File::Spec->updir));
}

my $CREATOR = $$;
my (@NGINX, @REDIS);
my $NO_MODULE = 0;

$SIG{PIPE} = 'IGNORE';

sub repo_root { $REPO }

sub nginx_binary {
    # build.rs links target/release/nginx to the nginx built with the module.
    return $ENV{TEST_NGINX_BINARY} || "$REPO/target/release/nginx";
}

sub module_path {
    return $ENV{TEST_NGINX_MODULE} if $ENV{TEST_NGINX_MODULE};
    return "$REPO/target/release/libngx_http_websocket_chat_module.so";
}

sub _in_path {
    my $prog = shift;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$prog" if -x "$d/$prog";
    }
    return undef;
}

sub import {
    my ($class, @args) = @_;
    my %flag = map { $_ => 1 } grep { /^-/ } @args;
    @args = grep { !/^-/ } @args;
    $NO_MODULE = 1 if $flag{-no_module};

    my $nginx = nginx_binary();
    if (!defined $nginx || !-x $nginx) {
        Test::More::BAIL_OUT('nginx binary not found: set TEST_NGINX_BINARY '
            . "or run cargo build --release (it links $REPO/target/release/nginx)");
    }
    if (!$NO_MODULE && !-f module_path()) {
        Test::More::BAIL_OUT('module not found at ' . module_path()
            . ' (set TEST_NGINX_MODULE or run cargo build --release)');
    }
    if (!$flag{-no_redis} && !_in_path('redis-server')) {
        Test::More::BAIL_OUT('redis-server not found in PATH (apt-get install redis-server)');
    }
    __PACKAGE__->export_to_level(1, $class, @args ? @args : @EXPORT);
}

# ---------------------------------------------------------------------------
# generic helpers

# [error] patterns allowed in every nginx instance of this file.
my @FILE_ALLOWED;

sub allow_errors_in_file {
    for my $re (@_) {
        die "allow_errors_in_file: not a qr// pattern: " . ($re // 'undef') . "\n"
            unless ref $re eq 'Regexp';
    }
    push @FILE_ALLOWED, @_;
}

sub _file_allowed { @FILE_ALLOWED }

# Poll $cond every $interval seconds until it returns a true value or
# $timeout seconds have passed. Returns the true value, or undef on timeout.
sub wait_until {
    my ($cond, $timeout, $interval) = @_;
    $timeout  //= 10;
    $interval //= 0.05;
    my $deadline = time + $timeout;
    while (1) {
        my $v = $cond->();
        return $v if $v;
        return undef if time >= $deadline;
        select(undef, undef, undef, $interval);
    }
}

sub now_ms { int(time * 1000) }

# Line number (1-based) of the $nth line ($nth defaults to 1) holding
# $needle in $file, or 0: where nginx -t should say the error is.
sub line_of {
    my ($file, $needle, $nth) = @_;
    $nth //= 1;
    open my $fh, '<', $file or return 0;
    my $i = 0;
    while (defined(my $l = <$fh>)) {
        $i++;
        return $i if index($l, $needle) >= 0 && --$nth == 0;
    }
    return 0;
}

# Resident set size of a process in kB (VmRSS in /proc/<pid>/status), or
# undef when it cannot be read.
sub proc_rss_kb {
    my $pid = shift;
    my $st = _slurp("/proc/$pid/status");
    return $st =~ /^VmRSS:\s+(\d+)\s+kB/m ? $1 : undef;
}

# The usual chat configuration template: one server on %%PORT%% with
# location = /ws, room from $arg_room, user from $arg_nick, Redis on
# 127.0.0.1:%%REDIS_PORT%%. Options: workers (1), events (extra text in
# events {}), http / server / location (extra directives), redis (the
# websocket_chat_redis argument, or '' to leave the directive out),
# worker_connections (1024), listen (extra listen parameters, e.g. "ssl").
sub chat_config {
    my (%o) = @_;
    my $workers = $o{workers} // 1;
    my $wc = $o{worker_connections} // 1024;
    my $redis = $o{redis} // '127.0.0.1:%%REDIS_PORT%%';
    my $rd = length $redis ? "    websocket_chat_redis $redis;\n" : '';
    my $events = $o{events} // '';
    my $http = $o{http} // '';
    my $server = $o{server} // '';
    my $location = $o{location} // '';
    my $listen = defined $o{listen} ? " $o{listen}" : '';
    return <<"EOT";
worker_processes $workers;
events { worker_connections $wc; $events }
http {
    access_log %%PREFIX%%/logs/access.log;
$rd$http
    server {
        listen 127.0.0.1:%%PORT%%$listen;
$server
        location = /ws {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_user \$arg_nick;
$location
        }
        location / { return 404; }
    }
}
EOT
}

sub free_port {
    my $s = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp',
        Listen => 1, ReuseAddr => 1,
    ) or die "free_port: cannot bind 127.0.0.1:0: $!";
    my $port = $s->sockport;
    close $s;
    return $port;
}

sub _tmp_base {
    my $base = "$REPO/t/tmp";
    make_path($base) unless -d $base;
    return $base;
}

sub _tempdir {
    my $prefix = shift;
    my $dir = File::Temp::tempdir("$prefix-XXXXXX", DIR => _tmp_base(),
                                  CLEANUP => !$ENV{TEST_CHAT_KEEP});
    chmod 0755, $dir;    # nginx workers may run as an unprivileged user
    return $dir;
}

sub _slurp {
    my $f = shift;
    open my $fh, '<', $f or return '';
    local $/;
    my $t = <$fh>;
    return $t // '';
}

sub _spurt {
    my ($f, $t) = @_;
    open my $fh, '>', $f or die "cannot write $f: $!";
    print $fh $t;
    close $fh or die "cannot write $f: $!";
}

# fork/exec @argv with stdin from /dev/null and stdout+stderr to $out.
sub _spawn {
    my ($out, @argv) = @_;
    my $pid = fork;
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $out or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        { exec { $argv[0] } @argv; }
        print STDERR "exec $argv[0]: $!\n";
        POSIX::_exit(127);
    }
    return $pid;
}

# Wait for child $pid up to $timeout seconds. Returns the wait status or undef.
sub _reap {
    my ($pid, $timeout) = @_;
    my $status;
    wait_until(sub {
        my $r = waitpid($pid, WNOHANG);
        if ($r == $pid) { $status = $?; return 1 }
        if ($r == -1)   { $status = -1; return 1 }   # not our child / gone
        return 0;
    }, $timeout, 0.02);
    return $status;
}

sub _run_cmd {
    my ($timeout, @argv) = @_;
    my $dir = _tempdir('cmd');
    my $out = "$dir/output";
    my $pid = _spawn($out, @argv);
    my $st = _reap($pid, $timeout);
    if (!defined $st) {
        kill 'KILL', $pid;
        _reap($pid, 5);
        return (-1, _slurp($out) . "\n[harness: killed after ${timeout}s]\n");
    }
    return (($st == -1 ? -1 : $st >> 8), _slurp($out));
}

sub _port_accepts {
    my $port = shift;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 1);
    return 0 unless $s;
    close $s;
    return 1;
}

sub _proc_ppid {
    my $pid = shift;
    my $stat = _slurp("/proc/$pid/stat");
    return undef unless $stat =~ /\)\s+\S+\s+(\d+)/;
    return $1;
}

sub _proc_children {
    my $ppid = shift;
    my @kids;
    opendir my $dh, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $dh) {
        my $pp = _proc_ppid($p);
        push @kids, $p if defined $pp && $pp == $ppid;
    }
    closedir $dh;
    return sort { $a <=> $b } @kids;
}

sub _proc_title {
    my $pid = shift;
    my $t = _slurp("/proc/$pid/cmdline");
    $t =~ s/\0+/ /g;
    $t =~ s/\s+$//;
    return $t;
}

sub done_all {
    $_->stop for grep { !$_->{stopped} } @NGINX;
    $_->stop for grep { $_->{pid} } @REDIS;
    Test::More::done_testing();
}

END {
    if ($$ == $CREATOR) {
        my $rc = $?;
        for my $n (grep { !$_->{stopped} } @NGINX) {
            eval { $n->stop(in_end => 1) };
        }
        for my $r (grep { $_->{pid} } @REDIS) {
            eval { $r->kill };
        }
        $? = $rc;
    }
}

# ---------------------------------------------------------------------------
# redis

sub start_redis {
    my (%opts) = @_;
    my $self = bless {
        port     => $opts{port} // free_port(),
        password => $opts{requirepass},
        args     => $opts{args} // [],
        dir      => _tempdir('redis'),
    }, 'ChatTest::Redis';
    $self->_start;
    push @REDIS, $self;
    return $self;
}

package ChatTest::Redis;

use strict;
use warnings;
use Time::HiRes qw(time);
use POSIX qw(WNOHANG);

sub port { $_[0]{port} }

sub _start {
    my $self = shift;
    my @argv = ('redis-server', '--port', $self->{port}, '--bind', '127.0.0.1',
                '--save', '', '--appendonly', 'no', '--daemonize', 'no',
                '--dir', $self->{dir});
    push @argv, '--requirepass', $self->{password} if defined $self->{password};
    push @argv, @{ $self->{args} };
    $self->{pid} = ChatTest::_spawn("$self->{dir}/redis.log", @argv);
    my $err;
    my $ok = ChatTest::wait_until(sub {
        my $r = waitpid($self->{pid}, WNOHANG);
        if ($r == $self->{pid}) { $err = 'redis-server exited'; delete $self->{pid}; return 1 }
        my $pong = eval { $self->_disconnect; $self->cmd('PING') };
        return defined $pong && $pong eq 'PONG';
    }, 10, 0.05);
    $err //= 'redis-server did not answer PING within 10s' unless $ok;
    if ($err) {
        my $log = ChatTest::_slurp("$self->{dir}/redis.log");
        $self->kill if $self->{pid};
        die "start_redis on port $self->{port}: $err\n$log";
    }
}

sub _disconnect {
    my $self = shift;
    close $self->{sock} if $self->{sock};
    delete $self->{sock};
    $self->{rbuf} = '';
}

sub _connect {
    my $self = shift;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->{port},
                                  Proto => 'tcp', Timeout => 2)
        or die "redis connect 127.0.0.1:$self->{port}: $!\n";
    binmode $s;
    $self->{sock} = $s;
    $self->{rbuf} = '';
    if (defined $self->{password}) {
        $self->_send('AUTH', $self->{password});
        my $r = $self->_read_reply(time + 5);
        die "redis AUTH failed: $r->{error}\n" if ref $r eq 'ChatTest::RedisError';
    }
}

sub _send {
    my ($self, @args) = @_;
    my $req = '*' . scalar(@args) . "\r\n";
    for my $a (@args) {
        my $b = "$a";
        utf8::encode($b);    # arguments are character strings
        $req .= '$' . length($b) . "\r\n$b\r\n";
    }
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite($self->{sock}, $req, length($req) - $off, $off);
        die "redis write: $!\n" unless defined $n;
        $off += $n;
    }
}

sub _fill {
    my ($self, $deadline) = @_;
    my $left = $deadline - time;
    die "redis: reply timeout\n" if $left <= 0;
    my $sel = IO::Select->new($self->{sock});
    die "redis: reply timeout\n" unless $sel->can_read($left);
    my $n = sysread($self->{sock}, $self->{rbuf}, 65536, length $self->{rbuf});
    die "redis read: $!\n" unless defined $n;
    die "redis: connection closed\n" if $n == 0;
}

sub _line {
    my ($self, $deadline) = @_;
    while (1) {
        my $i = index($self->{rbuf}, "\r\n");
        if ($i >= 0) {
            my $l = substr($self->{rbuf}, 0, $i);
            substr($self->{rbuf}, 0, $i + 2, '');
            return $l;
        }
        $self->_fill($deadline);
    }
}

sub _bytes {
    my ($self, $n, $deadline) = @_;
    $self->_fill($deadline) while length($self->{rbuf}) < $n + 2;
    my $b = substr($self->{rbuf}, 0, $n);
    substr($self->{rbuf}, 0, $n + 2, '');
    return $b;
}

# RESP2 reply -> perl data (strings are returned as bytes, undecoded): simple/bulk string -> string, integer -> number,
# nil -> undef, array -> arrayref, error -> ChatTest::RedisError object.
sub _read_reply {
    my ($self, $deadline) = @_;
    my $l = $self->_line($deadline);
    my ($t, $rest) = (substr($l, 0, 1), substr($l, 1));
    return $rest if $t eq '+';
    return bless { error => $rest }, 'ChatTest::RedisError' if $t eq '-';
    return 0 + $rest if $t eq ':';
    if ($t eq '$') {
        return undef if $rest < 0;
        return $self->_bytes($rest, $deadline);
    }
    if ($t eq '*') {
        return undef if $rest < 0;
        return [ map { $self->_read_reply($deadline) } 1 .. $rest ];
    }
    die "redis: unexpected reply line '$l'\n";
}

# Run one command; returns the reply as perl data, dies on an error reply.
sub cmd {
    my ($self, @args) = @_;
    my $r = $self->cmd_raw(@args);
    die "redis error for '@args': $r->{error}\n" if ref $r eq 'ChatTest::RedisError';
    return $r;
}

# Like cmd, but returns error replies as ChatTest::RedisError objects.
sub cmd_raw {
    my ($self, @args) = @_;
    my $r = eval {
        $self->_connect unless $self->{sock};
        $self->_send(@args);
        $self->_read_reply(time + 5);
    };
    if ($@) {
        my $e = $@;
        $self->_disconnect;
        die $e;
    }
    return $r;
}

# CLIENT LIST as a list of hashrefs, without the harness's own connection.
sub client_list {
    my $self = shift;
    my $me = $self->cmd('CLIENT', 'ID');
    my @c;
    for my $line (split /\r?\n/, $self->cmd('CLIENT', 'LIST')) {
        next unless $line =~ /\S/;
        my %h = map { /^([^=]+)=(.*)$/ ? ($1, $2) : () } split / /, $line;
        next if defined $h{id} && $h{id} == $me;
        push @c, \%h;
    }
    return @c;
}

# Number of subscribers of the room's channel (PUBSUB NUMSUB wschat:<room>).
sub numsub {
    my ($self, $room) = @_;
    my $r = $self->cmd('PUBSUB', 'NUMSUB', "wschat:$room");
    return $r->[1];
}

sub log_text { ChatTest::_slurp("$_[0]{dir}/redis.log") }

sub stop {
    my $self = shift;
    return unless $self->{pid};
    $self->_disconnect;
    CORE::kill 'TERM', $self->{pid};
    if (!defined ChatTest::_reap($self->{pid}, 10)) {
        CORE::kill 'KILL', $self->{pid};
        ChatTest::_reap($self->{pid}, 5);
    }
    delete $self->{pid};
}

sub kill {
    my $self = shift;
    return unless $self->{pid};
    $self->_disconnect;
    CORE::kill('KILL', $self->{pid});
    ChatTest::_reap($self->{pid}, 5);
    delete $self->{pid};
}

# Stop (TERM) and start again on the same port with the same options.
sub restart {
    my $self = shift;
    $self->stop;
    $self->_start;
}

package ChatTest::RedisError;
use overload '""' => sub { $_[0]{error} }, fallback => 1;

# ---------------------------------------------------------------------------
# nginx

package ChatTest;

sub _render {
    my ($template, $vars, $no_module) = @_;
    my $text = $template;
    $text =~ s{%%([A-Z0-9_]+)%%}{
        exists $vars->{$1} ? $vars->{$1}
                           : die "template variable %%$1%% has no value\n"
    }ge;
    my $p = $vars->{PREFIX};
    my $head = "# --- prepended by t/lib/ChatTest.pm ---\n";
    $head .= "load_module $vars->{MODULE};\n" unless $no_module;
    $head .= "daemon off;\nmaster_process on;\n"
           . "pid $p/logs/nginx.pid;\n"
           . "error_log $p/logs/error.log info;\n"
           . "# --- template ---\n";
    return $head . $text;
}

sub _prepare_prefix {
    my ($template, $vars, $opts) = @_;
    my $prefix = _tempdir('nginx');
    make_path("$prefix/conf", "$prefix/logs");
    chmod 0755, "$prefix/conf", "$prefix/logs";
    my %v = %$vars;
    $v{MODULE} = module_path();
    $v{PREFIX} = $prefix;
    $v{PORT} //= free_port();
    $v{REDIS_PORT} //= $opts->{redis}->port if $opts->{redis};
    my $no_module = $NO_MODULE || $opts->{no_module};
    _spurt("$prefix/conf/nginx.conf", _render($template, \%v, $no_module));
    return ($prefix, \%v);
}

sub _split_args {
    my %all = @_;
    my (%vars, %opts);
    for my $k (keys %all) {
        if ($k =~ /^[A-Z][A-Z0-9_]*$/) { $vars{$k} = $all{$k} }
        else { $opts{$k} = $all{$k} }
    }
    return (\%vars, \%opts);
}

sub _nginx_argv {
    my $prefix = shift;
    return (nginx_binary(), '-p', "$prefix/", '-c', "$prefix/conf/nginx.conf",
            '-e', "$prefix/logs/error.log");
}

# Run `nginx -t` on the rendered template. Returns (exit code, output, path
# of the written nginx.conf).
sub test_config {
    shift if defined $_[0] && ref $_[0];    # allow $nginx->test_config(...)
    my ($template, @rest) = @_;
    my ($vars, $opts) = _split_args(@rest);
    my ($prefix) = _prepare_prefix($template, $vars, $opts);
    my ($code, $out) = _run_cmd(15, _nginx_argv($prefix), '-t');
    return ($code, $out, "$prefix/conf/nginx.conf");
}

sub start_nginx {
    my ($template, @rest) = @_;
    my ($vars, $opts) = _split_args(@rest);
    my ($prefix, $v) = _prepare_prefix($template, $vars, $opts);
    my $allow = delete $opts->{allow_errors} // [];
    die "start_nginx: allow_errors must be an array reference of qr// patterns\n"
        unless ref $allow eq 'ARRAY';
    my $self = bless { prefix => $prefix, vars => $v, port => $v->{PORT},
                       opts => $opts, allow_errors => [] }, 'ChatTest::Nginx';
    $self->allow_errors(@$allow);
    $self->{pid} = _spawn("$prefix/logs/stderr.log", _nginx_argv($prefix));
    push @NGINX, $self;

    my $died;
    my $ok = wait_until(sub {
        my $r = waitpid($self->{pid}, WNOHANG);
        if ($r == $self->{pid}) { $died = $?; return 1 }
        return _port_accepts($self->{port});
    }, 10, 0.05);
    if (defined $died || !$ok) {
        my $why = defined $died ? "exited with status " . ($died >> 8)
                                : "port $self->{port} not accepting after 10s";
        $self->{stopped} = 1 if defined $died;
        my $log = $self->error_log_text . _slurp("$prefix/logs/stderr.log");
        $self->stop(quiet => 1) unless defined $died;
        die "start_nginx: $why\n$log";
    }
    # The port accepts as soon as the master listens; also wait for workers.
    my $want = $opts->{workers};
    wait_until(sub { my @w = $self->worker_pids; $want ? @w >= $want : @w >= 1 }, 10);
    return $self;
}

# start_nginx as a test: on success records a passing test named $name and
# returns the object; when nginx does not start (e.g. a directive the module
# does not know yet) records a failure with nginx's output, stops what runs
# and ends the test file (done_all, exit).
sub start_nginx_ok {
    my ($name, @args) = @_;
    my $n = eval { start_nginx(@args) };
    my $err = $@;
    Test::More::ok($n, $name) and return $n;
    Test::More::diag($err);
    done_all();
    exit;
}

package ChatTest::Nginx;

use strict;
use warnings;
use Test::More ();

sub port   { $_[0]{port} }
sub pid    { $_[0]{pid} }
sub prefix { $_[0]{prefix} }
sub var    { $_[0]{vars}{ $_[1] } }
sub conf_path { "$_[0]{prefix}/conf/nginx.conf" }

sub error_log_text  { ChatTest::_slurp("$_[0]{prefix}/logs/error.log") }
sub access_log_text { ChatTest::_slurp("$_[0]{prefix}/logs/access.log") }

# Worker processes of the master that are not shutting down.
sub worker_pids {
    my $self = shift;
    return grep {
        my $t = ChatTest::_proc_title($_);
        $t =~ /worker process/ && $t !~ /shutting down/
    } ChatTest::_proc_children($self->{pid});
}

# All children of the master (including old workers shutting down).
sub child_pids { ChatTest::_proc_children($_[0]{pid}) }

# Send HUP and wait (10s) until as many workers as before run, none of them old.
sub reload {
    my ($self, %o) = @_;
    my @old = $self->worker_pids;
    my %old = map { $_ => 1 } @old;
    my $want = $o{workers} // scalar(@old) || 1;
    kill 'HUP', $self->{pid} or die "reload: cannot signal $self->{pid}: $!";
    my $ok = ChatTest::wait_until(sub {
        my @w = $self->worker_pids;
        return @w >= $want && !grep { $old{$_} } @w;
    }, 10);
    die "reload: new workers did not appear within 10s\n" . $self->error_log_text
        unless $ok;
    return $self->worker_pids;
}

# Add qr// patterns to this instance's allow-list of expected [error] lines
# (see the header). Returns the object.
sub allow_errors {
    my ($self, @patterns) = @_;
    for my $re (@patterns) {
        die "allow_errors: not a qr// pattern: " . ($re // 'undef') . "\n"
            unless ref $re eq 'Regexp';
    }
    push @{ $self->{allow_errors} }, @patterns;
    return $self;
}

# Error-log lines that fail the stop-time check: alert/crit/emerg, a process
# that exited on a signal, and [error] lines not matching an allowed pattern.
sub _log_problems {
    my $self = shift;
    my @allow = (@{ $self->{allow_errors} // [] }, ChatTest::_file_allowed());
    my (@bad, @allowed);
    for my $l (split /\n/, $self->error_log_text) {
        if ($l =~ /\[(?:alert|crit|emerg)\]/ || $l =~ /exited on signal/) {
            push @bad, $l;
        } elsif ($l =~ /\[error\]/) {
            if (grep { $l =~ $_ } @allow) { push @allowed, $l }
            else { push @bad, $l }
        }
    }
    if (@allowed) {
        my $max = 5;
        Test::More::note("nginx on port $self->{port}: " . scalar(@allowed)
            . " allowed [error] line(s)" . (@allowed > $max ? ", first $max" : '') . ":\n"
            . join("\n", @allowed[0 .. ($#allowed < $max - 1 ? $#allowed : $max - 1)]));
    }
    return @bad;
}

# Graceful stop: QUIT, wait up to 10s, then KILL (master and its children).
# Records as tests that the stop was graceful and that the error log is clean.
sub stop {
    my ($self, %o) = @_;
    return if $self->{stopped};
    $self->{stopped} = 1;
    my @kids = $self->child_pids;
    kill 'QUIT', $self->{pid};
    my $st = ChatTest::_reap($self->{pid}, 10);
    my $graceful = defined $st;
    if (!$graceful) {
        @kids = (@kids, $self->child_pids);
        kill 'KILL', $self->{pid}, @kids;
        ChatTest::_reap($self->{pid}, 5);
    }
    # Old or orphaned workers must be gone too.
    my $gone = ChatTest::wait_until(sub { !grep { kill 0, $_ } @kids }, 5);
    kill 'KILL', @kids unless $gone;
    return if $o{quiet};

    my @bad = $self->_log_problems;
    my $name = "nginx on port $self->{port}";
    my $tb = Test::More->builder;
    if ($o{in_end} && defined $tb->has_plan) {
        # Too late to add tests; report loudly instead.
        Test::More::diag("$name was not stopped before done_testing");
        Test::More::diag("$name error log problems:\n" . join("\n", @bad)) if @bad;
        return;
    }
    Test::More::ok($graceful, "$name exited within 10s after QUIT")
        or Test::More::diag("children still present: @{[ $self->child_pids ]}");
    Test::More::ok(!@bad, "$name error log has no alert/crit/emerg/signal lines "
                        . "and no unexpected [error] lines")
        or Test::More::diag(join "\n", @bad);
}

1;
