# websocket_chat_ping_interval / websocket_chat_idle_timeout: a silent client
# gets a ping after ping_interval; a client answering pings stays connected;
# one that never answers is closed with 1001 "idle timeout" after
# idle_timeout and the TCP connection is closed.
# (ping 1s, idle 3s; deadlines are generous, timing is measured from the
# moment the welcome event arrived.)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;

my $redis = start_redis();
my $nginx = start_nginx_ok('nginx starts with ping_interval 1s, idle_timeout 3s',
    chat_config(http => "websocket_chat_ping_interval 1s;\n    websocket_chat_idle_timeout 3s;"),
    redis => $redis);
my $port = $nginx->port;

# Both clients run side by side in one polling loop.
my $silent = WSClient->join(port => $port, room => 'idle', nick => 'silent', auto_pong => 0);
my $t_silent = time;
my $alive = WSClient->join(port => $port, room => 'idle', nick => 'alive', auto_pong => 0);
my $t_alive = time;

my (%first_ping, %pings, %close, %eof, %other);
my %cl = (silent => $silent, alive => $alive);
my %t0 = (silent => $t_silent, alive => $t_alive);
my $deadline = time + 7.5;
while (time < $deadline) {
    for my $who (qw(silent alive)) {
        my $c = $cl{$who};
        next if $eof{$who};
        for my $f ($c->pending_frames(0.02)) {
            my $at = time - $t0{$who};
            if ($f->{opcode} == 9) {
                $first_ping{$who} //= $at;
                push @{ $pings{$who} }, $at;
                $c->send_pong($f->{payload}) if $who eq 'alive';
            } elsif ($f->{opcode} == 8) {
                $close{$who} //= { %$f, at => $at };
            } else {
                $other{$who}++;
            }
        }
        $eof{$who} = time - $t0{$who} if $c->eof && !defined $eof{$who};
    }
    last if $eof{silent} && time - $t_alive > 5;
}

note(sprintf '%s: pings at %s; close at %s; TCP closed at %s', $_,
     join(', ', map { sprintf '%.2fs', $_ } @{ $pings{$_} // [] }) || 'none',
     $close{$_} ? sprintf('%.2fs (code %s)', $close{$_}{at}, $close{$_}{close_code} // 'none') : 'none',
     defined $eof{$_} ? sprintf('%.2fs', $eof{$_}) : 'never') for qw(silent alive);

# --- silent client: ping within ~1-2s
ok(defined $first_ping{silent}, 'silent client receives a ping');
ok(defined $first_ping{silent} && $first_ping{silent} >= 0.7 && $first_ping{silent} <= 2.5,
   'first ping after ~1s of silence (0.7s..2.5s)')
    or diag('first ping at ' . ($first_ping{silent} // 'never'));

# --- never answering: closed with 1001 "idle timeout" after ~3s
my $cs = $close{silent};
ok($cs, 'client that never answers gets a close frame');
is($cs && $cs->{close_code}, 1001, 'idle close code 1001');
is($cs && $cs->{close_reason}, 'idle timeout', 'idle close reason "idle timeout"');
ok($cs && $cs->{at} >= 2.5 && $cs->{at} <= 5.5, 'idle close after ~3s (2.5s..5.5s)')
    or diag('close at ' . ($cs ? $cs->{at} : 'never'));
ok(defined $eof{silent} && $eof{silent} <= 7.5, 'server closes the TCP connection of the idle client')
    or diag('TCP closed at ' . ($eof{silent} // 'never (within 7.5s)'));

# --- answering pings: still open after more than 4s
ok(time - $t_alive > 4, 'answering client observed for more than 4s');
ok(!$close{alive} && !defined $eof{alive}, 'client that answers pings is not closed')
    or diag('close: ' . ($close{alive} ? $close{alive}{close_code} // 'empty' : 'none')
            . ', eof: ' . ($eof{alive} // 'no'));
ok(@{ $pings{alive} // [] } >= 2, 'answering client gets repeated pings (' . scalar(@{ $pings{alive} // [] }) . ')');
$alive->send_text('still here');
my $m = $alive->wait_type('message', 5, sub { $_[0]{user} eq 'alive' });
is($m && $m->{text}, 'still here', 'answering client can still chat');

# --- a client that keeps sending messages (no pongs) is not idle either
{
    my $talker = WSClient->join(port => $port, room => 'idle2', nick => 'talker', auto_pong => 0);
    my $t0 = time;
    my ($closed, $sent) = (0, 0);
    my $next = time;
    while (time - $t0 < 4.5) {
        if (time >= $next) { $talker->send_text('tick ' . $sent++); $next += 0.5 }
        for my $f ($talker->pending_frames(0.05)) { $closed = 1 if $f->{opcode} == 8 }
        last if $closed || $talker->eof;
    }
    ok(!$closed && !$talker->eof, "client sending a message every 0.5s (no pongs) stays open past 4s ($sent sent)");
    $talker->send_close(1000);
}

$alive->send_close(1000);
ok($alive->is_closed_by_server(5), 'answering client closes normally');
done_all();
