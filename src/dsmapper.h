/*-------------------------------------------------------------------------
 *
 * dsmapper.h
 *		Shared declarations of the dsmapper extension.
 *
 * dsmapper maps a SQL function over every row of a table.  A job is split
 * into shards (contiguous primary-key ranges); each shard is processed one
 * page of keys at a time, and every page commits together with the shard's
 * checkpoint.  Work is claimed from the table dsmapper.queue by background
 * workers (one launcher per cluster starts them, per database) or by
 * dsmapper_run() in an ordinary session.
 *
 * Source files, one concept each:
 *	init.c		module load: GUCs, shared memory, the launcher registration
 *	guc.c		configuration parameters
 *	shmem.c		worker slots, per-database demand, wake-ups at commit
 *	launcher.c	the launcher background worker
 *	worker.c	the per-database worker loop
 *	queue.c		claiming work, settling shards, rolling up job states
 *	turn.c		one turn of a shard: pages, checkpoints, error handling
 *	splitter.c	choosing shard ranges by sampling keys
 *	job.c		loading jobs, key metadata, running as owner or internally
 *	api.c		SQL-callable functions
 *	schedule.c	recurring launches through pg_cron
 *	utility.c	getting workers out of the way of DROP DATABASE
 *
 *-------------------------------------------------------------------------
 */
#ifndef DSMAPPER_H
#define DSMAPPER_H

#include "postgres.h"

#include "access/htup.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "storage/lwlock.h"
#include "storage/condition_variable.h"
#include "utils/jsonb.h"
#include "utils/relcache.h"

#define DSM_EXTENSION_NAME	"dsmapper"
#define DSM_SPLIT_TASK		(-1)	/* queue.shard of a job's split task */
#define DSM_MAX_DATABASES	64		/* databases tracked in shared memory */
#define DSM_LOCK_SPACE		0x4453	/* locktag_field4 of claim locks ("DS") */

/* guc.c */
extern int	dsm_max_workers;
extern int	dsm_worker_idle_timeout;
extern int	dsm_log_level_jobs;
extern int	dsm_page_timeout;
extern bool dsm_synchronous_commit;
extern int	dsm_history_retention;
extern void dsm_define_gucs(void);

/*
 * Shared memory (shmem.c).  A worker slot is handed out by the launcher and
 * names the database its worker serves.  A database entry records how many
 * workers that database wants and a generation counter that every new piece
 * of work bumps, so an idle worker never sleeps through a wake-up.
 */
typedef enum DsmSlotState
{
	DSM_SLOT_FREE = 0,
	DSM_SLOT_STARTING,			/* registered, worker not attached yet */
	DSM_SLOT_BUSY,				/* in a turn */
	DSM_SLOT_IDLE,				/* sleeping on its latch */
	DSM_SLOT_EXITING			/* decided to exit, do not count on it */
} DsmSlotState;

typedef struct DsmWorkerSlot
{
	DsmSlotState state;
	Oid			dboid;
	pid_t		pid;
	Latch	   *latch;
	uint64		incarnation;
	bool		connected;		/* the worker got into its database */
	int64		job_id;			/* task in hand, 0 when none */
	int32		shard;
	bool		stop_requested; /* dsmapper itself asked it to exit */
} DsmWorkerSlot;

typedef struct DsmDatabase
{
	Oid			dboid;			/* InvalidOid: entry unused */
	int			wanted;			/* workers this database could use */
	uint64		generation;		/* bumped whenever new work is committed */
	bool		probe;			/* start one worker to look for work */
	bool		starving;		/* new work waits for a busy worker's turn */
	TimestampTz purge_at;		/* next finished job due for removal, or 0 */
	pid_t		dropping_pid;	/* backend running DROP EXTENSION, or 0 */
} DsmDatabase;

typedef struct DsmShared
{
	LWLock	   *lock;
	Latch	   *launcher_latch;
	pid_t		launcher_pid;
	bool		databases_overflowed;
	uint64		next_incarnation;
	ConditionVariable job_state_cv;	/* broadcast on every job state change */
	int			nslots;
	DsmDatabase databases[DSM_MAX_DATABASES];
	DsmWorkerSlot slots[FLEXIBLE_ARRAY_MEMBER];
} DsmShared;

extern DsmShared *dsm_shared;

extern void dsm_shmem_request(void);
extern void dsm_clear_starving(void);
extern void dsm_shmem_install_hooks(void);
extern bool dsm_workers_available(void);
extern void dsm_request_wakeup_at_commit(void);
extern void dsm_wake_database(Oid dboid);
extern void dsm_announce_job_state_change(void);
extern DsmDatabase *dsm_find_database(Oid dboid, bool create);
extern void dsm_set_extension_dropper(Oid dboid, bool dropping);
extern bool dsm_extension_being_dropped(Oid dboid);
extern int	dsm_cancel_job_pages(Oid dboid, int64 job_id);
extern void dsm_cancel_job_pages_at_commit(int64 job_id);

/* utility.c */
extern void dsm_install_utility_hook(void);

/* launcher.c and worker.c */
extern void dsm_register_launcher(void);
extern PGDLLEXPORT void dsm_launcher_main(Datum main_arg);
extern PGDLLEXPORT void dsm_worker_main(Datum main_arg);

