#!/usr/bin/perl
# The demo chat page (nginx/html/) in a real browser: headless Chromium driven
# over the Chrome DevTools Protocol (t/lib/Cdp.pm), against nginx with the
# module, configured from the shipped nginx/demo.conf.in, and a private Redis.
# A raw WebSocket client (t/lib/WSClient.pm) chats with the browser in the
# same room. Leaves screenshots in t/tmp/page.png and t/tmp/page-phone.png.
#
# Needs /usr/bin/chromium (Debian package chromium; TEST_CHROMIUM overrides);
# skipped without it. Installs nothing.

use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;

BEGIN {
    my $chromium = $ENV{TEST_CHROMIUM} || '/usr/bin/chromium';
    my $why = "$chromium not found: install the Debian package chromium to run the browser test";
    # scripts/test.sh installs chromium, so under CI a missing browser is a failure.
    unless (-x $chromium) {
        BAIL_OUT($why) if $ENV{CI};
        plan skip_all => $why;
    }
}

use ChatTest;
use WSClient;
use Cdp;
use JSON::PP ();
use File::Path qw(make_path);

my $tb = Test::More->builder;
binmode $tb->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $JS = JSON::PP->new->ascii->allow_nonref;
sub js { $JS->encode("$_[0]") }

sub urlencode {
    my $s = shift;
    utf8::encode($s);
    $s =~ s/([^A-Za-z0-9\-_.~])/sprintf '%%%02X', ord $1/ge;
    return $s;
}

# nginx/demo.conf.in turned into a ChatTest template: the harness prepends
# load_module, pid and error_log itself, and fills %%VARS%%.
sub demo_template {
    my $file = repo_root() . '/nginx/demo.conf.in';
    open my $fh, '<:encoding(UTF-8)', $file or die "cannot read $file: $!";
    my $t = do { local $/; <$fh> };
    $t =~ s/^[ \t]*(?:load_module|pid|error_log)\b[^\n]*\n//mg;
    my %map = (PREFIX => '%%PREFIX%%', HTML => '%%HTML%%',
               REDIS => '127.0.0.1:%%REDIS_PORT%%', LISTEN => '127.0.0.1:%%PORT%%');
    $t =~ s/\@([A-Z]+)\@/exists $map{$1} ? $map{$1} : "<$1>"/ge;
    return $t;
}

my $room = "browser café $$";
my $nick = 'Zoë 🌸';
my $raw_nick = 'raw-bob';
my $from_browser = 'héllo wörld — ñ 日本語 🚀 <b>not bold</b> & "quotes"';
my $from_raw = 'bonjour from the raw side ✓ <i>x</i>';
my $with_enter = 'sent with Enter ⏎';

my $redis = start_redis();
my $nginx = start_nginx(demo_template(), redis => $redis,
                        HTML => repo_root() . '/nginx/html', workers => 2);
my $base = 'http://127.0.0.1:' . $nginx->port;
my $tmp = repo_root() . '/t/tmp';
make_path($tmp);

