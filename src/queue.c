/*-------------------------------------------------------------------------
 *
 * queue.c
 *		Claiming work, settling shards and rolling up job states.
 *
 * dsmapper.queue holds one row per task that still has work: a shard that
 * is not final and not paused, or the split task (shard -1) of a starting
 * job.  A process claims a task by taking its claim lock (job.c) without
 * waiting; the lock, not the row, is the claim, so a process that dies
 * leaves nothing behind but a row that the next claimer picks up.
 *
 * Lock order, to stay free of deadlocks: task claim lock, then the job row,
 * then shard rows.  Every job state change locks the job row FOR NO KEY
 * UPDATE, and so does the roll-up, which makes "the last shard finished" a
 * decision exactly one transaction takes.  (Not FOR UPDATE: updating a
 * shard row twice in one transaction makes the foreign key check take FOR
 * KEY SHARE on the job row, and FOR UPDATE would then deadlock two workers
 * finishing shards at the same moment.)
 *
 * All functions here run inside a transaction with SPI connected and the
 * internal identity (job.c) in effect.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

/*
 * dsm_claim_task looks for a task to work on and takes its session claim
 * lock.  Returns false when nothing is claimable now; *ready_count is the
 * number of tasks that were ready (including those held by others) and
 * *next_ready the earliest time a waiting task becomes ready (0 if none).
 * Tasks of paused and aborting jobs are returned too: the claimer settles
 * them.  With only_for set, only jobs that role may control are claimed.
 *
 * Order: jobs with the fewest shards in a turn first (a new job comes
 * before more shards of a busy one); among those, the job whose latest
 * turn is oldest, jobs that never had one first (so workers that end their
 * turns at the same moment for a new job do not both go back to the old
 * job's untouched shards); then the task whose last turn is oldest, tasks
 * that never had one first.
 */
bool
dsm_claim_task(DsmTask *task, int *ready_count, TimestampTz *next_ready,
			   Oid only_for)
{
	int			rc;
	uint64		n;
	SPITupleTable *tuptable;
	bool		claimed = false;

	*ready_count = 0;
	*next_ready = 0;

	rc = SPI_execute("SELECT q.job_id, q.shard, j.state,"
					 " q.ready_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()"
					 "   OR j.state OPERATOR(pg_catalog.=) ANY ('{paused,aborting}'::text[]),"
					 " q.ready_at, j.max_running_shards, j.owner"
					 " FROM dsmapper.queue q JOIN dsmapper.job j"
					 "   ON j.job_id OPERATOR(pg_catalog.=) q.job_id"
					 " WHERE j.state OPERATOR(pg_catalog.=)"
					 "   ANY ('{starting,running,paused,aborting}'::text[])"
					 " ORDER BY (SELECT count(*) FROM dsmapper.shard s"
					 "   WHERE s.job_id OPERATOR(pg_catalog.=) q.job_id AND s.in_turn),"
					 " (SELECT max(q2.last_turn) FROM dsmapper.queue q2"
					 "   WHERE q2.job_id OPERATOR(pg_catalog.=) q.job_id) NULLS FIRST,"
					 " q.last_turn NULLS FIRST, q.job_id, q.shard",
					 false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read the queue");

	tuptable = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tuple = tuptable->vals[i];
		TupleDesc	desc = tuptable->tupdesc;
		bool		isnull;
		int64		job_id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		int32		shard = DatumGetInt32(SPI_getbinval(tuple, desc, 2, &isnull));
		bool		ready = DatumGetBool(SPI_getbinval(tuple, desc, 4, &isnull));
		TimestampTz ready_at = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 5, &isnull));

		/*
		 * In a session, only the caller's own jobs (or any, for a
		 * superuser): running someone else's mapper in one's own session
		 * would let one's temporary objects and settings meet their code.
		 */
		if (OidIsValid(only_for) && !superuser_arg(only_for))
		{
			Oid			owner = DatumGetObjectId(SPI_getbinval(tuple, desc, 7, &isnull));

			if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(owner)) ||
				!is_member_of_role(only_for, owner))
				continue;
		}

		if (!ready)
		{
			if (*next_ready == 0 || ready_at < *next_ready)
				*next_ready = ready_at;
			continue;
		}
		(*ready_count)++;

		if (claimed || !dsm_lock_task(job_id, shard, true, false))
			continue;

		/*
		 * The row may have been finished and unlocked by someone else since
		 * our snapshot; look again with a fresh one.
		 */
		{
			Oid			types[2] = {INT8OID, INT4OID};
			Datum		values[2] = {Int64GetDatum(job_id), Int32GetDatum(shard)};
			bool		found;
			SPITupleTable *saved = SPI_tuptable;

			(void) dsm_spi_int64("SELECT 1 FROM dsmapper.queue"
								 " WHERE job_id OPERATOR(pg_catalog.=) $1"
								 " AND shard OPERATOR(pg_catalog.=) $2",
								 2, types, values, &found);
			SPI_tuptable = saved;
			if (!found)
			{
				dsm_unlock_task(job_id, shard);
				continue;
			}
		}

		/*
		 * A job with max_running_shards set runs at most that many shards
		 * at once: each turn also holds one of the job's slots.
		 */
		task->running_slot = -1;
		{
			Datum		cap = SPI_getbinval(tuple, desc, 6, &isnull);

			if (!isnull && shard != DSM_SPLIT_TASK)
			{
				for (int32 k = 0; k < DatumGetInt32(cap); k++)
				{
					if (dsm_lock_running_slot(job_id, k))
					{
						task->running_slot = k;
						break;
					}
				}
				if (task->running_slot < 0)
				{
					dsm_unlock_task(job_id, shard);
					continue;
				}
			}
		}

		task->job_id = job_id;
		task->shard = shard;
		task->job_state = TextDatumGetCString(SPI_getbinval(tuple, desc, 3, &isnull));
		claimed = true;
	}

	return claimed;
}

