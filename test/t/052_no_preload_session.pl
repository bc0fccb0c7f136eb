
# 052_no_preload_session.pl: dsmapper_run() semantics without background
# workers (complements 009_no_preload.pl).
#
# On a node that does not preload dsmapper:
#
#  - many short dsmapper_run('200 ms') calls, each its own transaction,
#    together map every row exactly once;
#  - turns: with pages_per_task => 2 one dsmapper_run call hands out turns
#    to the shards of several jobs instead of staying with the first;
#  - retries: a transient error (40001, raised only the first time) rolls
#    the page back and leaves the shard waiting with next_attempt in the
#    future; a dsmapper_run after the backoff completes the job;
#  - roles: dsmapper_run as alice runs only alice's jobs (bob's job stays
#    queued, his table untouched); a superuser's dsmapper_run runs all.
#
# And on a node that preloads dsmapper with dsmapper.max_workers = 0, the
# launch NOTICE says that background workers are not running.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('session', preload => 0);

# ---------------------------------------------------------------------------
# Local helpers.

# su(sql): as the bootstrap superuser, NOTICEs silenced.
sub su
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', "SET client_min_messages = warning;\n$sql");
}

# as(role, sql): stdout; dies on error.
sub as
{
	my ($role, $sql) = @_;
	return $node->safe_psql('postgres', "SET client_min_messages = warning;\n$sql",
		extra_params => [ '-U', $role ]);
}

sub state_of
{
	my ($job) = @_;
	return su("SELECT state FROM dsmapper.jobs WHERE job_id = $job");
}

# run_until_final(job, max_duration, max_calls, role): calls dsmapper_run
# (each call its own transaction) until the job is final; returns
# (state, calls, pages).
sub run_until_final
{
	my ($job, $dur, $max_calls, $role) = @_;
	my ($calls, $pages, $state) = (0, 0, state_of($job));
	while ($calls < $max_calls && $state !~ /^(succeeded|failed|aborted)$/)
	{
		my $sql = "SELECT dsmapper_run('$dur')";
		$pages += defined $role ? as($role, $sql) : su($sql);
		$calls++;
		$state = state_of($job);
	}
	return ($state, $calls, $pages);
}

is( su("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'dsmapper%'"),
	'0', 'no launcher and no workers without preload');

# ===========================================================================
# 1. Exactly once across many short calls.
# ===========================================================================

create_counter_table($node, 'many', 3000);
create_counter_mapper($node, 'count_many', 'many', sleep => 0.02);
my $jm = su("SELECT dsmapper_launch('count_many', 'many', shards => 3, page_size => 50)");

my ($state, $calls, $pages) = run_until_final($jm, '200 ms', 300);
is($state, 'succeeded', "the job succeeds through dsmapper_run('200 ms') calls");
cmp_ok($calls, '>', 3, "  it took several calls ($calls)");
is($pages, 60, '  the calls mapped 60 pages in all');
is(counter_summary($node, 'many'), '3000|3000|0|0', '  every row exactly once');
my $info = job_info($node, $jm);
is($info->{processed}, '3000', '  processed = 3000');
is("$info->{shards_done}/$info->{shards}", '3/3', '  every shard succeeded');

# ===========================================================================
# 2. Turns: one call serves several jobs.
# ===========================================================================

create_counter_table($node, 'ta1', 600);
create_counter_table($node, 'ta2', 600);
create_counter_mapper($node, 'count_ta1', 'ta1', sleep => 0.05);
create_counter_mapper($node, 'count_ta2', 'ta2', sleep => 0.05);
# One shard each: only turns can make a call move on to the other job.
my $jt1 = su("SELECT dsmapper_launch('count_ta1', 'ta1', shards => 1, page_size => 10, pages_per_task => 2)");
my $jt2 = su("SELECT dsmapper_launch('count_ta2', 'ta2', shards => 1, page_size => 10, pages_per_task => 2)");

# Each job needs at least 3 s of sleeping; a 3 s call cannot finish both.
$pages = su("SELECT dsmapper_run('3 s')");
my $p1 = su("SELECT processed FROM dsmapper.jobs WHERE job_id = $jt1");
my $p2 = su("SELECT processed FROM dsmapper.jobs WHERE job_id = $jt2");
cmp_ok($p1, '>', 0, "one call mapped rows of the first job ($p1)");
cmp_ok($p2, '>', 0, "  and of the second job ($p2)");
cmp_ok($p1 + $p2, '<', 1200, '  without finishing both');
is($p1 + $p2, $pages * 10, "  the call's $pages pages are the rows processed");
is( su("SELECT count(*) FILTER (WHERE n = 1) FROM ta1") . '|'
	  . su("SELECT count(*) FILTER (WHERE n = 1) FROM ta2"),
	"$p1|$p2", '  and the rows mapped so far');

