#!/usr/bin/perl
#
# bench/memsample.pl: sample the memory of dsmapper worker processes.
#
#   perl bench/memsample.pl POSTMASTER_PID STOP_FILE [INTERVAL_MS]
#
# Every INTERVAL_MS (default 100) it finds the postmaster's children whose
# process title says "dsmapper worker" and reads, for each:
#   rss      VmRSS from /proc/PID/status
#   pss      Pss from /proc/PID/smaps_rollup
#   private  Private_Dirty summed over the process's private mappings only
#            (perms ending in 'p' in /proc/PID/smaps).  Shared memory
#            (shared buffers, DSM segments) is mapped shared and left out
#            even where only this process touched a page, so this is the
#            memory the process allocated for itself.
# It stops when STOP_FILE exists (after one last sample) and prints one line of key=value pairs:
# the largest value seen for any single worker, in kB, and how many
# workers and samples it saw.

use strict;
use warnings;
use Time::HiRes qw(sleep);

my ($pm, $stop, $interval_ms) = @ARGV;
die "usage: memsample.pl POSTMASTER_PID STOP_FILE [INTERVAL_MS]\n"
  unless defined $stop && $pm =~ /^\d+$/;
$interval_ms = 100 unless defined $interval_ms && $interval_ms =~ /^\d+$/;

my %max = (rss => 0, pss => 0, private => 0);
my %seen;
my $samples = 0;

sub slurp
{
    my ($path) = @_;
    open(my $fh, '<', $path) or return undef;
    local $/;
    my $text = <$fh>;
    close $fh;
    return $text;
}

sub worker_pids
{
    my @pids;
    opendir(my $dh, '/proc') or return ();
    for my $pid (grep { /^\d+$/ } readdir $dh)
    {
        my $stat = slurp("/proc/$pid/stat") or next;
        # the command name may hold spaces and parentheses: split after the last ')'
        my $rest = substr($stat, rindex($stat, ')') + 2);
        my (undef, $ppid) = split / /, $rest;
        next unless defined $ppid && $ppid == $pm;
        my $cmd = slurp("/proc/$pid/cmdline") // '';
        push @pids, $pid if $cmd =~ /dsmapper worker/;
    }
    closedir $dh;
    return @pids;
}

sub measure
{
    my ($pid) = @_;
    my %m;
    my $status = slurp("/proc/$pid/status") // return undef;
    ($m{rss}) = $status =~ /^VmRSS:\s+(\d+)/m;
    my $rollup = slurp("/proc/$pid/smaps_rollup") // return undef;
    ($m{pss}) = $rollup =~ /^Pss:\s+(\d+)/m;
    open(my $fh, '<', "/proc/$pid/smaps") or return undef;
    my $private_mapping = 0;
    my $private = 0;
    while (my $line = <$fh>)
    {
        if ($line =~ /^[0-9a-f]+-[0-9a-f]+\s+(\S{4})\s/)
        {
            $private_mapping = substr($1, 3, 1) eq 'p';
        }
        elsif ($private_mapping && $line =~ /^Private_Dirty:\s+(\d+)/)
        {
            $private += $1;
        }
    }
    close $fh;
    $m{private} = $private;
    return \%m;
}

sub sample
{
    for my $pid (worker_pids())
    {
        my $m = measure($pid) or next;
        $seen{$pid} = 1;
        for my $k (keys %max)
        {
            $max{$k} = $m->{$k} if defined $m->{$k} && $m->{$k} > $max{$k};
        }
    }
    $samples++;
}

until (-e $stop)
{
    sample();
    sleep($interval_ms / 1000);
}
# once more after the job: what the workers kept counts too
sample();

printf "rss=%d pss=%d private=%d workers=%d samples=%d\n",
  $max{rss}, $max{pss}, $max{private}, scalar(keys %seen), $samples;
