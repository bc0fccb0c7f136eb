
# 021_fatal_and_shutdown.pl: a turn that dies inside a page without a crash
# restart (FATAL, fast and immediate shutdown) is noticed at the shard's next
# turn and counted as a failed attempt; the work resumes from the checkpoint
# and maps every row exactly once.  A page that always kills its process
# fails its shard after max_attempts.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('fatal_shutdown');
my $exited = 'the process running a page of this shard exited unexpectedly';

##
## (a1) The mapper terminates its own backend once (FATAL, exit code 1: no
## crash restart).  A sequence counts the terminations: nextval survives the
## rollback of the page.
##
my $rows = 2000;
create_counter_table($node, 'once', $rows);
$node->safe_psql('postgres', 'CREATE SEQUENCE once_term');
create_counter_mapper(
	$node, 'count_once', 'once',
	extra => q{
		IF 1500 = ANY (keys) AND nextval('once_term') = 1 THEN
			PERFORM pg_terminate_backend(pg_backend_pid());
			PERFORM pg_sleep(10);
		END IF;});

my $log_offset = log_position($node);
my $job = launch($node, 'count_once', 'once',
	'shards => 2, page_size => 100, max_attempts => 3');
is(wait_job($node, $job, timeout => '60 s'), 'succeeded',
	'a job whose mapper terminated its backend once succeeds');
is(counter_summary($node, 'once'), "$rows|$rows|0|0",
	'every row mapped exactly once after the FATAL');
is($node->safe_psql('postgres', 'SELECT last_value FROM once_term'),
	'2', 'the page ran twice: terminated once, then again');
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND (attempts <> 0 OR error IS NOT NULL)"
	),
	'0',
	'attempts and errors are cleared after the page succeeds');
my $log = log_since($node, $log_offset);
like($log, qr/terminating background worker "dsmapper worker" due to administrator command|terminating connection due to administrator command/,
	'the worker was terminated by the mapper');
like($log, qr/dsmapper job $job shard \d+ will retry: a previous turn exited inside a page/,
	'the next turn noticed the turn that died and retried');
unlike($log, qr/terminating any other active server processes/,
	'no crash restart');

##
## (a2) The mapper terminates its backend every time it sees key 1500: that
## shard fails after max_attempts (3) terminations, the others succeed.
##
create_counter_table($node, 'always', $rows);
$node->safe_psql('postgres', 'CREATE SEQUENCE always_term');
create_counter_mapper(
	$node, 'count_always', 'always',
	extra => q{
		IF 1500 = ANY (keys) THEN
			PERFORM nextval('always_term');
			PERFORM pg_terminate_backend(pg_backend_pid());
			PERFORM pg_sleep(10);
		END IF;});
$log_offset = log_position($node);
$job = launch($node, 'count_always', 'always',
	'shards => 4, page_size => 50, max_attempts => 3');
is(wait_job($node, $job, timeout => '60 s'), 'failed',
	'a job whose page always terminates its backend fails');
my $info = job_info($node, $job);
is($info->{shards_failed}, 1, 'exactly one shard failed');
is($info->{shards_done}, $info->{shards} - 1, 'the other shards succeeded');
like($info->{error}, qr/\Q$exited\E/, 'the job error says the process exited');
is( $node->safe_psql(
		'postgres', qq{
		SELECT attempts, error, error_sqlstate,
		       range_start IS NULL OR range_start::bigint <= 1500,
		       range_end IS NULL OR range_end::bigint > 1500
		  FROM dsmapper.shards WHERE job_id = $job AND state = 'failed'}),
	"3|$exited|57P01|t|t",
	'the shard holding key 1500 failed after 3 attempts with the exit error');
is($node->safe_psql('postgres', 'SELECT last_value FROM always_term'),
	'3', 'the page was tried max_attempts (3) times');
is($node->safe_psql('postgres', 'SELECT n FROM always WHERE id = 1500'),
	'0', 'the killing page was never applied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM always WHERE n > 1'),
	'0', 'no row mapped twice');
is($node->safe_psql('postgres', 'SELECT count(*) FROM always WHERE n = 1'),
	$info->{processed}, 'rows mapped = processed');