my ($b, $raw);
my $ok = eval { run(); 1 };
ok($ok, 'browser scenario ran to the end') or diag($@);
if (!$ok && $b) {
    eval { $b->screenshot("$tmp/page-failure.png"); diag("screenshot of the failure: $tmp/page-failure.png") };
    eval { diag("#log:\n" . ($b->evaluate('document.getElementById("log").innerText') // '')) };
    eval { diag("#status: " . ($b->evaluate('document.getElementById("status").textContent') // '')) };
    diag($_) for $b->console_lines;
}
if ($b) {
    my $pid = $b->pid;
    $b->close;
    ok(!$pid || !kill(0, $pid), 'chromium is gone');
}
undef $raw;
done_all();

# ---------------------------------------------------------------------------

# JS: does #log hold an element matching sel whose text is exactly $text?
# With $part, the text of that child element (e.g. ".text" of a message);
# without, the line's text less its leading time stamp.
sub has_line {
    my ($sel, $text, $part) = @_;
    my $get = $part
        ? 'const t = e.querySelector(' . js($part) . '); const s = t && t.textContent;'
        : 'const s = [...e.childNodes].filter(n => !(n.classList && n.classList.contains("time")))'
          . '.map(n => n.textContent).join("").trim();';
    return '[...document.querySelectorAll("#log > ' . $sel . '")].some(e => {'
         . " $get return s === " . js($text) . '; })';
}

sub message_line {
    my $text = shift;
    return $b->evaluate('(() => { const e = [...document.querySelectorAll("#log > .event-message")]'
        . '.find(e => (e.querySelector(".text") || {}).textContent === ' . js($text) . ');'
        . ' if (!e) return null;'
        . ' return {cls: e.className, user: (e.querySelector(".user") || {}).textContent,'
        . ' time: (e.querySelector(".time") || {}).textContent,'
        . ' html_tags: e.querySelectorAll(".text *").length}; })()');
}

sub run {
    # The raw client joins first, so it sees the browser's join.
    $raw = WSClient->connect(port => $nginx->port, welcome => 1, timeout => 10,
        path => '/ws?room=' . urlencode($room) . '&nick=' . urlencode($raw_nick));
    is($raw->welcome->{room}, $room, 'raw client: welcome names the room (URL-decoded)');

    $b = Cdp->launch(tmp => $tmp);
    pass('chromium started and DevTools attached');
    $b->viewport(1000, 700);

    # Prefill from the query string.
    $b->navigate("$base/?room=" . urlencode('pre filled') . '&nick=' . urlencode('ünï'));
    is($b->evaluate('document.getElementById("room").value'), 'pre filled', '#room prefilled from ?room=');
    is($b->evaluate('document.getElementById("nick").value'), 'ünï', '#nick prefilled from ?nick=');
    $b->navigate("$base/");
    is($b->evaluate('document.getElementById("room").value'), 'lobby', '#room defaults to lobby');
    is($b->evaluate('document.getElementById("text").disabled && document.getElementById("send").disabled'),
       JSON::PP::true, '#text and #send are disabled before joining');

    # Join through the form, as a person would.
    $b->fill('#nick', $nick);
    $b->fill('#room', $room);
    $b->click('#join');
    my $welcome = "joined $room as $nick";
    ok($b->wait_for(has_line('.event.event-welcome', $welcome), 15),
       "welcome line: '$welcome'")
        or die "no welcome in the browser\n";
    ok($b->wait_for('!document.getElementById("text").disabled && !document.getElementById("send").disabled', 5),
       '#text and #send enabled after welcome');
    like($b->evaluate('document.getElementById("status").textContent'), qr/connected/, '#status says connected');

    my $join = $raw->wait_type('join', 10, sub { $_[0]{user} eq $nick });
    ok($join, 'raw client sees the browser user join (nick URL-decoded)');

    # Browser -> everyone, with the Send button.
    $b->fill('#text', $from_browser);
    $b->click('#send');
    ok($b->wait_for(has_line('.event.event-message', $from_browser, '.text'), 10),
       'browser shows its own message as a message event');
    my $line = message_line($from_browser) // {};
    is($line->{user}, $nick, '... with the sender name');
    like($line->{time} // '', qr/^\d\d:\d\d:\d\d$/, '... with a time from ts');
    is($line->{html_tags}, 0, '... and the text rendered as text, not HTML');
    like($line->{cls} // '', qr/\bmine\b/, '... marked as mine');
    is($b->evaluate('document.getElementById("text").value'), '', '#text is cleared after sending');

    my $m = $raw->wait_type('message', 10, sub { $_[0]{text} eq $from_browser });
    ok($m, 'raw client receives the browser message byte-for-byte');
    is($m && $m->{user}, $nick, '... from the browser user');
    is($m && $m->{room}, $room, '... in the room');

    # Raw client -> browser.
    $raw->send_text($from_raw);
    ok($b->wait_for(has_line('.event.event-message', $from_raw, '.text'), 10),
       'browser shows the raw client message');
    $line = message_line($from_raw) // {};
    is($line->{user}, $raw_nick, '... with the raw client name');
    is($line->{html_tags}, 0, '... as text');
    unlike($line->{cls} // '', qr/\bmine\b/, '... not marked as mine');

    # Enter sends.
    $b->fill('#text', $with_enter);
    $b->press_key('Enter');
    ok($raw->wait_type('message', 10, sub { $_[0]{text} eq $with_enter }),
       'Enter in #text sends the message');
    ok($b->wait_for(has_line('.event.event-message', $with_enter, '.text'), 10),
       '... and the browser shows it');

    # Every child of #log is one event element with its type class.
    is($b->evaluate('[...document.getElementById("log").children].filter(e =>'
        . ' !(e.classList.contains("event") && [...e.classList].some(c => /^event-[a-z]/.test(c)))).length'),
       0, 'every #log child has class event and event-<type>');

    # The raw client goes: the browser shows a leave line.
    $raw->send_close(1000, 'bye');
    ok($raw->is_closed_by_server(5), 'raw client closed');
    ok($b->wait_for('[...document.querySelectorAll("#log > .event-leave")].some(e =>'
        . ' (e.querySelector(".user") || {}).textContent === ' . js($raw_nick) . ')', 10),
       'browser shows the raw client leaving');

    my $bytes = $b->screenshot("$tmp/page.png");
    ok($bytes > 1000, "screenshot written to t/tmp/page.png ($bytes bytes)");
    $b->viewport(390, 760, 1, 2);
    $bytes = $b->screenshot("$tmp/page-phone.png");
    ok($bytes > 1000, "phone-width screenshot written to t/tmp/page-phone.png ($bytes bytes)");
    is($b->evaluate('document.documentElement.scrollWidth <= window.innerWidth'), JSON::PP::true,
       'no horizontal scrolling at phone width');
    $b->viewport(1000, 700);

    # A reload closes sessions (1001); the page reconnects by itself.
    my $welcomes = $b->evaluate('document.querySelectorAll("#log > .event-welcome").length');
    $nginx->reload(workers => 2);
    ok($b->wait_for('[...document.querySelectorAll("#log > .event-local")].some(e =>'
        . ' /disconnected: code \d+/.test(e.textContent))', 15),
       'browser shows the close code after nginx reload');
    like($b->evaluate('[...document.querySelectorAll("#log > .event-local")].map(e => e.textContent).join("|")'),
         qr/code 1001/, '... which is 1001');
    ok($b->wait_for('document.querySelectorAll("#log > .event-welcome").length > ' . $welcomes, 20),
       'browser reconnects and gets a new welcome');
    my $again = "after reconnect ↻";
    ok($b->wait_for('!document.getElementById("send").disabled', 5), 'composer enabled again');
    $b->fill('#text', $again);
    $b->click('#send');
    ok($b->wait_for(has_line('.event.event-message', $again, '.text'), 10),
       'sending works after the reconnect');

    # Leave: composer off, no reconnect.
    $b->click('#leave');
    ok($b->wait_for('document.getElementById("text").disabled && document.getElementById("status").dataset.state === "idle"', 5),
       'Leave disables the composer and shows not connected');

    my @errors = grep { /^exception/ } $b->console_lines;
    is(scalar @errors, 0, 'no uncaught JavaScript exceptions') or diag(join "\n", @errors);
}
