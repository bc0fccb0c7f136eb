/*-------------------------------------------------------------------------
 *
 * schedule.c
 *		Recurring launches through pg_cron.
 *
 * dsmapper_schedule() stores the launch arguments in dsmapper.schedule and
 * asks pg_cron, as the calling role, to run
 *
 *		SELECT <schema>.dsmapper_launch_scheduled('<name>')
 *
 * on the given cron schedule.  pg_cron runs that command as the role that
 * scheduled it, so the jobs it launches are owned by that role.  A run
 * whose previous job is still active launches nothing: one schedule never
 * has two jobs in flight.
 *
 * dsmapper_unschedule() removes that pg_cron job as the schedule's owner
 * (the role pg_cron knows it by), so that a member of the owner role can
 * remove it too: pg_cron shows and removes a role's jobs only to that role
 * and to superusers.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"

PG_FUNCTION_INFO_V1(dsmapper_schedule);
PG_FUNCTION_INFO_V1(dsmapper_unschedule);
PG_FUNCTION_INFO_V1(dsmapper_launch_scheduled);

/* The argument names of dsmapper_schedule, for its NULL checks. */
static const char *const schedule_arg_names[12] = {
	"name", "schedule", "mapper", "relation", "params", "shards",
	"page_size", "filter", "pages_per_task", "task_duration",
	"track_progress", "max_attempts"
};

/*
 * require_pg_cron errors out unless pg_cron is installed here.
 */
static void
require_pg_cron(void)
{
	if (!OidIsValid(get_extension_oid("pg_cron", true)))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("pg_cron is not installed in this database"),
				 errdetail("dsmapper schedules recurring launches through pg_cron."),
				 errhint("Add pg_cron to shared_preload_libraries, set cron.database_name to this database, and run CREATE EXTENSION pg_cron.")));
}

static char *
dsm_schema_name(void)
{
	return get_namespace_name(dsm_extension_schema());
}

static char *
cron_job_name(const char *name)
{
	return psprintf("dsmapper: %s", name);
}

/*
 * schedule_owner returns the owner of a schedule, or InvalidOid.  SPI
 * connected, internal identity.
 */
static Oid
schedule_owner(const char *name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};
	bool		found;
	Oid			owner;

	owner = (Oid) dsm_spi_int64("SELECT owner::int8 FROM dsmapper.schedule"
								" WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE",
								1, types, values, &found);
	return found ? owner : InvalidOid;
}

/*
 * quiet_notices raises client_min_messages and log_min_messages to WARNING
 * (never lowers them) in a new GUC nest level, which it returns for
 * AtEOXact_GUC.  Errors and warnings still get through.
 */
