#!/usr/bin/perl
# An independent DKIM verifier for the tests: Perl's Mail::DKIM, reading a message on stdin
# and printing its result ("pass", "fail", ...) and detail. The public key never comes from
# DNS: DKIM_NAME (selector._domainkey.domain) and DKIM_RECORD ("v=DKIM1; k=rsa; p=...") give it.
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::PublicKey;

{
    no warnings 'redefine';
    *Mail::DKIM::PublicKey::fetch_async = sub {
        my ($class, %prms) = @_;
        my $on_success = ($prms{Callbacks} || {})->{Success} || sub { $_[0] };
        my $key;  # none for any other name, as DNS would answer
        if (lc("$prms{Selector}._domainkey.$prms{Domain}") eq lc($ENV{DKIM_NAME})) {
            $key = $class->parse($ENV{DKIM_RECORD});
            $key->{Selector} = $prms{Selector};
            $key->{Domain} = $prms{Domain};
            $key->check;
        }
        my $result = $key ? $on_success->($key) : $on_success->();
        return sub { $result };  # the caller waits on the query by calling this
    };
}

my $dkim = Mail::DKIM::Verifier->new;
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z/\015\012/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
print $dkim->result, "\n", $dkim->result_detail, "\n";
