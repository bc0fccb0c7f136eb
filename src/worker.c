/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The dsmapper worker: claims tasks in one database and runs turns.
 *
 * A worker is started by the launcher for one database and one slot of
 * shared memory.  It loops: claim a task, run one turn of it, release it.
 * With nothing ready it sleeps on its latch until woken by new work, until
 * the earliest backoff ends, or until dsmapper.worker_idle_timeout passes,
 * after which it exits and gives its slot back.  A worker started as a
 * probe (after a restart, to look for work left over) exits at once when
 * it finds none.
 *
 * The worker connects as the bootstrap superuser but runs nothing of the
 * user's with that identity: bookkeeping runs as the extension owner and
 * user code as the job's owner (job.c).
 *
 * SIGTERM is handled by die(), so a fast shutdown interrupts even a long
 * mapper call; the open page is rolled back and its checkpoint is intact.
 * A shard whose turn ends by a process exit is taken by its next turn for
 * a crash and charged a failed attempt, so that a mapper that kills its
 * own backend cannot loop forever; but when the SIGTERM came from the
 * postmaster (a shutdown) or from dsmapper itself (making room for
 * DROP DATABASE), the exiting worker clears the shard's mark first and no
 * attempt is charged.
 *
 * Session state that one owner's mapper leaves behind (temporary tables,
 * prepared statements, held cursors, listeners, advisory locks) is cleared
 * after every turn, so that it never meets another owner's job.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "utils/portal.h"
#include "catalog/namespace.h"
#include "commands/sequence.h"
#include "commands/prepare.h"
#include "commands/async.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

typedef struct DsmWorkerExtra
{
	uint64		incarnation;
	bool		probe;
} DsmWorkerExtra;

static int	my_slot = -1;
static sigjmp_buf recovery_point;
static volatile sig_atomic_t terminated_by_postmaster = false;

static void clear_in_turn(int64 job_id, int32 shard);

/* The last error the recovery point caught, and how often in a row. */
static int	recovery_errcode = 0;
static char recovery_message[256];
static int	recoveries = 0;

/*
 * worker_detach marks our slot as exiting so no one counts on it; the
 * launcher frees it once the postmaster reports us gone.
 */
static void
worker_detach(int code, Datum arg)
{
	DsmWorkerSlot *slot = &dsm_shared->slots[my_slot];

	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	slot->state = DSM_SLOT_EXITING;
	slot->latch = NULL;
	LWLockRelease(dsm_shared->lock);
	if (dsm_shared->launcher_latch)
		SetLatch(dsm_shared->launcher_latch);
}

/*
 * worker_sigterm records whether the postmaster sent the SIGTERM (a
 * shutdown) and then handles it like any backend does.
 */
static void
worker_sigterm(int signo, siginfo_t *info, void *context)
{
	if (info != NULL && info->si_pid == PostmasterPid)
		terminated_by_postmaster = true;
	die(signo);
}

/*
 * worker_release_turn runs at process exit.  When the exit was asked for
 * (a shutdown, or dsmapper making room for database DDL) rather than
 * caused by the turn, it rolls back the open page and clears the shard's
 * in_turn mark, so the interrupted page is not charged as a failed
 * attempt.  Runs before the connection is shut down.
 */
static void
worker_release_turn(int code, Datum arg)
{
	DsmWorkerSlot *slot = &dsm_shared->slots[my_slot];

	if (!terminated_by_postmaster && !slot->stop_requested)
		return;
	if (slot->job_id == 0 || slot->shard == DSM_SPLIT_TASK)
		return;
	AbortOutOfAnyTransaction();
	clear_in_turn(slot->job_id, slot->shard);
}

/*
 * forget_session_state drops what user code may have left in this session
 * during a turn, as DISCARD ALL would (the GUCs are reverted already when
 * leaving the owner's identity).  Outside a transaction, no task claimed.
 */
static void
forget_session_state(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PortalHashTableDeleteAll();
	DropAllPreparedStatements();
	Async_UnlistenAll();
	LockReleaseAll(USER_LOCKMETHOD, true);
	ResetTempTableNamespace();
	ResetSequenceCaches();
	CommitTransactionCommand();
}

/*
 * count_live_workers counts the slots of a database that are or will be
 * working.  Caller holds the lock.
 */