/*
 * dsm_notify_job_state sends NOTIFY dsmapper for a job's new state and
 * wakes dsmapper_wait() callers, both at commit.
 */
void
dsm_notify_job_state(int64 job_id, const char *state)
{
	char	   *payload = psprintf("{\"job\": " INT64_FORMAT ", \"state\": \"%s\"}",
								   job_id, state);

	Async_Notify("dsmapper", payload);
	dsm_announce_job_state_change();
}

/*
 * dsm_purge_history removes the finished jobs older than
 * dsmapper.history_retention, with their shards and queue rows, and tells
 * the workers and the launcher when the next one is due (the earliest
 * finish plus the retention), so removal happens on time without any
 * polling.  SPI connected, internal identity.
 */
void
dsm_purge_history(void)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum((int64) dsm_history_retention)};
	bool		found;
	int64		next_us;

	if (dsm_history_retention <= 0)
	{
		dsm_schedule_purge(MyDatabaseId, 0);
		return;
	}
	dsm_spi_exec("DELETE FROM dsmapper.job"
				 " WHERE state OPERATOR(pg_catalog.=) ANY ('{succeeded,failed,aborted}'::text[])"
				 " AND finished OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp()"
				 " OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))",
				 1, types, values, SPI_OK_DELETE);

	/* Microseconds since the PostgreSQL epoch, as TimestampTz counts. */
	next_us = dsm_spi_int64("SELECT ((extract(epoch FROM min(finished)"
							" OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $1))"
							" OPERATOR(pg_catalog.-) 946684800) * 1000000)::int8"
							" FROM dsmapper.job"
							" WHERE state OPERATOR(pg_catalog.=) ANY ('{succeeded,failed,aborted}'::text[])",
							1, types, values, &found);
	dsm_schedule_purge(MyDatabaseId, found ? (TimestampTz) next_us : 0);
}

/*
 * dsm_set_job_state changes a job's state (the caller has locked the job
 * row) and announces it.  error, when not NULL, replaces the job's error.
 */
void
dsm_set_job_state(int64 job_id, const char *state, const char *error)
{
	Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', error ? ' ' : 'n'};
	int			rc;

	values[0] = Int64GetDatum(job_id);
	values[1] = CStringGetTextDatum(state);
	values[2] = error ? CStringGetTextDatum(error) : (Datum) 0;

	rc = SPI_execute_with_args(
		"UPDATE dsmapper.job SET state = $2,"
		" updated = pg_catalog.clock_timestamp(),"
		" error = coalesce($3, error),"
		" finished = CASE WHEN $2 OPERATOR(pg_catalog.=)"
		"   ANY ('{succeeded,failed,aborted}'::text[])"
		"   THEN pg_catalog.clock_timestamp() END"
		" WHERE job_id OPERATOR(pg_catalog.=) $1",
		3, types, values, nulls, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "dsmapper: could not update job " INT64_FORMAT, job_id);

	/* A final job has no work left anywhere. */
	if (dsm_is_final_job_state(state))
		dsm_spi_exec("DELETE FROM dsmapper.queue WHERE job_id OPERATOR(pg_catalog.=) $1",
					 1, types, values, SPI_OK_DELETE);

	dsm_notify_job_state(job_id, state);
}

/*
 * dsm_settle_shard brings a shard in line with its job's state when the
 * job is paused or aborting.  The caller holds the shard's claim lock.
 */
void
dsm_settle_shard(int64 job_id, int32 shard, const char *job_state)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(job_id), Int32GetDatum(shard)};

	if (strcmp(job_state, "aborting") == 0)
	{
		dsm_finish_shard(job_id, shard, "aborted");
		return;
	}

	if (strcmp(job_state, "paused") == 0)
	{
		dsm_spi_exec("UPDATE dsmapper.shard SET state = 'paused',"
					 " updated = pg_catalog.clock_timestamp()"
					 " WHERE job_id OPERATOR(pg_catalog.=) $1"
					 " AND shard OPERATOR(pg_catalog.=) $2"
					 " AND state OPERATOR(pg_catalog.=) ANY ('{starting,running}'::text[])",
					 2, types, values, SPI_OK_UPDATE);
		dsm_spi_exec("DELETE FROM dsmapper.queue"
					 " WHERE job_id OPERATOR(pg_catalog.=) $1"
					 " AND shard OPERATOR(pg_catalog.=) $2",
					 2, types, values, SPI_OK_DELETE);
	}
}

