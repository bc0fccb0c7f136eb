
# 006_concurrent.pl: six jobs on six tables at once all succeed, each row
# exactly once, and turns rotate so that every job makes progress before
# any job is finished.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('concurrent');
my $rows = 50000;
my @tables = map { "c$_" } 1 .. 6;

# Each mapper also notes when it was called, per job.
$node->safe_psql(
	'postgres', q{
	CREATE TABLE calls (job bigint, nkeys integer,
	                    at timestamptz DEFAULT clock_timestamp());
});
foreach my $t (@tables)
{
	create_counter_table($node, $t, $rows);
	create_counter_mapper($node, "count_$t", $t,
		extra => 'INSERT INTO calls (job, nkeys) VALUES (dsmapper_current_job(), cardinality(keys));');
}

# Launch all six back to back; short turns (5 pages) so shards go back to
# the queue and every job gets a share of the four workers.
my @jobs;
foreach my $t (@tables)
{
	push @jobs,
	  launch($node, "count_$t", $t,
		'shards => 4, page_size => 500, pages_per_task => 5');
}
is(scalar(grep { /^\d+$/ } @jobs), 6, 'six jobs launched');

foreach my $i (0 .. $#jobs)
{
	is(wait_job($node, $jobs[$i]), 'succeeded', "job $jobs[$i] on $tables[$i] succeeds");
}

foreach my $i (0 .. $#jobs)
{
	my $t = $tables[$i];
	is(counter_summary($node, $t), "$rows|$rows|0|0",
		"$t: every row mapped exactly once");
	my $info = job_info($node, $jobs[$i]);
	is($info->{processed}, $rows, "$t: processed = rows");
	is($info->{shards}, 4, "$t: four shards");
	is($info->{shards_done}, $info->{shards}, "$t: every shard done");
}

is($node->safe_psql('postgres', 'SELECT sum(nkeys) FROM calls'),
	6 * $rows, 'mapper calls cover all rows of all tables');

# Fairness sanity: every job's first page came before the first job to
# finish was finished.
my $jobs_list = join(',', @jobs);
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM (SELECT job, min(at) AS first_call FROM calls GROUP BY job) c
		 WHERE first_call < (SELECT min(finished) FROM dsmapper.jobs
		                      WHERE job_id IN ($jobs_list))}),
	'6',
	'all six jobs made progress before any job finished');

# And the work interleaved: in the first half of the run (by time) every
# job mapped some rows.
is( $node->safe_psql(
		'postgres', q{
		WITH span AS (SELECT min(at) AS t0, max(at) AS t1 FROM calls)
		SELECT count(DISTINCT job) FROM calls, span
		 WHERE at < t0 + (t1 - t0) / 2}),
	'6',
	'every job mapped rows in the first half of the run');

$node->stop;
done_testing();
