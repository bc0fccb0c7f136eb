/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The dsmapper launcher: starts workers where there is work.
 *
 * One launcher runs per cluster, connected to no database.  It owns the
 * worker slots of shared memory: it hands a slot to a database that wants
 * workers, registers a dynamic background worker for it, and frees the
 * slot when the postmaster reports that worker gone.  It never queries a
 * database and sleeps on its latch until a backend or a worker sets it, so
 * an idle cluster costs nothing.
 *
 * After the launcher starts (server start, crash restart) it probes every
 * database that accepts connections once: a probe worker looks for work
 * left over and exits at once if there is none.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

typedef struct DsmWorkerExtra
{
	uint64		incarnation;
	bool		probe;
} DsmWorkerExtra;

static BackgroundWorkerHandle **handles;
static bool registration_failing = false;

/*
 * dsm_register_launcher registers the launcher.  Called from _PG_init in
 * the postmaster while preloading.
 */
void
dsm_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "dsmapper");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "dsm_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "dsmapper launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "dsmapper launcher");
	RegisterBackgroundWorker(&worker);
}

/*
 * probe_all_databases marks every database that accepts connections for a
 * probe.  Runs in its own transaction.
 */
static void
probe_all_databases(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	List	   *dboids = NIL;
	ListCell   *lc;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database form = (Form_pg_database) GETSTRUCT(tuple);

		if (form->datallowconn && !form->datistemplate)
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			dboids = lappend_oid(dboids, form->oid);
			MemoryContextSwitchTo(old);
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();

	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	dsm_shared->databases_overflowed = false;
	foreach(lc, dboids)
	{
		DsmDatabase *db = dsm_find_database(lfirst_oid(lc), true);

		if (db != NULL)
			db->probe = true;
	}
	LWLockRelease(dsm_shared->lock);
	list_free(dboids);
}

/*
 * reap_workers frees the slots of workers that have stopped.
 */
static void
reap_workers(void)
{
	for (int i = 0; i < dsm_shared->nslots; i++)
	{
		pid_t		pid;

		if (handles[i] == NULL)
		{
			/* A slot left by a previous launcher, whose worker is gone. */
			LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
			if (dsm_shared->slots[i].state == DSM_SLOT_EXITING)
				memset(&dsm_shared->slots[i], 0, sizeof(DsmWorkerSlot));
			LWLockRelease(dsm_shared->lock);
			continue;
		}
		if (GetBackgroundWorkerPid(handles[i], &pid) != BGWH_STOPPED)
			continue;

		LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);

		/*
		 * A worker that never attached could not connect (the database was
		 * dropped, or does not accept connections): stop asking for
		 * workers there until new work is announced.
		 */
		if (!dsm_shared->slots[i].connected)
		{
			DsmDatabase *db = dsm_find_database(dsm_shared->slots[i].dboid, false);

			if (db != NULL)
			{
				db->wanted = 0;
				db->probe = false;
			}
		}
		memset(&dsm_shared->slots[i], 0, sizeof(DsmWorkerSlot));
		LWLockRelease(dsm_shared->lock);
		pfree(handles[i]);
		handles[i] = NULL;
	}
}

/*
 * probe_for_purges starts a probe in every database without a live worker
 * whose finished jobs are due for removal (a worker removes them when it
 * claims work; a database with live workers has them do it).  Returns the
 * milliseconds until the next removal is due, or -1 when none is known.
 */
static long
probe_for_purges(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		next_ms = -1;

	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < DSM_MAX_DATABASES; i++)
	{
		DsmDatabase *db = &dsm_shared->databases[i];
		bool		live = false;

		if (db->dboid == InvalidOid || db->purge_at == 0)
			continue;
		for (int s = 0; s < dsm_shared->nslots && !live; s++)
			if (dsm_shared->slots[s].dboid == db->dboid &&
				dsm_shared->slots[s].state != DSM_SLOT_FREE &&
				dsm_shared->slots[s].state != DSM_SLOT_EXITING)
				live = true;
		if (live)
			continue;
		if (db->purge_at <= now)
		{
			db->probe = true;
			db->purge_at = 0;
		}
		else
		{
			long		ms = TimestampDifferenceMilliseconds(now, db->purge_at) + 1;

			next_ms = next_ms < 0 ? ms : Min(next_ms, ms);
		}
	}
	LWLockRelease(dsm_shared->lock);
	return next_ms;
}

typedef struct StartRequest
{
	int			slot;
	Oid			dboid;
	uint64		incarnation;
	bool		probe;
} StartRequest;

/*
 * start_workers starts workers for databases that want more than they
 * have, as long as slots are free.  Databases are served round robin so
 * that one busy database cannot starve the others.  Returns false when a
 * registration failed and should be retried later.
 */
