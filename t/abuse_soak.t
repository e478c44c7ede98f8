# A bounded soak of hostile clients: 600 connections (seeded, so a failure
# can be replayed) that send garbage after a valid handshake, random frames
# (bad opcodes, unmasked, RSV bits, fragments, oversized), cut handshakes,
# or floods, and then leave. No worker may crash, no room may stay
# subscribed, and a fresh client must chat normally afterwards. Half of them
# go to a location that frees the HTTP request after the upgrade
# (websocket_chat_access_log upgrade).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Test::More;
use ChatTest;
use WSClient;

# Cutting a flooding client off is an error-level line, as nginx's limit_req is.
ChatTest::allow_errors_in_file(qr/: closing session of "[^"]*" in "[^"]*": 1008 rate limit exceeded, client: /);

my $seed = $ENV{SOAK_SEED} // 20261126;
srand($seed);
diag("seed $seed (SOAK_SEED=$seed reproduces this run)");

my $redis = start_redis();
my $limits = "websocket_chat_max_message 4k;\n            websocket_chat_rate 50r/s burst=50;";
my $nginx = start_nginx(chat_config(workers => 2, location => "            $limits\n",
    server => <<"EOT"), redis => $redis);
        location = /wsu {
            websocket_chat;
            websocket_chat_room \$arg_room;
            websocket_chat_access_log upgrade;
            $limits
        }
EOT
my $port = $nginx->port;
my @workers = sort { $a <=> $b } $nginx->worker_pids;

sub bytes { join '', map { chr int rand 256 } 1 .. shift }

sub frame {
    my (%o) = @_;
    WSClient->frame_bytes(opcode => $o{opcode}, payload => $o{payload},
                          fin => $o{fin}, mask => $o{mask}, rsv => $o{rsv});
}

my @rooms = ('a', 'b', 'c%FF', 'x' x 70, '', 'sp%20ace');
my $deadline = time + 40;
my $sent = 0;
for my $i (1 .. 600) {
    last if time > $deadline;
    my ($req) = WSClient::handshake_request(port => $port,
        path => (rand() < 0.5 ? '/ws' : '/wsu') . '?room=' . $rooms[rand @rooms]);
    my $data = $req;
    my $kind = rand;
    if ($kind < 0.3) {
        $data .= bytes(1 + int rand 3000);
    } elsif ($kind < 0.6) {
        for (1 .. 1 + int rand 30) {
            $data .= frame(opcode => (0, 1, 2, 8, 9, 10, 3, 11)[rand 8],
                           payload => bytes(int rand 200), fin => rand() < 0.8 ? 1 : 0,
                           mask => rand() < 0.9 ? 1 : 0, rsv => rand() < 0.25 ? 4 : 0);
        }
    } elsif ($kind < 0.8) {
        $data = substr($data, 0, 1 + int rand length $data);
    } else {
        $data .= join '', map { frame(opcode => 1, payload => "m$_" x (1 + int rand 50), fin => 1, mask => 1, rsv => 0) } 1 .. 200;
    }
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 2) or next;
    defined syswrite($s, $data) and $sent++;
    if (rand() < 0.5) {
        my $sel = IO::Select->new($s);
        sysread($s, my $buf, 65536) if $sel->can_read(0.02);
    }
    close $s;
}
cmp_ok($sent, '>=', 300, "hostile connections sent their bytes ($sent)");

is_deeply([sort { $a <=> $b } $nginx->worker_pids], \@workers,
          'the same workers are still running: none crashed');

for my $location ('/ws', '/wsu') {
    my $c = WSClient->join(port => $port, room => 'after', nick => 'calm', location => $location);
    $c->send_text('still fine');
    my $ev = $c->wait_for(sub { $_[0]{type} eq 'message' }, 5);
    is($ev && $ev->{text}, 'still fine', "a fresh client on $location chats normally afterwards");
    $c->disconnect;
}

# Every hostile session left its room: no channel stays subscribed.
my $left;
my $until = time + 10;
while (time < $until) {
    $left = $redis->cmd('PUBSUB', 'CHANNELS', 'wschat:*');
    last unless @$left;
    select(undef, undef, undef, 0.1);
}
is_deeply($left, [], 'no room stays subscribed once everyone has gone');

$nginx->stop;
$redis->stop;
done_testing;