static int
count_live_workers(Oid dboid)
{
	int			live = 0;

	for (int i = 0; i < dsm_shared->nslots; i++)
	{
		DsmWorkerSlot *slot = &dsm_shared->slots[i];

		if (slot->dboid == dboid &&
			(slot->state == DSM_SLOT_STARTING || slot->state == DSM_SLOT_BUSY ||
			 slot->state == DSM_SLOT_IDLE))
			live++;
	}
	return live;
}

/*
 * other_database_waits tells whether another database wants a worker and
 * no slot is free for it, in which case we should yield ours.  Caller
 * holds the lock.
 */
static bool
other_database_waits(Oid dboid)
{
	for (int i = 0; i < dsm_shared->nslots; i++)
		if (dsm_shared->slots[i].state == DSM_SLOT_FREE)
			return false;

	for (int i = 0; i < DSM_MAX_DATABASES; i++)
	{
		DsmDatabase *db = &dsm_shared->databases[i];

		if (db->dboid == InvalidOid || db->dboid == dboid)
			continue;
		if (db->wanted > 0 && count_live_workers(db->dboid) == 0)
			return true;
	}
	return false;
}

/*
 * claim_next claims a task in a short transaction of its own.  Returns
 * false when none is claimable; *extension_gone when dsmapper was dropped.
 */
static bool
claim_next(DsmTask *task, int *ready_count, TimestampTz *next_ready,
		   bool *extension_gone)
{
	bool		claimed = false;
	DsmIdentity internal;

	*extension_gone = false;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (!dsm_extension_exists())
		*extension_gone = true;
	else
	{
		MemoryContext cxt = CurrentMemoryContext;

		static bool purged_once = false;
		TimestampTz purge_at;

		SPI_connect();
		dsm_enter_internal(&internal);

		/*
		 * Old finished jobs go when they are due, and once at the start of
		 * a worker's life (after a restart nobody knows when they are).
		 */
		if (dsm_purge_due(MyDatabaseId, &purge_at) || !purged_once)
		{
			dsm_purge_history();
			purged_once = true;
		}
		claimed = dsm_claim_task(task, ready_count, next_ready, InvalidOid);
		if (claimed)
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			task->job_state = pstrdup(task->job_state);
			MemoryContextSwitchTo(old);
		}
		dsm_leave(&internal);
		SPI_finish();
		(void) cxt;
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	return claimed;
}

/*
 * clear_in_turn resets a shard's in_turn mark in a transaction of its own,
 * swallowing any error.  Outside a transaction.
 */
static void
clear_in_turn(int64 job_id, int32 shard)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		DsmIdentity internal;
		Oid			types[2] = {INT8OID, INT4OID};
		Datum		values[2] = {Int64GetDatum(job_id), Int32GetDatum(shard)};

		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		SPI_connect();
		dsm_enter_internal(&internal);
		dsm_spi_exec("UPDATE dsmapper.shard SET in_turn = false"
					 " WHERE job_id OPERATOR(pg_catalog.=) $1"
					 " AND shard OPERATOR(pg_catalog.=) $2",
					 2, types, values, SPI_OK_UPDATE);
		dsm_leave(&internal);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		AbortOutOfAnyTransaction();
	}
	PG_END_TRY();
}

/*
 * dsm_worker_main is the entry point of a worker.  main_arg is the slot.
 */
