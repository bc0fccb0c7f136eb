/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		Shared memory of dsmapper: worker slots and per-database demand.
 *
 * Locking: every field of DsmShared is protected by DsmShared->lock, except
 * the condition variable, which has its own.  Latches are only set, never
 * waited on, by processes other than their owner.
 *
 * Wake-ups are sent after commit (see dsm_request_wakeup_at_commit), so a
 * worker that wakes always sees the work in its next snapshot.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/memutils.h"

#include <signal.h>

DsmShared  *dsm_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static bool wakeup_pending = false;
static List *cancel_jobs_pending = NIL;	/* job ids, in TopMemoryContext */
static bool dropper_pending = false;	/* our DROP EXTENSION mark is set */
static bool state_change_pending = false;
static bool xact_callback_registered = false;

static Size
dsm_shmem_size(void)
{
	return add_size(offsetof(DsmShared, slots),
					mul_size(sizeof(DsmWorkerSlot), dsm_max_workers));
}

/*
 * dsm_shmem_request asks the postmaster for our memory and lock.  Runs in
 * the postmaster via shmem_request_hook.
 */
void
dsm_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();

	RequestAddinShmemSpace(dsm_shmem_size());
	RequestNamedLWLockTranche("dsmapper", 1);
}

/*
 * dsm_shmem_startup attaches to (or creates) the shared state.  Runs in the
 * postmaster at start and after every crash restart, which is what resets
 * the slots after a crash.
 */
static void
dsm_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	dsm_shared = ShmemInitStruct("dsmapper", dsm_shmem_size(), &found);
	if (!found)
	{
		memset(dsm_shared, 0, dsm_shmem_size());
		dsm_shared->lock = &(GetNamedLWLockTranche("dsmapper"))->lock;
		dsm_shared->nslots = dsm_max_workers;
		dsm_shared->next_incarnation = 1;
		ConditionVariableInit(&dsm_shared->job_state_cv);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * dsm_shmem_install_hooks is called from _PG_init while preloading.
 */
void
dsm_shmem_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = dsm_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = dsm_shmem_startup;
}

/*
 * dsm_workers_available tells whether background workers can pick up work
 * in this cluster: the library was preloaded and max_workers is positive.
 */
bool
dsm_workers_available(void)
{
	return dsm_shared != NULL && dsm_shared->nslots > 0;
}

/*
 * dsm_find_database returns the entry of a database, creating it when asked
 * and there is room.  Caller holds dsm_shared->lock exclusively (or shared
 * when create is false).
 */
DsmDatabase *
dsm_find_database(Oid dboid, bool create)
{
	DsmDatabase *free_entry = NULL;

	for (int i = 0; i < DSM_MAX_DATABASES; i++)
	{
		DsmDatabase *db = &dsm_shared->databases[i];

		if (db->dboid == dboid)
			return db;
		if (db->dboid == InvalidOid && free_entry == NULL)
			free_entry = db;
	}

	if (!create)
		return NULL;

	if (free_entry == NULL)
	{
		/* Reuse an entry that wants nothing and has no live worker. */
		for (int i = 0; i < DSM_MAX_DATABASES && free_entry == NULL; i++)
		{
			DsmDatabase *db = &dsm_shared->databases[i];
			bool		has_worker = false;

			if (db->wanted > 0 || db->probe)
				continue;
			for (int s = 0; s < dsm_shared->nslots; s++)
				if (dsm_shared->slots[s].state != DSM_SLOT_FREE &&
					dsm_shared->slots[s].dboid == db->dboid)
					has_worker = true;
			if (!has_worker)
				free_entry = db;
		}
	}

	if (free_entry != NULL)
	{
		memset(free_entry, 0, sizeof(DsmDatabase));
		free_entry->dboid = dboid;
	}
	return free_entry;
}

/*
 * dsm_database_generation returns a database's wake-up generation, which
 * changes whenever news for its workers is committed; 0 without shared
 * memory or an entry.  Any process.
 */
uint64
dsm_database_generation(Oid dboid)
{
	DsmDatabase *db;
	uint64		generation = 0;

	if (!dsm_workers_available())
		return 0;
	LWLockAcquire(dsm_shared->lock, LW_SHARED);
	db = dsm_find_database(dboid, false);
	if (db != NULL)
		generation = db->generation;
	LWLockRelease(dsm_shared->lock);
	return generation;
}

/*
 * dsm_schedule_purge records when the next finished job of a database is
 * due for removal (0: none).  Any process; a no-op without shared memory.
 */
void
dsm_schedule_purge(Oid dboid, TimestampTz at)
{
	DsmDatabase *db;

	if (!dsm_workers_available())
		return;
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	db = dsm_find_database(dboid, true);
	if (db != NULL)
		db->purge_at = at;
	if (at != 0 && dsm_shared->launcher_latch)
		SetLatch(dsm_shared->launcher_latch);
	LWLockRelease(dsm_shared->lock);
}

