/*-------------------------------------------------------------------------
 *
 * api.c
 *		SQL-callable functions of dsmapper.
 *
 * Every function runs as its caller (SECURITY INVOKER) and checks the
 * caller's rights itself; reads and writes of dsmapper's tables switch to
 * the extension owner with a pinned search_path (job.c).  Arguments are
 * validated before anything is written, so a bad call changes nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_class.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "parser/parse_coerce.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(dsmapper_register);
PG_FUNCTION_INFO_V1(dsmapper_unregister);
PG_FUNCTION_INFO_V1(dsmapper_launch);
PG_FUNCTION_INFO_V1(dsmapper_abort);
PG_FUNCTION_INFO_V1(dsmapper_pause);
PG_FUNCTION_INFO_V1(dsmapper_resume);
PG_FUNCTION_INFO_V1(dsmapper_retry);
PG_FUNCTION_INFO_V1(dsmapper_wait);
PG_FUNCTION_INFO_V1(dsmapper_await);
PG_FUNCTION_INFO_V1(dsmapper_current_job);
PG_FUNCTION_INFO_V1(dsmapper_current_shard);
PG_FUNCTION_INFO_V1(dsmapper_run);
PG_FUNCTION_INFO_V1(dsmapper_tune);
PG_FUNCTION_INFO_V1(dsmapper_forget);

#define DSM_MAX_SHARDS		1024
#define DSM_MAX_PAGE_SIZE	1000000
#define DSM_MAX_ATTEMPTS	1000
#define DSM_MAX_MAPPER_LEN	200

/*
 * require_arg errors out when a required argument is NULL.
 */
static void
require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", name)));
}

static void
require_read_committed(const char *function)
{
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("%s cannot run in a REPEATABLE READ or SERIALIZABLE transaction",
						function),
				 errdetail("It must see the changes that other sessions commit while it runs."),
				 errhint("Call it in a READ COMMITTED transaction.")));
}

/*
 * mapper_signature_error explains what a mapper function must look like.
 */
static void
check_mapper_signature(Oid fn)
{
	HeapTuple	tuple;
	Form_pg_proc proc;
	char	   *name;
	bool		ok_kind;
	bool		ok_args;

	tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tuple))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function with OID %u does not exist", fn)));
	proc = (Form_pg_proc) GETSTRUCT(tuple);
	name = format_procedure(fn);
	ok_kind = proc->prokind == PROKIND_FUNCTION && !proc->proretset;
	ok_args = proc->pronargs == 2 &&
		OidIsValid(get_element_type(proc->proargtypes.values[0])) &&
		proc->proargtypes.values[1] == JSONBOID;
	ReleaseSysCache(tuple);

	if (!ok_kind)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("%s cannot be a mapper", name),
				 errdetail("A mapper must be a plain function that returns a single value, not a procedure, aggregate, window or set-returning function.")));
	if (!ok_args)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("%s does not have a mapper signature", name),
				 errdetail("A mapper takes two parameters: an array of the table's key type (keys mode) or of its row type (rows mode), and jsonb."),
				 errhint("Declare it as, for example, my_mapper(keys bigint[], params jsonb).")));
}

static void
check_mapper_name(const char *mapper)
{
	if (mapper[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mapper id must not be empty")));
	if (strlen(mapper) > DSM_MAX_MAPPER_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("mapper id is too long"),
				 errdetail("A mapper id has at most %d bytes.", DSM_MAX_MAPPER_LEN)));
	for (const char *p = mapper; *p; p++)
		if ((unsigned char) *p < 0x20 || (unsigned char) *p == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("mapper id must not contain control characters")));
}

/*
 * may_control tells whether the current role may steer objects owned by
 * owner: superusers and members of the owner role.
 */
static bool
may_control(Oid owner)
{
	return superuser() ||
		(SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(owner)) &&
		 is_member_of_role(GetUserId(), owner));
}

/*
 * may_see tells whether the current role may see a job of owner.
 */
static bool
may_see(Oid owner)
{
	return may_control(owner) ||
		is_member_of_role(GetUserId(), ROLE_PG_READ_ALL_STATS);
}

/*
 * lookup_mapper returns the function and owner of a registered mapper, or
 * InvalidOid.  SPI connected, internal identity.
 */
static Oid
lookup_mapper(const char *mapper, Oid *owner, bool lock)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(mapper)};
	bool		isnull;
	int			rc;

	rc = SPI_execute_with_args(psprintf("SELECT fn, owner FROM dsmapper.mapper"
										" WHERE mapper OPERATOR(pg_catalog.=) $1%s",
										lock ? " FOR UPDATE" : ""),
							   1, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read mappers");
	if (SPI_processed == 0)
		return InvalidOid;
	if (owner)
		*owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
												SPI_tuptable->tupdesc, 2, &isnull));
	return DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * dsmapper_register(mapper text, fn regprocedure, replace boolean)
 */
