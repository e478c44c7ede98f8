package ChatFault;

# Helpers for the resilience and lifecycle tests (Redis outages, reloads,
# killed workers, leak cycles). Complements t/lib/ChatTest.pm and
# t/lib/WSClient.pm without changing them.
#
#   use ChatFault;
#   allow_killed_worker($nginx, $pid);     # the stop-time log check accepts
#                                          # exactly "worker process $pid exited on signal 9"
#   my @l = log_lines($nginx, qr/lost/);   # error-log lines matching a regex
#   my $pid = client_worker($nginx, $client);   # worker holding a client's session
#   my @pids = client_workers($nginx, \@clients); # the same for many, in one pass
#   my %n = redis_conns_by_pid($redis->port, @pids);  # TCP connections to Redis per pid
#   my ($pong, @events) = ping_pong($client, 5); # ping with a payload, wait for its pong
#   pid_running($pid)                      # process exists and is not a zombie
#
# Sockets are attributed to processes through /proc/net/tcp (inode of the
# connection) and /proc/<pid>/fd (which process holds that inode); this
# needs permission to read the workers' fd directories (root, or the same
# user).

use strict;
use warnings;

use JSON::PP ();
use WSClient ();
use Time::HiRes qw(time);

require Exporter;
our @ISA = ('Exporter');
our @EXPORT = qw(allow_log_lines allow_killed_worker log_lines pid_running
                 tcp_connections socket_owners client_worker client_workers
                 redis_conns_by_pid ping_pong parse_frame);

my $JSON = JSON::PP->new->utf8;

# ---------------------------------------------------------------------------
# error-log check with expected lines
#
# ChatTest::Nginx::stop fails the file on any [alert]/[crit]/[emerg] or
# "exited on signal" line, and on [error] lines not excused by the
# instance's allow_errors patterns, through its _log_problems method. Expected
# [error] lines are declared with ChatTest's allow_errors. A test that
# kills a worker on purpose declares the one line that kill causes: the
# nginx object is re-blessed into ChatFault::Nginx, whose _log_problems drops
# lines matching one of the declared patterns and keeps everything else.

sub allow_log_lines {
    my ($nginx, @patterns) = @_;
    die "ChatFault: ChatTest::Nginx has no _log_problems method to refine\n"
        unless ChatTest::Nginx->can('_log_problems');
    bless $nginx, 'ChatFault::Nginx' unless $nginx->isa('ChatFault::Nginx');
    push @{ $nginx->{chatfault_allowed} }, @patterns;
    return $nginx;
}

# Allow exactly the line nginx's master writes when worker $pid died of
# signal $sig (default 9): "[alert] M#M: worker process PID exited on signal 9".
sub allow_killed_worker {
    my ($nginx, $pid, $sig) = @_;
    $sig //= 9;
    return allow_log_lines($nginx,
        qr/\[alert\] \d+#\d+: worker process \Q$pid\E exited on signal \Q$sig\E(?: \(core dumped\))?$/);
}

# Error-log lines of $nginx matching $re.
sub log_lines {
    my ($nginx, $re) = @_;
    return grep { $_ =~ $re } split /\n/, $nginx->error_log_text;
}

# ---------------------------------------------------------------------------
# processes and sockets

sub _slurp {
    my $f = shift;
    open my $fh, '<', $f or return undef;
    local $/;
    my $t = <$fh>;
    return $t;
}

# True while $pid exists and is not a zombie.
sub pid_running {
    my $pid = shift;
    my $st = _slurp("/proc/$pid/stat");
    return 0 unless defined $st;
    return 0 if $st =~ /\)\s+[ZX]\s/;
    return 1;
}

# IPv4 TCP connections from /proc/net/tcp as hashrefs: local_ip, local_port,
# remote_ip, remote_port (dotted quad / number), state (hex), inode. With
# @ports, only connections whose local or remote port is one of them (the
# table can hold tens of thousands of lines on a busy host). The kernel
# writes the table in chunks while connections come and go, so one socket
# can be listed twice: entries are unique by inode here.
sub tcp_connections {
    my (@ports) = @_;
    my $t = _slurp('/proc/net/tcp') // '';
    my $want = @ports ? join('|', map { sprintf '%04X', $_ } @ports) : '[0-9A-F]{4}';
    my (@c, %inode_seen);
    # sl local rem st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    while ($t =~ /^\s*\d+: ([0-9A-F]{8}):([0-9A-F]{4}) ([0-9A-F]{8}):([0-9A-F]{4}) ([0-9A-F]{2}) \S+ \S+ \S+ +\d+ +\d+ +(\d+)/mg) {
        my ($lip, $lport, $rip, $rport, $state, $inode) = ($1, $2, $3, $4, $5, $6);
        next unless $lport =~ /^(?:$want)$/ || $rport =~ /^(?:$want)$/;
        next if $inode && $inode_seen{$inode}++;
        push @c, {
            local_ip => _ip($lip), local_port => hex $lport,
            remote_ip => _ip($rip), remote_port => hex $rport,
            state => $state, inode => $inode,
        };
    }
    return @c;
}

