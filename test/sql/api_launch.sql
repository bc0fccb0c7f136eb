--
-- api_launch: dsmapper_launch() validates every argument before it stores
-- anything; then successful launches and what the jobs and shards views
-- show once they are done.  No job id is printed: ids depend on the files
-- that ran before this one.
--
\set VERBOSITY default
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS dsmapper;
RESET client_min_messages;

CREATE TABLE lt (id bigint PRIMARY KEY, v integer NOT NULL DEFAULT 0, note text);
INSERT INTO lt SELECT g, 0, 'row ' || g FROM generate_series(1, 100) g;
ANALYZE lt;

-- What the mappers saw: one row per call.
CREATE TABLE lt_calls (
    job     bigint,
    shard   integer,
    nkeys   integer,
    first   text,
    last    text,
    sorted  boolean,
    params  jsonb
);

CREATE FUNCTION launch_map(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lt SET v = v + coalesce((params->>'inc')::int, 1) WHERE id = ANY (keys);
    INSERT INTO lt_calls
    VALUES (dsmapper_current_job(), dsmapper_current_shard(), cardinality(keys),
            keys[1], keys[cardinality(keys)],
            keys = ARRAY(SELECT k FROM unnest(keys) k ORDER BY k), params);
END $$;
SELECT dsmapper_register('launch-ids', 'launch_map(bigint[], jsonb)');

CREATE FUNCTION launch_map_text(keys text[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('launch-text', 'launch_map_text(text[], jsonb)');

CREATE FUNCTION launch_map_dropped(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('launch-dropped', 'launch_map_dropped(bigint[], jsonb)');
DROP FUNCTION launch_map_dropped(bigint[], jsonb);

-- Other relations to launch on.
CREATE TABLE lt_nopk (id bigint, v integer);
CREATE VIEW lt_view AS SELECT * FROM lt;
CREATE MATERIALIZED VIEW lt_matview AS SELECT * FROM lt;
CREATE SEQUENCE lt_seq;
CREATE TABLE lt_num (id numeric PRIMARY KEY);
CREATE TABLE lt_comp (a integer, b integer, note text, PRIMARY KEY (a, b));
INSERT INTO lt_comp SELECT a, b, a || '/' || b
  FROM generate_series(1, 6) a, generate_series(1, 5) b;
CREATE TABLE lt_empty (id bigint PRIMARY KEY);

-- Rows mode on the composite key table, and a rows-mode mapper of another
-- table's row type.
CREATE FUNCTION launch_map_rows(rows lt_comp[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lt_calls
    VALUES (dsmapper_current_job(), dsmapper_current_shard(), cardinality(rows),
            (rows[1].a, rows[1].b)::text,
            (rows[cardinality(rows)].a, rows[cardinality(rows)].b)::text,
            ARRAY(SELECT (r.a, r.b)::text FROM unnest(rows) r)
              = ARRAY(SELECT (r.a, r.b)::text FROM unnest(rows) r ORDER BY r.a, r.b),
            params);
END $$;
SELECT dsmapper_register('launch-rows', 'launch_map_rows(lt_comp[], jsonb)');

-- Nothing below may store a job or even draw a job id.
SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('dsmapper.job', 'job_id')), 0)
       AS seq_before \gset
SELECT count(*) AS jobs_before FROM dsmapper.jobs \gset

-- Unknown mapper.
SELECT dsmapper_launch('launch-no-such-mapper', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- A mapper whose function was dropped.
SELECT dsmapper_launch('launch-dropped', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- NULL for every argument that has no NULL meaning.
SELECT dsmapper_launch(NULL, 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', params => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', shards => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', page_size => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', pages_per_task => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', track_progress => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', max_attempts => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Out of range numbers.
SELECT dsmapper_launch('launch-ids', 'lt', shards => 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', shards => -1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', shards => 1025);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', page_size => 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', page_size => -5);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', page_size => 1000001);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', pages_per_task => -1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', max_attempts => 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', max_attempts => 1001);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- task_duration must be positive and at most a day, without months.
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '0');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '-1 s');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '1 month');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '1 month -29 days');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '24 hours 1 second');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '2 days');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Past one day is too long, however it is written.
SELECT dsmapper_launch('launch-ids', 'lt', task_duration => '1 day 1 second');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Relations that cannot be mapped.
SELECT dsmapper_launch('launch-ids', 'lt_nopk');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt_view');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt_matview');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt_seq');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt_pkey');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt_no_such_table');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CREATE TEMPORARY TABLE lt_temp (id bigint PRIMARY KEY);
SELECT dsmapper_launch('launch-ids', 'lt_temp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TABLE lt_temp;
-- A table with inheritance children: its key is unique per table only.
CREATE TABLE lt_parent (id bigint PRIMARY KEY);
CREATE TABLE lt_child () INHERITS (lt_parent);
SELECT dsmapper_launch('launch-ids', 'lt_parent');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TABLE lt_child, lt_parent;

-- Mappers that do not fit the table.
SELECT dsmapper_launch('launch-ids', 'lt_comp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-text', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt_num');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- An implicit cast that can merge keys (bigint to double precision) is not
-- a way into a mapper.
CREATE FUNCTION launch_map_float(keys float8[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('launch-float', 'launch_map_float(float8[], jsonb)');
SELECT dsmapper_launch('launch-float', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-rows', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Filters.
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'v >');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'no_such_column = 1');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'v + 1');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'note');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'count(*) > 0');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'true; DROP TABLE lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'true) UNION SELECT 1 --');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'true) UNION (SELECT true');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'true /* open comment');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'true AS x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => '');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_launch('launch-ids', 'lt', filter => E'  \n\t ');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Permissions: SELECT on the table and EXECUTE on the function.
CREATE ROLE regress_dsm_launcher;
CREATE FUNCTION launch_map_private(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('launch-private', 'launch_map_private(bigint[], jsonb)');
REVOKE EXECUTE ON FUNCTION launch_map_private(bigint[], jsonb) FROM PUBLIC;
SET ROLE regress_dsm_launcher;
SELECT dsmapper_launch('launch-ids', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
GRANT SELECT ON lt TO regress_dsm_launcher;
SET ROLE regress_dsm_launcher;
SELECT dsmapper_launch('launch-private', 'lt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;

-- Nothing was stored, no job id was drawn, nothing was queued.
SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('dsmapper.job', 'job_id')), 0)
       = :seq_before AS no_id_drawn;
SELECT count(*) = :jobs_before AS no_job_stored FROM dsmapper.jobs;
SELECT count(*) AS shards_of_bad_launches
  FROM dsmapper.shards s JOIN dsmapper.jobs j USING (job_id)
 WHERE j.mapper LIKE 'launch-%';

-- The extreme accepted values, and filters that merely look odd.  Each
-- launch is rolled back, so no job is left behind.
BEGIN;
-- with SELECT on the table and EXECUTE on the function
SET LOCAL ROLE regress_dsm_launcher;
SELECT dsmapper_launch('launch-ids', 'lt') > 0 AS accepted;
RESET ROLE;
SELECT dsmapper_launch('launch-ids', 'lt', shards => 1, page_size => 1,
                       max_attempts => 1, task_duration => '1 microsecond',
                       pages_per_task => 0) > 0 AS accepted;
SELECT dsmapper_launch('launch-ids', 'lt', shards => 1024, page_size => 1000000,
                       max_attempts => 1000, task_duration => '24 hours',
                       pages_per_task => 2147483647) > 0 AS accepted;
-- a trailing comment cannot swallow the rest of the query
SELECT dsmapper_launch('launch-ids', 'lt', filter => '1=1 --') > 0 AS accepted;
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'id IN (SELECT 1)') > 0 AS accepted;
-- params can be any jsonb
SELECT dsmapper_launch('launch-ids', 'lt', params => '[1, 2]') > 0 AS accepted;
SELECT dsmapper_launch('launch-ids', 'lt', params => 'null') > 0 AS accepted;
-- Rows mode takes a composite key.
SELECT dsmapper_launch('launch-rows', 'lt_comp') > 0 AS accepted;
-- A launched job starts in state "starting", with no shards yet.
SELECT state, shards, shards_done, processed, expected, progress, error
  FROM dsmapper.jobs WHERE mapper = 'launch-rows';
ROLLBACK;

-- This filter would close the parenthesis that the queries put around it
-- and OR itself out of the shard's key range: refused.
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'v > 0) OR (true');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- A successful launch with every argument named.
BEGIN;
SELECT dsmapper_launch(mapper => 'launch-ids', relation => 'lt',
                       params => '{"inc": 5}', shards => 4, page_size => 10,
                       filter => 'id % 2 = 0', pages_per_task => 2,
                       task_duration => '30 seconds', track_progress => true,
                       max_attempts => 3) AS job \gset
SELECT mapper, relation, state, params, shards, processed, expected, progress,
       owner = current_user::regrole AS owned_by_me, finished, error
  FROM dsmapper.jobs WHERE job_id = :job;
COMMIT;
SELECT dsmapper_wait(:job, '60 s');
SELECT mapper, relation, state, params, shards, shards_done, shards_failed,
       processed, expected, progress, error,
       finished IS NOT NULL AS finished, rate IS NOT NULL AS has_rate, eta
  FROM dsmapper.jobs WHERE job_id = :job;
-- (the ranges depend on the splitting algorithm; only their shape is shown)
CREATE VIEW lt_shards AS
SELECT s.job_id, s.shard, s.state, s.processed, s.expected, s.attempts, s.error,
       s.error_sqlstate, s.next_attempt,
       (s.shard = 0) = (s.range_start IS NULL) AS start_ok,
       (s.shard = max(s.shard) OVER w) = (s.range_end IS NULL) AS end_ok,
       s.range_start IS NOT DISTINCT FROM lag(s.range_end) OVER (w ORDER BY s.shard)
           AS contiguous,
       s.resume_from IS NOT DISTINCT FROM
           (SELECT c.last FROM lt_calls c
             WHERE c.job = s.job_id AND c.shard = s.shard
             ORDER BY c.last::bigint DESC LIMIT 1) AS resume_from_ok
  FROM dsmapper.shards s
WINDOW w AS (PARTITION BY s.job_id);
SELECT shard, state, processed, expected, attempts, error, error_sqlstate,
       next_attempt, start_ok, end_ok, contiguous, resume_from_ok
  FROM lt_shards WHERE job_id = :job ORDER BY shard;
SELECT sum(processed) AS processed, sum(expected) AS expected
  FROM dsmapper.shards WHERE job_id = :job;
-- Every even row was mapped once, no odd row was.
SELECT id % 2 AS odd, v, count(*) FROM lt GROUP BY 1, 2 ORDER BY 1, 2;
-- Pages: at most page_size keys, sorted, the right job and shard ids.
SELECT count(*) AS calls, sum(nkeys) AS keys, max(nkeys) AS max_keys,
       bool_and(sorted) AS sorted, count(DISTINCT shard) AS shards,
       min(shard) AS min_shard, max(shard) AS max_shard,
       bool_and(params = '{"inc": 5}') AS params_passed
  FROM lt_calls WHERE job = :job;
-- Every page lies inside its shard's range (bounds compared loosely:
-- that no key is mapped twice is checked above).
SELECT count(*) AS pages_outside_their_shard
  FROM lt_calls c JOIN dsmapper.shards s ON s.job_id = c.job AND s.shard = c.shard
 WHERE c.job = :job
   AND ((s.range_start IS NOT NULL AND c.first::bigint < s.range_start::bigint)
     OR (s.range_end IS NOT NULL AND c.last::bigint > s.range_end::bigint));
-- Shards do not overlap: each shard's keys come after the previous shard's.
SELECT count(*) AS overlapping_shards
  FROM (SELECT shard, min(first::bigint) AS lo, max(last::bigint) AS hi,
               lag(max(last::bigint)) OVER (ORDER BY shard) AS prev_hi
          FROM lt_calls WHERE job = :job GROUP BY shard) x
 WHERE lo <= prev_hi;

-- Defaults: one shard for a table smaller than a page, params '{}'.
TRUNCATE lt_calls;
UPDATE lt SET v = 0;
SELECT dsmapper_launch('launch-ids', 'lt') AS job \gset
SELECT dsmapper_wait(:job, '60 s');
SELECT state, params, shards, shards_done, processed, expected, progress, error
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed, expected, attempts, start_ok, end_ok, resume_from_ok
  FROM lt_shards WHERE job_id = :job ORDER BY shard;
SELECT v, count(*) FROM lt GROUP BY v ORDER BY v;

-- A filter with a trailing comment runs fine.
TRUNCATE lt_calls;
UPDATE lt SET v = 0;
SELECT dsmapper_launch('launch-ids', 'lt', filter => 'id <= 10 -- the first ten',
                       page_size => 3) AS job \gset
SELECT dsmapper_wait(:job, '60 s');
SELECT state, processed, expected, progress, error
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT count(*) FILTER (WHERE v = 1) AS mapped, count(*) FILTER (WHERE v = 0) AS untouched
  FROM lt;
SELECT sum(nkeys) AS keys, max(nkeys) AS max_keys FROM lt_calls WHERE job = :job;

-- Without progress tracking, expected and progress stay NULL until the end.
SELECT dsmapper_launch('launch-ids', 'lt', track_progress => false) AS job \gset
SELECT dsmapper_wait(:job, '60 s');
SELECT state, processed, expected, progress
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, processed, expected FROM dsmapper.shards WHERE job_id = :job;

-- Rows mode on a composite primary key.
TRUNCATE lt_calls;
SELECT dsmapper_launch('launch-rows', 'lt_comp', page_size => 4, shards => 3,
                       params => '{"mode": "rows"}') AS job \gset
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, processed, expected, progress, error
  FROM dsmapper.jobs WHERE job_id = :job;
-- composite keys are shown as (a,b)
SELECT shard, state, processed, expected,
       range_start ~ '^\(\d+,\d+\)$' AS start_shape,
       range_end ~ '^\(\d+,\d+\)$' AS end_shape,
       resume_from = (SELECT c.last FROM lt_calls c
                       WHERE c.job = s.job_id AND c.shard = s.shard
                       ORDER BY translate(c.last, '()', '{}')::int[] DESC LIMIT 1) AS resume_from_ok
  FROM dsmapper.shards s WHERE job_id = :job ORDER BY shard;
SELECT count(*) > 0 AS called, sum(nkeys) AS rows, max(nkeys) AS max_rows,
       bool_and(sorted) AS sorted
  FROM lt_calls WHERE job = :job;

-- An empty table: one shard, succeeded at once.
SELECT dsmapper_launch('launch-ids', 'lt_empty') AS job \gset
SELECT dsmapper_wait(:job, '60 s');
SELECT state, shards, shards_done, processed, expected, progress, error
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, range_start, range_end, resume_from, processed, expected
  FROM dsmapper.shards WHERE job_id = :job ORDER BY shard;

-- Clean up.  The finished jobs stay in dsmapper.jobs.
SELECT dsmapper_unregister(mapper) FROM dsmapper.mappers
 WHERE mapper LIKE 'launch-%' ORDER BY mapper;
DROP VIEW lt_view, lt_shards;
DROP MATERIALIZED VIEW lt_matview;
DROP FUNCTION launch_map, launch_map_text, launch_map_private, launch_map_rows, launch_map_float;
DROP TABLE lt, lt_calls, lt_nopk, lt_num, lt_comp, lt_empty;
DROP SEQUENCE lt_seq;
DROP ROLE regress_dsm_launcher;
