-- 05_current.sql: dsmapper_current_job() and dsmapper_current_shard().
--
-- NULL outside a mapper call (at top level, and in a mapper function called
-- directly); inside a mapper call run by dsmapper they name the job and the
-- shard whose page is being mapped.  The mapper records them for every key
-- it gets; each key must lie in the range of the shard recorded with it.
--
-- Autocommit throughout: the launches must commit for the workers.

\set ON_ERROR_STOP 1
\pset format unaligned
\pset tuples_only true
\pset pager off

SELECT plan(24);

SELECT is(dsmapper_current_job(), NULL, 'dsmapper_current_job() is NULL at top level');
SELECT is(dsmapper_current_shard(), NULL, 'dsmapper_current_shard() is NULL at top level');

CREATE TABLE items (id bigint PRIMARY KEY);
INSERT INTO items SELECT g FROM generate_series(1, 12000) g;
ANALYZE items;

CREATE TABLE seen (
    id    bigint,
    job   bigint,
    shard integer
);

CREATE FUNCTION record_current(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen
    SELECT k, dsmapper_current_job(), dsmapper_current_shard() FROM unnest(keys) k;
END $$;
SELECT dsmapper_register('current', 'record_current(bigint[], jsonb)');

-- Called directly, the mapper is not inside a dsmapper page.
SELECT record_current(ARRAY[-1, -2]::bigint[], '{}');
SELECT is((SELECT count(*) FROM seen WHERE id < 0 AND job IS NULL AND shard IS NULL), 2::bigint,
          'called directly, the mapper sees NULL job and shard');
DELETE FROM seen;

-- Two jobs over the same table, so the job id really varies.
SELECT dsmapper_launch('current', 'items', shards => 4, page_size => 500) AS job1 \gset
SELECT is(dsmapper_wait(:job1, '120 s'), 'succeeded', 'job 1 succeeds');
SELECT dsmapper_launch('current', 'items', shards => 3, page_size => 700) AS job2 \gset
SELECT is(dsmapper_wait(:job2, '120 s'), 'succeeded', 'job 2 succeeds');
SELECT isnt(:job1::bigint, :job2::bigint, 'the two jobs have different ids');

SELECT is(dsmapper_current_job(), NULL, 'dsmapper_current_job() is still NULL at top level');
SELECT is(dsmapper_current_shard(), NULL, 'dsmapper_current_shard() is still NULL at top level');

SELECT is_empty('SELECT * FROM seen WHERE job IS NULL OR shard IS NULL',
                'inside the mapper both functions are set');
SELECT is((SELECT count(*) FROM seen WHERE job = :job1), 12000::bigint,
          'job 1 recorded its id for all 12000 keys');
SELECT is((SELECT count(*) FROM seen WHERE job = :job2), 12000::bigint,
          'job 2 recorded its id for all 12000 keys');
SELECT is_empty(format('SELECT * FROM seen WHERE job NOT IN (%s, %s)', :job1, :job2),
                'no other job id was recorded');
SELECT is((SELECT count(DISTINCT (job, id)) FROM seen), 24000::bigint,
          'each key was recorded once per job');

-- Each recorded shard exists and its range holds the key.
SELECT is_empty($$
    SELECT s.job, s.shard FROM seen s
     WHERE NOT EXISTS (SELECT 1 FROM dsmapper.shards x
                        WHERE x.job_id = s.job AND x.shard = s.shard)$$,
    'every recorded shard exists in dsmapper.shards');
SELECT is_empty($$
    SELECT s.* FROM seen s
      JOIN dsmapper.shards x ON x.job_id = s.job AND x.shard = s.shard
     WHERE (x.range_start IS NOT NULL AND s.id < x.range_start::bigint)
        OR (x.range_end IS NOT NULL AND s.id >= x.range_end::bigint)$$,
    'every recorded key lies in the range of its recorded shard');
SELECT is((SELECT count(DISTINCT shard) FROM seen WHERE job = :job1),
          (SELECT shards::bigint FROM dsmapper.jobs WHERE job_id = :job1),
          'job 1: every shard recorded its index');
SELECT is((SELECT count(DISTINCT shard) FROM seen WHERE job = :job2),
          (SELECT shards::bigint FROM dsmapper.jobs WHERE job_id = :job2),
          'job 2: every shard recorded its index');
SELECT cmp_ok((SELECT count(DISTINCT shard) FROM seen WHERE job = :job1), '>', 1::bigint,
              'job 1 has several shards, so the shard index really varies');
SELECT is_empty($$
    SELECT s.job, s.shard, count(*), x.processed
      FROM seen s JOIN dsmapper.shards x ON x.job_id = s.job AND x.shard = s.shard
     GROUP BY s.job, s.shard, x.processed
    HAVING count(*) <> x.processed$$,
    'keys recorded per shard = that shard''s processed count');

-- dsmapper_run() maps pages in this very session (racing the workers for
-- them): afterwards the session is back at top level and sees NULL.
SELECT dsmapper_launch('current', 'items', shards => 1, page_size => 1000) AS job3 \gset
SELECT cmp_ok(dsmapper_run('30 s'), '>=', 0::bigint,
              'dsmapper_run processes what is queued in this session');
SELECT is(dsmapper_current_job(), NULL, 'dsmapper_current_job() is NULL after dsmapper_run()');
SELECT is(dsmapper_current_shard(), NULL, 'dsmapper_current_shard() is NULL after dsmapper_run()');
SELECT is(dsmapper_wait(:job3, '120 s'), 'succeeded', 'job 3 succeeds');
SELECT is((SELECT count(*) FROM seen WHERE job = :job3 AND shard = 0), 12000::bigint,
          'a single-shard job records its id and shard 0 for every key');

SELECT * FROM finish();
