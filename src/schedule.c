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
#include "utils/lsyscache.h"

PG_FUNCTION_INFO_V1(dsmapper_schedule);
PG_FUNCTION_INFO_V1(dsmapper_unschedule);
PG_FUNCTION_INFO_V1(dsmapper_launch_scheduled);

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
 * dsmapper_schedule(name, schedule, mapper, relation, params, shards,
 *					 page_size, filter, pages_per_task, task_duration,
 *					 track_progress, max_attempts) → bigint (pg_cron job id)
 *
 * The launch arguments are checked now by a launch that is rolled back, so
 * a schedule that could never launch is refused at once.
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

	for (int i = 0; i < 12; i++)
	{
		if (i == 7)
			continue;			/* filter may be NULL */
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("argument %d of dsmapper_schedule must not be NULL", i + 1)));
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

	/* Validate the launch arguments with a launch that is rolled back. */
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
		PG_RE_THROW();
	}
	PG_END_TRY();
	RollbackAndReleaseCurrentSubTransaction();

	/* Store it; only its owner may replace an existing schedule. */
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
 * dsmapper_unschedule(name text) → boolean: removes a schedule and its
 * pg_cron job; false when there was no such schedule.
 */
Datum
dsmapper_unschedule(PG_FUNCTION_ARGS)
{
	char	   *name;
	DsmIdentity internal;
	Oid			owner;
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
	owner = schedule_owner(name);
	dsm_leave(&internal);
	if (!OidIsValid(owner))
	{
		SPI_finish();
		PG_RETURN_BOOL(false);
	}
	if (!superuser() && !is_member_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to unschedule \"%s\"", name),
				 errdetail("Only the role that created a schedule, its members and superusers can remove it.")));

	/* pg_cron lets a role unschedule only its own jobs, by name. */
	{
		Oid			ctypes[1] = {TEXTOID};
		Datum		cvalues[1] = {CStringGetTextDatum(cron_job_name(name))};
		bool		found;

		if (owner == GetUserId())
			(void) dsm_spi_int64("SELECT cron.unschedule(jobid)::int4 FROM cron.job"
								 " WHERE jobname OPERATOR(pg_catalog.=) $1"
								 " AND username OPERATOR(pg_catalog.=) current_user",
								 1, ctypes, cvalues, &found);
		else
			(void) dsm_spi_int64("SELECT cron.unschedule(jobid)::int4 FROM cron.job"
								 " WHERE jobname OPERATOR(pg_catalog.=) $1",
								 1, ctypes, cvalues, &found);
	}

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
