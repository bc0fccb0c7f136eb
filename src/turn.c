/*-------------------------------------------------------------------------
 *
 * turn.c
 *		One turn of a task: split a job, or map pages of one shard.
 *
 * A turn runs with the task's claim lock held (queue.c).  Each page is one
 * transaction (in a worker) or one subtransaction (in dsmapper_run, inside
 * the caller's transaction):
 *
 *	1. read the job's state; stop at this page boundary unless running;
 *	2. as the owner, read the next page of keys above the checkpoint;
 *	3. as the owner, call the mapper with the keys (or rows) and params;
 *	4. write the new checkpoint and the row count;
 *	5. commit, so the mapper's effects and the checkpoint are atomic.
 *
 * An error rolls the page back.  Transient errors (SQLSTATE classes 40, 53,
 * 08, and 55P03, 57014) put the shard back in the queue after a backoff;
 * any other error, or too many attempts, fails the shard.  Either way the
 * error is recorded in dsmapper.shard, with the page's first and last key.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "common/pg_prng.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "parser/parse_coerce.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "postmaster/interrupt.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

int64		dsm_current_job_id = 0;
int32		dsm_current_shard_index = -1;

/* Statements prepared once per turn (TurnState.plans). */
#define PLAN_JOB_STATE		0
#define PLAN_CHECKPOINT		1
#define PLAN_PAGE			2	/* + 0: no lower bound, 1: >=, 2: > */
#define TURN_PLANS			5

/* State of one turn, allocated in its own memory context. */
typedef struct TurnState
{
	MemoryContext cxt;
	bool		in_session;
	MemoryContext caller_cxt;	/* session mode: restore after subxacts */
	ResourceOwner caller_owner;
	int64		job_id;
	int32		shard;
	DsmJob	   *job;
	DsmKey	   *key;
	FmgrInfo	flinfo;
	Oid			fn_oid;
	Oid			elem_type;
	int16		elem_len;
	bool		elem_byval;
	char		elem_align;
	Datum		params;
	char	   *select_list;	/* key columns [, what the mapper gets] */
	int			mapper_column;	/* the page column the mapper gets */
	char	   *from_clause;	/* quoted relation and alias */
	List	   *range_end;		/* text per key column, NIL: unbounded */
	List	   *resume;			/* last committed key, or range_start */
	bool		resume_inclusive;	/* resume is range_start: k >= resume */
	char	   *first_key;		/* of the current page, for errors */
	char	   *last_key;
	MemoryContext page_cxt;		/* reset before every page */
	SPIPlanPtr	plans[TURN_PLANS];	/* prepared once per turn */
	int			plan_limits[TURN_PLANS];	/* LIMIT of a page statement */
	int			page_plan_options;	/* cursor options of the page query */

	/* Tuning, read again before every page (dsmapper_tune). */
	int32		running_slot;	/* our max_running_shards slot, or -1 */
	int			page_limit;		/* keys asked for by the current page */
	int			adaptive_size;	/* page size chosen by target_page_time */
	int			max_running;	/* 0: no cap */
	double		rows_per_second;	/* 0: no limit */
	int64		page_delay_ms;
	int64		target_page_ms; /* 0: fixed page size */
	int			shards_in_turn;
	int			shards_waiting; /* of the job, ready and not in a turn */
	int64		shard_expected; /* rows (or more if mapped), 0: unknown */
	int64		turn_rows;		/* rows mapped in this turn */
	bool		stop_turn;		/* end the turn after this page */
	bool		abandoned;		/* canceled by DROP EXTENSION: no bookkeeping */
	uint64		generation;		/* the database's, before the page read */
} TurnState;

/*
 * Transactions of a turn.  In a worker each page is a transaction of its
 * own; in a session it is a subtransaction that the caller's commit makes
 * durable.
 */
static void
page_begin(TurnState *ts)
{
	if (ts->in_session)
		BeginInternalSubTransaction(NULL);
	else
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
	}
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "dsmapper: SPI_connect failed");
}

/*
 * page_commit ends a page.  In a worker the commit itself runs as the job's
 * owner: user code can leave work for commit time, deferred triggers and
 * WITH HOLD cursors, and PostgreSQL runs it as whoever is the current user
 * then, which would otherwise be the worker's superuser.  (In a session the
 * caller's own commit runs it, as the caller; code of other roles runs
 * there as a security-restricted operation, which refuses both.)
 */
static void
page_commit(TurnState *ts)
{
	SPI_finish();
	PopActiveSnapshot();
	if (ts->in_session)
	{
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(ts->caller_cxt);
		CurrentResourceOwner = ts->caller_owner;
	}
	else if (ts->job != NULL &&
			 SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(ts->job->owner)))
	{
		DsmIdentity owner;

		/* The commit pops the GUC nest level; only the role is restored. */
		dsm_enter_owner(&owner, ts->job->owner, ts->job->search_path);
		CommitTransactionCommand();
		SetUserIdAndSecContext(owner.saved_userid, owner.saved_sec_context);
	}
	else
		CommitTransactionCommand();
	MemoryContextSwitchTo(ts->cxt);
}

/*
 * page_abort rolls back the current page after an error was caught and
 * returns the error, copied into the turn's context.
 */
static ErrorData *
page_abort(TurnState *ts)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(ts->cxt);
	edata = CopyErrorData();
	FlushErrorState();

	dsm_current_job_id = 0;
	dsm_current_shard_index = -1;

	if (ts->in_session)
	{
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(ts->caller_cxt);
		CurrentResourceOwner = ts->caller_owner;
	}
	else
		AbortCurrentTransaction();
	MemoryContextSwitchTo(ts->cxt);
	return edata;
}

/*
 * abandon_for_drop tells, after a page was rolled back, whether the error
 * was the cancel of a DROP EXTENSION dsmapper under way in this database
 * (dropping: dsm_extension_being_dropped, asked before the rollback let the
 * command go on):
 * then the turn ends without writing anything (see
 * dsm_extension_being_dropped), and the extension's own removal settles
 * the rest.
 */
static bool
abandon_for_drop(TurnState *ts, ErrorData *edata, bool dropping)
{
	if (!ts->in_session && edata->sqlerrcode == ERRCODE_QUERY_CANCELED && dropping)
		ts->abandoned = true;
	return ts->abandoned;
}

/*
 * is_transient_error tells whether an error should be retried: the
 * SQLSTATE classes 40 (transaction rollback), 53 (insufficient
 * resources), 08 (connection), and lock_not_available, query_canceled.
 */
static bool
is_transient_error(int sqlerrcode)
{
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_TRANSACTION_ROLLBACK:
		case ERRCODE_INSUFFICIENT_RESOURCES:
		case ERRCODE_CONNECTION_EXCEPTION:
			return true;
		default:
			break;
	}
	return sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE ||
		sqlerrcode == ERRCODE_QUERY_CANCELED;
}

/*
 * backoff_ms is the delay before attempt number attempts + 1: about 1 s,
 * doubling, capped at 5 minutes, with +-25% jitter.
 */
