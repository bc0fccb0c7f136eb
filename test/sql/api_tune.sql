-- dsmapper_tune, dsmapper_forget and the scheduling functions: bad input
-- gets a clear error and changes nothing.
\set VERBOSITY default
CREATE EXTENSION IF NOT EXISTS dsmapper;
SET client_min_messages = warning;

CREATE TABLE tn (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
INSERT INTO tn (id) SELECT generate_series(1, 50);
CREATE FUNCTION tn_map(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tn SET n = n + 1 WHERE id = ANY (keys);
END $$;
SELECT dsmapper_register('tune-map', 'tn_map(bigint[], jsonb)');

-- A finished job to work with.
SELECT dsmapper_launch('tune-map', 'tn') AS job \gset
SELECT dsmapper_wait(:job, '60 s');

-- dsmapper_tune: NULL job, unknown job, values out of range.
SELECT dsmapper_tune(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(-1, page_size => 10);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, page_size => 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, page_size => 1000001);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, max_running_shards => -1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, max_running_shards => 1025);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, rows_per_second => -5);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, rows_per_second => 'NaN');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, page_delay => '-1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, page_delay => '2 hours');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_tune(:job, target_page_time => '1 month');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Nothing changed.
SELECT page_size, max_running_shards, rows_per_second, page_delay, target_page_time
  FROM dsmapper.jobs WHERE job_id = :job;

-- Good values, then zero turns limits off again.
SELECT dsmapper_tune(:job, page_size => 50, max_running_shards => 2,
                     rows_per_second => 100, page_delay => '10 ms',
                     target_page_time => '200 ms');
SELECT dsmapper_tune(:job, max_running_shards => 0, rows_per_second => 0,
                     page_delay => '0', target_page_time => '0');
SELECT dsmapper_tune(:job);

-- dsmapper_forget: NULL, unknown, then a finished job.
SELECT dsmapper_forget(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_forget(-1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_forget(:job);
SELECT count(*) FROM dsmapper.jobs WHERE job_id = :job;
SELECT count(*) FROM dsmapper.shards WHERE job_id = :job;


-- Scheduling needs pg_cron, which this instance does not have.
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule(NULL, '0 3 * * *', 'tune-map', 'tn');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', NULL, 'tune-map', 'tn');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Every NULL argument error names the argument; only filter may be NULL.
SELECT dsmapper_schedule('nightly', '0 3 * * *', NULL, 'tn');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', params => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', shards => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', page_size => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', pages_per_task => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', task_duration => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', track_progress => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', max_attempts => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('nightly', '0 3 * * *', 'tune-map', 'tn', filter => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_schedule('', '0 3 * * *', 'tune-map', 'tn');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_unschedule(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_unschedule('nightly');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch_scheduled(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch_scheduled('nightly');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) FROM dsmapper.schedules;

-- Another role may neither tune nor forget someone else's job.
SELECT dsmapper_launch('tune-map', 'tn') AS job2 \gset
SELECT dsmapper_wait(:job2, '60 s');
CREATE TEMP TABLE tune_job AS SELECT :job2::bigint AS id;
CREATE ROLE tune_stranger;
GRANT SELECT ON tune_job TO tune_stranger;
SET ROLE tune_stranger;
DO $$
BEGIN
    PERFORM dsmapper_tune((SELECT id FROM tune_job), page_size => 10);
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'tune refused: %', regexp_replace(SQLERRM, '[0-9]+', 'N');
END $$;
DO $$
BEGIN
    PERFORM dsmapper_forget((SELECT id FROM tune_job));
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'forget refused: %', regexp_replace(SQLERRM, '[0-9]+', 'N');
END $$;
RESET ROLE;
REVOKE SELECT ON tune_job FROM tune_stranger;
DROP ROLE tune_stranger;
SELECT page_size FROM dsmapper.jobs WHERE job_id = :job2;
