#!/usr/bin/perl
# The demo chat page (nginx/html/) in a real browser: headless Chromium driven
# over the Chrome DevTools Protocol (t/lib/Cdp.pm), against nginx with the
# module (2 workers), configured from the shipped nginx/demo.conf.in, and a
# private Redis. Four pages, each in its own browser context (own storage),
# chat in one room:
#
#   A  alice, joins through the form          B  bob, joins from ?room=&nick=
#   C  carol, joins later (history)           D  a second "alice" (session ids)
#
# and the test checks: members (welcome.members and join events, told apart
# by session id), who said what and when, messages rendered as text, history
# for a late joiner, URL + localStorage, auto-join on reload, a dropped
# connection that reconnects by itself (growing backoff) and shows each missed
# message exactly once (resume with since=<last id>), a gap note when more was
# missed than the history holds, nginx -s reload (1001) with every page back
# at once, a Redis outage (delivery interrupted; a message sent meanwhile
# stays "sending" until it is delivered), no horizontal scrolling at 375 px,
# and, on a second nginx with a rate limit and a 1k message limit, refusals
# and a 1009 close shown in words (the refused line marked, with Retry).
#
# Every step polls against a deadline. Screenshots (page.png, page-phone.png,
# page-history.png, page-refused.png, page-failure-<page>.png) go to
# t/tmp/page_browser-XXXXXX/, kept with TEST_CHAT_KEEP=1 or when a test fails,
# removed otherwise.
#
# How the test reaches the page's sockets: an init script (run before the
# page's own) wraps window.WebSocket to record every socket and URL, and while
# window.__wsTest.hold is set, points new sockets at a closed port (so a
# dropped page stays down while the others talk). The page itself is not
# changed for the test.
#
# Needs /usr/bin/chromium (Debian package chromium; TEST_CHROMIUM overrides);
# skipped without it (a failure under CI). Installs nothing.

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
use File::Path qw(make_path remove_tree);
use File::Temp ();
use Time::HiRes qw(time);

my $tb = Test::More->builder;
binmode $tb->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $JS = JSON::PP->new->ascii->allow_nonref;
sub js { $JS->encode("$_[0]") }
my $TRUE = JSON::PP::true;

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
my %nick = (A => 'alice ✿', B => 'bob 🐝', C => '<b>carol</b>', D => 'alice ✿');
my $xss = '<img src=x onerror=alert(1)>';

