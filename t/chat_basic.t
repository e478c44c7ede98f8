# Basic chat in one room: welcome first, join events, a message reaches every
# member including the sender with its text intact and the documented fields.
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use WSClient;

binmode Test::More->builder->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $redis = start_redis();
my $nginx = start_nginx(chat_config(), redis => $redis);
my $port = $nginx->port;

# Top-level keys of a flat JSON object, in order of appearance.
sub json_keys {
    my $t = shift;
    my @k;
    pos($t) = 0;
    return () unless $t =~ /\G\s*\{/gc;
    while (1) {
        $t =~ /\G\s*/gc;
        last unless $t =~ /\G"((?:[^"\\]|\\.)*)"\s*:\s*/gc;
        push @k, $1;
        if    ($t =~ /\G"(?:[^"\\]|\\.)*"/gc) { }
        elsif ($t =~ /\G[-+0-9.eE]+|\Gtrue|\Gfalse|\Gnull/gc) { }
        # An array of flat objects (welcome's members): skipped whole.
        elsif ($t =~ /\G\[(?:"(?:[^"\\]|\\.)*"|[^"\]])*\]/gc) { }
        else  { last }
        last unless $t =~ /\G\s*,/gc;
    }
    return @k;
}

sub ts_ok {
    my ($ev, $what) = @_;
    my $ts = $ev->{ts};
    ok(defined $ts && $ts =~ /^\d+$/ && abs($ts - now_ms()) < 60_000,
       "$what: ts is ms since epoch within a minute of now") or diag("ts = " . ($ts // 'undef'));
}

# --- alice joins: welcome is the first event, then her own join
my $alice = WSClient->join(port => $port, room => 'basic', nick => 'alice');
my $w = $alice->welcome;
is(scalar($alice->skipped), 0, 'welcome is the first event alice receives');
is($w->{type}, 'welcome', 'welcome type');
is($w->{room}, 'basic', 'welcome room');
is($w->{user}, 'alice', 'welcome user');
ts_ok($w, 'welcome');
is_deeply([json_keys($w->{_raw})], [qw(type room user session members count ts)], 'welcome key order');

my $j = $alice->wait_type('join', 5, sub { $_[0]{user} eq 'alice' });
ok($j, 'alice sees her own join');
is($j && $j->{room}, 'basic', 'join room');
ok($j && defined $j->{id} && !ref $j->{id} && length $j->{id}, 'join has a string id');
ts_ok($j // {}, 'join');
is_deeply([json_keys($j ? $j->{_raw} : '')], [qw(type room user session ts id)], 'join key order');

# --- bob joins: welcome first for him too, both see his join
my $bob = WSClient->join(port => $port, room => 'basic', nick => 'bob');
is(scalar($bob->skipped), 0, 'welcome is the first event bob receives');
ok($bob->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), 'bob sees his own join');
ok($alice->wait_type('join', 5, sub { $_[0]{user} eq 'bob' }), 'alice sees bob join');

# --- messages
my @texts = (
    'hello world',
    "emoji 😀🎉 and CJK 中文字符 日本語",
    q{quotes "double" 'single' and backslashes \ \\ \n (literal)},
    "newline\nsecond line\r\ncrlf and tab\there",
    "control \x01\x02\x1f chars and DEL \x7f",
    'slash </script> and unicode escape lookalike \\u0041',
    'x' x 300,
);
my %ids;
for my $i (0 .. $#texts) {
    my $text = $texts[$i];
    my $short = substr($text =~ s/[^\x20-\x7e]/./gr, 0, 30);
    ok($alice->send_text($text), "alice sends message $i ($short)");
    for my $c ([alice => $alice], [bob => $bob]) {
        my ($who, $cl) = @$c;
        my $m = $cl->wait_type('message', 5);
        ok($m, "$who receives message $i") or next;
        is($m->{text}, $text, "$who: text of message $i intact");
        is($m->{room}, 'basic', "$who: room");
        is($m->{user}, 'alice', "$who: user is the sender");
        ts_ok($m, "$who: message $i");
        ok(defined $m->{id} && !ref $m->{id} && length $m->{id}, "$who: id is a non-empty string");
        is_deeply([json_keys($m->{_raw})], [qw(type room user session text ts id)], "$who: message key order")
            if $i == 0;
        $ids{$who}[$i] = $m->{id};
    }
}
is_deeply($ids{alice}, $ids{bob}, 'both members saw the same message ids');
my %uniq = map { $_ => 1 } grep { defined } @{ $ids{alice} };
is(scalar keys %uniq, scalar @texts, 'message ids are unique');

# bob speaks too
$bob->send_text('from bob');
for my $c ([alice => $alice], [bob => $bob]) {
    my $m = $c->[1]->wait_type('message', 5);
    is($m && "$m->{user}:$m->{text}", 'bob:from bob', "$c->[0] receives bob's message");
}

$_->send_close(1000) for $alice, $bob;
ok($_->is_closed_by_server(5), 'closed after close handshake') for $alice, $bob;

done_all();
