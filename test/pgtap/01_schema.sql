-- 01_schema.sql: the SQL surface of dsmapper as SPEC section 3 defines it:
-- schema, views and their columns, API functions with argument types,
-- argument names (named notation is part of the contract), defaults and
-- return types.
--
-- SPEC allows more functions and columns, and types that widen.  So the
-- views are checked column by column (has_column) and each function
-- signature is checked for compatibility: the SPEC's arguments come first,
-- in order, with the SPEC's names, with a type the SPEC's type converts to
-- implicitly, exactly the SPEC's required arguments, and any further
-- arguments defaulted.
--
-- The runner has already run CREATE EXTENSION pgtap and dsmapper in a fresh
-- database.  Nothing here needs a background worker.

\set ON_ERROR_STOP 1
\pset format unaligned
\pset tuples_only true
\pset pager off

SELECT plan(152);

-- Schema and views -------------------------------------------------------

SELECT has_schema('dsmapper', 'schema dsmapper exists');
SELECT has_view('dsmapper', 'jobs', 'view dsmapper.jobs exists');
SELECT has_view('dsmapper', 'shards', 'view dsmapper.shards exists');
SELECT has_view('dsmapper', 'mappers', 'view dsmapper.mappers exists');

SELECT has_column('dsmapper', 'jobs', c, 'dsmapper.jobs has column ' || c)
  FROM unnest(ARRAY['job_id', 'mapper', 'relation', 'state', 'owner', 'params',
                    'shards', 'shards_done', 'shards_failed', 'processed',
                    'expected', 'progress', 'rate', 'eta', 'created', 'updated',
                    'finished', 'error']) AS c;
SELECT has_column('dsmapper', 'shards', c, 'dsmapper.shards has column ' || c)
  FROM unnest(ARRAY['job_id', 'shard', 'state', 'range_start', 'range_end',
                    'resume_from', 'processed', 'expected', 'attempts',
                    'error', 'updated']) AS c;
