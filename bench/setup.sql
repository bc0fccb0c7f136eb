-- bench/setup.sql: objects the benchmark (bench/run) needs in its database.
--
-- Loaded once into a fresh database of a private cluster.  Tables are
-- built later by bench/run (their sizes are options); this file only holds
-- the mappers, the hand-written baselines and the measuring procedures.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE EXTENSION dsmapper;

-- ------------------------------------------------------------------------
-- Mappers

-- P1/P2: the backfill a user would write.
CREATE FUNCTION bench_lower(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET email_lower = lower(email) WHERE id = ANY (keys);
END $$;

-- P3, P4, P5, P7: does nothing.
CREATE FUNCTION bench_noop(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
END $$;

-- P6: records when it was called (commits with the page).
CREATE TABLE bench_calls (
    job_id  bigint NOT NULL,
    shard   integer NOT NULL,
    nkeys   integer NOT NULL,
    at      timestamptz NOT NULL
);

CREATE FUNCTION bench_stamp(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_calls (job_id, shard, nkeys, at)
    VALUES (dsmapper_current_job(), dsmapper_current_shard(),
            cardinality(keys), clock_timestamp());
END $$;

SELECT dsmapper_register('bench-lower', 'bench_lower(bigint[], jsonb)');
SELECT dsmapper_register('bench-noop', 'bench_noop(bigint[], jsonb)');
SELECT dsmapper_register('bench-stamp', 'bench_stamp(bigint[], jsonb)');

-- ------------------------------------------------------------------------
-- Hand-written baselines (P2, P3): a keyset loop over users that takes the
-- next `batch` keys in key order, works on them and commits.

-- P2: the backfill, committed every `batch` rows.
CREATE PROCEDURE bench_loop_lower(batch integer DEFAULT 1000)
LANGUAGE plpgsql AS $$
DECLARE
    last_id bigint;
    hi      bigint;
BEGIN
    SELECT min(id) - 1 INTO last_id FROM users;
    IF last_id IS NULL THEN
        RETURN;
    END IF;
    LOOP
        SELECT max(s.id) INTO hi
          FROM (SELECT id FROM users WHERE id > last_id
                 ORDER BY id LIMIT batch) s;
        EXIT WHEN hi IS NULL;
        UPDATE users SET email_lower = lower(email)
         WHERE id > last_id AND id <= hi;
        last_id := hi;
        COMMIT;
    END LOOP;
END $$;

-- P3: the same loop with a no-op body and a checkpoint row that records
-- the last key done, committed with every batch.
CREATE TABLE bench_progress (
    id       integer PRIMARY KEY,
    last_key bigint
);
INSERT INTO bench_progress VALUES (1, NULL);

CREATE PROCEDURE bench_loop_noop(batch integer DEFAULT 1000)
LANGUAGE plpgsql AS $$
DECLARE
    last_id bigint;
    hi      bigint;
BEGIN
    SELECT min(id) - 1 INTO last_id FROM users;
    IF last_id IS NULL THEN
        RETURN;
    END IF;
    UPDATE bench_progress SET last_key = NULL WHERE id = 1;
    COMMIT;
    LOOP
        SELECT max(s.id) INTO hi
          FROM (SELECT id FROM users WHERE id > last_id
                 ORDER BY id LIMIT batch) s;
        EXIT WHEN hi IS NULL;
        -- the work on keys (last_id, hi] would go here
        last_id := hi;
        UPDATE bench_progress SET last_key = last_id WHERE id = 1;
        COMMIT;
    END LOOP;
END $$;

-- ------------------------------------------------------------------------
-- Measuring procedures.  All times come from clock_timestamp() in the
-- database, so client round trips do not count (except where noted).

-- CPU time (user + system, in clock ticks) a process has used so far, from
-- /proc/PID/stat; NULL when the process is gone.  Superuser only (it reads
-- a file).  Field 14 and 15 of the line; the command name, field 2, is in
-- parentheses and "postgres" has no spaces.
CREATE FUNCTION bench_proc_ticks(pid integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    line    text;
    f       text[];
BEGIN
    BEGIN
        line := pg_read_file('/proc/' || pid || '/stat');
    EXCEPTION WHEN OTHERS THEN
        RETURN NULL;
    END;
    f := string_to_array(substr(line, strpos(line, ') ') + 2), ' ');
    -- f[1] is field 3 (state)
    RETURN f[12]::bigint + f[13]::bigint;
END $$;

-- CPU ticks of every dsmapper worker alive now, as {"pid": ticks}.
CREATE FUNCTION bench_worker_ticks() RETURNS jsonb
LANGUAGE sql AS $$
    SELECT coalesce(jsonb_object_agg(pid, bench_proc_ticks(pid)), '{}')
      FROM pg_stat_activity WHERE backend_type = 'dsmapper worker'
$$;

-- CPU ticks the dsmapper workers used since bench_worker_ticks() returned
-- `before` (workers started since then count from zero).
CREATE FUNCTION bench_worker_ticks_since(before jsonb) RETURNS bigint
LANGUAGE sql AS $$
    SELECT coalesce(sum(coalesce(bench_proc_ticks(pid), 0)
                        - coalesce((before ->> pid::text)::bigint, 0)), 0)::bigint
      FROM pg_stat_activity WHERE backend_type = 'dsmapper worker'
$$;

-- P4/P5: launch a no-op job with `nshards` shards on `rel`, commit, and
-- poll every 5 ms until the split has committed (the job leaves state
-- 'starting' in the same transaction that inserts the shard rows).
--   split_s    launch commit -> shards visible (polled)
--   started_s  launch commit -> job.started (set just before the split
--              transaction commits)
-- Then aborts the job and waits until it is final; its shard rows stay
-- for the balance measurement.
CREATE PROCEDURE bench_split(rel regclass, nshards integer,
                             OUT job bigint, OUT split_s float8,
                             OUT started_s float8, OUT nshards_made integer,
                             OUT state text)
LANGUAGE plpgsql AS $$
DECLARE
    t0      timestamptz;
    st      text;
BEGIN
    job := dsmapper_launch('bench-noop', rel, shards => nshards);
    COMMIT;
    t0 := clock_timestamp();
    LOOP
        SELECT j.state INTO st FROM dsmapper.job j WHERE j.job_id = job;
        EXIT WHEN st IS DISTINCT FROM 'starting';
        IF clock_timestamp() - t0 > interval '5 minutes' THEN
            RAISE EXCEPTION 'job % still starting after 5 minutes', job;
        END IF;
        PERFORM pg_sleep(0.005);
    END LOOP;
    split_s := extract(epoch FROM clock_timestamp() - t0);
    SELECT extract(epoch FROM j.started - t0) INTO started_s
      FROM dsmapper.job j WHERE j.job_id = job;
    SELECT count(*) INTO nshards_made FROM dsmapper.shard s
     WHERE s.job_id = job;
    state := st;
    PERFORM dsmapper_abort(job);
    COMMIT;
    state := dsmapper_wait(job, interval '5 minutes');
END $$;

-- P5: shard balance of a job, from the splitter's expected counts.
CREATE FUNCTION bench_expected_balance(jid bigint,
                                       OUT max_expected bigint,
                                       OUT mean_expected float8,
                                       OUT ratio float8)
LANGUAGE sql STABLE AS $$
    SELECT max(expected), avg(expected)::float8,
           max(expected) / nullif(avg(expected)::float8, 0)
      FROM dsmapper.shard WHERE job_id = jid
$$;

-- P5: shard balance of a job, from real row counts per range
-- (range_start <= id < range_end, NULL unbounded).  Also returns the total
-- so that the caller can check that the ranges cover the table.
CREATE FUNCTION bench_real_balance(rel regclass, jid bigint,
                                   OUT max_count bigint,
                                   OUT mean_count float8,
                                   OUT ratio float8,
                                   OUT total bigint,
                                   OUT nshards integer)
LANGUAGE plpgsql AS $$
DECLARE
    s       record;
    n       bigint;
    counts  bigint[] := '{}';
BEGIN
    FOR s IN SELECT sh.range_start, sh.range_end
               FROM dsmapper.shards sh
              WHERE sh.job_id = jid ORDER BY sh.shard
    LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE true%s%s', rel,
                       CASE WHEN s.range_start IS NOT NULL
                            THEN format(' AND id >= %L::bigint', s.range_start)
                            ELSE '' END,
                       CASE WHEN s.range_end IS NOT NULL
                            THEN format(' AND id < %L::bigint', s.range_end)
                            ELSE '' END)
           INTO n;
        counts := counts || n;
    END LOOP;
    SELECT max(c), avg(c)::float8, max(c) / nullif(avg(c)::float8, 0),
           sum(c)::bigint, count(*)::integer
      INTO max_count, mean_count, ratio, total, nshards
      FROM unnest(counts) c;
END $$;

-- P6: launch the stamping mapper on `rel` (a handful of rows: one shard,
-- one page), commit, take the time, and wait for the job.
--   first_ms  launch commit -> first mapper call
--   final_ms  last mapper call -> job.finished
--   wait_ms   launch commit -> dsmapper_wait returned
CREATE PROCEDURE bench_latency(rel regclass,
                               OUT job bigint, OUT first_ms float8,
                               OUT final_ms float8, OUT wait_ms float8,
                               OUT state text, OUT calls integer)
LANGUAGE plpgsql AS $$
DECLARE
    t0      timestamptz;
    t_first timestamptz;
    t_last  timestamptz;
    t_fin   timestamptz;
BEGIN
    job := dsmapper_launch('bench-stamp', rel);
    COMMIT;
    t0 := clock_timestamp();
    state := dsmapper_wait(job, interval '1 minute');
    wait_ms := 1000 * extract(epoch FROM clock_timestamp() - t0);
    SELECT min(c.at), max(c.at), count(*) INTO t_first, t_last, calls
      FROM bench_calls c WHERE c.job_id = job;
    SELECT j.finished INTO t_fin FROM dsmapper.job j WHERE j.job_id = job;
    first_ms := 1000 * extract(epoch FROM t_first - t0);
    final_ms := 1000 * extract(epoch FROM t_fin - t_last);
END $$;