static int
quiet_notices(void)
{
	int			nestlevel = NewGUCNestLevel();

	if (client_min_messages < WARNING)
		(void) set_config_option("client_min_messages", "warning",
								 PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	/* In the server log, LOG ranks above WARNING: leave that alone. */
	if (log_min_messages < WARNING && log_min_messages != LOG)
		(void) set_config_option("log_min_messages", "warning",
								 PGC_SUSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	return nestlevel;
}

/*
 * dsmapper_schedule(name, schedule, mapper, relation, params, shards,
 *					 page_size, filter, pages_per_task, task_duration,
 *					 track_progress, max_attempts) → bigint (pg_cron job id)
 *
 * The launch arguments are checked now by a launch that is rolled back, so
 * a schedule that could never launch is refused at once.  That trial
 * launch keeps its notices to itself (such as the one saying that no
 * background workers run): they are about a job that never exists.
 */
Datum
dsmapper_schedule(PG_FUNCTION_ARGS)
{
	char	   *name;
	char	   *schedule;
	DsmIdentity internal;
	Oid			caller = GetUserId();
	Oid			types[12] = {TEXTOID, TEXTOID, TEXTOID, OIDOID, JSONBOID, INT4OID,
		INT4OID, TEXTOID, INT4OID, INTERVALOID, BOOLOID, INT4OID};
	Datum		values[13];
	char		nulls[13];
	int64		cron_job;
	bool		found;
	int			quiet;

	for (int i = 0; i < 12; i++)
	{
		if (i == 7)
			continue;			/* filter may be NULL */
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not be NULL", schedule_arg_names[i])));
	}
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	schedule = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (name[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("schedule name must not be empty")));
	require_pg_cron();

	memset(nulls, ' ', sizeof(nulls));
	for (int i = 0; i < 12; i++)
	{
		values[i] = PG_GETARG_DATUM(i);
		if (PG_ARGISNULL(i))
			nulls[i] = 'n';
	}

	SPI_connect();

	/*
	 * Validate the launch arguments with a launch that is rolled back, its
	 * notices silenced.
	 */
	quiet = quiet_notices();
	BeginInternalSubTransaction(NULL);
	PG_TRY();
	{
		if (SPI_execute_with_args(psprintf("SELECT %s.dsmapper_launch($3, $4::pg_catalog.regclass,"
										   " $5, $6, $7, $8, $9, $10, $11, $12)",
										   quote_identifier(dsm_schema_name())),
								  12, types, values, nulls, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "dsmapper: could not check the schedule's launch");
	}
	PG_CATCH();
	{
		RollbackAndReleaseCurrentSubTransaction();
		AtEOXact_GUC(false, quiet);
		PG_RE_THROW();
	}
	PG_END_TRY();
	RollbackAndReleaseCurrentSubTransaction();
	AtEOXact_GUC(false, quiet);

	/* Store it; an existing schedule is never replaced. */
	dsm_enter_internal(&internal);
	{
		Oid			owner = schedule_owner(name);

		if (OidIsValid(owner))
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("schedule \"%s\" already exists", name),
					 errhint("Remove it first with dsmapper_unschedule().")));
	}
	values[12] = ObjectIdGetDatum(caller);
	{
		Oid			itypes[13];

		memcpy(itypes, types, sizeof(types));
		itypes[12] = OIDOID;
		if (SPI_execute_with_args("INSERT INTO dsmapper.schedule (name, schedule,"
								  " mapper, relation, params, shards, page_size, filter,"
								  " pages_per_task, task_duration, track_progress,"
								  " max_attempts, owner)"
								  " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
								  " $11, $12, $13)",
								  13, itypes, values, nulls, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "dsmapper: could not store the schedule");
	}
	dsm_leave(&internal);

	/* pg_cron records the calling role as the one to run the command as. */
	{
		Oid			ctypes[3] = {TEXTOID, TEXTOID, TEXTOID};
		Datum		cvalues[3];

		cvalues[0] = CStringGetTextDatum(cron_job_name(name));
		cvalues[1] = CStringGetTextDatum(schedule);
		cvalues[2] = CStringGetTextDatum(psprintf("SELECT %s.dsmapper_launch_scheduled(%s)",
												  quote_identifier(dsm_schema_name()),
												  quote_literal_cstr(name)));
		cron_job = dsm_spi_int64("SELECT cron.schedule($1, $2, $3)",
								 3, ctypes, cvalues, &found);
	}

	dsm_enter_internal(&internal);
	{
		Oid			utypes[2] = {TEXTOID, INT8OID};
		Datum		uvalues[2] = {CStringGetTextDatum(name), Int64GetDatum(cron_job)};

		dsm_spi_exec("UPDATE dsmapper.schedule SET cron_job = $2"
					 " WHERE name OPERATOR(pg_catalog.=) $1",
					 2, utypes, uvalues, SPI_OK_UPDATE);
	}
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_INT64(cron_job);
}

/*
 * lock_schedule finds a schedule, locks its row and returns its owner and
 * its pg_cron job id (*has_cron_job false when none is recorded); false
 * when there is no such schedule.  SPI connected, internal identity.
 */
static bool
lock_schedule(const char *name, Oid *owner, int64 *cron_job, bool *has_cron_job)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};
	HeapTuple	tuple;
	TupleDesc	desc;
	Datum		d;
	bool		isnull;

	if (SPI_execute_with_args("SELECT owner, cron_job FROM dsmapper.schedule"
							  " WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read schedule");
	if (SPI_processed == 0)
		return false;
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	*owner = DatumGetObjectId(SPI_getbinval(tuple, desc, 1, &isnull));
	d = SPI_getbinval(tuple, desc, 2, &isnull);
	*has_cron_job = !isnull;
	*cron_job = isnull ? 0 : DatumGetInt64(d);
	return true;
}

/*
 * cron_job_exists tells whether pg_cron still holds job cron_job.  pg_cron's
 * row level security shows a role only its own jobs; only a superuser sees
 * them all, and the extension owner normally is one.  When it is not,
 * *known is false and the job is taken to be there.  SPI connected.
 */
static bool
cron_job_exists(int64 cron_job, bool *known)
{
	DsmIdentity internal;
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(cron_job)};
	bool		found;
	int64		n;

	*known = superuser_arg(dsm_extension_owner());
	if (!*known)
		return true;
	dsm_enter_internal(&internal);
	n = dsm_spi_int64("SELECT count(*) FROM cron.job"
					  " WHERE jobid OPERATOR(pg_catalog.=) $1",
					  1, types, values, &found);
	dsm_leave(&internal);
	return n > 0;
}

