
# 032_security_identity.pl: what runs as whom, beyond the mapper call itself
# (SPEC section 6, README "Security").
#
#  (a) a domain-typed key: the domain's CHECK runs whenever a checkpoint is
#      read back into a key value; it runs as the job's owner, never as the
#      extension owner or a superuser;
#  (b) a job calls only the function it was launched with: when the
#      mapper's registrant binds the id to another function, the running
#      job's shards fail instead of calling it, and a retry after binding
#      it back finishes the job with every row mapped once;
#  (c) EXECUTE revoked while a long turn runs fails the shard at its next
#      page, not at the end of the turn;
#  (d) the owner's search_path at launch is the one the mapper runs with;
#  (e) temporary objects made by one owner's mapper are gone before the
#      same worker runs another owner's job;
#  (f) in dsmapper_run(), a superuser's session runs other roles' mappers
#      as a security-restricted operation: they cannot leave temporary
#      tables behind for the session to meet;
#  (g) user code that runs at commit (deferred triggers, WITH HOLD
#      cursors) runs as the owner in a worker.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

# One worker, so that consecutive jobs run in the same worker process.
my $node = new_node('identity', max_workers => 1,
	extra_conf => "dsmapper.worker_idle_timeout = 600\n");

my $su = $node->safe_psql('postgres', 'SELECT current_user');

sub as_role
{
	my ($role, $sql) = @_;
	return $node->safe_psql('postgres', $sql, extra_params => [ '-U', $role ]);
}

sub su { return $node->safe_psql('postgres', $_[0]); }

su(q{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN;
	GRANT CREATE ON SCHEMA public TO alice, bob;
	GRANT CREATE ON DATABASE postgres TO alice;
});

# ===========================================================================
# (a) Domain key: its CHECK runs as the owner.

