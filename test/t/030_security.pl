
# 030_security.pl: the security model (SPEC section 6, README "Security").
#
# Roles: alice and bob are ordinary LOGIN roles, carol is a member of alice,
# dave is a member of pg_read_all_stats, and the bootstrap superuser runs
# the set-up.  Checked here:
#
#  - mappers run as the job owner, never as a superuser, and cannot get out
#    of that identity (SET ROLE, SET SESSION AUTHORIZATION, ...) nor touch
#    the internal tables;
#  - row-level security is honoured, by the mapping and by the shard bounds;
#  - launch needs SELECT on the table and EXECUTE on the function;
#  - privileges revoked while a job runs make its shards fail;
#  - dsmapper.jobs / dsmapper.shards visibility, and the internal tables are
#    closed to ordinary roles;
#  - abort / pause / resume / retry only for the owner, members of the owner
#    role and superusers; mapper ids only replaceable by their registrant;
#  - objects on a user's search_path do not change dsmapper's own queries,
#    and are never run as another role;
#  - one owner's mapper cannot change the settings other owners' jobs run
#    with;
#  - dsmapper_run() in an ordinary role's session does not run other roles'
#    code in a way that role can hijack.
#
# The node has a single worker so that consecutive jobs run in the same
# worker process (the settings-leak check depends on it).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('security', max_workers => 1);

# The bootstrap superuser (normally "postgres").
my $su = $node->safe_psql('postgres', 'SELECT current_user');
my $su_q = $node->safe_psql('postgres', 'SELECT quote_ident(current_user)');

# ---------------------------------------------------------------------------
# Helpers: run SQL as a given role.

# sql_as(node, role, sql): stdout; dies on error.
sub sql_as
{
	my ($n, $role, $sql) = @_;
	return $n->safe_psql('postgres', $sql, extra_params => [ '-U', $role ]);
}

# try_as(node, role, sql): (psql exit code, SQLSTATE of the error or '',
# stdout, stderr).  Errors are reported verbosely so the SQLSTATE shows.
sub try_as
{
	my ($n, $role, $sql) = @_;
	my ($out, $err) = ('', '');
	my $rc = $n->psql(
		'postgres', "\\set VERBOSITY verbose\n" . $sql,
		stdout => \$out,
		stderr => \$err,
		extra_params => [ '-U', $role ]);
	my $state = $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : '';
	return ($rc, $state, $out, $err);
}

# refused_as(node, role, sql, sqlstate, test name): the statement fails with
# that SQLSTATE.  Returns the error text.
sub refused_as
{
	my ($n, $role, $sql, $want, $name) = @_;
	my ($rc, $state, $out, $err) = try_as($n, $role, $sql);
	is($state, $want, $name)
	  or diag("exit code $rc\nstdout: $out\nstderr: $err");
	return $err;
}

# su(sql): as the superuser.
sub su
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub job_state
{
	my ($job) = @_;
	return su("SELECT state FROM dsmapper.job WHERE job_id = $job");
}

# wait_settled(job): true once no shard of the job is starting or running
# any more (after a pause: every shard has stopped at a page boundary).
sub wait_settled
{
	my ($job) = @_;
	return poll_until(
		$node,
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state IN ('starting', 'running')",
		'0', 30);
}

# ---------------------------------------------------------------------------
# Roles and schemas.

su(q{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN;
	CREATE ROLE carol LOGIN;
	GRANT alice TO carol;
	CREATE ROLE dave LOGIN;
	GRANT pg_read_all_stats TO dave;
	CREATE SCHEMA alice_s AUTHORIZATION alice;
	CREATE SCHEMA bob_s AUTHORIZATION bob;
});

is( su(
		"SELECT string_agg(rolname || '=' || rolsuper, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('alice', 'bob', 'carol', 'dave')"
	),
	'alice=false,bob=false,carol=false,dave=false',
	'alice, bob, carol and dave are not superusers');

# ===========================================================================
# 1. The mapper runs as the owner and cannot escalate.
# ===========================================================================