static int64
backoff_ms(int attempts)
{
	double		delay = 1000.0;

	for (int i = 1; i < attempts && delay < 300000.0; i++)
		delay *= 2;
	delay = Min(delay, 300000.0);
	return (int64) (delay * (0.75 + 0.5 * pg_prng_double(&pg_global_prng_state)));
}

/*
 * schedule_retry makes a queued task ready again after delay_ms.  SPI
 * connected, internal identity.
 */
static void
schedule_retry(int64 job_id, int32 shard, int64 delay_ms)
{
	Oid			types[3] = {INT8OID, INT4OID, INT8OID};
	Datum		values[3] = {Int64GetDatum(job_id), Int32GetDatum(shard),
	Int64GetDatum(delay_ms)};

	dsm_spi_exec("UPDATE dsmapper.queue SET ready_at ="
				 " pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)"
				 " pg_catalog.make_interval(secs => $3 OPERATOR(pg_catalog./) 1000.0)"
				 " WHERE job_id OPERATOR(pg_catalog.=) $1"
				 " AND shard OPERATOR(pg_catalog.=) $2",
				 3, types, values, SPI_OK_UPDATE);
}

/*
 * record_failure stores a page's error on its shard, then either queues the
 * shard for a retry or fails it.  Runs in a transaction of its own.
 */
static void
record_failure(TurnState *ts, ErrorData *edata)
{
	bool		transient = is_transient_error(edata->sqlerrcode);
	const char *sqlstate = unpack_sql_state(edata->sqlerrcode);
	Oid			types[6] = {INT8OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	DsmIdentity internal;
	int			attempts;
	int			max_attempts = ts->job ? ts->job->max_attempts : 10;
	bool		found;
	bool		failed;

	values[0] = Int64GetDatum(ts->job_id);
	values[1] = Int32GetDatum(ts->shard);
	values[2] = CStringGetTextDatum(edata->message ? edata->message : "unknown error");
	values[3] = CStringGetTextDatum(sqlstate);
	if (ts->first_key)
		values[4] = CStringGetTextDatum(ts->first_key);
	else
		nulls[4] = 'n';
	if (ts->last_key)
		values[5] = CStringGetTextDatum(ts->last_key);
	else
		nulls[5] = 'n';

	page_begin(ts);
	dsm_enter_internal(&internal);

	/*
	 * A job that was paused or aborted meanwhile (abort cancels pages in
	 * flight) settles the shard instead: that failure is not the page's.
	 */
	{
		Oid			jtypes[1] = {INT8OID};
		Datum		jvalues[1] = {Int64GetDatum(ts->job_id)};
		char	   *state = NULL;

		if (SPI_execute_with_args("SELECT state FROM dsmapper.job"
								  " WHERE job_id OPERATOR(pg_catalog.=) $1",
								  1, jtypes, jvalues, NULL, false, 0) == SPI_OK_SELECT &&
			SPI_processed == 1)
			state = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		if (state == NULL || strcmp(state, "paused") == 0 ||
			strcmp(state, "aborting") == 0)
		{
			if (state != NULL)
				dsm_settle_shard(ts->job_id, ts->shard, state);
			dsm_leave(&internal);
			page_commit(ts);
			return;
		}
	}

	if (SPI_execute_with_args("UPDATE dsmapper.shard SET"
							  " attempts = attempts OPERATOR(pg_catalog.+) 1,"
							  " error = $3, error_sqlstate = $4,"
							  " error_first_key = $5, error_last_key = $6,"
							  " updated = pg_catalog.clock_timestamp()"
							  " WHERE job_id OPERATOR(pg_catalog.=) $1"
							  " AND shard OPERATOR(pg_catalog.=) $2"
							  " RETURNING attempts",
							  6, types, values, nulls, false, 0) != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "dsmapper: could not record a page failure");
	found = SPI_processed > 0;
	attempts = found ? DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
												   SPI_tuptable->tupdesc, 1,
												   &found)) : 0;

	failed = !transient || attempts >= max_attempts;
	if (failed)
		dsm_finish_shard(ts->job_id, ts->shard, "failed");
	else
		schedule_retry(ts->job_id, ts->shard, backoff_ms(attempts));

	dsm_leave(&internal);
	page_commit(ts);

	ereport(LOG,
			(errmsg("dsmapper job " INT64_FORMAT " shard %d %s: %s",
					ts->job_id, ts->shard,
					failed ? "failed" : "will retry a page",
					edata->message ? edata->message : "unknown error"),
			 errdetail("SQLSTATE %s, attempt %d of %d%s%s%s%s.%s%s",
					   sqlstate, attempts, max_attempts,
					   ts->first_key ? ", keys " : "",
					   ts->first_key ? ts->first_key : "",
					   ts->first_key ? " to " : "",
					   ts->last_key ? ts->last_key : "",
					   edata->detail ? " " : "",
					   edata->detail ? edata->detail : ""),
			 errhidestmt(true)));
}

/*
 * key_text renders a key as dsmapper.key_text() does: one column as is,
 * several as a row literal.
 */
static char *
key_text(List *strings)
{
	StringInfoData buf;
	ListCell   *lc;

	if (list_length(strings) == 1)
		return pstrdup(linitial(strings));
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '(');
	foreach(lc, strings)
	{
		const char *e = lfirst(lc);

		if (foreach_current_index(lc) > 0)
			appendStringInfoChar(&buf, ',');
		if (e[0] == '\0' || strpbrk(e, ",()\"\\ ") != NULL)
		{
			appendStringInfoChar(&buf, '"');
			for (const char *p = e; *p; p++)
			{
				if (*p == '"' || *p == '\\')
					appendStringInfoChar(&buf, '\\');
				appendStringInfoChar(&buf, *p);
			}
			appendStringInfoChar(&buf, '"');
		}
		else
			appendStringInfoString(&buf, e);
	}
	appendStringInfoChar(&buf, ')');
	return buf.data;
}

/*
 * check_owner_privileges fails the page unless the job's owner may still
 * read the table and call the function.  Checked by every page: a revoke
 * takes effect at the next page, not at the next turn.
 */
static void
check_owner_privileges(DsmJob *job, Oid fn)
{
	if (pg_class_aclcheck(job->relid, job->owner, ACL_SELECT) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("job owner %s no longer has SELECT privilege on relation \"%s\"",
						GetUserNameFromId(job->owner, true) ?
						GetUserNameFromId(job->owner, true) : "?",
						job->relation_name)));
	if (pg_proc_aclcheck(fn, job->owner, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("job owner %s no longer has EXECUTE privilege on the function of mapper \"%s\"",
						GetUserNameFromId(job->owner, true) ?
						GetUserNameFromId(job->owner, true) : "?",
						job->mapper)));
}

/*
 * check_mapper_binding fails the page when the mapper id is now bound to
 * another function than the one the job was launched with: a registrant
 * must not be able to swap the code that runs as someone else's job.
 */
static void
check_mapper_binding(DsmJob *job, Oid registered)
{
	if (registered != job->fn)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("mapper \"%s\" was bound to another function after job " INT64_FORMAT " was launched",
						job->mapper, job->job_id),
				 errdetail("The job calls only the function it was launched with, %s.",
						   format_procedure(job->fn)),
				 errhint("Retry the job with dsmapper_retry() to run the mapper's new function.")));
}

