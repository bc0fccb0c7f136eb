
# 004_errors.pl: a permanent mapper error fails only its shard, records the
# error and rolls the page back; a transient error is retried after a
# backoff; a transient error that never goes away fails the shard after
# max_attempts; a split that keeps failing transiently fails the job after
# max_attempts.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('errors');

##
## Permanent error: division by zero on key 2222.
##
my $rows = 4000;
create_counter_table($node, 'perm', $rows);
create_counter_mapper($node, 'count_perm', 'perm',
	extra => 'IF 2222 = ANY (keys) THEN PERFORM 1 / 0; END IF;');

my $job = launch($node, 'count_perm', 'perm', 'shards => 4, page_size => 100');
is(wait_job($node, $job), 'failed', 'job with a failing page ends failed');

my $info = job_info($node, $job);
is($info->{state}, 'failed', 'dsmapper.jobs shows failed');
isnt($info->{error}, '', 'the job has an error');
like($info->{error}, qr/division by zero/, 'the job error names the cause');
cmp_ok($info->{shards}, '>', 1, 'several shards');
is($info->{shards_failed}, 1, 'exactly one shard failed');
is($info->{shards_done}, $info->{shards} - 1, 'all other shards succeeded');

my ($fshard, $sqlstate, $ferror, $first, $last, $resume, $fprocessed) = split /\|/,
  $node->safe_psql(
	'postgres', qq{
	SELECT shard, error_sqlstate, error, error_first_key, error_last_key,
	       resume_from, processed
	  FROM dsmapper.shards WHERE job_id = $job AND state = 'failed'});
is($sqlstate, '22012', 'failed shard records SQLSTATE 22012');
like($ferror, qr/division by zero/, 'failed shard records the message');
ok($first =~ /^\d+$/ && $last =~ /^\d+$/, 'failed shard records first and last key of the page');
ok($first <= 2222 && 2222 <= $last, "failing key 2222 lies in the recorded page ($first..$last)");
cmp_ok($last - $first + 1, '<=', 100, 'the recorded page holds at most page_size keys');
ok(!defined $resume || $resume eq '' || $resume < $first,
	'the failed shard checkpoint is before the failing page');

# The failing page's effects were rolled back.
is($node->safe_psql('postgres',
		"SELECT count(*) FROM perm WHERE id BETWEEN $first AND $last AND n <> 0"),
	'0', 'rows of the failed page are untouched');
is($node->safe_psql('postgres', 'SELECT n FROM perm WHERE id = 2222'),
	'0', 'the failing row itself is untouched');

# No row twice; mapped rows = processed; all rows outside the failed shard
# mapped exactly once.
is($node->safe_psql('postgres', 'SELECT count(*) FROM perm WHERE n > 1'),
	'0', 'no row mapped twice');
is($node->safe_psql('postgres', 'SELECT count(*) FROM perm WHERE n = 1'),
	$info->{processed}, 'rows mapped = processed');
# The unmapped rows are one contiguous block that starts at the failing
# page: everything before it in the failed shard and every other shard was
# mapped exactly once.  (The ids are 1..rows without gaps.)
is( $node->safe_psql(
		'postgres', q{
		SELECT min(id), max(id) - min(id) + 1 = count(*)
		  FROM perm WHERE n = 0}),
	"$first|t",
	'unmapped rows are one contiguous block starting at the failing page');
is($node->safe_psql('postgres',
		"SELECT sum(processed) FROM dsmapper.shards WHERE job_id = $job"),
	$info->{processed}, 'sum of shard processed = job processed');

##
## Transient error: SQLSTATE 40001 the first time key 3333 is seen.  A
## sequence (non-transactional) makes only the first call fail, and another
## sequence keeps the time of that failure across the rollback.
##
create_counter_table($node, 'trans', $rows);
$node->safe_psql(
	'postgres', q{
	CREATE SEQUENCE fail_count;
	CREATE SEQUENCE fail_at_ms;
	CREATE TABLE trans_calls (first_key bigint, last_key bigint,
	                          at timestamptz DEFAULT clock_timestamp());
});
create_counter_mapper(
	$node, 'count_trans', 'trans',
	extra => q{
		INSERT INTO trans_calls (first_key, last_key)
		VALUES (keys[1], keys[cardinality(keys)]);
		IF 3333 = ANY (keys) AND nextval('fail_count') = 1 THEN
			PERFORM setval('fail_at_ms',
				(extract(epoch FROM clock_timestamp()) * 1000)::bigint);
			RAISE EXCEPTION 'please retry' USING ERRCODE = '40001';
		END IF;});

