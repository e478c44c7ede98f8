# websocket_chat_max_message: a text message longer than the limit (summed
# over fragments) closes the connection with 1009 before the whole message is
# buffered; a message of exactly the limit passes. Default limit 64k.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with websocket_chat_max_message 1k',
    chat_config(http => 'websocket_chat_max_message 1k;'), redis => $redis);

# Expect a close frame with $code and then the TCP connection closed.
sub closed_with {
    my ($c, $code, $name, $timeout) = @_;
    my $f = $c->recv_close($timeout // 5);
    is($f && $f->{close_code}, $code, "$name -> close code $code")
        or diag($f ? 'close payload: ' . unpack('H*', $f->{payload})
                   : $c->eof ? 'TCP closed without a close frame' : 'no close frame in time');
    ok($c->is_closed_by_server(5), "$name: server closes the TCP connection");
}

# $watcher receives a message of $len characters from $user.
sub check_room {
    my ($watcher, $user, $len, $name) = @_;
    my $m = $watcher->wait_type('message', 10, sub { $_[0]{user} eq $user });
    ok($m, "$name: another member receives the message") or return;
    is(length $m->{text}, $len, "$name: text length $len intact");
}

# A marker sent by $watcher arrives with no message from $user before it.
sub not_relayed {
    my ($watcher, $user, $name) = @_;
    $watcher->send_text("marker after $user");
    my $m = $watcher->wait_type('message', 10,
        sub { $_[0]{user} eq $user || $_[0]{user} eq 'watcher' });
    is($m && $m->{user}, 'watcher', "$name: nothing of it was relayed to the room")
        or diag($m ? "relayed: " . substr($m->{_raw}, 0, 100) : 'marker not received');
}

my $port = $nginx->port;
my $watcher = WSClient->join(port => $port, room => 'size', nick => 'watcher');

{
    my $c = WSClient->join(port => $port, room => 'size', nick => 'exact');
    ok($c->send_text('a' x 1024), 'send a 1024-byte message');
    check_room($watcher, 'exact', 1024, '1024 bytes with limit 1k');
    ok(!$c->got_close && !$c->eof, '1024 bytes: sender not closed');
    $c->send_close(1000);
}
{
    # 1024 bytes made of 512 two-byte characters: the limit counts bytes
    my $c = WSClient->join(port => $port, room => 'size', nick => 'exactutf8');
    $c->send_frame(opcode => 1, payload => "\xc3\xa9" x 512);
    my $m = $watcher->wait_type('message', 10, sub { $_[0]{user} eq 'exactutf8' });
    is($m && length($m->{text}), 512, '1024 bytes of UTF-8 (512 characters) pass');
    $c->send_close(1000);
}
{
    my $c = WSClient->join(port => $port, room => 'size', nick => 'over');
    $c->send_text('b' x 1025);
    closed_with($c, 1009, '1025-byte message with limit 1k');
    not_relayed($watcher, 'over', '1025-byte message');
}
{
    # three fragments of 400 bytes, the last one not final: the server must
    # close once the sum passes 1k, without waiting for the end of the message
    my $c = WSClient->join(port => $port, room => 'size', nick => 'fragover');
    $c->send_frame(opcode => 1, payload => 'c' x 400, fin => 0);
    $c->send_frame(opcode => 0, payload => 'c' x 400, fin => 0);
    $c->send_frame(opcode => 0, payload => 'c' x 400, fin => 0);
    closed_with($c, 1009, 'fragments summing to 1200 bytes (message not finished)');
    not_relayed($watcher, 'fragover', 'fragmented oversized message');
}
{
    # fragments whose sum is exactly 1024 pass
    my $c = WSClient->join(port => $port, room => 'size', nick => 'fragexact');
    $c->send_frame(opcode => 1, payload => 'd' x 500, fin => 0);
    $c->send_frame(opcode => 0, payload => 'd' x 500, fin => 0);
    $c->send_frame(opcode => 0, payload => 'd' x 24, fin => 1);
    check_room($watcher, 'fragexact', 1024, 'fragments summing to exactly 1024 bytes');
    $c->send_close(1000);
}
{
    # only the header of a frame declaring 10 MB: the answer must come
    # without the payload being sent
    my $c = WSClient->join(port => $port, room => 'size', nick => 'huge');
    my $hdr = WSClient::frame_bytes(opcode => 1, payload => '', declared_len => 10 * 1024 * 1024);
    is(length $hdr, 14, 'header of a 10 MB masked frame is 14 bytes');
    my $t0 = time;
    $c->send_raw($hdr);
    closed_with($c, 1009, 'frame header declaring 10 MB (payload never sent)');
    my $dt = time - $t0;
    ok($dt < 3, sprintf('1009 for the 10 MB frame came without waiting for its payload (%.2fs)', $dt));
    not_relayed($watcher, 'huge', '10 MB frame');
}
{
    # a first fragment declaring 2k with the limit 1k
    my $c = WSClient->join(port => $port, room => 'size', nick => 'fraghdr');
    $c->send_frame(opcode => 1, payload => 'e' x 100, fin => 0);
    $c->send_raw(WSClient::frame_bytes(opcode => 0, payload => '', declared_len => 2048, fin => 1));
    closed_with($c, 1009, 'continuation header declaring 2048 bytes after 100');
}

$watcher->send_close(1000);

# --- default limit: 64k
my $nginx2 = start_nginx(chat_config(), redis => $redis);
{
    my $w = WSClient->join(port => $nginx2->port, room => 'size64', nick => 'watcher');
    my $c = WSClient->join(port => $nginx2->port, room => 'size64', nick => 'big');
    ok($c->send_text('f' x 65536), 'send a 65536-byte message (default limit)');
    check_room($w, 'big', 65536, '65536 bytes with the default limit');
    my $own = $c->wait_type('message', 10, sub { $_[0]{user} eq 'big' });
    is($own && length($own->{text}), 65536, 'sender receives its 65536-byte message');

    my $o = WSClient->join(port => $nginx2->port, room => 'size64', nick => 'bigger');
    $o->send_text('g' x 65537);
    closed_with($o, 1009, '65537-byte message with the default limit');
    not_relayed($w, 'bigger', '65537-byte message');
    $_->send_close(1000) for $w, $c;
}

done_all();
