/*-------------------------------------------------------------------------
 *
 * splitter.c
 *		Choosing shard ranges by sampling the key space.
 *
 * A small table (at most DSM_EXACT_MAX_BLOCKS blocks) is read whole: its
 * keys give exact quantiles and exact per-shard counts.  A larger table is
 * sampled with TABLESAMPLE SYSTEM, which reads only the sampled blocks; the
 * sample's quantiles become the shard boundaries and its per-range counts,
 * scaled by the sampling fraction, the expected counts.  The filter is
 * applied to the sample, so ranges balance the rows that will be mapped.
 *
 * Shard i covers the keys k with boundary[i-1] < k <= boundary[i]; the
 * first shard is unbounded below and the last unbounded above, so keys
 * inserted later anywhere are covered.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include <math.h>

#include "access/table.h"
#include "catalog/pg_class.h"
#include "executor/spi.h"
#include "storage/bufmgr.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#define DSM_EXACT_MAX_BLOCKS	1024	/* read all keys up to 8 MB */
#define DSM_SAMPLE_MIN_ROWS		30000
#define DSM_SAMPLE_ROWS_PER_SHARD 2000

/*
 * key_strings returns the text form of the key columns of a sample row.
 * Runs under the internal identity, whose pinned DateStyle and
 * extra_float_digits make the text round-trip exactly.
 */
static List *
key_strings(DsmKey *key, HeapTuple tuple, TupleDesc desc)
{
	List	   *result = NIL;

	for (int c = 0; c < key->natts; c++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(tuple, desc, c + 1, &isnull);

		result = lappend(result,
						 isnull ? NULL : OidOutputFunctionCall(key->output_funcs[c], d));
	}
	return result;
}

/*
 * dsm_split_relation chooses at most job->shards_wanted ranges.  Inside a
 * transaction with SPI connected, under the internal identity; the reads of
 * user data run as the job's owner.  The result lives in the current
 * memory context.
 */
DsmSplit *
dsm_split_relation(DsmJob *job, DsmKey *key)
{
	Relation	rel;
	BlockNumber nblocks;
	double		reltuples;
	BlockNumber relpages;
	double		fraction;
	double		estimated_rows;
	char	   *keys;
	char	   *sql;
	int			rc;
	uint64		nsample;
	SPITupleTable *sample;
	DsmSplit   *split;
	DsmIdentity owner;
	int			nshards;
	uint64		prev_end;

	/* Size up the table without reading it. */
	rel = table_open(job->relid, AccessShareLock);
	nblocks = RelationGetNumberOfBlocks(rel);
	reltuples = rel->rd_rel->reltuples;
	relpages = rel->rd_rel->relpages;
	table_close(rel, AccessShareLock);

	if (reltuples > 0 && relpages > 0)
		estimated_rows = reltuples / relpages * nblocks;
	else
		estimated_rows = (double) nblocks * 60.0;

	/* Read every key of a small table, a block sample of a large one. */
	keys = dsm_key_list_sql(key, NULL);
	if (nblocks <= DSM_EXACT_MAX_BLOCKS)
	{
		fraction = 1.0;
		sql = psprintf("SELECT %s FROM %s%s%s%s ORDER BY %s",
					   keys, dsm_quoted_relation_name(job->relid),
					   job->filter ? " WHERE (" : "",
					   job->filter ? job->filter : "",
					   job->filter ? "\n)" : "",
					   keys);
	}
	else
	{
		double		target = Max(DSM_SAMPLE_MIN_ROWS,
								 (double) DSM_SAMPLE_ROWS_PER_SHARD * job->shards_wanted);
		double		percent = Min(100.0, 100.0 * target / Max(estimated_rows, 1.0));

		fraction = percent / 100.0;
		sql = psprintf("SELECT %s FROM %s TABLESAMPLE SYSTEM (%.6f)%s%s%s ORDER BY %s",
					   keys, dsm_quoted_relation_name(job->relid), percent,
					   job->filter ? " WHERE (" : "",
					   job->filter ? job->filter : "",
					   job->filter ? "\n)" : "",
					   keys);
	}

	dsm_enter_owner(&owner, job->owner, job->search_path);
	rc = SPI_execute(sql, true, 0);
	dsm_leave(&owner);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not sample relation \"%s\"", job->relation_name);
	sample = SPI_tuptable;
	nsample = SPI_processed;

	/*
	 * Small tables get fewer shards: no shard should be expected to hold
	 * less than a page of rows.
	 */
	{
		double		matching = nsample / fraction;
		double		by_size = ceil(matching / Max(job->page_size, 1));

		nshards = (int) Min((double) job->shards_wanted, Max(1.0, by_size));
		if ((uint64) nshards > nsample)
			nshards = (int) Max(nsample, 1);
	}

	/* Boundaries at the sample's quantiles, counts from the ranks. */
	split = palloc0(sizeof(DsmSplit));
	split->exact = (fraction >= 1.0);
	split->expected = palloc0(sizeof(int64) * nshards);
	prev_end = 0;
	for (int i = 0; i < nshards; i++)
	{
		uint64		end;		/* one past the last sample row of shard i */

		if (i == nshards - 1)
			end = nsample;
		else
		{
			end = (uint64) ((double) nsample * (i + 1) / nshards);
			if (end <= prev_end)
				end = prev_end + 1;
			split->boundaries = lappend(split->boundaries,
										key_strings(key, sample->vals[end - 1],
													sample->tupdesc));
		}
		split->expected[i] = (int64) ((end - prev_end) / fraction + 0.5);
		prev_end = end;
	}
	split->nshards = nshards;

	return split;
}
