/* dsmapper--0.1.sql: install script */

\echo Use "CREATE EXTENSION dsmapper" to load this file. \quit

/*
 * Internal state lives in schema dsmapper.  Ordinary roles never touch the
 * tables directly: the C API switches to the extension owner for
 * bookkeeping, and the views below filter rows by role membership.
 */
CREATE SCHEMA dsmapper;
GRANT USAGE ON SCHEMA dsmapper TO PUBLIC;

-- Registered mappers: an id bound to a function, owned by its registrant.
-- Functions are kept as plain oids: pg_upgrade refuses reg* columns.
CREATE TABLE dsmapper.mapper (
    mapper      text PRIMARY KEY,
    fn          oid NOT NULL,
    owner       oid NOT NULL,
    created     timestamptz NOT NULL DEFAULT pg_catalog.now()
);

/*
 * One row per job.  The launch arguments are kept as given; key_columns,
 * key_signature and mode are resolved at launch from the table's primary
 * key and the mapper's signature, and checked again by every turn (shard
 * bounds and checkpoints only mean something in the key's order).  fn is the mapper's function
 * at launch (or at the last retry): a job never calls another function,
 * whatever the mapper id is bound to later.
 */
CREATE TABLE dsmapper.job (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mapper          text NOT NULL,
    fn              oid NOT NULL,
    relation        oid NOT NULL,
    relation_name   text NOT NULL,
    key_columns     text[] NOT NULL,
    key_signature   text NOT NULL,  -- types, collations, operators of the key
    mode            text NOT NULL CHECK (mode IN ('keys', 'rows')),
    params          jsonb NOT NULL,
    shards_wanted   integer NOT NULL,
    page_size       integer NOT NULL,
    filter          text,
    pages_per_task  integer NOT NULL,
    task_duration   interval NOT NULL,
    track_progress  boolean NOT NULL,
    max_attempts    integer NOT NULL,
    owner           oid NOT NULL,
    search_path     text NOT NULL,
    -- tuning, changed on a running job by dsmapper_tune(); NULL: off
    max_running_shards integer,
    rows_per_second double precision,
    page_delay      interval,
    target_page_time interval,
    state           text NOT NULL DEFAULT 'starting'
                    CHECK (state IN ('starting', 'running', 'paused',
                                     'aborting', 'aborted', 'succeeded',
                                     'failed')),
    error           text,
    created         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    started         timestamptz,
    updated         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished        timestamptz
);
CREATE INDEX job_state_idx ON dsmapper.job (state);

/*
 * One row per shard.  A shard covers the keys k with
 * range_start <= k < range_end (NULL bounds are unbounded); resume_from is
 * the last key whose page committed.  Keys are stored as text arrays, one
 * element per key column, written with the key type's output function.
 * in_turn is set when a turn starts and cleared when it ends; finding it
 * set at the start of a turn means the previous turn's process died inside
 * a page, which counts as a failed attempt (so a mapper that kills its
 * backend cannot loop forever).  The row is updated in the same
 * transaction as every page, hence the low fillfactor so that those
 * updates stay HOT.
 */
CREATE TABLE dsmapper.shard (
    job_id          bigint NOT NULL REFERENCES dsmapper.job ON DELETE CASCADE,
    shard           integer NOT NULL,
    state           text NOT NULL DEFAULT 'starting'
                    CHECK (state IN ('starting', 'running', 'paused',
                                     'succeeded', 'failed', 'aborted')),
    range_start     text[],
    range_end       text[],
    resume_from     text[],
    processed       bigint NOT NULL DEFAULT 0,
    expected        bigint,
    attempts        integer NOT NULL DEFAULT 0,
    error           text,
    error_sqlstate  text,
    error_first_key text,
    error_last_key  text,
    in_turn         boolean NOT NULL DEFAULT false,
    started         timestamptz,
    updated         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (job_id, shard)
) WITH (fillfactor = 50);

/*
 * The work queue: one row per piece of work that is not final and not
 * paused.  shard = -1 is the job's split task.  Workers claim a row with a
 * session-level lock on (job_id, shard) that is held for a whole turn and
 * vanishes with the process, so a crashed worker leaves nothing to clean.
 */
CREATE TABLE dsmapper.queue (
    job_id      bigint NOT NULL REFERENCES dsmapper.job ON DELETE CASCADE,
    shard       integer NOT NULL,
    ready_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_turn   timestamptz,
    attempts    integer NOT NULL DEFAULT 0,  -- of the split task (shard -1)
    PRIMARY KEY (job_id, shard)
);

