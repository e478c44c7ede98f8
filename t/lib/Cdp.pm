package Cdp;

# A small Chrome DevTools Protocol client for browser tests: launches headless
# Chromium, attaches to its page target over a WebSocket (own minimal RFC 6455
# client: masked client frames, 16/64-bit lengths, fragments, ping/pong) and
# offers the handful of calls the page tests need.
#
#   use Cdp;
#   my $b = Cdp->launch(tmp => $dir);               # dies on failure
#   $b->navigate("http://127.0.0.1:$port/");
#   $b->wait_for('document.querySelector("#log .event-welcome") !== null', 10)
#       or die;
#   $b->fill('#nick', 'alice');  $b->click('#join');
#   $b->screenshot('t/tmp/page.png');
#   my $p = $b->new_context;                        # a second, separate profile
#   $b->close;                                      # also on DESTROY
#
# Every read has a deadline; nothing blocks without one. Strings passed in are
# perl character strings; they go to the browser as UTF-8 JSON.

use strict;
use warnings;

use IO::Socket::INET ();
use IO::Select ();
use HTTP::Tiny ();
use JSON::PP ();
use MIME::Base64 qw(encode_base64 decode_base64);
use Digest::SHA qw(sha1_base64);
use File::Temp ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time);

my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;

our $CHROMIUM = $ENV{TEST_CHROMIUM} || '/usr/bin/chromium';

sub chromium_path { $CHROMIUM }

sub _free_port {
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
                                  Proto => 'tcp', Listen => 1, ReuseAddr => 1)
        or die "Cdp: cannot bind a free port: $!";
    my $p = $s->sockport;
    close $s;
    return $p;
}