Datum
dsmapper_register(PG_FUNCTION_ARGS)
{
	char	   *mapper;
	Oid			fn;
	bool		replace;
	Oid			existing_owner = InvalidOid;
	DsmIdentity internal;
	Oid			caller = GetUserId();

	require_arg(fcinfo, 0, "mapper");
	require_arg(fcinfo, 1, "fn");
	require_arg(fcinfo, 2, "replace");
	mapper = text_to_cstring(PG_GETARG_TEXT_PP(0));
	fn = PG_GETARG_OID(1);
	replace = PG_GETARG_BOOL(2);

	check_mapper_name(mapper);
	check_mapper_signature(fn);
	if (pg_proc_aclcheck(fn, caller, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", format_procedure(fn))));

	SPI_connect();
	dsm_enter_internal(&internal);
	if (OidIsValid(lookup_mapper(mapper, &existing_owner, true)))
	{
		Oid			types[3] = {TEXTOID, OIDOID, OIDOID};
		Datum		values[3] = {CStringGetTextDatum(mapper), ObjectIdGetDatum(fn),
		ObjectIdGetDatum(caller)};

		if (!replace)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("mapper \"%s\" already exists", mapper),
					 errhint("Pass replace => true to bind it to another function.")));
		dsm_leave(&internal);
		if (!may_control(existing_owner))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to replace mapper \"%s\"", mapper),
					 errdetail("Only the role that registered a mapper, its members and superusers can replace it.")));
		dsm_enter_internal(&internal);
		dsm_spi_exec("UPDATE dsmapper.mapper SET fn = $2,"
					 " created = pg_catalog.now()"
					 " WHERE mapper OPERATOR(pg_catalog.=) $1",
					 2, types, values, SPI_OK_UPDATE);
	}
	else
	{
		Oid			types[3] = {TEXTOID, OIDOID, OIDOID};
		Datum		values[3] = {CStringGetTextDatum(mapper), ObjectIdGetDatum(fn),
		ObjectIdGetDatum(caller)};

		dsm_spi_exec("INSERT INTO dsmapper.mapper (mapper, fn, owner)"
					 " VALUES ($1, $2, $3)",
					 3, types, values, SPI_OK_INSERT);
	}
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_VOID();
}

/*
 * dsmapper_unregister(mapper text)
 */
Datum
dsmapper_unregister(PG_FUNCTION_ARGS)
{
	char	   *mapper;
	Oid			owner = InvalidOid;
	DsmIdentity internal;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	require_arg(fcinfo, 0, "mapper");
	mapper = text_to_cstring(PG_GETARG_TEXT_PP(0));
	values[0] = CStringGetTextDatum(mapper);

	SPI_connect();
	dsm_enter_internal(&internal);
	if (!OidIsValid(lookup_mapper(mapper, &owner, true)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("mapper \"%s\" does not exist", mapper)));
	dsm_leave(&internal);
	if (!may_control(owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to unregister mapper \"%s\"", mapper),
				 errdetail("Only the role that registered a mapper, its members and superusers can unregister it.")));
	dsm_enter_internal(&internal);
	dsm_spi_exec("DELETE FROM dsmapper.mapper WHERE mapper OPERATOR(pg_catalog.=) $1",
				 1, types, values, SPI_OK_DELETE);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_VOID();
}

/*
 * check_int_range errors out when an integer argument is out of range.
 */
static void
check_int_range(const char *name, int64 value, int64 min, int64 max)
{
	if (value < min || value > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between " INT64_FORMAT " and " INT64_FORMAT,
						name, min, max),
				 errdetail("The value given was " INT64_FORMAT ".", value)));
}

/*
 * dsmapper_launch(mapper, relation, params, shards, page_size, filter,
 *				   pages_per_task, task_duration, track_progress,
 *				   max_attempts)
 *
 * Validates everything, stores the job in state "starting" with its split
 * task queued, and returns the job id.  Workers are woken at commit.
 */