REVOKE ALL ON dsmapper.mapper, dsmapper.job, dsmapper.shard, dsmapper.queue
    FROM PUBLIC;

-- Render a stored key (one text per key column) for people; a composite
-- key as a row literal, elements quoted where needed.
CREATE FUNCTION dsmapper.key_text(key text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN CASE
    WHEN key IS NULL THEN NULL
    WHEN cardinality(key) = 1 THEN key[1]
    ELSE '(' || (SELECT string_agg(
                     CASE WHEN e = '' OR e ~ '[,()"\\ ]'
                          THEN '"' || replace(replace(e, '\', '\\'), '"', '\"') || '"'
                          ELSE e END, ',' ORDER BY i)
                   FROM unnest(key) WITH ORDINALITY AS u(e, i)) || ')'
END;

-- May the current role see the jobs of role "owner"?
CREATE FUNCTION dsmapper.visible(owner oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
    OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')
    OR (EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = owner)
        AND pg_has_role(current_user, owner, 'MEMBER'));

CREATE VIEW dsmapper.jobs WITH (security_barrier) AS
SELECT j.job_id,
       j.mapper,
       j.relation::regclass AS relation,
       j.state,
       j.owner::regrole AS owner,
       j.params,
       coalesce(s.shards, 0) AS shards,
       coalesce(s.shards_done, 0) AS shards_done,
       coalesce(s.shards_failed, 0) AS shards_failed,
       coalesce(s.processed, 0) AS processed,
       s.expected,
       CASE
           WHEN j.state = 'succeeded' THEN 100::numeric
           WHEN s.expected IS NULL THEN NULL
           WHEN s.expected = 0 THEN 100::numeric
           ELSE round(least(100, 100.0 * s.processed / s.expected), 2)
       END AS progress,
       CASE
           WHEN j.started IS NULL THEN NULL
           ELSE round(coalesce(s.processed, 0) / greatest(0.001,
                extract(epoch FROM coalesce(j.finished, clock_timestamp())
                                   - j.started)),
                1)
       END AS rate,
       CASE
           WHEN j.state NOT IN ('running', 'aborting') OR j.started IS NULL
                OR s.expected IS NULL OR s.processed = 0 THEN NULL
           ELSE clock_timestamp() + (greatest(0, s.expected - s.processed)
                * ((clock_timestamp() - j.started) / s.processed))
       END AS eta,
       j.created,
       j.updated,
       j.finished,
       j.error,
       j.page_size,
       j.max_running_shards,
       j.rows_per_second,
       j.page_delay,
       j.target_page_time,
       coalesce(s.shards_running, 0) AS shards_running
  FROM dsmapper.job j
  LEFT JOIN LATERAL (
       SELECT count(*)::integer AS shards,
              count(*) FILTER (WHERE x.state = 'succeeded')::integer
                  AS shards_done,
              count(*) FILTER (WHERE x.state = 'failed')::integer
                  AS shards_failed,
              count(*) FILTER (WHERE x.in_turn)::integer AS shards_running,
              sum(x.processed)::bigint AS processed,
              CASE WHEN j.track_progress AND count(*) > 0
                        AND bool_and(x.expected IS NOT NULL)
                   THEN sum(x.expected)::bigint END AS expected
         FROM dsmapper.shard x
        WHERE x.job_id = j.job_id) s ON true
 WHERE dsmapper.visible(j.owner);

CREATE VIEW dsmapper.shards WITH (security_barrier) AS
SELECT s.job_id,
       s.shard,
       s.state,
       dsmapper.key_text(s.range_start) AS range_start,
       dsmapper.key_text(s.range_end) AS range_end,
       dsmapper.key_text(s.resume_from) AS resume_from,
       s.processed,
       s.expected,
       s.attempts,
       s.error,
       s.error_sqlstate,
       s.error_first_key,
       s.error_last_key,
       CASE WHEN q.ready_at > now() THEN q.ready_at END AS next_attempt,
       s.updated
  FROM dsmapper.shard s
  JOIN dsmapper.job j USING (job_id)
  LEFT JOIN dsmapper.queue q ON q.job_id = s.job_id AND q.shard = s.shard
 WHERE dsmapper.visible(j.owner);

CREATE VIEW dsmapper.mappers AS
SELECT m.mapper,
       m.fn::pg_catalog.regprocedure AS function,
       m.owner::regrole AS owner,
       m.created
  FROM dsmapper.mapper m;

GRANT SELECT ON dsmapper.jobs, dsmapper.shards, dsmapper.mappers TO PUBLIC;

-- The SQL API.  Arguments are checked in C, so nothing here is STRICT.

CREATE FUNCTION dsmapper_register(mapper text, fn regprocedure,
                                  replace boolean DEFAULT false)
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_register';

CREATE FUNCTION dsmapper_unregister(mapper text)
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_unregister';

CREATE FUNCTION dsmapper_launch(mapper text, relation regclass,
                                params jsonb DEFAULT '{}',
                                shards integer DEFAULT 8,
                                page_size integer DEFAULT 1000,
                                filter text DEFAULT NULL,
                                pages_per_task integer DEFAULT 0,
                                task_duration interval DEFAULT '1 minute',
                                track_progress boolean DEFAULT true,
                                max_attempts integer DEFAULT 10)
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_launch';

CREATE FUNCTION dsmapper_abort(job bigint)
RETURNS text
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_abort';

CREATE FUNCTION dsmapper_pause(job bigint)
RETURNS text
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_pause';

CREATE FUNCTION dsmapper_resume(job bigint)
RETURNS text
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_resume';

CREATE FUNCTION dsmapper_retry(job bigint)
RETURNS text
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_retry';

CREATE FUNCTION dsmapper_wait(job bigint, timeout interval DEFAULT NULL,
                              progress boolean DEFAULT false)
RETURNS text
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_wait';

-- The same wait as a procedure: CALL it outside a transaction block and it
-- holds no snapshot while it waits.
CREATE PROCEDURE dsmapper_await(job bigint, timeout interval DEFAULT NULL,
                                progress boolean DEFAULT false,
                                INOUT state text DEFAULT NULL)
LANGUAGE C
AS 'MODULE_PATHNAME', 'dsmapper_await';

CREATE FUNCTION dsmapper_current_job()
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_current_job';

CREATE FUNCTION dsmapper_current_shard()
RETURNS integer
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_current_shard';

CREATE FUNCTION dsmapper_run(max_duration interval DEFAULT '1 minute')
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_run';

CREATE FUNCTION dsmapper_tune(job bigint,
                              page_size integer DEFAULT NULL,
                              max_running_shards integer DEFAULT NULL,
                              rows_per_second double precision DEFAULT NULL,
                              page_delay interval DEFAULT NULL,
                              target_page_time interval DEFAULT NULL)
RETURNS jsonb
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_tune';

CREATE FUNCTION dsmapper_forget(job bigint)
RETURNS boolean
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_forget';

-- Recurring launches through pg_cron (src/schedule.c).
CREATE TABLE dsmapper.schedule (
    name            text PRIMARY KEY,
    schedule        text NOT NULL,
    mapper          text NOT NULL,
    relation        oid NOT NULL,
    params          jsonb NOT NULL,
    shards          integer NOT NULL,
    page_size       integer NOT NULL,
    filter          text,
    pages_per_task  integer NOT NULL,
    task_duration   interval NOT NULL,
    track_progress  boolean NOT NULL,
    max_attempts    integer NOT NULL,
    owner           oid NOT NULL,
    cron_job        bigint,
    last_job        bigint,
    last_launch     timestamptz,
    created         timestamptz NOT NULL DEFAULT pg_catalog.now()
);
REVOKE ALL ON dsmapper.schedule FROM PUBLIC;

CREATE VIEW dsmapper.schedules WITH (security_barrier) AS
SELECT s.name,
       s.schedule,
       s.mapper,
       s.relation::regclass AS relation,
       s.owner::regrole AS owner,
       s.params,
       s.cron_job,
       s.last_job,
       j.state AS last_state,
       s.last_launch,
       s.created
  FROM dsmapper.schedule s
  LEFT JOIN dsmapper.job j ON j.job_id = s.last_job
 WHERE dsmapper.visible(s.owner);
GRANT SELECT ON dsmapper.schedules TO PUBLIC;

CREATE FUNCTION dsmapper_schedule(name text, schedule text, mapper text,
                                  relation regclass,
                                  params jsonb DEFAULT '{}',
                                  shards integer DEFAULT 8,
                                  page_size integer DEFAULT 1000,
                                  filter text DEFAULT NULL,
                                  pages_per_task integer DEFAULT 0,
                                  task_duration interval DEFAULT '1 minute',
                                  track_progress boolean DEFAULT true,
                                  max_attempts integer DEFAULT 10)
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_schedule';

CREATE FUNCTION dsmapper_unschedule(name text)
RETURNS boolean
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_unschedule';

CREATE FUNCTION dsmapper_launch_scheduled(name text)
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'dsmapper_launch_scheduled';