sql_as(
	$node, 'alice', q{
	CREATE TABLE alice_s.t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO alice_s.t (id) SELECT g FROM generate_series(1, 200) g;
	CREATE TABLE alice_s.audit (job bigint, what text, state text, msg text,
	                            cu text, su text, super boolean, pid integer);
	CREATE FUNCTION alice_s.probe(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	DECLARE
		stmt text;
	BEGIN
		UPDATE alice_s.t SET n = n + 1 WHERE id = ANY (keys);
		INSERT INTO alice_s.audit
		SELECT dsmapper_current_job(), 'whoami', NULL, NULL, current_user,
		       session_user, r.rolsuper, pg_backend_pid()
		  FROM pg_roles r WHERE r.rolname = current_user;
		FOR stmt IN SELECT jsonb_array_elements_text(params -> 'try') LOOP
			BEGIN
				EXECUTE stmt;
				INSERT INTO alice_s.audit VALUES (dsmapper_current_job(), stmt,
					'00000', 'succeeded', current_user, session_user, NULL,
					pg_backend_pid());
			EXCEPTION WHEN others THEN
				INSERT INTO alice_s.audit VALUES (dsmapper_current_job(), stmt,
					SQLSTATE, SQLERRM, current_user, session_user, NULL,
					pg_backend_pid());
			END;
		END LOOP;
	END $fn$;
	SELECT dsmapper_register('alice-probe', 'alice_s.probe(bigint[], jsonb)');
});

# Everything a mapper might try to get out of its owner's rights.  Each of
# them must fail with a permission error (42501; "cannot set parameter
# role within security-definer function" is 42501 as well).
my @attempts = (
	'CREATE ROLE dsm_evil SUPERUSER LOGIN',
	"SET ROLE $su_q",
	'RESET ROLE',
	"SET LOCAL ROLE $su_q",
	"SET SESSION AUTHORIZATION $su_q",
	'RESET SESSION AUTHORIZATION',
	"SELECT set_config('role', '$su', false)",
	"SELECT set_config('session_authorization', '$su', true)",
	'ALTER ROLE alice SUPERUSER',
	'GRANT pg_execute_server_program TO alice',
	'SELECT count(*) FROM pg_catalog.pg_authid',
	"SELECT pg_catalog.pg_read_file('postgresql.conf')",
	"COPY (SELECT 1) TO PROGRAM 'true'",
	'SELECT pg_catalog.pg_reload_conf()',
	"UPDATE dsmapper.job SET state = 'failed'",
	'DELETE FROM dsmapper.shard',
	'INSERT INTO dsmapper.queue (job_id, shard) VALUES (1, 99)',
	'SELECT count(*) FROM dsmapper.mapper',
	"UPDATE dsmapper.mapper SET owner = 'alice'::regrole");

# The statements reach the mapper through params (a JSON array).
my $try_json = '{"try": ['
  . join(
	', ',
	map {
		my $s = $_;
		$s =~ s/\\/\\\\/g;
		$s =~ s/"/\\"/g;
		"\"$s\""
	} @attempts) . ']}';

my $probe_job = sql_as($node, 'alice',
	"SELECT dsmapper_launch('alice-probe', 'alice_s.t', params => \$j\$$try_json\$j\$, shards => 2, page_size => 100)"
);
is(wait_job($node, $probe_job, timeout => '60 s'),
	'succeeded', 'the probing job succeeds');
is(su('SELECT count(*), count(*) FILTER (WHERE n = 1) FROM alice_s.t'),
	'200|200', 'the probing job mapped every row exactly once');

my $pages = su(
	"SELECT count(*) FROM alice_s.audit WHERE job = $probe_job AND what = 'whoami'");
cmp_ok($pages, '>=', 2, "the mapper recorded who it runs as ($pages pages)");
is( su(
		"SELECT string_agg(DISTINCT cu || '/' || super, ',') FROM alice_s.audit WHERE job = $probe_job AND what = 'whoami'"
	),
	'alice/false',
	'inside the mapper current_user is alice, and alice is not a superuser');
diag(
	'session_user inside the mapper: '
	  . su(
		"SELECT string_agg(DISTINCT su, ',') FROM alice_s.audit WHERE job = $probe_job AND what = 'whoami'"
	  ));

foreach my $stmt (@attempts)
{
	(my $lit = $stmt) =~ s/'/''/g;
	my $res = su(
		"SELECT coalesce(string_agg(DISTINCT state || ' ' || msg, ' | '), 'never tried') FROM alice_s.audit WHERE job = $probe_job AND what = '$lit'"
	);
	like($res, qr/^42501 [^|]*$/, "in a mapper, \"$stmt\" fails with 42501")
	  or diag($res);
}
is( su(
		"SELECT count(*) FROM alice_s.audit WHERE job = $probe_job AND what <> 'whoami' AND cu <> 'alice'"
	),
	'0',
	'after each attempt the mapper still runs as alice');
is(su("SELECT count(*) FROM pg_roles WHERE rolname = 'dsm_evil'"),
	'0', 'no role was created');
is(su("SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'"),
	'f', 'alice is still not a superuser');
is( su(
		"SELECT count(*) FROM dsmapper.job WHERE state = 'failed'")
	  . '|'
	  . su("SELECT count(*) FROM dsmapper.queue WHERE shard = 99")
	  . '|'
	  . su("SELECT owner::regrole FROM dsmapper.mapper WHERE mapper = 'alice-probe'"),
	'0|0|alice',
	'the internal tables were not changed by the mapper');

# The same, not caught: the shard fails with the permission error.
sql_as(
	$node, 'alice', q{
	CREATE FUNCTION alice_s.setrole(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		EXECUTE 'SET ROLE ' || quote_ident(params ->> 'role');
		UPDATE alice_s.t SET n = n + 100 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('alice-setrole', 'alice_s.setrole(bigint[], jsonb)');
});
my $setrole_job = sql_as($node, 'alice',
	"SELECT dsmapper_launch('alice-setrole', 'alice_s.t', params => jsonb_build_object('role', '$su'), shards => 1, page_size => 100)"
);
is(wait_job($node, $setrole_job, timeout => '60 s'),
	'failed', 'a mapper that does SET ROLE to the superuser fails');
is( su(
		"SELECT string_agg(DISTINCT state || ' ' || error_sqlstate, ',') FROM dsmapper.shards WHERE job_id = $setrole_job"
	),
	'failed 42501',
	'its shard failed with SQLSTATE 42501');
like(
	su("SELECT error FROM dsmapper.shards WHERE job_id = $setrole_job LIMIT 1"),
	qr/cannot set parameter "role"/,
	'the shard error says the role cannot be set');
is(su('SELECT count(*) FROM alice_s.t WHERE n <> 1'),
	'0', 'the failed page was rolled back');

# ===========================================================================
# 2. Row-level security: only visible rows are mapped, and shard bounds
#    never show keys of invisible rows.  Alice's own rows have keys ending
#    in 0; the rows of "bob" (invisible to alice) have keys ending in 7.
#    The big table is over 1024 blocks, the size from which dsmapper would
#    otherwise split from the index pages.
# ===========================================================================

sql_as(
	$node, 'alice', q{
	CREATE TABLE alice_s.rls_seen (tab text, id bigint);
	CREATE FUNCTION alice_s.rls_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		INSERT INTO alice_s.rls_seen SELECT params ->> 'tab', k FROM unnest(keys) k
	$fn$;
	SELECT dsmapper_register('alice-rls', 'alice_s.rls_map(bigint[], jsonb)');

	CREATE TABLE alice_s.rls_big (id bigint PRIMARY KEY, owner_name text NOT NULL, filler text);
	INSERT INTO alice_s.rls_big
	SELECT g * 10 + CASE WHEN g % 2 = 0 THEN 0 ELSE 7 END,
	       CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END,
	       repeat('x', 200)
	  FROM generate_series(1, 40000) g;
	CREATE TABLE alice_s.rls_small (id bigint PRIMARY KEY, owner_name text NOT NULL, filler text);
	INSERT INTO alice_s.rls_small
	SELECT g * 10 + CASE WHEN g % 2 = 0 THEN 0 ELSE 7 END,
	       CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END, NULL
	  FROM generate_series(1, 3000) g;
	ALTER TABLE alice_s.rls_big ENABLE ROW LEVEL SECURITY;
	ALTER TABLE alice_s.rls_big FORCE ROW LEVEL SECURITY;
	CREATE POLICY own ON alice_s.rls_big USING (owner_name = current_user);
	ALTER TABLE alice_s.rls_small ENABLE ROW LEVEL SECURITY;
	ALTER TABLE alice_s.rls_small FORCE ROW LEVEL SECURITY;
	CREATE POLICY own ON alice_s.rls_small USING (owner_name = current_user);
	ANALYZE alice_s.rls_big;
	ANALYZE alice_s.rls_small;
});

is( su(
		"SELECT pg_relation_size('alice_s.rls_big') / current_setting('block_size')::int > 1024"
	),
	't',
	'the big RLS table has more than 1024 blocks');
is(sql_as($node, 'alice', 'SELECT count(*) FROM alice_s.rls_big'),
	'20000', 'alice sees half of the big table');

foreach my $case ([ 'rls_big', 20000, 8, 1000 ], [ 'rls_small', 1500, 4, 100 ])
{
	my ($tab, $visible, $shards, $page) = @$case;
	my $job = sql_as($node, 'alice',
		"SELECT dsmapper_launch('alice-rls', 'alice_s.$tab', params => '{\"tab\": \"$tab\"}', shards => $shards, page_size => $page)"
	);
	is(wait_job($node, $job, timeout => '60 s'), 'succeeded', "$tab: job succeeds");
	is( su(
			"SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE id % 10 <> 0) FROM alice_s.rls_seen WHERE tab = '$tab'"
		),
		"$visible|$visible|0",
		"$tab: exactly the $visible visible rows were mapped, once each");
	is(su("SELECT processed FROM dsmapper.jobs WHERE job_id = $job"),
		$visible, "$tab: processed counts only visible rows");
	my $nshards = su("SELECT count(*) FROM dsmapper.shards WHERE job_id = $job");
	cmp_ok($nshards, '>', 1, "$tab: the job has several shards ($nshards)");
	my $bad = su(
		"SELECT coalesce(string_agg(shard || ': [' || coalesce(range_start, '') || ', ' || coalesce(range_end, '') || ')', '; '), '') FROM dsmapper.shards WHERE job_id = $job AND (range_start::bigint % 10 <> 0 OR range_end::bigint % 10 <> 0 OR resume_from::bigint % 10 <> 0)"
	);
	is($bad, '', "$tab: no shard bound or checkpoint is the key of an invisible row");
	is( sql_as(
			$node, 'alice',
			"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND (range_start LIKE '%7' OR range_end LIKE '%7')"
		),
		'0',
		"$tab: alice's view of the shards shows no invisible key either");
}
is(su("SELECT expected FROM dsmapper.jobs WHERE mapper = 'alice-rls' AND relation = 'alice_s.rls_small'::regclass"),
	'1500', 'rls_small: expected counts only visible rows');

# ===========================================================================
# 3. Launch needs SELECT on the table and EXECUTE on the function.
# ===========================================================================

sql_as(
	$node, 'bob', q{
	CREATE TABLE bob_s.bt (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO bob_s.bt (id) SELECT g FROM generate_series(1, 100) g;
	CREATE FUNCTION bob_s.bm(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		UPDATE bob_s.bt SET n = n + 1 WHERE id = ANY (keys)
	$fn$;
	SELECT dsmapper_register('bob-map', 'bob_s.bm(bigint[], jsonb)');
});
# Bob may look up the names in alice's schema, but not read the table.
sql_as($node, 'alice', 'GRANT USAGE ON SCHEMA alice_s TO bob');

my $before = su('SELECT count(*) FROM dsmapper.job') . '|' . su('SELECT count(*) FROM dsmapper.queue');

refused_as($node, 'bob', "SELECT dsmapper_launch('bob-map', 'alice_s.t')",
	'42501', 'bob cannot launch on a table he cannot SELECT from');

sql_as(
	$node, 'alice', q{
	REVOKE EXECUTE ON FUNCTION alice_s.probe(bigint[], jsonb) FROM PUBLIC;
	GRANT SELECT ON alice_s.t TO bob;
});
refused_as($node, 'bob', "SELECT dsmapper_launch('alice-probe', 'alice_s.t')",
	'42501', 'bob cannot launch a mapper whose function he cannot EXECUTE');

is(su('SELECT count(*) FROM dsmapper.job') . '|' . su('SELECT count(*) FROM dsmapper.queue'),
	$before, 'refused launches stored nothing');
is(su("SELECT count(*) FROM dsmapper.job WHERE owner = 'bob'::regrole"),
	'0', 'bob owns no job');

# ===========================================================================
# 4. Privileges revoked while a job runs: pause, revoke, resume -> the
#    shards fail with a clear message.
# ===========================================================================

su(q{
	CREATE TABLE public.shared (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO public.shared (id) SELECT g FROM generate_series(1, 1000) g;
	GRANT SELECT, UPDATE ON public.shared TO alice;
	CREATE FUNCTION public.shared_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE public.shared SET n = n + 1 WHERE id = ANY (keys);
		PERFORM pg_sleep(0.05);
	END $fn$;
	REVOKE EXECUTE ON FUNCTION public.shared_map(bigint[], jsonb) FROM PUBLIC;
	GRANT EXECUTE ON FUNCTION public.shared_map(bigint[], jsonb) TO alice;
});
sql_as($node, 'alice',
	"SELECT dsmapper_register('alice-shared', 'public.shared_map(bigint[], jsonb)')");

foreach my $case (
	[
		'SELECT', 'REVOKE SELECT ON public.shared FROM alice',
		'GRANT SELECT ON public.shared TO alice'
	],
	[
		'EXECUTE',
		'REVOKE EXECUTE ON FUNCTION public.shared_map(bigint[], jsonb) FROM alice',
		'GRANT EXECUTE ON FUNCTION public.shared_map(bigint[], jsonb) TO alice'
	])
{
	my ($priv, $revoke, $grant) = @$case;
	my $sum_before = su('SELECT sum(n) FROM public.shared');
	my $job = sql_as($node, 'alice',
		"SELECT dsmapper_launch('alice-shared', 'public.shared', shards => 2, page_size => 10)");
	ok( poll_until(
			$node,
			"SELECT state = 'running' AND processed > 0 FROM dsmapper.jobs WHERE job_id = $job",
			't', 30),
		"$priv: the job runs");
	is(sql_as($node, 'alice', "SELECT dsmapper_pause($job)"),
		'paused', "$priv: alice pauses her job");
	ok(wait_settled($job), "$priv: every shard stopped");
	my $processed = su("SELECT processed FROM dsmapper.jobs WHERE job_id = $job");
	cmp_ok($processed, '<', 1000, "$priv: paused mid-job ($processed rows done)");

	su($revoke);
	is(sql_as($node, 'alice', "SELECT dsmapper_resume($job)"),
		'running', "$priv: alice resumes after losing $priv");
	is(wait_job($node, $job, timeout => '60 s'), 'failed', "$priv: the job fails");
	is( su(
			"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state NOT IN ('succeeded', 'failed')"
		),
		'0',
		"$priv: every shard is succeeded or failed");
	my $errors = su(
		"SELECT string_agg(DISTINCT error_sqlstate || ' ' || error, ' | ') FROM dsmapper.shards WHERE job_id = $job AND state = 'failed'"
	);
	like(
		$errors,
		qr/^42501 job owner alice no longer has $priv privilege on [^|]*$/,
		"$priv: the failed shards say alice no longer has $priv privilege");
	is(su("SELECT processed FROM dsmapper.jobs WHERE job_id = $job"),
		$processed, "$priv: nothing was mapped after the revoke");
	is(su('SELECT sum(n) FROM public.shared'),
		$sum_before + $processed, "$priv: the table shows exactly the processed rows");
	su($grant);
}

# ===========================================================================
# 5. Abort, pause, resume and retry: only the owner, members of the owner
#    role and superusers.
# ===========================================================================

sql_as(
	$node, 'alice', q{
	CREATE TABLE alice_s.slow (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO alice_s.slow (id) SELECT g FROM generate_series(1, 1000) g;
	CREATE FUNCTION alice_s.slow_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE alice_s.slow SET n = n + 1 WHERE id = ANY (keys);
		PERFORM pg_sleep(0.05);
	END $fn$;
	SELECT dsmapper_register('alice-slow', 'alice_s.slow_map(bigint[], jsonb)');
});
my $slow_job = sql_as($node, 'alice',
	"SELECT dsmapper_launch('alice-slow', 'alice_s.slow', shards => 2, page_size => 10)");
ok( poll_until(
		$node,
		"SELECT state = 'running' AND processed > 0 FROM dsmapper.jobs WHERE job_id = $slow_job",
		't', 30),
	'alice\'s slow job runs');

foreach my $verb (qw(abort pause resume retry))
{
	refused_as($node, 'bob', "SELECT dsmapper_$verb($slow_job)",
		'42501', "bob cannot $verb alice's running job");
	is(job_state($slow_job), 'running', "after bob's $verb the job is still running");
}
refused_as($node, 'dave', "SELECT dsmapper_pause($slow_job)",
	'42501', 'dave (pg_read_all_stats) can see but not pause alice\'s job');

is(sql_as($node, 'carol', "SELECT dsmapper_pause($slow_job)"),
	'paused', 'carol (member of alice) pauses alice\'s job');
is(job_state($slow_job), 'paused', 'the job is paused');
refused_as($node, 'bob', "SELECT dsmapper_resume($slow_job)",
	'42501', 'bob cannot resume it');
is(job_state($slow_job), 'paused', 'the job is still paused');
is(sql_as($node, 'carol', "SELECT dsmapper_resume($slow_job)"),
	'running', 'carol resumes it');

like(sql_as($node, 'alice', "SELECT dsmapper_abort($slow_job)"),
	qr/^(aborting|aborted)$/, 'alice aborts her job');
is(wait_job($node, $slow_job, timeout => '30 s'), 'aborted', 'the job is aborted');

foreach my $verb (qw(retry abort))
{
	refused_as($node, 'bob', "SELECT dsmapper_$verb($slow_job)",
		'42501', "bob cannot $verb alice's aborted job");
}
refused_as($node, 'dave', "SELECT dsmapper_retry($slow_job)",
	'42501', 'dave cannot retry it');
is(job_state($slow_job), 'aborted', 'the job is still aborted');
is(sql_as($node, 'carol', "SELECT dsmapper_retry($slow_job)"),
	'running', 'carol (member of alice) retries it');
like(su("SELECT dsmapper_abort($slow_job)"),
	qr/^(aborting|aborted)$/, 'the superuser aborts it');
is(wait_job($node, $slow_job, timeout => '30 s'), 'aborted', 'the job is aborted again');
is(su('SELECT count(*) FROM alice_s.slow WHERE n > 1'),
	'0', 'no row of the slow job was mapped twice');

# ===========================================================================
# 6. Mapper ids belong to their registrant.
# ===========================================================================

refused_as(
	$node, 'bob',
	"SELECT dsmapper_register('alice-probe', 'bob_s.bm(bigint[], jsonb)', replace => true)",
	'42501', 'bob cannot replace alice\'s mapper id');
refused_as($node, 'bob', "SELECT dsmapper_unregister('alice-probe')",
	'42501', 'bob cannot unregister alice\'s mapper id');
refused_as($node, 'bob',
	"SELECT dsmapper_register('alice-probe', 'bob_s.bm(bigint[], jsonb)')",
	'42710', 'bob cannot register alice\'s mapper id anew either');
is( su(
		"SELECT function::text || ' ' || owner::text FROM dsmapper.mappers WHERE mapper = 'alice-probe'"
	),
	'alice_s.probe(bigint[],jsonb) alice',
	'alice\'s mapper id is unchanged');

sql_as($node, 'alice',
	"SELECT dsmapper_register('alice-spare', 'alice_s.slow_map(bigint[], jsonb)')");
sql_as($node, 'carol', "SELECT dsmapper_unregister('alice-spare')");
is(su("SELECT count(*) FROM dsmapper.mappers WHERE mapper = 'alice-spare'"),
	'0', 'carol (member of alice) can unregister alice\'s mapper id');

# ===========================================================================
# 7. Visibility of jobs and shards; the internal tables are closed.
# ===========================================================================

my $bob_job = sql_as($node, 'bob', "SELECT dsmapper_launch('bob-map', 'bob_s.bt')");
is(wait_job($node, $bob_job, timeout => '60 s'), 'succeeded', 'bob\'s own job succeeds');

my $total = su('SELECT count(*) FROM dsmapper.job');
my $n_alice = su("SELECT count(*) FROM dsmapper.job WHERE owner = 'alice'::regrole");
my $n_bob = su("SELECT count(*) FROM dsmapper.job WHERE owner = 'bob'::regrole");
my $shards_total = su('SELECT count(*) FROM dsmapper.shard');
my $shards_alice = su(
	"SELECT count(*) FROM dsmapper.shard s JOIN dsmapper.job j USING (job_id) WHERE j.owner = 'alice'::regrole"
);
cmp_ok($n_alice, '>=', 5, "alice has jobs ($n_alice)");
is($n_bob, '1', 'bob has one job');

is(sql_as($node, 'bob', 'SELECT count(*), count(*) FILTER (WHERE owner::text <> \'bob\') FROM dsmapper.jobs'),
	"$n_bob|0", 'bob sees only his own job in dsmapper.jobs');
is( sql_as(
		$node, 'bob',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id IN ($probe_job, $slow_job, $setrole_job)"
	),
	'0',
	'bob sees no shard of alice\'s jobs');
is( sql_as(
		$node, 'alice',
		'SELECT count(*), count(*) FILTER (WHERE owner::text <> \'alice\') FROM dsmapper.jobs'),
	"$n_alice|0",
	'alice sees exactly her own jobs');
is(sql_as($node, 'alice', "SELECT count(*) FROM dsmapper.shards WHERE job_id = $bob_job"),
	'0', 'alice sees no shard of bob\'s job');
is( sql_as(
		$node, 'carol',
		'SELECT count(*), count(*) FILTER (WHERE owner::text <> \'alice\') FROM dsmapper.jobs'),
	"$n_alice|0",
	'carol (member of alice) sees alice\'s jobs and no others');
is( sql_as(
		$node, 'carol',
		"SELECT count(*) FROM dsmapper.shards s JOIN dsmapper.jobs j USING (job_id) WHERE j.owner::text = 'alice'"
	),
	$shards_alice,
	'carol sees the shards of alice\'s jobs');
is(sql_as($node, 'dave', 'SELECT count(*) FROM dsmapper.jobs'),
	$total, 'dave (pg_read_all_stats) sees every job');
is(sql_as($node, 'dave', 'SELECT count(*) FROM dsmapper.shards'),
	$shards_total, 'dave sees every shard');
is(su('SELECT count(*) FROM dsmapper.jobs'), $total, 'the superuser sees every job');
is(su('SELECT count(*) FROM dsmapper.shards'), $shards_total, 'the superuser sees every shard');

refused_as($node, 'bob', "SELECT dsmapper_wait($probe_job, '1 s')",
	'42501', 'bob cannot wait for alice\'s job');

foreach my $tab (qw(job shard queue mapper))
{
	refused_as($node, 'bob', "SELECT * FROM dsmapper.$tab",
		'42501', "bob cannot read dsmapper.$tab");
	refused_as($node, 'bob', "INSERT INTO dsmapper.$tab DEFAULT VALUES",
		'42501', "bob cannot insert into dsmapper.$tab");
	my $col = $tab eq 'mapper' ? 'created' : $tab eq 'queue' ? 'ready_at' : 'updated';
	refused_as($node, 'bob', "UPDATE dsmapper.$tab SET $col = now()",
		'42501', "bob cannot update dsmapper.$tab");
	refused_as($node, 'bob', "DELETE FROM dsmapper.$tab",
		'42501', "bob cannot delete from dsmapper.$tab");
	refused_as($node, 'bob', "TRUNCATE dsmapper.$tab",
		'42501', "bob cannot truncate dsmapper.$tab");
	refused_as($node, 'alice', "SELECT * FROM dsmapper.$tab",
		'42501', "alice cannot read dsmapper.$tab either");
}
is(su('SELECT count(*) FROM dsmapper.job'), $total, 'the job table is intact');

# ===========================================================================
# 8. Hostile objects on alice's search_path: tables and functions named like
#    dsmapper's internals and operators that lie, in a schema that alice
#    puts before pg_catalog.  Every hostile function logs who called it.
#    dsmapper's own queries must not use any of them (the README: "internal
#    SQL qualifies every table, function and operator"), nothing of alice's
#    may run as another role, and alice's job and bob's must map every row
#    exactly once.
# ===========================================================================

su('CREATE SCHEMA alice_h AUTHORIZATION alice');
sql_as(
	$node, 'alice', q{
	GRANT USAGE ON SCHEMA alice_h TO PUBLIC;
	CREATE TABLE alice_h.hits (what text, cu text);
	GRANT INSERT ON alice_h.hits TO PUBLIC;

	CREATE TABLE alice_h.job (job_id bigint, state text);
	CREATE TABLE alice_h.shard (job_id bigint, shard integer, state text);
	CREATE TABLE alice_h.queue (job_id bigint, shard integer);
	CREATE TABLE alice_h.mapper (mapper text, fn text, owner oid);

	CREATE FUNCTION alice_h.hit(what text) RETURNS void LANGUAGE sql AS
		$fn$ INSERT INTO alice_h.hits VALUES (what, current_user) $fn$;
	CREATE FUNCTION alice_h.now() RETURNS timestamptz LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('now()'); RETURN '2000-01-01'; END $fn$;
	CREATE FUNCTION alice_h.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('clock_timestamp()'); RETURN '2000-01-01'; END $fn$;
	CREATE FUNCTION alice_h.pg_has_role(name, oid, text) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('pg_has_role()'); RETURN true; END $fn$;
	CREATE FUNCTION alice_h.generate_series(integer, integer) RETURNS SETOF integer LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('generate_series()'); RETURN; END $fn$;

	CREATE FUNCTION alice_h.eq_text(a text, b text) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('text = text'); RETURN a OPERATOR(pg_catalog.<>) b; END $fn$;
	CREATE FUNCTION alice_h.eq_int8(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('bigint = bigint'); RETURN true; END $fn$;
	CREATE FUNCTION alice_h.eq_int4(a integer, b integer) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('integer = integer'); RETURN true; END $fn$;
	CREATE FUNCTION alice_h.lt_int8(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('bigint < bigint'); RETURN true; END $fn$;
	CREATE FUNCTION alice_h.ge_int8(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('bigint >= bigint'); RETURN true; END $fn$;
	CREATE FUNCTION alice_h.gt_int8(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('bigint > bigint'); RETURN a OPERATOR(pg_catalog.<) b; END $fn$;
	CREATE FUNCTION alice_h.plus_int8(a bigint, b bigint) RETURNS bigint LANGUAGE plpgsql AS
		$fn$ BEGIN PERFORM alice_h.hit('bigint + bigint'); RETURN 0; END $fn$;
	CREATE OPERATOR alice_h.= (LEFTARG = text, RIGHTARG = text, FUNCTION = alice_h.eq_text);
	CREATE OPERATOR alice_h.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = alice_h.eq_int8);
	CREATE OPERATOR alice_h.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = alice_h.eq_int4);
	CREATE OPERATOR alice_h.< (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = alice_h.lt_int8);
	CREATE OPERATOR alice_h.>= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = alice_h.ge_int8);
	CREATE OPERATOR alice_h.> (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = alice_h.gt_int8);
	CREATE OPERATOR alice_h.+ (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = alice_h.plus_int8);

	-- The job's own table and mapper use only qualified operators, so any
	-- hit during the job comes from dsmapper.
	CREATE TABLE alice_s.h (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO alice_s.h (id) SELECT g FROM generate_series(1, 1000) g;
	CREATE FUNCTION alice_s.h_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		UPDATE alice_s.h SET n = n OPERATOR(pg_catalog.+) 1
		 WHERE id OPERATOR(pg_catalog.=) ANY (keys)
	$fn$;
});

# One session of alice with the hostile search_path: register, launch,
# pause and resume (the API's internal queries run in this session), and
# look at the views.
my $hostile_out = sql_as(
	$node, 'alice', q{
	SET search_path = alice_h, pg_catalog, public;
	SELECT dsmapper_register('alice-h', 'alice_s.h_map(bigint[], jsonb)');
	BEGIN;
	SELECT dsmapper_launch('alice-h', 'alice_s.h', shards => 4, page_size => 100) AS job \gset
	SELECT 'paused:' || dsmapper_pause(:job);
	COMMIT;
	SELECT 'resumed:' || dsmapper_resume(:job);
	SELECT 'job:' || job_id FROM dsmapper.jobs WHERE job_id OPERATOR(pg_catalog.=) :job;
	SELECT 'mapper:' || count(*) FROM dsmapper.mappers WHERE mapper OPERATOR(pg_catalog.=) 'alice-h';
});
my ($h_job) = $hostile_out =~ /^job:(\d+)$/m;
like($hostile_out, qr/^paused:paused$/m, 'hostile search_path: pause works');
like($hostile_out, qr/^resumed:(starting|running)$/m, 'hostile search_path: resume works');
like($hostile_out, qr/^mapper:1$/m, 'hostile search_path: the mapper is registered');
ok(defined $h_job, 'hostile search_path: the job is visible in dsmapper.jobs');
$h_job //= 0;

# Bob's job, launched meanwhile with his ordinary search_path.
su('UPDATE bob_s.bt SET n = 0');
my $bob_job2 = sql_as($node, 'bob', "SELECT dsmapper_launch('bob-map', 'bob_s.bt', shards => 2, page_size => 10)");

is(wait_job($node, $h_job, timeout => '60 s'), 'succeeded', 'hostile search_path: alice\'s job succeeds');
is(wait_job($node, $bob_job2, timeout => '60 s'), 'succeeded', 'bob\'s concurrent job succeeds');
is(su('SELECT count(*), count(*) FILTER (WHERE n = 1) FROM bob_s.bt'),
	'100|100', 'bob\'s job mapped every row exactly once');
is(su("SELECT count(*) FROM alice_h.hits WHERE cu <> 'alice'"),
	'0', 'no hostile function ever ran as a role other than alice');
is(su("SELECT coalesce(string_agg(DISTINCT what, ', '), '') FROM alice_h.hits"),
	'', 'dsmapper\'s queries used none of the hostile functions or operators');
is(su('SELECT count(*), count(*) FILTER (WHERE n = 1) FROM alice_s.h'),
	'1000|1000', 'hostile search_path: alice\'s job mapped every row exactly once')
  or diag('times mapped|rows: '
	  . su("SELECT string_agg(n || '|' || c, ', ' ORDER BY n) FROM (SELECT n, count(*) c FROM alice_s.h GROUP BY n) s"));
is( su(
		"SELECT j.processed = (SELECT sum(processed) FROM dsmapper.shards WHERE job_id = $h_job), j.processed FROM dsmapper.jobs j WHERE job_id = $h_job"
	),
	't|1000',
	'hostile search_path: the job\'s counts are consistent');
is( su(
		"SELECT (SELECT count(*) FROM alice_h.job) + (SELECT count(*) FROM alice_h.shard) + (SELECT count(*) FROM alice_h.queue) + (SELECT count(*) FROM alice_h.mapper)"
	),
	'0',
	'nothing was written to the look-alike tables');
is(su("SELECT count(*) FROM dsmapper.queue WHERE job_id IN ($h_job, $bob_job2)"),
	'0', 'no queue entry is left for the finished jobs');

# ===========================================================================
# 9. Settings made by one owner's mapper do not leak into other owners'
#    jobs run later by the same worker.
# ===========================================================================

sql_as(
	$node, 'alice', q{
	CREATE FUNCTION alice_s.setter(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		SET dsm_sec.leak = 'set by alice';
		SET work_mem = '7777kB';
		SET transform_null_equals = on;
		PERFORM set_config('statement_timeout', '99s', false);
		INSERT INTO alice_s.audit (job, what, cu, pid)
		VALUES (dsmapper_current_job(), 'setter', current_user, pg_backend_pid());
	END $fn$;
	SELECT dsmapper_register('alice-setter', 'alice_s.setter(bigint[], jsonb)');
});
sql_as(
	$node, 'bob', q{
	CREATE TABLE bob_s.seen (pid integer, leak text, work_mem text,
	                         transform_null_equals text, statement_timeout text);
	CREATE FUNCTION bob_s.reader(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		INSERT INTO bob_s.seen
		VALUES (pg_backend_pid(), current_setting('dsm_sec.leak', true),
		        current_setting('work_mem'), current_setting('transform_null_equals'),
		        current_setting('statement_timeout'))
	$fn$;
	SELECT dsmapper_register('bob-reader', 'bob_s.reader(bigint[], jsonb)');
});
my $defaults = su(
	"SELECT current_setting('work_mem') || '|' || current_setting('transform_null_equals') || '|' || current_setting('statement_timeout')"
);

my $setter_job = sql_as($node, 'alice',
	"SELECT dsmapper_launch('alice-setter', 'alice_s.t', shards => 1, page_size => 1000)");
is(wait_job($node, $setter_job, timeout => '60 s'), 'succeeded', 'alice\'s setting job succeeds');
my $reader_job = sql_as($node, 'bob',
	"SELECT dsmapper_launch('bob-reader', 'bob_s.bt', shards => 1, page_size => 1000)");
is(wait_job($node, $reader_job, timeout => '60 s'), 'succeeded', 'bob\'s reading job succeeds');

my $alice_pid = su("SELECT pid FROM alice_s.audit WHERE job = $setter_job AND what = 'setter'");
my $bob_pid = su('SELECT pid FROM bob_s.seen');
is($bob_pid, $alice_pid, 'both jobs ran in the same worker (precondition of the next check)');
is( su(
		"SELECT coalesce(leak, '') || '|' || work_mem || '|' || transform_null_equals || '|' || statement_timeout FROM bob_s.seen"
	),
	"|$defaults",
	'bob\'s mapper runs with default settings, none of those alice\'s mapper made');

# ===========================================================================
# 10. A hostile operator in a schema on the superuser's search_path is not
#     run as the superuser by dsmapper's page queries.  Alice may create
#     objects in public (as before PostgreSQL 15); the superuser's mapper is
#     written defensively (pinned search_path, qualified operator), so
#     anything alice's operator does as the superuser is dsmapper's doing.
#     The operator is correct, so only the identity is at stake.
# ===========================================================================

su(q{
	GRANT CREATE ON SCHEMA public TO alice;
	CREATE TABLE public.vt (id varchar(10) PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO public.vt (id) SELECT lpad(g::text, 5, '0') FROM generate_series(1, 300) g;
	CREATE FUNCTION public.vt_map(keys varchar[], params jsonb)
	RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $fn$
		UPDATE public.vt SET n = n + 1 WHERE id OPERATOR(pg_catalog.=) ANY (keys)
	$fn$;
	SELECT dsmapper_register('su-vt', 'public.vt_map(varchar[], jsonb)');
});
sql_as(
	$node, 'alice', q{
	CREATE FUNCTION public.vc_lt(a varchar, b varchar) RETURNS boolean
	LANGUAGE plpgsql AS $fn$
	BEGIN
		INSERT INTO alice_h.hits VALUES ('varchar <', current_user);
		BEGIN
			EXECUTE 'ALTER ROLE alice SUPERUSER';
		EXCEPTION WHEN others THEN NULL;
		END;
		RETURN a::text < b::text;
	END $fn$;
	CREATE FUNCTION public.vc_ge(a varchar, b varchar) RETURNS boolean
	LANGUAGE plpgsql AS $fn$
	BEGIN
		INSERT INTO alice_h.hits VALUES ('varchar >=', current_user);
		BEGIN
			EXECUTE 'ALTER ROLE alice SUPERUSER';
		EXCEPTION WHEN others THEN NULL;
		END;
		RETURN a::text >= b::text;
	END $fn$;
	CREATE OPERATOR public.< (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.vc_lt);
	CREATE OPERATOR public.>= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.vc_ge);
});
su('TRUNCATE alice_h.hits');
my $vt_job = su("SELECT dsmapper_launch('su-vt', 'public.vt', shards => 3, page_size => 50)");
is(wait_job($node, $vt_job, timeout => '60 s'), 'succeeded', 'the superuser\'s varchar job succeeds');
is(su("SELECT count(*) FROM alice_h.hits WHERE cu <> 'alice'"),
	'0', 'alice\'s operator never ran as the superuser');
is(su("SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'"),
	'f', 'alice did not become a superuser');
is(su('SELECT count(*), count(*) FILTER (WHERE n = 1) FROM public.vt'),
	'300|300', 'the superuser\'s job mapped every row exactly once');
su(q{
	ALTER ROLE alice NOSUPERUSER;
	DROP OPERATOR public.< (varchar, varchar);
	DROP OPERATOR public.>= (varchar, varchar);
	REVOKE CREATE ON SCHEMA public FROM alice;
});

# ===========================================================================
# 11. dsmapper_run() in an ordinary role's session.  Without background
#     workers, a superuser's job waits in the queue; alice, in her own
#     session, shadows the superuser's table with a temporary table that
#     has a trigger, and calls dsmapper_run().  Whatever dsmapper_run does
#     with the superuser's job, nothing of alice's may run as the superuser,
#     and the superuser's job must map its own table exactly once.
# ===========================================================================

my $node2 = new_node('security_run', preload => 0);
$node2->safe_psql(
	'postgres', q{
	CREATE ROLE alice LOGIN;
	CREATE SCHEMA alice_s AUTHORIZATION alice;
	CREATE TABLE public.t2 (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO public.t2 (id) SELECT g FROM generate_series(1, 100) g;
	CREATE FUNCTION public.su_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE t2 SET n = n + 1 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('su-map', 'public.su_map(bigint[], jsonb)');
});
my $su_job = $node2->safe_psql('postgres',
	"SELECT dsmapper_launch('su-map', 'public.t2', shards => 1, page_size => 1000)");
is($node2->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $su_job"),
	'starting', 'dsmapper_run: the superuser\'s job waits in the queue');

my ($run_rc, $run_state, $run_out, $run_err) = try_as(
	$node2, 'alice', q{
	CREATE TABLE alice_s.seen (cu text, what text);
	CREATE FUNCTION alice_s.pwn() RETURNS trigger LANGUAGE plpgsql AS $fn$
	BEGIN
		INSERT INTO alice_s.seen VALUES (current_user, 'trigger fired');
		BEGIN
			EXECUTE 'ALTER ROLE alice SUPERUSER';
			INSERT INTO alice_s.seen VALUES (current_user, 'ALTER ROLE succeeded');
		EXCEPTION WHEN others THEN
			INSERT INTO alice_s.seen VALUES (current_user, SQLSTATE);
		END;
		RETURN NULL;
	END $fn$;
	CREATE TEMP TABLE t2 (id bigint, n integer);
	CREATE TRIGGER pwn AFTER UPDATE ON pg_temp.t2
		FOR EACH STATEMENT EXECUTE FUNCTION alice_s.pwn();
	SELECT 'pages:' || dsmapper_run('10 s');
});
diag("alice's dsmapper_run: exit code $run_rc, SQLSTATE '$run_state', output: $run_out");
is( $node2->safe_psql(
		'postgres',
		"SELECT coalesce(string_agg(cu || ': ' || what, '; '), '') FROM alice_s.seen WHERE cu <> 'alice'"
	),
	'',
	'dsmapper_run: nothing of alice\'s ran as another role');
is($node2->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'"),
	'f', 'dsmapper_run: alice did not become a superuser');

# The superuser finishes his job himself if it is not final yet.
foreach my $i (1 .. 5)
{
	last
	  if $node2->safe_psql('postgres',
		"SELECT state IN ('succeeded', 'failed', 'aborted') FROM dsmapper.jobs WHERE job_id = $su_job"
	  ) eq 't';
	$node2->safe_psql('postgres', "SELECT dsmapper_run('10 s')");
}
is($node2->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $su_job"),
	'succeeded', 'dsmapper_run: the superuser\'s job succeeds');
is($node2->safe_psql('postgres', 'SELECT count(*), count(*) FILTER (WHERE n = 1) FROM public.t2'),
	'100|100', 'dsmapper_run: the superuser\'s job mapped its own table exactly once');
$node2->safe_psql('postgres', 'ALTER ROLE alice NOSUPERUSER');
$node2->stop;

$node->stop;
done_testing();
