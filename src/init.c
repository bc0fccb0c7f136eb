/*-------------------------------------------------------------------------
 *
 * init.c
 *		Module load of dsmapper.
 *
 * When loaded through shared_preload_libraries the module reserves shared
 * memory and registers the launcher.  Loaded on demand in a backend (no
 * preloading), it only defines its parameters: jobs can then be processed
 * with dsmapper_run().
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "miscadmin.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/*
 * _PG_init is called once per process that loads the library.
 */
void
_PG_init(void)
{
	dsm_define_gucs();

	if (!process_shared_preload_libraries_in_progress)
		return;

	dsm_shmem_install_hooks();
	dsm_install_utility_hook();
	if (dsm_max_workers > 0)
		dsm_register_launcher();
}