/*
 * resolve_mapper checks everything a turn depends on that may have vanished
 * or changed since launch, and prepares the turn's function call and query
 * text.  Internal identity, SPI connected.
 */
static void
resolve_mapper(TurnState *ts)
{
	DsmJob	   *job = ts->job;
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(job->mapper)};
	bool		found;
	Oid			fn;
	HeapTuple	proctup;
	Form_pg_proc proc;
	Relation	rel;
	MemoryContext old;
	ListCell   *lc;
	int			i;
	bool		cast = false;

	/* The owner, the mapper registration and its function. */
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(job->owner)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role of job owner (OID %u) no longer exists", job->owner)));

	fn = (Oid) dsm_spi_int64("SELECT fn::int8 FROM dsmapper.mapper"
							 " WHERE mapper OPERATOR(pg_catalog.=) $1",
							 1, types, values, &found);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("mapper \"%s\" is no longer registered", job->mapper)));
	check_mapper_binding(job, fn);
	fn = job->fn;

	proctup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(proctup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function of mapper \"%s\" no longer exists", job->mapper)));
	proc = (Form_pg_proc) GETSTRUCT(proctup);
	if (proc->pronargs != 2 || proc->proargtypes.values[1] != JSONBOID ||
		!OidIsValid(get_element_type(proc->proargtypes.values[0])))
	{
		ReleaseSysCache(proctup);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("function of mapper \"%s\" no longer has a mapper signature",
						job->mapper),
				 errhint("A mapper takes (an array of keys or rows, jsonb).")));
	}
	ts->elem_type = get_element_type(proc->proargtypes.values[0]);
	ReleaseSysCache(proctup);

	/* The relation and its primary key, unchanged since launch. */
	if (get_rel_name(job->relid) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"%s\" no longer exists", job->relation_name)));

	old = MemoryContextSwitchTo(ts->cxt);
	rel = table_open(job->relid, AccessShareLock);
	dsm_check_no_inheritance_children(rel);
	ts->key = dsm_primary_key(rel, true);

	/*
	 * The same columns, ordered the same way: shard bounds and checkpoints
	 * mean nothing under another type, collation or operator class.
	 */
	if (ts->key == NULL || ts->key->natts != list_length(job->key_columns) ||
		strcmp(dsm_key_signature(ts->key), job->key_signature) != 0)
	{
		table_close(rel, AccessShareLock);
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("primary key of relation \"%s\" changed since the job was launched",
						job->relation_name)));
	}
	i = 0;
	foreach(lc, job->key_columns)
	{
		if (strcmp(quote_identifier((char *) lfirst(lc)), ts->key->names[i++]) != 0)
		{
			table_close(rel, AccessShareLock);
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("primary key of relation \"%s\" changed since the job was launched",
							job->relation_name)));
		}
	}
	if (job->rows_mode ? ts->elem_type != rel->rd_rel->reltype
		: !dsm_key_fits_mapper(ts->key->typids[0], ts->elem_type, &cast))
	{
		table_close(rel, AccessShareLock);
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("function of mapper \"%s\" no longer accepts the %s of relation \"%s\"",
						job->mapper, job->rows_mode ? "rows" : "keys",
						job->relation_name)));
	}

	/*
	 * Without a filter the page query has one good plan, an ordered scan of
	 * the primary key index, whatever the bounds: plan it once per turn
	 * instead of once per page.  A filter may make the bounds matter (an
	 * index of its own, a selective range), so it keeps custom plans, and
	 * so does a partitioned table, whose plans prune by the bounds.
	 */
	ts->page_plan_options = CURSOR_OPT_PARALLEL_OK |
		(job->filter == NULL && rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE ?
		 CURSOR_OPT_GENERIC_PLAN : 0);
	table_close(rel, AccessShareLock);

	/* The owner may still read the table and call the function. */
	check_owner_privileges(job, fn);

	/* Prepare the call and the page query. */
	fmgr_info_cxt(fn, &ts->flinfo, ts->cxt);
	ts->fn_oid = fn;
	get_typlenbyvalalign(ts->elem_type, &ts->elem_len, &ts->elem_byval,
						 &ts->elem_align);
	ts->params = datumCopy(DirectFunctionCall1(jsonb_in,
											   CStringGetDatum(job->params)),
						   false, -1);

	/*
	 * The page query returns the key columns, then what the mapper gets
	 * when that is not the key itself: the whole row (rows mode), or the
	 * key cast to the mapper's element type.
	 */
	ts->select_list = dsm_key_list_sql(ts->key, ts->key->alias);
	ts->mapper_column = 1;
	if (job->rows_mode)
	{
		ts->select_list = psprintf("%s, %s", ts->select_list, ts->key->alias);
		ts->mapper_column = ts->key->natts + 1;
	}
	else if (cast)
	{
		ts->select_list = psprintf("%s, CAST(%s AS %s)", ts->select_list,
								   ts->select_list,
								   format_type_be_qualified(ts->elem_type));
		ts->mapper_column = 2;
	}
	ts->from_clause = psprintf("%s AS %s",
							   dsm_quoted_relation_name(job->relid), ts->key->alias);
	MemoryContextSwitchTo(old);
}

/*
 * bound_params appends "(cols) op ($n, ...)" to buf and the key's values to
 * the parameter arrays.  Internal identity; the text is read as the owner.
 */
static void
bound_params(TurnState *ts, StringInfo buf, const char *op, List *strings,
			 Oid *types, Datum *values, int *nargs)
{
	ListCell   *lc;
	DsmIdentity owner;

	appendStringInfo(buf, " AND %s",
					 dsm_key_compare_sql(ts->key, ts->key->alias, op, *nargs + 1));

	/*
	 * The input function of a domain key runs the domain's CHECK
	 * expressions, which are user code: run it as the owner.  The pinned
	 * DateStyle and friends of the internal identity stay in force, so the
	 * text reads back as it was written.
	 */
	dsm_enter_owner(&owner, ts->job->owner, ts->job->search_path);
	foreach(lc, strings)
	{
		int			c = foreach_current_index(lc);

		types[*nargs] = ts->key->typids[c];
		values[*nargs] = OidInputFunctionCall(ts->key->input_funcs[c],
											  (char *) lfirst(lc),
											  ts->key->typioparams[c], -1);
		(*nargs)++;
	}
	dsm_leave(&owner);
}

/*
 * A page of keys (or rows) collected straight from the executor into the
 * array the mapper receives, without materializing an SPI tuple table.
 */
typedef struct PageReceiver
{
	DestReceiver pub;
	TurnState  *ts;
	MemoryContext cxt;			/* where the values are copied to */
	Datum	   *elems;			/* the mapper's values, one per row */
	int			nelems;
	int			capacity;
	bool		keep_key;		/* a cast key: keep the first and last key */
	int16		key_len;
	bool		key_byval;
	Datum		first_key;
	Datum		last_key;
} PageReceiver;

/*
 * page_receiver_startup checks that the page's mapper column fits the
 * mapper's array element type.
 */