$log = log_since($node, $log_offset);
like($log, qr/dsmapper job $job shard \d+ failed: a previous turn exited inside a page/,
	'the final failure is logged');

# The workers are fine: another job runs.
create_counter_table($node, 'after_fatal', 1000);
create_counter_mapper($node, 'count_after_fatal', 'after_fatal');
$job = launch($node, 'count_after_fatal', 'after_fatal', 'shards => 2, page_size => 100');
is(wait_job($node, $job), 'succeeded', 'a later job succeeds');
is(counter_summary($node, 'after_fatal'), '1000|1000|0|0', 'and maps every row once');

##
## (b) Fast shutdown in the middle of a job whose pages take 2 s: pg_ctl
## returns quickly, the cluster is shut down cleanly, and after a start the
## job finishes with every row mapped exactly once.
##
my $srows = 40;
create_counter_table($node, 'slowstop', $srows);
create_counter_mapper($node, 'count_slowstop', 'slowstop', sleep => 2);
$job = launch($node, 'count_slowstop', 'slowstop',
	'shards => 4, page_size => 5, max_attempts => 5');
ok( poll_until(
		$node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job",
		't', 30),
	'the slow job committed a page');
# Make sure a page is in flight when we stop.
ok( poll_until(
		$node, qq{
		SELECT count(*) > 0 FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND wait_event = 'PgSleep'
		   AND query ~ '^dsmapper job $job shard'},
		't', 30),
	'a page is in flight');
my ($state, $processed) = split /\|/, $node->safe_psql('postgres',
	"SELECT state, processed FROM dsmapper.jobs WHERE job_id = $job");
is($state, 'running', 'the job runs when the server is stopped');
cmp_ok($processed, '<', $srows, "the job is not done yet ($processed of $srows)");

my $t0 = time();
$node->stop('fast');
my $stop_secs = elapsed_since($t0);
note sprintf('fast shutdown took %.2f s', $stop_secs);
cmp_ok($stop_secs, '<', 15, sprintf('fast shutdown returns quickly (%.1f s)', $stop_secs));

my ($stdout, $stderr) = run_command([ 'pg_controldata', $node->data_dir ]);
like($stdout, qr/^Database cluster state:\s+shut down$/m,
	'pg_controldata: the cluster was shut down cleanly');

$node->start;
is(wait_job($node, $job, timeout => '60 s'), 'succeeded',
	'after the restart the job succeeds');
is(counter_summary($node, 'slowstop'), "$srows|$srows|0|0",
	'fast shutdown: every row mapped exactly once');
is(job_info($node, $job)->{processed}, $srows, 'processed = rows');

##
## (c) Immediate shutdown in the middle of a job, then start again: the job
## finishes with every row mapped exactly once.
##
my $irows = 20000;
create_counter_table($node, 'immed', $irows);
create_counter_mapper($node, 'count_immed', 'immed', sleep => 0.05);
$job = launch($node, 'count_immed', 'immed',
	'shards => 4, page_size => 100, max_attempts => 5');
ok( poll_until(
		$node, "SELECT processed >= 2000 FROM dsmapper.jobs WHERE job_id = $job",
		't', 30),
	'the job is under way');
($state, $processed) = split /\|/, $node->safe_psql('postgres',
	"SELECT state, processed FROM dsmapper.jobs WHERE job_id = $job");
is($state, 'running', 'the job runs when the server is stopped');
cmp_ok($processed, '<', $irows, "the job is not done yet ($processed of $irows)");

$node->stop('immediate');
($stdout, $stderr) = run_command([ 'pg_controldata', $node->data_dir ]);
like($stdout, qr/^Database cluster state:\s+in production$/m,
	'pg_controldata: the immediate shutdown left the cluster in production (crash)');
$node->start;
is(wait_job($node, $job, timeout => '60 s'), 'succeeded',
	'after the immediate shutdown the job succeeds');
is(counter_summary($node, 'immed'), "$irows|$irows|0|0",
	'immediate shutdown: every row mapped exactly once');
is(job_info($node, $job)->{processed}, $irows, 'processed = rows');

$node->stop;
done_testing();
