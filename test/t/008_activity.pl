
# 008_activity.pl: workers and the launcher show up in pg_stat_activity with
# their job and shard; an idle cluster is quiet (no log lines, no workers
# started without work).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

# A short idle timeout so that idle workers leave within the test.
my $idle_timeout = 2;
my $node = new_node('activity',
	extra_conf => "dsmapper.worker_idle_timeout = '${idle_timeout}s'\n");

is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper launcher'"),
	'1',
	'the launcher is in pg_stat_activity');

create_counter_table($node, 'slow', 8000);
create_counter_mapper($node, 'count_slow', 'slow', sleep => 0.05);
my $job = launch($node, 'count_slow', 'slow', 'shards => 4, page_size => 10');

ok( poll_until(
		$node, qq{
		SELECT count(*) > 0 FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker'
		   AND query ~ '^dsmapper job $job shard [0-9]+\$'},
		't', 30),
	'a worker shows "dsmapper job N shard S" as its query');

# Several shards at once, each named by a different worker.
ok( poll_until(
		$node, qq{
		SELECT count(DISTINCT query) >= 2 FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker'
		   AND query ~ '^dsmapper job $job shard [0-9]+\$'},
		't', 30),
	'several workers work on different shards');

my $rows = $node->safe_psql(
	'postgres', qq{
	SELECT datname, state, application_name FROM pg_stat_activity
	 WHERE backend_type = 'dsmapper worker'
	   AND query ~ '^dsmapper job $job shard [0-9]+\$' LIMIT 1});
like($rows, qr/^postgres\|/, 'the worker is connected to the job\'s database');

# The shards named in pg_stat_activity exist.
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM pg_stat_activity a
		 WHERE backend_type = 'dsmapper worker'
		   AND query ~ '^dsmapper job $job shard [0-9]+\$'
		   AND NOT EXISTS (SELECT 1 FROM dsmapper.shards s
		                    WHERE s.job_id = $job
		                      AND s.shard = substring(a.query FROM 'shard ([0-9]+)\$')::int)}),
	'0',
	'the shard in the query text is a shard of the job');

is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper launcher'"),
	'1',
	'still exactly one launcher');

# Stop the job and let it settle.
like($node->safe_psql('postgres', "SELECT dsmapper_abort($job)"),
	qr/^(aborting|aborted)$/, 'job aborted');
is(wait_job($node, $job), 'aborted', 'job is final');

ok( poll_until(
		$node, qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND query ~ '^dsmapper job'
		   AND state <> 'idle'},
		'0', 10),
	'no worker works on the job any more');

# Idle workers leave after the idle timeout and are not replaced while there
# is nothing to do.
ok( poll_until(
		$node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper worker'",
		'0', 5 * $idle_timeout),
	'idle workers exit after dsmapper.worker_idle_timeout');
my $since = $node->safe_psql('postgres', 'SELECT now()');
my $respawned = 0;
my $until = time() + 2 * $idle_timeout + 1;
while (time() < $until)
{
	$respawned += $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND backend_start > '$since'});
	usleep(200_000);
}
is($respawned, 0, 'no worker is started while there is no work');

# Idle is quiet: no new dsmapper lines in the server log over a few seconds.
usleep(500_000);
my $offset = log_position($node);
usleep(4_000_000);
my @lines = grep { /dsmapper/ } split /\n/, log_since($node, $offset);
is(scalar(@lines), 0, 'no dsmapper log lines while idle')
  or diag(join("\n", @lines));

# New work after the idle period still wakes a worker at once.
create_counter_table($node, 'later', 500);
create_counter_mapper($node, 'count_later', 'later');
my $t0 = time();
my $job2 = launch($node, 'count_later', 'later', 'shards => 2, page_size => 100');
is(wait_job($node, $job2, timeout => '10 s'), 'succeeded', 'a job after an idle period succeeds');
cmp_ok(time() - $t0, '<', 5, 'and it did not wait for a poll interval');
is(counter_summary($node, 'later'), '500|500|0|0', 'every row once');

$node->stop;
done_testing();
