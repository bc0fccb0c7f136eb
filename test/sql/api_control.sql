--
-- api_control: dsmapper_abort, _pause, _resume, _retry, _wait, _run and
-- _current_job/_current_shard: argument checks, state rules and errors.
--
-- Error messages name job ids.  This file sorts first in the suite and so
-- runs first in a fresh instance: its job ids start at 1.
--
\set VERBOSITY default
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS dsmapper;
RESET client_min_messages;

CREATE TABLE ct (id bigint PRIMARY KEY, v integer NOT NULL DEFAULT 0);
INSERT INTO ct SELECT g FROM generate_series(1, 20) g;
-- Keys that make the mapper fail.
CREATE TABLE ct_poison (id bigint PRIMARY KEY);

-- With params {"block": true} the mapper waits for advisory lock 727272,
-- which this session holds while it wants a job to stay "running".
CREATE FUNCTION ctl_map(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    IF (params->>'block')::boolean THEN
        PERFORM pg_advisory_xact_lock_shared(727272);
    END IF;
    SELECT min(id) INTO bad FROM ct_poison WHERE id = ANY (keys);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ctl_map refuses key %', bad;
    END IF;
    UPDATE ct SET v = v + 1 WHERE id = ANY (keys);
END $$;
SELECT dsmapper_register('ctl', 'ctl_map(bigint[], jsonb)');

-- Wait until a condition (a SQL boolean expression) holds, for at most a
-- minute.  Each check sees the latest committed data.
CREATE FUNCTION ctl_await(cond text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + interval '60 s';
    ok boolean;
BEGIN
    LOOP
        EXECUTE 'SELECT (' || cond || ')' INTO ok;
        IF ok THEN
            RETURN true;
        END IF;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'timed out waiting for %', cond;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
END $$;

-- A worker is inside the mapper, waiting for advisory lock 727272.
CREATE VIEW ctl_blocked AS
SELECT count(*) AS waiting FROM pg_locks
 WHERE locktype = 'advisory' AND NOT granted
   AND classid = 0 AND objid = 727272 AND objsubid = 1;

CREATE VIEW ctl_shards AS
SELECT job_id, shard, state, processed, expected, resume_from, attempts,
       error, error_sqlstate, error_first_key, error_last_key
  FROM dsmapper.shards;

--
-- Arguments: unknown job ids, NULLs, bad timeouts and durations.
--
SELECT dsmapper_abort(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_pause(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_retry(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(-1, '1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_abort(9223372036854775807);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(job => 9223372036854775807, timeout => '0');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

SELECT dsmapper_abort(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_pause(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_retry(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(NULL, '1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CALL dsmapper_await(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL dsmapper_await(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL dsmapper_await(0, '-1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(0, '-1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(0, '-1 microsecond');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(0, '1 day -25 hours');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

SELECT dsmapper_run(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_run('0');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_run('-1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_run('1 month');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_run(max_duration => interval '1 day' - interval '24 hours');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- days count as 24 hours
SELECT dsmapper_run(max_duration => interval '1 day' - interval '86399 s') >= 0 AS ok;

-- Outside a mapper there is no current job or shard.
SELECT dsmapper_current_job() IS NULL AS no_job,
       dsmapper_current_shard() IS NULL AS no_shard;

-- dsmapper_wait() and dsmapper_run() must see other sessions' commits.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT dsmapper_wait(0, '1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT dsmapper_wait(0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT dsmapper_run('1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT dsmapper_run();
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN ISOLATION LEVEL REPEATABLE READ;
CALL dsmapper_await(0, '1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
-- (still fine in READ COMMITTED: an unknown job is the only error)
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT dsmapper_wait(0, '1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

--
-- Job 1 (rolled back) and job 2: paused before being split.  Resuming
-- starts the split over.
--
BEGIN;
SELECT dsmapper_launch('ctl', 'ct', page_size => 5) AS job \gset
SELECT :job AS job;
SELECT dsmapper_pause(:job);
SELECT dsmapper_pause(:job);
ROLLBACK;
-- (the rolled back job is gone; job ids are not reused)
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

BEGIN;
SELECT dsmapper_launch('ctl', 'ct', page_size => 5) AS job \gset
SELECT :job AS job;
SELECT dsmapper_pause(:job);
COMMIT;
-- a paused job is not final: wait() times out and says "paused"
SELECT dsmapper_wait(:job, '200 ms');
SELECT dsmapper_wait(:job, '0');
CALL dsmapper_await(:job, '200 ms');
SELECT state, shards, processed FROM dsmapper.jobs WHERE job_id = :job;
SELECT dsmapper_pause(:job);
SELECT dsmapper_resume(:job);
-- the procedure form, outside a transaction block: commits between checks
CALL dsmapper_await(:job, '60 s');
SELECT state, shards, shards_done, processed, expected, progress
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT sum(v) AS mapped, min(v), max(v) FROM ct;

-- A finished job cannot be paused, resumed or retried; abort and wait
-- simply report its state.
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_retry(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_abort(:job);
SELECT dsmapper_wait(:job);
SELECT dsmapper_wait(:job, '0');

--
-- Job 3: running (its mapper is blocked), paused, resumed.
--
UPDATE ct SET v = 0;
SELECT pg_advisory_lock(727272);
SELECT dsmapper_launch('ctl', 'ct', page_size => 5, shards => 1,
                       params => '{"block": true}') AS job \gset
SELECT :job AS job;
SELECT ctl_await('(SELECT waiting FROM ctl_blocked) = 1');
SELECT state FROM dsmapper.jobs WHERE job_id = :job;
-- resuming or pausing a running job is allowed; retrying it is not
SELECT dsmapper_resume(:job);
SELECT dsmapper_retry(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(:job, '100 ms');
SELECT dsmapper_pause(:job);
SELECT dsmapper_pause(:job);
SELECT dsmapper_wait(:job, '100 ms');
SELECT dsmapper_retry(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The page under way completes; then the shard stops and keeps its place.
SELECT pg_advisory_unlock(727272);
SELECT ctl_await(format('NOT EXISTS (SELECT 1 FROM dsmapper.shards
                                      WHERE job_id = %s AND state <> ''paused'')',
                        :job));
SELECT state, shards, processed FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, resume_from, attempts, error
  FROM ctl_shards WHERE job_id = :job ORDER BY shard;
SELECT dsmapper_wait(:job, '200 ms');
-- (twice in one transaction, so that the job cannot finish in between)
BEGIN;
SELECT dsmapper_resume(:job);
SELECT dsmapper_resume(:job);
COMMIT;
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, processed, expected, progress
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, resume_from, attempts, error
  FROM ctl_shards WHERE job_id = :job ORDER BY shard;
-- every row exactly once
SELECT v, count(*) FROM ct GROUP BY v ORDER BY v;

--
-- Job 4: a shard fails; retry continues it from its checkpoint.
--
UPDATE ct SET v = 0;
INSERT INTO ct_poison VALUES (7);
SELECT dsmapper_launch('ctl', 'ct', page_size => 5, shards => 1) AS job \gset
SELECT :job AS job;
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, shards_failed, processed, expected, error
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, resume_from, attempts, error, error_sqlstate,
       error_first_key, error_last_key
  FROM ctl_shards WHERE job_id = :job ORDER BY shard;
SELECT v, count(*) FROM ct GROUP BY v ORDER BY v;
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_abort(:job);
DELETE FROM ct_poison;
SELECT dsmapper_retry(:job);
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, shards_failed, processed, expected, error
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, resume_from, attempts, error, error_sqlstate,
       error_first_key, error_last_key
  FROM ctl_shards WHERE job_id = :job ORDER BY shard;
SELECT v, count(*) FROM ct GROUP BY v ORDER BY v;
SELECT dsmapper_retry(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

--
-- Job 5: aborted while starting: at once.  Retry starts it over.
--
UPDATE ct SET v = 0;
BEGIN;
SELECT dsmapper_launch('ctl', 'ct') AS job \gset
SELECT :job AS job;
SELECT dsmapper_abort(:job);
SELECT dsmapper_abort(:job);
COMMIT;
SELECT dsmapper_wait(:job);
SELECT state, shards, processed, finished IS NOT NULL AS finished
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_retry(:job);
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, processed FROM dsmapper.jobs WHERE job_id = :job;
SELECT v, count(*) FROM ct GROUP BY v ORDER BY v;

--
-- Job 6: aborted while running.  The job is "aborting" until the abort
-- commits; then the page in flight is canceled and the job is aborted
-- without waiting for the page (the mapper is still blocked).
--
UPDATE ct SET v = 0;
SELECT pg_advisory_lock(727272);
SELECT dsmapper_launch('ctl', 'ct', page_size => 5, shards => 1,
                       params => '{"block": true}') AS job \gset
SELECT :job AS job;
SELECT ctl_await('(SELECT waiting FROM ctl_blocked) = 1');
BEGIN;
SELECT dsmapper_abort(:job);
SELECT dsmapper_abort(:job);
SAVEPOINT s;
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT dsmapper_retry(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
-- Resuming an aborting job must be refused like pausing it.  (This call
-- used to crash the server: errhint(NULL) in dsmapper_resume.)
SELECT dsmapper_resume(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
-- (the abort is not committed yet, so waiting makes no sense)
SELECT dsmapper_wait(:job, '100 ms');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK TO s;
SELECT state FROM dsmapper.jobs WHERE job_id = :job;
COMMIT;
-- The lock is still held: only the cancellation can end the page.
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, shards_failed, processed, error
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, resume_from, attempts, error
  FROM ctl_shards WHERE job_id = :job ORDER BY shard;
SELECT (SELECT waiting FROM ctl_blocked) AS still_waiting;
SELECT v, count(*) FROM ct GROUP BY v ORDER BY v;
SELECT pg_advisory_unlock(727272);
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_abort(:job);
SELECT dsmapper_retry(:job);
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, processed
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, resume_from, attempts, error
  FROM ctl_shards WHERE job_id = :job ORDER BY shard;
SELECT v, count(*) FROM ct GROUP BY v ORDER BY v;

--
-- Job 7: waiting for a job in the transaction that launched it is refused
-- (workers start at commit, so it would wait for nothing).
--
SELECT dsmapper_wait(dsmapper_launch('ctl', 'ct', page_size => 5), '200 ms');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- (the failed statement took the launch with it)
SELECT count(*) AS jobs_after_6 FROM dsmapper.jobs WHERE job_id > :job;

--
-- Other roles cannot see or steer these jobs.
--
CREATE ROLE regress_dsm_stranger;
SET ROLE regress_dsm_stranger;
SELECT count(*) AS jobs_visible FROM dsmapper.jobs;
SELECT count(*) AS shards_visible FROM dsmapper.shards;
SELECT dsmapper_abort(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_pause(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_resume(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_retry(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_wait(:job, '0');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
-- pg_read_all_stats may see and wait, not steer.
GRANT pg_read_all_stats TO regress_dsm_stranger;
SET ROLE regress_dsm_stranger;
SELECT count(*) > 0 AS jobs_visible FROM dsmapper.jobs;
SELECT dsmapper_wait(:job, '0');
SELECT dsmapper_abort(:job);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
DROP ROLE regress_dsm_stranger;

--
-- dsmapper_run() with nothing queued processes nothing.
--
SELECT count(*) AS open_jobs FROM dsmapper.jobs
 WHERE state NOT IN ('succeeded', 'failed', 'aborted');
SELECT dsmapper_run('100 ms');
SELECT dsmapper_run(max_duration => '1 s');

-- Clean up.  The finished jobs stay in dsmapper.jobs.
SELECT dsmapper_unregister('ctl');
DROP VIEW ctl_blocked, ctl_shards;
DROP FUNCTION ctl_await(text), ctl_map(bigint[], jsonb);
DROP TABLE ct, ct_poison;
