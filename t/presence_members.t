# Presence member lists across workers and hosts (websocket_chat_presence on,
# the default). Two nginx instances A and B (worker_processes 2 each, listen
# ... reuseport) share one Redis; members join room "pm" alternately on A
# and B:
# * each joiner's welcome lists every member present so far, the joiner
#   included, as {user, session} exactly as those members' own welcomes
#   named them, and count is their exact number; the list in Redis
#   (wschat:pm:members) holds the same sessions;
# * two members with the same nickname (one on A, one on B) have different
#   sessions and are both listed;
# * every member receives one join per later joiner (and its own), carrying
#   the joiner's user and session;
# * a member that leaves (a close frame; another one by dropping its TCP
#   connection) is announced to the others by a leave with its session, and
#   the next joiner's list no longer has it, its count one lower;
# * location /p with websocket_chat_channel_prefix other: (on both
#   instances): a room of the same name there has its own list (other:pm:
#   members); /ws members neither see its members in their lists nor get
#   their joins, and /p members do not see /ws members.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time);
use ChatTest;
use WSClient;
use JSON::PP ();
use ChatFault;

my $ROOM = 'pm';

my $P_LOCATION = <<'EOT';
        location = /p {
            websocket_chat;
            websocket_chat_room $arg_room;
            websocket_chat_user $arg_nick;
            websocket_chat_channel_prefix other:;
        }
EOT

my $redis = start_redis();
my %inst;
for my $name (qw(A B)) {
    $inst{$name} = start_nginx_ok("nginx $name starts (2 workers, listen ... reuseport)",
        chat_config(workers => 2, listen => 'reuseport', server => $P_LOCATION),
        redis => $redis, workers => 2);
}

sub key_of { "$_[0]{user}\0$_[0]{session}" }
sub show   { join ', ', map { my ($u, $s) = split /\0/; "$u/$s" } sort @_ }

