-- 03_failures.sql: errors in a mapper, mappers that vanish, bad launches.
--
-- 1. A mapper that divides by zero for one key fails only the shard that
--    holds the key; the failure is recorded with message, SQLSTATE and the
--    page's first and last key; the page is rolled back; other shards
--    succeed; the job ends failed.
-- 2. A mapper unregistered while its job runs fails the job's remaining
--    work with a clear message; re-registering it and dsmapper_retry finish
--    the job with every row mapped exactly once.  To make this
--    deterministic, the mapper waits on an advisory lock this session holds
--    ("the gate"), so no page can complete until the test opens the gate.
-- 3. Registration and launch validation.
--
-- Autocommit throughout: launches must commit for the workers to see them.

\set ON_ERROR_STOP 1
\pset format unaligned
\pset tuples_only true
\pset pager off

SELECT plan(63);

-- Polls a boolean query with fresh snapshots until it holds or the
-- timeout passes.  Returns whether it held.
CREATE FUNCTION wait_until(cond text, timeout interval DEFAULT '30 s')
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
    ok boolean;
BEGIN
    LOOP
        EXECUTE 'SELECT (' || cond || ')' INTO ok;
        IF ok THEN
            RETURN true;
        END IF;
        IF clock_timestamp() > deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;

------------------------------------------------------------------------------
-- 1. A permanent error fails only its shard
------------------------------------------------------------------------------

CREATE TABLE perm (
    id bigint PRIMARY KEY,
    n  integer NOT NULL DEFAULT 0
);
INSERT INTO perm (id) SELECT g FROM generate_series(1, 8000) g;
ANALYZE perm;