/*
 * dsm_finish_shard gives a shard a final state, removes it from the queue
 * and rolls the job up.  The caller holds the shard's claim lock.
 */
void
dsm_finish_shard(int64 job_id, int32 shard, const char *state)
{
	Oid			types[3] = {INT8OID, INT4OID, TEXTOID};
	Datum		values[3] = {Int64GetDatum(job_id), Int32GetDatum(shard),
	CStringGetTextDatum(state)};

	dsm_spi_exec("UPDATE dsmapper.shard SET state = $3,"
				 " updated = pg_catalog.clock_timestamp()"
				 " WHERE job_id OPERATOR(pg_catalog.=) $1"
				 " AND shard OPERATOR(pg_catalog.=) $2"
				 " AND state OPERATOR(pg_catalog.<>) ALL ('{succeeded,failed,aborted}'::text[])",
				 3, types, values, SPI_OK_UPDATE);
	dsm_spi_exec("DELETE FROM dsmapper.queue"
				 " WHERE job_id OPERATOR(pg_catalog.=) $1"
				 " AND shard OPERATOR(pg_catalog.=) $2",
				 2, types, values, SPI_OK_DELETE);
	dsm_rollup_job(job_id);
}

/*
 * dsm_rollup_job gives a job its final state once every shard is final:
 * aborted if any shard was aborted, else failed if any failed, else
 * succeeded.  Locks the job row.  Logs the job's end.
 */
void
dsm_rollup_job(int64 job_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(job_id)};
	int			rc;
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;
	char	   *state;
	int64		open_shards;
	int64		aborted;
	int64		failed;
	int64		nshards;
	int64		processed;
	double		seconds;
	char	   *outcome;
	char	   *error = NULL;

	rc = SPI_execute_with_args("SELECT state FROM dsmapper.job"
							   " WHERE job_id OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE",
							   1, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		return;
	state = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	if (dsm_is_final_job_state(state) || strcmp(state, "starting") == 0)
		return;

	rc = SPI_execute_with_args(
		"SELECT count(*) FILTER (WHERE s.state OPERATOR(pg_catalog.<>)"
		"        ALL ('{succeeded,failed,aborted}'::text[])),"
		" count(*) FILTER (WHERE s.state OPERATOR(pg_catalog.=) 'aborted'),"
		" count(*) FILTER (WHERE s.state OPERATOR(pg_catalog.=) 'failed'),"
		" count(*), coalesce(sum(s.processed), 0)::int8,"
		" extract(epoch FROM pg_catalog.clock_timestamp()"
		"   OPERATOR(pg_catalog.-) coalesce(j.started, j.created))::float8,"
		" (SELECT pg_catalog.format('shard %s: %s', f.shard, f.error)"
		"    FROM dsmapper.shard f WHERE f.job_id OPERATOR(pg_catalog.=) $1"
		"    AND f.state OPERATOR(pg_catalog.=) 'failed'"
		"    ORDER BY f.shard LIMIT 1)"
		" FROM dsmapper.job j LEFT JOIN dsmapper.shard s"
		"   ON s.job_id OPERATOR(pg_catalog.=) j.job_id"
		" WHERE j.job_id OPERATOR(pg_catalog.=) $1"
		" GROUP BY j.started, j.created",
		1, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "dsmapper: could not count shards of job " INT64_FORMAT, job_id);

	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	open_shards = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
	aborted = DatumGetInt64(SPI_getbinval(tuple, desc, 2, &isnull));
	failed = DatumGetInt64(SPI_getbinval(tuple, desc, 3, &isnull));
	nshards = DatumGetInt64(SPI_getbinval(tuple, desc, 4, &isnull));
	processed = DatumGetInt64(SPI_getbinval(tuple, desc, 5, &isnull));
	seconds = DatumGetFloat8(SPI_getbinval(tuple, desc, 6, &isnull));
	{
		Datum		d = SPI_getbinval(tuple, desc, 7, &isnull);

		if (!isnull)
			error = TextDatumGetCString(d);
	}

	if (open_shards > 0)
		return;

	if (aborted > 0)
		outcome = "aborted";
	else if (failed > 0)
		outcome = "failed";
	else
		outcome = "succeeded";

	dsm_set_job_state(job_id, outcome, failed > 0 ? error : NULL);

	dsm_purge_history();

	ereport(dsm_log_level_jobs,
			(errmsg("dsmapper job " INT64_FORMAT " in database \"%s\" %s after %.1f s: "
					INT64_FORMAT " rows in " INT64_FORMAT " shards, "
					INT64_FORMAT " failed, " INT64_FORMAT " aborted",
					job_id, get_database_name(MyDatabaseId), outcome, seconds,
					processed, nshards, failed, aborted),
			 errhidestmt(true)));
}