sub _poll {
    my ($cond, $timeout, $interval) = @_;
    my $deadline = time + $timeout;
    while (1) {
        my $v = $cond->();
        return $v if $v;
        return undef if time >= $deadline;
        select(undef, undef, undef, $interval // 0.05);
    }
}

# Cdp->launch(%opts): start Chromium and attach to its page.
#   tmp      => directory for the profile and chromium.log (default: system tmp)
#   width, height => window size (default 1000x760)
#   timeout  => seconds to wait for the DevTools endpoint (default 20)
#   args     => extra command-line arguments
sub launch {
    my ($class, %o) = @_;
    my $timeout = $o{timeout} // 20;
    my $profile = File::Temp::tempdir('chromium-XXXXXX',
        ($o{tmp} ? (DIR => $o{tmp}) : (TMPDIR => 1)), CLEANUP => !$ENV{TEST_CHAT_KEEP});
    my $port = _free_port();
    my ($w, $h) = ($o{width} // 1000, $o{height} // 760);
    my @argv = ($CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu',
        '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync',
        '--disable-default-apps', '--disable-extensions', '--mute-audio',
        '--hide-scrollbars', "--window-size=$w,$h",
        "--user-data-dir=$profile", "--remote-debugging-port=$port",
        @{ $o{args} // [] }, 'about:blank');
    my $logfile = "$profile.log";
    my $pid = fork;
    die "Cdp: fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $logfile or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        setpgrp(0, 0);    # own process group: close() kills all its helpers
        { no warnings "exec"; exec { $argv[0] } @argv; }
        print STDERR "exec $argv[0]: $!\n";
        POSIX::_exit(127);
    }
    my $self = bless { pid => $pid, port => $port, profile => $profile,
                       log => $logfile, next_id => 1, events => [],
                       rbuf => '', owner => $$ }, $class;

    my $http = HTTP::Tiny->new(timeout => 2);
    my ($ws_url, $died);
    _poll(sub {
        if (waitpid($pid, WNOHANG) == $pid) { $died = $?; return 1 }
        my $r = $http->get("http://127.0.0.1:$port/json/list");
        return 0 unless $r->{success};
        my $list = eval { $JSON->decode($r->{content}) } or return 0;
        for my $t (@$list) {
            next unless ($t->{type} // '') eq 'page' && $t->{webSocketDebuggerUrl};
            $ws_url = $t->{webSocketDebuggerUrl};
            return 1;
        }
        return 0;
    }, $timeout, 0.1);
    if (!$ws_url) {
        my $why = defined $died ? "chromium exited (status $died)"
                                : "no page target on port $port within ${timeout}s";
        delete $self->{pid} if defined $died;
        my $log = $self->log_text;
        $self->close;
        die "Cdp: $why\n$log";
    }
    $self->{ws_url} = $ws_url;
    $self->_ws_connect($ws_url, 10);
    $self->call('Page.enable');
    $self->call('Runtime.enable');
    return $self;
}

# $b->new_context: a page in a new browser context of the same Chromium (its
# own cookies, localStorage, sessionStorage and cache, as a separate
# incognito profile), as a Cdp object with the same methods. Its close()
# disposes of that context only; the launching object still owns the browser.
sub new_context {
    my ($self, %o) = @_;
    die "Cdp: new_context needs the launching object\n" if $self->{parent};
    my $browser = $self->_browser_conn;
    my $ctx = $browser->call('Target.createBrowserContext', {})->{browserContextId}
        or die "Cdp: Target.createBrowserContext returned no id\n";
    my $tid = $browser->call('Target.createTarget',
        { url => 'about:blank', browserContextId => $ctx })->{targetId}
        or die "Cdp: Target.createTarget returned no id\n";
    my $page = bless { port => $self->{port}, next_id => 1, events => [], rbuf => '',
                       parent => $self, context => $ctx, target => $tid }, ref $self;
    $page->{ws_url} = "ws://127.0.0.1:$self->{port}/devtools/page/$tid";
    $page->_ws_connect($page->{ws_url}, $o{timeout} // 10);
    $page->call('Page.enable');
    $page->call('Runtime.enable');
    return $page;
}

# The browser-level DevTools connection (Target.* commands), opened once.
sub _browser_conn {
    my $self = shift;
    return $self->{browser} if $self->{browser};
    my $r = HTTP::Tiny->new(timeout => 5)->get("http://127.0.0.1:$self->{port}/json/version");
    die "Cdp: /json/version: $r->{status} $r->{reason}\n" unless $r->{success};
    my $url = $JSON->decode($r->{content})->{webSocketDebuggerUrl}
        or die "Cdp: /json/version has no webSocketDebuggerUrl\n";
    my $b = bless { port => $self->{port}, next_id => 1, events => [], rbuf => '',
                    parent => $self, is_browser => 1 }, ref $self;
    $b->_ws_connect($url, 10);
    return $self->{browser} = $b;
}

# add_init_script(js): run this script in every document the page loads from
# now on, before the page's own scripts (Page.addScriptToEvaluateOnNewDocument).
sub add_init_script {
    my ($self, $js) = @_;
    return $self->call('Page.addScriptToEvaluateOnNewDocument', { source => "$js" })->{identifier};
}

# reload(timeout=15): reload the page and wait for its load event.
sub reload {
    my ($self, $timeout) = @_;
    $self->take_events('Page.loadEventFired');
    $self->call('Page.reload', {}, $timeout);
    $self->wait_event('Page.loadEventFired', $timeout // 15)
        or die "Cdp: the page did not finish reloading\n";
}

# JavaScript dialogs (alert, confirm, prompt) opened so far: their messages.
# Each is dismissed, so that the page does not stay blocked.
sub take_dialogs {
    my $self = shift;
    my @d = $self->take_events('Page.javascriptDialogOpening');
    for (@d) {
        eval { $self->call('Page.handleJavaScriptDialog', { accept => JSON::PP::false }, 5) };
    }
    return map { $_->{message} // '' } @d;
}

sub pid     { $_[0]{pid} }
sub port    { $_[0]{port} }
sub ws_url  { $_[0]{ws_url} }

sub log_text {
    my $self = shift;
    open my $fh, '<', $self->{log} or return '';
    local $/;
    my $t = <$fh> // '';
    return length $t > 4000 ? '...' . substr($t, -4000) : $t;
}

# ---------------------------------------------------------------------------
# WebSocket transport

sub _ws_connect {
    my ($self, $url, $timeout) = @_;
    my ($host, $port, $path) = $url =~ m{^ws://([^/:]+):(\d+)(/.*)$}
        or die "Cdp: unexpected debugger URL $url";
    my $s = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port,
                                  Proto => 'tcp', Timeout => $timeout)
        or die "Cdp: connect $host:$port: $!";
    binmode $s;
    $self->{sock} = $s;
    my $key = encode_base64(join('', map { chr int rand 256 } 1 .. 16), '');
    $self->_write("GET $path HTTP/1.1\r\nHost: $host:$port\r\nUpgrade: websocket\r\n"
        . "Connection: Upgrade\r\nSec-WebSocket-Key: $key\r\n"
        . "Sec-WebSocket-Version: 13\r\n\r\n");
    my $deadline = time + $timeout;
    my $end;
    until (($end = index($self->{rbuf}, "\r\n\r\n")) >= 0) {
        $self->_fill($deadline);
    }
    my $head = substr($self->{rbuf}, 0, $end + 4, '');
    die "Cdp: WebSocket handshake refused:\n$head" unless $head =~ m{^HTTP/1\.1 101 };
    my ($accept) = $head =~ /^Sec-WebSocket-Accept:\s*(\S+)/mi;
    my $want = sha1_base64($key . '258EAFA5-E914-47DA-95CA-C5AB0DC85B11') . '=';
    die "Cdp: bad Sec-WebSocket-Accept" unless defined $accept && $accept eq $want;
}

sub _write {
    my ($self, $data) = @_;
    my $off = 0;
    my $sel = IO::Select->new($self->{sock});
    while ($off < length $data) {
        die "Cdp: write timeout\n" unless $sel->can_write(10);
        my $n = syswrite($self->{sock}, $data, length($data) - $off, $off);
        die "Cdp: write: $!\n" unless defined $n;
        $off += $n;
    }
}

sub _fill {
    my ($self, $deadline) = @_;
    my $left = $deadline - time;
    die "Cdp: timeout\n" if $left <= 0;
    die "Cdp: not connected\n" unless $self->{sock};
    my $sel = IO::Select->new($self->{sock});
    die "Cdp: timeout\n" unless $sel->can_read($left);
    my $n = sysread($self->{sock}, $self->{rbuf}, 1 << 20, length $self->{rbuf});
    die "Cdp: read: $!\n" unless defined $n;
    die "Cdp: browser closed the DevTools connection\n" if $n == 0;
}

sub _send_frame {
    my ($self, $opcode, $payload) = @_;
    my $len = length $payload;
    my $hdr = chr(0x80 | $opcode);
    if    ($len < 126)   { $hdr .= chr(0x80 | $len) }
    elsif ($len < 65536) { $hdr .= chr(0x80 | 126) . pack('n', $len) }
    else                 { $hdr .= chr(0x80 | 127) . pack('Q>', $len) }
    my $mask = pack('N', int rand 4294967296);
    my $masked = $payload ^ substr($mask x (int($len / 4) + 1), 0, $len);
    $self->_write($hdr . $mask . $masked);
}

# One complete message (text or binary payload), answering pings on the way.
sub _read_message {
    my ($self, $deadline) = @_;
    my $msg = '';
    while (1) {
        $self->_fill($deadline) while length $self->{rbuf} < 2;
        my ($b0, $b1) = unpack 'CC', $self->{rbuf};
        my $len = $b1 & 0x7f;
        my $hlen = 2;
        if ($len == 126) { $hlen = 4 } elsif ($len == 127) { $hlen = 10 }
        $hlen += 4 if $b1 & 0x80;
        $self->_fill($deadline) while length $self->{rbuf} < $hlen;
        if ($len == 126)    { $len = unpack 'n', substr($self->{rbuf}, 2, 2) }
        elsif ($len == 127) { $len = unpack 'Q>', substr($self->{rbuf}, 2, 8) }
        $self->_fill($deadline) while length $self->{rbuf} < $hlen + $len;
        my $payload = substr($self->{rbuf}, $hlen, $len);
        if ($b1 & 0x80) {
            my $mask = substr($self->{rbuf}, $hlen - 4, 4);
            $payload ^= substr($mask x (int($len / 4) + 1), 0, $len);
        }
        substr($self->{rbuf}, 0, $hlen + $len, '');
        my $op = $b0 & 0x0f;
        if ($op == 0x9) { $self->_send_frame(0xA, $payload); next }   # ping
        if ($op == 0xA) { next }                                      # pong
        if ($op == 0x8) { die "Cdp: browser sent a WebSocket close\n" }
        $msg .= $payload;
        return $msg if $b0 & 0x80;                                    # FIN
    }
}

# ---------------------------------------------------------------------------
# CDP

# call(method, {params}, timeout=15): send a command, return its result
# hashref; dies on a protocol error or timeout. Events read meanwhile are queued.
sub call {
    my ($self, $method, $params, $timeout) = @_;
    my $id = $self->{next_id}++;
    $self->_send_frame(0x1, $JSON->encode({ id => $id, method => $method,
                                            params => $params // {} }));
    my $deadline = time + ($timeout // 15);
    while (1) {
        my $m = $JSON->decode($self->_read_message($deadline));
        if (defined $m->{id}) {
            next unless $m->{id} == $id;
            die "Cdp: $method failed: " . $JSON->encode($m->{error}) . "\n" if $m->{error};
            return $m->{result} // {};
        }
        push @{ $self->{events} }, $m if $m->{method};
        splice @{ $self->{events} }, 0, -1000 if @{ $self->{events} } > 1000;
    }
}

# wait_event(name, timeout, [filter]): the first queued or arriving event with
# that method name (and for which filter->(params) is true); removed from the
# queue. Returns its params hashref, or undef at the deadline.
sub wait_event {
    my ($self, $name, $timeout, $filter) = @_;
    my $deadline = time + ($timeout // 10);
    while (1) {
        my $q = $self->{events};
        for my $i (0 .. $#$q) {
            next unless $q->[$i]{method} eq $name;
            next if $filter && !$filter->($q->[$i]{params});
            return (splice @$q, $i, 1)[0]{params};
        }
        my $m = eval { $JSON->decode($self->_read_message($deadline)) };
        if (!$m) {
            return undef if ($@ // '') =~ /timeout/;
            die $@;
        }
        push @$q, $m if $m->{method};
    }
}

# All queued events with that method name (removed from the queue).
sub take_events {
    my ($self, $name) = @_;
    my (@hit, @keep);
    push @{ $_->{method} eq $name ? \@hit : \@keep }, $_ for @{ $self->{events} };
    $self->{events} = \@keep;
    return map { $_->{params} } @hit;
}

# evaluate(js, timeout): the value of a JS expression (promises awaited),
# returned by value (JSON-able). Dies when the expression throws.
sub evaluate {
    my ($self, $expr, $timeout) = @_;
    my $r = $self->call('Runtime.evaluate', {
        expression => $expr, returnByValue => JSON::PP::true,
        awaitPromise => JSON::PP::true, userGesture => JSON::PP::true,
    }, $timeout);
    if (my $ex = $r->{exceptionDetails}) {
        my $d = $ex->{exception}{description} // $ex->{text} // 'exception';
        die "Cdp: evaluate threw: $d\n  in: $expr\n";
    }
    return $r->{result}{value};
}

# wait_for(js, timeout=10, interval=0.1): poll the expression until it is
# truthy; returns that value, or undef at the deadline.
sub wait_for {
    my ($self, $expr, $timeout, $interval) = @_;
    my $last;
    return _poll(sub { $last = $self->evaluate($expr); $last }, $timeout // 10,
                 $interval // 0.1);
}

sub _js_str { $JSON->encode("$_[0]") }

# navigate(url, timeout=15): load a page and wait for its load event.
sub navigate {
    my ($self, $url, $timeout) = @_;
    $self->take_events('Page.loadEventFired');
    my $r = $self->call('Page.navigate', { url => $url }, $timeout);
    die "Cdp: navigate $url: $r->{errorText}\n" if $r->{errorText};
    $self->wait_event('Page.loadEventFired', $timeout // 15)
        or die "Cdp: $url did not finish loading\n";
    return $r;
}

# Centre of the element's box in CSS pixels (scrolled into view first).
sub _center {
    my ($self, $sel) = @_;
    my $r = $self->evaluate('(() => { const e = document.querySelector(' . _js_str($sel) . ');'
        . ' if (!e) return null; e.scrollIntoView({block: "center"});'
        . ' const b = e.getBoundingClientRect();'
        . ' return {x: b.left + b.width / 2, y: b.top + b.height / 2, w: b.width, h: b.height}; })()');
    die "Cdp: no element matches $sel\n" unless $r;
    die "Cdp: element $sel is not visible\n" unless $r->{w} > 0 && $r->{h} > 0;
    return ($r->{x}, $r->{y});
}

# click(selector): a real mouse click at the element's centre.
sub click {
    my ($self, $sel) = @_;
    my ($x, $y) = $self->_center($sel);
    for my $type (qw(mouseMoved mousePressed mouseReleased)) {
        $self->call('Input.dispatchMouseEvent', { type => $type, x => $x, y => $y,
            ($type eq 'mouseMoved' ? () : (button => 'left', clickCount => 1)) });
    }
}

# fill(selector, text): focus the field, select its content and type text
# over it (Input.insertText: what an IME or paste does; any Unicode).
sub fill {
    my ($self, $sel, $text) = @_;
    $self->click($sel);
    $self->evaluate('(() => { const e = document.querySelector(' . _js_str($sel) . ');'
        . ' e.focus(); e.select(); return true; })()');
    if (length $text) {
        $self->call('Input.insertText', { text => "$text" });
    } else {
        $self->press_key('Backspace');
    }
}

my %KEYS = (
    Enter     => { code => 'Enter', windowsVirtualKeyCode => 13, text => "\r" },
    Backspace => { code => 'Backspace', windowsVirtualKeyCode => 8 },
    Tab       => { code => 'Tab', windowsVirtualKeyCode => 9 },
    Escape    => { code => 'Escape', windowsVirtualKeyCode => 27 },
);

# press_key(name): keyDown + keyUp of Enter, Backspace, Tab or Escape.
sub press_key {
    my ($self, $key) = @_;
    my $k = $KEYS{$key} or die "Cdp: unknown key $key\n";
    my %common = (key => $key, code => $k->{code},
                  windowsVirtualKeyCode => $k->{windowsVirtualKeyCode},
                  nativeVirtualKeyCode => $k->{windowsVirtualKeyCode});
    $self->call('Input.dispatchKeyEvent', { type => 'keyDown', %common,
        (defined $k->{text} ? (text => $k->{text}, unmodifiedText => $k->{text}) : ()) });
    $self->call('Input.dispatchKeyEvent', { type => 'keyUp', %common });
}

# viewport(width, height, mobile=0, scale=1): emulate a screen size.
sub viewport {
    my ($self, $w, $h, $mobile, $scale) = @_;
    $self->call('Emulation.setDeviceMetricsOverride', {
        width => $w, height => $h, deviceScaleFactor => $scale // 1,
        mobile => $mobile ? JSON::PP::true : JSON::PP::false });
}

# screenshot(file): PNG of the viewport; returns the byte count.
sub screenshot {
    my ($self, $file) = @_;
    my $r = $self->call('Page.captureScreenshot', { format => 'png' }, 30);
    my $png = decode_base64($r->{data});
    open my $fh, '>:raw', $file or die "Cdp: cannot write $file: $!\n";
    print $fh $png;
    close $fh or die "Cdp: cannot write $file: $!\n";
    return length $png;
}

# Console messages and uncaught exceptions seen so far (as text lines).
sub console_lines {
    my $self = shift;
    my @l;
    for my $e (@{ $self->{events} }) {
        if ($e->{method} eq 'Runtime.consoleAPICalled') {
            push @l, "console.$e->{params}{type}: " . join(' ',
                map { $_->{value} // $_->{description} // '' } @{ $e->{params}{args} });
        } elsif ($e->{method} eq 'Runtime.exceptionThrown') {
            my $d = $e->{params}{exceptionDetails};
            push @l, 'exception: ' . ($d->{exception}{description} // $d->{text});
        }
    }
    return @l;
}

# close: ask the browser to quit, then make sure its whole process group is
# gone. Safe to call twice.
sub close {
    my $self = shift;
    if (my $parent = $self->{parent}) {
        # A page of new_context (or the browser-level connection).
        return if $self->{closed}++;
        if ($self->{sock}) { CORE::close $self->{sock}; delete $self->{sock} }
        if ($self->{context} && $parent->{browser} && $parent->{browser}{sock}) {
            eval { $parent->{browser}->call('Target.disposeBrowserContext',
                                            { browserContextId => $self->{context} }, 5) };
        }
        return;
    }
    return unless $self->{owner} && $self->{owner} == $$;
    if (my $b = delete $self->{browser}) { $b->close }
    if ($self->{sock}) {
        eval { $self->_send_frame(0x1, $JSON->encode({ id => $self->{next_id}++,
                                                       method => 'Browser.close' })) };
        CORE::close $self->{sock};
        delete $self->{sock};
    }
    if (my $pid = delete $self->{pid}) {
        my $gone = _poll(sub { waitpid($pid, WNOHANG) != 0 }, 5);
        if (!$gone) {
            kill 'TERM', -$pid;
            $gone = _poll(sub { waitpid($pid, WNOHANG) != 0 }, 5);
        }
        if (!$gone) {
            kill 'KILL', -$pid;
            waitpid($pid, 0);
        }
        # Helpers (renderer, zygote) share the process group; no stragglers.
        kill 'KILL', -$pid;
    }
    unlink $self->{log} if $self->{log} && !$ENV{TEST_CHAT_KEEP};
}

sub DESTROY { my $self = shift; local ($@, $!, $?); $self->close }

1;
