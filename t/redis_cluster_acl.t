# README "Operations" -> "Redis Cluster": the least ACL user on a cluster is
# the README's "ACL SETUSER chat" line (read from README.md at run time, as
# t/redis_acl_contract.t does) without +select, plus the commands the
# Cluster paragraph lists. Created on each of 3 primaries (ACLs are per
# node), used by nginx as cluster=redis://chat:secret@..., with history and
# presence on, prefix chat-prod:, 2 workers: in a room on each shard members
# get a welcome listing them, each other's messages, a later joiner's
# history, and leave events; afterwards ACL LOG is empty on every node (no
# command the module ran was refused).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use ChatTest;
use ChatCluster;
use ChatIds;
use WSClient;

my $PREFIX = 'chat-prod:';

# The README's words: the ACL line's block, and the Cluster paragraph's list.
my $readme = do {
    open my $fh, '<', repo_root() . '/README.md' or die "README.md: $!";
    local $/;
    <$fh>;
};
my ($line) = $readme =~ /^\s*```\n\s*(ACL SETUSER chat [^\n]*)\n\s*```/m;
ok($line, 'README: the "ACL SETUSER chat" line') or BAIL_OUT('no ACL line in README.md');
my ($extra) = $readme =~ /The ACL needs, beyond the line above, `([^`]+)`\s+\(and no\s+`\+select`\)/;
ok($extra, 'README: the commands a cluster adds to it') or BAIL_OUT('no cluster ACL words in README.md');
my @acl = split ' ', $line;
splice(@acl, 0, 2);    # ACL SETUSER
@acl = ((grep { $_ ne '+select' } @acl), split(' ', $extra));
note("cluster ACL: ACL SETUSER @acl");

my $cl = ChatCluster->start(primaries => 3);
my @primaries = $cl->primaries;
for my $p (@primaries) {
    is($p->cmd('ACL', 'SETUSER', @acl), 'OK', 'node ' . $p->port . ' accepts the ACL line');
    $p->cmd('ACL', 'LOG', 'RESET');
}

# One room per primary, for this prefix.
my %room_on;
for (my $i = 0; keys(%room_on) < @primaries && $i < 1000; $i++) {
    my $owner = $cl->node_for_slot($cl->slot_of("$PREFIX\{acl$i\}"))->port;
    $room_on{$owner} //= "acl$i";
}
is(scalar(keys %room_on), scalar(@primaries), 'a room on each primary');
my @rooms = map { $room_on{ $_->port } } @primaries;

my $seeds = join ',', map { '127.0.0.1:' . $_->port } @primaries;
my $nginx = start_nginx_ok('nginx starts as the ACL user on the cluster', chat_config(
    workers => 2,
    listen  => 'reuseport',
    redis   => "cluster=redis://chat:secret\@$seeds",
    http    => "    websocket_chat_channel_prefix $PREFIX;\n",
), workers => 2);

for my $room (@rooms) {
    my @m = map { WSClient->join(port => $nginx->port, room => $room, nick => "u$_") } 1 .. 3;
    my @listed = map { $_->{user} } @{ $m[2]->welcome->{members} // [] };
    is_deeply([sort @listed], [qw(u1 u2 u3)], "$room: the third member's welcome lists all three");
    # The second is sent once the first is back, so that their order is one
    # (two workers' messages race to Redis otherwise).
    my %got;
    for my $text ("first in $room", "second in $room") {
        $m[$text =~ /^first/ ? 0 : 1]->send_text($text);
        for my $i (0 .. $#m) {
            my ($msgs) = ChatIds::messages_until($m[$i], $text, 5);
            push @{ $got{$i} }, map { $_->{text} } @$msgs;
        }
    }
    for my $i (0 .. $#m) {
        is_deeply($got{$i}, ["first in $room", "second in $room"], "$room: member $i gets both messages");
    }
    my $late = WSClient->join(port => $nginx->port, room => $room, nick => 'late');
    my $h = $late->wait_type('history', 5);
    is_deeply([map { $_->{text} } @{ $h->{messages} // [] }], ["first in $room", "second in $room"],
              "$room: a later joiner's history");
    $m[2]->send_close(1000);
    ok($m[0]->wait_type('leave', 10, sub { $_[0]{user} eq 'u3' }), "$room: a leave event for the member who left");
    $_->send_close(1000) for @m[0, 1], $late;
}
$nginx->stop;

for my $p (@primaries) {
    my $log = $p->cmd('ACL', 'LOG');
    is(scalar(@$log), 0, 'node ' . $p->port . ': ACL LOG is empty, nothing the module ran was refused')
        or diag(join ' ', map { ref $_ ? "@$_" : $_ } @$log);
}

done_all();