static void
page_receiver_startup(DestReceiver *self, int operation, TupleDesc desc)
{
	PageReceiver *r = (PageReceiver *) self;
	Oid			type = TupleDescAttr(desc, r->ts->mapper_column - 1)->atttypid;

	if (!IsBinaryCoercible(type, r->ts->elem_type))
		elog(ERROR, "dsmapper: page column of type %s does not fit the mapper's %s[]",
			 format_type_be(type), format_type_be(r->ts->elem_type));
}

/*
 * page_receiver_receive copies one row's mapper value into the page.
 */
static bool
page_receiver_receive(TupleTableSlot *slot, DestReceiver *self)
{
	PageReceiver *r = (PageReceiver *) self;
	TurnState  *ts = r->ts;
	MemoryContext old;
	bool		isnull;
	Datum		d = slot_getattr(slot, ts->mapper_column, &isnull);

	if (isnull)
		elog(ERROR, "dsmapper: page row without a key");
	old = MemoryContextSwitchTo(r->cxt);
	if (r->nelems == r->capacity)
	{
		r->capacity *= 2;
		r->elems = repalloc(r->elems, sizeof(Datum) * r->capacity);
	}
	r->elems[r->nelems++] = datumCopy(d, ts->elem_byval, ts->elem_len);

	/* The key itself, when the mapper gets it cast: the latest row's. */
	if (r->keep_key)
	{
		d = slot_getattr(slot, 1, &isnull);
		if (isnull)
			elog(ERROR, "dsmapper: page row without a key");
		if (r->nelems == 1)
			r->first_key = datumCopy(d, r->key_byval, r->key_len);
		else
		{
			if (!r->key_byval && r->nelems > 2)
				pfree(DatumGetPointer(r->last_key));
			r->last_key = datumCopy(d, r->key_byval, r->key_len);
		}
	}
	MemoryContextSwitchTo(old);
	return true;
}

static void
page_receiver_shutdown(DestReceiver *self)
{
}

static void
page_receiver_destroy(DestReceiver *self)
{
}

/*
 * page_key_strings returns the key of the page's first or last row as
 * text, one element per column: the mapper's value itself in keys mode,
 * the key kept aside when the mapper gets it cast, the key columns of the
 * row in rows mode.  Internal identity.
 */
static List *
page_key_strings(TurnState *ts, PageReceiver *page, bool last)
{
	List	   *result = NIL;
	int			i = last ? page->nelems - 1 : 0;

	for (int c = 0; c < ts->key->natts; c++)
	{
		bool		isnull = false;
		Datum		d = page->elems[i];

		if (page->keep_key)
			d = last && page->nelems > 1 ? page->last_key : page->first_key;
		else if (ts->job->rows_mode)
			d = GetAttributeByNum(DatumGetHeapTupleHeader(d),
								  ts->key->attnums[c], &isnull);
		if (isnull)
			elog(ERROR, "dsmapper: page row without a key");
		result = lappend(result, OidOutputFunctionCall(ts->key->output_funcs[c], d));
	}
	return result;
}

/*
 * turn_plan returns a statement prepared for this turn, preparing it on
 * first use under the current identity.  Saved plans survive the page
 * transactions; the plan cache replans them when the catalog changes.
 */
static SPIPlanPtr
turn_plan(TurnState *ts, int which, const char *sql, int nargs, Oid *types,
		  int cursor_options)
{
	if (ts->plans[which] == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, types, cursor_options);

		if (plan == NULL)
			elog(ERROR, "dsmapper: could not prepare \"%s\": %s", sql,
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "dsmapper: could not keep a plan");
		ts->plans[which] = plan;
	}
	return ts->plans[which];
}

/*
 * free_turn_plans releases the turn's prepared statements.
 */
static void
free_turn_plans(TurnState *ts)
{
	for (int i = 0; i < TURN_PLANS; i++)
	{
		if (ts->plans[i] != NULL)
			SPI_freeplan(ts->plans[i]);
		ts->plans[i] = NULL;
	}
}

/*
 * map_page runs steps 1 to 4 of a page (see the file header).  Returns the
 * number of rows mapped; *done is set when the shard has no further page or
 * the turn must stop because the job is no longer running.  Inside the
 * page's transaction, SPI connected, internal identity.
 */
