--
-- api_views: the shape of the public API (view columns, function
-- signatures, defaults) and the protection of the internal tables.
--
\set VERBOSITY default
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS dsmapper;
RESET client_min_messages;

-- View columns, in order.
SELECT table_name, ordinal_position, column_name, data_type
  FROM information_schema.columns
 WHERE table_schema = 'dsmapper' AND table_name = 'jobs'
 ORDER BY ordinal_position;
SELECT table_name, ordinal_position, column_name, data_type
  FROM information_schema.columns
 WHERE table_schema = 'dsmapper' AND table_name = 'shards'
 ORDER BY ordinal_position;
SELECT table_name, ordinal_position, column_name, data_type
  FROM information_schema.columns
 WHERE table_schema = 'dsmapper' AND table_name = 'mappers'
 ORDER BY ordinal_position;

-- The public functions: names, result types, and their arguments with
-- names and defaults, one per line.
SELECT p.proname, p.prorettype::regtype AS returns, p.pronargs AS nargs
  FROM pg_proc p
 WHERE p.proname LIKE 'dsmapper\_%'
 ORDER BY p.proname, nargs;
SELECT p.proname, a.position, a.argument
  FROM pg_proc p,
       regexp_split_to_table(pg_get_function_arguments(p.oid), ', ')
           WITH ORDINALITY AS a(argument, position)
 WHERE p.proname LIKE 'dsmapper\_%' AND p.pronargs > 0
 ORDER BY p.proname, p.pronargs, a.position;

-- They live in the extension's schema (public here), belong to the
-- extension, run as the caller, and anyone may call them.
SELECT p.proname, p.pronamespace::regnamespace AS schema,
       p.prosecdef AS security_definer, p.provolatile AS volatility,
       p.proisstrict AS strict,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute,
       EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                  AND d.refclassid = 'pg_extension'::regclass
                  AND d.deptype = 'e') AS in_extension
  FROM pg_proc p
 WHERE p.proname LIKE 'dsmapper\_%'
 ORDER BY p.proname;

-- Helper functions in schema dsmapper pin their search_path.
SELECT p.proname, p.prosecdef AS security_definer, p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'dsmapper'::regnamespace
 ORDER BY p.proname;

-- Relations in schema dsmapper and what PUBLIC may do with them.
SELECT c.relname, c.relkind,
       has_table_privilege('public', c.oid, 'SELECT') AS public_select,
       has_table_privilege('public', c.oid, 'INSERT') AS public_insert,
       has_table_privilege('public', c.oid, 'UPDATE') AS public_update,
       has_table_privilege('public', c.oid, 'DELETE') AS public_delete,
       has_table_privilege('public', c.oid, 'TRUNCATE') AS public_truncate
  FROM pg_class c
 WHERE c.relnamespace = 'dsmapper'::regnamespace AND c.relkind IN ('r', 'v')
 ORDER BY c.relname;
SELECT has_schema_privilege('public', 'dsmapper', 'USAGE') AS public_usage,
       has_schema_privilege('public', 'dsmapper', 'CREATE') AS public_create;

-- Something to look at and to try to change.
CREATE TABLE vt (id bigint PRIMARY KEY);
INSERT INTO vt SELECT generate_series(1, 3);
CREATE FUNCTION views_map(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('views-noop', 'views_map(bigint[], jsonb)');
SELECT dsmapper_launch('views-noop', 'vt') AS job \gset
SELECT dsmapper_wait(:job, '60 s');

-- An ordinary role cannot change the internal tables directly.
CREATE ROLE regress_dsm_plain;
SET ROLE regress_dsm_plain;
SELECT count(*) FROM dsmapper.job;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) FROM dsmapper.shard;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) FROM dsmapper.queue;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) FROM dsmapper.mapper;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO dsmapper.mapper (mapper, fn, owner)
VALUES ('views-evil', 'views_map(bigint[], jsonb)'::regprocedure::oid, 10);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.mapper SET fn = 'views_map(bigint[], jsonb)'::regprocedure::oid;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.mapper;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
TRUNCATE dsmapper.mapper;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO dsmapper.job (mapper, relation, relation_name, key_columns, mode,
                          params, shards_wanted, page_size, pages_per_task,
                          task_duration, track_progress, max_attempts, owner,
                          search_path)
VALUES ('views-noop', 'vt'::regclass, 'vt', '{id}', 'keys', '{}', 1, 1, 0,
        '1 s', true, 1, 10, 'public');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.job SET state = 'running';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.job;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
TRUNCATE dsmapper.job;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO dsmapper.shard (job_id, shard) VALUES (:job, 99);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.shard SET state = 'failed';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.shard;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
TRUNCATE dsmapper.shard;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO dsmapper.queue (job_id, shard) VALUES (:job, 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.queue SET ready_at = now();
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.queue;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
TRUNCATE dsmapper.queue;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO dsmapper.schedule DEFAULT VALUES;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.schedule SET mapper = 'views-noop';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.schedule;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
TRUNCATE dsmapper.schedule;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- ... nor through the views ...
INSERT INTO dsmapper.mappers (mapper)
VALUES ('views-evil');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.mappers SET mapper = 'views-evil';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.mappers;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE dsmapper.jobs SET state = 'running';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.jobs;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.shards;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DELETE FROM dsmapper.schedules;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- ... nor add objects to schema dsmapper.
CREATE TABLE dsmapper.evil (id int);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CREATE FUNCTION dsmapper.evil() RETURNS int LANGUAGE sql AS 'SELECT 1';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The views are readable: mappers in full, jobs and shards filtered to the
-- role's own jobs (it has none).
SELECT mapper, function FROM dsmapper.mappers WHERE mapper LIKE 'views-%';
SELECT count(*) AS jobs FROM dsmapper.jobs;
SELECT count(*) AS shards FROM dsmapper.shards;
RESET ROLE;

-- Nothing changed.
SELECT mapper, function FROM dsmapper.mappers WHERE mapper LIKE 'views-%';
SELECT state, shards, processed FROM dsmapper.jobs WHERE job_id = :job;
SELECT shard, state, processed FROM dsmapper.shards WHERE job_id = :job;

-- Clean up.
DROP ROLE regress_dsm_plain;
SELECT dsmapper_unregister('views-noop');
DROP FUNCTION views_map(bigint[], jsonb);
DROP TABLE vt;
