# Room and nickname rules. Room (after URL-decoding): valid UTF-8, 1-64
# characters, no control characters, no leading/trailing whitespace, else
# the handshake gets 400; empty/unset -> "lobby". Nickname: URL-decoded,
# invalid UTF-8 replaced by U+FFFD, control characters removed, trimmed,
# capped at 32 characters; empty after that -> guest-NNNN. The sanitised
# nickname is checked in the welcome event's user field.
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

# Handshake with the raw (already percent-encoded) query string $q.
sub handshake_status {
    my $q = shift;
    my ($req) = WSClient::handshake_request(port => $port, path => "/ws?$q");
    my ($st, $h, $raw, $sock) = WSClient::raw_handshake($port, $req);
    close $sock if $sock;
    return ($st, $h, $raw);
}

sub room_rejected {
    my ($name, $q) = @_;
    my ($st, $h, $raw) = handshake_status($q);
    is($st, 400, "room $name -> 400") or diag("response:\n" . substr($raw // '', 0, 300));
    ok(!defined $h->{'sec-websocket-accept'}, "room $name: no upgrade");
}

# Join with raw query $q; returns the welcome event (or undef).
sub welcome_for {
    my ($q) = @_;
    my $c = eval { WSClient->connect(port => $port, path => "/ws?$q", welcome => 1) };
    diag("join with ?$q failed: $@") unless $c;
    return undef unless $c;
    my $w = $c->welcome;
    $c->send_close(1000);
    return $w;
}

sub room_ok {
    my ($name, $room) = @_;
    my $w = welcome_for('room=' . WSClient::uri_escape($room) . '&nick=n');
    is($w && $w->{room}, $room, "room $name accepted, welcome carries it");
}

# --- rooms
room_ok('of 64 ASCII characters', 'r' x 64);
room_rejected('of 65 ASCII characters', 'room=' . ('r' x 65));
room_ok('of 64 two-byte characters (128 bytes)', 'é' x 64);
room_rejected('of 65 two-byte characters', 'room=' . ('%C3%A9' x 65));
room_ok('of 64 four-byte characters', "\x{1F600}" x 64);
room_ok('"café ☕"', 'café ☕');
room_ok('with inner spaces', 'a b  c');
room_rejected('with a control character (%01)', 'room=ab%01cd');
room_rejected('with a newline (%0A)', 'room=ab%0Acd');
room_rejected('with a tab (%09)', 'room=ab%09cd');
room_rejected('with DEL (%7F)', 'room=ab%7Fcd');
room_rejected('with a C1 control character (U+0085)', 'room=ab%C2%85cd');
room_rejected('with invalid UTF-8 (%FF)', 'room=ab%FFcd');
room_rejected('with a truncated UTF-8 sequence', 'room=ab%E2%82');
room_rejected('with an overlong UTF-8 encoding', 'room=%C0%AF');
room_rejected('with a leading space', 'room=%20lead');
room_rejected('with a trailing space', 'room=trail%20');
room_rejected('with a leading tab', 'room=%09lead');
room_rejected('with a leading no-break space (U+00A0)', 'room=%C2%A0lead');
room_rejected('of only spaces', 'room=%20%20%20');
{
    my $w = welcome_for('nick=n');
    is($w && $w->{room}, 'lobby', 'no room -> lobby');
    $w = welcome_for('room=&nick=n');
    is($w && $w->{room}, 'lobby', 'empty room -> lobby');
}

# --- nicknames
sub nick_is {
    my ($name, $q, $want) = @_;
    my $w = welcome_for("room=names&nick=$q");
    if (ref $want) {
        like($w && $w->{user}, $want, "nickname $name");
    } else {
        is($w && $w->{user}, $want, "nickname $name -> \"$want\"");
    }
}

nick_is('plain', 'alice', 'alice');
nick_is('with control characters', 'al%01i%7Fc%1Fe', 'alice');
nick_is('with a newline and a tab inside', 'bo%0Ab%09by', 'bobby');
nick_is('with surrounding spaces', '%20%20carol%20%20', 'carol');
nick_is('with spaces around and inner spaces', '%20dan%20the%20man%20', 'dan the man');
nick_is('with control characters around spaces', '%20%01%20eve%02%20%03', 'eve');
nick_is('of 40 characters', 'n' x 40, 'n' x 32);
nick_is('of 32 characters', 'm' x 32, 'm' x 32);
nick_is('of 40 two-byte characters', '%C3%A9' x 40, 'é' x 32);
nick_is('of 40 characters after leading spaces', ('%20' x 5) . ('k' x 40), 'k' x 32);
nick_is('with invalid UTF-8', 'bo%FFb', "bo\x{FFFD}b");
nick_is('"José ☕"', WSClient::uri_escape('José ☕'), 'José ☕');
nick_is('of only spaces', '%20%20%20%20', qr/^guest-\d{4}\z/);
nick_is('of only control characters', '%01%02%03', qr/^guest-\d{4}\z/);
nick_is('of spaces and control characters', '%20%01%20%09%20', qr/^guest-\d{4}\z/);
nick_is('empty', '', qr/^guest-\d{4}\z/);

# the sanitised nickname is also the one in the message events
{
    my $c = WSClient->connect(port => $port, path => '/ws?room=names2&nick=%20%01zed%20', welcome => 1);
    $c->send_text('hi');
    my $m = $c->wait_type('message', 5);
    is($m && $m->{user}, 'zed', 'message event carries the sanitised nickname');
    $c->send_close(1000);
}

done_all();