Datum
dsmapper_launch(PG_FUNCTION_ARGS)
{
	char	   *mapper;
	Oid			relid;
	char	   *params;
	int32		shards;
	int32		page_size;
	char	   *filter = NULL;
	int32		pages_per_task;
	Interval   *task_duration;
	bool		track_progress;
	int32		max_attempts;
	Oid			fn;
	Oid			caller = GetUserId();
	Relation	rel;
	DsmKey	   *key;
	Oid			arg_elem;
	bool		rows_mode;
	char	   *relation_name;
	List	   *key_names = NIL;
	char	   *search_path;
	DsmIdentity internal;
	int64		job_id;
	HeapTuple	proctup;

	/* Plain argument checks. */
	require_arg(fcinfo, 0, "mapper");
	require_arg(fcinfo, 1, "relation");
	require_arg(fcinfo, 2, "params");
	require_arg(fcinfo, 3, "shards");
	require_arg(fcinfo, 4, "page_size");
	require_arg(fcinfo, 6, "pages_per_task");
	require_arg(fcinfo, 7, "task_duration");
	require_arg(fcinfo, 8, "track_progress");
	require_arg(fcinfo, 9, "max_attempts");

	mapper = text_to_cstring(PG_GETARG_TEXT_PP(0));
	relid = PG_GETARG_OID(1);
	params = DatumGetCString(DirectFunctionCall1(jsonb_out, PG_GETARG_DATUM(2)));
	shards = PG_GETARG_INT32(3);
	page_size = PG_GETARG_INT32(4);
	if (!PG_ARGISNULL(5))
		filter = text_to_cstring(PG_GETARG_TEXT_PP(5));
	pages_per_task = PG_GETARG_INT32(6);
	task_duration = PG_GETARG_INTERVAL_P(7);
	track_progress = PG_GETARG_BOOL(8);
	max_attempts = PG_GETARG_INT32(9);

	check_int_range("shards", shards, 1, DSM_MAX_SHARDS);
	check_int_range("page_size", page_size, 1, DSM_MAX_PAGE_SIZE);
	check_int_range("pages_per_task", pages_per_task, 0, PG_INT32_MAX);
	check_int_range("max_attempts", max_attempts, 1, DSM_MAX_ATTEMPTS);
	if (task_duration->month != 0 || task_duration->day < 0 ||
		task_duration->day > 1 ||
		task_duration->time + (int64) task_duration->day * USECS_PER_DAY <= 0 ||
		task_duration->time + (int64) task_duration->day * USECS_PER_DAY >
		INT64CONST(86400000000))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("task_duration must be positive and at most 1 day"),
				 errhint("Use a value such as '1 minute' or '30 seconds'.")));
	if (filter != NULL)
	{
		const char *p = filter;

		while (*p && isspace((unsigned char) *p))
			p++;
		if (*p == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("filter must not be empty"),
					 errhint("Pass NULL to map every row.")));
		dsm_check_filter_syntax(filter);
	}

	/* The relation: a table with a primary key that the caller can read. */
	rel = table_open(relid, AccessShareLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION &&
		rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a table", RelationGetRelationName(rel)),
				 errdetail("dsmapper maps ordinary and partitioned tables.")));
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot map temporary table \"%s\"", RelationGetRelationName(rel)),
				 errdetail("Jobs run in sessions of their own, which cannot read another session's temporary tables."),
				 errhint("Copy the rows into an ordinary table and map that.")));
	if (pg_class_aclcheck(relid, caller, ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table %s", RelationGetRelationName(rel))));
	dsm_check_no_inheritance_children(rel);
	key = dsm_primary_key(rel, false);
	relation_name = dsm_quoted_relation_name(relid);

	/* The mapper: registered, executable, and matching the table. */
	SPI_connect();
	dsm_enter_internal(&internal);
	fn = lookup_mapper(mapper, NULL, false);
	dsm_leave(&internal);
	if (!OidIsValid(fn))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("mapper \"%s\" does not exist", mapper),
				 errhint("Register it first with dsmapper_register().")));
	proctup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(proctup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function of mapper \"%s\" no longer exists", mapper),
				 errhint("Register the mapper again with dsmapper_register(..., replace => true).")));
	ReleaseSysCache(proctup);
	check_mapper_signature(fn);
	if (pg_proc_aclcheck(fn, caller, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", format_procedure(fn))));

	{
		Oid		   *argtypes;
		int			nargs;

		(void) get_func_signature(fn, &argtypes, &nargs);
		arg_elem = get_element_type(argtypes[0]);
	}
	rows_mode = (arg_elem == rel->rd_rel->reltype);
	if (!rows_mode)
	{
		bool		cast;

		if (key->natts != 1)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("mapper \"%s\" takes keys, but the primary key of \"%s\" has %d columns",
							mapper, RelationGetRelationName(rel), key->natts),
					 errdetail("Keys mode needs a single-column primary key."),
					 errhint("Use a mapper whose first parameter is %s[] (rows mode).",
							 format_type_be(rel->rd_rel->reltype))));
		if (!dsm_key_fits_mapper(key->typids[0], arg_elem, &cast))
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("mapper \"%s\" takes %s[], but the primary key of \"%s\" is %s",
							mapper, format_type_be(arg_elem),
							RelationGetRelationName(rel),
							format_type_be(key->typids[0])),
					 errhint("Declare the mapper's first parameter as %s[] (keys mode) or %s[] (rows mode).",
							 format_type_be(key->typids[0]),
							 format_type_be(rel->rd_rel->reltype))));
	}
	for (int i = 0; i < key->natts; i++)
		key_names = lappend(key_names,
							get_attname(relid, key->attnums[i], false));

	/* The filter: valid SQL over the table's columns, boolean, as caller. */
	if (filter != NULL)
	{
		SPIPlanPtr	plan = NULL;
		MemoryContext cxt = CurrentMemoryContext;

		PG_TRY();
		{
			/* Executed (LIMIT 0 reads nothing) so privileges are checked. */
			plan = SPI_prepare(psprintf("SELECT 1 FROM %s AS __dsmapper_row WHERE (%s\n) LIMIT 0",
										relation_name, filter), 0, NULL);
			if (plan != NULL &&
				SPI_execute_plan(plan, NULL, NULL, true, 0) != SPI_OK_SELECT)
				elog(ERROR, "dsmapper: could not check the filter");
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			ereport(ERROR,
					(errcode(edata->sqlerrcode),
					 errmsg("invalid filter: %s", edata->message),
					 errdetail("The filter was: %s", filter),
					 edata->hint ? errhint("%s", edata->hint) : 0));
		}
		PG_END_TRY();
		if (plan == NULL)
			elog(ERROR, "dsmapper: could not check the filter");
		SPI_freeplan(plan);
	}
	table_close(rel, NoLock);

	/* Store the job and queue its split. */
	search_path = GetConfigOptionByName("search_path", NULL, false);
	dsm_enter_internal(&internal);
	{
		Oid			types[16] = {TEXTOID, OIDOID, TEXTOID, TEXTARRAYOID, TEXTOID,
			TEXTOID, INT4OID, INT4OID, TEXTOID, INT4OID, INTERVALOID, BOOLOID,
		INT4OID, OIDOID, OIDOID, TEXTOID};
		Datum		values[16];
		char		nulls[16];
		Oid			stypes[2] = {TEXTOID, INT8OID};
		Datum		svalues[2];
		bool		found;

		memset(nulls, ' ', sizeof(nulls));
		values[0] = CStringGetTextDatum(mapper);
		values[1] = ObjectIdGetDatum(relid);
		values[2] = CStringGetTextDatum(relation_name);
		values[3] = dsm_text_array_datum(key_names);
		values[4] = CStringGetTextDatum(rows_mode ? "rows" : "keys");
		values[5] = CStringGetTextDatum(params);
		values[6] = Int32GetDatum(shards);
		values[7] = Int32GetDatum(page_size);
		values[8] = filter ? CStringGetTextDatum(filter) : (Datum) 0;
		nulls[8] = filter ? ' ' : 'n';
		values[9] = Int32GetDatum(pages_per_task);
		values[10] = IntervalPGetDatum(task_duration);
		values[11] = BoolGetDatum(track_progress);
		values[12] = Int32GetDatum(max_attempts);
		values[13] = ObjectIdGetDatum(caller);
		values[14] = ObjectIdGetDatum(fn);
		values[15] = CStringGetTextDatum(dsm_key_signature(key));

		if (SPI_execute_with_args("INSERT INTO dsmapper.job (mapper, relation,"
								  " relation_name, key_columns, mode, params,"
								  " shards_wanted, page_size, filter, pages_per_task,"
								  " task_duration, track_progress, max_attempts, owner,"
								  " search_path, fn, key_signature)"
								  " VALUES ($1, $2, $3, $4, $5, $6::pg_catalog.jsonb,"
								  " $7, $8, $9, $10, $11, $12, $13, $14, '', $15, $16)"
								  " RETURNING job_id",
								  16, types, values, nulls, false, 0) != SPI_OK_INSERT_RETURNING)
			elog(ERROR, "dsmapper: could not store the job");
		job_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &found));

		svalues[0] = CStringGetTextDatum(search_path);
		svalues[1] = Int64GetDatum(job_id);
		dsm_spi_exec("UPDATE dsmapper.job SET search_path = $1"
					 " WHERE job_id OPERATOR(pg_catalog.=) $2",
					 2, stypes, svalues, SPI_OK_UPDATE);

		svalues[0] = Int64GetDatum(job_id);
		{
			Oid			qtypes[2] = {INT8OID, INT4OID};
			Datum		qvalues[2] = {Int64GetDatum(job_id),
			Int32GetDatum(DSM_SPLIT_TASK)};

			dsm_spi_exec("INSERT INTO dsmapper.queue (job_id, shard) VALUES ($1, $2)",
						 2, qtypes, qvalues, SPI_OK_INSERT);
		}
		dsm_notify_job_state(job_id, "starting");
	}
	dsm_leave(&internal);
	SPI_finish();

	dsm_request_wakeup_at_commit();
	if (!dsm_workers_available())
		ereport(NOTICE,
				(errmsg("dsmapper background workers are not running, so job " INT64_FORMAT " runs only when dsmapper_run() is called",
						job_id),
				 errhint("Add dsmapper to shared_preload_libraries and set dsmapper.max_workers above zero, or call dsmapper_run() regularly, for example from pg_cron.")));

	PG_RETURN_INT64(job_id);
}