my ($s1) = run_until_final($jt1, '10 s', 50);
my ($s2) = run_until_final($jt2, '10 s', 50);
is("$s1|$s2", 'succeeded|succeeded', 'later calls finish both jobs');
is(counter_summary($node, 'ta1'), '600|600|0|0', '  ta1: every row exactly once');
is(counter_summary($node, 'ta2'), '600|600|0|0', '  ta2: every row exactly once');

# ===========================================================================
# 3. A transient error: backoff, then a later call completes the job.
# ===========================================================================

create_counter_table($node, 'flaky', 100);
su(q{
	CREATE SEQUENCE flaky_calls;
	CREATE FUNCTION count_flaky(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE flaky SET n = n + 1 WHERE id = ANY (keys);
		-- nextval is not rolled back with the page: only the first call fails.
		IF nextval('flaky_calls') = 1 THEN
			RAISE EXCEPTION 'transient trouble' USING ERRCODE = '40001';
		END IF;
	END $fn$;
	SELECT dsmapper_register('count_flaky', 'count_flaky(bigint[], jsonb)');
});
my $jf = su("SELECT dsmapper_launch('count_flaky', 'flaky', shards => 1, page_size => 50)");

# The call, the shard's state right after it, and a second call (which must
# find nothing ready while the backoff lasts), in one transaction.
my $first = su(qq{
	BEGIN;
	SELECT dsmapper_run('3 s');
	SELECT state || '|' || attempts || '|' || (next_attempt > clock_timestamp())
	       || '|' || (next_attempt - updated BETWEEN '0.5 s' AND '2 s')
	  FROM dsmapper.shards WHERE job_id = $jf;
	SELECT dsmapper_run('0.1 s') || '|'
	       || ((SELECT next_attempt FROM dsmapper.shards WHERE job_id = $jf) > clock_timestamp());
	COMMIT;
});
my ($run1, $shard1, $run2) = split /\n/, $first;
is($run1, '0', 'the first call maps no page (the only page failed)');
like($shard1, qr/^(running|starting)\|1\|true\|/,
	'  the shard waits: one attempt, next_attempt in the future');
if ($run2 =~ /\|true$/)
{
	is($run2, '0|true', '  a call during the backoff finds nothing to do');
}
else
{
	pass("  (the backoff was over before the second call: $run2)");
}
is(state_of($jf), 'running', '  the job is still running after the commit');
is(counter_summary($node, 'flaky'), '100|0|100|0', '  the failed page was rolled back');
is(su("SELECT error || '|' || error_sqlstate FROM dsmapper.shards WHERE job_id = $jf"),
	'transient trouble|40001', '  the shard shows the transient error');
like($shard1, qr/\|true$/, '  backoff of about one second after the failure');

ok(poll_until($node,
		"SELECT next_attempt IS NULL OR next_attempt <= now() FROM dsmapper.shards WHERE job_id = $jf",
		't', 10),
	'the backoff ends');
my ($sf, $cf, $pf) = run_until_final($jf, '10 s', 10);
is($sf, 'succeeded', "a call after the backoff completes the job ($cf calls, $pf pages)");
is(counter_summary($node, 'flaky'), '100|100|0|0', '  every row exactly once');
is(su('SELECT last_value FROM flaky_calls'), '3', '  the mapper ran three times (one failure, two pages)');

# ===========================================================================
# 4. Roles: dsmapper_run runs only the caller's jobs, a superuser's all.
# ===========================================================================

su(q{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN;
});
create_counter_table($node, 'ta', 500);
create_counter_table($node, 'tb', 500);
create_counter_mapper($node, 'count_ta', 'ta');
create_counter_mapper($node, 'count_tb', 'tb');
su(q{
	GRANT SELECT, UPDATE ON ta TO alice;
	GRANT SELECT, UPDATE ON tb TO bob;
});
my $ja = as('alice', "SELECT dsmapper_launch('count_ta', 'ta', shards => 2, page_size => 50)");
my $jb = as('bob', "SELECT dsmapper_launch('count_tb', 'tb', shards => 2, page_size => 50)");
is( su("SELECT owner FROM dsmapper.jobs WHERE job_id IN ($ja, $jb) ORDER BY job_id"),
	"alice\nbob", 'alice and bob each launched a job');

my $alice_pages = 0;
for (1 .. 5)
{
	$alice_pages += as('alice', "SELECT dsmapper_run('10 s')");
	last if state_of($ja) eq 'succeeded';
}
is(state_of($ja), 'succeeded', "dsmapper_run as alice runs alice's job ($alice_pages pages)");
is($alice_pages, 10, '  alice mapped only her ten pages');
is(counter_summary($node, 'ta'), '500|500|0|0', '  ta: every row exactly once');
is(state_of($jb), 'starting', "  bob's job stays queued");
is(counter_summary($node, 'tb'), '500|0|500|0', '  tb untouched');
is(as('alice', "SELECT dsmapper_run('1 s')"), '0', "alice's call with only bob's work left maps nothing");
is(state_of($jb), 'starting', "  bob's job is still queued");

my ($sb, $cb, $pb) = run_until_final($jb, '10 s', 5);
is($sb, 'succeeded', "the superuser's dsmapper_run runs bob's job ($pb pages)");
is(counter_summary($node, 'tb'), '500|500|0|0', '  tb: every row exactly once');

# ===========================================================================
# 4b. Two sessions at once: a session's pages are not committed until its
#     caller commits, so another session must not claim the same shard
#     from the old checkpoint meanwhile.
# ===========================================================================

create_counter_table($node, 'tc', 1000);
create_counter_mapper($node, 'count_tc', 'tc');
my $jc = launch($node, 'count_tc', 'tc', 'shards => 1, page_size => 100, pages_per_task => 2');
su("SELECT dsmapper_run('1 ms')");    # the split only: one task per call
is(su("SELECT count(*) FROM dsmapper.shards WHERE job_id = $jc"), '1', 'one shard to fight over');
my $holder = $node->background_psql('postgres');
$holder->query_safe("BEGIN");
my $held_pages = $holder->query_safe("SELECT dsmapper_run('1 ms')");
cmp_ok($held_pages, '>', 0, "a session maps pages and keeps its transaction open ($held_pages pages)");
# (Were it claimed, its checkpoint write would wait for the holder: bound it.)
my ($other_rc, $other_pages) = $node->psql('postgres',
	"SET statement_timeout = '5s'; SET client_min_messages = warning; SELECT dsmapper_run('1 s')");
is("$other_rc:$other_pages", '0:0',
	'  another session does not claim the shard while they are uncommitted');
$holder->query_safe("COMMIT");
$holder->quit;
my ($sc) = run_until_final($jc, '10 s', 20);
is($sc, 'succeeded', '  after the commit the other session finishes the job');
is(counter_summary($node, 'tc'), '1000|1000|0|0', '  tc: every row exactly once');
is(su("SELECT processed FROM dsmapper.jobs WHERE job_id = $jc"), '1000', '  processed counts every row once');

$node->stop;

# ===========================================================================
# 5. Preloaded with dsmapper.max_workers = 0: the NOTICE.
# ===========================================================================

my $zero = new_node('zero', max_workers => 0);
create_counter_table($zero, 'z', 200);
create_counter_mapper($zero, 'count_z', 'z');
my ($ret, $jz, $stderr) = $zero->psql('postgres',
	"SELECT dsmapper_launch('count_z', 'z', shards => 2, page_size => 50)");
is($ret, 0, 'dsmapper.max_workers = 0: the launch works');
like($stderr, qr/NOTICE:.*background workers are not running/,
	'  the NOTICE says background workers are not running');
like($stderr, qr/dsmapper_run\(\)/, '  and mentions dsmapper_run()');
is( $zero->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper worker'"),
	'0', '  no worker starts');
is(wait_job($zero, $jz, timeout => '1 s'), 'starting', '  the job waits');
$zero->safe_psql('postgres', "SELECT dsmapper_run('10 s')");
is(wait_job($zero, $jz, timeout => '1 s'), 'succeeded', '  dsmapper_run completes it');
is(counter_summary($zero, 'z'), '200|200|0|0', '  every row exactly once');
$zero->stop;

done_testing();
