
# 001_basic.pl: a job runs through the background workers and maps every
# row exactly once; its start and end are logged and announced.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use DsmTest;

my $node = new_node('basic');
my $rows = 20000;

create_counter_table($node, 't', $rows);
create_counter_mapper($node, 'count_t', 't');

# A session that listens for job state changes.
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN dsmapper');

my $log_offset = log_position($node);

my $job = launch($node, 'count_t', 't', 'shards => 4, page_size => 500');
like($job, qr/^\d+$/, 'dsmapper_launch returns a job id');

is(wait_job($node, $job), 'succeeded', 'job succeeds');

is(counter_summary($node, 't'), "$rows|$rows|0|0",
	'every row was mapped exactly once');

my $info = job_info($node, $job);
is($info->{state}, 'succeeded', 'dsmapper.jobs shows succeeded');
is($info->{processed}, $rows, 'processed equals the row count');
cmp_ok($info->{shards}, '>=', 1, 'job has shards');
cmp_ok($info->{shards}, '<=', 4, 'no more shards than asked for');
is($info->{shards_done}, $info->{shards}, 'every shard is done');
is($info->{shards_failed}, 0, 'no shard failed');
is($info->{expected}, $rows, 'expected is exact for a small table');
is($info->{progress}, '100', 'progress is 100');
is($info->{error}, '', 'no error');
isnt($info->{finished}, '', 'finished is set');

is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'),
		       sum(processed), sum(expected), sum(attempts)
		  FROM dsmapper.shards WHERE job_id = $job}),
	"$info->{shards}|$info->{shards}|$rows|$rows|0",
	'every shard succeeded and the shard counts add up');

# The shard ranges are contiguous and cover every key: the first starts
# unbounded, the last ends unbounded, each starts where the previous ended.
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FILTER (WHERE shard = 0 AND range_start IS NOT NULL)
		     + count(*) FILTER (WHERE last AND range_end IS NOT NULL)
		     + count(*) FILTER (WHERE shard > 0 AND range_start IS DISTINCT FROM prev_end)
		     + count(*) FILTER (WHERE NOT last AND range_end IS NULL)
		  FROM (SELECT shard, range_start, range_end,
		               lag(range_end) OVER (ORDER BY shard) AS prev_end,
		               shard = max(shard) OVER () AS last
		          FROM dsmapper.shards WHERE job_id = $job) s}),
	'0',
	'shard ranges are contiguous and unbounded at both ends');

# Shard indexes are 0-based and dense.
is( $node->safe_psql(
		'postgres',
		"SELECT min(shard) = 0 AND max(shard) = count(*) - 1 FROM dsmapper.shards WHERE job_id = $job"
	),
	't',
	'shard indexes are 0..n-1');

# Server log: start and end at LOG.
{
	local $PostgreSQL::Test::Utils::timeout_default = 30;
	ok($node->wait_for_log(qr/LOG:\s+dsmapper job $job in database "[^"]+" started/, $log_offset),
		'job start is logged');
	ok( $node->wait_for_log(
			qr/LOG:\s+dsmapper job $job in database "[^"]+" succeeded after [0-9.]+ s: $rows rows in $info->{shards} shards, 0 failed, 0 aborted/,
			$log_offset),
		'job end is logged with runtime and row counts');
}

# NOTIFY dsmapper: the listener saw the job reach succeeded (psql prints
# notifications after the next command).
my $notes = '';
foreach my $i (1 .. 50)
{
	$notes .= $listener->query_safe('SELECT 1');
	last if $notes =~ /"state"\s*:\s*"succeeded"/;
	usleep(100_000);
}
like(
	$notes,
	qr/Asynchronous notification "dsmapper" with payload "\{"job"\s*:\s*$job,\s*"state"\s*:\s*"running"\}"/,
	'NOTIFY dsmapper announces running');
like(
	$notes,
	qr/Asynchronous notification "dsmapper" with payload "\{"job"\s*:\s*$job,\s*"state"\s*:\s*"succeeded"\}"/,
	'NOTIFY dsmapper announces succeeded');
$listener->quit;

# A second job on the same (now mapped) table maps every row once more.
my $job2 = launch($node, 'count_t', 't', 'shards => 3, page_size => 777');
is(wait_job($node, $job2), 'succeeded', 'second job succeeds');
is( $node->safe_psql('postgres',
		'SELECT count(*) FILTER (WHERE n = 2), count(*) FROM t'),
	"$rows|$rows",
	'second job mapped every row exactly once more');

$node->stop;
done_testing();
