
# 025_retry.pl: dsmapper_retry reopens the failed and aborted shards of a
# final job from their checkpoints; the job then succeeds and every row is
# mapped exactly once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('retry');

##
## A mapper that fails (not transiently) while a flag says so.
##
my $rows = 4000;
create_counter_table($node, 'flagged', $rows);
$node->safe_psql('postgres', q{
	CREATE TABLE flag (fail boolean NOT NULL);
	INSERT INTO flag VALUES (true);
});
create_counter_mapper(
	$node, 'count_flagged', 'flagged',
	extra => q{
		IF (1234 = ANY (keys) OR 3456 = ANY (keys)) AND (SELECT fail FROM flag) THEN
			RAISE EXCEPTION 'flag is set' USING ERRCODE = 'P0001';
		END IF;});

my $job = launch($node, 'count_flagged', 'flagged', 'shards => 4, page_size => 100');
is(wait_job($node, $job), 'failed', 'the job fails while the flag is set');
my $info = job_info($node, $job);
is($info->{shards_failed}, 2, 'the two shards holding the failing keys failed');
is($info->{shards_done}, $info->{shards} - 2, 'the other shards succeeded');
like($info->{error}, qr/flag is set/, 'the job error names the cause');
isnt($info->{finished}, '', 'the failed job is finished');
my $processed_before = $info->{processed};
cmp_ok($processed_before, '<', $rows, "not every row was mapped ($processed_before)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM flagged WHERE n = 1'),
	$processed_before, 'rows mapped = processed');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state = 'failed' AND error_sqlstate = 'P0001' AND attempts = 1"),
	'2', 'the failed shards record the error');

# Retry while the cause is still there: fails again, nothing applied twice.
is($node->safe_psql('postgres', "SELECT dsmapper_retry($job)"), 'running',
	'dsmapper_retry returns running');
is(wait_job($node, $job), 'failed', 'with the flag still set the job fails again');
is(job_info($node, $job)->{processed}, $processed_before, 'no more rows were processed');
is($node->safe_psql('postgres', 'SELECT count(*) FROM flagged WHERE n > 1'),
	'0', 'no row mapped twice');

# Fix the cause and retry.
$node->safe_psql('postgres', 'UPDATE flag SET fail = false');
is($node->safe_psql('postgres', "SELECT dsmapper_retry($job)"), 'running',
	'dsmapper_retry after the fix returns running');
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state = 'failed'"),
	'0', 'no shard is failed right after the retry');
is(wait_job($node, $job), 'succeeded', 'the retried job succeeds');
is(counter_summary($node, 'flagged'), "$rows|$rows|0|0",
	'every row mapped exactly once');
$info = job_info($node, $job);
is($info->{processed}, $rows, 'processed = rows');
is($info->{shards_done}, $info->{shards}, 'every shard succeeded');
is($info->{error}, '', 'the job error is cleared');
isnt($info->{finished}, '', 'finished is set again');
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND (attempts <> 0 OR error IS NOT NULL OR error_sqlstate IS NOT NULL OR error_first_key IS NOT NULL)"
	),
	'0',
	'shard errors and attempts are cleared');

# A succeeded job cannot be retried.
my ($ret, $stdout, $stderr) = $node->psql('postgres', "SELECT dsmapper_retry($job)");
isnt($ret, 0, 'retry of a succeeded job is an error');
like($stderr, qr/cannot retry job $job because it is succeeded/, 'with a clear message');

##
## Abort mid-job, then retry.
##
my $arows = 8000;
my $log_offset = log_position($node);
create_counter_table($node, 'aborted', $arows);
create_counter_mapper($node, 'count_aborted', 'aborted', sleep => 0.05);
$job = launch($node, 'count_aborted', 'aborted', 'shards => 4, page_size => 20');
ok( poll_until(
		$node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job",
		't', 30),
	'the slow job makes progress');
like($node->safe_psql('postgres', "SELECT dsmapper_abort($job)"),
	qr/^(aborting|aborted)$/, 'the job is aborted');
is(wait_job($node, $job), 'aborted', 'the job reaches aborted');
my $processed_at_abort = job_info($node, $job)->{processed};
cmp_ok($processed_at_abort, '<', $arows, "the abort stopped it early ($processed_at_abort)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM aborted WHERE n = 1'),
	$processed_at_abort, 'rows mapped = processed at the abort');

is($node->safe_psql('postgres', "SELECT dsmapper_retry($job)"), 'running',
	'dsmapper_retry of the aborted job returns running');
is(wait_job($node, $job), 'succeeded', 'the retried job succeeds');
is(counter_summary($node, 'aborted'), "$arows|$arows|0|0",
	'abort then retry: every row mapped exactly once');
is(job_info($node, $job)->{processed}, $arows, 'processed = rows');
unlike(log_since($node, $log_offset), qr/dsmapper job $job shard \d+ (will retry|failed)/,
	'neither the abort nor the retry counted as a page failure');

$node->stop;
done_testing();
