
# 011_rows_mode.pl: rows mode (the mapper takes an array of the table's row
# type) on a single-column key, a two-column and a three-column key: every
# row is mapped exactly once, with its current values, in key order within
# each page.  Keys mode on a composite key and mappers whose array type
# fits neither the key nor the row are refused at launch.  The page query
# of a composite key is served by the primary key index (row comparison in
# the Index Cond, no Sort), and a large composite-key table is split into
# balanced shards.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

# auto_explain shows the plans of the workers' page queries (enabled only in
# the database "big", below).
my $node = new_node('rows_mode',
	extra_conf => "shared_preload_libraries = 'dsmapper, auto_explain'\n");

# Text values that need quoting in a row literal.
my $tricky = q{ARRAY['x)y,(z', 'a,b', 'quo"te', '(paren)', ' lead', 'back\slash', '', 'NULL']};

$node->safe_psql(
	'postgres', qq{
	CREATE TABLE violations (tab text, kind text, detail text);

	-- one key column
	CREATE TABLE r1 (id bigint PRIMARY KEY, payload text, n integer NOT NULL DEFAULT 0);
	INSERT INTO r1 (id, payload)
	SELECT g * 13, md5((g * 13)::text) FROM generate_series(1, 5000) g ORDER BY random();

	-- two key columns
	CREATE TABLE r2 (a integer, b text, payload text, n integer NOT NULL DEFAULT 0,
	                 PRIMARY KEY (a, b));
	INSERT INTO r2 (a, b, payload)
	SELECT a, b, md5(a || '/' || b)
	  FROM (SELECT g / 8 AS a, 'k,' || ($tricky)[1 + g % 8] AS b
	          FROM generate_series(1, 4000) g) s ORDER BY random();

	-- three key columns, the second a date
	CREATE TABLE r3 (g integer, d date, s text, payload text, n integer NOT NULL DEFAULT 0,
	                 PRIMARY KEY (g, d, s));
	INSERT INTO r3 (g, d, s, payload)
	SELECT i % 37, date '2024-02-27' + (i % 11), ($tricky)[1 + i % 8] || i,
	       md5(i::text)
	  FROM generate_series(1, 4000) i ORDER BY random();
	ANALYZE r1; ANALYZE r2; ANALYZE r3;

	-- Each mapper records pages out of key order and rows whose values are
	-- not the table's, then counts the rows it was given.
	CREATE FUNCTION map_r1(rows r1[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS \$fn\$
	BEGIN
		IF EXISTS (SELECT 1 FROM generate_subscripts(rows, 1) i
		            WHERE i > 1 AND NOT ((rows[i - 1]).id < (rows[i]).id)) THEN
			INSERT INTO violations VALUES ('r1', 'order', rows::text);
		END IF;
		INSERT INTO violations
		SELECT 'r1', 'values', r::text FROM unnest(rows) r
		 WHERE r.payload IS DISTINCT FROM md5(r.id::text);
		UPDATE r1 SET n = r1.n + 1 FROM unnest(rows) r WHERE r1.id = r.id;
	END \$fn\$;

	CREATE FUNCTION map_r2(rows r2[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS \$fn\$
	BEGIN
		IF EXISTS (SELECT 1 FROM generate_subscripts(rows, 1) i
		            WHERE i > 1
		              AND NOT (((rows[i - 1]).a, (rows[i - 1]).b) < ((rows[i]).a, (rows[i]).b))) THEN
			INSERT INTO violations VALUES ('r2', 'order', rows::text);
		END IF;
		INSERT INTO violations
		SELECT 'r2', 'values', r::text FROM unnest(rows) r
		 WHERE r.payload IS DISTINCT FROM md5(r.a || '/' || r.b);
		UPDATE r2 SET n = r2.n + 1 FROM unnest(rows) r WHERE r2.a = r.a AND r2.b = r.b;
	END \$fn\$;

	CREATE FUNCTION map_r3(rows r3[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS \$fn\$
	BEGIN
		IF EXISTS (SELECT 1 FROM generate_subscripts(rows, 1) i
		            WHERE i > 1
		              AND NOT (((rows[i - 1]).g, (rows[i - 1]).d, (rows[i - 1]).s)
		                       < ((rows[i]).g, (rows[i]).d, (rows[i]).s))) THEN
			INSERT INTO violations VALUES ('r3', 'order', rows::text);
		END IF;
		INSERT INTO violations
		SELECT 'r3', 'values', r::text FROM unnest(rows) r
		 WHERE r.payload IS DISTINCT FROM md5(substring(r.s FROM '[0-9]+\$'));
		UPDATE r3 SET n = r3.n + 1 FROM unnest(rows) r
		 WHERE r3.g = r.g AND r3.d = r.d AND r3.s = r.s;
	END \$fn\$;

	SELECT dsmapper_register('map_r1', 'map_r1(r1[], jsonb)');
	SELECT dsmapper_register('map_r2', 'map_r2(r2[], jsonb)');
	SELECT dsmapper_register('map_r3', 'map_r3(r3[], jsonb)');
});

my %rows = (r1 => 5000, r2 => 4000, r3 => 4000);
my %job;
$job{$_} = launch($node, "map_$_", $_, 'shards => 4, page_size => 97') foreach sort keys %rows;

foreach my $t (sort keys %rows)
{
	is(wait_job($node, $job{$t}, timeout => '30 s'), 'succeeded', "$t: rows-mode job succeeds");
	is(counter_summary($node, $t), "$rows{$t}|$rows{$t}|0|0",
		"$t: every row mapped exactly once");
	my $info = job_info($node, $job{$t});
	is($info->{processed}, $rows{$t}, "$t: processed = $rows{$t}");
	is($info->{expected}, $rows{$t}, "$t: expected is exact");
	is($info->{shards}, 4, "$t: 4 shards");
	is($node->safe_psql('postgres', "SELECT count(*) FROM violations WHERE tab = '$t'"),
		'0', "$t: rows in key order within every page, with the table's values")
	  or diag($node->safe_psql('postgres',
			"SELECT kind, left(detail, 300) FROM violations WHERE tab = '$t' LIMIT 3"));
}

# Shard ranges of the single-column key read back as bigint.
{
	my @problems = shard_range_mismatches($node, $job{r1}, 'r1', 'bigint');
	ok(!@problems, 'r1: ranges read back and hold each shard\'s rows')
	  or diag(join("\n", @problems));
}

# A composite key is shown as a row literal "(a,b)"; it must read back as
# one, whatever its text columns hold.
$node->safe_psql(
	'postgres', q{
	CREATE TYPE r2_key AS (a integer, b text);
	CREATE TYPE r3_key AS (g integer, d date, s text);
});
foreach my $t ('r2', 'r3')
{
	my $cols = $t eq 'r2' ? 'a, b' : 'g, d, s';
	my $lo = join(', ', map { "(x.lo).$_" } split /, /, $cols);
	my $hi = join(', ', map { "(x.hi).$_" } split /, /, $cols);
	my ($ret, $out, $err) = $node->psql(
		'postgres', qq{
		SELECT count(*) FILTER (WHERE x.processed <>
		         (SELECT count(*) FROM $t
		           WHERE (x.lo IS NULL OR ($cols) >= ($lo))
		             AND (x.hi IS NULL OR ($cols) < ($hi)))),
		       count(*)
		  FROM (SELECT processed, range_start::${t}_key AS lo, range_end::${t}_key AS hi
		          FROM dsmapper.shards WHERE job_id = $job{$t}) x});
	is($ret == 0 ? $out : "error: $err", '0|4',
		"$t: composite ranges read back as row literals and hold each shard's rows")
	  or diag($node->safe_psql('postgres',
			"SELECT shard, range_start, range_end FROM dsmapper.shards WHERE job_id = $job{$t} ORDER BY shard"));
}

##
## Launches that must be refused, with nothing stored.
##
$node->safe_psql(
	'postgres', q{
	CREATE FUNCTION keys_r2(keys integer[], params jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
	CREATE FUNCTION text_keys(keys text[], params jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
	SELECT dsmapper_register('keys_r2', 'keys_r2(integer[], jsonb)');
	SELECT dsmapper_register('text_keys', 'text_keys(text[], jsonb)');
});
my $jobs_before = job_count($node);

my $err = launch_error($node, "SELECT dsmapper_launch('keys_r2', 'r2')");
like($err, qr/ERROR:.*rows mode/s,
	'keys mode on a two-column key is refused, pointing to rows mode');
like($err, qr/2 columns|single-column|composite/,
	'the error says why (the key has several columns)');

$err = launch_error($node, "SELECT dsmapper_launch('keys_r2', 'r3')");
like($err, qr/ERROR:.*rows mode/s, 'keys mode on a three-column key is refused');

$err = launch_error($node, "SELECT dsmapper_launch('text_keys', 'r1')");
like($err, qr/ERROR:.*text\[\].*bigint/s,
	'a text[] mapper on a bigint key is refused, naming both types');

$err = launch_error($node, "SELECT dsmapper_launch('map_r1', 'r2')");
like($err, qr/ERROR:/, 'a mapper of another table\'s row type is refused');

$err = launch_error($node, "SELECT dsmapper_launch('map_r2', 'r1')");
like($err, qr/ERROR:/, 'a two-column row mapper on a one-column table is refused');

is(job_count($node), $jobs_before, 'refused launches stored no job');

##
## A large composite-key table: split from the index into balanced shards,
## and the page query is an index scan with a row comparison, no Sort.
##
$node->safe_psql('postgres', 'CREATE DATABASE big');
$node->safe_psql('postgres',
	'ALTER DATABASE big SET auto_explain.log_min_duration = 0');
my $big = 200000;
$node->safe_psql(
	'big', qq{
	CREATE EXTENSION dsmapper;
	CREATE TABLE bigc (a integer, b text, pad text, PRIMARY KEY (a, b));
	INSERT INTO bigc
	SELECT g / 8, 'b' || (g % 8), repeat('p', 40)
	  FROM generate_series(1, $big) g ORDER BY random();
	ANALYZE bigc;
	CREATE UNLOGGED TABLE seen (a integer, b text);
	CREATE FUNCTION map_bigc(rows bigc[], params jsonb) RETURNS void
	LANGUAGE sql AS 'INSERT INTO seen SELECT r.a, r.b FROM unnest(rows) r';
	SELECT dsmapper_register('map_bigc', 'map_bigc(bigc[], jsonb)');
});
cmp_ok($node->safe_psql('big', "SELECT pg_relation_size('bigc') / 8192"),
	'>', 1024, 'bigc has more than 1024 blocks');

my $log_offset = log_position($node);
my $bj = launch($node, 'map_bigc', 'bigc', 'shards => 4, page_size => 1000', db => 'big');
is(wait_job($node, $bj, db => 'big', timeout => '60 s'), 'succeeded', 'bigc: rows-mode job succeeds');
is($node->safe_psql('big', 'SELECT count(*), count(DISTINCT (a, b)) FROM seen'),
	"$big|$big", 'bigc: every row mapped exactly once');
{
	my $b = shard_balance($node, $bj, db => 'big');
	diag(sprintf("bigc: %d shards, processed %s, max/mean %.3f, expected %d",
		$b->{shards}, $b->{counts}, $b->{ratio}, $b->{expected}));
	is($b->{shards}, 4, 'bigc: 4 shards');
	cmp_ok($b->{ratio}, '<=', 1.25, 'bigc: largest shard at most 1.25 x the mean');
	cmp_ok(abs($b->{expected} - $big), '<=', 0.1 * $big, 'bigc: expected within 10% of the rows');
}

# The plans of the workers' page queries, from auto_explain (run with the
# actual bound values).
my $log = log_since($node, $log_offset);
my @plans = grep { /Query Text: SELECT [^\n]*FROM public\.bigc AS __dsmapper_row/ }
  split /\n(?=\S)/, $log;
my @lower = grep { /Query Text: [^\n]*OPERATOR\(pg_catalog\.>=?\) ROW\(\$1/ } @plans;
cmp_ok(scalar(@plans), '>=', $big / 1000, 'auto_explain logged the page queries (' . scalar(@plans) . ')');
ok(@lower > 0, 'page queries with a lower bound were logged');
# Near the end of the last shard, where the planner expects only a few
# thousand rows, a bitmap scan and a sort of those rows is a fair choice;
# everywhere else the index must deliver the rows in order.
my @ordered = grep { /Index (Only )?Scan using bigc_pkey/ && !/\bSort\b/ } @plans;
cmp_ok(scalar(@ordered), '>=', 0.9 * @plans,
	'page queries are index scans on the primary key without a Sort ('
	  . scalar(@ordered) . ' of ' . scalar(@plans) . ')')
  or diag((grep { !/Index (Only )?Scan using bigc_pkey/ || /\bSort\b/ } @plans)[0]);
is(scalar(grep { !/Index Cond: [^\n]*ROW\([^\n]*\) >=? ROW\(/ } @lower), 0,
	'every lower bound is a row comparison in the Index Cond')
  or diag((grep { !/Index Cond: [^\n]*ROW\([^\n]*\) >=? ROW\(/ } @lower)[0]);

# The worker's query text with both bounds (from a middle shard, or made by
# adding the upper bound the worker would add to a lower-bounded one), with
# typed parameters and a generic plan.
my ($qtext) = map { /Query Text: ([^\n]*)/ } grep { /Query Text: [^\n]*\$4/ } @plans;
if (!defined $qtext && @lower)
{
	($qtext) = $lower[0] =~ /Query Text: ([^\n]*)/;
	my ($rowexpr) = $qtext =~ /AND (ROW\(.*?\)) OPERATOR\(pg_catalog\.>=?\) ROW\(\$1, \$2\)/;
	$qtext =~ s/ ORDER BY / AND $rowexpr OPERATOR(pg_catalog.<) ROW(\$3, \$4) ORDER BY / if $rowexpr;
}
$qtext //= 'SELECT 1';
# The page size is a parameter of the worker's prepared query; fix it here.
$qtext =~ s/LIMIT \$\d+/LIMIT 1000/;
note("page query: $qtext");
my $explain = $node->safe_psql(
	'big', qq{
	SET plan_cache_mode = force_generic_plan;
	PREPARE page_q(integer, text, integer, text) AS $qtext;
	EXPLAIN EXECUTE page_q(100, 'b3', 20000, 'b1');
});
like($explain, qr/Index (Only )?Scan using bigc_pkey/,
	'generic plan of the worker query: index scan on the primary key')
  or diag("$qtext\n$explain");
like($explain, qr/Index Cond: .*ROW\(.*\) > ROW\(\$1, \$2\).*ROW\(.*\) < ROW\(\$3, \$4\)/s,
	'generic plan: both bounds as row comparisons in the Index Cond');
unlike($explain, qr/\bSort\b/, 'generic plan: no Sort');

# The shape written out by hand.
$explain = $node->safe_psql(
	'big', q{
	SET plan_cache_mode = force_generic_plan;
	PREPARE hand_q(integer, text, integer, text) AS
	SELECT a, b, __dsmapper_row FROM bigc AS __dsmapper_row
	 WHERE true AND (a, b) > ($1, $2) AND (a, b) < ($3, $4)
	 ORDER BY a, b LIMIT 1000;
	EXPLAIN EXECUTE hand_q(100, 'b3', 20000, 'b1');
});
like($explain, qr/Index (Only )?Scan using bigc_pkey/, 'generic plan of the hand-written shape: index scan')
  or diag($explain);
like($explain, qr/Index Cond: .*ROW\(.*\) > ROW\(\$1, \$2\)/, 'hand-written shape: row comparison in the Index Cond');
unlike($explain, qr/\bSort\b/, 'hand-written shape: no Sort');

$node->stop;
done_testing();
