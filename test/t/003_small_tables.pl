
# 003_small_tables.pl: empty and tiny tables get one shard and succeed; text,
# int4 and int2 primary keys work in keys mode.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('small');

# Empty table: one shard, nothing processed, succeeded.
create_counter_table($node, 'empty_t', 0);
create_counter_mapper($node, 'count_empty', 'empty_t');
my $job = launch($node, 'count_empty', 'empty_t', 'shards => 8');
is(wait_job($node, $job), 'succeeded', 'job on an empty table succeeds');
my $info = job_info($node, $job);
is($info->{shards}, 1, 'empty table gets one shard');
is($info->{shards_done}, 1, 'that shard succeeded');
is($info->{processed}, 0, 'nothing processed');
is($info->{expected}, 0, 'expected is 0');
is($info->{progress}, '100', 'progress is 100');

# 1 row and 10 rows with shards => 8: fewer shards (one), every row once.
foreach my $n (1, 10)
{
	create_counter_table($node, "t$n", $n);
	create_counter_mapper($node, "count_t$n", "t$n");
	my $j = launch($node, "count_t$n", "t$n", 'shards => 8');
	is(wait_job($node, $j), 'succeeded', "$n-row job succeeds");
	my $i = job_info($node, $j);
	is($i->{shards}, 1, "$n-row table gets one shard");
	is($i->{processed}, $n, "$n-row table: processed $n");
	is(counter_summary($node, "t$n"), "$n|$n|0|0",
		"$n-row table: every row mapped exactly once");
}

# 10 rows with page_size 2 may use several shards, but still every row once.
{
	my $j = launch($node, 'count_t10', 't10', 'shards => 8, page_size => 2');
	is(wait_job($node, $j), 'succeeded', '10 rows with page_size 2 succeeds');
	my $i = job_info($node, $j);
	cmp_ok($i->{shards}, '<=', 5, 'no shard expected to hold fewer than page_size rows');
	is($node->safe_psql('postgres', 'SELECT count(*) FILTER (WHERE n = 2) FROM t10'),
		'10', 'second job on t10 mapped every row once more');
}

# Text primary key, with keys that need quoting in arrays and composite
# literals (commas, quotes, braces, backslashes, spaces, "NULL", empty).
$node->safe_psql(
	'postgres', q{
	CREATE TABLE text_t (id text PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO text_t (id)
	SELECT 'k' || lpad(g::text, 5, '0') FROM generate_series(1, 2000) g;
	INSERT INTO text_t (id) VALUES
		(''), ('NULL'), ('null'), ('a,b'), ('quo"te'), ('{brace}'), ('(paren)'),
		('back\slash'), ('two words'), (' lead'), ('trail '), ('k00500,x'),
		('k01000"'), ('k01500\'), ('zzz'), (E'tab\there'), ('ünïcödé');
	ANALYZE text_t;
	CREATE FUNCTION count_text(keys text[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE text_t SET n = n + 1 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('count-text', 'count_text(text[], jsonb)');
});
my $text_rows = $node->safe_psql('postgres', 'SELECT count(*) FROM text_t');
$job = launch($node, 'count-text', 'text_t', 'shards => 4, page_size => 7');
is(wait_job($node, $job), 'succeeded', 'text key job succeeds');
is(counter_summary($node, 'text_t'), "$text_rows|$text_rows|0|0",
	'text keys: every row mapped exactly once');
is(job_info($node, $job)->{processed}, $text_rows, 'text keys: processed = rows');
cmp_ok(job_info($node, $job)->{shards}, '>', 1, 'text key table has several shards');

# int4 key, negative values included.
$node->safe_psql(
	'postgres', q{
	CREATE TABLE int4_t (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO int4_t (id) SELECT g FROM generate_series(-3000, 2999) g;
	INSERT INTO int4_t (id) VALUES (-2147483648), (2147483647);
	ANALYZE int4_t;
	CREATE FUNCTION count_int4(keys integer[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE int4_t SET n = n + 1 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('count-int4', 'count_int4(integer[], jsonb)');
});
$job = launch($node, 'count-int4', 'int4_t', 'shards => 4, page_size => 100');
is(wait_job($node, $job), 'succeeded', 'int4 key job succeeds');
is(counter_summary($node, 'int4_t'), "6002|6002|0|0",
	'int4 keys: every row mapped exactly once');

# int2 key.
$node->safe_psql(
	'postgres', q{
	CREATE TABLE int2_t (id smallint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO int2_t (id) SELECT g FROM generate_series(-150, 149) g;
	INSERT INTO int2_t (id) VALUES (-32768), (32767);
	ANALYZE int2_t;
	CREATE FUNCTION count_int2(keys smallint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE int2_t SET n = n + 1 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('count-int2', 'count_int2(smallint[], jsonb)');
});
$job = launch($node, 'count-int2', 'int2_t', 'shards => 3, page_size => 10');
is(wait_job($node, $job), 'succeeded', 'int2 key job succeeds');
is(counter_summary($node, 'int2_t'), "302|302|0|0",
	'int2 keys: every row mapped exactly once');

$node->stop;
done_testing();
