/*-------------------------------------------------------------------------
 *
 * guc.c
 *		Configuration parameters of dsmapper.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "miscadmin.h"
#include "utils/guc.h"

/* Workers across the whole cluster; needs a restart to change. */
int			dsm_max_workers = 4;

/* Seconds an idle worker waits for new work before giving its slot back. */
int			dsm_worker_idle_timeout = 60;

/* Longest a page may run in a worker, in milliseconds; 0: no limit. */
int			dsm_page_timeout = 0;

/* Seconds finished jobs are kept; 0 keeps them forever. */
int			dsm_history_retention = 7 * 24 * 3600;

/* Whether workers wait for the WAL flush of every page commit. */
bool		dsm_synchronous_commit = false;

/* Level of the job start and end messages. */
int			dsm_log_level_jobs = LOG;

static const struct config_enum_entry log_level_options[] = {
	{"debug1", DEBUG1, false},
	{"info", INFO, false},
	{"notice", NOTICE, false},
	{"log", LOG, false},
	{NULL, 0, false}
};

/*
 * dsm_define_gucs registers every dsmapper.* parameter.  Called from
 * _PG_init, in the postmaster when preloaded or in a backend otherwise.
 */
void
dsm_define_gucs(void)
{
	/*
	 * A restart-only parameter can only be defined while preloading; loaded
	 * later, the library has no workers to size anyway.
	 */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomIntVariable("dsmapper.max_workers",
								"Maximum number of dsmapper background workers in the cluster.",
								"Zero disables the background workers; jobs then run only "
								"through dsmapper_run().",
								&dsm_max_workers,
								4, 0, 256,
								PGC_POSTMASTER,
								0,
								NULL, NULL, NULL);

	DefineCustomIntVariable("dsmapper.worker_idle_timeout",
							"Time an idle dsmapper worker waits for new work before it exits.",
							NULL,
							&dsm_worker_idle_timeout,
							60, 1, 86400,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("dsmapper.page_timeout",
							"Longest time a page may run in a background worker.",
							"A page that runs longer is canceled and retried like any "
							"transient error.  Zero means no limit.",
							&dsm_page_timeout,
							0, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("dsmapper.history_retention",
							"How long finished jobs are kept in dsmapper.jobs.",
							"Older finished jobs, with their shards, are removed when "
							"another job finishes.  Zero keeps them forever.",
							&dsm_history_retention,
							7 * 24 * 3600, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("dsmapper.synchronous_commit",
							 "Whether workers wait for each page's commit to reach disk.",
							 "Off by default: a page's effects and its checkpoint commit "
							 "together, so a crash that loses the last pages loses both, "
							 "and they are simply mapped again.",
							 &dsm_synchronous_commit,
							 false,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	DefineCustomEnumVariable("dsmapper.log_level",
							 "Message level of job start and end messages.",
							 NULL,
							 &dsm_log_level_jobs,
							 LOG, log_level_options,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	MarkGUCPrefixReserved("dsmapper");
}