static int64
map_page(TurnState *ts, bool *done)
{
	DsmJob	   *job = ts->job;
	Oid			types[2 * INDEX_MAX_KEYS + 1];
	Datum		values[2 * INDEX_MAX_KEYS + 1];
	int			nargs = 0;
	StringInfoData sql;
	DsmIdentity owner;
	Oid			jtypes[2] = {INT8OID, BOOLOID};
	Datum		jvalues[2];
	char	   *state;
	int			rc;
	uint64		n;
	PageReceiver page;
	ParamListInfo params;
	SPIExecuteOptions options;
	int			which;
	List	   *last = NIL;

	/*
	 * 1. Is the job still running, and how is it tuned now?  Once the turn
	 * has mapped a quarter of its shard, also: do other shards wait?
	 */
	jvalues[0] = Int64GetDatum(ts->job_id);
	jvalues[1] = BoolGetDatum(ts->shard_expected > 0 &&
							  ts->turn_rows * 4 >= ts->shard_expected);
	rc = SPI_execute_plan(turn_plan(ts, PLAN_JOB_STATE,
									"SELECT j.state, j.page_size,"
									" coalesce(j.max_running_shards, 0),"
									" coalesce(j.rows_per_second, 0),"
									" coalesce(extract(epoch FROM j.page_delay) * 1000, 0)::int8,"
									" coalesce(extract(epoch FROM j.target_page_time) * 1000, 0)::int8,"
									" (SELECT count(*) FROM dsmapper.shard s"
									"   WHERE s.job_id OPERATOR(pg_catalog.=) j.job_id AND s.in_turn)::int4,"
									" (SELECT m.fn FROM dsmapper.mapper m"
									"   WHERE m.mapper OPERATOR(pg_catalog.=) j.mapper),"
									" CASE WHEN $2 THEN (SELECT count(*) FROM dsmapper.queue q"
									"   JOIN dsmapper.shard s ON s.job_id OPERATOR(pg_catalog.=) q.job_id"
									"    AND s.shard OPERATOR(pg_catalog.=) q.shard"
									"   WHERE q.job_id OPERATOR(pg_catalog.=) j.job_id AND NOT s.in_turn"
									"   AND q.ready_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp())::int4"
									" ELSE 0 END"
									" FROM dsmapper.job j"
									" WHERE j.job_id OPERATOR(pg_catalog.=) $1",
									2, jtypes, CURSOR_OPT_PARALLEL_OK),
						  jvalues, NULL, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
	{
		*done = true;
		return 0;
	}
	state = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (strcmp(state, "running") != 0)
	{
		if (strcmp(state, "paused") == 0 || strcmp(state, "aborting") == 0)
			dsm_settle_shard(ts->job_id, ts->shard, state);
		*done = true;
		return 0;
	}
	{
		HeapTuple	t = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;
		Oid			registered;
		int			page_size = DatumGetInt32(SPI_getbinval(t, d, 2, &isnull));
		int64		target = DatumGetInt64(SPI_getbinval(t, d, 6, &isnull));

		ts->max_running = DatumGetInt32(SPI_getbinval(t, d, 3, &isnull));
		ts->rows_per_second = DatumGetFloat8(SPI_getbinval(t, d, 4, &isnull));
		ts->page_delay_ms = DatumGetInt64(SPI_getbinval(t, d, 5, &isnull));
		ts->shards_in_turn = DatumGetInt32(SPI_getbinval(t, d, 7, &isnull));
		ts->shards_waiting = DatumGetInt32(SPI_getbinval(t, d, 9, &isnull));

		/* The mapper is still registered, to the same function. */
		registered = DatumGetObjectId(SPI_getbinval(t, d, 8, &isnull));
		if (isnull)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("mapper \"%s\" is no longer registered", job->mapper)));
		check_mapper_binding(job, registered);

		/* A new target, or none, starts again from the configured size. */
		if (target == 0 || target != ts->target_page_ms || ts->adaptive_size <= 0)
			ts->adaptive_size = page_size;
		ts->target_page_ms = target;
		ts->page_limit = target > 0 ? ts->adaptive_size : page_size;

		/* A lowered max_running_shards ends the turns above the cap. */
		if (ts->running_slot >= 0 && ts->max_running > 0 &&
			ts->running_slot >= ts->max_running)
			ts->stop_turn = true;
		else if (ts->running_slot < 0 && ts->max_running > 0)
			ts->stop_turn = true;
	}

	/* 2. The next page of keys, read as the owner. */
	initStringInfo(&sql);
	appendStringInfo(&sql, "SELECT %s FROM %s WHERE true",
					 ts->select_list, ts->from_clause);
	if (ts->resume != NIL)
		bound_params(ts, &sql, ts->resume_inclusive ? ">=" : ">", ts->resume,
					 types, values, &nargs);
	if (ts->range_end != NIL)
		bound_params(ts, &sql, "<", ts->range_end, types, values, &nargs);
	if (job->filter)
		appendStringInfo(&sql, " AND (%s\n)", job->filter);

	/*
	 * The limit is written into the statement, not passed as a parameter:
	 * a plan made for an unknown limit assumes a tenth of the range's rows
	 * and may then prefer sorting the whole range to the ordered index scan.
	 * A statement prepared for another limit (dsmapper_tune, an adaptive
	 * page size) is prepared again.
	 */
	appendStringInfo(&sql, " ORDER BY %s LIMIT %d",
					 dsm_key_order_sql(ts->key, ts->key->alias), ts->page_limit);
	which = PLAN_PAGE + (ts->resume == NIL ? 0 : ts->resume_inclusive ? 1 : 2);
	if (ts->plans[which] != NULL && ts->plan_limits[which] != ts->page_limit)
	{
		SPI_freeplan(ts->plans[which]);
		ts->plans[which] = NULL;
	}
	ts->plan_limits[which] = ts->page_limit;

	/* The page goes straight from the executor into the mapper's array. */
	page.pub.receiveSlot = page_receiver_receive;
	page.pub.rStartup = page_receiver_startup;
	page.pub.rShutdown = page_receiver_shutdown;
	page.pub.rDestroy = page_receiver_destroy;
	page.pub.mydest = DestNone;
	page.ts = ts;
	page.cxt = CurrentMemoryContext;
	page.keep_key = !job->rows_mode && ts->mapper_column != 1;
	get_typlenbyval(ts->key->typids[0], &page.key_len, &page.key_byval);
	page.first_key = page.last_key = (Datum) 0;
	page.nelems = 0;
	page.capacity = Min(Max(ts->page_limit, 1), 1024);
	page.elems = palloc(sizeof(Datum) * page.capacity);

	params = makeParamList(nargs);
	for (int i = 0; i < nargs; i++)
	{
		params->params[i].value = values[i];
		params->params[i].isnull = false;
		params->params[i].pflags = PARAM_FLAG_CONST;
		params->params[i].ptype = types[i];
	}
	memset(&options, 0, sizeof(options));
	options.params = params;
	options.dest = (DestReceiver *) &page;

	dsm_enter_owner(&owner, job->owner, job->search_path);
	rc = SPI_execute_plan_extended(turn_plan(ts, which, sql.data, nargs, types,
											 ts->page_plan_options),
								   &options);
	dsm_leave(&owner);

	/* (SPI reports a SELECT into a receiver of its own as a utility.) */
	if (rc != SPI_OK_SELECT && rc != SPI_OK_UTILITY)
		elog(ERROR, "dsmapper: could not read a page of relation \"%s\"",
			 job->relation_name);
	n = page.nelems;

	/* 3. Call the mapper, as the owner. */
	if (n > 0)
	{
		MemoryContext old;
		ArrayType  *array;
		LOCAL_FCINFO(fcinfo, 2);

		last = page_key_strings(ts, &page, true);
		old = MemoryContextSwitchTo(ts->page_cxt);
		ts->first_key = key_text(page_key_strings(ts, &page, false));
		ts->last_key = key_text(last);
		MemoryContextSwitchTo(old);

		/* The function may have been dropped since the turn began. */
		if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(ts->fn_oid)))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_FUNCTION),
					 errmsg("function of mapper \"%s\" no longer exists", job->mapper)));
		check_owner_privileges(job, ts->fn_oid);
		array = construct_array(page.elems, (int) n, ts->elem_type, ts->elem_len,
								ts->elem_byval, ts->elem_align);

		dsm_enter_owner(&owner, job->owner, job->search_path);
		dsm_current_job_id = ts->job_id;
		dsm_current_shard_index = ts->shard;

		InitFunctionCallInfoData(*fcinfo, &ts->flinfo, 2, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = PointerGetDatum(array);
		fcinfo->args[0].isnull = false;
		fcinfo->args[1].value = ts->params;
		fcinfo->args[1].isnull = false;
		(void) FunctionCallInvoke(fcinfo);

		dsm_current_job_id = 0;
		dsm_current_shard_index = -1;
		dsm_leave(&owner);
	}

	/* 4. The checkpoint, in the same transaction. */
	{
		Oid			ctypes[4] = {INT8OID, INT4OID, TEXTARRAYOID, INT8OID};
		Datum		cvalues[4];
		char		cnulls[4] = {' ', ' ', n > 0 ? ' ' : 'n', ' '};

		cvalues[0] = Int64GetDatum(ts->job_id);
		cvalues[1] = Int32GetDatum(ts->shard);
		cvalues[2] = n > 0 ? dsm_text_array_datum(last) : (Datum) 0;
		cvalues[3] = Int64GetDatum((int64) n);
		rc = SPI_execute_plan(turn_plan(ts, PLAN_CHECKPOINT,
										"UPDATE dsmapper.shard SET state = 'running',"
										" started = coalesce(started, pg_catalog.clock_timestamp()),"
										" resume_from = coalesce($3, resume_from),"
										" processed = processed OPERATOR(pg_catalog.+) $4,"
										" attempts = 0, error = NULL, error_sqlstate = NULL,"
										" error_first_key = NULL, error_last_key = NULL,"
										" updated = pg_catalog.clock_timestamp()"
										" WHERE job_id OPERATOR(pg_catalog.=) $1"
										" AND shard OPERATOR(pg_catalog.=) $2",
										4, ctypes, CURSOR_OPT_PARALLEL_OK),
							  cvalues, cnulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "dsmapper: could not write the checkpoint");
	}

	if (n < (uint64) ts->page_limit)
	{
		dsm_finish_shard(ts->job_id, ts->shard, "succeeded");
		*done = true;
	}

	/*
	 * Carry the new position into the next page.  It lives in the turn's
	 * context; the previous one is freed, so a long turn does not grow.
	 */
	if (n > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(ts->cxt);
		List	   *copy = NIL;
		ListCell   *lc;

		foreach(lc, last)
			copy = lappend(copy, pstrdup((char *) lfirst(lc)));
		list_free_deep(ts->resume);
		ts->resume = copy;
		ts->resume_inclusive = false;
		MemoryContextSwitchTo(old);
	}
	return (int64) n;
}