-- Error details the other test files rely on (SPEC 4, Errors: "recording
-- the message, SQLSTATE and the page's first and last key").
SELECT has_column('dsmapper', 'shards', c, 'dsmapper.shards has column ' || c)
  FROM unnest(ARRAY['error_sqlstate', 'error_first_key', 'error_last_key']) AS c;
SELECT has_column('dsmapper', 'mappers', c, 'dsmapper.mappers has column ' || c)
  FROM unnest(ARRAY['mapper', 'function', 'owner', 'created']) AS c;

-- The SPEC columns come first, in SPEC order (extras go after them).
SELECT is((SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute
            WHERE attrelid = 'dsmapper.jobs'::regclass AND attnum BETWEEN 1 AND 18),
          ARRAY['job_id', 'mapper', 'relation', 'state', 'owner', 'params',
                'shards', 'shards_done', 'shards_failed', 'processed',
                'expected', 'progress', 'rate', 'eta', 'created', 'updated',
                'finished', 'error'],
          'dsmapper.jobs starts with the SPEC columns in SPEC order');
SELECT is((SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute
            WHERE attrelid = 'dsmapper.mappers'::regclass AND attnum BETWEEN 1 AND 4),
          ARRAY['mapper', 'function', 'owner', 'created'],
          'dsmapper.mappers starts with the SPEC columns in SPEC order');

-- Column types the SPEC pins down (ids, keys as text, timestamps, params).
SELECT col_type_is('dsmapper', 'jobs', 'job_id', 'bigint',
                   'jobs.job_id is bigint (launch returns bigint)');
SELECT col_type_is('dsmapper', 'jobs', 'relation', 'regclass',
                   'jobs.relation is regclass');
SELECT col_type_is('dsmapper', 'jobs', 'state', 'text', 'jobs.state is text');
SELECT col_type_is('dsmapper', 'jobs', 'params', 'jsonb', 'jobs.params is jsonb');
SELECT col_type_is('dsmapper', 'jobs', c, 'timestamp with time zone',
                   'jobs.' || c || ' is timestamptz')
  FROM unnest(ARRAY['eta', 'created', 'updated', 'finished']) AS c;
SELECT col_type_is('dsmapper', 'jobs', 'error', 'text', 'jobs.error is text');
SELECT col_type_is('dsmapper', 'shards', 'job_id', 'bigint',
                   'shards.job_id is bigint');
SELECT col_type_is('dsmapper', 'shards', 'shard', 'integer',
                   'shards.shard is integer (dsmapper_current_shard returns integer)');
SELECT col_type_is('dsmapper', 'shards', c, 'text',
                   'shards.' || c || ' is text (keys as text)')
  FROM unnest(ARRAY['range_start', 'range_end', 'resume_from']) AS c;
SELECT col_type_is('dsmapper', 'shards', 'state', 'text', 'shards.state is text');
SELECT col_type_is('dsmapper', 'mappers', 'function', 'regprocedure',
                   'mappers.function is regprocedure');

-- API functions ------------------------------------------------------------

-- The SPEC's API: name, argument names and types, required arguments,
-- return type.
CREATE TEMP TABLE api (name text, argnames text[], argtypes regtype[],
                       required int, returns regtype);
INSERT INTO api VALUES
    ('dsmapper_register', '{mapper,fn,replace}', '{text,regprocedure,boolean}', 2, 'void'),
    ('dsmapper_unregister', '{mapper}', '{text}', 1, 'void'),
    ('dsmapper_launch',
     '{mapper,relation,params,shards,page_size,filter,pages_per_task,task_duration,track_progress,max_attempts}',
     '{text,regclass,jsonb,integer,integer,text,integer,interval,boolean,integer}', 2, 'bigint'),
    ('dsmapper_abort', '{job}', '{bigint}', 1, 'text'),
    ('dsmapper_wait', '{job,timeout}', '{bigint,interval}', 1, 'text'),
    ('dsmapper_pause', '{job}', '{bigint}', 1, 'text'),
    ('dsmapper_resume', '{job}', '{bigint}', 1, 'text'),
    ('dsmapper_retry', '{job}', '{bigint}', 1, 'text'),
    ('dsmapper_current_job', '{}', '{}', 0, 'bigint'),
    ('dsmapper_current_shard', '{}', '{}', 0, 'integer'),
    ('dsmapper_run', '{max_duration}', '{interval}', 0, 'bigint'),
    ('dsmapper_schedule', '{name,schedule,mapper,relation,params}',
     '{text,text,text,regclass,jsonb}', 4, 'bigint'),
    ('dsmapper_unschedule', '{name}', '{text}', 1, 'boolean');

-- dsmapper_await is the procedure form of dsmapper_wait.
SELECT ok(EXISTS (SELECT 1 FROM pg_proc
                   WHERE proname = 'dsmapper_await' AND prokind = 'p'
                     AND proargnames = '{job,timeout,progress,state}'
                     AND pronargdefaults = 3),
          'dsmapper_await(job, timeout, progress, INOUT state) is a procedure');

-- The one visible function of each name (overloading would make
-- unqualified calls with named arguments ambiguous).
CREATE TEMP VIEW api_fn AS
SELECT a.*, p.oid AS fn, p.pronargs::int AS nargs, p.pronargdefaults::int AS ndefaults,
       coalesce(p.proargnames[1:cardinality(a.argnames)]::text[], '{}') AS actual_names,
       ARRAY(SELECT t::regtype FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, i)
              WHERE i <= cardinality(a.argtypes) ORDER BY i) AS actual_types,
       p.prorettype::regtype AS actual_returns
  FROM api a
  LEFT JOIN pg_proc p ON p.proname = a.name AND pg_function_is_visible(p.oid);

-- Exists, visible unqualified with the default search_path, exactly once.
SELECT is((SELECT count(*) FROM api_fn f WHERE f.name = a.name AND f.fn IS NOT NULL), 1::bigint,
          a.name || ' exists once and is callable unqualified')
  FROM api a ORDER BY a.name;

-- Argument names and types, and what may be left out.
SELECT is(f.actual_names, f.argnames,
          f.name || ' takes arguments named ' || array_to_string(f.argnames, ', '))
  FROM api_fn f WHERE cardinality(f.argnames) > 0 ORDER BY f.name;
SELECT ok(f.nargs >= cardinality(f.argtypes)
          AND NOT EXISTS (
              SELECT 1 FROM unnest(f.argtypes, f.actual_types) u(want, got)
               WHERE want IS DISTINCT FROM got
                 AND NOT EXISTS (SELECT 1 FROM pg_cast c
                                  WHERE c.castsource = want AND c.casttarget = got
                                    AND c.castcontext = 'i')),
          f.name || '(' || array_to_string(f.argtypes, ', ') || ') takes the SPEC''s argument types')
  FROM api_fn f WHERE cardinality(f.argtypes) > 0 ORDER BY f.name;
SELECT is(f.nargs - f.ndefaults, f.required,
          f.name || ' requires exactly ' || f.required || ' arguments (the rest are defaulted)')
  FROM api_fn f ORDER BY f.name;