/*
 * A job as loaded from dsmapper.job (job.c).  Allocated in the caller's
 * memory context; strings are palloc'd copies.
 */
typedef struct DsmJob
{
	int64		job_id;
	char	   *mapper;
	Oid			fn;				/* the mapper's function, pinned at launch */
	Oid			relid;
	char	   *relation_name;
	List	   *key_columns;	/* column names, as char * */
	char	   *key_signature;	/* dsm_key_signature() at launch */
	bool		rows_mode;
	char	   *params;			/* jsonb, as text */
	int			shards_wanted;
	int			page_size;
	char	   *filter;			/* NULL when none */
	int			pages_per_task;
	int64		task_duration_ms;
	bool		track_progress;
	int			max_attempts;
	Oid			owner;
	char	   *search_path;
	char	   *state;
	TimestampTz started;
} DsmJob;

/* Key metadata of a relation's primary key, resolved at run time. */
typedef struct DsmKey
{
	int			natts;
	AttrNumber *attnums;
	Oid		   *typids;
	Oid		   *collations;
	char	  **names;			/* quoted column names */
	Oid		   *input_funcs;
	Oid		   *typioparams;
	Oid		   *output_funcs;
	char	  **lt_ops;			/* "OPERATOR(schema.<)" of the index opfamily */
	char	  **gt_ops;
	char	  **ge_ops;
	char	  **eq_ops;
	char	   *alias;			/* table alias no column name collides with */
} DsmKey;

/* A claimed piece of work (queue.c). */
typedef struct DsmTask
{
	int64		job_id;
	int32		shard;
	int32		running_slot;	/* job's running-shard slot held, or -1 */
	char	   *job_state;
} DsmTask;

/* Saved identity for dsm_enter_owner / dsm_enter_internal. */
typedef struct DsmIdentity
{
	Oid			saved_userid;
	int			saved_sec_context;
	int			guc_nestlevel;
} DsmIdentity;

extern DsmJob *dsm_load_job(int64 job_id, bool lock_row, MemoryContext mcxt);
extern DsmKey *dsm_primary_key(Relation rel, bool missing_ok);
extern void dsm_check_no_inheritance_children(Relation rel);
extern bool dsm_key_fits_mapper(Oid key_type, Oid elem_type, bool *cast);
extern char *dsm_key_signature(DsmKey *key);
extern char *dsm_key_list_sql(DsmKey *key, const char *prefix);
extern char *dsm_key_order_sql(DsmKey *key, const char *prefix);
extern char *dsm_key_compare_sql(DsmKey *key, const char *prefix,
								 const char *op, int first_param);
extern char *dsm_quoted_relation_name(Oid relid);
extern void dsm_enter_internal(DsmIdentity *id);
extern void dsm_enter_owner(DsmIdentity *id, Oid owner, const char *search_path);
extern Oid	dsm_session_runner;
extern uint64 dsm_database_generation(Oid dboid);
extern void dsm_schedule_purge(Oid dboid, TimestampTz at);
extern bool dsm_purge_due(Oid dboid, TimestampTz *at);
extern void dsm_purge_history(void);
extern void dsm_leave(DsmIdentity *id);
extern Oid	dsm_extension_owner(void);
extern Oid	dsm_extension_schema(void);
extern bool dsm_extension_exists(void);
extern void dsm_check_filter_syntax(const char *filter);
extern int64 dsm_spi_int64(const char *sql, int nargs, Oid *types,
						   Datum *values, bool *found);
extern void dsm_spi_exec(const char *sql, int nargs, Oid *types,
						 Datum *values, int expected);
extern Datum dsm_text_array_datum(List *strings);
extern List *dsm_text_array_list(Datum array);
extern bool dsm_lock_task(int64 job_id, int32 shard, bool session, bool wait);
extern void dsm_unlock_task(int64 job_id, int32 shard);
extern bool dsm_lock_running_slot(int64 job_id, int32 slot);
extern void dsm_unlock_running_slot(int64 job_id, int32 slot);
extern void dsm_release_task(DsmTask *task);
extern bool dsm_is_final_job_state(const char *state);

/* splitter.c: runs as the job owner inside a transaction */
typedef struct DsmSplit
{
	int			nshards;
	List	   *boundaries;		/* nshards - 1 keys, each a List of char * */
	int64	   *expected;		/* per shard; NULL entries not possible */
	bool		exact;
} DsmSplit;

extern DsmSplit *dsm_split_relation(DsmJob *job, DsmKey *key);

/* queue.c */

extern bool dsm_claim_task(DsmTask *task, int *ready_count,
						   TimestampTz *next_ready, Oid only_for);
extern void dsm_settle_shard(int64 job_id, int32 shard, const char *job_state);
extern void dsm_finish_shard(int64 job_id, int32 shard, const char *state);
extern void dsm_rollup_job(int64 job_id);
extern void dsm_set_job_state(int64 job_id, const char *state,
							  const char *error);
extern void dsm_notify_job_state(int64 job_id, const char *state);

/* turn.c */
extern int64 dsm_run_task(DsmTask *task, bool in_session,
						  TimestampTz deadline);
extern bool dsm_database_starving(void);
extern int64 dsm_current_job_id;
extern int32 dsm_current_shard_index;

#endif							/* DSMAPPER_H */
