/*-------------------------------------------------------------------------
 *
 * utility.c
 *		Keep dsmapper workers out of the way of database-wide DDL.
 *
 * DROP DATABASE, ALTER DATABASE ... RENAME and CREATE DATABASE ... TEMPLATE
 * refuse to run while other sessions are connected to the database they
 * name.  An idle dsmapper worker may stay connected for
 * dsmapper.worker_idle_timeout, so before such a command runs, the
 * backend asks the workers of that database to exit and waits (briefly)
 * for them to go.  The database is also marked as wanting no workers, so
 * the launcher does not start new ones meanwhile; if the command fails, or
 * the database stays (a rename, a copy), a probe brings workers back.  Only
 * a role that could run the command (the database's owner, or for a copy
 * a role that may create databases from that template) makes workers
 * leave.
 *
 * DROP EXTENSION dsmapper needs every dsmapper table to itself: the pages
 * in flight in this database are canceled first, so the command does not
 * wait for a long mapper call.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include <signal.h>

static ProcessUtility_hook_type prev_process_utility = NULL;

/*
 * release_database asks the workers of a database to exit and waits up to
 * a few seconds for them.  Any backend; a no-op without shared memory.
 */
static Oid
release_database(const char *dbname, bool as_template)
{
	Oid			dboid;
	TimestampTz deadline;

	if (!dsm_workers_available() || dbname == NULL)
		return InvalidOid;
	dboid = get_database_oid(dbname, true);
	if (!OidIsValid(dboid) || dboid == MyDatabaseId)
		return InvalidOid;

	/* Someone who cannot run the command does not disturb the workers. */
	if (!pg_database_ownercheck(dboid, GetUserId()))
	{
		HeapTuple	tuple;
		bool		is_template = false;

		if (!as_template || !have_createdb_privilege())
			return InvalidOid;
		tuple = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(dboid));
		if (HeapTupleIsValid(tuple))
		{
			is_template = ((Form_pg_database) GETSTRUCT(tuple))->datistemplate;
			ReleaseSysCache(tuple);
		}
		if (!is_template)
			return InvalidOid;
	}

	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 5000);
	for (;;)
	{
		int			remaining = 0;
		DsmDatabase *db;

		LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
		db = dsm_find_database(dboid, false);
		if (db != NULL)
		{
			db->wanted = 0;
			db->probe = false;
		}
		for (int i = 0; i < dsm_shared->nslots; i++)
		{
			DsmWorkerSlot *slot = &dsm_shared->slots[i];

			if (slot->dboid != dboid || slot->state == DSM_SLOT_FREE)
				continue;
			if (slot->pid != 0 && kill(slot->pid, 0) == 0)
			{
				remaining++;
				slot->stop_requested = true;
				(void) kill(slot->pid, SIGTERM);
			}
		}
		LWLockRelease(dsm_shared->lock);

		if (remaining == 0 || GetCurrentTimestamp() >= deadline)
			break;
		CHECK_FOR_INTERRUPTS();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 50L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	return dboid;
}

/*
 * probe_database asks the launcher to look for work in a database again,
 * after release_database.  Any backend.
 */
static void
probe_database(Oid dboid)
{
	DsmDatabase *db;

	LWLockAcquire(dsm_shared->lock, LW_EXCLUSIVE);
	db = dsm_find_database(dboid, false);
	if (db != NULL)
		db->probe = true;
	if (dsm_shared->launcher_latch)
		SetLatch(dsm_shared->launcher_latch);
	LWLockRelease(dsm_shared->lock);
}

/*
 * drops_this_extension tells whether a statement is DROP EXTENSION naming
 * dsmapper, run by a role that may drop it.
 */
static bool
drops_this_extension(Node *parsetree)
{
	DropStmt   *drop;
	ListCell   *lc;

	if (!IsA(parsetree, DropStmt))
		return false;
	drop = (DropStmt *) parsetree;
	if (drop->removeType != OBJECT_EXTENSION)
		return false;
	foreach(lc, drop->objects)
	{
		Node	   *name = lfirst(lc);
		Oid			extoid;

		if (!IsA(name, String) || strcmp(strVal(name), DSM_EXTENSION_NAME) != 0)
			continue;
		extoid = get_extension_oid(DSM_EXTENSION_NAME, true);
		return OidIsValid(extoid) && pg_extension_ownercheck(extoid, GetUserId());
	}
	return false;
}

static void
dsm_process_utility(PlannedStmt *pstmt, const char *queryString,
					bool readOnlyTree, ProcessUtilityContext context,
					ParamListInfo params, QueryEnvironment *queryEnv,
					DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;
	Oid			released = InvalidOid;
	bool		dropping = false;

	if (IsA(parsetree, DropdbStmt))
	{
		released = release_database(((DropdbStmt *) parsetree)->dbname, false);
		dropping = true;
	}
	else if (IsA(parsetree, RenameStmt) &&
			 ((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
		released = release_database(((RenameStmt *) parsetree)->subname, false);
	else if (IsA(parsetree, CreatedbStmt))
	{
		ListCell   *lc;

		foreach(lc, ((CreatedbStmt *) parsetree)->options)
		{
			DefElem    *option = lfirst_node(DefElem, lc);

			if (strcmp(option->defname, "template") == 0 && option->arg != NULL)
				released = release_database(defGetString(option), true);
		}
	}
	else if (dsm_workers_available() && drops_this_extension(parsetree))
	{
		/*
		 * Say so first (until the transaction ends): the canceled workers
		 * then leave our tables alone.
		 */
		dsm_set_extension_dropper(MyDatabaseId, true);
		(void) dsm_cancel_job_pages(MyDatabaseId, 0);
	}

	PG_TRY();
	{
		if (prev_process_utility)
			prev_process_utility(pstmt, queryString, readOnlyTree, context,
								 params, queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
									params, queryEnv, dest, qc);
	}
	PG_CATCH();
	{
		/* The database is still there: let its workers come back. */
		if (OidIsValid(released))
			probe_database(released);
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (OidIsValid(released) && !dropping)
		probe_database(released);
}

/*
 * dsm_install_utility_hook is called from _PG_init while preloading.
 */
void
dsm_install_utility_hook(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = dsm_process_utility;
}