/* Error context of remove_cron_jobs. */
typedef struct CronRemoval
{
	const char *schedule;
	const char *role;
} CronRemoval;

static void
cron_removal_context(void *arg)
{
	CronRemoval *r = (CronRemoval *) arg;

	errcontext("removing the pg_cron job of schedule \"%s\" as role \"%s\"",
			   r->schedule, r->role);
}

/*
 * remove_cron_jobs removes a schedule's pg_cron job: the recorded one
 * (cron_job) and any job of the owner under the schedule's job name (which
 * cron.schedule would reuse).  dsmapper_schedule made the job as the
 * owner, so pg_cron knows it by the owner's name and shows and removes it
 * only to the owner and to superusers: this runs as the owner, or as the
 * calling superuser.  A caller who is merely a member of the owner role
 * could not even see the job.
 *
 * Errors out, rather than leave the job behind to fail at every run, when
 * the recorded job is still there but could not be removed.  SPI
 * connected.
 */
static void
remove_cron_jobs(const char *name, Oid owner, int64 cron_job, bool has_cron_job)
{
	bool		as_superuser = superuser();
	Oid			role = as_superuser ? GetUserId() : owner;
	char	   *owner_name = GetUserNameFromId(owner, true);
	DsmIdentity id;
	Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	uint64		removed;
	CronRemoval removal;
	ErrorContextCallback callback;

	values[0] = Int64GetDatum(cron_job);
	if (!has_cron_job)
		nulls[0] = 'n';
	values[1] = CStringGetTextDatum(cron_job_name(name));
	values[2] = (Datum) 0;
	if (owner_name != NULL)
		values[2] = CStringGetTextDatum(owner_name);
	else
		nulls[2] = 'n';			/* the owner role is gone */

	removal.schedule = name;
	removal.role = GetUserNameFromId(role, false);
	callback.callback = cron_removal_context;
	callback.arg = &removal;
	callback.previous = error_context_stack;
	error_context_stack = &callback;

	dsm_enter_owner(&id, role, "pg_catalog");
	if (SPI_execute_with_args("SELECT cron.unschedule(jobid) FROM cron.job"
							  " WHERE jobid OPERATOR(pg_catalog.=) $1"
							  " OR (jobname OPERATOR(pg_catalog.=) $2"
							  " AND username OPERATOR(pg_catalog.=) $3)",
							  3, types, values, nulls, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not remove the pg_cron job of schedule \"%s\"",
			 name);
	removed = SPI_processed;
	for (uint64 i = 0; i < removed; i++)
	{
		bool		isnull;
		Datum		done = SPI_getbinval(SPI_tuptable->vals[i],
										 SPI_tuptable->tupdesc, 1, &isnull);

		if (isnull || !DatumGetBool(done))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("pg_cron did not remove the job of schedule \"%s\"", name)));
	}
	dsm_leave(&id);

	error_context_stack = callback.previous;

	/*
	 * Nothing removed: a superuser saw every job, so the recorded one is gone
	 * (removed through pg_cron directly, say).  The owner sees only its own
	 * jobs; check that the recorded one is not still there under another
	 * role's name.
	 */
	if (removed == 0 && has_cron_job && !as_superuser)
	{
		bool		known;

		if (cron_job_exists(cron_job, &known))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("could not remove pg_cron job " INT64_FORMAT " of schedule \"%s\"",
							cron_job, name),
					 known ?
					 errdetail("The pg_cron job does not run as the schedule's owner, role \"%s\".",
							   owner_name) :
					 errdetail("Role \"%s\" has no such pg_cron job, and whether another role has it cannot be checked.",
							   owner_name),
					 errhint("A superuser can remove the schedule and its pg_cron job.")));
	}
}

/*
 * dsmapper_unschedule(name text) → boolean: removes a schedule and its
 * pg_cron job; false when there was no such schedule.  For the schedule's
 * owner, members of that role and superusers.
 */