/*
 * load_job_for_control loads and locks a job and checks that the caller
 * may steer it.  SPI connected; returns with the internal identity left.
 */
static DsmJob *
load_job_for_control(int64 job_id, const char *verb, MemoryContext mcxt)
{
	DsmIdentity internal;
	DsmJob	   *job;

	dsm_enter_internal(&internal);
	job = dsm_load_job(job_id, true, mcxt);
	dsm_leave(&internal);

	if (job == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("job " INT64_FORMAT " does not exist", job_id)));
	if (!may_control(job->owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s job " INT64_FORMAT, verb, job_id),
				 errdetail("Only the job's owner, members of the owner role and superusers can %s it.",
						   verb)));
	return job;
}

/*
 * current_state reads a job's state.  SPI connected, internal identity.
 * The result is allocated in mcxt.
 */
static char *
current_state(int64 job_id, MemoryContext mcxt)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(job_id)};
	char	   *state;
	MemoryContext old;

	if (SPI_execute_with_args("SELECT state FROM dsmapper.job"
							  " WHERE job_id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT ||
		SPI_processed != 1)
		return NULL;
	state = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	old = MemoryContextSwitchTo(mcxt);
	state = pstrdup(state);
	MemoryContextSwitchTo(old);
	return state;
}

/*
 * settle_open_shards gives every non-final shard that no one is working on
 * the state the job's new state implies.  Shards held by a worker are
 * settled by that worker at its next page boundary.
 */
static void
settle_open_shards(int64 job_id, const char *job_state)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(job_id)};
	SPITupleTable *tuptable;
	uint64		n;

	if (SPI_execute_with_args("SELECT shard FROM dsmapper.shard"
							  " WHERE job_id OPERATOR(pg_catalog.=) $1"
							  " AND state OPERATOR(pg_catalog.=) ANY ('{starting,running,paused}'::text[])"
							  " ORDER BY shard",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read shards");
	tuptable = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		bool		isnull;
		int32		shard = DatumGetInt32(SPI_getbinval(tuptable->vals[i],
														tuptable->tupdesc, 1, &isnull));

		if (dsm_lock_task(job_id, shard, false, false))
			dsm_settle_shard(job_id, shard, job_state);
	}
}

/*
 * dsmapper_abort(job bigint) returns the job's state after the call.
 */
