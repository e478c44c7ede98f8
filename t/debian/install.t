# The Debian package as a user installs it: `apt-get install ./….deb` into this
# machine's nginx enables the module, a site using it passes `nginx -t`, that
# nginx chats across two workers on a loopback port with a private Redis, and
# `apt-get purge` leaves /etc/nginx exactly as it was (every path, mode, owner,
# symlink target and file digest). Also checked: the package depends on the
# very nginx-abi-* the installed nginx provides plus the packages of the
# libraries its stripped .so links, nothing else; a copy that asks for another
# ABI is refused by apt, with nothing unpacked.
#
# It changes the system (packages, /etc/nginx for a while), so it runs as root
# from scripts/test-debian.sh, not with `prove t/`. WSCHAT_DEB names the
# package (default: the newest in target/deb/, from scripts/package-deb.sh).
# No system nginx is started: the test's nginx is a child of this process
# under a private prefix, on 127.0.0.1 only.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../lib";
use Test::More;
use File::Find ();
use File::Temp ();
use Digest::SHA ();
use IO::Socket::INET ();
use POSIX ();
use Cwd ();

my ($PKG, $NGINX, $SO, %SITE_FILE, $deb);
BEGIN {
    $PKG   = 'libnginx-mod-http-websocket-chat';
    $NGINX = '/usr/sbin/nginx';
    $SO    = '/usr/lib/nginx/modules/ngx_http_websocket_chat_module.so';
    %SITE_FILE = (available => '/etc/nginx/sites-available/websocket-chat-install-test',
                  enabled   => '/etc/nginx/sites-enabled/websocket-chat-install-test');
}

sub dpkg_installed {
    my $st = `dpkg-query -W -f='\${Status}' $_[0] 2>/dev/null`;
    return $st =~ /install ok installed/;
}

BEGIN {
    plan skip_all => 'installs a package: run as root (scripts/test-debian.sh)' if $> != 0;
    plan skip_all => "Debian's nginx is not installed ($NGINX)" unless -x $NGINX;
    plan skip_all => "$PKG is already installed: apt-get purge $PKG first"
        if dpkg_installed($PKG);
    # A running system nginx would be reloaded by the package's trigger and
    # would pick up the test's site.
    my $pid = -s '/run/nginx.pid' && `cat /run/nginx.pid`;
    plan skip_all => 'a system nginx is running: this test needs a machine without one'
        if $pid && $pid =~ /^(\d+)/ && kill 0, $1;
    my $dir = "$FindBin::Bin/../../target/deb";
    ($deb) = $ENV{WSCHAT_DEB} || (sort { -M $a <=> -M $b } glob "$dir/${PKG}_*.deb");
    plan skip_all => "no package in $dir: build it with scripts/package-deb.sh" unless $deb;
}
# The module is not on disk until the package is installed, so the harness
# does not load it; the templates below name the installed file themselves.
BEGIN { $ENV{TEST_NGINX_BINARY} = $NGINX }
use ChatTest '-no_module';
use WSClient;
use ChatFault qw(client_workers);

$deb = Cwd::abs_path($deb) // $deb;
ok(-f $deb, "the package exists: $deb") or BAIL_OUT("no such file: $deb");
my $tmp = File::Temp::tempdir('debian-XXXXXX', DIR => ChatTest::repo_root() . '/t/tmp',
                              CLEANUP => !$ENV{TEST_CHAT_KEEP});

# Runs @argv with a time limit; returns (exit code, stdout+stderr).
sub run {
    my ($secs, @argv) = @_;
    my $out = "$tmp/run.out";
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $out or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        $ENV{DEBIAN_FRONTEND} = 'noninteractive';
        exec 'timeout', $secs, @argv or POSIX::_exit(127);
    }
    waitpid $pid, 0;
    my $code = $? >> 8;
    open my $fh, '<', $out or return ($code, '');
    local $/;
    return ($code, scalar <$fh> // '');
}

# apt waits for the dpkg lock rather than failing when another apt runs.
my @APT = ('apt-get', '-y', '-q', '-o', 'DPkg::Lock::Timeout=60');

# path => "mode uid:gid what" for everything under /etc/nginx.
sub etc_listing {
    my %l;
    File::Find::find({ no_chdir => 1, wanted => sub {
        my $p = $File::Find::name;
        my @st = lstat $p or return;
        my $what = -l _ ? 'link ' . readlink $p
                 : -d _ ? 'dir'
                 : 'file ' . Digest::SHA->new(256)->addfile($p, 'b')->hexdigest;
        $l{$p} = sprintf '%04o %d:%d %s', $st[2] & 07777, $st[4], $st[5], $what;
    } }, '/etc/nginx');
    return \%l;
}

