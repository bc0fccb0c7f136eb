-- 02_lifecycle.sql: a job from register to success.
--
-- A counter mapper adds 1 to every row it is given and logs each call
-- (the page).  A job over 20,000 rows with shards => 4, page_size => 500
-- must succeed with exact counts (a small table is read whole), balanced
-- bookkeeping, contiguous non-overlapping shard ranges and every row mapped
-- exactly once, in ascending pages of at most page_size keys.
--
-- Runs in autocommit mode: the launch must commit for the background
-- workers to see it.  (NOTIFY dsmapper cannot be observed from pgTAP.)

\set ON_ERROR_STOP 1
\pset format unaligned
\pset tuples_only true
\pset pager off

SELECT plan(48);

CREATE TABLE items (
    id bigint PRIMARY KEY,
    n  integer NOT NULL DEFAULT 0
);
INSERT INTO items (id) SELECT g FROM generate_series(1, 20000) g;
ANALYZE items;

-- One row per mapper call.
CREATE TABLE pages (
    job       bigint,
    shard     integer,
    nkeys     integer,
    first_key bigint,
    last_key  bigint,
    sorted    boolean,
    params    jsonb
);

CREATE FUNCTION count_items(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE items SET n = n + 1 WHERE id = ANY (keys);
    INSERT INTO pages
    SELECT dsmapper_current_job(), dsmapper_current_shard(),
           cardinality(keys), keys[1], keys[cardinality(keys)],
           keys = ARRAY(SELECT k FROM unnest(keys) k ORDER BY k),
           params;
END $$;

-- Registration ------------------------------------------------------------

SELECT lives_ok($$SELECT dsmapper_register('counter', 'count_items(bigint[], jsonb)')$$,
                'dsmapper_register accepts a (bigint[], jsonb) function');
SELECT is((SELECT array_agg(ROW(mapper, function, owner::text)::text) FROM dsmapper.mappers),
          ARRAY[ROW('counter', 'count_items(bigint[],jsonb)'::regprocedure, current_user)::text],
          'dsmapper.mappers shows the mapper, its function and its owner');
SELECT ok((SELECT created <= now() FROM dsmapper.mappers WHERE mapper = 'counter'),
          'dsmapper.mappers.created is set');

-- Launch and wait ---------------------------------------------------------

-- psql variables carry the job id between statements.
SELECT dsmapper_launch('counter', 'items', params => '{"tag": "lifecycle"}',
                       shards => 4, page_size => 500) AS job \gset

SELECT ok(:job > 0, 'dsmapper_launch returns a job id');
SELECT is((SELECT ROW(mapper, relation, owner::text, params)::text
             FROM dsmapper.jobs WHERE job_id = :job),
          ROW('counter', 'items'::regclass, current_user, '{"tag": "lifecycle"}'::jsonb)::text,
          'dsmapper.jobs shows mapper, relation, owner and params as launched');
SELECT ok((SELECT state FROM dsmapper.jobs WHERE job_id = :job)
              IN ('starting', 'running', 'succeeded'),
          'a fresh job is starting, running or already succeeded');

SELECT is(dsmapper_wait(:job, '120 s'), 'succeeded', 'dsmapper_wait returns succeeded');
-- Without a timeout, on a final job (guarded so that a job stuck in a
-- non-final state fails this test instead of hanging the file).
SELECT is(CASE WHEN state IN ('succeeded', 'failed', 'aborted') THEN dsmapper_wait(:job)
               ELSE 'not final: ' || state END,
          'succeeded', 'dsmapper_wait on a final job returns at once, without a timeout')
  FROM dsmapper.jobs WHERE job_id = :job;

-- The job row -------------------------------------------------------------

SELECT is(state, 'succeeded', 'jobs.state is succeeded')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT cmp_ok(shards, '>=', 2, 'jobs.shards: 20000 rows at 500 per page are split')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT cmp_ok(shards, '<=', 4, 'jobs.shards: at most the 4 shards asked for')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(shards_done, shards, 'jobs.shards_done = jobs.shards')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(shards_failed, 0, 'jobs.shards_failed = 0')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(processed::bigint, 20000::bigint, 'jobs.processed = 20000')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(expected::bigint, 20000::bigint, 'jobs.expected = 20000 (small table: exact)')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(progress::numeric, 100::numeric, 'jobs.progress = 100')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT isnt(finished, NULL, 'jobs.finished is set')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT ok(created <= finished AND finished <= now(), 'created <= finished <= now()')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT ok(updated >= created, 'jobs.updated >= jobs.created')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(eta, NULL, 'jobs.eta is NULL once the job is final')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT cmp_ok(rate::numeric, '>', 0::numeric, 'jobs.rate > 0')
  FROM dsmapper.jobs WHERE job_id = :job;
SELECT is(error, NULL, 'jobs.error is NULL')
  FROM dsmapper.jobs WHERE job_id = :job;

-- The rate is a final figure: it does not decay after the job finished.
SELECT rate AS rate_before FROM dsmapper.jobs WHERE job_id = :job \gset
SELECT pg_sleep(0.3);
SELECT is(rate::numeric, :rate_before::numeric, 'jobs.rate stays put after the job finished')
  FROM dsmapper.jobs WHERE job_id = :job;

-- The shards --------------------------------------------------------------

SELECT is((SELECT array_agg(shard ORDER BY shard) FROM dsmapper.shards WHERE job_id = :job),
          (SELECT array_agg(g) FROM dsmapper.jobs j,
                  generate_series(0, j.shards - 1) g WHERE j.job_id = :job),
          'shards are numbered 0 .. shards-1');
SELECT is_empty(format($$SELECT shard, state FROM dsmapper.shards
                          WHERE job_id = %s AND state <> 'succeeded'$$, :job),
                'every shard succeeded');
SELECT is_empty(format($$SELECT shard, attempts FROM dsmapper.shards
                          WHERE job_id = %s AND attempts <> 0$$, :job),
                'every shard has attempts = 0');
SELECT is_empty(format($$SELECT shard, processed, expected FROM dsmapper.shards
                          WHERE job_id = %s AND processed IS DISTINCT FROM expected$$, :job),
                'every shard has processed = expected');
SELECT is_empty(format($$SELECT shard FROM dsmapper.shards
                          WHERE job_id = %s AND error IS NOT NULL$$, :job),
                'no shard has an error');
SELECT is((SELECT sum(processed)::bigint FROM dsmapper.shards WHERE job_id = :job),
          20000::bigint, 'sum of shard processed = 20000');

-- Ranges: contiguous, non-overlapping, covering every possible key.
SELECT is(range_start, NULL, 'the first shard starts unbounded')
  FROM dsmapper.shards WHERE job_id = :job AND shard = 0;
SELECT is(range_end, NULL, 'the last shard ends unbounded')
  FROM dsmapper.shards s WHERE job_id = :job
   AND shard = (SELECT max(shard) FROM dsmapper.shards WHERE job_id = :job);
SELECT is_empty(format($$
    SELECT a.shard, a.range_end, b.range_start
      FROM dsmapper.shards a
      JOIN dsmapper.shards b ON b.job_id = a.job_id AND b.shard = a.shard + 1
     WHERE a.job_id = %s
       AND a.range_end IS DISTINCT FROM b.range_start$$, :job),
    'range_end of shard i = range_start of shard i+1');
SELECT is_empty(format($$
    SELECT shard, range_start, range_end FROM dsmapper.shards
     WHERE job_id = %s
       AND ((shard > 0 AND range_start IS NULL)
            OR (shard < (SELECT max(shard) FROM dsmapper.shards WHERE job_id = %s)
                AND range_end IS NULL))$$, :job, :job),
    'only the outer bounds are unbounded');
SELECT is_empty(format($$
    SELECT shard, range_start, range_end FROM dsmapper.shards
     WHERE job_id = %s AND range_start::bigint >= range_end::bigint$$, :job),
    'every bounded range is non-empty and ascending (start < end)');
-- Each shard processed exactly the rows of its range [start, end).
SELECT is_empty(format($$
    SELECT s.shard, s.processed, count(i.id)
      FROM dsmapper.shards s
      LEFT JOIN items i
        ON (s.range_start IS NULL OR i.id >= s.range_start::bigint)
       AND (s.range_end IS NULL OR i.id < s.range_end::bigint)
     WHERE s.job_id = %s
     GROUP BY s.shard, s.processed
    HAVING s.processed <> count(i.id)$$, :job),
    'every shard processed exactly the rows of its range');
-- A succeeded shard's checkpoint is its last key.
SELECT is_empty(format($$
    SELECT s.shard, s.resume_from
      FROM dsmapper.shards s
     WHERE s.job_id = %s
       AND s.resume_from IS DISTINCT FROM
           (SELECT max(id)::text FROM items i
             WHERE (s.range_start IS NULL OR i.id >= s.range_start::bigint)
               AND (s.range_end IS NULL OR i.id < s.range_end::bigint))$$, :job),
    'every succeeded shard''s resume_from is the last key of its range');

-- The rows and the pages ---------------------------------------------------

SELECT is((SELECT count(*) FROM items WHERE n = 1), 20000::bigint,
          'every row was mapped');
SELECT is_empty('SELECT id, n FROM items WHERE n <> 1', 'no row was mapped twice or skipped');
SELECT is((SELECT sum(nkeys)::bigint FROM pages), 20000::bigint,
          'the pages hold 20000 keys in all');
SELECT is_empty('SELECT * FROM pages WHERE nkeys > 500 OR nkeys < 1',
                'every page holds 1 .. page_size keys');
SELECT is_empty('SELECT * FROM pages WHERE NOT sorted',
                'keys arrive in ascending order within a page');
SELECT is_empty($$SELECT * FROM pages WHERE params IS DISTINCT FROM '{"tag": "lifecycle"}'$$,
                'every mapper call got the job''s params');
SELECT is_empty(format('SELECT * FROM pages WHERE job IS DISTINCT FROM %s', :job),
                'every mapper call ran for this job');
-- Pages of one shard come in ascending key order and do not overlap.
SELECT is_empty($$
    SELECT * FROM (
        SELECT shard, first_key,
               lag(last_key) OVER (PARTITION BY shard ORDER BY first_key) AS prev_last
          FROM pages) p
     WHERE prev_last >= first_key$$,
    'pages of a shard do not overlap');
-- Only the last page of a shard may be short.
SELECT is_empty($$
    SELECT * FROM (
        SELECT shard, nkeys,
               row_number() OVER (PARTITION BY shard ORDER BY first_key DESC) AS from_end
          FROM pages) p
     WHERE from_end > 1 AND nkeys < 500$$,
    'only the last page of a shard is shorter than page_size');

-- The mapper can be unregistered once its jobs are done.
SELECT lives_ok($$SELECT dsmapper_unregister('counter')$$, 'dsmapper_unregister works');
SELECT is_empty('SELECT * FROM dsmapper.mappers', 'the mapper is gone from dsmapper.mappers');
SELECT is((SELECT state FROM dsmapper.jobs WHERE job_id = :job), 'succeeded',
          'the finished job keeps its state after its mapper is unregistered');

SELECT * FROM finish();