static bool
start_workers(void)
{
	static int	next_db = 0;
	StartRequest *requests;
	int			nrequests = 0;
	bool		ok = true;

	requests = palloc(sizeof(StartRequest) * Max(dsm_shared->nslots, 1));

	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	for (int round = 0; round < DSM_MAX_DATABASES; round++)
	{
		DsmDatabase *db = &dsm_shared->databases[(next_db + round) % DSM_MAX_DATABASES];
		int			live = 0;
		int			want;

		if (db->dboid == InvalidOid)
			continue;
		for (int s = 0; s < dsm_shared->nslots; s++)
			if (dsm_shared->slots[s].state != DSM_SLOT_FREE &&
				dsm_shared->slots[s].state != DSM_SLOT_EXITING &&
				dsm_shared->slots[s].dboid == db->dboid)
				live++;
		want = Max(db->wanted, db->probe ? 1 : 0);

		while (live < want)
		{
			int			free_slot = -1;

			for (int s = 0; s < dsm_shared->nslots && free_slot < 0; s++)
				if (dsm_shared->slots[s].state == DSM_SLOT_FREE &&
					handles[s] == NULL)
					free_slot = s;
			if (free_slot < 0)
				break;

			dsm_shared->slots[free_slot].state = DSM_SLOT_STARTING;
			dsm_shared->slots[free_slot].dboid = db->dboid;
			dsm_shared->slots[free_slot].incarnation = dsm_shared->next_incarnation++;
			dsm_shared->slots[free_slot].stop_requested = false;
			requests[nrequests].slot = free_slot;
			requests[nrequests].dboid = db->dboid;
			requests[nrequests].incarnation = dsm_shared->slots[free_slot].incarnation;
			requests[nrequests].probe = db->probe && db->wanted == 0;
			nrequests++;
			live++;
			/* Next time, start with the database after this one. */
			next_db = (next_db + round + 1) % DSM_MAX_DATABASES;
		}
		db->probe = false;
	}
	LWLockRelease(dsm_shared->lock);

	for (int i = 0; i < nrequests; i++)
	{
		BackgroundWorker worker;
		DsmWorkerExtra extra;

		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
			BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = BGW_NEVER_RESTART;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "dsmapper");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "dsm_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "dsmapper worker %d", requests[i].slot);
		snprintf(worker.bgw_type, BGW_MAXLEN, "dsmapper worker");
		worker.bgw_main_arg = Int32GetDatum(requests[i].slot);
		worker.bgw_notify_pid = MyProcPid;
		extra.incarnation = requests[i].incarnation;
		extra.probe = requests[i].probe;
		memcpy(worker.bgw_extra, &extra, sizeof(extra));

		if (ok && RegisterDynamicBackgroundWorker(&worker, &handles[requests[i].slot]))
		{
			if (registration_failing)
				ereport(LOG,
						(errmsg("dsmapper launcher can start workers again")));
			registration_failing = false;
			continue;
		}

		/* No background worker slot: log once, retry later. */
		if (ok && !registration_failing)
			ereport(LOG,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("dsmapper launcher could not start a worker"),
					 errhint("Raise max_worker_processes to at least dsmapper.max_workers plus one more than other extensions use.")));
		registration_failing = true;
		ok = false;
		handles[requests[i].slot] = NULL;
		LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
		memset(&dsm_shared->slots[requests[i].slot], 0, sizeof(DsmWorkerSlot));
		{
			DsmDatabase *db = dsm_find_database(requests[i].dboid, false);

			if (db && requests[i].probe)
				db->probe = true;
		}
		LWLockRelease(dsm_shared->lock);
	}
	pfree(requests);
	return ok;
}

static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	dsm_shared->launcher_latch = NULL;
	dsm_shared->launcher_pid = 0;
	LWLockRelease(dsm_shared->lock);
}

/*
 * dsm_launcher_main is the entry point of the launcher.
 */
void
dsm_launcher_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	if (IsBinaryUpgrade)
		proc_exit(0);

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	handles = MemoryContextAllocZero(TopMemoryContext,
									 sizeof(BackgroundWorkerHandle *) *
									 Max(dsm_shared->nslots, 1));

	/*
	 * Slots of a previous launcher are stale: after a crash restart shared
	 * memory is new anyway, and after a launcher restart without one, its
	 * workers still run but we hold no handles for them; wait for those to
	 * go by leaving their slots alone until they are marked exiting.
	 */
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	dsm_shared->launcher_latch = MyLatch;
	dsm_shared->launcher_pid = MyProcPid;
	for (int i = 0; i < dsm_shared->nslots; i++)
		if (dsm_shared->slots[i].state == DSM_SLOT_EXITING ||
			dsm_shared->slots[i].state == DSM_SLOT_STARTING)
			memset(&dsm_shared->slots[i], 0, sizeof(DsmWorkerSlot));
	LWLockRelease(dsm_shared->lock);
	before_shmem_exit(launcher_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("dsmapper launcher started with %d worker slots",
					dsm_shared->nslots)));

	probe_all_databases();

	while (!ShutdownRequestPending)
	{
		long		timeout = -1;
		int			events = WL_LATCH_SET | WL_EXIT_ON_PM_DEATH;
		bool		overflowed;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		LWLockAcquire(dsm_shared->lock, LW_SHARED);
		overflowed = dsm_shared->databases_overflowed;
		LWLockRelease(dsm_shared->lock);
		if (overflowed)
			probe_all_databases();

		reap_workers();
		{
			long		purge_ms = probe_for_purges();

			if (purge_ms >= 0)
			{
				timeout = purge_ms;
				events |= WL_TIMEOUT;
			}
		}
		if (!start_workers())
		{
			timeout = timeout >= 0 ? Min(timeout, 1000) : 1000;
			events |= WL_TIMEOUT;
		}

		(void) WaitLatch(MyLatch, events, timeout, PG_WAIT_EXTENSION);
	}

	proc_exit(0);
}