-- Return types (the SPEC's, exactly).
SELECT function_returns(f.name, ARRAY(SELECT t::regtype::text FROM unnest(p.proargtypes::oid[]) t),
                        f.returns::text, f.name || ' returns ' || f.returns)
  FROM api_fn f JOIN pg_proc p ON p.oid = f.fn ORDER BY f.name;

-- None returns a set; none is STRICT (a NULL argument must be an error,
-- not a silent NULL).
SELECT ok(NOT p.proretset AND NOT p.proisstrict, f.name || ' is neither set-returning nor STRICT')
  FROM api_fn f JOIN pg_proc p ON p.oid = f.fn
 WHERE f.name NOT IN ('dsmapper_current_job', 'dsmapper_current_shard')
 ORDER BY f.name;

-- Default values, evaluated (so the spelling does not matter).  Returns
-- the default of argument argname of function fn as text, or '<none>'.
CREATE FUNCTION pg_temp.arg_default(fn oid, argname text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    p pg_proc;
    defaults text[];
    pos int;
    r text;
BEGIN
    SELECT * INTO p FROM pg_proc WHERE oid = fn;
    pos := array_position(p.proargnames, argname);
    IF pos IS NULL OR pos <= p.pronargs - p.pronargdefaults THEN
        RETURN '<none>';
    END IF;
    -- Split the default list at commas outside quotes and parentheses.
    defaults := regexp_split_to_array(pg_get_expr(p.proargdefaults, 0),
                                      ', (?=(?:[^'']*''[^'']*'')*[^'']*$)(?![^(]*\))');
    EXECUTE 'SELECT (' || defaults[pos - (p.pronargs - p.pronargdefaults)] || ')::text' INTO r;
    RETURN r;
END $$;

SELECT is(pg_temp.arg_default(f.fn, d.arg), d.value,
          f.name || ': ' || d.arg || ' defaults to ' || coalesce(d.value, 'NULL'))
  FROM (VALUES
        ('dsmapper_register', 'replace', 'false'),
        ('dsmapper_launch', 'params', '{}'),
        ('dsmapper_launch', 'shards', '8'),
        ('dsmapper_launch', 'page_size', '1000'),
        ('dsmapper_launch', 'filter', NULL),
        ('dsmapper_launch', 'pages_per_task', '0'),
        ('dsmapper_launch', 'track_progress', 'true'),
        ('dsmapper_launch', 'max_attempts', '10'),
        ('dsmapper_wait', 'timeout', NULL),
        ('dsmapper_schedule', 'params', '{}')) AS d(name, arg, value)
  JOIN api_fn f USING (name)
 ORDER BY d.name, d.arg;
SELECT is(pg_temp.arg_default(f.fn, d.arg)::interval, '1 minute'::interval,
          f.name || ': ' || d.arg || ' defaults to 1 minute')
  FROM (VALUES ('dsmapper_launch', 'task_duration'),
               ('dsmapper_run', 'max_duration')) AS d(name, arg)
  JOIN api_fn f USING (name)
 ORDER BY d.name;

-- Security surface (SPEC 6) ----------------------------------------------

-- Every SECURITY DEFINER function of the extension pins its search_path.
SELECT is_empty($$
    SELECT p.oid::regprocedure::text
      FROM pg_proc p
      JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                      AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'dsmapper'
     WHERE p.prosecdef
       AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c
                        WHERE c LIKE 'search\_path=%')
$$, 'every SECURITY DEFINER function of dsmapper pins search_path');

-- Ordinary roles may read the views, but nothing of dsmapper's own is
-- writable by PUBLIC.
SELECT ok(has_table_privilege('public', 'dsmapper.' || v, 'SELECT'),
          'PUBLIC may SELECT from dsmapper.' || v)
  FROM unnest(ARRAY['jobs', 'shards', 'mappers']) AS v;
SELECT is_empty($$
    SELECT c.oid::regclass::text, a.privilege_type
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dsmapper',
           aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
     WHERE a.grantee = 0
       AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
$$, 'PUBLIC cannot write to any relation in schema dsmapper');
SELECT is_empty($$
    SELECT c.oid::regclass::text
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'dsmapper',
           aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
     WHERE a.grantee = 0 AND c.relkind IN ('r', 'p')
$$, 'PUBLIC has no privilege on dsmapper''s internal tables');

-- Fresh database: nothing registered, no jobs.
SELECT is_empty('SELECT * FROM dsmapper.mappers', 'no mappers in a fresh database');
SELECT is_empty('SELECT * FROM dsmapper.jobs', 'no jobs in a fresh database');
SELECT is_empty('SELECT * FROM dsmapper.shards', 'no shards in a fresh database');

SELECT * FROM finish();
