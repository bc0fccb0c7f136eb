
# 050_pg_cron.pl: recurring launches through pg_cron (README
# "dsmapper_schedule", "dsmapper_unschedule", view dsmapper.schedules).
#
# One node preloads dsmapper and pg_cron (cron.database_name = 'postgres',
# pg_cron jobs run in background workers, so no TCP connection is needed).
# Checked here:
#
#  - dsmapper_schedule before CREATE EXTENSION pg_cron: a clear error
#    (SQLSTATE 0A000) whose hint says to create pg_cron;
#  - bad launch arguments (and a bad cron expression) are refused when the
#    schedule is made, and nothing is stored: no dsmapper.schedules row, no
#    cron.job row, no job;
#  - a good schedule returns its pg_cron job id; cron.job holds
#    SELECT public.dsmapper_launch_scheduled('<name>') for the scheduling
#    role (alice, not a superuser);
#  - dsmapper_launch_scheduled(name) launches a job owned by alice and
#    records it as last_job; while that job is active another call is
#    skipped (NULL, and a 'skipped' line in the log); once it is final the
#    next call launches again;
#  - pg_cron itself fires a '* * * * *' schedule (one real firing, waited
#    for up to 75 s, overlapped with the checks above);
#  - dsmapper_unschedule removes the schedule and its cron.job row (true),
#    false the second time, and bob may not remove alice's schedule (42501);
#  - a member of alice's role who is not a superuser (carol, with USAGE on
#    schema cron, and dave, without) removes alice's schedules and their
#    cron.job rows too, although pg_cron shows neither of them alice's jobs;
#    carol cannot take over the name of alice's schedule (42710);
#  - a cron job that alice's role cannot remove (it runs as another role) is
#    an error (55000) that leaves the schedule in place, not an orphan; a
#    superuser then removes both;
#  - with dsmapper.max_workers = 0, dsmapper_schedule does not pass on the
#    NOTICE of its rolled-back trial launch (a real launch still says it),
#    restores client_min_messages afterwards, and still reports errors.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use DsmTest;

my $node = new_node(
	'cron',
	max_workers => 2,
	extra_conf => "shared_preload_libraries = 'dsmapper,pg_cron'\n"
	  . "cron.database_name = 'postgres'\n"
	  . "cron.use_background_workers = on\n"
	  . "cron.max_running_jobs = 4\n");

# ---------------------------------------------------------------------------
# Local helpers.

# su(sql): as the bootstrap superuser.
sub su
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

# as(role, sql): stdout; dies on error.
sub as
{
	my ($role, $sql) = @_;
	return $node->safe_psql('postgres', $sql, extra_params => [ '-U', $role ]);
}

# try_as(role, sql): (exit code, SQLSTATE or '', stdout, stderr), with
# verbose errors so the SQLSTATE and the hint show.
sub try_as
{
	my ($role, $sql) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql(
		'postgres', "\\set VERBOSITY verbose\n" . $sql,
		stdout => \$out,
		stderr => \$err,
		extra_params => [ '-U', $role ]);
	my $state = $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : '';
	return ($rc, $state, $out, $err);
}

# stored(): "schedules|cron jobs|jobs", everything a schedule could leave
# behind, seen by the superuser (cron.job only once pg_cron exists).  Jobs
# of the minutely schedule (mapper count_t2), which pg_cron may launch at
# any moment, are not counted.
sub stored
{
	my $has_cron = su("SELECT count(*) FROM pg_extension WHERE extname = 'pg_cron'");
	my $cron = $has_cron ? '(SELECT count(*) FROM cron.job)' : '0';
	return su(
		"SELECT (SELECT count(*) FROM dsmapper.schedules) || '|' || $cron || '|' || (SELECT count(*) FROM dsmapper.jobs WHERE mapper <> 'count_t2')"
	);
}

# ---------------------------------------------------------------------------
# Roles, tables, mappers.