sub listing_diff {
    my ($a, $b) = @_;
    my %all = (%$a, %$b);
    return map { sprintf '%s: %s -> %s', $_, $a->{$_} // '(none)', $b->{$_} // '(none)' }
           grep { ($a->{$_} // '') ne ($b->{$_} // '') } sort keys %all;
}

sub port80_listening {
    for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
        open my $fh, '<', $f or next;
        while (<$fh>) { return 1 if /^\s*\d+: [0-9A-F]+:0050 [0-9A-F]+:0000 0A / }
    }
    return 0;
}

sub nginx_processes {
    opendir my $dh, '/proc' or return ();
    return sort grep { /^\d+$/ && (readlink("/proc/$_/exe") // '') eq $NGINX } readdir $dh;
}

sub slurp { open my $fh, '<:raw', $_[0] or return undef; local $/; scalar <$fh> }

my $etc_before  = etc_listing();
my $port80      = port80_listening();
my %nginx_before = map { $_ => 1 } nginx_processes();

# --- what the package declares -------------------------------------------
my ($provided) = `dpkg-query -W -f='\${Provides}' nginx` =~ /\b(nginx-abi-[^\s,]+)/;
ok($provided, "the installed nginx provides an ABI ($provided)");
my %depends = map { /^\s*([^\s(]+)/ ? ($1 => $_) : () } split /,/, `dpkg-deb -f '$deb' Depends`;
my @abi = grep { /^nginx-abi-/ } keys %depends;
is_deeply(\@abi, [$provided // '?'], "Depends names exactly the installed nginx's ABI, $provided");

my $so_copy = "$tmp/module.so";
system("dpkg-deb --fsys-tarfile '$deb' | tar -xOf - .$SO > '$so_copy'") == 0 && -s $so_copy
    or BAIL_OUT("$SO is not in $deb");
my @sections = `readelf -SW '$so_copy'` =~ /\]\s+(\.\S+)/g;
ok(!grep({ /^\.(?:debug_|symtab$)/ } @sections), 'the packaged .so is stripped')
    or diag("sections: @sections");
my @needed = `readelf -dW '$so_copy'` =~ /\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g;
my %ldpath = `/sbin/ldconfig -p` =~ /^\s*(\S+) \([^)]*x86-64[^)]*\) => (\S+)$/mg;
my %owner;
for my $lib (@needed) {
    my $path = $ldpath{$lib} // '';
    my ($p) = `dpkg -S '$path' 2>/dev/null` =~ /^([^:\s]+)/;
    $owner{$p // "?($lib)"} = 1;
}
is_deeply([sort grep { !/^nginx-abi-/ } keys %depends], [sort keys %owner],
          "the other dependencies are the packages of the libraries it links (@needed)");

# --- a package for another nginx ABI -------------------------------------
my $other = "$tmp/other-abi";
system('dpkg-deb', '-R', $deb, $other) == 0 or BAIL_OUT('dpkg-deb -R failed');
my $control = slurp("$other/DEBIAN/control");
$control =~ s/\Q$provided\E/nginx-abi-0.0.0-0/ or BAIL_OUT("no $provided in the control file");
open my $cf, '>', "$other/DEBIAN/control" or die $!;
print $cf $control;
close $cf;
system("dpkg-deb -b '$other' '$tmp/other-abi.deb' >/dev/null") == 0 or BAIL_OUT('dpkg-deb -b failed');
chmod 0755, $tmp;    # so that apt's unprivileged _apt user can read the file
my ($code, $out) = run(120, @APT, 'install', "$tmp/other-abi.deb");
isnt($code, 0, 'apt-get refuses the package built for another nginx ABI');
like($out, qr/Depends: nginx-abi-0\.0\.0-0 but it is not installable/,
     'apt says the ABI dependency cannot be met') or diag($out);
ok(!dpkg_installed($PKG) && !-e $SO, 'nothing was installed');

# --- install ------------------------------------------------------------
my $installed;
END {
    # Whatever failed above, leave the machine as the test found it.
    my $rc = $?;
    unlink $SITE_FILE{enabled}, $SITE_FILE{available};
    system(@APT, 'purge', $PKG) if $installed && dpkg_installed($PKG);
    $? = $rc;
}
($code, $out) = run(180, @APT, 'install', $deb);
$installed = 1;
is($code, 0, 'apt-get install ./<package>.deb succeeds') or diag($out);
ok(dpkg_installed($PKG), "$PKG is installed");
ok(-f $SO, "the module is in /usr/lib/nginx/modules/");

my $enabled = '/etc/nginx/modules-enabled/50-mod-http-websocket-chat.conf';
my $available = '/usr/share/nginx/modules-available/mod-http-websocket-chat.conf';
is(readlink($enabled), $available, "the maintainer script enabled it: $enabled -> $available");
my ($load) = (slurp($available) // '') =~ /^\s*load_module\s+(\S+);/m;
my ($prefix) = `$NGINX -V 2>&1` =~ /--prefix=(\S+)/;
my $load_path = !defined $load ? '' : $load =~ m{^/} ? $load : "$prefix/$load";
is(Cwd::abs_path($load_path), Cwd::abs_path($SO),
   "its load_module line ($load) names the installed module under nginx's prefix");
is(slurp('/usr/share/websocket-chat/html/index.html'),
   slurp(ChatTest::repo_root() . '/nginx/html/index.html'),
   'the chat page is in /usr/share/websocket-chat/html/');

# --- a site that uses it --------------------------------------------------
my $redis = start_redis();
my $port = free_port();
my $rport = $redis->port;
open my $sf, '>', $SITE_FILE{available} or die "$SITE_FILE{available}: $!";
print $sf <<"EOT";
# Written by t/debian/install.t, removed when it ends.
server {
    listen 127.0.0.1:$port reuseport;
    websocket_chat_redis 127.0.0.1:$rport;

    # As README's "On Debian" tells users to add.
    location = /ws {
        websocket_chat;
        websocket_chat_room \$arg_room;
        websocket_chat_user \$arg_nick;
    }
    location /chat/ { alias /usr/share/websocket-chat/html/; }
}
EOT
close $sf;
symlink $SITE_FILE{available}, $SITE_FILE{enabled} or die "$SITE_FILE{enabled}: $!";

# The machine's own configuration, which loads modules-enabled/*.conf: without
# the module, websocket_chat would be an unknown directive.
($code, $out) = run(30, $NGINX, '-t');
is($code, 0, 'nginx -t accepts /etc/nginx/nginx.conf with the site') or diag($out);

# The same site in an nginx run by the harness (a private prefix, its logs
# and temporary files there); the site's listen is on a loopback port.
my $nginx = start_nginx_ok('the installed nginx starts with the module and the site, 2 workers', <<"EOT",
load_module $SO;
worker_processes 2;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    access_log %%PREFIX%%/logs/access.log;
    client_body_temp_path %%PREFIX%%/client_body;
    proxy_temp_path %%PREFIX%%/proxy;
    fastcgi_temp_path %%PREFIX%%/fastcgi;
    uwsgi_temp_path %%PREFIX%%/uwsgi;
    scgi_temp_path %%PREFIX%%/scgi;
    include $SITE_FILE{enabled};
}
EOT
    PORT => $port, redis => $redis, workers => 2);
my @workers = sort { $a <=> $b } $nginx->worker_pids;
is(scalar @workers, 2, 'two workers run');

my $http = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 5);
my $page = '';
if ($http) {
    print $http "GET /chat/ HTTP/1.0\r\nHost: localhost\r\n\r\n";
    local $/;
    $page = <$http> // '';
}
like($page, qr{\AHTTP/1\.1 200 .*<title>websocket_chat</title>}s, 'GET /chat/ serves the chat page');

# reuseport gives each worker its own listening socket; connect until two
# members sit on different workers (bounded in count and time).
my (@c, $i, $j);
my $t0 = time;
while (@c < 40 && time - $t0 < 15 && !defined $j) {
    push @c, WSClient->join(port => $port, room => 'deb', nick => 'u' . scalar @c);
    my @owner = client_workers($nginx, \@c, @workers);
    ($i) = grep { defined $owner[$_] } 0 .. $#c;
    ($j) = grep { defined $owner[$_] && $owner[$_] != $owner[$i] } 0 .. $#c if defined $i;
}
ok(defined $j, 'two members on different workers (within 40 connections, 15 s)');
ok(wait_until(sub { $redis->numsub('deb') == 2 }, 5), 'both workers subscribed to the room');
if (defined $j) {
    $c[$i]->send_text('from the first worker');
    ok($c[$j]->wait_type('message', 5, sub { $_[0]{text} eq 'from the first worker' && $_[0]{user} eq "u$i" }),
       'a message crosses from one worker to the other');
    $c[$j]->send_text('and back');
    ok($c[$i]->wait_type('message', 5, sub { $_[0]{text} eq 'and back' && $_[0]{user} eq "u$j" }),
       'and the answer crosses back');
}
$_->send_close(1000) for @c;
$nginx->stop;
$redis->stop;

# --- purge ----------------------------------------------------------------
unlink $SITE_FILE{enabled}, $SITE_FILE{available};
($code, $out) = run(180, @APT, 'purge', $PKG);
is($code, 0, "apt-get purge $PKG succeeds") or diag($out);
ok(!dpkg_installed($PKG) && !-e $SO && !-e '/usr/share/websocket-chat', 'the package and its files are gone');
($code, $out) = run(30, $NGINX, '-t');
is($code, 0, 'nginx -t still accepts /etc/nginx/nginx.conf') or diag($out);
my @diff = listing_diff($etc_before, etc_listing());
ok(!@diff, '/etc/nginx is as it was before the install') or diag(join "\n", @diff);
is(port80_listening(), $port80, 'port 80 is as it was (no system nginx started)');
is_deeply([grep { !$nginx_before{$_} } nginx_processes()], [], "no $NGINX process left running");

done_all();