Datum
dsmapper_abort(PG_FUNCTION_ARGS)
{
	int64		job_id;
	DsmJob	   *job;
	DsmIdentity internal;
	char	   *state;
	MemoryContext cxt = CurrentMemoryContext;

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);

	SPI_connect();
	job = load_job_for_control(job_id, "abort", cxt);
	dsm_enter_internal(&internal);

	if (strcmp(job->state, "starting") == 0)
	{
		Oid			types[1] = {INT8OID};
		Datum		values[1] = {Int64GetDatum(job_id)};

		dsm_spi_exec("DELETE FROM dsmapper.queue WHERE job_id OPERATOR(pg_catalog.=) $1",
					 1, types, values, SPI_OK_DELETE);
		dsm_set_job_state(job_id, "aborted", NULL);
	}
	else if (!dsm_is_final_job_state(job->state))
	{
		bool		has_shards;
		Oid			types[1] = {INT8OID};
		Datum		values[1] = {Int64GetDatum(job_id)};

		if (strcmp(job->state, "aborting") != 0)
			dsm_set_job_state(job_id, "aborting", NULL);
		settle_open_shards(job_id, "aborting");
		(void) dsm_spi_int64("SELECT 1 FROM dsmapper.shard"
							 " WHERE job_id OPERATOR(pg_catalog.=) $1 LIMIT 1",
							 1, types, values, &has_shards);
		if (has_shards)
		{
			dsm_rollup_job(job_id);
			dsm_cancel_job_pages_at_commit(job_id);
		}
		else
		{
			dsm_spi_exec("DELETE FROM dsmapper.queue WHERE job_id OPERATOR(pg_catalog.=) $1",
						 1, types, values, SPI_OK_DELETE);
			dsm_set_job_state(job_id, "aborted", NULL);
		}
		dsm_request_wakeup_at_commit();
	}
	state = current_state(job_id, cxt);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_TEXT_P(cstring_to_text(state));
}

/*
 * dsmapper_pause(job bigint) returns the job's state after the call.
 */
Datum
dsmapper_pause(PG_FUNCTION_ARGS)
{
	int64		job_id;
	DsmJob	   *job;
	DsmIdentity internal;
	char	   *state;
	MemoryContext cxt = CurrentMemoryContext;

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);

	SPI_connect();
	job = load_job_for_control(job_id, "pause", cxt);
	if (strcmp(job->state, "running") != 0 && strcmp(job->state, "starting") != 0 &&
		strcmp(job->state, "paused") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot pause job " INT64_FORMAT " because it is %s",
						job_id, job->state),
				 errdetail("Only a starting or running job can be paused.")));

	dsm_enter_internal(&internal);
	if (strcmp(job->state, "paused") != 0)
	{
		dsm_set_job_state(job_id, "paused", NULL);
		settle_open_shards(job_id, "paused");
		/* Workers sleeping between pages of the job look again. */
		dsm_request_wakeup_at_commit();
	}
	state = current_state(job_id, cxt);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_TEXT_P(cstring_to_text(state));
}

/*
 * requeue_shards puts shards in the given states back to work and queues
 * them.  A paused or retried job whose split never happened gets its split
 * task back instead.  Returns the job's new state.
 */
static const char *
requeue_shards(int64 job_id, const char *states, bool reset_errors)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(job_id)};
	bool		has_shards;

	(void) dsm_spi_int64("SELECT 1 FROM dsmapper.shard"
						 " WHERE job_id OPERATOR(pg_catalog.=) $1 LIMIT 1",
						 1, types, values, &has_shards);
	if (!has_shards)
	{
		dsm_spi_exec("INSERT INTO dsmapper.queue (job_id, shard) VALUES ($1, -1)"
					 " ON CONFLICT DO NOTHING",
					 1, types, values, SPI_OK_INSERT);
		return "starting";
	}

	dsm_spi_exec(psprintf("UPDATE dsmapper.shard SET"
						  " state = CASE WHEN started IS NULL THEN 'starting' ELSE 'running' END,"
						  "%s updated = pg_catalog.clock_timestamp()"
						  " WHERE job_id OPERATOR(pg_catalog.=) $1"
						  " AND state OPERATOR(pg_catalog.=) ANY ('%s'::text[])",
						  reset_errors ? " attempts = 0, error = NULL, error_sqlstate = NULL,"
						  " error_first_key = NULL, error_last_key = NULL," : "",
						  states),
				 1, types, values, SPI_OK_UPDATE);
	dsm_spi_exec("INSERT INTO dsmapper.queue (job_id, shard)"
				 " SELECT job_id, shard FROM dsmapper.shard"
				 " WHERE job_id OPERATOR(pg_catalog.=) $1"
				 " AND state OPERATOR(pg_catalog.=) ANY ('{starting,running}'::text[])"
				 " ON CONFLICT (job_id, shard) DO UPDATE SET ready_at = pg_catalog.clock_timestamp()",
				 1, types, values, SPI_OK_INSERT);
	return "running";
}

/*
 * dsmapper_resume(job bigint) returns the job's state after the call.
 */
Datum
dsmapper_resume(PG_FUNCTION_ARGS)
{
	int64		job_id;
	DsmJob	   *job;
	DsmIdentity internal;
	char	   *state;
	MemoryContext cxt = CurrentMemoryContext;

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);

	SPI_connect();
	job = load_job_for_control(job_id, "resume", cxt);
	if (strcmp(job->state, "paused") != 0 && strcmp(job->state, "running") != 0 &&
		strcmp(job->state, "starting") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot resume job " INT64_FORMAT " because it is %s",
						job_id, job->state),
				 errdetail("Only a paused job can be resumed."),
				 dsm_is_final_job_state(job->state) ?
				 errhint("Use dsmapper_retry() to reopen failed or aborted shards.") : 0));

	dsm_enter_internal(&internal);
	if (strcmp(job->state, "paused") == 0)
	{
		const char *new_state = requeue_shards(job_id, "{paused}", false);

		dsm_set_job_state(job_id, new_state, NULL);
		dsm_request_wakeup_at_commit();
	}
	state = current_state(job_id, cxt);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_TEXT_P(cstring_to_text(state));
}

/*
 * dsmapper_retry(job bigint) reopens the failed and aborted shards of a
 * final job from their checkpoints.  Returns the state after the call.
 */
