
# 002_pages.pl: pages hold at most page_size keys, in ascending order, each
# key once; dsmapper_current_job()/dsmapper_current_shard() and params reach
# the mapper.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('pages');
my $rows = 5000;
my $page_size = 97;
my $shards = 4;

# Keys with gaps, not inserted in key order.
$node->safe_psql(
	'postgres', qq{
	CREATE TABLE t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0, tag text);
	INSERT INTO t (id)
	SELECT g * 3 FROM generate_series(1, $rows) g ORDER BY random();
	ANALYZE t;

	CREATE TABLE calls (
		call       bigserial PRIMARY KEY,
		job        bigint,
		shard      integer,
		nkeys      integer,
		first_key  bigint,
		last_key   bigint,
		ascending  boolean,
		keys       bigint[],
		at         timestamptz DEFAULT clock_timestamp());

	CREATE FUNCTION log_page(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS \$fn\$
	BEGIN
		INSERT INTO calls (job, shard, nkeys, first_key, last_key, ascending, keys)
		VALUES (dsmapper_current_job(), dsmapper_current_shard(),
		        cardinality(keys), keys[1], keys[cardinality(keys)],
		        keys = (SELECT array_agg(DISTINCT k ORDER BY k) FROM unnest(keys) k),
		        keys);
		UPDATE t SET n = n + 1, tag = params->>'tag' WHERE id = ANY (keys);
	END \$fn\$;
	SELECT dsmapper_register('log-page', 'log_page(bigint[], jsonb)');
});

is( $node->safe_psql('postgres',
		'SELECT dsmapper_current_job() IS NULL, dsmapper_current_shard() IS NULL'),
	't|t',
	'current job and shard are NULL outside a mapper call');

my $job = launch($node, 'log-page', 't',
	qq{params => '{"tag": "hello"}', shards => $shards, page_size => $page_size});
is(wait_job($node, $job), 'succeeded', 'job succeeds');

my $nshards = $node->safe_psql('postgres',
	"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job");
cmp_ok($nshards, '>', 1, "job has several shards ($nshards)");
cmp_ok($nshards, '<=', $shards, 'at most the shards asked for');

my $ncalls = $node->safe_psql('postgres', 'SELECT count(*) FROM calls');
cmp_ok($ncalls, '>=', int(($rows + $page_size - 1) / $page_size),
	"enough mapper calls ($ncalls)");

is($node->safe_psql('postgres',
		"SELECT count(*) FROM calls WHERE nkeys > $page_size OR nkeys < 1 OR nkeys IS NULL"),
	'0', 'every call has between 1 and page_size keys');

is($node->safe_psql('postgres', 'SELECT count(*) FROM calls WHERE NOT ascending'),
	'0', 'keys are strictly ascending within every call');

is($node->safe_psql('postgres',
		"SELECT count(*) FROM calls WHERE job IS DISTINCT FROM $job"),
	'0', 'dsmapper_current_job() is the job id inside the mapper');

is($node->safe_psql('postgres',
		"SELECT count(*) FROM calls WHERE shard IS NULL OR shard < 0 OR shard >= $nshards"),
	'0', 'dsmapper_current_shard() is a valid shard index inside the mapper');

is($node->safe_psql('postgres', 'SELECT count(DISTINCT shard) FROM calls'),
	$nshards, 'every shard made calls');

# Within a shard, calls come in ascending key order and do not overlap.
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM (
			SELECT first_key,
			       lag(last_key) OVER (PARTITION BY shard ORDER BY call) AS prev_last
			  FROM calls) s
		 WHERE first_key <= prev_last}),
	'0',
	'per shard, pages are ascending and do not overlap');

# Every key a shard got lies in that shard's range, range_start <= k < range_end.
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM calls c
		  JOIN dsmapper.shards s ON s.job_id = c.job AND s.shard = c.shard
		 WHERE (s.range_start IS NOT NULL AND c.first_key < s.range_start::bigint)
		    OR (s.range_end IS NOT NULL AND c.last_key >= s.range_end::bigint)}),
	'0',
	'every page lies inside its shard range');

# The per-shard processed counts match the calls made for that shard.
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM dsmapper.shards s
		 WHERE s.job_id = $job
		   AND s.processed IS DISTINCT FROM
		       (SELECT sum(nkeys) FROM calls c WHERE c.shard = s.shard)}),
	'0',
	'each shard processed exactly the keys of its calls');

# The union of all pages is the table, with no key twice.
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*), count(DISTINCT k) FROM calls, unnest(keys) k}),
	"$rows|$rows",
	'the pages hold every key once');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM t
		 WHERE NOT EXISTS (SELECT 1 FROM calls WHERE t.id = ANY (keys))}),
	'0',
	'no row was skipped');
is(counter_summary($node, 't'), "$rows|$rows|0|0", 'every row mapped exactly once');

# A shard's resume_from after success is its last key.
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM dsmapper.shards s
		 WHERE s.job_id = $job
		   AND s.resume_from::bigint IS DISTINCT FROM
		       (SELECT max(last_key) FROM calls c WHERE c.shard = s.shard)}),
	'0',
	'resume_from is the last key of each shard');

# params reach the mapper.
is($node->safe_psql('postgres',
		"SELECT count(*) FROM t WHERE tag IS DISTINCT FROM 'hello'"),
	'0', 'params->>tag was written to every row');
is($node->safe_psql('postgres', "SELECT params->>'tag' FROM dsmapper.jobs WHERE job_id = $job"),
	'hello', 'dsmapper.jobs shows the params');

# Still NULL outside after the job ran in this cluster.
is( $node->safe_psql('postgres',
		'SELECT dsmapper_current_job() IS NULL, dsmapper_current_shard() IS NULL'),
	't|t',
	'current job and shard are still NULL outside a mapper call');

# A page size of 1: each call gets exactly one key.
$node->safe_psql('postgres', 'TRUNCATE calls; UPDATE t SET n = 0');
$node->safe_psql('postgres', 'DELETE FROM t WHERE id > 600');
my $job1 = launch($node, 'log-page', 't',
	qq{params => '{"tag": "one"}', shards => 2, page_size => 1});
is(wait_job($node, $job1), 'succeeded', 'page_size 1 job succeeds');
is($node->safe_psql('postgres',
		'SELECT count(*), count(*) FILTER (WHERE nkeys = 1), count(DISTINCT first_key) FROM calls'),
	'200|200|200', 'page_size 1 gives one call per key');
is(counter_summary($node, 't'), "200|200|0|0", 'page_size 1 maps every row once');

$node->stop;
done_testing();
