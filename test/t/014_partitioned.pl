
# 014_partitioned.pl: jobs over partitioned tables.
#
# A small partitioned table is read whole (exact counts).  A large one is
# sized up from its leaf partitions and block-sampled, never read whole:
# its expected count is an estimate within 10%, and every row is mapped
# exactly once, in shards that cover the partitions' whole key space.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

# auto_explain logs the plan of every statement the workers run, which
# shows how the split read the table.
my $node = new_node('partitioned',
	extra_conf => "shared_preload_libraries = 'dsmapper, auto_explain'\n"
	  . "auto_explain.log_min_duration = 0\n"
	  . "auto_explain.log_nested_statements = on\n");

# make_parted(table, rows): range-partitioned on id into four partitions,
# with a counter column and some padding per row.
sub make_parted
{
	my ($table, $rows, $pad) = @_;
	my $q = int($rows / 4);
	$node->safe_psql(
		'postgres', qq{
		CREATE TABLE $table (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0, pad text)
			PARTITION BY RANGE (id);
		CREATE TABLE ${table}_1 PARTITION OF $table FOR VALUES FROM (MINVALUE) TO ($q);
		CREATE TABLE ${table}_2 PARTITION OF $table FOR VALUES FROM ($q) TO (@{[2 * $q]});
		CREATE TABLE ${table}_3 PARTITION OF $table FOR VALUES FROM (@{[2 * $q]}) TO (@{[3 * $q]});
		CREATE TABLE ${table}_4 PARTITION OF $table FOR VALUES FROM (@{[3 * $q]}) TO (MAXVALUE);
		INSERT INTO $table (id, pad)
		SELECT g, repeat('x', $pad) FROM generate_series(1, $rows) g ORDER BY random();
		ANALYZE $table;
		CREATE FUNCTION map_$table(keys bigint[], params jsonb) RETURNS void
		LANGUAGE plpgsql AS \$fn\$
		BEGIN
			UPDATE $table SET n = n + 1 WHERE id = ANY (keys);
		END \$fn\$;
		SELECT dsmapper_register('map_$table', 'map_$table(bigint[], jsonb)');
	});
	return;
}

sub summary
{
	my ($table) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE n = 1) || '|' || count(*) || '|' || count(*) FILTER (WHERE n <> 1) FROM $table"
	);
}

# Small: exact.
make_parted('p_small', 2000, 0);
my $job = launch($node, 'map_p_small', 'p_small', 'shards => 4, page_size => 100');
is(wait_job($node, $job), 'succeeded', 'a job over a small partitioned table succeeds');
is(summary('p_small'), '2000|2000|0', 'every row of every partition mapped once');
my $b = shard_balance($node, $job);
is($b->{expected}, 2000, 'a small partitioned table gets exact expected counts');
is($b->{shards}, 4, 'four shards');

# Large: more than 1024 blocks in all, block-sampled.
my $rows = 150000;
make_parted('p_big', $rows, 60);
cmp_ok(
	$node->safe_psql('postgres',
		"SELECT sum(pg_relation_size(c.oid)) / 8192 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'p_big'::regclass"
	),
	'>', 1024, 'the partitions hold more than 1024 blocks in all');
my $log_offset = log_position($node);
$job = launch($node, 'map_p_big', 'p_big', 'shards => 8, page_size => 1000');
is(wait_job($node, $job, timeout => '120 s'), 'succeeded', 'a job over a large partitioned table succeeds');
is(summary('p_big'), "$rows|$rows|0", 'every row mapped exactly once');
$b = shard_balance($node, $job);
diag(sprintf("p_big: %d shards, processed %s, max/mean %.3f, expected %d",
	$b->{shards}, $b->{counts}, $b->{ratio}, $b->{expected}));
is($b->{shards}, 8, 'eight shards');
my $log = log_since($node, $log_offset);
like($log, qr/TABLESAMPLE SYSTEM/, 'the split sampled the table');
like($log, qr/Sample Scan on p_big_\d/, 'through sample scans of the partitions');
cmp_ok(abs($b->{expected} - $rows), '<=', $rows / 10, 'the estimate is within 10%');
cmp_ok($b->{ratio}, '<=', 1.5, 'the shards are balanced (largest at most 1.5 x the mean)');
{
	my @problems = shard_range_mismatches($node, $job, 'p_big', 'bigint');
	ok(!@problems, 'the shard ranges cover the key space and hold their processed rows')
	  or diag(join("\n", @problems));
}

done_testing();
