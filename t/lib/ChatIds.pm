package ChatIds;

# Event helpers for tests of history and ordering: message ids are Redis
# stream positions "<ms>-<seq>", compared ms first, then seq.
#
#   use ChatIds;
#   is_pos($id); cmp_id($a, $b); first_not_increasing(@ids);
#   type_of($event); live_messages($wsclient);
#   messages_until($wsclient, $text, $timeout)

use strict;
use warnings;
use Time::HiRes ();

require Exporter;
our @ISA = ('Exporter');
our @EXPORT = qw(is_pos cmp_id first_not_increasing type_of live_messages messages_until);

sub is_pos { defined $_[0] && !ref $_[0] && $_[0] =~ /^\d+-\d+$/ }

sub cmp_id {
    my ($a, $b) = @_;
    my ($am, $as) = split /-/, $a;
    my ($bm, $bs) = split /-/, $b;
    return $am <=> $bm || $as <=> $bs;
}

# Index of the first id that is not greater than the one before, or -1.
sub first_not_increasing {
    my @ids = @_;
    for my $i (1 .. $#ids) {
        return $i unless is_pos($ids[$i]) && is_pos($ids[$i - 1]) && cmp_id($ids[$i - 1], $ids[$i]) < 0;
    }
    return -1;
}

sub type_of { $_[0] && ($_[0]{type} // '') }

# The message events a WSClient has received so far.
sub live_messages { grep { type_of($_) eq 'message' } $_[0]->events }

# The message events a WSClient receives from now until the one with text
# $text (included), within $timeout seconds: (arrayref of them, whether that
# one came).
sub messages_until {
    my ($c, $text, $timeout) = @_;
    my @m;
    my $deadline = Time::HiRes::time() + ($timeout // 5);
    while ((my $left = $deadline - Time::HiRes::time()) > 0) {
        my $ev = $c->recv_json($left) or last;
        next unless type_of($ev) eq 'message';
        push @m, $ev;
        return (\@m, 1) if $ev->{text} eq $text;
    }
    return (\@m, 0);
}

1;
