
# 005_abort.pl: aborting a running job stops it at page boundaries with no
# half pages; aborting a final job changes nothing; pause stops the work and
# resume finishes it, every row exactly once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('abort');

##
## Abort mid-job.
##
my $rows = 20000;
create_counter_table($node, 'slow', $rows);
create_counter_mapper($node, 'count_slow', 'slow', sleep => 0.05);

my $job = launch($node, 'count_slow', 'slow', 'shards => 4, page_size => 10');
ok( poll_until(
		$node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job",
		't', 30),
	'slow job makes progress');
is($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job"),
	'running', 'slow job is running');

my $abort_state = $node->safe_psql('postgres', "SELECT dsmapper_abort($job)");
like($abort_state, qr/^(aborting|aborted)$/, "dsmapper_abort returns $abort_state");

ok( poll_until(
		$node, "SELECT state FROM dsmapper.jobs WHERE job_id = $job",
		'aborted', 30),
	'job reaches aborted');
is(wait_job($node, $job, timeout => '1 s'), 'aborted', 'dsmapper_wait returns aborted');

is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state NOT IN ('succeeded', 'failed', 'aborted')"
	),
	'0',
	'every shard is final');
cmp_ok(
	$node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state = 'aborted'"),
	'>=', 1,
	'at least one shard is aborted');

my $processed = $node->safe_psql('postgres',
	"SELECT sum(processed) FROM dsmapper.shards WHERE job_id = $job");
cmp_ok($processed, '>', 0, "some rows were processed ($processed)");
cmp_ok($processed, '<', $rows, 'not every row was processed');
is(job_info($node, $job)->{processed}, $processed, 'job processed = sum of shards');
is($node->safe_psql('postgres', 'SELECT count(*) FROM slow WHERE n = 1'),
	$processed, 'rows mapped = processed (no half pages)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM slow WHERE n > 1'),
	'0', 'no row mapped twice');

# Workers let go of the aborted job: the count stays put.
my $after = $node->safe_psql('postgres', 'SELECT count(*) FROM slow WHERE n = 1');
usleep(500_000);
is($node->safe_psql('postgres', 'SELECT count(*) FROM slow WHERE n = 1'),
	$after, 'no more rows are mapped after the abort');
is($node->safe_psql('postgres', "SELECT count(*) FROM dsmapper.queue WHERE job_id = $job"),
	'0', 'nothing of the aborted job is queued');

# Abort of a final job returns its state unchanged.
is($node->safe_psql('postgres', "SELECT dsmapper_abort($job)"),
	'aborted', 'aborting an aborted job returns aborted');

create_counter_table($node, 'quick', 100);
create_counter_mapper($node, 'count_quick', 'quick');
my $qjob = launch($node, 'count_quick', 'quick', '');
is(wait_job($node, $qjob), 'succeeded', 'quick job succeeds');
is($node->safe_psql('postgres', "SELECT dsmapper_abort($qjob)"),
	'succeeded', 'aborting a succeeded job returns succeeded');
is($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $qjob"),
	'succeeded', 'the succeeded job stays succeeded');

##
## Pause and resume.
##
my $prows = 4000;
create_counter_table($node, 'pausable', $prows);
create_counter_mapper($node, 'count_pausable', 'pausable', sleep => 0.05);
my $pjob = launch($node, 'count_pausable', 'pausable', 'shards => 4, page_size => 10');
ok( poll_until(
		$node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $pjob",
		't', 30),
	'pausable job makes progress');

is($node->safe_psql('postgres', "SELECT dsmapper_pause($pjob)"),
	'paused', 'dsmapper_pause returns paused');
ok( poll_until(
		$node,
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $pjob AND state NOT IN ('paused', 'succeeded')",
		'0', 30),
	'every shard reaches paused');
is($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $pjob"),
	'paused', 'job is paused');

my $paused_at = $node->safe_psql('postgres',
	"SELECT processed FROM dsmapper.jobs WHERE job_id = $pjob");
my $mapped_at = $node->safe_psql('postgres', 'SELECT count(*) FROM pausable WHERE n = 1');
is($mapped_at, $paused_at, 'while paused: rows mapped = processed');
cmp_ok($paused_at, '<', $prows, "paused before the end ($paused_at of $prows)");

# Over a short window nothing moves.
my $moved = 0;
my $until = time() + 1.5;
while (time() < $until)
{
	$moved = 1
	  if $node->safe_psql('postgres',
		"SELECT processed FROM dsmapper.jobs WHERE job_id = $pjob") ne $paused_at;
	usleep(100_000);
}
ok(!$moved, 'processed stays constant while paused');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pausable WHERE n = 1'),
	$mapped_at, 'no rows are mapped while paused');
is(wait_job($node, $pjob, timeout => '0.2 s'), 'paused',
	'dsmapper_wait with a timeout returns paused');

like($node->safe_psql('postgres', "SELECT dsmapper_resume($pjob)"),
	qr/^(running|succeeded)$/, 'dsmapper_resume returns running');
is(wait_job($node, $pjob), 'succeeded', 'resumed job succeeds');
is(counter_summary($node, 'pausable'), "$prows|$prows|0|0",
	'paused and resumed job mapped every row exactly once');
is(job_info($node, $pjob)->{processed}, $prows, 'processed = rows after resume');

$node->stop;
done_testing();