/*
 * dsm_purge_due tells whether finished jobs of a database are due for
 * removal, and when: *at is the due time (0: none known).  Any process.
 */
bool
dsm_purge_due(Oid dboid, TimestampTz *at)
{
	DsmDatabase *db;

	*at = 0;
	if (!dsm_workers_available())
		return false;
	LWLockAcquire(dsm_shared->lock, LW_SHARED);
	db = dsm_find_database(dboid, false);
	if (db != NULL)
		*at = db->purge_at;
	LWLockRelease(dsm_shared->lock);
	return *at != 0 && *at <= GetCurrentTimestamp();
}

/*
 * dsm_wake_database tells the workers of a database that new work was
 * committed: it bumps the generation, sets the latch of every idle worker
 * there, and wakes the launcher when the database has no live worker.
 * Callable from any backend; a no-op without shared memory.
 */
void
dsm_wake_database(Oid dboid)
{
	DsmDatabase *db;
	int			live = 0;
	bool		wake_launcher = false;

	if (!dsm_workers_available())
		return;

	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	db = dsm_find_database(dboid, true);
	if (db == NULL)
	{
		dsm_shared->databases_overflowed = true;
		wake_launcher = true;
	}
	else
	{
		int			idle = 0;
		bool		any_free = false;

		db->generation++;
		if (db->wanted < 1)
			db->wanted = 1;

		for (int i = 0; i < dsm_shared->nslots; i++)
		{
			DsmWorkerSlot *slot = &dsm_shared->slots[i];

			if (slot->state == DSM_SLOT_FREE)
				any_free = true;
			if (slot->dboid != dboid)
				continue;
			if (slot->state == DSM_SLOT_STARTING ||
				slot->state == DSM_SLOT_BUSY ||
				slot->state == DSM_SLOT_IDLE)
				live++;
			if (slot->state == DSM_SLOT_IDLE && slot->latch != NULL)
			{
				SetLatch(slot->latch);
				idle++;
			}
		}

		/*
		 * Every worker here is in a turn: ask for one more if a slot is
		 * free, else have a busy worker end its turn at the next page so
		 * the new work gets a turn soon (round robin, worker.c).
		 */
		if (live > 0 && idle == 0)
		{
			if (any_free)
			{
				db->wanted = Min(dsm_shared->nslots, Max(db->wanted, live + 1));
				wake_launcher = true;
			}
			else
				db->starving = true;
		}
		if (live == 0)
		{
			bool		free_slot = false;
			int			idle_elsewhere = -1;

			wake_launcher = true;

			/*
			 * With every slot taken, ask an idle worker of another database
			 * to give its slot up (worker.c checks for waiting databases
			 * whenever it has nothing to do).
			 */
			for (int i = 0; i < dsm_shared->nslots; i++)
			{
				DsmWorkerSlot *slot = &dsm_shared->slots[i];

				if (slot->state == DSM_SLOT_FREE)
					free_slot = true;
				else if (slot->state == DSM_SLOT_IDLE && slot->latch != NULL &&
						 idle_elsewhere < 0)
					idle_elsewhere = i;
			}
			if (!free_slot && idle_elsewhere >= 0)
				SetLatch(dsm_shared->slots[idle_elsewhere].latch);
		}
	}
	if (wake_launcher && dsm_shared->launcher_latch != NULL)
		SetLatch(dsm_shared->launcher_latch);
	LWLockRelease(dsm_shared->lock);
}

/*
 * clear_dropper takes back this backend's DROP EXTENSION mark, if any.
 */
static void
clear_dropper(void)
{
	if (dropper_pending)
	{
		dropper_pending = false;
		dsm_set_extension_dropper(MyDatabaseId, false);
	}
}

static void
dsm_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wakeup_pending)
				dsm_wake_database(MyDatabaseId);
			if (state_change_pending && dsm_shared != NULL)
				ConditionVariableBroadcast(&dsm_shared->job_state_cv);
			{
				ListCell   *lc;

				foreach(lc, cancel_jobs_pending)
					(void) dsm_cancel_job_pages(MyDatabaseId, *(int64 *) lfirst(lc));
			}
			list_free_deep(cancel_jobs_pending);
			cancel_jobs_pending = NIL;
			wakeup_pending = false;
			state_change_pending = false;
			clear_dropper();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			list_free_deep(cancel_jobs_pending);
			cancel_jobs_pending = NIL;
			wakeup_pending = false;
			state_change_pending = false;
			clear_dropper();
			break;
		default:
			break;
	}
}