# Sessions in a Redis members hash, as "user\0session" strings; also
# checks that each value is the member JSON of its field.
sub redis_members {
    my $key = shift;
    my $h = $redis->cmd('HGETALL', $key) // [];
    my @m;
    for (my $i = 0; $i < @$h; $i += 2) {
        my $v = eval { JSON::PP->new->utf8->decode($h->[$i + 1]) };
        push @m, ref $v eq 'HASH' && ($v->{session} // '') eq $h->[$i]
            ? key_of($v) : "BAD\0$h->[$i]=$h->[$i + 1]";
    }
    return sort @m;
}

my @present;    # {c, inst, nick, user, session, loc}
my @joined_ws;  # every /ws member in join order (also those who left)

# Joins $nick on instance $inst through $loc; checks its welcome against
# the members expected there (@$expect: member records). Returns the record.
sub join_member {
    my ($instname, $nick, $loc, $expect) = @_;
    my $c = eval { WSClient->join(port => $inst{$instname}->port, location => $loc,
                                  room => $ROOM, nick => $nick) };
    ok($c, "$nick joins $ROOM on $instname through $loc") or do { diag($@); return undef };
    my $w = $c->welcome;
    my $m = { c => $c, inst => $instname, nick => $nick, loc => $loc,
              user => $w->{user}, session => $w->{session} };
    my $tag = "$nick\@$instname$loc";
    is($w->{user}, $nick, "$tag: welcome user is its nickname");
    like($w->{session} // '', qr/\S/, "$tag: welcome has a session id");
    my @want = sort map { key_of($_) } @$expect, $m;
    is(ref $w->{members}, 'ARRAY', "$tag: welcome has a members list") or return $m;
    my @got = sort map { ref $_ eq 'HASH' ? key_of($_) : "NOT AN OBJECT: $_" } @{ $w->{members} };
    is_deeply(\@got, \@want,
              "$tag: welcome lists the " . scalar(@want) . ' members present (itself included)')
        or diag("got:  " . show(@got) . "\nwant: " . show(@want));
    is($w->{count}, scalar(@want), "$tag: welcome count is " . scalar(@want));
    return $m;
}

# --- members join alternately on A and B; "ann" on both.
my @plan = ([A => 'ann'], [B => 'bob'], [B => 'ann'], [A => 'cy'], [B => 'dee'],
            [A => 'eve'], [A => 'fay'], [B => 'gus']);
for my $p (@plan) {
    my $m = join_member($p->[0], $p->[1], '/ws', \@present) or last;
    push @present, $m;
    push @joined_ws, $m;
}
is(scalar(@present), scalar(@plan), scalar(@plan) . ' members joined')
    or do { done_all(); exit };

# Which worker serves whom (for the record; reuseport spreads them).
for my $name (qw(A B)) {
    my @on = grep { $_->{inst} eq $name } @present;
    my @w = client_workers($inst{$name}, [map { $_->{c} } @on]);
    my %n;
    $n{ $_ // 'unattributed' }++ for @w;
    note("instance $name: members per worker: " . join(', ', map { "$_: $n{$_}" } sort keys %n));
}

my @anns = grep { $_->{nick} eq 'ann' } @present;
is(scalar(@anns), 2, 'two members named ann');
isnt($anns[0]{session}, $anns[1]{session}, 'the two anns have different sessions');
my %sid;
$sid{ $_->{session} }++ for @present;
is(scalar(keys %sid), scalar(@present), 'every member has its own session id');

is_deeply([redis_members("wschat:$ROOM:members")], [sort map { key_of($_) } @present],
          "Redis wschat:$ROOM:members holds exactly the present members");

# --- join events: member i gets one join per member j >= i (its own too)
for my $i (0 .. $#present) {
    my $m = $present[$i];
    my @want = map { $present[$_] } $i .. $#present;
    my %seen;
    my $last = $want[-1]{session};
    $m->{c}->wait_type('join', 5, sub { $_[0]{session} eq $last })
        unless grep { ($_->{type} // '') eq 'join' && $_->{session} eq $last } $m->{c}->events;
    for my $e (grep { ($_->{type} // '') eq 'join' } $m->{c}->events) {
        $seen{ key_of($e) }++;
    }
    my @missing = grep { ($seen{ key_of($_) } // 0) != 1 } @want;
    my %wantk = map { (key_of($_) => 1) } @want;
    my @extra = grep { !$wantk{$_} } keys %seen;
    ok(!@missing && !@extra,
       "$m->{nick}\@$m->{inst} got exactly one join (user and session) per member who joined since, itself included")
        or diag("missing or repeated: " . show(map { key_of($_) } @missing)
                . "\nunexpected: " . show(@extra)
                . "\njoins: " . show(map { key_of($_) } grep { ($_->{type} // '') eq 'join' } $m->{c}->events));
}

# --- leaves: B's ann with a close frame, then cy (A) by dropping TCP
sub leave_member {
    my ($who, $how) = @_;
    my ($gone) = grep { $present[$_] == $who } 0 .. $#present;
    splice @present, $gone, 1;
    if ($how eq 'close') {
        $who->{c}->send_close(1000);
        ok($who->{c}->is_closed_by_server(5), "$who->{nick}\@$who->{inst}: closed after its close frame");
    } else {
        $who->{c}->disconnect;
    }
    my $tag = "$who->{nick}\@$who->{inst} ($who->{session})";
    my $got = 0;
    for my $m (@present) {
        my $l = $m->{c}->wait_type('leave', 5, sub { $_[0]{session} eq $who->{session} });
        $got++ if $l && $l->{user} eq $who->{user};
    }
    is($got, scalar(@present), "after $tag left ($how), every remaining member got a leave with its session and user");
    ok(wait_until(sub { !grep { (split /\0/)[1] eq $who->{session} } redis_members("wschat:$ROOM:members") }, 5),
       "$tag is gone from wschat:$ROOM:members");
}

leave_member($anns[1], 'close');
my $hal = join_member('A', 'hal', '/ws', \@present);
push @present, $hal if $hal;
push @joined_ws, $hal if $hal;
ok($hal && !grep({ $_->{session} eq $anns[1]{session} } @{ $hal->{c}->welcome->{members} }),
   'hal\'s list does not have the ann who left, and still has the other ann')
    and ok(grep({ $_->{session} eq $anns[0]{session} } @{ $hal->{c}->welcome->{members} }),
           'the first ann is still listed');

my ($cy) = grep { $_->{nick} eq 'cy' } @present;
leave_member($cy, 'disconnect');
my $ida = join_member('B', 'ida', '/ws', \@present);
push @present, $ida if $ida;
is($ida && $ida->{c}->welcome->{count}, scalar(@present),
   'the count in ida\'s welcome dropped by one for cy (' . scalar(@present) . ')');

# --- another prefix, same room name: separate lists
my @other;
my $pat = join_member('A', 'pat', '/p', \@other);
push @other, $pat if $pat;
my $pia = join_member('B', 'pia', '/p', \@other);
push @other, $pia if $pia;
is_deeply([redis_members("other:$ROOM:members")], [sort map { key_of($_) } @other],
          "Redis other:$ROOM:members holds exactly pat and pia");
is_deeply([redis_members("wschat:$ROOM:members")], [sort map { key_of($_) } @present],
          "Redis wschat:$ROOM:members still holds exactly the /ws members");
ok($pat && $pat->{c}->wait_type('join', 5, sub { $_[0]{session} eq $pia->{session} }),
   'pat (on A, /p) got pia\'s join (on B, /p)');

my $jon = join_member('A', 'jon', '/ws', \@present);
push @present, $jon if $jon;

# A marker message in each room closes the window: nothing leaked before it.
my %other_sid = map { ($_->{session} => 1) } @other;
my %ws_sid = map { ($_->{session} => 1) } @joined_ws, ($jon // ());
$present[0]{c}->send_text('marker ws');
$other[0]{c}->send_text('marker p');
my ($leak_ws, $got_ws) = (0, 0);
for my $m (@present) {
    my $mk = $m->{c}->wait_type('message', 5, sub { $_[0]{text} eq 'marker ws' });
    $got_ws++ if $mk;
    $leak_ws += grep { my $t = $_->{type} // ''; ($t eq 'join' || $t eq 'leave' || $t eq 'message')
                       && defined $_->{session} && $other_sid{ $_->{session} } } $m->{c}->events;
    $leak_ws += grep { $_->{type} eq 'message' && $_->{text} eq 'marker p' } $m->{c}->events;
}
is($got_ws, scalar(@present), '/ws members received the /ws marker');
is($leak_ws, 0, '/ws members got no event about /p members (joins, messages)');
my ($leak_p, $got_p) = (0, 0);
for my $m (@other) {
    my $mk = $m->{c}->wait_type('message', 5, sub { $_[0]{text} eq 'marker p' });
    $got_p++ if $mk;
    $leak_p += grep { defined $_->{session} && $ws_sid{ $_->{session} } } $m->{c}->events;
    $leak_p += grep { ref $_->{members} eq 'ARRAY' && grep { $ws_sid{ $_->{session} // '' } } @{ $_->{members} } }
               $m->{c}->events;
}
is($got_p, scalar(@other), '/p members received the /p marker');
is($leak_p, 0, '/p members got no event about /ws members, nor listed them');

# --- everybody leaves: both lists empty
$_->{c}->send_close(1000) for @present, @other;
$_->{c}->is_closed_by_server(5) for @present, @other;
ok(wait_until(sub { $redis->cmd('HLEN', "wschat:$ROOM:members") == 0
                 && $redis->cmd('HLEN', "other:$ROOM:members") == 0 }, 10),
   'both member lists are empty after everybody left')
    or diag('left: ' . show(redis_members("wschat:$ROOM:members"), redis_members("other:$ROOM:members")));

done_all();
