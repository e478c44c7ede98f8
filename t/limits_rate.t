# websocket_chat_rate 5r/s burst=5: a token bucket like limit_req. A message
# over the limit is not published and its sender gets a "rate_limited" error
# event; after 10 rejected messages in a row the client is closed with 1008
# "rate limit exceeded"; an accepted message resets that count; a client
# sending 2 messages/s is never limited.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

# Cutting a flooding client off is an error-level line, as nginx's limit_req is.
ChatTest::allow_errors_in_file(qr/: closing session of "flood" in "rate": 1008 rate limit exceeded, client: /);

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with websocket_chat_rate 5r/s burst=5',
    chat_config(http => 'websocket_chat_rate 5r/s burst=5;'), redis => $redis);
my $port = $nginx->port;
my $ROOM = 'rate';

my $obs = WSClient->join(port => $port, room => $ROOM, nick => 'obs');

# Messages from $user the observer received, in order, up to a marker the
# observer sends now (Redis keeps the order of publications).
my $marker_no = 0;
sub observed_from {
    my $user = shift;
    my $marker = 'marker-' . ++$marker_no;
    $obs->send_text($marker);
    my @got;
    while (my $m = $obs->wait_type('message', 10)) {
        last if $m->{user} eq 'obs' && $m->{text} eq $marker;
        push @got, $m->{text} if $m->{user} eq $user;
    }
    return @got;
}

# Pace: let time pass until $t (this is the rate being tested, not a way to
# wait for the server).
sub pace_until {
    my $t = shift;
    my $d = $t - time;
    select(undef, undef, undef, $d) if $d > 0;
}

# Send $text and wait for its outcome: 'accepted' (own message event came
# back), 'rejected' (rate_limited error event), 'closed' (close frame or
# EOF) or 'timeout'. Error events are collected in @$errors.
sub send_one {
    my ($c, $me, $text, $errors) = @_;
    return 'closed' if $c->got_close || $c->eof;
    $c->send_text($text) or return 'closed';
    my $ev = $c->wait_for(sub {
        ($_[0]{type} eq 'message' && $_[0]{user} eq $me && $_[0]{text} eq $text)
        || $_[0]{type} eq 'error'
    }, 5);
    return ($c->got_close || $c->eof) ? 'closed' : 'timeout' unless $ev;
    return 'accepted' if $ev->{type} eq 'message';
    push @$errors, $ev;
    return 'rejected';
}

