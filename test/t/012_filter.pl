
# 012_filter.pl: a filter maps only the rows it matches, each once; processed
# and expected count only them (expected exactly on a small table, closely
# on a block-sampled large one).  Filters that name other tables or unknown
# columns, are not boolean, or try to break out of their expression are
# refused at launch with nothing stored.  The filter runs as the launching
# role: a function that role may not execute is refused at launch, and in
# the workers the filter sees the launching role as current_user.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('filter');

# f_small and f_big: (id, n, tag, hits); n = id, tag set on some rows; the
# mapper counts in hits.
sub create_filter_table
{
	my ($table, $rows, $pad) = @_;
	$node->safe_psql(
		'postgres', qq{
		CREATE TABLE $table (id bigint PRIMARY KEY, n integer NOT NULL,
		                     tag text, pad text, hits integer NOT NULL DEFAULT 0);
		INSERT INTO $table (id, n, tag, pad)
		SELECT g, g, CASE WHEN g % 10 = 0 THEN ') OR (true' END, repeat('x', $pad)
		  FROM generate_series(1, $rows) g ORDER BY random();
		ANALYZE $table;
		CREATE FUNCTION map_$table(keys bigint[], params jsonb) RETURNS void
		LANGUAGE plpgsql AS \$fn\$
		BEGIN
			UPDATE $table SET hits = hits + 1 WHERE id = ANY (keys);
		END \$fn\$;
		SELECT dsmapper_register('map_$table', 'map_$table(bigint[], jsonb)');
	});
	return;
}

# hits_summary(table, predicate): "matching rows with hits = 1 | rows that
# should have hits = 1 | rows with wrong hits".
sub hits_summary
{
	my ($table, $pred) = @_;
	return $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FILTER (WHERE ($pred) AND hits = 1),
		       count(*) FILTER (WHERE ($pred)),
		       count(*) FILTER (WHERE hits <> CASE WHEN ($pred) THEN 1 ELSE 0 END)
		  FROM $table});
}

my $small = 3000;
create_filter_table('f_small', $small, 0);

##
## Small table: exact.
##
my $job = launch($node, 'map_f_small', 'f_small',
	q{shards => 4, page_size => 100, filter => 'n % 3 = 0'});
is(wait_job($node, $job, timeout => '30 s'), 'succeeded', 'filtered job succeeds');
is(hits_summary('f_small', 'n % 3 = 0'), '1000|1000|0',
	'exactly the matching rows were mapped, each once');
my $info = job_info($node, $job);
is($info->{processed}, 1000, 'processed counts only matching rows');
is($info->{expected}, 1000, 'expected is exact on a small table');
is($info->{progress}, '100', 'progress is 100');
cmp_ok($info->{shards}, '>', 1, 'several shards');
{
	my @problems = shard_range_mismatches($node, $job, 'f_small', 'bigint',
		filter => 'n % 3 = 0');
	ok(!@problems, 'each shard processed exactly its matching rows')
	  or diag(join("\n", @problems));
}

# A filter with a comment at its end, and one with parentheses inside a
# string literal, are ordinary expressions.
$node->safe_psql('postgres', 'UPDATE f_small SET hits = 0');
$job = launch($node, 'map_f_small', 'f_small',
	q{shards => 4, page_size => 100, filter => 'n % 3 = 0 -- every third row'});
is(wait_job($node, $job, timeout => '30 s'), 'succeeded', 'filter ending in a comment: job succeeds');
is(hits_summary('f_small', 'n % 3 = 0'), '1000|1000|0',
	'filter ending in a comment: matching rows mapped once');

$node->safe_psql('postgres', 'UPDATE f_small SET hits = 0');
$job = launch($node, 'map_f_small', 'f_small',
	q{shards => 4, page_size => 100, filter => $f$n % 2 = 0 AND tag IS NOT DISTINCT FROM ') OR (true'$f$});
is(wait_job($node, $job, timeout => '30 s'), 'succeeded',
	'filter with parentheses in a string literal: job succeeds');
is(hits_summary('f_small', q{n % 2 = 0 AND tag IS NOT DISTINCT FROM ') OR (true'}),
	'300|300|0', 'filter with parentheses in a string literal: matching rows mapped once');

##
## Launches that must be refused, with nothing stored and nothing mapped.
##
$node->safe_psql('postgres', 'UPDATE f_small SET hits = 0');
$node->safe_psql('postgres',
	'CREATE TABLE other (id bigint PRIMARY KEY, x integer); INSERT INTO other VALUES (1, 1)');
my $jobs_before = job_count($node);

