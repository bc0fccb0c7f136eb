
# 013_balance.pl: shards balance by row count on large tables (split from
# the primary key index), however skewed the key values are: dense clusters
# far apart with huge gaps and a few extreme outliers, inserted in random
# order, a uniform table for comparison, and a table right after a bulk
# DELETE that vacuum has not cleaned up yet.  The largest shard holds at
# most 1.25 x the mean, expected is within 10% of the rows, and every row
# is mapped exactly once.  The time from launch until every shard exists
# is reported (not asserted).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use DsmTest;

my $node = new_node('balance');

# Skewed: 8 clusters of consecutive keys, 10,000 to 80,000 of them,
# starting at 10^7, 10^8, ..., 10^14, a cluster of 40,000 negative keys
# spaced by 3, and a few outliers at the ends of the bigint range: 400,006
# keys.
my $skewed_keys = q{
	SELECT (10::numeric ^ (c + 6))::bigint + i
	  FROM generate_series(1, 8) c, generate_series(1, 10000 * c) i
	UNION ALL
	SELECT -4000000000000 - i * 3 FROM generate_series(1, 40000) i
	UNION ALL
	SELECT k FROM unnest(ARRAY[-9223372036854775808, -9223372036854775000,
	                           9223372036854775000, 9223372036854775806,
	                           9223372036854775807, 4611686018427387904]::bigint[]) k
};
my $uniform_keys = q{SELECT g * 1000 FROM generate_series(1, 400000) g};

$node->safe_psql(
	'postgres', q{
	CREATE UNLOGGED TABLE seen (tab text, id bigint);
});

my %keys = (skewed => $skewed_keys, uniform => $uniform_keys);
foreach my $t ('skewed', 'uniform')
{
	$node->safe_psql(
		'postgres', qq{
		CREATE TABLE $t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
		INSERT INTO $t (id) SELECT id FROM ($keys{$t}) k(id) ORDER BY random();
		ANALYZE $t;
		CREATE FUNCTION map_$t(keys bigint[], params jsonb) RETURNS void
		LANGUAGE sql AS \$fn\$INSERT INTO seen SELECT '$t', k FROM unnest(keys) k\$fn\$;
		SELECT dsmapper_register('map_$t', 'map_$t(bigint[], jsonb)');
	});
	my $rows = $node->safe_psql('postgres', "SELECT count(*) FROM $t");
	cmp_ok($rows, '>=', 400000, "$t: $rows rows");
	cmp_ok($node->safe_psql('postgres', "SELECT pg_relation_size('$t') / 8192"),
		'>', 1024, "$t: more than 1024 blocks, so the split reads the index");

	# From launch until every shard exists.
	my $start = time();
	my $job = launch($node, "map_$t", $t, 'shards => 16, page_size => 1000');
	my $split_at;
	while (time() - $start < 60)
	{
		if ($node->safe_psql('postgres', "SELECT shards > 0 FROM dsmapper.jobs WHERE job_id = $job") eq 't')
		{
			$split_at = time();
			last;
		}
		usleep(5_000);
	}
	ok(defined $split_at, "$t: shards appear");
	diag(sprintf("%s: %d rows, launch until all shards exist: %.0f ms (includes polling)",
		$t, $rows, 1000 * (($split_at // time()) - $start)));

	is(wait_job($node, $job, timeout => '60 s'), 'succeeded', "$t: job succeeds");
	is($node->safe_psql('postgres',
			"SELECT count(*), count(DISTINCT id) FROM seen WHERE tab = '$t'"),
		"$rows|$rows", "$t: every row mapped exactly once");
	is($node->safe_psql('postgres',
			"SELECT count(*) FROM $t LEFT JOIN seen s ON s.tab = '$t' AND s.id = $t.id WHERE s.id IS NULL"),
		'0', "$t: no row missed");

	my $b = shard_balance($node, $job);
	diag(sprintf("%s: %d shards, processed %s, max/mean %.3f, expected %d",
		$t, $b->{shards}, $b->{counts}, $b->{ratio}, $b->{expected}));
	is($b->{shards}, 16, "$t: 16 shards");
	is($b->{processed}, $rows, "$t: processed = rows");
	cmp_ok($b->{ratio}, '<=', 1.25, "$t: largest shard at most 1.25 x the mean");
	cmp_ok(abs($b->{expected} - $rows), '<=', 0.1 * $rows, "$t: expected within 10% of the rows");
	my @problems = shard_range_mismatches($node, $job, $t, 'bigint');
	ok(!@problems, "$t: ranges hold each shard's rows") or diag(join("\n", @problems));
}

##
## Right after a bulk DELETE, before (auto)vacuum has cleaned the index:
## 90% of the lower half of the keys are gone.  Shards must still balance
## the rows that exist, and expected must count them, not the dead ones.
##
$node->safe_psql(
	'postgres', q{
	CREATE TABLE purged (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0)
	  WITH (autovacuum_enabled = off);
	INSERT INTO purged (id) SELECT g FROM generate_series(1, 400000) g;
	DELETE FROM purged WHERE id <= 200000 AND id % 10 <> 0;
	CREATE FUNCTION map_purged(keys bigint[], params jsonb) RETURNS void
	LANGUAGE sql AS $fn$INSERT INTO seen SELECT 'purged', k FROM unnest(keys) k$fn$;
	SELECT dsmapper_register('map_purged', 'map_purged(bigint[], jsonb)');
});
{
	my $rows = 220000;
	my $job = launch($node, 'map_purged', 'purged', 'shards => 8, page_size => 1000');
	is(wait_job($node, $job, timeout => '60 s'), 'succeeded', 'purged: job succeeds');
	is($node->safe_psql('postgres',
			"SELECT count(*), count(DISTINCT id) FROM seen WHERE tab = 'purged'"),
		"$rows|$rows", 'purged: every live row mapped exactly once');
	my $b = shard_balance($node, $job);
	diag(sprintf("purged: %d shards, processed %s, max/mean %.3f, expected %d",
		$b->{shards}, $b->{counts}, $b->{ratio}, $b->{expected}));
	cmp_ok($b->{ratio}, '<=', 1.25, 'purged: largest shard at most 1.25 x the mean');
	cmp_ok(abs($b->{expected} - $rows), '<=', 0.1 * $rows,
		'purged: expected within 10% of the live rows');
}

$node->stop;
done_testing();