$job = launch($node, 'count_trans', 'trans', 'shards => 4, page_size => 100');
ok( poll_until(
		$node, qq{
		SELECT count(*) FROM dsmapper.shards
		 WHERE job_id = $job AND attempts = 1 AND next_attempt IS NOT NULL
		   AND error_sqlstate = '40001'},
		'1', 30),
	'a transient failure shows attempts = 1 and a next_attempt');
is(wait_job($node, $job), 'succeeded', 'job with a transient error succeeds');
is($node->safe_psql('postgres', "SELECT last_value FROM fail_count"),
	'2', 'the page was called twice: failed once, then retried');
is(counter_summary($node, 'trans'), "$rows|$rows|0|0",
	'transient error: every row mapped exactly once');
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND (attempts <> 0 OR error IS NOT NULL OR error_sqlstate IS NOT NULL)"
	),
	'0',
	'attempts and errors are reset after the page succeeds');
is(job_info($node, $job)->{error}, '', 'the job has no error');

# The retry came after a backoff of about a second.
my $delay = $node->safe_psql(
	'postgres', q{
	SELECT extract(epoch FROM at) - (SELECT last_value FROM fail_at_ms) / 1000.0
	  FROM trans_calls WHERE 3333 BETWEEN first_key AND last_key});
note "retry came $delay s after the failure";
cmp_ok($delay, '>=', 0.5, 'retry waited for a backoff');
cmp_ok($delay, '<', 10, 'retry came soon enough');
is($node->safe_psql('postgres',
		'SELECT count(*) FROM trans_calls WHERE 3333 BETWEEN first_key AND last_key'),
	'1', 'the failed attempt left no committed trace');

##
## A transient error that never goes away fails the shard after
## max_attempts (2 here: one backoff of about a second).
##
create_counter_table($node, 'always', 1000);
create_counter_mapper($node, 'count_always', 'always',
	extra => q{IF 777 = ANY (keys) THEN
		RAISE EXCEPTION 'still locked' USING ERRCODE = '55P03'; END IF;});
$job = launch($node, 'count_always', 'always',
	'shards => 2, page_size => 50, max_attempts => 2');
is(wait_job($node, $job), 'failed', 'a transient error on every attempt fails the job');
is( $node->safe_psql(
		'postgres',
		"SELECT attempts, error_sqlstate, error ~ 'still locked', error_first_key::bigint <= 777 AND error_last_key::bigint >= 777 FROM dsmapper.shards WHERE job_id = $job AND state = 'failed'"
	),
	'2|55P03|t|t',
	'the shard failed after max_attempts with the error recorded');
is($node->safe_psql('postgres', 'SELECT count(*) FROM always WHERE n > 1'),
	'0', 'no row mapped twice');
is($node->safe_psql('postgres', 'SELECT n FROM always WHERE id = 777'),
	'0', 'the failing row is untouched');

##
## A split that keeps failing with a transient error (a filter whose
## function always raises 40001) is retried with backoff, then the job
## fails after max_attempts instead of staying in 'starting' forever.
##
create_counter_table($node, 'nosplit', 100);
create_counter_mapper($node, 'count_nosplit', 'nosplit');
$node->safe_psql('postgres', q{
	CREATE FUNCTION always_conflicts(v bigint) RETURNS boolean
	LANGUAGE plpgsql AS $$
	BEGIN
		RAISE EXCEPTION 'conflict while splitting' USING ERRCODE = '40001';
	END $$;
});
$job = launch($node, 'count_nosplit', 'nosplit',
	"max_attempts => 2, filter => 'always_conflicts(id)'");
is(wait_job($node, $job), 'failed', 'a split failing on every attempt fails the job');
like($node->safe_psql('postgres', "SELECT error FROM dsmapper.jobs WHERE job_id = $job"),
	qr/could not split: .*conflict while splitting/, 'the job says why');
is($node->safe_psql('postgres', "SELECT count(*) FROM dsmapper.queue WHERE job_id = $job"),
	'0', 'nothing of it is left in the queue');

$node->stop;
done_testing();