/*
 * load_shard reads the job, settles the shard if the job is not running,
 * and otherwise prepares the turn.  Returns false when there is nothing to
 * do.  Inside a page transaction, internal identity.
 */
static bool
load_shard(TurnState *ts)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(ts->job_id), Int32GetDatum(ts->shard)};
	int			rc;
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;
	char	   *state;
	Datum		d;
	MemoryContext old;

	ts->job = dsm_load_job(ts->job_id, false, ts->cxt);
	if (ts->job == NULL)
		return false;

	if (strcmp(ts->job->state, "running") != 0)
	{
		if (strcmp(ts->job->state, "paused") == 0 ||
			strcmp(ts->job->state, "aborting") == 0)
			dsm_settle_shard(ts->job_id, ts->shard, ts->job->state);
		return false;
	}

	rc = SPI_execute_with_args("SELECT state, range_start, range_end, resume_from,"
							   " in_turn, attempts, GREATEST(expected, processed)"
							   " FROM dsmapper.shard"
							   " WHERE job_id OPERATOR(pg_catalog.=) $1"
							   " AND shard OPERATOR(pg_catalog.=) $2",
							   2, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read shard");
	if (SPI_processed == 0)
		return false;
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	state = SPI_getvalue(tuple, desc, 1);
	ts->shard_expected = DatumGetInt64(SPI_getbinval(tuple, desc, 7, &isnull));
	if (isnull || !ts->job->track_progress)
		ts->shard_expected = 0;
	if (strcmp(state, "succeeded") == 0 || strcmp(state, "failed") == 0 ||
		strcmp(state, "aborted") == 0)
	{
		dsm_spi_exec("DELETE FROM dsmapper.queue"
					 " WHERE job_id OPERATOR(pg_catalog.=) $1"
					 " AND shard OPERATOR(pg_catalog.=) $2",
					 2, types, values, SPI_OK_DELETE);
		return false;
	}

	/*
	 * A turn left open means its process died inside a page (crash, FATAL,
	 * shutdown): count that as a failed attempt of the page.
	 */
	if (DatumGetBool(SPI_getbinval(tuple, desc, 5, &isnull)))
	{
		int			attempts = DatumGetInt32(SPI_getbinval(tuple, desc, 6, &isnull)) + 1;
		bool		give_up = attempts >= ts->job->max_attempts;

		dsm_spi_exec("UPDATE dsmapper.shard SET"
					 " attempts = attempts OPERATOR(pg_catalog.+) 1,"
					 " error = 'the process running a page of this shard exited unexpectedly',"
					 " error_sqlstate = '57P01',"
					 " updated = pg_catalog.clock_timestamp()"
					 " WHERE job_id OPERATOR(pg_catalog.=) $1"
					 " AND shard OPERATOR(pg_catalog.=) $2",
					 2, types, values, SPI_OK_UPDATE);
		ereport(LOG,
				(errmsg("dsmapper job " INT64_FORMAT " shard %d %s: a previous turn exited inside a page",
						ts->job_id, ts->shard, give_up ? "failed" : "will retry"),
				 errdetail("Attempt %d of %d.", attempts, ts->job->max_attempts),
				 errhidestmt(true)));
		if (give_up)
			dsm_finish_shard(ts->job_id, ts->shard, "failed");
		else
		{
			/* Back off like any transient failure; a crash loop stays slow. */
			schedule_retry(ts->job_id, ts->shard, backoff_ms(attempts));
		}
		return false;
	}
	dsm_spi_exec("UPDATE dsmapper.shard SET in_turn = true"
				 " WHERE job_id OPERATOR(pg_catalog.=) $1"
				 " AND shard OPERATOR(pg_catalog.=) $2",
				 2, types, values, SPI_OK_UPDATE);

	old = MemoryContextSwitchTo(ts->cxt);
	d = SPI_getbinval(tuple, desc, 4, &isnull);
	ts->resume_inclusive = isnull;
	if (isnull)
		d = SPI_getbinval(tuple, desc, 2, &isnull);
	ts->resume = isnull ? NIL : dsm_text_array_list(d);
	d = SPI_getbinval(tuple, desc, 3, &isnull);
	ts->range_end = isnull ? NIL : dsm_text_array_list(d);
	MemoryContextSwitchTo(old);

	resolve_mapper(ts);
	return true;
}

/*
 * pace_pages adapts the page size to target_page_time and sleeps as
 * page_delay and rows_per_second ask, after a committed page.  A job-wide
 * rows_per_second is shared evenly by the shards in a turn.  Sleeps are
 * interruptible and capped at a minute per page.
 */
static void
pace_pages(TurnState *ts, int64 rows, long page_ms)
{
	int64		sleep_ms = ts->page_delay_ms;

	if (ts->target_page_ms > 0 && rows >= ts->page_limit)
	{
		double		factor = (double) ts->target_page_ms / Max(page_ms, 1);

		factor = Min(2.0, Max(0.5, factor));
		ts->adaptive_size = (int) Min(1000000.0, Max(1.0, ts->page_limit * factor));
	}

	if (ts->rows_per_second > 0 && rows > 0)
	{
		double		share = ts->rows_per_second / Max(ts->shards_in_turn, 1);
		int64		wanted_ms = (int64) (rows * 1000.0 / share);

		sleep_ms = Max(sleep_ms, wanted_ms - page_ms);
	}

	sleep_ms = Min(sleep_ms, 60000);
	if (sleep_ms > 0)
	{
		TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														sleep_ms);
		uint64		generation = ts->generation;

		/*
		 * Sleep between pages, outside any transaction.  A pending cancel
		 * or shutdown ends the sleep without raising it here: the next
		 * page's own handling takes it.  So does committed news for this
		 * database (a pause, an abort, dsmapper_tune), which the next page
		 * reads.
		 */
		for (;;)
		{
			long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until);

			if (left <= 0 || InterruptPending || ConfigReloadPending ||
				dsm_database_generation(MyDatabaseId) != generation)
				break;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Min(left, 1000), PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
	}
}

