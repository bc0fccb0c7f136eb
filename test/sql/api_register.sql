--
-- api_register: dsmapper_register() and dsmapper_unregister(), their
-- argument checks and error messages, and the dsmapper.mappers view.
--
\set VERBOSITY default
-- The files of this suite share one database; the extension may already
-- exist when an earlier file created it.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS dsmapper;
RESET client_min_messages;

CREATE FUNCTION reg_map_ids(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION reg_map_ids_v2(keys bigint[], params jsonb) RETURNS integer
LANGUAGE sql AS $$ SELECT cardinality(keys) $$;
CREATE FUNCTION reg_map_text(keys text[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION reg_map_int(keys int[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;

-- Only the registrations of this file, owner shown as "is it me".
CREATE VIEW reg_mappers AS
SELECT mapper, function, owner = current_user::regrole AS owned_by_me
  FROM dsmapper.mappers
 WHERE mapper LIKE 'reg-%'
 ORDER BY mapper;

-- A good registration, positional and named notation.
SELECT dsmapper_register('reg-ids', 'reg_map_ids(bigint[], jsonb)');
SELECT dsmapper_register(mapper => 'reg-text', fn => 'reg_map_text(text[],jsonb)');
SELECT dsmapper_register(fn => 'reg_map_int(int[],jsonb)', mapper => 'reg-int',
                         replace => false);
SELECT * FROM reg_mappers;

-- created is set and not in the future.
SELECT count(*) AS created_ok
  FROM dsmapper.mappers
 WHERE mapper LIKE 'reg-%' AND created IS NOT NULL AND created <= now();

-- A duplicate id is an error with a hint, also with replace => false.
SELECT dsmapper_register('reg-ids', 'reg_map_ids_v2(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register('reg-ids', 'reg_map_ids_v2(bigint[], jsonb)', false);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register('reg-ids', 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- ... and changes nothing.
SELECT * FROM reg_mappers;

-- replace => true rebinds the id.
SELECT dsmapper_register('reg-ids', 'reg_map_ids_v2(bigint[], jsonb)', true);
SELECT * FROM reg_mappers;
SELECT dsmapper_register(mapper => 'reg-ids', fn => 'reg_map_ids(bigint[],jsonb)',
                         replace => true);
SELECT * FROM reg_mappers;
-- replace => true for a new id simply registers it.
SELECT dsmapper_register('reg-new', 'reg_map_ids(bigint[], jsonb)', replace => true);
SELECT * FROM reg_mappers;

-- NULL arguments.
SELECT dsmapper_register(NULL, 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register('reg-null', NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register('reg-null', 'reg_map_ids(bigint[], jsonb)', NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register(mapper => NULL, fn => NULL, replace => NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Bad mapper ids.
SELECT dsmapper_register('', 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register(repeat('x', 201), 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- 101 two-byte characters are 202 bytes
SELECT dsmapper_register(repeat('é', 101), 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register(E'reg-tab\there', 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register(E'reg-line\nbreak', 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register(E'reg-bell\x07', 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- DEL (0x7f) is a control character too, and refused.
SELECT dsmapper_register(E'reg-del\x7f', 'reg_map_ids(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- 200 bytes is the limit and is fine; so are spaces, quotes and unicode.
SELECT dsmapper_register('reg-' || repeat('y', 196), 'reg_map_ids(bigint[], jsonb)');
SELECT dsmapper_register('reg-it''s "quoted" ünïcödé', 'reg_map_ids(bigint[], jsonb)');
SELECT length(mapper), octet_length(mapper) FROM reg_mappers WHERE mapper LIKE 'reg-yyy%';
SELECT mapper FROM reg_mappers WHERE mapper LIKE 'reg-it%';
SELECT dsmapper_unregister('reg-' || repeat('y', 196));
SELECT dsmapper_unregister('reg-it''s "quoted" ünïcödé');
SELECT dsmapper_unregister(E'reg-del\x7f');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- A function that does not exist fails at the regprocedure cast.
SELECT dsmapper_register('reg-missing', 'reg_no_such_function(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Functions of the wrong kind.
CREATE PROCEDURE reg_proc(keys bigint[], params jsonb)
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-proc', 'reg_proc(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_agg_step(state bigint, keys bigint[], params jsonb)
RETURNS bigint LANGUAGE sql AS $$ SELECT state + cardinality(keys) $$;
CREATE AGGREGATE reg_agg(bigint[], jsonb) (sfunc = reg_agg_step, stype = bigint);
SELECT dsmapper_register('reg-agg', 'reg_agg(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_srf(keys bigint[], params jsonb) RETURNS SETOF bigint
LANGUAGE sql AS $$ SELECT unnest(keys) $$;
SELECT dsmapper_register('reg-srf', 'reg_srf(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_table_fn(keys bigint[], params jsonb) RETURNS TABLE (k bigint)
LANGUAGE sql AS $$ SELECT unnest(keys) $$;
SELECT dsmapper_register('reg-table-fn', 'reg_table_fn(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Wrong signatures.
CREATE FUNCTION reg_one_arg(keys bigint[]) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-one-arg', 'reg_one_arg(bigint[])');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_no_arg() RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-no-arg', 'reg_no_arg()');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_three_args(keys bigint[], params jsonb, extra int) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-three-args', 'reg_three_args(bigint[], jsonb, int)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- a third parameter with a default is still a third parameter
CREATE FUNCTION reg_default_arg(keys bigint[], params jsonb, extra int DEFAULT 0)
RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-default-arg', 'reg_default_arg(bigint[], jsonb, int)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_json(keys bigint[], params json) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-json', 'reg_json(bigint[], json)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_text_params(keys bigint[], params text) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-text-params', 'reg_text_params(bigint[], text)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_scalar(keys bigint, params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-scalar', 'reg_scalar(bigint, jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE FUNCTION reg_swapped(params jsonb, keys bigint[]) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-swapped', 'reg_swapped(jsonb, bigint[])');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Rows mode: an array of a table's row type is a valid first parameter.
CREATE TABLE reg_items (id bigint PRIMARY KEY, name text);
CREATE FUNCTION reg_map_rows(rows reg_items[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
SELECT dsmapper_register('reg-rows', 'reg_map_rows(reg_items[], jsonb)');

-- None of the failed registrations left anything behind.
SELECT * FROM reg_mappers;

-- Unregister.
SELECT dsmapper_unregister('reg-new');
SELECT dsmapper_unregister(mapper => 'reg-int');
SELECT dsmapper_unregister('reg-new');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_unregister('reg-no-such-mapper');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_unregister('');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_unregister(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM reg_mappers;
-- An unregistered id can be registered again.
SELECT dsmapper_register('reg-new', 'reg_map_int(int[], jsonb)');
SELECT * FROM reg_mappers;

-- Privileges: EXECUTE on the function is needed to register it, and only
-- the registrant (or a member of its role, or a superuser) may replace or
-- unregister a mapper.
CREATE ROLE regress_dsm_reg_other;
CREATE FUNCTION reg_private(keys bigint[], params jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$;
REVOKE EXECUTE ON FUNCTION reg_private(bigint[], jsonb) FROM PUBLIC;
SET ROLE regress_dsm_reg_other;
SELECT dsmapper_register('reg-private', 'reg_private(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_register('reg-ids', 'reg_map_ids_v2(bigint[], jsonb)', true);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT dsmapper_unregister('reg-ids');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The duplicate check comes first, with its hint.
SELECT dsmapper_register('reg-ids', 'reg_map_ids_v2(bigint[], jsonb)');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Registering its own mapper is fine; the role can see every mapper.
SELECT dsmapper_register('reg-other', 'reg_map_ids_v2(bigint[], jsonb)');
-- (the bootstrap superuser's name depends on the machine: shown as "me")
SELECT mapper, function,
       CASE WHEN owner = session_user::regrole THEN 'me' ELSE owner::text END AS owner
  FROM dsmapper.mappers
 WHERE mapper LIKE 'reg-%' ORDER BY mapper;
-- The internal table is not writable directly.
DELETE FROM dsmapper.mapper WHERE mapper = 'reg-ids';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
-- A superuser may unregister and replace any mapper.
SELECT dsmapper_register('reg-other', 'reg_map_ids(bigint[], jsonb)', true);
-- (replacing keeps the registrant as owner)
SELECT mapper, function, owner FROM dsmapper.mappers
 WHERE mapper = 'reg-other';
SELECT dsmapper_unregister('reg-other');

-- Clean up everything this file created.
SELECT dsmapper_unregister(mapper) FROM reg_mappers;
SELECT count(*) AS left_over FROM dsmapper.mappers WHERE mapper LIKE 'reg-%';
DROP VIEW reg_mappers;
DROP AGGREGATE reg_agg(bigint[], jsonb);
DROP FUNCTION reg_map_ids, reg_map_ids_v2, reg_map_text, reg_map_int,
    reg_agg_step, reg_srf, reg_table_fn, reg_one_arg, reg_no_arg,
    reg_three_args, reg_default_arg, reg_json, reg_text_params, reg_scalar,
    reg_swapped, reg_map_rows, reg_private;
DROP PROCEDURE reg_proc;
DROP TABLE reg_items;
DROP ROLE regress_dsm_reg_other;