my $redis = start_redis();
my $rport = $redis->port;
# The Redis outage below drops both Redis connections of each worker.
my $nginx = start_nginx(demo_template(), redis => $redis,
    HTML => repo_root() . '/nginx/html', workers => 2,
    allow_errors => [qr/\[error\] \d+#\d+: websocket_chat: (?:subscriber|command) connection to Redis 127\.0\.0\.1:$rport lost: /]);
my $base = 'http://127.0.0.1:' . $nginx->port;
my $dead_port = free_port();    # nothing listens there: "held" sockets fail

my $tmp = repo_root() . '/t/tmp';
make_path($tmp);
my $out = File::Temp::tempdir('page_browser-XXXXXX', DIR => $tmp, CLEANUP => 0);

my $WRAP = <<"EOJS";
(() => {
  const Real = window.WebSocket;
  const t = window.__wsTest = { sockets: [], urls: [], times: [], hold: false };
  function W(url, protocols) {
    t.urls.push(String(url));
    t.times.push(Date.now());
    const u = t.hold ? 'ws://127.0.0.1:$dead_port/ws' : url;
    const s = protocols === undefined ? new Real(u) : new Real(u, protocols);
    t.sockets.push(s);
    return s;
  }
  W.prototype = Real.prototype;
  for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) W[k] = Real[k];
  window.WebSocket = W;
})();
EOJS

my ($b, %p);
my $ok = eval { run(); 1 };
ok($ok, 'browser scenario ran to the end') or diag($@);
if (!$ok) {
    for my $k (sort keys %p) {
        my $pg = $p{$k};
        eval { $pg->screenshot("$out/page-failure-$k.png"); diag("screenshot of page $k: $out/page-failure-$k.png") };
        eval { diag("page $k #log:\n" . ($pg->evaluate('document.getElementById("log").innerText') // '')) };
        eval { diag("page $k #status: " . ($pg->evaluate('document.getElementById("status").textContent') // '')) };
        eval { diag("page $k: $_") for $pg->console_lines };
    }
}
if ($b) {
    $_->close for map { $p{$_} } grep { $_ ne 'A' } sort keys %p;
    my $pid = $b->pid;
    $b->close;
    ok(!$pid || !kill(0, $pid), 'chromium is gone');
}
done_all();
if ($ENV{TEST_CHAT_KEEP} || !$tb->is_passing) {
    diag("screenshots in $out");
} else {
    remove_tree($out);
}

# ---------------------------------------------------------------------------
# JS snippets, evaluated in one page

sub ev { my ($k, $js) = @_; return $p{$k}->evaluate($js) }
sub wait_js { my ($k, $js, $t) = @_; return $p{$k}->wait_for($js, $t // 10) }

# Confirmed (not pending) message lines whose .text is exactly $text.
sub count_js {
    my $text = shift;
    return '[...document.querySelectorAll("#log > .event-message:not(.pending)")]'
         . '.filter(e => (e.querySelector(".text") || {}).textContent === ' . js($text) . ').length';
}
sub count { my ($k, $text) = @_; return ev($k, count_js($text)) }

# Is a line with this text still pending (sending, queued or failed)?
sub pending_js {
    my $text = shift;
    return '[...document.querySelectorAll("#log > .event-message.pending")]'
         . '.some(e => (e.querySelector(".text") || {}).textContent === ' . js($text) . ')';
}

# Does #log hold a line matching $sel whose text (less the time) is $text?
sub line_js {
    my ($sel, $text) = @_;
    return '[...document.querySelectorAll("#log > ' . $sel . '")].some(e =>'
         . ' [...e.childNodes].filter(n => !(n.classList && n.classList.contains("time")))'
         . '.map(n => n.textContent).join("").trim() === ' . js($text) . ')';
}

sub message_line {
    my ($k, $text) = @_;
    return ev($k, '(() => { const e = [...document.querySelectorAll("#log > .event-message:not(.pending)")]'
        . '.find(e => (e.querySelector(".text") || {}).textContent === ' . js($text) . ');'
        . ' if (!e) return null;'
        . ' return {cls: e.className, user: (e.querySelector(".user") || {}).textContent,'
        . ' time: (e.querySelector(".time") || {}).textContent, id: e.dataset.id || null,'
        . ' html_tags: e.querySelectorAll(".text *").length}; })()');
}

# The member list: [{user, you, session}].
sub members {
    my $k = shift;
    return ev($k, '[...document.querySelectorAll("#members > li")].map(li => ({'
        . ' user: (li.querySelector(".user") || {}).textContent, you: !!li.querySelector(".you"),'
        . ' session: li.dataset.session || null}))');
}
sub member_js {
    my ($user, $you) = @_;
    return '[...document.querySelectorAll("#members > li")].some(li =>'
         . ' (li.querySelector(".user") || {}).textContent === ' . js($user)
         . ' && !!li.querySelector(".you") === ' . ($you ? 'true' : 'false') . ')';
}

sub status_state { ev($_[0], 'document.getElementById("status").dataset.state') }
sub welcomes     { ev($_[0], 'document.querySelectorAll("#log > .event-welcome").length') }
sub sockets      { ev($_[0], 'window.__wsTest.sockets.length') }

# Type $text into #text and send it (Enter, or the Send button).
sub say {
    my ($k, $text, $how) = @_;
    $p{$k}->fill('#text', $text);
    if (($how // 'enter') eq 'click') { $p{$k}->click('#send') } else { $p{$k}->press_key('Enter') }
}

# Wait until every page in @ks shows $text exactly once, confirmed.
sub seen_everywhere {
    my ($text, $t, @ks) = @_;
    my $deadline = time + $t;
    my %n;
    for my $k (@ks) {
        wait_js($k, count_js($text) . ' >= 1', $deadline - time > 0.2 ? $deadline - time : 0.2);
        $n{$k} = count($k, $text);
    }
    return \%n;
}

sub new_page {
    my $k = shift;
    my $pg = $k eq 'A' ? $b : $b->new_context;
    $pg->add_init_script($WRAP);
    $pg->viewport(1000, 700);
    return $p{$k} = $pg;
}

sub join_query { '?room=' . urlencode($room) . '&nick=' . urlencode($_[0]) }

# Every message id shown at most once, and no line still pending.
sub ids_unique_js {
    '(() => { const ids = [...document.querySelectorAll("#log > .event-message[data-id]")].map(e => e.dataset.id);'
  . ' return ids.length === new Set(ids).size; })()'
}

sub run {
    # What this server sends (notes only; the page must cope either way).
    my $probe = WSClient->connect(port => $nginx->port, welcome => 1, timeout => 10,
        path => '/ws?room=' . urlencode("probe $$") . '&nick=probe');
    my $w = $probe->welcome;
    my $next = $probe->recv_json(2);
    note('server: welcome has ' . join(', ', sort grep { $_ ne 'type' } keys %$w)
       . '; next event: ' . ($next ? $next->{type} : 'none within 2s'));
    $probe->send_close(1000, 'bye');
    undef $probe;

    $b = Cdp->launch(tmp => $out);
    pass('chromium started and DevTools attached');

    # --- A: a first visit, joins through the form ----------------------------
    new_page('A');
    $p{A}->navigate("$base/");
    is(ev('A', 'document.getElementById("room").value'), 'lobby', 'A: #room defaults to lobby');
    is(ev('A', 'document.getElementById("nick").value'), '', 'A: #nick empty on a first visit');
    is(status_state('A'), 'idle', 'A: not connected before Join');
    is(ev('A', 'document.getElementById("text").disabled && document.getElementById("send").disabled'),
       $TRUE, 'A: #text and #send disabled before joining');
    is(ev('A', '!!document.querySelector("meta[name=viewport][content*=\'width=device-width\']")'),
       $TRUE, 'the page has a meta viewport');
    is(ev('A', '[...document.querySelectorAll("script[src], link[href], img[src]")]'
        . '.filter(e => new URL(e.src || e.href, location.href).origin !== location.origin'
        . ' && !/^data:/.test(e.src || e.href)).length'), 0, 'no external assets');

    $p{A}->fill('#nick', $nick{A});
    $p{A}->fill('#room', $room);
    $p{A}->click('#join');
    ok(wait_js('A', line_js('.event-welcome', "joined $room as $nick{A}"), 15),
       "A: welcome line 'joined $room as $nick{A}'") or die "no welcome on A\n";
    ok(wait_js('A', 'document.getElementById("status").dataset.state === "open"', 5), 'A: status connected');
    like(ev('A', 'document.getElementById("status").textContent'), qr/^connected\b/, '... and says so');
    is_deeply(ev('A', '(() => { const q = new URLSearchParams(location.search);'
        . ' return [q.get("room"), q.get("nick")]; })()'), [$room, $nick{A}],
       'A: room and nickname in the URL (history.replaceState)');
    is_deeply(ev('A', '[localStorage.getItem("wschat.room"), localStorage.getItem("wschat.nick")]'),
       [$room, $nick{A}], 'A: room and nickname in localStorage');

    # --- B: joins from the URL, without pressing Join ------------------------
    new_page('B');
    $p{B}->navigate("$base/" . join_query($nick{B}));
    ok(wait_js('B', line_js('.event-welcome', "joined $room as $nick{B}"), 15),
       'B: ?room=&nick= in the URL joins without pressing Join') or die "no welcome on B\n";

    ok(wait_js('A', member_js($nick{B}, 0), 10), 'A: member list shows B');
    ok(wait_js('A', member_js($nick{A}, 1), 2), 'A: member list shows A as (you)');
    ok(wait_js('B', member_js($nick{B}, 1), 5), 'B: member list shows B as (you)');
    # A joined first: B knows A only from welcome.members, if the server sends
    # it; otherwise from A's next join (below, when A reconnects).
    my $b_sees_a = wait_js('B', member_js($nick{A}, 0), 3);
    note('B does not list A: no welcome.members from this server; checked again after A rejoins')
        unless $b_sees_a;

    # --- messages ----------------------------------------------------------------
    my $m1 = 'héllo wörld — ñ 日本語 🚀 <b>not bold</b> & "quotes"';
    my $m2 = 'bonjour from B ✓ <i>x</i>';
    say('A', $m1, 'enter');
    is(ev('A', 'document.getElementById("text").value'), '', 'A: #text is cleared after Enter');
    say('B', $m2, 'click');
    my $n = seen_everywhere($m1, 10, qw(A B));
    is_deeply($n, { A => 1, B => 1 }, 'Enter sends: A\'s message shown once on A and on B');
    $n = seen_everywhere($m2, 10, qw(A B));
    is_deeply($n, { A => 1, B => 1 }, 'the Send button sends: B\'s message shown once on A and on B');
    my $l = message_line('A', $m1) // {};
    is($l->{user}, $nick{A}, 'A: own message with the sender name');
    like($l->{time} // '', qr/^\d\d:\d\d:\d\d$/, '... a time from ts');
    is($l->{html_tags}, 0, '... rendered as text, not HTML');
    like($l->{cls} // '', qr/\bmine\b/, '... marked as mine');
    ok(defined $l->{id}, '... with its id');
    $l = message_line('B', $m1) // {};
    unlike($l->{cls} // '', qr/\bmine\b/, 'B: A\'s message not marked as mine');
    is((message_line('A', $m2) // {})->{user}, $nick{B}, 'A: B\'s message with B\'s name');
    is(ev('A', 'document.querySelectorAll("#log > .pending").length'), 0, 'A: nothing left pending');

    # --- A's connection drops; B talks meanwhile; A comes back ----------------
    my $last = ev('A', '(() => { const m = [...document.querySelectorAll("#log > .event-message[data-id]")];'
        . ' return m.length ? m[m.length - 1].dataset.id : null; })()');
    my $before = welcomes('A');
    my $nsock = sockets('A');
    # A sends, and its connection drops at once, before the message is back:
    # after the reconnect it must be shown once (found in the history, or
    # sent again), neither lost nor doubled.
    my $cut = 'sent by A just as its connection dropped';
    $p{A}->fill('#text', $cut);
    my $t_drop = ev('A', '(() => { window.__wsTest.hold = true;'
        . ' document.getElementById("send").click();'
        . ' window.__wsTest.sockets[window.__wsTest.sockets.length - 1].close(); return Date.now(); })()');
    ok(wait_js('A', '/^reconnecting in \\d+s/.test(document.getElementById("status").textContent)'
        . ' && document.getElementById("status").dataset.state === "reconnecting"', 5),
       'A: connection dropped: status says reconnecting in Ns');
    my @missed = map { "missed while A was away $_/3" } 1 .. 3;
    for my $t (@missed) {
        say('B', $t);
        ok(wait_js('B', count_js($t) . ' === 1', 10), "B: '$t' delivered");
    }
    my $offline = 'typed by A while disconnected';
    say('A', $offline);
    ok(wait_js('A', '[...document.querySelectorAll("#log > .event-message.pending")].some(e =>'
        . ' e.querySelector(".text").textContent === ' . js($offline)
        . ' && /waiting|sending/.test(e.querySelector(".state").textContent))', 3),
       'A: a message typed while disconnected shows as pending');
    is(ev('A', count_js($missed[0])), 0, 'A: nothing from B while disconnected');
    ok(wait_js('A', 'window.__wsTest.sockets.length >= ' . ($nsock + 3), 5),
       'A: retries on its own');
    my $times = ev('A', 'window.__wsTest.times.slice(' . $nsock . ')');
    my @gaps = map { $times->[$_] - ($_ ? $times->[$_ - 1] : $t_drop) } 0 .. 2;
    ok($gaps[0] < 1000 && $gaps[1] <= $gaps[2] && $gaps[2] <= 2500,
       "A: ... with a growing backoff from about 250 ms (@gaps ms)");
    ev('A', 'window.__wsTest.hold = false; true');
    ok(wait_js('A', "document.querySelectorAll('#log > .event-welcome').length > $before", 15),
       'A: reconnects by itself') or die "A did not reconnect\n";
    my $url = ev('A', 'window.__wsTest.urls[window.__wsTest.urls.length - 1]');
    my ($since) = $url =~ /[?&]since=([^&]*)/;
    $since =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge if defined $since;
    is($since, $last, "A: resumes with since=<last shown id> ($last)");
    ok(wait_js('A', join(' && ', map { count_js($_) . ' >= 1' } @missed), 6),
       'A: resume: the messages sent while it was away are shown');
    ok(wait_js('A', count_js($offline) . ' === 1 && !' . pending_js($offline), 10),
       'A: the message typed while disconnected is sent and confirmed');
    ok(wait_js('B', count_js($offline) . ' === 1', 10), 'B: ... and B gets it once');
    ok(wait_js('A', count_js($cut) . ' === 1 && !' . pending_js($cut), 4),
       'A: the message sent as the connection dropped is shown once, confirmed');
    ok(wait_js('B', count_js($cut) . ' === 1', 5), 'B: ... and B gets it once');
    is_deeply([map { count('A', $_) } @missed], [1, 1, 1], 'A: ... each missed message exactly once');
    is_deeply([map { count('A', $_) } $m1, $m2], [1, 1],
              'A: earlier messages still shown once (no history duplicates)');
    is(ev('A', ids_unique_js()), $TRUE, 'A: no message id shown twice');
    is(ev('A', '(() => { const t = [...document.querySelectorAll("#log > .event-message")]'
        . '.map(e => e.querySelector(".text").textContent);'
        . ' const i = ' . $JS->encode(\@missed) . '.map(x => t.indexOf(x));'
        . ' return i[0] >= 0 && i[0] < i[1] && i[1] < i[2]; })()'), $TRUE, 'A: ... in order');

    # B knows A from welcome.members, or at least from A's join just now.
    ok($b_sees_a || wait_js('B', member_js($nick{A}, 0), 5),
       'B: member list shows A (from welcome.members or a join event)');

    # --- C: joins later; gets the history ---------------------------------------
    new_page('C');
    $p{C}->navigate("$base/" . join_query($nick{C}));
    ok(wait_js('C', line_js('.event-welcome', "joined $room as $nick{C}"), 15), 'C: joined')
        or die "no welcome on C\n";
    ok(wait_js('C', join(' && ', map { count_js($_) . ' === 1' } $m1, $m2, @missed, $offline, $cut), 5),
       'C: history: the messages sent before C joined are shown, once each');
    is(ev('C', '(() => { const t = [...document.querySelectorAll("#log > .event-message")]'
        . '.map(e => e.querySelector(".text").textContent);'
        . ' return t.indexOf(' . js($m1) . ') >= 0 && t.indexOf(' . js($m1) . ') < t.indexOf(' . js($m2) . '); })()'),
       $TRUE, 'C: ... oldest first');
    is((message_line('C', $m2) // {})->{user}, $nick{B}, 'C: ... with who said them');
    $p{C}->screenshot("$out/page-history.png");
    ok(wait_js('A', member_js($nick{C}, 0), 5), 'A: member list shows C (a name with markup, as text)');
    is(ev('A', 'document.querySelectorAll("#members b, #log .user b").length'), 0, '... not as HTML');

    # --- D: the same nickname as A --------------------------------------------
    new_page('D');
    $p{D}->navigate("$base/" . join_query($nick{D}));
    ok(wait_js('D', line_js('.event-welcome', "joined $room as $nick{D}"), 15), 'D: joined with A\'s nickname')
        or die "no welcome on D\n";
    my $two = '[...document.querySelectorAll("#members > li")].filter(li =>'
            . ' li.querySelector(".user").textContent === ' . js($nick{A}) . ').length === 2';
    ok(wait_js('A', $two, 3), 'A: two members named ' . $nick{A} . ' (told apart by session id)')
        or diag(explain(members('A')));
    my $yous = '[...document.querySelectorAll("#members > li")].filter(li => li.querySelector(".you")).length';
    is(ev('A', $yous), 1, 'A: exactly one member shown as (you)');
    ok(ev('A', '!!(document.querySelector("#members > li.me") || {dataset: {}}).dataset.session'),
       'A: its own member entry carries a session id (welcome.session)');
    is(ev('D', $yous), 1, 'D: exactly one member shown as (you)');
    my $m3 = 'I am the other alice';
    my $m4 = 'and I am the first one';
    say('D', $m3);
    ok(wait_js('A', count_js($m3) . ' === 1', 10), 'A: shows D\'s message');
    unlike((message_line('A', $m3) // {})->{cls} // '', qr/\bmine\b/,
           'A: D\'s message (same nickname, other session) not marked as mine');
    ok(wait_js('D', count_js($m3) . ' === 1', 5), 'D: shows its message');
    like((message_line('D', $m3) // {})->{cls} // '', qr/\bmine\b/, 'D: ... as mine');
    say('A', $m4);
    ok(wait_js('D', count_js($m4) . ' === 1', 10), 'D: shows A\'s message');
    unlike((message_line('D', $m4) // {})->{cls} // '', qr/\bmine\b/, 'D: A\'s message not marked as mine');

    # A page reload with room and nick in the URL joins again by itself.
    $p{D}->reload;
    ok(wait_js('D', line_js('.event-welcome', "joined $room as $nick{D}"), 15),
       'D: after a page reload it joins again without pressing Join');
    is(ev('D', 'document.getElementById("nick").value'), $nick{D}, 'D: ... with the nickname from the URL');

    # --- nginx -s reload: every page back at once -------------------------------
    my %w = map { $_ => welcomes($_) } qw(A B C D);
    my $t0 = time;
    $nginx->reload(workers => 2);
    my $t_reload = time - $t0;
    for my $k (qw(A B C D)) {
        ok(wait_js($k, "document.querySelectorAll('#log > .event-welcome').length > $w{$k}", 10),
           "$k: reconnects by itself after nginx -s reload");
    }
    my $took = time - $t0 - $t_reload;
    ok($took < 5, sprintf 'all pages back %.1fs after the reload finished (at once, not backoff)', $took);
    like(ev('A', '[...document.querySelectorAll("#log > .event-local")].map(e => e.textContent).join("|")'),
         qr/disconnected: code 1001/, 'A: the close was 1001');
    my $after = 'after the reload ↻';
    say('B', $after);
    $n = seen_everywhere($after, 10, qw(A B C D));
    is_deeply($n, { A => 1, B => 1, C => 1, D => 1 }, 'a message sent after the reload appears everywhere, once');
    for my $k (qw(A B C)) {
        is(ev($k, ids_unique_js()), $TRUE, "$k: no message id shown twice after the reload");
    }
    is_deeply([map { count('C', $_) } $m1, $m2, $m3, $m4, @missed], [1, 1, 1, 1, 1, 1, 1],
              'C: every message once after the reload');

    # --- a gap: C misses more than the history holds (100 by default) ---------
    my $raw = WSClient->join(port => $nginx->port, room => $room, nick => 'raw-flood', timeout => 10);
    my $wc = welcomes('C');
    ev('C', 'window.__wsTest.hold = true; window.__wsTest.sockets[window.__wsTest.sockets.length - 1].close(); true');
    ok(wait_js('C', 'document.getElementById("status").dataset.state === "reconnecting"', 5), 'C: dropped');
    my @flood = map { "flood $_/120" } 1 .. 120;
    $raw->send_text($_) for @flood;
    ok($raw->wait_type('message', 10, sub { $_[0]{text} eq $flood[-1] }), 'a raw client sends 120 messages');
    $raw->send_close(1000, 'bye');
    ev('C', 'window.__wsTest.hold = false; true');
    ok(wait_js('C', "document.querySelectorAll('#log > .event-welcome').length > $wc", 15), 'C: reconnects')
        or die "C did not reconnect\n";
    ok(wait_js('C', count_js($flood[-1]) . ' === 1', 5), 'C: shows the newest messages it missed');
    ok(wait_js('C', '!!document.querySelector("#log > .event-gap")', 2),
       'C: and a note that some were lost (gap)');
    is(ev('C', ids_unique_js()), $TRUE, 'C: no message id shown twice');

    # --- markup as text ---------------------------------------------------------
    say('C', $xss);
    $n = seen_everywhere($xss, 10, qw(A B C D));
    is_deeply($n, { A => 1, B => 1, C => 1, D => 1 }, "'$xss' shown as text everywhere");
    for my $k (qw(A B C D)) {
        is(ev($k, 'document.querySelectorAll("img").length'), 0, "$k: no img element");
        is(scalar(my @d = $p{$k}->take_dialogs), 0, "$k: no dialog opened");
    }

    # --- Redis outage: delivery interrupted, the message waits ---------------
    $redis->stop;
    ok(wait_js('A', 'document.getElementById("status").dataset.state === "interrupted"'
        . ' && /delivery interrupted/.test(document.getElementById("status").textContent)', 10),
       'A: Redis down: status says delivery interrupted');
    ok(wait_js('A', '!!document.querySelector("#log > .event-error[data-code=redis_unavailable]")', 2),
       'A: ... and a readable error line') and
    unlike(ev('A', 'document.querySelector("#log > .event-error[data-code=redis_unavailable]").textContent'),
           qr/[{}]|"code"/, '... not raw JSON');
    my $during = 'sent while Redis is down';
    say('A', $during);
    ok(wait_js('A', '(() => { const e = document.getElementById("log").lastElementChild;'
        . ' return e.classList.contains("pending") && e.querySelector(".text").textContent === ' . js($during)
        . ' && /sending/.test(e.querySelector(".state").textContent); })()', 3),
       'A: the message sent during the outage shows as sending, at the bottom');
    say('B', 'B during the outage');
    select(undef, undef, undef, 0.5);
    is(ev('A', count_js($during)), 0, 'A: ... still not confirmed while Redis is down');
    $redis->restart;
    ok(wait_js('A', 'document.getElementById("status").dataset.state === "open"', 15),
       'A: Redis back: status connected again (redis_available)');
    ok(wait_js('A', count_js($during) . ' === 1 && !' . pending_js($during), 10),
       'A: the message is confirmed, shown once');
    ok(wait_js('B', count_js($during) . ' === 1', 10), 'B: gets it once');
    ok(wait_js('A', count_js('B during the outage') . ' === 1', 10), 'A: gets B\'s outage message once');

    # --- screenshots; phone width -------------------------------------------
    say('B', 'a long unbroken word: ' . ('x' x 300));
    say('B', 'and a long link: http://example.com/' . join('/', map { "segment$_" } 1 .. 40));
    ok(wait_js('A', count_js('and a long link: http://example.com/' . join('/', map { "segment$_" } 1 .. 40)) . ' === 1', 10),
       'A: long lines arrived');
    my $bytes = $p{A}->screenshot("$out/page.png");
    ok($bytes > 1000, "screenshot $out/page.png ($bytes bytes)");
    $p{A}->viewport(375, 740, 1, 2);
    ok(wait_js('A', 'window.innerWidth === 375', 5), 'A: emulating a 375 px wide phone');
    is(ev('A', 'document.documentElement.scrollWidth <= 375 && document.body.scrollWidth <= 375'),
       $TRUE, 'A: no horizontal scrolling at 375 px (page)');
    is(ev('A', '[...document.querySelectorAll("#log, #members-panel, .bar, .join, .compose")]'
        . '.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.id || e.className).join(",")'),
       '', 'A: ... nor inside the log, member list, header or forms');
    ok(wait_js('A', '(() => { const l = document.getElementById("log");'
        . ' return l.scrollHeight - l.scrollTop - l.clientHeight < 2; })()', 2),
       'A: the log still shows its newest line after the resize');
    ev('A', 'document.getElementById("members-box").open = true; true');
    $bytes = $p{A}->screenshot("$out/page-phone.png");
    ok($bytes > 1000, "phone screenshot $out/page-phone.png ($bytes bytes)");
    $p{A}->viewport(1000, 700);

    # --- Leave --------------------------------------------------------------------
    $nsock = sockets('A');
    my $leaves = ev('B', 'document.querySelectorAll("#log > .event-leave").length');
    $p{A}->click('#leave');
    ok(wait_js('A', 'document.getElementById("text").disabled && document.getElementById("status").dataset.state === "idle"', 5),
       'A: Leave disables the composer and shows not connected');
    select(undef, undef, undef, 0.7);
    is(sockets('A'), $nsock, 'A: ... and does not reconnect');
    is(ev('A', 'new URLSearchParams(location.search).get("nick")'), undef,
       'A: ... and a reload would not join again (no nick in the URL)');
    ok(wait_js('B', "document.querySelectorAll('#log > .event-leave').length > $leaves", 5),
       'B: shows a member leaving');

    # --- refusals and policy closes, on a second nginx with limits -------------
    # (the same page and config, plus a rate limit and a small message limit)
    my $limited = demo_template();
    $limited =~ s/(websocket_chat_user \$arg_nick;)/$1\n            websocket_chat_rate 30r\/m burst=0;\n            websocket_chat_max_message 1k;/
        or die "cannot add limits to the demo template\n";
    my $nginx2 = start_nginx($limited, redis => $redis, HTML => repo_root() . '/nginx/html', workers => 1);
    my $base2 = 'http://127.0.0.1:' . $nginx2->port;
    $p{B}->navigate("$base2/?room=limits&nick=" . urlencode($nick{B}));
    ok(wait_js('B', line_js('.event-welcome', "joined limits as $nick{B}"), 15), 'B: joined a rate-limited room')
        or die "no welcome on B (limits)\n";
    say('B', 'first, accepted');
    say('B', 'second, too fast');
    ok(wait_js('B', '!!document.querySelector("#log > .event-error[data-code=rate_limited]")', 5),
       'B: rate_limited shown as an error line');
    like(ev('B', '(document.querySelector("#log > .event-error[data-code=rate_limited]") || {}).textContent'),
         qr/too fast/, '... in words');
    ok(wait_js('B', '[...document.querySelectorAll("#log > .event-message.failed")].some(e =>'
        . ' e.querySelector(".text").textContent === "second, too fast" && !!e.querySelector(".retry"))', 5),
       'B: the refused message is marked not sent, with Retry');
    ok(wait_js('B', count_js('first, accepted') . ' === 1', 5), 'B: the accepted one is shown');
    my $big = 'too long ' . ('y' x 1100);
    my $wb = welcomes('B');
    say('B', $big);
    ok(wait_js('B', '[...document.querySelectorAll("#log > .event-error")].some(e =>'
        . ' /closed the connection: .*1009/.test(e.textContent))', 5),
       'B: close 1009 shown with its reason');
    ok(wait_js('B', 'document.getElementById("status").dataset.state === "reconnecting"'
        . ' && /^closed: /.test(document.getElementById("status").textContent)', 2),
       'B: ... status says closed, reconnecting');
    ok(wait_js('B', "document.querySelectorAll('#log > .event-welcome').length > $wb", 10),
       'B: reconnects after the policy close');
    ok(wait_js('B', '[...document.querySelectorAll("#log > .event-message.failed")].some(e =>'
        . ' e.querySelector(".text").textContent === ' . js($big) . ')', 2),
       'B: the message too long stays marked not sent');
    select(undef, undef, undef, 1);
    $p{B}->screenshot("$out/page-refused.png");
    is(ev('B', '[...document.querySelectorAll("#log > .event-error")].filter(e =>'
        . ' /1009/.test(e.textContent)).length'), 1, 'B: ... and is not sent again by itself');
    $p{B}->evaluate('[...document.querySelectorAll("#log > .event-message.failed")].find(e =>'
        . ' e.querySelector(".text").textContent === "second, too fast").querySelector(".retry").click(); true');
    ok(wait_js('B', count_js('second, too fast') . ' === 1 && !' . pending_js('second, too fast'), 5),
       'B: Retry sends the refused message');

    is(ev('C', '[...document.getElementById("log").children].filter(e =>'
        . ' !(e.classList.contains("event") && [...e.classList].some(c => /^event-[a-z]/.test(c)))).length'),
       0, 'C: every #log child has class event and event-<type>');

    for my $k (qw(A B C D)) {
        my @errors = grep { /^exception/ } $p{$k}->console_lines;
        is(scalar @errors, 0, "$k: no uncaught JavaScript exceptions") or diag(join "\n", @errors);
    }
}