/*
 * run_shard_turn maps pages of one shard until the turn is used up, the
 * shard is done, or an error ends the turn.  Returns the pages mapped.
 */
static int64
run_shard_turn(TurnState *ts, TimestampTz deadline)
{
	TimestampTz turn_end;
	int64		pages = 0;
	bool		done = false;
	DsmIdentity internal;

	/* Load and check everything once per turn. */
	page_begin(ts);
	PG_TRY();
	{
		dsm_enter_internal(&internal);
		done = !load_shard(ts);
		dsm_leave(&internal);
		page_commit(ts);
	}
	PG_CATCH();
	{
		bool		dropping = dsm_extension_being_dropped(MyDatabaseId);
		ErrorData  *edata = page_abort(ts);

		if (ts->in_session && edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(edata);
		if (!abandon_for_drop(ts, edata, dropping))
			record_failure(ts, edata);
		done = true;
	}
	PG_END_TRY();

	if (done)
		return 0;

	if (ts->job->pages_per_task > 0)
		turn_end = 0;
	else
		turn_end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
											   ts->job->task_duration_ms);

	/* Pages, at least one per turn. */
	while (!done)
	{
		TimestampTz page_started;
		volatile long page_ms = 0;
		volatile int64 rows = 0;

		ts->first_key = ts->last_key = NULL;
		MemoryContextReset(ts->page_cxt);
		/* News committed from here on ends the pause after this page. */
		ts->generation = dsm_database_generation(MyDatabaseId);
		page_begin(ts);
		PG_TRY();
		{
			/* A cancel (abort) between pages is handled like one in a page. */
			CHECK_FOR_INTERRUPTS();

			/*
			 * In a worker, dsmapper.page_timeout bounds the page through
			 * the statement timeout, which cancels it with SQLSTATE 57014,
			 * a transient error.  A session keeps its own statement_timeout.
			 */
			if (!ts->in_session && dsm_page_timeout > 0)
				enable_timeout_after(STATEMENT_TIMEOUT, dsm_page_timeout);
			dsm_enter_internal(&internal);
			page_started = GetCurrentTimestamp();
			rows = map_page(ts, &done);
			dsm_leave(&internal);

			/*
			 * The page made it: a timeout that fires now, too late to stop
			 * it, must not cancel whatever comes next.
			 */
			if (!ts->in_session && dsm_page_timeout > 0)
			{
				disable_timeout(STATEMENT_TIMEOUT, false);
				if (get_timeout_indicator(STATEMENT_TIMEOUT, true))
					QueryCancelPending = false;
			}
			page_commit(ts);
			page_ms = TimestampDifferenceMilliseconds(page_started,
													  GetCurrentTimestamp());
			if (rows > 0)
				pages++;
			elog(DEBUG1, "dsmapper job " INT64_FORMAT " shard %d: page of "
				 INT64_FORMAT " rows", ts->job_id, ts->shard, rows);
		}
		PG_CATCH();
		{
			ErrorData  *edata;
			bool		dropping = dsm_extension_being_dropped(MyDatabaseId);

			if (!ts->in_session && dsm_page_timeout > 0)
				disable_timeout(STATEMENT_TIMEOUT, false);
			edata = page_abort(ts);
			if (ts->in_session && edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
				ReThrowError(edata);
			if (!abandon_for_drop(ts, edata, dropping))
				record_failure(ts, edata);
			done = true;
		}
		PG_END_TRY();

		if (ts->stop_turn)
			break;
		if (!done)
			pace_pages(ts, rows, page_ms);
		ts->turn_rows += rows;

		/*
		 * While other shards of the job wait, a turn maps about a quarter of
		 * its shard (the page after the quarter is reached asks whether
		 * they wait): the shards then advance together and end close to
		 * each other, instead of the job's last shard running alone while
		 * the other workers idle.
		 */
		if (!ts->in_session && ts->shards_waiting > 0)
			break;
		if (ts->job->pages_per_task > 0 && pages >= ts->job->pages_per_task)
			break;
		/* New work waits while every worker is in a turn: make room. */
		if (!ts->in_session && dsm_database_starving())
			break;
		if (turn_end != 0 && GetCurrentTimestamp() >= turn_end)
			break;
		if (deadline != 0 && GetCurrentTimestamp() >= deadline)
			break;
		if (!ts->in_session && (ProcDiePending || ConfigReloadPending))
			break;
	}
	return pages;
}

/*
 * run_split splits a starting job into shards and queues them.  The job row
 * is locked for the whole split, so an abort waits for it or wins before.
 */
static void
run_split(TurnState *ts)
{
	DsmIdentity internal;
	int			attempts;

	/*
	 * Count the attempt first, in a transaction of its own, so that a split
	 * that keeps ending its process (a filter that crashes the backend, say)
	 * counts too and the job fails after max_attempts instead of looping;
	 * such a split is taken up again only after a backoff.  (In a session
	 * the count is part of the caller's transaction and goes with it.)
	 */
	page_begin(ts);
	dsm_enter_internal(&internal);
	{
		Oid			types[2] = {INT8OID, INT4OID};
		Datum		values[2] = {Int64GetDatum(ts->job_id),
		Int32GetDatum(DSM_SPLIT_TASK)};

		attempts = (int) dsm_spi_int64("UPDATE dsmapper.queue"
									   " SET attempts = attempts OPERATOR(pg_catalog.+) 1,"
									   " ready_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)"
									   " pg_catalog.make_interval(secs => LEAST(300.0,"
									   " 2.0 OPERATOR(pg_catalog.^) attempts))"
									   " WHERE job_id OPERATOR(pg_catalog.=) $1"
									   " AND shard OPERATOR(pg_catalog.=) $2"
									   " RETURNING attempts",
									   2, types, values, NULL);
	}
	dsm_leave(&internal);
	page_commit(ts);

	page_begin(ts);
	PG_TRY();
	{
		Oid			types[5] = {INT8OID, INT4OID, TEXTARRAYOID, TEXTARRAYOID, INT8OID};
		Datum		values[5];
		char		nulls[5];
		DsmJob	   *job;

		dsm_enter_internal(&internal);
		job = dsm_load_job(ts->job_id, true, ts->cxt);
		ts->job = job;
		if (job == NULL || strcmp(job->state, "starting") != 0)
		{
			values[0] = Int64GetDatum(ts->job_id);
			values[1] = Int32GetDatum(DSM_SPLIT_TASK);
			dsm_spi_exec("DELETE FROM dsmapper.queue"
						 " WHERE job_id OPERATOR(pg_catalog.=) $1"
						 " AND shard OPERATOR(pg_catalog.=) $2",
						 2, types, values, SPI_OK_DELETE);
		}
		else
		{
			DsmSplit   *split;
			int64		expected_total = 0;
			ListCell   *lc;
			List	   *prev = NIL;

			if (attempts > job->max_attempts)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("the split was interrupted %d times", attempts - 1),
						 errhint("Look in the server log for what ended the processes.")));
			resolve_mapper(ts);
			split = dsm_split_relation(job, ts->key);

			for (int i = 0; i < split->nshards; i++)
			{
				List	   *end = i < split->nshards - 1 ?
					list_nth(split->boundaries, i) : NIL;

				values[0] = Int64GetDatum(ts->job_id);
				values[1] = Int32GetDatum(i);
				values[2] = prev ? dsm_text_array_datum(prev) : (Datum) 0;
				values[3] = end ? dsm_text_array_datum(end) : (Datum) 0;
				values[4] = Int64GetDatum(split->expected[i]);
				nulls[0] = nulls[1] = ' ';
				nulls[2] = prev ? ' ' : 'n';
				nulls[3] = end ? ' ' : 'n';
				nulls[4] = job->track_progress ? ' ' : 'n';
				if (SPI_execute_with_args("INSERT INTO dsmapper.shard"
										  " (job_id, shard, range_start, range_end, expected)"
										  " VALUES ($1, $2, $3, $4, $5)",
										  5, types, values, nulls, false, 0) != SPI_OK_INSERT)
					elog(ERROR, "dsmapper: could not insert shard");
				expected_total += split->expected[i];
				prev = end;
			}
			(void) lc;

			values[0] = Int64GetDatum(ts->job_id);
			values[1] = Int32GetDatum(split->nshards);
			dsm_spi_exec("INSERT INTO dsmapper.queue (job_id, shard)"
						 " SELECT $1, g FROM pg_catalog.generate_series(0,"
						 " $2 OPERATOR(pg_catalog.-) 1) g",
						 2, types, values, SPI_OK_INSERT);
			values[1] = Int32GetDatum(DSM_SPLIT_TASK);
			dsm_spi_exec("DELETE FROM dsmapper.queue"
						 " WHERE job_id OPERATOR(pg_catalog.=) $1"
						 " AND shard OPERATOR(pg_catalog.=) $2",
						 2, types, values, SPI_OK_DELETE);
			dsm_spi_exec("UPDATE dsmapper.job SET started = pg_catalog.clock_timestamp()"
						 " WHERE job_id OPERATOR(pg_catalog.=) $1",
						 1, types, values, SPI_OK_UPDATE);
			dsm_set_job_state(ts->job_id, "running", NULL);
			dsm_request_wakeup_at_commit();

			ereport(dsm_log_level_jobs,
					(errmsg("dsmapper job " INT64_FORMAT " in database \"%s\" started: mapper \"%s\" on %s, %d shards, %s" INT64_FORMAT " rows",
							ts->job_id, get_database_name(MyDatabaseId),
							job->mapper, job->relation_name,
							split->nshards, split->exact ? "" : "about ",
							expected_total),
					 errhidestmt(true)));
		}
		dsm_leave(&internal);
		page_commit(ts);
	}
	PG_CATCH();
	{
		bool		dropping = dsm_extension_being_dropped(MyDatabaseId);
		ErrorData  *edata = page_abort(ts);

		if (ts->in_session && edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(edata);
		if (abandon_for_drop(ts, edata, dropping))
			return;

		/* A split that failed fails the job, unless it is worth a retry. */
		page_begin(ts);
		dsm_enter_internal(&internal);
		{
			Oid			types[2] = {INT8OID, INT4OID};
			Datum		values[2] = {Int64GetDatum(ts->job_id),
			Int32GetDatum(DSM_SPLIT_TASK)};
			DsmJob	   *job = dsm_load_job(ts->job_id, true, ts->cxt);

			if (job != NULL && strcmp(job->state, "starting") == 0 &&
				is_transient_error(edata->sqlerrcode) &&
				attempts < job->max_attempts)
				schedule_retry(ts->job_id, DSM_SPLIT_TASK, backoff_ms(attempts));
			else
			{
				dsm_spi_exec("DELETE FROM dsmapper.queue"
							 " WHERE job_id OPERATOR(pg_catalog.=) $1"
							 " AND shard OPERATOR(pg_catalog.=) $2",
							 2, types, values, SPI_OK_DELETE);
				if (job != NULL && strcmp(job->state, "starting") == 0)
				{
					dsm_set_job_state(ts->job_id, "failed",
									  psprintf("could not split: %s", edata->message));
					ereport(dsm_log_level_jobs,
							(errmsg("dsmapper job " INT64_FORMAT " in database \"%s\" failed: could not split: %s",
									ts->job_id, get_database_name(MyDatabaseId),
									edata->message),
							 errhidestmt(true)));
				}
			}
		}
		dsm_leave(&internal);
		page_commit(ts);
	}
	PG_END_TRY();
}