CREATE FUNCTION map_perm(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE perm SET n = n + 1 WHERE id = ANY (keys);
    IF (params->>'bad')::bigint = ANY (keys) THEN
        PERFORM 1 / 0;
    END IF;
END $$;

SELECT dsmapper_register('perm', 'map_perm(bigint[], jsonb)');
SELECT dsmapper_launch('perm', 'perm', params => '{"bad": 5555}',
                       shards => 4, page_size => 100) AS job \gset

SELECT is(dsmapper_wait(:job, '120 s'), 'failed', 'a job with a failing page ends failed');
SELECT is(state, 'failed', 'jobs.state is failed') FROM dsmapper.jobs WHERE job_id = :job;
SELECT cmp_ok(shards, '>', 1, 'the job has several shards')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(shards_failed, 1, 'exactly one shard failed')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(shards_done, shards - 1, 'all other shards succeeded')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT matches(error, 'division by zero', 'jobs.error mentions the mapper''s message')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT isnt(finished, NULL, 'a failed job has finished set')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(eta, NULL, 'a failed job has no eta')
  FROM dsmapper.jobs WHERE job_id = :job;

SELECT shard AS bad_shard FROM dsmapper.shards
 WHERE job_id = :job AND state = 'failed' \gset

SELECT ok((range_start IS NULL OR range_start::bigint <= 5555)
          AND (range_end IS NULL OR 5555 < range_end::bigint),
          'the failed shard is the one whose range holds the bad key')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT is(error_sqlstate, '22012', 'the failed shard records SQLSTATE 22012')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT matches(error, 'division by zero', 'the failed shard records the message')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT ok(error_first_key::bigint <= 5555 AND 5555 <= error_last_key::bigint,
          'error_first_key <= bad key <= error_last_key')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT cmp_ok(error_last_key::bigint - error_first_key::bigint + 1, '<=', 100::bigint,
              'the recorded page spans at most page_size keys')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT is(attempts, 1, 'a permanent error is not retried (attempts = 1)')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT ok(resume_from IS NULL OR resume_from::bigint < error_first_key::bigint,
          'the failed shard''s checkpoint is before the failing page')
  FROM dsmapper.shards WHERE job_id = :job AND shard = :bad_shard;
SELECT is_empty(format($$SELECT shard, state FROM dsmapper.shards
                          WHERE job_id = %s AND shard <> %s AND state <> 'succeeded'$$,
                       :job, :bad_shard),
                'every other shard succeeded');
SELECT is_empty(format($$SELECT shard FROM dsmapper.shards
                          WHERE job_id = %s AND shard <> %s
                            AND (error IS NOT NULL OR error_sqlstate IS NOT NULL)$$,
                       :job, :bad_shard),
                'the other shards have no error');

-- The failing page was rolled back; nothing was mapped twice.
SELECT is_empty(format($$SELECT id FROM perm, dsmapper.shards s
                          WHERE s.job_id = %s AND s.shard = %s
                            AND id BETWEEN s.error_first_key::bigint
                                       AND s.error_last_key::bigint
                            AND n <> 0$$, :job, :bad_shard),
                'the rows of the failing page are untouched');
SELECT is_empty('SELECT id FROM perm WHERE n > 1', 'no row was mapped twice');
SELECT is((SELECT count(*) FROM perm WHERE n = 1),
          (SELECT processed FROM dsmapper.jobs WHERE job_id = :job),
          'rows mapped = jobs.processed');
-- Every row outside the failed shard was mapped.
SELECT is_empty(format($$SELECT id FROM perm, dsmapper.shards s
                          WHERE s.job_id = %s AND s.shard <> %s
                            AND (s.range_start IS NULL OR id >= s.range_start::bigint)
                            AND (s.range_end IS NULL OR id < s.range_end::bigint)
                            AND n <> 1$$, :job, :bad_shard),
                'every row of the other shards was mapped exactly once');

-- A final job stays final: pause and resume refuse, abort changes nothing.
SELECT throws_ok(format('SELECT dsmapper_pause(%s)', :job), '55000', NULL,
                 'pausing a failed job is refused');
SELECT throws_ok(format('SELECT dsmapper_resume(%s)', :job), '55000', NULL,
                 'resuming a failed job is refused');
SELECT is(dsmapper_abort(:job), 'failed', 'aborting a failed job leaves it failed');

------------------------------------------------------------------------------
-- 2. A mapper unregistered while its job runs
------------------------------------------------------------------------------

CREATE TABLE gone (
    id bigint PRIMARY KEY,
    n  integer NOT NULL DEFAULT 0
);
INSERT INTO gone (id) SELECT g FROM generate_series(1, 4000) g;
ANALYZE gone;

CREATE FUNCTION map_gone(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- The gate: wait until the test session releases its advisory lock.
    PERFORM pg_advisory_xact_lock_shared(7303001);
    UPDATE gone SET n = n + 1 WHERE id = ANY (keys);
END $$;

SELECT dsmapper_register('gone', 'map_gone(bigint[], jsonb)');

-- Close the gate (a session lock survives the autocommit transactions).
SELECT lives_ok('SELECT pg_advisory_lock(7303001)', 'the gate is closed');

-- One page per turn, so that every shard checks its mapper again after
-- the page in flight.
SELECT dsmapper_launch('gone', 'gone', shards => 4, page_size => 100,
                       pages_per_task => 1) AS gone_job \gset

-- Wait until a worker is stuck at the gate: the job is running.
SELECT ok(wait_until(format($$EXISTS (SELECT 1 FROM pg_locks
                                WHERE locktype = 'advisory' AND NOT granted
                                  AND objid = 7303001 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))$$)),
          'a worker waits at the gate');
SELECT is((SELECT state FROM dsmapper.jobs WHERE job_id = :gone_job), 'running',
          'the job is running');

SELECT lives_ok($$SELECT dsmapper_unregister('gone')$$,
                'a mapper with a running job can be unregistered');
SELECT is_empty($$SELECT * FROM dsmapper.mappers WHERE mapper = 'gone'$$,
                'the mapper is no longer listed');
-- Open the gate.
SELECT ok(pg_advisory_unlock(7303001), 'the gate is open');

SELECT is(dsmapper_wait(:gone_job, '120 s'), 'failed',
          'the job of an unregistered mapper ends failed');
SELECT is_empty(format($$SELECT shard, state FROM dsmapper.shards
                          WHERE job_id = %s AND state <> 'failed'$$, :gone_job),
                'every shard failed (each has pages left after the one in flight)');
SELECT is_empty(format($$SELECT shard, error FROM dsmapper.shards
                          WHERE job_id = %s
                            AND error NOT LIKE '%%"gone"%%no longer registered%%'$$, :gone_job),
                'each shard''s error says the mapper is no longer registered');
SELECT matches(error, 'no longer registered', 'jobs.error says so too')
  FROM dsmapper.jobs WHERE job_id = :gone_job;
SELECT is_empty('SELECT id FROM gone WHERE n > 1', 'no row was mapped twice');
SELECT is((SELECT count(*) FROM gone WHERE n = 1),
          (SELECT processed FROM dsmapper.jobs WHERE job_id = :gone_job),
          'rows mapped = jobs.processed');
SELECT cmp_ok((SELECT processed FROM dsmapper.jobs WHERE job_id = :gone_job), '<', 4000::bigint,
              'the job stopped before mapping everything');

-- A launch with the unregistered mapper is refused.
SELECT throws_ok($$SELECT dsmapper_launch('gone', 'gone')$$, '42704', NULL,
                 'launching an unregistered mapper fails (undefined_object)');

-- Register the same function under a new name: launches work again with
-- the new name, and the old job's mapper id stays unknown.
SELECT lives_ok($$SELECT dsmapper_register('gone-v2', 'map_gone(bigint[], jsonb)')$$,
                'the function can be registered under a new name');
SELECT is((SELECT function FROM dsmapper.mappers WHERE mapper = 'gone-v2'),
          'map_gone(bigint[],jsonb)'::regprocedure, 'dsmapper.mappers shows the new name');

-- Registering the old name again and retrying finishes the old job from
-- its checkpoints: every row mapped exactly once.
SELECT lives_ok($$SELECT dsmapper_register('gone', 'map_gone(bigint[], jsonb)')$$,
                'the old name can be registered again');
SELECT is(dsmapper_retry(:gone_job), 'running', 'dsmapper_retry reopens the failed job');
SELECT is(dsmapper_wait(:gone_job, '120 s'), 'succeeded', 'the retried job succeeds');
SELECT is_empty('SELECT id, n FROM gone WHERE n <> 1',
                'after the retry every row was mapped exactly once');
SELECT is(processed::bigint, 4000::bigint, 'jobs.processed = 4000 after the retry')
  FROM dsmapper.jobs WHERE job_id = :gone_job;
SELECT is(error, NULL, 'the retried job has no error')
  FROM dsmapper.jobs WHERE job_id = :gone_job;

------------------------------------------------------------------------------
-- 3. Registration and launch validation
------------------------------------------------------------------------------

CREATE TABLE nopk (id bigint, n integer);
INSERT INTO nopk SELECT g, 0 FROM generate_series(1, 10) g;
CREATE TABLE textpk (id text PRIMARY KEY);
CREATE FUNCTION not_a_mapper(keys bigint[]) RETURNS void
LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION wrong_params(keys bigint[], params json) RETURNS void
LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION set_mapper(keys bigint[], params jsonb) RETURNS SETOF integer
LANGUAGE sql AS $$ SELECT 1 $$;
CREATE PROCEDURE proc_mapper(keys bigint[], params jsonb)
LANGUAGE sql AS $$ SELECT 1 $$;

SELECT throws_ok($$SELECT dsmapper_register('perm', 'map_perm(bigint[], jsonb)')$$,
                 '42710', NULL, 'registering an existing mapper id fails');
SELECT lives_ok($$SELECT dsmapper_register('perm', 'map_gone(bigint[], jsonb)', replace => true)$$,
                'replace => true rebinds an existing mapper id');
SELECT is((SELECT function FROM dsmapper.mappers WHERE mapper = 'perm'),
          'map_gone(bigint[],jsonb)'::regprocedure, 'the mapper id points at the new function');
SELECT throws_ok($$SELECT dsmapper_register('bad1', 'not_a_mapper(bigint[])')$$,
                 '42P13', NULL, 'a one-argument function is not a mapper');
SELECT throws_ok($$SELECT dsmapper_register('bad2', 'wrong_params(bigint[], json)')$$,
                 '42P13', NULL, 'a mapper''s second argument must be jsonb');
SELECT throws_ok($$SELECT dsmapper_register('bad3', 'set_mapper(bigint[], jsonb)')$$,
                 '42P13', NULL, 'a set-returning function is not a mapper');
SELECT throws_ok($$SELECT dsmapper_register('bad4', 'proc_mapper(bigint[], jsonb)')$$,
                 '42P13', NULL, 'a procedure is not a mapper');
SELECT throws_ok($$SELECT dsmapper_unregister('no-such-mapper')$$,
                 '42704', NULL, 'unregistering an unknown mapper fails');
SELECT throws_like($$SELECT dsmapper_launch('gone', 'nopk')$$,
                   '%primary key%', 'a table without a primary key is refused at launch');
SELECT throws_ok($$SELECT dsmapper_launch('gone', 'textpk')$$,
                 '42804', NULL, 'a keys mapper whose key type does not match is refused');
SELECT throws_ok($$SELECT dsmapper_launch('gone', 'gone', shards => 0)$$,
                 '22023', NULL, 'shards => 0 is refused');
SELECT throws_ok($$SELECT dsmapper_launch('gone', 'gone', page_size => 0)$$,
                 '22023', NULL, 'page_size => 0 is refused');
SELECT throws_ok($$SELECT dsmapper_launch('gone', 'gone', filter => 'no_such_column > 0')$$,
                 '42703', NULL, 'a filter naming an unknown column is refused at launch');
SELECT throws_ok($$SELECT dsmapper_launch(NULL, 'gone')$$,
                 '22004', NULL, 'a NULL mapper is refused');
SELECT throws_ok('SELECT dsmapper_wait(-1)', '42704', NULL,
                 'waiting for an unknown job fails');
SELECT throws_ok('SELECT dsmapper_abort(-1)', '42704', NULL,
                 'aborting an unknown job fails');
-- None of the refused launches left a job behind.
SELECT is((SELECT count(*) FROM dsmapper.jobs), 2::bigint,
          'refused launches store no job');

SELECT * FROM finish();