Datum
dsmapper_retry(PG_FUNCTION_ARGS)
{
	int64		job_id;
	DsmJob	   *job;
	DsmIdentity internal;
	char	   *state;
	MemoryContext cxt = CurrentMemoryContext;

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);

	SPI_connect();
	job = load_job_for_control(job_id, "retry", cxt);
	if (strcmp(job->state, "failed") != 0 && strcmp(job->state, "aborted") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot retry job " INT64_FORMAT " because it is %s",
						job_id, job->state),
				 errdetail("Only a failed or aborted job can be retried.")));

	dsm_enter_internal(&internal);
	{
		const char *new_state = requeue_shards(job_id, "{failed,aborted}", true);
		Oid			types[1] = {INT8OID};
		Datum		values[1] = {Int64GetDatum(job_id)};

		dsm_set_job_state(job_id, new_state, NULL);
		/*
		 * A retry picks up the mapper id's current function: the way to
		 * run a fixed function is to register it and retry.
		 */
		dsm_spi_exec("UPDATE dsmapper.job j SET error = NULL, finished = NULL,"
					 " fn = coalesce((SELECT m.fn FROM dsmapper.mapper m"
					 "   WHERE m.mapper OPERATOR(pg_catalog.=) j.mapper), j.fn)"
					 " WHERE j.job_id OPERATOR(pg_catalog.=) $1",
					 1, types, values, SPI_OK_UPDATE);
		dsm_request_wakeup_at_commit();
	}
	state = current_state(job_id, cxt);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_TEXT_P(cstring_to_text(state));
}

#define DSM_PROGRESS_EVERY_MS 2000

/*
 * progress_notice reports a job's progress as a NOTICE, for a live display
 * in psql.  SPI connected, internal identity.
 */
static void
progress_notice(int64 job_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(job_id)};
	HeapTuple	t;
	TupleDesc	d;

	if (SPI_execute_with_args("SELECT state, processed, expected,"
							  " coalesce(progress::text || '%', 'unknown'),"
							  " coalesce(rate::text, '0'),"
							  " coalesce(to_char(eta, 'YYYY-MM-DD HH24:MI:SS TZ'), 'unknown'),"
							  " shards_done, shards"
							  " FROM dsmapper.jobs WHERE job_id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT ||
		SPI_processed != 1)
		return;
	t = SPI_tuptable->vals[0];
	d = SPI_tuptable->tupdesc;
	ereport(NOTICE,
			(errmsg("job " INT64_FORMAT " %s: %s done, %s of %s rows, %s/%s shards, %s rows/s, ETA %s",
					job_id, SPI_getvalue(t, d, 1), SPI_getvalue(t, d, 4),
					SPI_getvalue(t, d, 2),
					SPI_getvalue(t, d, 3) ? SPI_getvalue(t, d, 3) : "?",
					SPI_getvalue(t, d, 7), SPI_getvalue(t, d, 8),
					SPI_getvalue(t, d, 5), SPI_getvalue(t, d, 6))));
}

/*
 * wait_for_job: the body of dsmapper_wait() and dsmapper_await().  Blocks
 * until the job is final or the timeout passes and returns its state;
 * cancellable.  With nonatomic (a CALL outside a transaction block) it
 * commits before every sleep, so the session holds no snapshot meanwhile.
 */
static char *
wait_for_job(FunctionCallInfo fcinfo, const char *caller, bool nonatomic)
{
	int64		job_id;
	TimestampTz deadline = 0;
	DsmIdentity internal;
	char	   *state = NULL;
	Oid			owner;
	bool		found;
	MemoryContext cxt = CurrentMemoryContext;
	bool		report_progress = false;
	TimestampTz last_report = 0;

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);
	if (PG_NARGS() > 2 && !PG_ARGISNULL(2))
		report_progress = PG_GETARG_BOOL(2);
	if (!PG_ARGISNULL(1))
	{
		Interval   *timeout = PG_GETARG_INTERVAL_P(1);
		int64		usecs;

		usecs = timeout->time +
				(int64) timeout->day * USECS_PER_DAY +
				(int64) timeout->month * DAYS_PER_MONTH * USECS_PER_DAY;
		if (usecs < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("timeout must not be negative")));
		deadline = GetCurrentTimestamp() + Min(usecs, PG_INT64_MAX / 4);
	}
	require_read_committed(caller);

	SPI_connect_ext(nonatomic ? SPI_OPT_NONATOMIC : 0);
	dsm_enter_internal(&internal);
	{
		Oid			types[1] = {INT8OID};
		Datum		values[1] = {Int64GetDatum(job_id)};

		owner = (Oid) dsm_spi_int64("SELECT owner::int8 FROM dsmapper.job"
									" WHERE job_id OPERATOR(pg_catalog.=) $1",
									1, types, values, &found);

		/*
		 * A job launched or steered by this very transaction cannot move
		 * until it commits: waiting would only run into the timeout.
		 */
		if (found &&
			SPI_execute_with_args("SELECT xmin FROM dsmapper.job"
								  " WHERE job_id OPERATOR(pg_catalog.=) $1"
								  " AND state OPERATOR(pg_catalog.<>) ALL ('{succeeded,failed,aborted}'::text[])",
								  1, types, values, NULL, false, 0) == SPI_OK_SELECT &&
			SPI_processed == 1)
		{
			bool		isnull;
			TransactionId xmin = DatumGetTransactionId(SPI_getbinval(SPI_tuptable->vals[0],
																	 SPI_tuptable->tupdesc,
																	 1, &isnull));

			if (TransactionIdIsCurrentTransactionId(xmin))
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("job " INT64_FORMAT " was launched or changed in the current transaction",
								job_id),
						 errdetail("Workers cannot see the change before the transaction commits."),
						 errhint("Commit first, then wait for the job.")));
		}
	}
	dsm_leave(&internal);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("job " INT64_FORMAT " does not exist", job_id)));
	if (!may_see(owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to wait for job " INT64_FORMAT, job_id)));

	if (dsm_shared != NULL)
		ConditionVariablePrepareToSleep(&dsm_shared->job_state_cv);
	for (;;)
	{
		long		sleep_ms = 1000;

		CHECK_FOR_INTERRUPTS();
		dsm_enter_internal(&internal);
		state = current_state(job_id, cxt);
		if (report_progress && state != NULL &&
			(dsm_is_final_job_state(state) ||
			 TimestampDifferenceExceeds(last_report, GetCurrentTimestamp(),
										DSM_PROGRESS_EVERY_MS)))
		{
			progress_notice(job_id);
			last_report = GetCurrentTimestamp();
		}
		dsm_leave(&internal);
		if (state == NULL || dsm_is_final_job_state(state))
			break;
		if (deadline != 0)
		{
			TimestampTz now = GetCurrentTimestamp();

			if (now >= deadline)
				break;
			sleep_ms = Min(sleep_ms, TimestampDifferenceMilliseconds(now, deadline) + 1);
		}

		/*
		 * Called by CALL outside a transaction block, end the transaction
		 * before sleeping: the check above left a portal snapshot behind,
		 * and holding none while waiting lets VACUUM and HOT pruning go on.
		 */
		if (nonatomic)
			SPI_commit();

		if (dsm_shared != NULL)
			(void) ConditionVariableTimedSleep(&dsm_shared->job_state_cv,
											   sleep_ms, PG_WAIT_EXTENSION);
		else
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Min(sleep_ms, 100), PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
	}
	if (dsm_shared != NULL)
		ConditionVariableCancelSleep();
	SPI_finish();

	if (state == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("job " INT64_FORMAT " does not exist", job_id)));
	return state;
}