static void
dsm_register_xact_callback(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(dsm_xact_callback, NULL);
		xact_callback_registered = true;
	}
}

/*
 * dsm_request_wakeup_at_commit arranges for the workers of this database to
 * be woken when the current transaction commits.  Inside a transaction.
 */
void
dsm_request_wakeup_at_commit(void)
{
	dsm_register_xact_callback();
	wakeup_pending = true;
}

/*
 * dsm_cancel_job_pages_at_commit arranges for the pages in flight of a job
 * to be canceled once the current transaction commits (an abort).
 */
void
dsm_cancel_job_pages_at_commit(int64 job_id)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	int64	   *id = palloc(sizeof(int64));

	*id = job_id;
	cancel_jobs_pending = lappend(cancel_jobs_pending, id);
	MemoryContextSwitchTo(old);
	dsm_register_xact_callback();
}

/*
 * dsm_announce_job_state_change wakes dsmapper_wait() callers when the
 * current transaction commits.  Inside a transaction.
 */
void
dsm_announce_job_state_change(void)
{
	dsm_register_xact_callback();
	state_change_pending = true;
}

/*
 * dsm_cancel_job_pages cancels the pages that workers of a database are
 * running for a job (SIGINT, as pg_cancel_backend does), so an abort does
 * not wait for a long page.  The worker rolls the page back and, seeing
 * the job aborting, aborts the shard.  job_id 0 cancels the pages of every
 * job of the database.  Returns the number of workers signalled.
 */
int
dsm_cancel_job_pages(Oid dboid, int64 job_id)
{
	int			signalled = 0;

	if (dsm_shared == NULL)
		return 0;

	LWLockAcquire(dsm_shared->lock, LW_SHARED);
	for (int i = 0; i < dsm_shared->nslots; i++)
	{
		DsmWorkerSlot *slot = &dsm_shared->slots[i];

		if (slot->dboid == dboid && slot->job_id != 0 &&
			(job_id == 0 || slot->job_id == job_id) &&
			slot->state == DSM_SLOT_BUSY && slot->pid != 0 &&
			kill(slot->pid, SIGINT) == 0)
			signalled++;
	}
	LWLockRelease(dsm_shared->lock);
	return signalled;
}

/*
 * dsm_set_extension_dropper records that this backend is running (or has
 * finished) DROP EXTENSION dsmapper in a database.  The mark is cleared
 * when the transaction ends, either way (dsm_xact_callback).  Any process;
 * a no-op without shared memory.
 */
void
dsm_set_extension_dropper(Oid dboid, bool dropping)
{
	DsmDatabase *db;

	if (dsm_shared == NULL)
		return;
	if (dropping)
	{
		/* The command's locks last until the transaction ends: so does this. */
		dsm_register_xact_callback();
		dropper_pending = true;
	}
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	db = dsm_find_database(dboid, dropping);
	if (db != NULL && (dropping || db->dropping_pid == MyProcPid))
		db->dropping_pid = dropping ? MyProcPid : 0;
	LWLockRelease(dsm_shared->lock);
}

/*
 * dsm_extension_being_dropped tells a worker whose page was canceled
 * whether DROP EXTENSION dsmapper is under way in its database, in which
 * case it must not touch dsmapper's tables again: the command holds some
 * of them and waits for the rest, so any bookkeeping would deadlock with
 * it.  (A dropper that died without saying so no longer counts.)
 */
bool
dsm_extension_being_dropped(Oid dboid)
{
	DsmDatabase *db;
	pid_t		pid = 0;

	if (dsm_shared == NULL)
		return false;
	LWLockAcquire(dsm_shared->lock, LW_SHARED);
	db = dsm_find_database(dboid, false);
	if (db != NULL)
		pid = db->dropping_pid;
	LWLockRelease(dsm_shared->lock);
	return pid != 0 && kill(pid, 0) == 0;
}

/*
 * dsm_database_starving tells a worker in a turn that new work of its
 * database is waiting for a turn.  Any process; false without workers.
 */
bool
dsm_database_starving(void)
{
	DsmDatabase *db;
	bool		starving = false;

	if (!dsm_workers_available())
		return false;
	LWLockAcquire(dsm_shared->lock, LW_SHARED);
	db = dsm_find_database(MyDatabaseId, false);
	if (db != NULL)
		starving = db->starving;
	LWLockRelease(dsm_shared->lock);
	return starving;
}

/*
 * dsm_clear_starving is called after a claim: whoever waited got a turn.
 */
void
dsm_clear_starving(void)
{
	DsmDatabase *db;

	if (!dsm_workers_available())
		return;
	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	db = dsm_find_database(MyDatabaseId, false);
	if (db != NULL)
		db->starving = false;
	LWLockRelease(dsm_shared->lock);
}