/*
 * dsm_run_task runs one turn of a claimed task and returns the number of
 * pages it mapped.  The caller holds the task's claim lock and releases it
 * afterwards.  In a worker (in_session false) it is called outside any
 * transaction; in a session, inside the caller's transaction.  deadline,
 * when not 0, also ends the turn.
 */
int64
dsm_run_task(DsmTask *task, bool in_session, TimestampTz deadline)
{
	TurnState	ts;
	int64		job_id = task->job_id;
	int32		shard = task->shard;
	int64		pages = 0;
	MemoryContext caller_cxt = CurrentMemoryContext;

	memset(&ts, 0, sizeof(ts));
	ts.cxt = AllocSetContextCreate(TopMemoryContext, "dsmapper turn",
								   ALLOCSET_DEFAULT_SIZES);
	ts.page_cxt = AllocSetContextCreate(ts.cxt, "dsmapper page",
										ALLOCSET_SMALL_SIZES);
	ts.in_session = in_session;
	ts.caller_cxt = caller_cxt;
	ts.caller_owner = CurrentResourceOwner;
	ts.job_id = job_id;
	ts.shard = shard;
	ts.running_slot = task->running_slot;
	MemoryContextSwitchTo(ts.cxt);

	PG_TRY();
	{
		if (shard == DSM_SPLIT_TASK)
			run_split(&ts);
		else
		{
			DsmIdentity internal;
			Oid			types[2] = {INT8OID, INT4OID};
			Datum		values[2] = {Int64GetDatum(job_id), Int32GetDatum(shard)};

			pages = run_shard_turn(&ts, deadline);

			/* The turn is over: go to the back of the queue. */
			if (!ts.abandoned)
			{
				page_begin(&ts);
				dsm_enter_internal(&internal);
				dsm_spi_exec("UPDATE dsmapper.queue"
							 " SET last_turn = pg_catalog.clock_timestamp()"
							 " WHERE job_id OPERATOR(pg_catalog.=) $1"
							 " AND shard OPERATOR(pg_catalog.=) $2",
							 2, types, values, SPI_OK_UPDATE);
				dsm_spi_exec("UPDATE dsmapper.shard SET in_turn = false"
							 " WHERE job_id OPERATOR(pg_catalog.=) $1"
							 " AND shard OPERATOR(pg_catalog.=) $2 AND in_turn",
							 2, types, values, SPI_OK_UPDATE);
				free_turn_plans(&ts);
				dsm_leave(&internal);
				page_commit(&ts);
			}
		}
	}
	PG_FINALLY();
	{
		MemoryContextSwitchTo(caller_cxt);
		free_turn_plans(&ts);
		MemoryContextDelete(ts.cxt);
	}
	PG_END_TRY();

	return pages;
}