sub error_ok {
    my ($ev, $name) = @_;
    is($ev->{code}, 'rate_limited', "$name: error code rate_limited");
    is($ev->{room}, $ROOM, "$name: error carries the room");
    ok(defined $ev->{message} && !ref $ev->{message} && length $ev->{message},
       "$name: error has a message text");
    ok(($ev->{ts} // '') =~ /^\d+$/ && abs($ev->{ts} - now_ms()) < 60_000, "$name: error ts");
    like($ev->{_raw}, qr/^\{"type":"error","room":.*,"code":.*,"message":.*,"ts":\d+\}$/s,
         "$name: error key order type, room, code, message, ts");
}

# --- 1. a client pacing 2 messages/s is never limited (runs first so that
# the bucket is fresh even if it were shared between connections)
{
    my $c = WSClient->join(port => $port, room => $ROOM, nick => 'paced');
    my (@errors, @outcome);
    my $t0 = time;
    for my $i (1 .. 8) {
        pace_until($t0 + ($i - 1) * 0.5);
        push @outcome, send_one($c, 'paced', "paced $i", \@errors);
    }
    is_deeply(\@outcome, [('accepted') x 8], 'paced client (2 msg/s): all 8 messages accepted')
        or diag("outcomes: @outcome");
    is(scalar @errors, 0, 'paced client got no error event');
    is_deeply([observed_from('paced')], [map { "paced $_" } 1 .. 8],
              'observer received all 8 paced messages in order');
    $c->send_close(1000);
    ok($c->is_closed_by_server(5), 'paced client closed normally');
}

# --- 2. a quick burst: the first ones are published, later ones rejected
{
    my $c = WSClient->join(port => $port, room => $ROOM, nick => 'burst');
    my @texts = map { "burst $_" } 1 .. 8;
    $c->send_raw(join '', map { WSClient::frame_bytes(opcode => 1, payload => $_) } @texts);
    my (@mine, @errors);
    wait_until(sub {
        my $ev = $c->recv_json(0.1) or return $c->got_close || $c->eof;
        push @mine, $ev->{text} if $ev->{type} eq 'message' && $ev->{user} eq 'burst';
        push @errors, $ev if $ev->{type} eq 'error';
        return @mine + @errors >= 8;
    }, 10, 0);
    my $k = @mine;
    note("burst of 8: $k accepted, " . scalar(@errors) . ' rejected');
    ok($k >= 5 && $k <= 6, "burst of 8 quick messages: 5 or 6 accepted (burst=5), got $k");
    is_deeply(\@mine, [@texts[0 .. $k - 1]], 'the accepted ones are the first ones, in order');
    is(scalar @errors, 8 - $k, 'one rate_limited error event per rejected message');
    ok(@errors >= 1, 'a later message of the burst is rejected');
    error_ok($errors[0], 'first rejection') if @errors;
    ok(!(grep { $_->{type} eq 'error' && ($_->{code} // '') ne 'rate_limited' } $c->events),
       'no other error codes');
    is_deeply([observed_from('burst')], [@texts[0 .. $k - 1]],
              'observer received exactly the accepted messages (rejected ones not delivered)');
    ok(!$c->got_close && !$c->eof, 'burst client not closed after fewer than 10 rejections');
    $c->send_close(1000);
    ok($c->is_closed_by_server(5), 'burst client closed normally');
}

# --- 3. 10 rejected in a row -> 1008; an accepted message resets the count
{
    my $c = WSClient->join(port => $port, room => $ROOM, nick => 'flood');
    my (@errors, @accepted, $run, $closed_at);
    my $n = 0;

    # phase A: quick messages until 9 rejected in a row
    $run = 0;
    while ($n < 40 && $run < 9) {
        my $o = send_one($c, 'flood', 'flood ' . ++$n, \@errors);
        if    ($o eq 'accepted') { push @accepted, "flood $n"; $run = 0 }
        elsif ($o eq 'rejected') { $run++ }
        else  { $closed_at = "phase A, message $n ($o) after $run rejections in a row"; last }
    }
    is($run, 9, 'phase A: 9 rejections in a row, connection still open')
        or diag($closed_at // "run $run after $n messages");
    error_ok($errors[-1], 'ninth rejection') if @errors;

    # phase B: after 0.5s (2.5 tokens at 5r/s) a message is accepted again
    pace_until(time + 0.5);
    my $o = send_one($c, 'flood', 'flood ' . ++$n, \@errors);
    is($o, 'accepted', 'phase B: after a pause a message is accepted again');
    push @accepted, "flood $n" if $o eq 'accepted';

    # phase C: quick messages until the server closes; the count of
    # rejections in a row started again at 0
    $run = 0;
    my $sent_in_run = 0;
    my $outcome = '';
    while ($n < 80) {
        $o = send_one($c, 'flood', 'flood ' . ++$n, \@errors);
        if    ($o eq 'accepted') { push @accepted, "flood $n"; $run = 0; $sent_in_run = 0 }
        elsif ($o eq 'rejected') { $run++; $sent_in_run++ }
        else  { $sent_in_run++; $outcome = $o; last }
    }
    is($outcome, 'closed', 'phase C: the server closes the flooding client');
    # Either the 10th rejected message got its error event and then the
    # close (10 errors), or it got the close instead (9 errors, 10 sent).
    ok($run == 10 || ($run == 9 && $sent_in_run == 10),
       'closed at the 10th rejection in a row (not earlier: the accepted message reset the count)')
        or diag("rejections in a row with an error event: $run; messages sent in the run: $sent_in_run");
    my $f = $c->recv_close(5);
    $f //= { close_code => $c->close_code, close_reason => $c->close_reason } if $c->got_close;
    is($f && $f->{close_code}, 1008, 'flooding client closed with 1008');
    is($f && $f->{close_reason}, 'rate limit exceeded', 'close reason "rate limit exceeded"');
    ok($c->is_closed_by_server(5), 'server closes the flooding client\'s TCP connection');
    is_deeply([observed_from('flood')], \@accepted,
              'observer received exactly the accepted messages of the flooding client');
}

$obs->send_close(1000);
ok($obs->is_closed_by_server(5), 'observer closed');
done_all();
