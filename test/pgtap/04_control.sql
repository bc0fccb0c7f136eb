-- 04_control.sql: abort, pause, resume and retry.
--
-- The mappers wait on an advisory lock that this session holds ("the
-- gate") whenever a test needs a job that cannot finish on its own; the
-- session lock survives the autocommit transactions of this file and is
-- released with pg_advisory_unlock.  States are polled with a deadline by
-- wait_until(), never with fixed sleeps (each poll is a new statement with
-- a fresh snapshot).
--
-- Autocommit throughout: launches and control calls must commit for the
-- workers to see them.

\set ON_ERROR_STOP 1
\pset format unaligned
\pset tuples_only true
\pset pager off

SELECT plan(69);

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

-- Does a worker of this database wait for advisory lock key?
CREATE FUNCTION gate_waiters(key bigint) RETURNS bigint
LANGUAGE sql AS $$
    SELECT count(*) FROM pg_locks
     WHERE locktype = 'advisory' AND NOT granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND objid = (key & 4294967295)::oid AND classid = (key >> 32)::oid
$$;

-- 20,000 rows; the mapper counts and is slowed down a little per page.
CREATE TABLE items (
    id bigint PRIMARY KEY,
    n  integer NOT NULL DEFAULT 0
);
INSERT INTO items (id) SELECT g FROM generate_series(1, 20000) g;
ANALYZE items;

CREATE FUNCTION count_gated(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared((params->>'gate')::bigint);
    PERFORM pg_sleep((params->>'sleep')::float8);
    UPDATE items SET n = n + 1 WHERE id = ANY (keys);
END $$;
SELECT dsmapper_register('gated', 'count_gated(bigint[], jsonb)');

------------------------------------------------------------------------------
-- 1. Abort right after launch
------------------------------------------------------------------------------

-- With the gate closed no page can finish, so the job cannot succeed
-- before the abort lands.
SELECT lives_ok('SELECT pg_advisory_lock(7304001)', 'gate 1 is closed');
SELECT dsmapper_launch('gated', 'items', params => '{"gate": 7304001, "sleep": 0}',
                       shards => 4, page_size => 100) AS job1 \gset
SELECT dsmapper_abort(:job1) AS abort1 \gset
SELECT ok(:'abort1' IN ('aborted', 'aborting'),
          'dsmapper_abort right after launch returns aborted or aborting (got ' || :'abort1' || ')');
SELECT ok(pg_advisory_unlock(7304001), 'gate 1 is open');
SELECT is(dsmapper_wait(:job1, '120 s'), 'aborted', 'the aborted job ends aborted');
SELECT is(dsmapper_abort(:job1), 'aborted', 'aborting it again returns the same final state');
SELECT is(dsmapper_abort(:job1), 'aborted', 'and again');
SELECT isnt(finished, NULL, 'the aborted job has finished set')
  FROM dsmapper.jobs WHERE job_id = :job1;
SELECT is(eta, NULL, 'the aborted job has no eta')
  FROM dsmapper.jobs WHERE job_id = :job1;
SELECT is_empty(format($$SELECT shard, state FROM dsmapper.shards
                          WHERE job_id = %s AND state <> 'aborted'$$, :job1),
                'every shard of the aborted job is aborted');
SELECT cmp_ok((SELECT processed FROM dsmapper.jobs WHERE job_id = :job1), '<', 20000::bigint,
              'the aborted job did not map everything');
SELECT is((SELECT count(*) FROM items WHERE n = 1),
          (SELECT processed FROM dsmapper.jobs WHERE job_id = :job1),
          'rows mapped = processed of the aborted job');
SELECT is_empty('SELECT id FROM items WHERE n > 1', 'no row mapped twice by the aborted job');
SELECT throws_ok(format('SELECT dsmapper_pause(%s)', :job1), '55000', NULL,
                 'an aborted job cannot be paused');
SELECT throws_ok(format('SELECT dsmapper_resume(%s)', :job1), '55000', NULL,
                 'an aborted job cannot be resumed');

-- Retry reopens the aborted shards from their checkpoints.
SELECT dsmapper_retry(:job1) AS retry1 \gset
SELECT ok(:'retry1' IN ('running', 'starting'),
          'dsmapper_retry of the aborted job reopens it (got ' || :'retry1' || ')');
SELECT is(dsmapper_wait(:job1, '120 s'), 'succeeded', 'the retried aborted job succeeds');
SELECT is_empty('SELECT id, n FROM items WHERE n <> 1',
                'after abort + retry every row was mapped exactly once');
SELECT is(processed::bigint, 20000::bigint, 'jobs.processed = 20000 after the retry')
  FROM dsmapper.jobs WHERE job_id = :job1;

------------------------------------------------------------------------------
-- 1b. Abort of a running job with pages in flight
------------------------------------------------------------------------------

UPDATE items SET n = 0;

SELECT lives_ok('SELECT pg_advisory_lock(7304003)', 'gate 3 is closed');
SELECT dsmapper_launch('gated', 'items', params => '{"gate": 7304003, "sleep": 0}',
                       shards => 4, page_size => 100) AS job1b \gset
SELECT ok(wait_until(format($$(SELECT state FROM dsmapper.jobs WHERE job_id = %s) = 'running'
                              AND gate_waiters(7304003) > 0$$, :job1b)),
          'the job runs and a page waits at the gate');
-- dsmapper_wait gives up after its timeout and returns the current state.
SELECT clock_timestamp() AS wait_start \gset
SELECT is(dsmapper_wait(:job1b, '300 ms'), 'running',
          'dsmapper_wait returns the current state when its timeout passes');
SELECT ok(clock_timestamp() - :'wait_start'::timestamptz >= '300 ms',
          'dsmapper_wait waited for its timeout');
SELECT ok(clock_timestamp() - :'wait_start'::timestamptz < '10 s',
          'dsmapper_wait did not wait much longer than its timeout');
-- A worker holds a shard in the middle of a page, so the job cannot be
-- final yet: it is aborting until that shard stops.
SELECT is(dsmapper_abort(:job1b), 'aborting', 'dsmapper_abort of a running job returns aborting');
SELECT ok(pg_advisory_unlock(7304003), 'gate 3 is open');
SELECT is(dsmapper_wait(:job1b, '120 s'), 'aborted', 'the job ends aborted');
SELECT is(dsmapper_abort(:job1b), 'aborted', 'aborting it again returns aborted');
SELECT is_empty(format($$SELECT shard, state FROM dsmapper.shards
                          WHERE job_id = %s AND state <> 'aborted'$$, :job1b),
                'every shard is aborted');
SELECT is((SELECT count(*) FROM items WHERE n = 1),
          (SELECT processed FROM dsmapper.jobs WHERE job_id = :job1b),
          'rows mapped = processed: a page either committed with its checkpoint or not at all');
SELECT is_empty('SELECT id FROM items WHERE n > 1', 'no row mapped twice');
SELECT cmp_ok((SELECT processed FROM dsmapper.jobs WHERE job_id = :job1b), '<', 20000::bigint,
              'the aborted job did not map everything');
SELECT is(dsmapper_retry(:job1b), 'running', 'dsmapper_retry reopens the aborted shards');
SELECT is(dsmapper_wait(:job1b, '120 s'), 'succeeded', 'the retried job succeeds');
SELECT is_empty('SELECT id, n FROM items WHERE n <> 1',
                'after abort + retry every row was mapped exactly once');
SELECT is(processed::bigint, 20000::bigint, 'jobs.processed = 20000 after the retry')
  FROM dsmapper.jobs WHERE job_id = :job1b;
SELECT is_empty(format($$SELECT shard FROM dsmapper.shards
                          WHERE job_id = %s AND (state <> 'succeeded' OR processed <> expected)$$,
                       :job1b),
                'every shard succeeded with processed = expected');

------------------------------------------------------------------------------
-- 2. Pause and resume
------------------------------------------------------------------------------

UPDATE items SET n = 0;

-- Slow pages (10 ms each, page_size 100: 200 pages); the gate holds the
-- first pages until the job is paused.
SELECT lives_ok('SELECT pg_advisory_lock(7304002)', 'gate 2 is closed');
SELECT dsmapper_launch('gated', 'items', params => '{"gate": 7304002, "sleep": 0.01}',
                       shards => 4, page_size => 100) AS job2 \gset
SELECT ok(wait_until(format($$(SELECT state FROM dsmapper.jobs WHERE job_id = %s) = 'running'
                              AND gate_waiters(7304002) > 0$$, :job2)),
          'the job runs and a page waits at the gate');
SELECT is(dsmapper_pause(:job2), 'paused', 'dsmapper_pause returns paused');
SELECT is(dsmapper_pause(:job2), 'paused', 'pausing a paused job returns paused');
SELECT ok(pg_advisory_unlock(7304002), 'gate 2 is open');

-- The pages in flight commit; then the shards stop at a page boundary.
SELECT ok(wait_until(format($$NOT EXISTS (SELECT 1 FROM dsmapper.shards
                                          WHERE job_id = %s AND state IN ('running', 'starting'))$$, :job2)),
          'no shard is running or starting any more');
SELECT is(state, 'paused', 'jobs.state is paused')
  FROM dsmapper.jobs WHERE job_id = :job2;
SELECT is_empty(format($$SELECT shard, state FROM dsmapper.shards
                          WHERE job_id = %s AND state <> 'paused'$$, :job2),
                'every shard is paused (none could finish: 50 pages each)');
SELECT is(finished, NULL, 'a paused job is not finished')
  FROM dsmapper.jobs WHERE job_id = :job2;
SELECT processed AS paused_processed FROM dsmapper.jobs WHERE job_id = :job2 \gset
SELECT cmp_ok(:paused_processed::bigint, '<', 20000::bigint, 'the paused job has work left');
SELECT is(expected::bigint, 20000::bigint, 'jobs.expected is known while paused')
  FROM dsmapper.jobs WHERE job_id = :job2;
SELECT is(progress::numeric, round(100.0 * processed / 20000, 2),
          'jobs.progress = 100 * processed / expected while paused')
  FROM dsmapper.jobs WHERE job_id = :job2;
SELECT is(eta, NULL, 'a paused job has no eta')
  FROM dsmapper.jobs WHERE job_id = :job2;
SELECT is((SELECT count(*) FROM items WHERE n = 1), :paused_processed::bigint,
          'rows mapped = processed while paused');
-- A paused shard keeps its place.
SELECT is_empty(format($$SELECT shard FROM dsmapper.shards
                          WHERE job_id = %s AND processed > 0
                            AND resume_from IS NULL$$, :job2),
                'every paused shard that made progress has a checkpoint');
-- Nothing moves while paused (a short look: no page may commit).
SELECT ok(NOT wait_until(format($$(SELECT processed FROM dsmapper.jobs WHERE job_id = %s) <> %s$$,
                                 :job2, :paused_processed), '1 s'),
          'no page is mapped while the job is paused');
SELECT throws_ok(format('SELECT dsmapper_retry(%s)', :job2), '55000', NULL,
                 'a paused job cannot be retried');

SELECT is(dsmapper_resume(:job2), 'running', 'dsmapper_resume returns running');
SELECT is(dsmapper_wait(:job2, '120 s'), 'succeeded', 'the resumed job succeeds');
SELECT is_empty('SELECT id, n FROM items WHERE n <> 1',
                'after pause + resume every row was mapped exactly once');
SELECT is(processed::bigint, 20000::bigint, 'jobs.processed = 20000')
  FROM dsmapper.jobs WHERE job_id = :job2;
SELECT is_empty(format($$SELECT shard FROM dsmapper.shards
                          WHERE job_id = %s AND (state <> 'succeeded' OR processed <> expected)$$,
                       :job2),
                'every shard succeeded with processed = expected');

------------------------------------------------------------------------------
-- 3. Retry after a failure
------------------------------------------------------------------------------

CREATE TABLE flag (fail boolean NOT NULL);
INSERT INTO flag VALUES (true);
CREATE TABLE retried (
    id bigint PRIMARY KEY,
    n  integer NOT NULL DEFAULT 0
);
INSERT INTO retried (id) SELECT g FROM generate_series(1, 5000) g;
ANALYZE retried;

-- Fails with a permanent error on the page holding key 3210 while the
-- flag says so.  The update runs first, so the rollback of the page is
-- visible in the counts.
CREATE FUNCTION count_or_fail(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE retried SET n = n + 1 WHERE id = ANY (keys);
    IF 3210 = ANY (keys) AND (SELECT fail FROM flag) THEN
        RAISE EXCEPTION 'flag says fail' USING ERRCODE = 'P0001';
    END IF;
END $$;
SELECT dsmapper_register('flaky', 'count_or_fail(bigint[], jsonb)');

SELECT dsmapper_launch('flaky', 'retried', shards => 4, page_size => 100) AS job3 \gset
SELECT is(dsmapper_wait(:job3, '120 s'), 'failed', 'the job fails while the flag is set');
SELECT is(shards_failed, 1, 'one shard failed')
  FROM dsmapper.jobs WHERE job_id = :job3;
SELECT matches(error, 'flag says fail', 'jobs.error has the message')
  FROM dsmapper.jobs WHERE job_id = :job3;
SELECT is((SELECT error_sqlstate FROM dsmapper.shards WHERE job_id = :job3 AND state = 'failed'),
          'P0001', 'the failed shard records SQLSTATE P0001');
SELECT is((SELECT n FROM retried WHERE id = 3210), 0, 'the failing page was rolled back');

UPDATE flag SET fail = false;

SELECT is(dsmapper_retry(:job3), 'running', 'dsmapper_retry returns running');
SELECT is(dsmapper_wait(:job3, '120 s'), 'succeeded', 'the retried job succeeds');
SELECT is_empty('SELECT id, n FROM retried WHERE n <> 1',
                'after the retry every row was mapped exactly once');
SELECT is_empty(format($$SELECT shard FROM dsmapper.shards
                          WHERE job_id = %s
                            AND (state <> 'succeeded' OR error IS NOT NULL
                                 OR error_sqlstate IS NOT NULL)$$, :job3),
                'every shard succeeded and no error is left');
SELECT ok(error IS NULL AND shards_failed = 0 AND processed = 5000 AND finished IS NOT NULL,
          'the job row is clean: no error, no failed shard, 5000 processed, finished')
  FROM dsmapper.jobs WHERE job_id = :job3;
SELECT throws_ok(format('SELECT dsmapper_retry(%s)', :job3), '55000', NULL,
                 'a succeeded job cannot be retried');

SELECT * FROM finish();