su(q{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN;

	-- t: mapped by the gated mapper, whose pages wait until gate.open, so a
	-- job of it stays active for as long as the test needs.
	CREATE TABLE t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO t (id) SELECT g FROM generate_series(1, 300) g;
	CREATE TABLE gate (open boolean NOT NULL);
	INSERT INTO gate VALUES (false);
	CREATE FUNCTION gated(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE t SET n = n + 1 WHERE id = ANY (keys);
		WHILE NOT (SELECT open FROM gate) LOOP
			PERFORM pg_sleep(0.05);
		END LOOP;
	END $fn$;
	SELECT dsmapper_register('gated', 'gated(bigint[], jsonb)');

	-- t2: mapped by the schedule that pg_cron really fires.
	CREATE TABLE t2 (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO t2 (id) SELECT g FROM generate_series(1, 500) g;
	CREATE FUNCTION count_t2(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE t2 SET n = n + 1 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('count_t2', 'count_t2(bigint[], jsonb)');

	CREATE TABLE nopk (id bigint, n integer);

	GRANT SELECT, UPDATE ON t, t2 TO alice;
	GRANT SELECT ON gate, nopk TO alice;
});

# ===========================================================================
# 1. Without pg_cron.
# ===========================================================================

{
	my ($rc, $state, $out, $err) = try_as('alice',
		"SELECT dsmapper_schedule('early', '0 3 * * *', 'gated', 't')");
	is($state, '0A000', 'dsmapper_schedule without pg_cron: SQLSTATE 0A000')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	like($err, qr/pg_cron/, 'the error names pg_cron');
	like($err, qr/HINT:.*CREATE EXTENSION pg_cron/s,
		'the hint says to CREATE EXTENSION pg_cron');
	is(stored(), '0|0|0', 'nothing stored without pg_cron');

	($rc, $state, $out, $err) = try_as('alice', "SELECT dsmapper_unschedule('early')");
	is($state, '0A000', 'dsmapper_unschedule without pg_cron: SQLSTATE 0A000')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
}

# ===========================================================================
# 2. pg_cron installed; the real firing is started first and checked last.
# ===========================================================================

su(q{
	CREATE EXTENSION pg_cron;
	GRANT USAGE ON SCHEMA cron TO alice, bob;
});

my $minutely_t0 = time();
my $minutely = as('alice',
	"SELECT dsmapper_schedule('minutely', '* * * * *', 'count_t2', 't2', shards => 2, page_size => 100)"
);
like($minutely, qr/^\d+$/, "the minutely schedule is made (cron job $minutely)");

# ---------------------------------------------------------------------------
# Bad launch arguments: refused at schedule time, nothing stored.

my $before = stored();
is($before, '1|1|0', 'one schedule, one cron job, no dsmapper job so far');

my @bad = (
	[ "'no-such-mapper', 't'", 'an unknown mapper', '42704', qr/mapper "no-such-mapper" does not exist/ ],
	[ "'gated', 't', page_size => 0", 'page_size 0', '22023', qr/page_size must be between/ ],
	[ "'gated', 't', shards => 0", 'shards 0', '22023', qr/shards must be between/ ],
	[ "'gated', 't', filter => 'no_such_column > 1'", 'a filter naming a missing column',
	  '42703', qr/no_such_column/ ],
	[ "'gated', 't', params => NULL", 'NULL params', '22004', qr/NULL/ ],
	[ "'gated', 'nopk'", 'a table without a primary key', '0A000', qr/no primary key/ ],);
foreach my $case (@bad)
{
	my ($args, $what, $want_state, $want_msg) = @$case;
	my ($rc, $state, $out, $err) =
	  try_as('alice', "SELECT dsmapper_schedule('bad', '0 3 * * *', $args)");
	is($state, $want_state, "schedule with $what is refused ($want_state)")
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	like($err, $want_msg, "  with a clear error ($what)");
	is(stored(), $before, "  and nothing is stored ($what)");
}

{
	my ($rc, $state, $out, $err) = try_as('alice',
		"SELECT dsmapper_schedule('bad', 'every day at three', 'gated', 't')");
	isnt($rc, 0, 'a schedule with an invalid cron expression is refused')
	  or diag("stdout: $out");
	like($err, qr/invalid schedule/, '  pg_cron says the schedule is invalid');
	is(stored(), $before, '  and nothing is stored');
}

# ---------------------------------------------------------------------------
# A good schedule (never due while the test runs).

my $cron_id = as('alice',
	"SELECT dsmapper_schedule('nightly', '0 3 * * *', 'gated', 't', shards => 2, page_size => 50)"
);
like($cron_id, qr/^\d+$/, "dsmapper_schedule returns the cron job id ($cron_id)");
isnt($cron_id, $minutely, 'a different cron job than the minutely one');

is( su(
		"SELECT schedule || '|' || command || '|' || username || '|' || database || '|' || active FROM cron.job WHERE jobid = $cron_id"
	),
	"0 3 * * *|SELECT public.dsmapper_launch_scheduled('nightly')|alice|postgres|true",
	'cron.job runs dsmapper_launch_scheduled as alice');
is( as('alice',
		"SELECT schedule || '|' || mapper || '|' || relation || '|' || owner || '|' || cron_job || '|' || coalesce(last_job::text, 'none') FROM dsmapper.schedules WHERE name = 'nightly'"
	),
	"0 3 * * *|gated|t|alice|$cron_id|none",
	'dsmapper.schedules shows the schedule to alice');
is(su("SELECT count(*) FROM dsmapper.jobs WHERE mapper = 'gated'"),
	'0', 'the check at schedule time launched no job');
is(as('bob', "SELECT count(*) FROM dsmapper.schedules"),
	'0', 'bob does not see alice\'s schedules');

{
	my ($rc, $state, $out, $err) = try_as('alice',
		"SELECT dsmapper_schedule('nightly', '0 4 * * *', 'gated', 't')");
	is($state, '42710', 'a second schedule of the same name is refused (42710)')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	is(su("SELECT count(*) FROM cron.job WHERE command LIKE '%nightly%'"),
		'1', '  and leaves no second cron job');
}

# ---------------------------------------------------------------------------
# Launching the schedule by hand, as pg_cron would.

{
	my ($rc, $state, $out, $err) =
	  try_as('bob', "SELECT dsmapper_launch_scheduled('nightly')");
	is($state, '42501', 'bob cannot run alice\'s schedule (42501)')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
}

my $job1 = as('alice', "SELECT dsmapper_launch_scheduled('nightly')");
like($job1, qr/^\d+$/, "dsmapper_launch_scheduled launches job $job1");
is(su("SELECT owner || '|' || mapper || '|' || relation || '|' || (shards >= 1) FROM dsmapper.jobs WHERE job_id = $job1"),
	'alice|gated|t|true', 'the job belongs to alice and maps t with gated');
is(as('alice', "SELECT last_job FROM dsmapper.schedules WHERE name = 'nightly'"),
	$job1, 'dsmapper.schedules records it as last_job');

# The gate is closed: the job cannot finish.
ok( poll_until($node,
		"SELECT state = 'running' FROM dsmapper.jobs WHERE job_id = $job1", 't', 30),
	'the job is running (held by the gate)');

my $logpos = log_position($node);
my $skip = as('alice',
	"SELECT coalesce(dsmapper_launch_scheduled('nightly')::text, 'NULL')");
is($skip, 'NULL', 'a call while the job is active is skipped (NULL)');
is(as('alice', "SELECT last_job FROM dsmapper.schedules WHERE name = 'nightly'"),
	$job1, '  last_job is unchanged');
is(su("SELECT count(*) FROM dsmapper.jobs WHERE mapper = 'gated'"),
	'1', '  no second job was launched');
my $skiplog = '';
for (my $i = 0; $i < 50; $i++)
{
	$skiplog = log_since($node, $logpos);
	last if $skiplog =~ /skipped/;
	select(undef, undef, undef, 0.1);
}
like($skiplog, qr/dsmapper schedule "nightly" skipped/,
	'  and the log says the schedule was skipped');

# Let the job finish; the next call launches again.
su('UPDATE gate SET open = true');
is(wait_job($node, $job1, timeout => '60 s'), 'succeeded', 'the first job succeeds');
is(as('alice', "SELECT last_state FROM dsmapper.schedules WHERE name = 'nightly'"),
	'succeeded', 'dsmapper.schedules shows last_state succeeded');

my $job2 = as('alice', "SELECT coalesce(dsmapper_launch_scheduled('nightly')::text, 'NULL')");
like($job2, qr/^\d+$/, "after the job finished the next call launches job $job2");
isnt($job2, $job1, '  a new job');
is(as('alice', "SELECT last_job FROM dsmapper.schedules WHERE name = 'nightly'"),
	$job2, '  recorded as last_job');
is(wait_job($node, $job2, timeout => '60 s'), 'succeeded', 'the second job succeeds');
is(counter_summary($node, 't'), '300|0|0|300', 'both jobs mapped every row of t (n = 2)');
is(su('SELECT min(n) || \'|\' || max(n) FROM t'), '2|2', 'every row of t mapped exactly twice');

# ===========================================================================
# 3. The real pg_cron firing of the minutely schedule.
# ===========================================================================

my $left = 75 - (time() - $minutely_t0);
$left = 5 if $left < 5;
ok( poll_until(
		$node,
		"SELECT last_job IS NOT NULL FROM dsmapper.schedules WHERE name = 'minutely'",
		't', $left),
	'pg_cron fired the minutely schedule within 75 s')
  or diag(
	su("SELECT coalesce(string_agg(jobid || ' ' || status || ' ' || coalesce(return_message, ''), E'\\n'), 'no run details') FROM cron.job_run_details"
	));
my $cron_job = su("SELECT last_job FROM dsmapper.schedules WHERE name = 'minutely'");

# One firing is enough: remove the schedule before it fires again.
is(as('alice', "SELECT dsmapper_unschedule('minutely')"),
	't', 'alice unschedules minutely');
is(su("SELECT count(*) FROM cron.job WHERE jobid = $minutely"),
	'0', '  its cron.job row is gone');
SKIP:
{
	skip 'pg_cron did not fire', 6 unless $cron_job =~ /^\d+$/;
	is(su("SELECT owner FROM dsmapper.jobs WHERE job_id = $cron_job"),
		'alice', 'the job launched by pg_cron belongs to alice');
	is(wait_job($node, $cron_job, timeout => '60 s'),
		'succeeded', 'the job launched by pg_cron succeeds');
	is(su("SELECT processed FROM dsmapper.jobs WHERE job_id = $cron_job"),
		'500', '  it processed all 500 rows of t2');

	# Should the schedule have fired twice before it was removed, every row
	# is mapped once per job.
	ok( poll_until(
			$node,
			"SELECT count(*) FROM dsmapper.jobs WHERE mapper = 'count_t2' AND finished IS NULL",
			'0', 60),
		'every job of the minutely schedule is final');
	my $fired = su("SELECT count(*) FROM dsmapper.jobs WHERE mapper = 'count_t2' AND state = 'succeeded'");
	is(su("SELECT count(*) FROM t2 WHERE n <> $fired"),
		'0', "t2: every row mapped exactly once per firing ($fired)");
	ok( poll_until(
			$node,
			"SELECT count(*) > 0 FROM cron.job_run_details WHERE jobid = $minutely AND status = 'succeeded'",
			't', 30),
		'cron.job_run_details records a succeeded run');
}

# ===========================================================================
# 4. Unscheduling.
# ===========================================================================

{
	my ($rc, $state, $out, $err) =
	  try_as('bob', "SELECT dsmapper_unschedule('nightly')");
	is($state, '42501', 'bob cannot unschedule alice\'s schedule (42501)')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	is(su("SELECT count(*) FROM dsmapper.schedules WHERE name = 'nightly'") . '|'
		  . su("SELECT count(*) FROM cron.job WHERE jobid = $cron_id"),
		'1|1', '  the schedule and its cron job are still there');
}

is(as('alice', "SELECT dsmapper_unschedule('nightly')"),
	't', 'alice unschedules nightly: true');
is(su("SELECT count(*) FROM dsmapper.schedules WHERE name = 'nightly'"),
	'0', '  the schedule is gone');
is(su("SELECT count(*) FROM cron.job WHERE jobid = $cron_id"),
	'0', '  its cron.job row is gone');
is(as('alice', "SELECT dsmapper_unschedule('nightly')"),
	'f', 'a second unschedule returns false');
is(stored() =~ /^0\|0\|/ ? 'clean' : stored(), 'clean',
	'no schedule and no cron job left');

# The jobs stay: unscheduling does not touch them.
is(su("SELECT state FROM dsmapper.jobs WHERE job_id = $job2"),
	'succeeded', 'jobs launched by a schedule outlive it');

# ---------------------------------------------------------------------------
# Members of alice's role who are not superusers.  pg_cron's row level
# security (username = current_user) shows neither of them alice's cron
# jobs, and only alice (or a superuser) may remove them.

su(q{
	CREATE ROLE carol LOGIN IN ROLE alice;
	CREATE ROLE dave LOGIN IN ROLE alice;
	GRANT USAGE ON SCHEMA cron TO carol;
});

my $weekly = as('alice', "SELECT dsmapper_schedule('weekly', '0 3 * * 0', 'gated', 't')");
my $monthly = as('alice', "SELECT dsmapper_schedule('monthly', '0 3 1 * *', 'gated', 't')");
like("$weekly|$monthly", qr/^\d+\|\d+$/, "alice makes weekly ($weekly) and monthly ($monthly)");
is(as('carol', "SELECT count(*) FROM cron.job"),
	'0', 'carol sees none of alice\'s cron jobs');

{
	my ($rc, $state, $out, $err) = try_as('carol',
		"SELECT dsmapper_schedule('weekly', '0 4 * * *', 'gated', 't')");
	is($state, '42710', 'carol cannot take over the name weekly (42710)')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	is(su("SELECT owner || '|' || cron_job FROM dsmapper.schedules WHERE name = 'weekly'"),
		"alice|$weekly", '  weekly is still alice\'s');
}

{
	my ($rc, $state, $out, $err) =
	  try_as('carol', "SELECT dsmapper_unschedule('weekly')");
	is("$rc|$out", '0|t', 'carol, a member of alice, unschedules weekly: true')
	  or diag("state $state\nstderr: $err");
	is(su("SELECT count(*) FROM dsmapper.schedules WHERE name = 'weekly'"),
		'0', '  the schedule is gone');
	is(su("SELECT count(*) FROM cron.job WHERE jobid = $weekly"),
		'0', '  its cron.job row is gone too (no orphan)');
}

{
	my ($rc, $state, $out, $err) =
	  try_as('dave', "SELECT dsmapper_unschedule('monthly')");
	is("$rc|$out", '0|t',
		'dave, a member of alice without USAGE on schema cron, unschedules monthly: true')
	  or diag("state $state\nstderr: $err");
	is(su("SELECT count(*) FROM dsmapper.schedules WHERE name = 'monthly'") . '|'
		  . su("SELECT count(*) FROM cron.job WHERE jobid = $monthly"),
		'0|0', '  the schedule and its cron.job row are gone');
}

# A cron job that no longer runs as alice: alice's role cannot remove it,
# which is an error, not a schedule removed with its cron job left behind.
my $moved = as('alice', "SELECT dsmapper_schedule('moved', '0 3 * * *', 'gated', 't')");
su("UPDATE cron.job SET username = 'bob' WHERE jobid = $moved");
foreach my $role ('alice', 'carol')
{
	my ($rc, $state, $out, $err) =
	  try_as($role, "SELECT dsmapper_unschedule('moved')");
	is($state, '55000', "$role cannot remove a cron job that runs as bob (55000)")
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	like($err, qr/could not remove pg_cron job $moved of schedule "moved"/,
		'  the error names the cron job and the schedule');
	is(su("SELECT count(*) FROM dsmapper.schedules WHERE name = 'moved'") . '|'
		  . su("SELECT count(*) FROM cron.job WHERE jobid = $moved"),
		'1|1', '  the schedule and the cron job are both still there');
}
is(su("SELECT dsmapper_unschedule('moved')"), 't', 'a superuser unschedules it');
is(su("SELECT count(*) FROM dsmapper.schedules WHERE name = 'moved'") . '|'
	  . su("SELECT count(*) FROM cron.job WHERE jobid = $moved"),
	'0|0', '  the schedule and the cron job are gone');

is(stored() =~ /^0\|0\|/ ? 'clean' : stored(), 'clean',
	'no schedule and no cron job left');

# ===========================================================================
# 5. No background workers: the trial launch keeps its NOTICE.
# ===========================================================================

su('ALTER SYSTEM SET dsmapper.max_workers = 0');
$node->restart;

{
	my ($rc, $state, $out, $err) = try_as('alice',
		"SELECT dsmapper_abort(dsmapper_launch('gated', 't'))");
	like($err, qr/NOTICE:.*background workers are not running/,
		'max_workers = 0: a real launch says the workers are not running');

	($rc, $state, $out, $err) = try_as('alice',
		"SELECT dsmapper_schedule('quiet', '0 3 * * *', 'gated', 't') > 0;\n"
		  . "SHOW client_min_messages;");
	is("$rc|$out", "0|t\nnotice", 'dsmapper_schedule works, client_min_messages is notice after it')
	  or diag("state $state\nstderr: $err");
	unlike($err, qr/NOTICE|background workers/,
		'  and it passes on no NOTICE about a job that never exists');

	($rc, $state, $out, $err) = try_as('alice',
		"SELECT dsmapper_schedule('quiet2', '0 3 * * *', 'gated', 't', shards => 0)");
	is($state, '22023', '  errors of the trial launch still come through (22023)')
	  or diag("rc $rc\nstdout: $out\nstderr: $err");
	like($err, qr/shards must be between/, '  with their message');

	is(as('alice', "SELECT dsmapper_unschedule('quiet')"), 't', '  quiet unscheduled');
	is(stored() =~ /^0\|0\|/ ? 'clean' : stored(), 'clean',
		'  no schedule and no cron job left');
}

my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|PANIC/, 'no crash in the server log');

$node->stop;
done_testing();