/*
 * dsmapper_wait(job bigint, timeout interval, progress boolean) blocks
 * until the job is final or the timeout passes, and returns its state.
 */
Datum
dsmapper_wait(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(wait_for_job(fcinfo, "dsmapper_wait()", false)));
}

/*
 * dsmapper_await: the procedure form, CALL dsmapper_await(job, timeout,
 * progress).  Outside a transaction block it commits between checks, so
 * the waiting session holds no snapshot; its INOUT "state" receives the
 * job's state.
 */
Datum
dsmapper_await(PG_FUNCTION_ARGS)
{
	bool		nonatomic = fcinfo->context != NULL &&
		IsA(fcinfo->context, CallContext) &&
		!castNode(CallContext, fcinfo->context)->atomic;

	char	   *state = wait_for_job(fcinfo, "dsmapper_await()", nonatomic);
	TupleDesc	tupdesc;
	Datum		values[1];
	bool		nulls[1] = {false};

	/* A procedure with output parameters returns them as one record. */
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "dsmapper_await must be declared with an INOUT parameter");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = CStringGetTextDatum(state);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

Datum
dsmapper_current_job(PG_FUNCTION_ARGS)
{
	if (dsm_current_job_id == 0)
		PG_RETURN_NULL();
	PG_RETURN_INT64(dsm_current_job_id);
}

Datum
dsmapper_current_shard(PG_FUNCTION_ARGS)
{
	if (dsm_current_shard_index < 0)
		PG_RETURN_NULL();
	PG_RETURN_INT32(dsm_current_shard_index);
}

/*
 * dsmapper_run(max_duration interval) processes queued work of this
 * database in the calling session until nothing is ready or max_duration
 * has passed, and returns the number of pages mapped.  It always runs at
 * least one task when one is ready.  It processes only jobs that the
 * caller may control (all jobs for a superuser).  Each page is a
 * subtransaction; all of them become durable when the caller commits.
 */
Datum
dsmapper_run(PG_FUNCTION_ARGS)
{
	Interval   *max_duration;
	TimestampTz deadline;
	volatile int64 pages = 0;
	Oid			caller = GetUserId();

	require_arg(fcinfo, 0, "max_duration");
	max_duration = PG_GETARG_INTERVAL_P(0);
	if (max_duration->month != 0 ||
		max_duration->time + (int64) max_duration->day * USECS_PER_DAY <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_duration must be positive"),
				 errhint("Use a value such as '1 minute'; months are not allowed.")));
	require_read_committed("dsmapper_run()");

	/* A standby replays the primary's queue; nothing runs here. */
	if (RecoveryInProgress())
	{
		ereport(DEBUG1,
				(errmsg_internal("dsmapper_run: recovery in progress, nothing to run")));
		PG_RETURN_INT64(0);
	}

	deadline = GetCurrentTimestamp() + max_duration->time +
		(int64) max_duration->day * USECS_PER_DAY;

	/* At least one task per call, like a turn maps at least one page. */
	do
	{
		DsmTask		task;
		int			ready_count;
		TimestampTz next_ready;
		bool		claimed;
		DsmIdentity internal;

		CHECK_FOR_INTERRUPTS();
		SPI_connect();
		dsm_enter_internal(&internal);
		claimed = dsm_claim_task(&task, &ready_count, &next_ready, caller);
		dsm_leave(&internal);
		SPI_finish();
		if (!claimed)
			break;

		/*
		 * The pages of this session become visible only when the caller
		 * commits, so nobody else may claim the task before then: hold its
		 * claim lock at transaction level too (the session-level claim is
		 * released after the turn as usual).
		 */
		(void) dsm_lock_task(task.job_id, task.shard, false, false);

		PG_TRY();
		{
			dsm_session_runner = caller;
			pages += dsm_run_task(&task, true, deadline);
		}
		PG_FINALLY();
		{
			dsm_session_runner = InvalidOid;
			dsm_release_task(&task);
		}
		PG_END_TRY();
	} while (GetCurrentTimestamp() < deadline);

	PG_RETURN_INT64(pages);
}