as_role('alice', q{
	CREATE TABLE who_checked (u name, at timestamptz DEFAULT clock_timestamp());
	CREATE FUNCTION alice_check(v bigint) RETURNS boolean
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.who_checked (u) VALUES (current_user);
		RETURN v > 0;
	END $$;
	CREATE DOMAIN alice_id AS bigint CHECK (public.alice_check(VALUE));
	CREATE TABLE dom_t (id alice_id PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO dom_t (id) SELECT g FROM generate_series(1, 60) g;
	CREATE FUNCTION dom_map(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		UPDATE public.dom_t SET n = n + 1 WHERE id = ANY (keys);
	END $$;
	SELECT dsmapper_register('dom-map', 'dom_map(bigint[], jsonb)');
	TRUNCATE who_checked;
});
my $job = as_role('alice',
	"SELECT dsmapper_launch('dom-map', 'dom_t', shards => 1, page_size => 10)");
is(wait_job($node, $job), 'succeeded', 'a job over a domain-typed key succeeds');
is(su("SELECT count(*) FILTER (WHERE n = 1) || '|' || count(*) FROM dom_t"),
	'60|60', 'every row of the domain-keyed table mapped once');
cmp_ok(su('SELECT count(*) FROM who_checked'), '>', 0,
	'the domain check ran while the job read its checkpoints back');
is(su("SELECT string_agg(DISTINCT u, ',') FROM who_checked"), 'alice',
	'the domain check ran only as the job owner, never as a superuser');

# ===========================================================================
# (b) A job keeps the function it was launched with.

as_role('bob', q{
	CREATE TABLE bob_calls (fn text, u name);
	GRANT INSERT ON bob_calls TO PUBLIC;
	CREATE FUNCTION bob_map(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		UPDATE public.swap_t SET n = n + 1 WHERE id = ANY (keys);
		PERFORM pg_sleep(0.2);
	END $$;
	CREATE FUNCTION bob_other(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.bob_calls VALUES ('other', current_user);
	END $$;
	SELECT dsmapper_register('bob-map', 'bob_map(bigint[], jsonb)');
});
as_role('alice', q{
	CREATE TABLE swap_t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO swap_t (id) SELECT g FROM generate_series(1, 200) g;
});
$job = as_role('alice',
	"SELECT dsmapper_launch('bob-map', 'swap_t', shards => 1, page_size => 10, task_duration => '1 hour')");
ok(poll_until($node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job", 't', 30),
	'alice\'s job with bob\'s mapper runs');
as_role('bob', "SELECT dsmapper_register('bob-map', 'bob_other(bigint[], jsonb)', replace => true)");
is(wait_job($node, $job), 'failed', 'the job fails once its mapper id is bound to another function');
like(su("SELECT error FROM dsmapper.shards WHERE job_id = $job"),
	qr/mapper "bob-map" was bound to another function after job $job was launched/,
	'the shard says why');
is(su('SELECT count(*) FROM bob_calls'), '0', 'the other function was never called for the job');
my $done = su('SELECT count(*) FROM swap_t WHERE n = 1');
cmp_ok($done, '<', 200, "the job stopped part way ($done of 200 rows)");

as_role('bob', "SELECT dsmapper_register('bob-map', 'bob_map(bigint[], jsonb)', replace => true)");
as_role('alice', "SELECT dsmapper_retry($job)");
is(wait_job($node, $job), 'succeeded', 'after binding it back, a retry finishes the job');
is(su("SELECT count(*) FILTER (WHERE n = 1) || '|' || count(*) FROM swap_t"),
	'200|200', 'every row mapped exactly once across the failure and the retry');

# ===========================================================================
# (c) A revoke takes effect at the next page of a long turn.

as_role('alice', q{
	CREATE TABLE rev_t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO rev_t (id) SELECT g FROM generate_series(1, 2000) g;
});
as_role('bob', q{
	CREATE FUNCTION bob_slow(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		UPDATE public.rev_t SET n = n + 1 WHERE id = ANY (keys);
		PERFORM pg_sleep(0.1);
	END $$;
	SELECT dsmapper_register('bob-slow', 'bob_slow(bigint[], jsonb)');
});
$job = as_role('alice',
	"SELECT dsmapper_launch('bob-slow', 'rev_t', shards => 1, page_size => 5, task_duration => '1 hour')");
ok(poll_until($node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job", 't', 30),
	'the long-turn job runs');
as_role('bob', 'REVOKE EXECUTE ON FUNCTION bob_slow(bigint[], jsonb) FROM PUBLIC');
my $t0 = time();
ok(poll_until($node, "SELECT state FROM dsmapper.jobs WHERE job_id = $job", 'failed', 30),
	'the job fails after EXECUTE is revoked, within its one-hour turn');
like(su("SELECT error FROM dsmapper.shards WHERE job_id = $job"),
	qr/job owner alice no longer has EXECUTE privilege on the function of mapper "bob-slow"/,
	'the shard names the lost privilege');
cmp_ok(su('SELECT count(*) FROM rev_t WHERE n = 1'), '<', 2000, 'the job did not run to its end');

# ===========================================================================
# (d) The launch-time search_path.

as_role('alice', q{
	CREATE SCHEMA alice_s;
	CREATE TABLE alice_s.target (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	CREATE TABLE public.target (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO alice_s.target (id) SELECT g FROM generate_series(1, 30) g;
	INSERT INTO public.target (id) SELECT g FROM generate_series(1, 30) g;
	CREATE FUNCTION public.path_map(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		UPDATE target SET n = n + 1 WHERE id = ANY (keys);
	END $$;
	SELECT dsmapper_register('path-map', 'public.path_map(bigint[], jsonb)');
});
$job = as_role('alice', q{
	SET search_path = alice_s, public;
	SELECT dsmapper_launch('path-map', 'alice_s.target', shards => 2, page_size => 10);
});
is(wait_job($node, $job), 'succeeded', 'a job launched with search_path alice_s, public succeeds');
is(su('SELECT sum(n) FROM alice_s.target') . '|' . su('SELECT sum(n) FROM public.target'),
	'30|0', 'the mapper\'s unqualified table name resolved on the launch-time search_path');

# ===========================================================================
# (e) Temporary objects do not outlive their turn in a worker.

as_role('alice', q{
	CREATE TABLE tmp_a (id bigint PRIMARY KEY);
	INSERT INTO tmp_a SELECT g FROM generate_series(1, 5) g;
	CREATE TABLE tmp_seen (who name, pid integer, temp_tables integer);
	GRANT INSERT ON tmp_seen TO bob;
	CREATE FUNCTION tmp_make(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		CREATE TEMP TABLE IF NOT EXISTS alice_tmp (x integer);
		INSERT INTO alice_tmp VALUES (1);
		INSERT INTO public.tmp_seen
		SELECT current_user, pg_backend_pid(),
		       (SELECT count(*) FROM pg_class WHERE relname = 'alice_tmp' AND relpersistence = 't');
	END $$;
	SELECT dsmapper_register('tmp-make', 'tmp_make(bigint[], jsonb)');
});
as_role('bob', q{
	CREATE TABLE tmp_b (id bigint PRIMARY KEY);
	INSERT INTO tmp_b SELECT g FROM generate_series(1, 5) g;
	CREATE FUNCTION tmp_look(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.tmp_seen
		SELECT current_user, pg_backend_pid(),
		       (SELECT count(*) FROM pg_class WHERE relname = 'alice_tmp' AND relpersistence = 't');
	END $$;
	SELECT dsmapper_register('tmp-look', 'tmp_look(bigint[], jsonb)');
});
$job = as_role('alice', "SELECT dsmapper_launch('tmp-make', 'tmp_a', shards => 1)");
is(wait_job($node, $job), 'succeeded', 'alice\'s mapper may use a temporary table in a worker');
$job = as_role('bob', "SELECT dsmapper_launch('tmp-look', 'tmp_b', shards => 1)");
is(wait_job($node, $job), 'succeeded', 'bob\'s job runs next');
is(su("SELECT count(DISTINCT pid) FROM tmp_seen"), '1',
	'both jobs ran in the same worker process (single worker)');
is(su("SELECT who || ':' || temp_tables FROM tmp_seen ORDER BY who"),
	"alice:1\nbob:0", 'alice\'s temporary table was gone when bob\'s mapper ran');

# ===========================================================================
# (g) User code that PostgreSQL runs at commit time (deferred triggers,
#     WITH HOLD cursors) runs as the owner, not as the worker's superuser.

as_role('alice', q{
	CREATE TABLE commit_seen (what text, who name, super boolean);
	CREATE FUNCTION commit_probe(what text) RETURNS integer
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.commit_seen
		SELECT what, current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
		RETURN 1;
	END $$;
	CREATE FUNCTION commit_trig() RETURNS trigger
	LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM public.commit_probe('trigger');
		RETURN NULL;
	END $$;
	CREATE TABLE late_t (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO late_t SELECT g FROM generate_series(1, 30) g;
	CREATE CONSTRAINT TRIGGER late_check AFTER UPDATE ON late_t
		DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_trig();
	CREATE FUNCTION late_map(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		UPDATE public.late_t SET n = n + 1 WHERE id = ANY (keys);
		EXECUTE format('DECLARE %I CURSOR WITH HOLD FOR'
			' SELECT public.commit_probe(''cursor'') FROM generate_series(1, 2)',
			'late_c' || keys[1]);
	END $$;
	SELECT dsmapper_register('late-map', 'late_map(bigint[], jsonb)');
});
$job = as_role('alice',
	"SELECT dsmapper_launch('late-map', 'late_t', shards => 1, page_size => 10)");
is(wait_job($node, $job), 'succeeded', 'a job with a deferred trigger and a held cursor succeeds');
is(su("SELECT count(*) FROM late_t WHERE n = 1"), '30', 'every row mapped once');
is(su("SELECT string_agg(DISTINCT what || ':' || who || ':' || super, ',' ORDER BY what || ':' || who || ':' || super) FROM commit_seen"),
	'cursor:alice:false,trigger:alice:false',
	'deferred triggers and held cursors ran at commit as the owner, never as a superuser');
is(su("SELECT count(*) FROM commit_seen WHERE what = 'trigger'"), '30',
	'the deferred trigger fired once per mapped row');

# ===========================================================================
# (f) dsmapper_run() in a superuser's session: other roles' code is
#     security-restricted.

su('ALTER SYSTEM SET dsmapper.max_workers = 0');
$node->restart;
$job = as_role('alice', "SELECT dsmapper_launch('tmp-make', 'tmp_a', shards => 1)");
my ($rc, $out, $err) = $node->psql('postgres', q{
	SELECT dsmapper_run('10 s');
	SELECT count(*) FROM pg_class WHERE relname = 'alice_tmp' AND relpersistence = 't';
});
is($rc, 0, 'a superuser\'s dsmapper_run() returns normally') or diag($err);
like($out, qr/\n0$/, 'no temporary table of alice\'s was left in the superuser\'s session');
is(su("SELECT state FROM dsmapper.jobs WHERE job_id = $job"), 'failed',
	'alice\'s mapper, run by a superuser\'s session, could not create a temporary table');
like(su("SELECT error FROM dsmapper.shards WHERE job_id = $job"),
	qr/cannot create temporary table within security-restricted operation/,
	'the shard says why');

# Alice's own session runs her job without restriction.
as_role('alice', "SELECT dsmapper_retry($job)");
($rc, $out, $err) = $node->psql('postgres', "SELECT dsmapper_run('10 s')",
	extra_params => [ '-U', 'alice' ]);
is($rc, 0, 'alice runs her own job in her session') or diag($err);
is(su("SELECT state FROM dsmapper.jobs WHERE job_id = $job"), 'succeeded',
	'in her own session her mapper may use a temporary table');

done_testing();
