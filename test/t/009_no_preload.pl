
# 009_no_preload.pl: without shared_preload_libraries there are no
# background workers; dsmapper_launch says so, jobs wait in 'starting', and
# dsmapper_run() in an ordinary session does the work, exactly once, with
# its pages committing (or rolling back) with the caller's transaction.
# The same holds with the library preloaded but dsmapper.max_workers = 0.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

# run_scenario(node): the whole dsmapper_run scenario on one node.
sub run_scenario
{
	my ($node) = @_;

	my ($cret, $cout, $cerr) = $node->psql('postgres', 'CREATE EXTENSION dsmapper');
	is($cret, 0, 'CREATE EXTENSION works') or diag($cerr);
	return if $cret != 0;

	is( $node->safe_psql(
			'postgres',
			"SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('dsmapper launcher', 'dsmapper worker')"
		),
		'0',
		'no launcher and no workers');

	my $rows = 3000;
	create_counter_table($node, 't', $rows);
	create_counter_mapper($node, 'count_t', 't');

	my ($ret, $job, $stderr) = $node->psql('postgres',
		"SELECT dsmapper_launch('count_t', 't', shards => 3, page_size => 100)");
	is($ret, 0, 'dsmapper_launch works');
	like($job, qr/^\d+$/, 'dsmapper_launch returns a job id');
	like($stderr, qr/NOTICE:.*dsmapper_run/, 'dsmapper_launch gives a NOTICE mentioning dsmapper_run');

	# Nothing happens by itself.
	is(wait_job($node, $job, timeout => '1.5 s'), 'starting',
		'dsmapper_wait times out and returns starting');
	is($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job"),
		'starting', 'the job stays starting');
	is(counter_summary($node, 't'), "$rows|0|$rows|0", 'no row mapped yet');

	# dsmapper_run inside a transaction that rolls back: nothing sticks, not
	# even the split.
	my $pages = $node->safe_psql('postgres',
		"BEGIN; SELECT dsmapper_run('30 s'); ROLLBACK;");
	cmp_ok($pages, '>', 0, "dsmapper_run processed pages ($pages) before the rollback");
	is(counter_summary($node, 't'), "$rows|0|$rows|0", 'rolled back: no row mapped');
	is($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job"),
		'starting', 'rolled back: the job is still starting');

	# A starting job can be aborted at once.
	my $job_x = $node->safe_psql('postgres',
		"SET client_min_messages = warning; SELECT dsmapper_launch('count_t', 't')");
	is($node->safe_psql('postgres', "SELECT dsmapper_abort($job_x)"),
		'aborted', 'aborting a starting job aborts it at once');

	# Now run it for real, one transaction per call, until the job is final.
	my $calls = 0;
	my $total_pages = 0;
	my $state = 'starting';
	while ($calls < 50)
	{
		$total_pages += $node->safe_psql('postgres', "SELECT dsmapper_run('30 s')");
		$calls++;
		$state = $node->safe_psql('postgres',
			"SELECT state FROM dsmapper.jobs WHERE job_id = $job");
		last if $state =~ /^(succeeded|failed|aborted)$/;
	}
	is($state, 'succeeded', "job succeeds through dsmapper_run ($calls calls)");
	cmp_ok($total_pages, '>=', $rows / 100, "pages processed ($total_pages)");
	is(counter_summary($node, 't'), "$rows|$rows|0|0", 'every row mapped exactly once');

	my $info = job_info($node, $job);
	is($info->{processed}, $rows, 'processed = rows');
	is($info->{shards_done}, $info->{shards}, 'every shard done');
	is($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job_x"),
		'aborted', 'the aborted job stayed aborted');

	# With no work left, dsmapper_run returns 0 at once.
	is($node->safe_psql('postgres', "SELECT dsmapper_run('30 s')"),
		'0', 'dsmapper_run with nothing queued returns 0');

	# A short max_duration runs part of a job; later calls finish it.
	create_counter_table($node, 'slow', 2000);
	create_counter_mapper($node, 'count_slow', 'slow', sleep => 0.02);
	my $job2 = $node->safe_psql('postgres',
		"SET client_min_messages = warning; SELECT dsmapper_launch('count_slow', 'slow', shards => 2, page_size => 10)");
	my $first = $node->safe_psql('postgres', "SELECT dsmapper_run('0.5 s')");
	cmp_ok($first, '>', 0, "a short dsmapper_run maps some pages ($first)");
	cmp_ok($first, '<', 200, 'but not all of them');
	is($node->safe_psql('postgres', 'SELECT count(*) FROM slow WHERE n = 1'),
		$node->safe_psql('postgres', "SELECT processed FROM dsmapper.jobs WHERE job_id = $job2"),
		'rows mapped = processed after a partial run');
	$calls = 0;
	$state = '';
	while ($calls < 50)
	{
		$node->safe_psql('postgres', "SELECT dsmapper_run('30 s')");
		$calls++;
		$state = $node->safe_psql('postgres',
			"SELECT state FROM dsmapper.jobs WHERE job_id = $job2");
		last if $state =~ /^(succeeded|failed|aborted)$/;
	}
	is($state, 'succeeded', 'the slow job finishes through later calls');
	is(counter_summary($node, 'slow'), '2000|2000|0|0', 'slow job: every row exactly once');

}

my $node = new_node('nopreload', preload => 0, create_extension => 0);
subtest 'no shared_preload_libraries' => sub { run_scenario($node) };
$node->stop;

my $node0 = new_node('zeroworkers', max_workers => 0, create_extension => 0);
subtest 'preloaded with dsmapper.max_workers = 0' => sub { run_scenario($node0) };
$node0->stop;

done_testing();