/*
 * dsmapper_tune(job, page_size, max_running_shards, rows_per_second,
 *				 page_delay, target_page_time) changes how a job runs; NULL
 * leaves a setting as it is, zero turns a limit off.  Workers read the
 * settings before every page.  Returns the settings after the call.
 */
Datum
dsmapper_tune(PG_FUNCTION_ARGS)
{
	int64		job_id;
	DsmIdentity internal;
	MemoryContext cxt = CurrentMemoryContext;
	Oid			types[6] = {INT8OID, INT4OID, INT4OID, FLOAT8OID, INTERVALOID,
	INTERVALOID};
	Datum		values[6];
	char		nulls[6];
	Datum		result;
	bool		isnull;

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);

	memset(nulls, ' ', sizeof(nulls));
	values[0] = Int64GetDatum(job_id);
	for (int i = 1; i < 6; i++)
	{
		if (PG_ARGISNULL(i))
		{
			nulls[i] = 'n';
			values[i] = (Datum) 0;
		}
		else
			values[i] = PG_GETARG_DATUM(i);
	}

	if (!PG_ARGISNULL(1))
		check_int_range("page_size", PG_GETARG_INT32(1), 1, DSM_MAX_PAGE_SIZE);
	if (!PG_ARGISNULL(2))
		check_int_range("max_running_shards", PG_GETARG_INT32(2), 0, DSM_MAX_SHARDS);
	if (!PG_ARGISNULL(3) &&
		!(PG_GETARG_FLOAT8(3) >= 0 && PG_GETARG_FLOAT8(3) <= 1e12))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rows_per_second must be between 0 and 1e12"),
				 errhint("Zero removes the limit.")));
	/* A worker sleeps at most a minute between two pages of a shard. */
	for (int i = 4; i <= 5; i++)
	{
		if (!PG_ARGISNULL(i))
		{
			Interval   *iv = PG_GETARG_INTERVAL_P(i);

			if (iv->month != 0 || iv->day != 0 || iv->time < 0 ||
				iv->time > INT64CONST(60000000) * (i == 4 ? 1 : 60))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("%s must be between 0 and %s",
								i == 4 ? "page_delay" : "target_page_time",
								i == 4 ? "1 minute" : "1 hour"),
						 errhint("Zero turns it off.")));
		}
	}

	SPI_connect();
	(void) load_job_for_control(job_id, "tune", cxt);
	dsm_enter_internal(&internal);
	if (SPI_execute_with_args(
			"UPDATE dsmapper.job SET"
			" page_size = coalesce($2, page_size),"
			" max_running_shards = CASE WHEN $3 IS NULL THEN max_running_shards"
			"   WHEN $3 OPERATOR(pg_catalog.=) 0 THEN NULL ELSE $3 END,"
			" rows_per_second = CASE WHEN $4 IS NULL THEN rows_per_second"
			"   WHEN $4 OPERATOR(pg_catalog.=) 0 THEN NULL ELSE $4 END,"
			" page_delay = CASE WHEN $5 IS NULL THEN page_delay"
			"   WHEN $5 OPERATOR(pg_catalog.=) '0' THEN NULL ELSE $5 END,"
			" target_page_time = CASE WHEN $6 IS NULL THEN target_page_time"
			"   WHEN $6 OPERATOR(pg_catalog.=) '0' THEN NULL ELSE $6 END,"
			" updated = pg_catalog.clock_timestamp()"
			" WHERE job_id OPERATOR(pg_catalog.=) $1"
			" RETURNING pg_catalog.jsonb_build_object("
			"   'page_size', page_size,"
			"   'max_running_shards', max_running_shards,"
			"   'rows_per_second', rows_per_second,"
			"   'page_delay', page_delay,"
			"   'target_page_time', target_page_time)",
			6, types, values, nulls, false, 0) != SPI_OK_UPDATE_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "dsmapper: could not tune job " INT64_FORMAT, job_id);
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	result = SPI_datumTransfer(result, false, -1);
	dsm_leave(&internal);
	SPI_finish();

	/* A raised cap may let waiting shards run. */
	dsm_request_wakeup_at_commit();
	PG_RETURN_DATUM(result);
}

/*
 * dsmapper_forget(job bigint) removes a finished job with its shards.
 */
Datum
dsmapper_forget(PG_FUNCTION_ARGS)
{
	int64		job_id;
	DsmJob	   *job;
	DsmIdentity internal;
	MemoryContext cxt = CurrentMemoryContext;
	Oid			types[1] = {INT8OID};
	Datum		values[1];

	require_arg(fcinfo, 0, "job");
	job_id = PG_GETARG_INT64(0);
	values[0] = Int64GetDatum(job_id);

	SPI_connect();
	job = load_job_for_control(job_id, "forget", cxt);
	if (!dsm_is_final_job_state(job->state))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot forget job " INT64_FORMAT " because it is %s",
						job_id, job->state),
				 errdetail("Only a succeeded, failed or aborted job can be removed."),
				 errhint("Abort the job first.")));
	dsm_enter_internal(&internal);
	dsm_spi_exec("DELETE FROM dsmapper.job WHERE job_id OPERATOR(pg_catalog.=) $1",
				 1, types, values, SPI_OK_DELETE);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_BOOL(true);
}
