
# 022_timeouts_and_abort.pl: dsmapper.page_timeout cancels a page that runs
# too long (SQLSTATE 57014, transient: rolled back and retried); abort
# cancels a page in flight, so aborting a job with a long page is quick and
# applies nothing of that page.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('timeouts',
	extra_conf => "dsmapper.page_timeout = 500\n");

##
## Page timeout: the first mapper call sleeps 2 s (a sequence, which the
## rollback does not undo, tells the first call), the timeout of 500 ms
## cancels it, and the retry succeeds.
##
my $rows = 4000;
create_counter_table($node, 't', $rows);
$node->safe_psql('postgres', q{
	CREATE SEQUENCE calls;
	CREATE TABLE first_call_keys (first_key bigint, last_key bigint);
});
create_counter_mapper(
	$node, 'count_t', 't',
	extra => q{
		IF nextval('calls') = 1 THEN
			PERFORM pg_sleep(2);
			-- never committed: the page is canceled before it ends
			INSERT INTO first_call_keys VALUES (keys[1], keys[cardinality(keys)]);
		END IF;});

my $log_offset = log_position($node);
my $job = launch($node, 'count_t', 't', 'shards => 2, page_size => 100');

ok( poll_until(
		$node, qq{
		SELECT count(*) FROM dsmapper.shards
		 WHERE job_id = $job AND attempts = 1 AND error_sqlstate = '57014'
		   AND next_attempt IS NOT NULL},
		'1', 30),
	'the timed-out page shows attempts = 1, SQLSTATE 57014 and a next_attempt');
is(wait_job($node, $job, timeout => '60 s'), 'succeeded',
	'the job with a timed-out page succeeds');
is(counter_summary($node, 't'), "$rows|$rows|0|0",
	'every row mapped exactly once');
is($node->safe_psql('postgres', 'SELECT count(*) FROM first_call_keys'),
	'0', 'the canceled page left nothing behind');
my $pages = $node->safe_psql('postgres',
	"SELECT sum(ceil(processed / 100.0)) FROM dsmapper.shards WHERE job_id = $job");
is($node->safe_psql('postgres', 'SELECT last_value FROM calls'),
	$pages + 1, "every page called once ($pages), plus the canceled call");
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND (attempts <> 0 OR error IS NOT NULL)"
	),
	'0',
	'attempts and errors are cleared once the retry succeeded');

{
	local $PostgreSQL::Test::Utils::timeout_default = 30;
	ok( $node->wait_for_log(
			qr/dsmapper job $job shard \d+ will retry a page: canceling statement due to statement timeout\n.*DETAIL:\s+SQLSTATE 57014, attempt 1 of 10/,
			$log_offset),
		'the log says the page timed out with 57014 and will be retried');
}
unlike(log_since($node, $log_offset), qr/dsmapper job $job shard \d+ failed/,
	'no shard failed');

##
## Abort of a job whose pages sleep 60 s: the abort cancels the pages in
## flight.  The page timeout is off for this part.
##
$node->safe_psql('postgres', 'ALTER SYSTEM SET dsmapper.page_timeout = 0');
$node->restart;

create_counter_table($node, 'long', 40);
create_counter_mapper($node, 'count_long', 'long', sleep => 60);
$log_offset = log_position($node);
$job = launch($node, 'count_long', 'long', 'shards => 2, page_size => 10');
ok( poll_until(
		$node, qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND wait_event = 'PgSleep'
		   AND query ~ '^dsmapper job $job shard [0-9]+\$'},
		'2', 30),
	'two workers are inside a long page');

my $t0 = time();
like($node->safe_psql('postgres', "SELECT dsmapper_abort($job)"),
	qr/^(aborting|aborted)$/, 'dsmapper_abort returns aborting');
is(wait_job($node, $job, timeout => '20 s'), 'aborted',
	'dsmapper_wait returns aborted');
my $secs = elapsed_since($t0);
note sprintf('abort took %.2f s', $secs);
cmp_ok($secs, '<', 10, sprintf('the abort was quick (%.1f s)', $secs));

is( $node->safe_psql(
		'postgres',
		"SELECT count(*), count(*) FILTER (WHERE state = 'aborted'), sum(processed), count(*) FILTER (WHERE error IS NOT NULL OR attempts <> 0) FROM dsmapper.shards WHERE job_id = $job"
	),
	'2|2|0|0',
	'both shards are aborted, nothing processed, no error recorded');
is(counter_summary($node, 'long'), '40|0|40|0', 'no partial page was applied');
ok( poll_until(
		$node, qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND state = 'active'
		   AND query ~ '^dsmapper job $job '},
		'0', 10),
	'no worker works on the aborted job any more');
unlike(log_since($node, $log_offset), qr/dsmapper job $job shard \d+ (will retry|failed)/,
	'the canceled pages are not counted as failures');

# The workers that were canceled still work.
create_counter_table($node, 'after', 2000);
create_counter_mapper($node, 'count_after', 'after');
$job = launch($node, 'count_after', 'after', 'shards => 2, page_size => 100');
is(wait_job($node, $job), 'succeeded', 'a job after the abort succeeds');
is(counter_summary($node, 'after'), '2000|2000|0|0', 'and maps every row once');

$node->stop;
done_testing();