my @refused = (
	[ 'other.x = 1', qr/other/, 'a column of another table' ],
	[ 'nosuch > 0', qr/nosuch/, 'an unknown column' ],
	[ 'n + 1', qr/boolean/, 'an integer expression' ],
	[ 'tag', qr/boolean/, 'a text column' ],
	[ 'true; DROP TABLE f_small', qr/ERROR/, 'two statements' ],
	[ 'true); DROP TABLE f_small; SELECT (true', qr/ERROR/, 'statements smuggled between parentheses' ],
	[ 'n % 3 = 0) OR (true', qr/ERROR/, 'closing its parenthesis to OR more rows in' ],
	[ 'true) OR (true', qr/ERROR/, 'closing its parenthesis to OR everything in' ],
	[ 'true)) OR ((true', qr/ERROR/, 'closing two parentheses' ],
	[ 'true) ORDER BY (1', qr/ERROR/, 'closing its parenthesis to add ORDER BY' ],
	[ 'true) LIMIT (1', qr/ERROR/, 'closing its parenthesis to add LIMIT' ],
	[ 'true) FROM pg_class WHERE (true', qr/ERROR/, 'closing its parenthesis to add FROM' ],
	[ 'true), (true', qr/ERROR/, 'two expressions' ],
	[ 'true) UNION SELECT (true', qr/ERROR/, 'a UNION' ],
	[ 'true /*', qr/ERROR/, 'an unterminated comment' ],
	[ '', qr/ERROR/, 'an empty filter' ],);
foreach my $r (@refused)
{
	my ($filter, $re, $what) = @$r;
	(my $lit = $filter) =~ s/'/''/g;
	my $err = launch_error($node,
		"SELECT dsmapper_launch('map_f_small', 'f_small', shards => 4, page_size => 100, filter => '$lit')"
	);
	ok(defined $err && $err =~ /ERROR/ && $err =~ $re, "filter with $what is refused at launch")
	  or diag("filter: $filter\nerror: " . ($err // '(none: launched)'));
}
is(job_count($node), $jobs_before, 'refused filters stored no job');
is($node->safe_psql('postgres', 'SELECT count(*), sum(hits) FROM f_small'),
	"$small|0", 'the table is intact and no row was mapped');

##
## The filter runs as the launching role.
##
$node->safe_psql(
	'postgres', q{
	CREATE ROLE alice LOGIN;
	GRANT SELECT, UPDATE ON f_small TO alice;
	CREATE FUNCTION secret_pred(integer) RETURNS boolean LANGUAGE sql AS 'SELECT true';
	REVOKE EXECUTE ON FUNCTION secret_pred(integer) FROM PUBLIC;
	CREATE FUNCTION is_alice() RETURNS boolean LANGUAGE sql STABLE
	AS $$SELECT current_user = 'alice'$$;
});
my ($ret, $out, $err) = $node->psql(
	'postgres',
	"SELECT dsmapper_launch('map_f_small', 'f_small', shards => 4, page_size => 100, filter => 'secret_pred(n)')",
	extra_params => [ '-U', 'alice' ]);
isnt($ret, 0, 'a filter calling a function the launcher may not execute is refused');
like($err, qr/permission denied for function secret_pred/, 'the error names the function');
is(job_count($node), $jobs_before, 'nothing stored');

($ret, $job, $err) = $node->psql(
	'postgres',
	"SELECT dsmapper_launch('map_f_small', 'f_small', shards => 4, page_size => 100, filter => 'is_alice() AND n % 2 = 0')",
	extra_params => [ '-U', 'alice' ]);
is($ret, 0, 'alice launches a job whose filter checks current_user') or diag($err);
is(wait_job($node, $job, timeout => '30 s'), 'succeeded', 'alice\'s filtered job succeeds');
is(hits_summary('f_small', 'n % 2 = 0'), '1500|1500|0',
	'the workers evaluated the filter as alice: her rows, each once');
is(job_info($node, $job)->{expected}, 1500, 'the split evaluated the filter as alice too');

##
## Large table (over 1024 blocks): block-sampled split.
##
my $big = 150000;
create_filter_table('f_big', $big, 60);
cmp_ok($node->safe_psql('postgres', "SELECT pg_relation_size('f_big') / 8192"),
	'>', 1024, 'f_big has more than 1024 blocks');
$job = launch($node, 'map_f_big', 'f_big',
	q{shards => 8, page_size => 1000, filter => 'n % 3 = 0'});
is(wait_job($node, $job, timeout => '60 s'), 'succeeded', 'large filtered job succeeds');
is(hits_summary('f_big', 'n % 3 = 0'), '50000|50000|0',
	'large table: exactly the matching rows were mapped, each once');
my $b = shard_balance($node, $job);
diag(sprintf("f_big with filter: %d shards, processed %s, max/mean %.3f, expected %d",
	$b->{shards}, $b->{counts}, $b->{ratio}, $b->{expected}));
is($b->{processed}, 50000, 'large table: processed counts only matching rows');
is($b->{shards}, 8, 'large table: 8 shards');
cmp_ok($b->{ratio}, '<=', 2.0, 'large table: largest shard at most 2 x the mean');
cmp_ok(abs($b->{expected} - 50000), '<=', 5000, 'large table: expected within 10% of the matching rows');
{
	my @problems = shard_range_mismatches($node, $job, 'f_big', 'bigint', filter => 'n % 3 = 0');
	ok(!@problems, 'large table: each shard processed exactly its matching rows')
	  or diag(join("\n", @problems));
}

# A filter may name the table by the alias that launch and pages use; the
# split (sampled on f_big, read whole on f_small) uses it too.
foreach my $t ('f_small', 'f_big')
{
	$job = launch($node, "map_$t", $t,
		q{shards => 4, page_size => 1000, filter => '__dsmapper_row.n % 7 = 0'});
	is(wait_job($node, $job, timeout => '60 s'), 'succeeded',
		"$t: a filter naming the table alias works through split and pages");
}

$node->stop;
done_testing();