void
dsm_worker_main(Datum main_arg)
{
	static DsmWorkerExtra extra;	/* static: changed after sigsetjmp */
	DsmWorkerSlot *volatile slot;
	DsmDatabase *db;
	Oid			dboid;
	volatile TimestampTz last_work;

	my_slot = DatumGetInt32(main_arg);
	memcpy(&extra, MyBgworkerEntry->bgw_extra, sizeof(extra));

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	{
		struct sigaction act;

		memset(&act, 0, sizeof(act));
		act.sa_sigaction = worker_sigterm;
		act.sa_flags = SA_SIGINFO | SA_RESTART;
		sigemptyset(&act.sa_mask);
		if (sigaction(SIGTERM, &act, NULL) < 0)
			pqsignal(SIGTERM, die);
	}
	BackgroundWorkerUnblockSignals();

	/* Take over our slot, unless the launcher gave it away meanwhile. */
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	slot = &dsm_shared->slots[my_slot];
	if (slot->incarnation != extra.incarnation)
	{
		LWLockRelease(dsm_shared->lock);
		proc_exit(0);
	}
	slot->pid = MyProcPid;
	slot->latch = MyLatch;
	slot->state = DSM_SLOT_BUSY;
	dboid = slot->dboid;
	LWLockRelease(dsm_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	/* Registered after the connection, so it runs while that still works. */
	before_shmem_exit(worker_release_turn, (Datum) 0);
	pgstat_report_appname("dsmapper worker");
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	slot->connected = true;
	LWLockRelease(dsm_shared->lock);

	/*
	 * Fixed session settings: every page is READ COMMITTED so it sees a
	 * fresh snapshot, and parallel query is off because pages are small
	 * and workers already run side by side.
	 */
	SetConfigOption("default_transaction_isolation", "read committed",
					PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("max_parallel_workers_per_gather", "0",
					PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * Durability: a page's effects and its checkpoint commit in one
	 * transaction, so losing the last commits in a crash loses both and the
	 * pages are mapped again from the older checkpoint; exactly once holds
	 * without waiting for each commit's WAL flush.  Job state changes that
	 * get lost the same way are redone by the next turn.
	 */
	SetConfigOption("synchronous_commit", dsm_synchronous_commit ? "on" : "off",
					PGC_SUSET, PGC_S_OVERRIDE);

	last_work = GetCurrentTimestamp();

	/*
	 * Errors that escape a turn's own handling (a cancel that lands between
	 * pages, a broken internal table) end up here: report, clean up, back
	 * off a second, and carry on rather than exit.
	 */
	if (sigsetjmp(recovery_point, 1) != 0)
	{
		long		pause_ms;

		error_context_stack = NULL;
		HOLD_INTERRUPTS();
		{
			ErrorData  *edata;
			bool		repeated;

			MemoryContextSwitchTo(TopMemoryContext);
			edata = CopyErrorData();
			FlushErrorState();

			/*
			 * An error that keeps coming back is logged once, then at DEBUG1
			 * while it repeats, and the pauses between tries grow.
			 */
			repeated = recovery_errcode == edata->sqlerrcode &&
				strcmp(recovery_message, edata->message ? edata->message : "") == 0;
			ereport(repeated ? DEBUG1 : LOG,
					(errmsg("dsmapper worker recovered from an error: %s",
							edata->message ? edata->message : "unknown error"),
					 errdetail("SQLSTATE %s.", unpack_sql_state(edata->sqlerrcode))));
			recovery_errcode = edata->sqlerrcode;
			strlcpy(recovery_message, edata->message ? edata->message : "",
					sizeof(recovery_message));
			recoveries = repeated ? recoveries + 1 : 1;
			FreeErrorData(edata);
		}
		AbortOutOfAnyTransaction();
		RESUME_INTERRUPTS();

		/*
		 * The turn in hand did not end normally, but this process lives on:
		 * clear its in_turn mark so the next turn does not take it for a
		 * crash.  Still under our claim lock, so the mark is ours and not
		 * that of a worker that claimed the shard since.  Best effort; a
		 * failure here is only logged.
		 */
		if (slot->job_id != 0 && slot->shard != DSM_SPLIT_TASK)
			clear_in_turn(slot->job_id, slot->shard);
		LockReleaseSession(USER_LOCKMETHOD);
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(TopMemoryContext);
		FlushErrorState();
		QueryCancelPending = false;
		LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
		slot->job_id = 0;
		slot->shard = 0;
		LWLockRelease(dsm_shared->lock);
		pgstat_report_activity(STATE_IDLE, NULL);
		RESUME_INTERRUPTS();
		pause_ms = 1000L << Min(recoveries - 1, 6);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 pause_ms, PG_WAIT_EXTENSION);
	}
	PG_exception_stack = &recovery_point;

	for (;;)
	{
		DsmTask		task;
		int			ready_count;
		TimestampTz next_ready;
		bool		extension_gone;
		uint64		generation;
		long		timeout_ms;
		TimestampTz now;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			SetConfigOption("synchronous_commit", dsm_synchronous_commit ? "on" : "off",
							PGC_SUSET, PGC_S_OVERRIDE);
		}

		/*
		 * While DROP EXTENSION dsmapper runs here, keep off the tables it is
		 * taking one by one: a claim would lock some of them and deadlock
		 * with it.  Its end (either way) is a moment away.
		 */
		if (dsm_extension_being_dropped(dboid))
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 100L, PG_WAIT_EXTENSION);
			continue;
		}

		LWLockAcquire(dsm_shared->lock, LW_SHARED);
		db = dsm_find_database(dboid, false);
		generation = db ? db->generation : 0;
		LWLockRelease(dsm_shared->lock);

		/* Claim and run one turn. */
		if (claim_next(&task, &ready_count, &next_ready, &extension_gone))
		{
			bool		yield;
			char		activity[64];

			LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
			slot->state = DSM_SLOT_BUSY;
			db = dsm_find_database(dboid, true);
			if (db != NULL && ready_count > count_live_workers(dboid))
			{
				db->wanted = Min(ready_count, dsm_shared->nslots);
				if (dsm_shared->launcher_latch)
					SetLatch(dsm_shared->launcher_latch);
			}
			LWLockRelease(dsm_shared->lock);

			if (task.shard == DSM_SPLIT_TASK)
				snprintf(activity, sizeof(activity),
						 "dsmapper job " INT64_FORMAT " split", task.job_id);
			else
				snprintf(activity, sizeof(activity),
						 "dsmapper job " INT64_FORMAT " shard %d",
						 task.job_id, task.shard);
			pgstat_report_activity(STATE_RUNNING, activity);
			LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
			slot->job_id = task.job_id;
			slot->shard = task.shard;
			LWLockRelease(dsm_shared->lock);

			dsm_clear_starving();
			(void) dsm_run_task(&task, false, 0);

			LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
			slot->job_id = 0;
			slot->shard = 0;
			LWLockRelease(dsm_shared->lock);
			dsm_release_task(&task);
			pgstat_report_activity(STATE_IDLE, NULL);
			pfree(task.job_state);
			forget_session_state();
			recoveries = 0;
			recovery_errcode = 0;
			last_work = GetCurrentTimestamp();

			/* Give the slot to a database that has none, round robin. */
			LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
			yield = other_database_waits(dboid);
			if (yield)
				slot->state = DSM_SLOT_EXITING;
			LWLockRelease(dsm_shared->lock);
			if (yield)
			{
				dsm_wake_database(dboid);
				proc_exit(0);
			}
			continue;
		}

		if (extension_gone)
		{
			LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
			slot->state = DSM_SLOT_EXITING;
			db = dsm_find_database(dboid, false);
			if (db && count_live_workers(dboid) == 0)
				db->wanted = 0;
			LWLockRelease(dsm_shared->lock);
			proc_exit(0);
		}

		/* Nothing ready: sleep, or leave when idle long enough. */
		now = GetCurrentTimestamp();
		LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
		db = dsm_find_database(dboid, true);
		if (db != NULL && db->generation != generation)
		{
			LWLockRelease(dsm_shared->lock);
			continue;
		}
		if ((next_ready == 0 &&
			 (extra.probe ||
			  TimestampDifferenceExceeds(last_work, now,
										 dsm_worker_idle_timeout * 1000))) ||
			other_database_waits(dboid))
		{
			/*
			 * Leave, and tell the launcher this database needs no more
			 * workers than those still working: nothing was ready for us.
			 */
			slot->state = DSM_SLOT_EXITING;
			if (db)
				db->wanted = Min(db->wanted, count_live_workers(dboid));
			LWLockRelease(dsm_shared->lock);
			if (next_ready != 0)
				dsm_wake_database(dboid);
			proc_exit(0);
		}
		slot->state = DSM_SLOT_IDLE;
		/* Nothing ready: no more workers needed than are working now. */
		if (db)
			db->wanted = Min(db->wanted, count_live_workers(dboid));
		LWLockRelease(dsm_shared->lock);

		timeout_ms = dsm_worker_idle_timeout * 1000L -
			TimestampDifferenceMilliseconds(last_work, now);
		if (next_ready != 0)
			timeout_ms = Min(timeout_ms,
							 TimestampDifferenceMilliseconds(now, next_ready) + 1);
		{
			TimestampTz purge_at;

			if (!dsm_purge_due(dboid, &purge_at) && purge_at != 0)
				timeout_ms = Min(timeout_ms,
								 TimestampDifferenceMilliseconds(now, purge_at) + 1);
		}
		timeout_ms = Max(timeout_ms, 1);
		extra.probe = false;

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout_ms, PG_WAIT_EXTENSION);
	}
}