# /proc/net/tcp writes the address as a host-order (little endian) word.
sub _ip { join '.', reverse unpack 'C4', pack 'N', hex $_[0] }

# {inode => pid} for every socket the processes @pids hold.
sub socket_owners {
    my (@pids) = @_;
    my %own;
    for my $pid (@pids) {
        opendir my $dh, "/proc/$pid/fd" or next;
        for my $fd (readdir $dh) {
            next unless $fd =~ /^\d+$/;
            my $l = readlink "/proc/$pid/fd/$fd" // next;
            $own{$1} = $pid if $l =~ /^socket:\[(\d+)\]$/;
        }
        closedir $dh;
    }
    return \%own;
}

# For each client of @$clients, the worker pid (one of $nginx->worker_pids,
# or of @pids when given) that holds the server side of its connection, or
# undef. One pass over /proc/net/tcp for all of them.
sub client_workers {
    my ($nginx, $clients, @pids) = @_;
    @pids = $nginx->worker_pids unless @pids;
    my $own = socket_owners(@pids);
    my %by_port;
    for my $c (tcp_connections($nginx->port)) {
        next unless $c->{local_port} == $nginx->port && $c->{local_ip} eq '127.0.0.1';
        my $pid = $own->{ $c->{inode} } or next;
        $by_port{ $c->{remote_port} } = $pid;
    }
    return map { $_->socket ? $by_port{ $_->socket->sockport } : undef } @$clients;
}

sub client_worker {
    my ($nginx, $client, @pids) = @_;
    my ($pid) = client_workers($nginx, [$client], @pids);
    return $pid;
}

# Established TCP connections to 127.0.0.1:$redis_port, counted per owning
# pid among @pids; connections owned by none of them count under ''
# (the test process's own Redis connection is one of those).
sub redis_conns_by_pid {
    my ($redis_port, @pids) = @_;
    my $own = socket_owners(@pids);
    my %n;
    for my $c (tcp_connections($redis_port)) {
        next unless $c->{remote_port} == $redis_port && $c->{remote_ip} eq '127.0.0.1'
                 && $c->{state} eq '01';
        $n{ $own->{ $c->{inode} } // '' }++;
    }
    return %n;
}

# ---------------------------------------------------------------------------
# WebSocket helpers

# Send a ping with a random payload and read frames until the matching pong
# (within $timeout seconds). Returns (1 or 0, events): the events are the
# JSON text messages read on the way (decoded; they are not recorded in the
# client's ->events). A close frame or EOF ends the wait with 0.
sub ping_pong {
    my ($client, $timeout) = @_;
    my $payload = sprintf 'pp-%06d', int rand 1_000_000;
    my @ev;
    $client->send_ping($payload) or return (0, @ev);
    my $deadline = time + ($timeout // 5);
    while (1) {
        my $left = $deadline - time;
        return (0, @ev) if $left <= 0;
        my $f = $client->recv_frame($left) or return (0, @ev);
        my $op = $f->{opcode};
        return (1, @ev) if $op == 10 && $f->{payload} eq $payload;
        return (0, @ev) if $op == 8;
        if ($op == 9) { $client->send_pong($f->{payload}); next }
        if ($op == 1) {
            my $e = eval { $JSON->decode($f->{payload}) };
            push @ev, ref $e eq 'HASH' ? $e : { type => '_invalid_json', raw => $f->{payload} };
        }
    }
}

# Frames are parsed by WSClient::parse_frame (re-exported for the tests).
sub parse_frame { WSClient::parse_frame(@_) }

package ChatFault::Nginx;

use strict;
use warnings;

our @ISA = ('ChatTest::Nginx');

sub _log_problems {
    my $self = shift;
    my @allowed = @{ $self->{chatfault_allowed} // [] };
    my @bad;
    for my $l ($self->SUPER::_log_problems(@_)) {
        if (grep { $l =~ $_ } @allowed) {
            Test::More::note("expected error-log line: $l");
            next;
        }
        push @bad, $l;
    }
    return @bad;
}

1;
