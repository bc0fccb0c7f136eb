
# 024_concurrent_changes.pl: the table changes while a job maps it.  Each
# page reads a fresh snapshot: rows inserted ahead of a shard's position are
# mapped, rows inserted behind it are not, deleted rows are not, updated
# rows are mapped once; the job succeeds without errors.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('concurrent_changes');

# Even keys 2 .. 2 * rows: odd keys are free for inserts anywhere.  The
# mapper adds one to n and records every key it was given in "seen".
my $rows = 20000;
my $page = 50;
$node->safe_psql(
	'postgres', qq{
	CREATE TABLE t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0, tag text);
	INSERT INTO t (id) SELECT 2 * g FROM generate_series(1, $rows) g;
	ANALYZE t;
	CREATE TABLE seen (id bigint NOT NULL);
	CREATE TABLE initial AS SELECT id FROM t;
	-- what this test does to t, to compute the expected sets
	CREATE TABLE changes (id bigint PRIMARY KEY, kind text NOT NULL);
});
create_counter_mapper($node, 'count_t', 't', sleep => 0.05,
	extra => 'INSERT INTO seen SELECT unnest(keys);');

my $log_offset = log_position($node);
my $job = launch($node, 'count_t', 't', "shards => 4, page_size => $page");
ok( poll_until(
		$node,
		"SELECT count(*) FILTER (WHERE processed >= 2 * $page) = count(*) AND count(*) = 4 FROM dsmapper.shards WHERE job_id = $job",
		't', 30),
	'every shard has committed two pages');

# Each shard must still have a good stretch to go, so that what we do
# "ahead" of it is really ahead when it commits: 10 pages of margin, at
# 0.05 s each, against a few milliseconds for our transaction.
my $margin = 10 * $page * 2;    # in key units (keys are 2 apart)
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM dsmapper.shards
		 WHERE job_id = $job AND state = 'running'
		   AND resume_from::bigint + 2 * $margin < coalesce(range_end::bigint, 2 * $rows)}),
	'4',
	'every shard is far from the end of its range');

# All changes in one transaction; the positions are read in it first.
# Positions only move forward, so "behind" stays behind.
$node->safe_psql(
	'postgres', qq{
	BEGIN;
	CREATE TEMP TABLE pos AS
	  SELECT shard, range_start::bigint AS lo, range_end::bigint AS hi,
	         resume_from::bigint AS at
	    FROM dsmapper.shards WHERE job_id = $job;

	-- inserted behind each shard's position (an odd key just below it):
	-- not mapped
	INSERT INTO changes SELECT at - 1, 'insert behind' FROM pos
	  WHERE at - 1 >= coalesce(lo, 0);
	INSERT INTO changes SELECT at - 101, 'insert behind' FROM pos
	  WHERE at - 101 >= coalesce(lo, 0);

	-- inserted ahead of each shard's position, inside its range: mapped
	INSERT INTO changes SELECT at + $margin + 1, 'insert ahead' FROM pos;

	-- inserted above every key (the last shard's open range): mapped
	INSERT INTO changes SELECT 10 * $rows + g, 'insert ahead' FROM generate_series(1, 25) g;

	-- deleted ahead of the position: not mapped
	INSERT INTO changes SELECT at + $margin + 2 * g, 'delete ahead' FROM pos, generate_series(1, 5) g;

	-- deleted behind the position: was mapped before
	INSERT INTO changes SELECT at - 2 * g, 'delete behind' FROM pos, generate_series(1, 3) g
	  WHERE at - 2 * g >= coalesce(lo, 2);

	-- updated ahead and behind: mapped once all the same
	INSERT INTO changes SELECT at + $margin + 20 + 2 * g, 'update ahead' FROM pos, generate_series(1, 5) g;
	INSERT INTO changes SELECT at - 20 - 2 * g, 'update behind' FROM pos, generate_series(1, 5) g
	  WHERE at - 20 - 2 * g >= coalesce(lo, 2);

	INSERT INTO t (id, tag) SELECT id, kind FROM changes WHERE kind LIKE 'insert%';
	DELETE FROM t WHERE id IN (SELECT id FROM changes WHERE kind LIKE 'delete%');
	UPDATE t SET tag = kind FROM changes c WHERE t.id = c.id AND kind LIKE 'update%';
	COMMIT;
});
is( $node->safe_psql(
		'postgres',
		"SELECT kind, count(*) FROM changes GROUP BY kind ORDER BY kind"),
	"delete ahead|20\ndelete behind|12\ninsert ahead|29\ninsert behind|8\nupdate ahead|20\nupdate behind|20",
	'the changes were made');

is(wait_job($node, $job, timeout => '60 s'), 'succeeded', 'the job succeeds');

# The mapper saw exactly: the initial keys, minus those deleted ahead, plus
# those inserted ahead; each once.
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*), count(DISTINCT id) FROM seen}),
	join('|', ($rows - 20 + 29) x 2),
	'the mapper was given the expected number of keys, none twice');
is( $node->safe_psql(
		'postgres', q{
		(SELECT id FROM initial
		  EXCEPT SELECT id FROM changes WHERE kind = 'delete ahead'
		  UNION SELECT id FROM changes WHERE kind = 'insert ahead')
		EXCEPT SELECT id FROM seen}),
	'', 'every expected key was mapped');
is( $node->safe_psql(
		'postgres', q{
		SELECT id FROM seen
		EXCEPT (SELECT id FROM initial
		         EXCEPT SELECT id FROM changes WHERE kind = 'delete ahead'
		         UNION SELECT id FROM changes WHERE kind = 'insert ahead')}),
	'', 'no other key was mapped');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM seen s JOIN changes c USING (id)
		 WHERE c.kind IN ('insert behind', 'delete ahead')}),
	'0', 'rows inserted behind and rows deleted ahead were not mapped');

# The table: n = 1 everywhere but on rows inserted behind (n = 0); the
# updates kept their tag and were mapped once.
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n = 0),
		       count(*) FILTER (WHERE n > 1),
		       count(*) FILTER (WHERE n = 0 AND tag IS DISTINCT FROM 'insert behind')
		  FROM t}),
	($rows - 32 + 29) . "|8|0|0",
	'n = 1 on every row but those inserted behind');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM t JOIN changes c USING (id)
		 WHERE c.kind LIKE 'update%' AND t.tag = c.kind AND t.n = 1}),
	'40', 'updated rows keep the update and were mapped once');

my $info = job_info($node, $job);
is($info->{processed}, $rows - 20 + 29, 'processed counts the rows actually mapped');
is($info->{error}, '', 'the job has no error');
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND (state <> 'succeeded' OR attempts <> 0 OR error IS NOT NULL)"
	),
	'0',
	'every shard succeeded without a retry');
unlike(log_since($node, $log_offset), qr/dsmapper job $job shard \d+ (will retry|failed)/,
	'no page failed');

$node->stop;
done_testing();