Datum
dsmapper_unschedule(PG_FUNCTION_ARGS)
{
	char	   *name;
	DsmIdentity internal;
	Oid			owner = InvalidOid;
	int64		cron_job = 0;
	bool		has_cron_job = false;
	bool		exists;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("name must not be NULL")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	values[0] = CStringGetTextDatum(name);
	require_pg_cron();

	SPI_connect();
	dsm_enter_internal(&internal);
	exists = lock_schedule(name, &owner, &cron_job, &has_cron_job);
	dsm_leave(&internal);
	if (!exists)
	{
		SPI_finish();
		PG_RETURN_BOOL(false);
	}
	if (!superuser() && !is_member_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to unschedule \"%s\"", name),
				 errdetail("Only the role that created a schedule, its members and superusers can remove it.")));

	remove_cron_jobs(name, owner, cron_job, has_cron_job);

	dsm_enter_internal(&internal);
	dsm_spi_exec("DELETE FROM dsmapper.schedule WHERE name OPERATOR(pg_catalog.=) $1",
				 1, types, values, SPI_OK_DELETE);
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_BOOL(true);
}

/*
 * dsmapper_launch_scheduled(name text) → bigint: what pg_cron runs.
 * Launches the schedule's job unless its previous job is still active;
 * returns the new job id, or NULL when skipped.
 */
Datum
dsmapper_launch_scheduled(PG_FUNCTION_ARGS)
{
	char	   *name;
	DsmIdentity internal;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	HeapTuple	tuple;
	TupleDesc	desc;
	Datum		args[12];
	char		nulls[12];
	Oid			argtypes[12];
	bool		isnull;
	int64		job_id;
	bool		found;
	Oid			owner;
	bool		active;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("name must not be NULL")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	values[0] = CStringGetTextDatum(name);

	SPI_connect();
	dsm_enter_internal(&internal);
	if (SPI_execute_with_args("SELECT s.mapper, s.relation, s.params, s.shards,"
							  " s.page_size, s.filter, s.pages_per_task,"
							  " s.task_duration, s.track_progress, s.max_attempts,"
							  " s.owner,"
							  " EXISTS (SELECT 1 FROM dsmapper.job j"
							  "   WHERE j.job_id OPERATOR(pg_catalog.=) s.last_job"
							  "   AND j.state OPERATOR(pg_catalog.<>)"
							  "   ALL ('{succeeded,failed,aborted}'::text[]))"
							  " FROM dsmapper.schedule s"
							  " WHERE s.name OPERATOR(pg_catalog.=) $1 FOR UPDATE OF s",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read schedule");
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("schedule \"%s\" does not exist", name)));
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	owner = DatumGetObjectId(SPI_getbinval(tuple, desc, 11, &isnull));
	active = DatumGetBool(SPI_getbinval(tuple, desc, 12, &isnull));
	for (int i = 0; i < 10; i++)
	{
		args[i] = SPI_getbinval(tuple, desc, i + 1, &isnull);
		nulls[i] = isnull ? 'n' : ' ';
		argtypes[i] = SPI_gettypeid(desc, i + 1);
	}
	dsm_leave(&internal);

	if (!superuser() && !is_member_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to run schedule \"%s\"", name)));

	if (active)
	{
		ereport(LOG,
				(errmsg("dsmapper schedule \"%s\" skipped: its previous job is still active",
						name),
				 errhidestmt(true)));
		SPI_finish();
		PG_RETURN_NULL();
	}

	/* Launch as the calling role (pg_cron runs as the schedule's owner). */
	if (SPI_execute_with_args(psprintf("SELECT %s.dsmapper_launch($1, $2::pg_catalog.regclass,"
									   " $3, $4, $5, $6, $7, $8, $9, $10)",
									   quote_identifier(dsm_schema_name())),
							  10, argtypes, args, nulls, false, 0) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "dsmapper: could not launch schedule \"%s\"", name);
	job_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										 SPI_tuptable->tupdesc, 1, &found));

	dsm_enter_internal(&internal);
	{
		Oid			utypes[2] = {TEXTOID, INT8OID};
		Datum		uvalues[2] = {CStringGetTextDatum(name), Int64GetDatum(job_id)};

		dsm_spi_exec("UPDATE dsmapper.schedule SET last_job = $2,"
					 " last_launch = pg_catalog.now()"
					 " WHERE name OPERATOR(pg_catalog.=) $1",
					 2, utypes, uvalues, SPI_OK_UPDATE);
	}
	dsm_leave(&internal);
	SPI_finish();

	PG_RETURN_INT64(job_id);
}
