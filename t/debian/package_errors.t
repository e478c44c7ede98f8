# scripts/package-deb.sh on bad input stops before building anything, with a
# message that says what to do: a tree that was never configured, a tree of
# another nginx version than the installed binary, and a machine without
# nginx-dev (a dpkg-query stand-in reports it missing). The good path, a real
# package, is what scripts/test-debian.sh builds and t/debian/install.t
# installs; here a valid tree given as an argument must get as far as the
# build (cargo is a stand-in that records its calls and fails).
use strict;
use warnings;
use FindBin;
use Test::More;
use File::Temp ();
use File::Path qw(make_path);
use Cwd ();

my $ROOT = Cwd::abs_path("$FindBin::Bin/../..");
my $SCRIPT = "$ROOT/scripts/package-deb.sh";
my $DEVSRC = '/usr/share/nginx/src';

plan skip_all => "needs Debian's nginx and nginx-dev (apt-get install nginx nginx-dev)"
    unless -x '/usr/sbin/nginx' && -f "$DEVSRC/src/core/nginx.h";
plan skip_all => 'needs dpkg-buildpackage (apt-get install dpkg-dev)'
    unless grep { -x "$_/dpkg-buildpackage" } split /:/, $ENV{PATH};

make_path("$ROOT/t/tmp");
my $tmp = File::Temp::tempdir('package-errors-XXXXXX', DIR => "$ROOT/t/tmp",
                              CLEANUP => !$ENV{TEST_CHAT_KEEP});

sub spurt {
    my ($f, $t, $mode) = @_;
    open my $fh, '>', $f or die "$f: $!";
    print $fh $t;
    close $fh;
    chmod $mode, $f if $mode;
}

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; scalar <$fh> }

# cargo stand-in: answers --version, records every other call and fails, so
# no test here can start a real build.
my $calls = "$tmp/cargo.calls";
spurt("$tmp/cargo", "#!/bin/sh\n[ \"\$1\" = --version ] && { echo 'cargo 1.88.0 (stand-in)'; exit 0; }\n"
                  . "echo \"\$*\" >> '$calls'\nexit 1\n", 0755);

my ($version) = slurp("$DEVSRC/src/core/nginx.h") =~ /#define NGINX_VERSION\s+"([^"]+)"/;

# A minimal nginx tree: nginx.h of the given version, and (when configured)
# the two files configure writes in objs/.
sub tree {
    my ($name, $v, $configured) = @_;
    my $t = "$tmp/$name";
    make_path("$t/src/core");
    (my $h = slurp("$DEVSRC/src/core/nginx.h")) =~ s/(#define NGINX_VERSION\s+)"[^"]+"/$1"$v"/;
    spurt("$t/src/core/nginx.h", $h);
    if ($configured) {
        make_path("$t/objs");
        spurt("$t/objs/ngx_auto_config.h", "#define NGX_COMPAT 1\n");
        spurt("$t/objs/Makefile", "\n");
    }
    return $t;
}

# Runs package-deb.sh with %env added; returns (exit code, stderr).
sub package_deb {
    my ($env, @args) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', "$tmp/stdout" or exit 126;
        open STDERR, '>', "$tmp/stderr" or exit 126;
        $ENV{CARGO} = "$tmp/cargo";
        @ENV{ keys %$env } = values %$env;
        exec 'timeout', 60, $SCRIPT, @args or exit 127;
    }
    waitpid $pid, 0;
    return ($? >> 8, slurp("$tmp/stderr"));
}

my ($code, $err);

($code, $err) = package_deb({}, tree('unconfigured', $version, 0));
isnt($code, 0, 'an unconfigured tree is refused');
like($err, qr/is not configured: run `\. \.\/conf_flags && \.\/configure "\$\{NGX_CONF_FLAGS\[\@\]\}"` in it/,
     '... with the configure command to run') or diag($err);

($code, $err) = package_deb({}, tree('other-version', '1.99.0', 1));
isnt($code, 0, "a tree of another version than the installed nginx's is refused");
like($err, qr/is nginx 1\.99\.0 but \/usr\/sbin\/nginx is \Q$version\E: build against the tree of the nginx the module will load into/,
     '... saying which versions differ and what to build against') or diag($err);

# dpkg-query stand-in: nginx-dev is not installed, everything else is asked
# of the real one.
make_path("$tmp/bin");
spurt("$tmp/bin/dpkg-query", "#!/bin/sh\nfor a; do [ \"\$a\" = nginx-dev ] && exit 1; done\n"
                           . "exec /usr/bin/dpkg-query \"\$@\"\n", 0755);
($code, $err) = package_deb({ PATH => "$tmp/bin:$ENV{PATH}" });
isnt($code, 0, 'a machine without nginx-dev is refused');
like($err, qr/nginx-dev is not installed: apt-get install nginx-dev/, '... saying what to install')
    or diag($err);

ok(!-e $calls, 'none of these got as far as cargo') or diag(slurp($calls));

# The same checks let a good tree through: the build starts (and the cargo
# stand-in ends it).
($code, $err) = package_deb({}, tree('good', $version, 1));
like(slurp($calls), qr/^build --release --lib /m, 'a configured tree of the right version gets to cargo build')
    or diag($err);

done_testing();
