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
 * the launcher does not start new ones meanwhile.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "tcop/utility.h"
#include "utils/timestamp.h"

#include <signal.h>

static ProcessUtility_hook_type prev_process_utility = NULL;

/*
 * release_database asks the workers of a database to exit and waits up to
 * a few seconds for them.  Any backend; a no-op without shared memory.
 */
static void
release_database(const char *dbname)
{
	Oid			dboid;
	TimestampTz deadline;

	if (!dsm_workers_available() || dbname == NULL)
		return;
	dboid = get_database_oid(dbname, true);
	if (!OidIsValid(dboid) || dboid == MyDatabaseId)
		return;

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
}

static void
dsm_process_utility(PlannedStmt *pstmt, const char *queryString,
					bool readOnlyTree, ProcessUtilityContext context,
					ParamListInfo params, QueryEnvironment *queryEnv,
					DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, DropdbStmt))
		release_database(((DropdbStmt *) parsetree)->dbname);
	else if (IsA(parsetree, RenameStmt) &&
			 ((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
		release_database(((RenameStmt *) parsetree)->subname);
	else if (IsA(parsetree, CreatedbStmt))
	{
		ListCell   *lc;

		foreach(lc, ((CreatedbStmt *) parsetree)->options)
		{
			DefElem    *option = lfirst_node(DefElem, lc);

			if (strcmp(option->defname, "template") == 0 && option->arg != NULL)
				release_database(defGetString(option));
		}
	}

	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context,
							 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
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
