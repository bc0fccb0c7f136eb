/*-------------------------------------------------------------------------
 *
 * splitter.c
 *		Choosing shard ranges by sampling the key space.
 *
 * A small table (at most DSM_EXACT_MAX_BLOCKS blocks) is read whole: its
 * keys give exact quantiles and exact per-shard counts.
 *
 * A larger table is split from its primary key's btree (split_by_index):
 * level 1 of the index lists every leaf page with the key that starts it,
 * and a sample of leaves tells how many entries a leaf holds.  Cutting at
 * quantiles of that weight balances shards by row count however skewed
 * the key values are, reading a small part of the index and none of the
 * table.
 *
 * With a filter, row-level security, or a partitioned table, the table is
 * sampled instead with TABLESAMPLE SYSTEM, which reads only the sampled
 * blocks.  The quantiles of the sampled rows that match the filter give
 * the boundaries; the share of matching rows in the sample, times the
 * table's row estimate, gives the expected counts.
 *
 * Shard i covers the keys k with boundary[i-1] <= k < boundary[i]; the
 * first shard is unbounded below and the last unbounded above, so keys
 * inserted later anywhere are covered.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include <math.h>

#include "access/genam.h"
#include "access/nbtree.h"
#include "access/table.h"
#include "access/tableam.h"
#include "executor/tuptable.h"
#include "utils/snapmgr.h"
#include "catalog/pg_class.h"
#include "catalog/pg_inherits.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/rls.h"

#define DSM_EXACT_MAX_BLOCKS	1024	/* read all keys up to 8 MB */
#define DSM_SAMPLE_MIN_ROWS		30000
#define DSM_SAMPLE_ROWS_PER_SHARD 2000
#define DSM_LEAF_SAMPLE			4096	/* leaf pages read to weigh leaves */
#define DSM_VISIBILITY_PROBES	8		/* heap rows checked per sampled leaf */

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
 * One leaf page of the primary key index, as seen from level 1: the
 * separator key that starts it (NULL for the leftmost leaf) and an estimate
 * of the index entries it holds.
 */
typedef struct LeafEntry
{
	IndexTuple	separator;
	BlockNumber leaf;
	double		weight;
} LeafEntry;

/*
 * live_entries estimates the live rows a leaf page points to: its entries
 * not marked dead, scaled by the share of a few of them whose heap tuple
 * is visible to the snapshot (a bulk DELETE not yet vacuumed leaves many
 * entries that point to dead rows).  The high key is not an entry.
 */
static double
live_entries(Relation heap, Relation index, BlockNumber blkno, Snapshot snapshot)
{
	Buffer		buf = _bt_getbuf(index, blkno, BT_READ);
	Page		page = BufferGetPage(buf);
	BTPageOpaque opaque = BTPageGetOpaque(page);
	OffsetNumber maxoff = PageGetMaxOffsetNumber(page);
	double		count = 0;
	ItemPointerData probes[DSM_VISIBILITY_PROBES];
	int			nprobes = 0;
	int			visible = 0;

	if (P_ISLEAF(opaque) && !P_IGNORE(opaque))
	{
		OffsetNumber first = P_FIRSTDATAKEY(opaque);
		int			step = Max(1, (maxoff - first + 1) / DSM_VISIBILITY_PROBES);

		for (OffsetNumber off = first; off <= maxoff; off++)
		{
			IndexTuple	itup;

			if (ItemIdIsDead(PageGetItemId(page, off)))
				continue;
			count++;
			itup = (IndexTuple) PageGetItem(page, PageGetItemId(page, off));
			if ((off - first) % step == 0 && nprobes < DSM_VISIBILITY_PROBES)
				probes[nprobes++] = *BTreeTupleGetHeapTID(itup);
		}
	}
	_bt_relbuf(index, buf);

	/* Visit the probed rows' heap tuples without holding the index page. */
	if (nprobes > 0)
	{
		IndexFetchTableData *fetch = table_index_fetch_begin(heap);
		TupleTableSlot *slot = table_slot_create(heap, NULL);

		for (int i = 0; i < nprobes; i++)
		{
			bool		call_again = false;
			bool		all_dead = false;

			if (table_index_fetch_tuple(fetch, &probes[i], snapshot, slot,
										&call_again, &all_dead))
				visible++;
		}
		ExecDropSingleTupleTableSlot(slot);
		table_index_fetch_end(fetch);
		count *= (double) visible / nprobes;
	}
	return count;
}

/*
 * leaf_first_key returns the text form of the first entry of a leaf page,
 * or NIL when it has none.  Used where a separator was truncated: every key
 * before the leaf is below it, so it is as good a boundary.
 */
static List *
leaf_first_key(Relation index, DsmKey *key, BlockNumber blkno)
{
	Buffer		buf = _bt_getbuf(index, blkno, BT_READ);
	Page		page = BufferGetPage(buf);
	BTPageOpaque opaque = BTPageGetOpaque(page);
	List	   *result = NIL;

	if (P_ISLEAF(opaque) && !P_IGNORE(opaque) &&
		P_FIRSTDATAKEY(opaque) <= PageGetMaxOffsetNumber(page))
	{
		IndexTuple	itup = (IndexTuple) PageGetItem(page,
													PageGetItemId(page, P_FIRSTDATAKEY(opaque)));

		for (int c = 0; c < key->natts; c++)
		{
			bool		isnull;
			Datum		d = index_getattr(itup, c + 1, RelationGetDescr(index), &isnull);

			if (isnull)
			{
				list_free(result);
				result = NIL;
				break;
			}
			result = lappend(result, OidOutputFunctionCall(key->output_funcs[c], d));
		}
	}
	_bt_relbuf(index, buf);
	return result;
}

/*
 * read_leaf_level lists every leaf page of a btree with its separator, by
 * reading the index's level 1 (the pages just above the leaves), which is
 * a few hundredths of the index.  Returns NULL when the index has no level
 * 1.  Entries are palloc'd in the current memory context.
 */
static LeafEntry *
read_leaf_level(Relation index, int *nentries)
{
	Buffer		buf;
	Page		page;
	BTPageOpaque opaque;
	BTMetaPageData *meta;
	BlockNumber blkno;
	uint32		level;
	IndexTuple	lowkey = NULL;
	LeafEntry  *entries;
	int			n = 0;
	int			capacity = 1024;

	buf = _bt_getbuf(index, BTREE_METAPAGE, BT_READ);
	meta = BTPageGetMeta(BufferGetPage(buf));
	blkno = meta->btm_fastroot;
	level = meta->btm_fastlevel;
	_bt_relbuf(index, buf);
	if (blkno == P_NONE || level < 1)
		return NULL;

	/* Down the leftmost path to level 1. */
	while (level > 1)
	{
		buf = _bt_getbuf(index, blkno, BT_READ);
		page = BufferGetPage(buf);
		opaque = BTPageGetOpaque(page);
		blkno = BTreeTupleGetDownLink((IndexTuple)
									  PageGetItem(page, PageGetItemId(page, P_FIRSTDATAKEY(opaque))));
		level = opaque->btpo_level - 1;
		_bt_relbuf(index, buf);
	}

	/* Across level 1, left to right. */
	entries = palloc(sizeof(LeafEntry) * capacity);
	while (blkno != P_NONE)
	{
		BlockNumber next;

		CHECK_FOR_INTERRUPTS();
		buf = _bt_getbuf(index, blkno, BT_READ);
		page = BufferGetPage(buf);
		opaque = BTPageGetOpaque(page);
		if (!P_IGNORE(opaque))
		{
			OffsetNumber first = P_FIRSTDATAKEY(opaque);
			OffsetNumber maxoff = PageGetMaxOffsetNumber(page);

			for (OffsetNumber off = first; off <= maxoff; off++)
			{
				IndexTuple	itup = (IndexTuple) PageGetItem(page, PageGetItemId(page, off));

				if (n == capacity)
				{
					capacity *= 2;
					entries = repalloc_huge(entries, sizeof(LeafEntry) * capacity);
				}
				entries[n].leaf = BTreeTupleGetDownLink(itup);
				entries[n].separator = (off == first) ? lowkey : CopyIndexTuple(itup);
				entries[n].weight = 0;
				n++;
			}
			if (!P_RIGHTMOST(opaque))
				lowkey = CopyIndexTuple((IndexTuple)
										PageGetItem(page, PageGetItemId(page, P_HIKEY)));
		}
		next = opaque->btpo_next;
		_bt_relbuf(index, buf);
		blkno = next;
	}

	*nentries = n;
	return entries;
}

/*
 * separator_strings returns the text form of a separator's key columns, or
 * NIL when it cannot start a shard (the leftmost leaf, or a separator whose
 * trailing key columns were truncated away).
 */
static List *
separator_strings(Relation index, DsmKey *key, IndexTuple separator)
{
	List	   *result = NIL;

	if (separator == NULL || BTreeTupleGetNAtts(separator, index) < key->natts)
		return NIL;
	for (int c = 0; c < key->natts; c++)
	{
		bool		isnull;
		Datum		d = index_getattr(separator, c + 1, RelationGetDescr(index), &isnull);

		if (isnull)
			return NIL;
		result = lappend(result, OidOutputFunctionCall(key->output_funcs[c], d));
	}
	return result;
}

/*
 * split_by_index chooses ranges from the primary key's btree: every leaf
 * page is a candidate boundary, weighted by the entries of an evenly
 * spread sample of leaves.  Balance then depends on row counts, not on how
 * key values are spread, and nothing of the table is read.  Returns NULL
 * when the index is too small to have a level 1.
 */
static DsmSplit *
split_by_index(DsmJob *job, DsmKey *key, Oid indexoid)
{
	Relation	heap;
	Relation	index;
	Snapshot	snapshot;
	LeafEntry  *leaves;
	int			nleaves;
	int			nsampled;
	double	   *sampled;
	double		total = 0;
	double		cumulative = 0;
	int			nshards;
	int			shard = 0;
	DsmSplit   *split;

	heap = table_open(job->relid, AccessShareLock);
	index = index_open(indexoid, AccessShareLock);
	snapshot = GetActiveSnapshot();
	leaves = read_leaf_level(index, &nleaves);
	if (leaves == NULL || nleaves < 2)
	{
		index_close(index, AccessShareLock);
		table_close(heap, AccessShareLock);
		return NULL;
	}

	/* Weigh the leaves from a sample spread evenly over them. */
	nsampled = Min(nleaves, DSM_LEAF_SAMPLE);
	sampled = palloc(sizeof(double) * nsampled);
	for (int j = 0; j < nsampled; j++)
	{
		CHECK_FOR_INTERRUPTS();
		sampled[j] = live_entries(heap, index,
								  leaves[(int) (((double) j + 0.5) * nleaves / nsampled)].leaf,
								  snapshot);
	}
	for (int i = 0; i < nleaves; i++)
	{
		leaves[i].weight = sampled[Min(nsampled - 1, (int) ((double) i * nsampled / nleaves))];
		total += leaves[i].weight;
	}

	nshards = (int) Min((double) job->shards_wanted,
						Max(1.0, ceil(total / Max(job->page_size, 1))));

	/* Cut at the leaf where the running weight crosses each quantile. */
	split = palloc0(sizeof(DsmSplit));
	split->expected = palloc0(sizeof(int64) * nshards);
	for (int i = 0; i < nleaves; i++)
	{
		if (shard < nshards - 1 &&
			cumulative >= total * (shard + 1) / nshards)
		{
			List	   *boundary = separator_strings(index, key, leaves[i].separator);

			if (boundary == NIL && i > 0)
				boundary = leaf_first_key(index, key, leaves[i].leaf);

			if (boundary != NIL)
			{
				split->boundaries = lappend(split->boundaries, boundary);
				shard++;
			}
		}
		split->expected[shard] += (int64) leaves[i].weight;
		cumulative += leaves[i].weight;
	}
	split->nshards = shard + 1;
	split->exact = false;

	index_close(index, AccessShareLock);
	table_close(heap, AccessShareLock);
	return split;
}

/*
 * size_up_partitions adds up the blocks and the statistics of the leaf
 * partitions of a partitioned table, which has no storage of its own.
 * Partitions without statistics count their blocks only.
 */
static void
size_up_partitions(Oid relid, BlockNumber *nblocks, double *reltuples,
				   BlockNumber *relpages)
{
	List	   *parts = find_all_inheritors(relid, AccessShareLock, NULL);
	ListCell   *lc;

	*nblocks = 0;
	*reltuples = 0;
	*relpages = 0;
	foreach(lc, parts)
	{
		Relation	part;

		if (get_rel_relkind(lfirst_oid(lc)) != RELKIND_RELATION)
			continue;
		part = table_open(lfirst_oid(lc), AccessShareLock);
		*nblocks += RelationGetNumberOfBlocks(part);
		if (part->rd_rel->reltuples > 0 && part->rd_rel->relpages > 0)
		{
			*reltuples += part->rd_rel->reltuples;
			*relpages += part->rd_rel->relpages;
		}
		table_close(part, AccessShareLock);
	}
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
	char	   *order;
	char	   *sql;
	int			rc;
	uint64		nsample;
	uint64	   *match;			/* sample rows that match the filter */
	uint64		nmatch;
	double		rows_per_match;
	bool		rls;
	SPITupleTable *sample;
	DsmSplit   *split;
	DsmIdentity owner;
	int			nshards;
	uint64		prev_end;

	/* Size up the table without reading it. */
	rel = table_open(job->relid, AccessShareLock);
	if (rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE)
		size_up_partitions(job->relid, &nblocks, &reltuples, &relpages);
	else
	{
		nblocks = RelationGetNumberOfBlocks(rel);
		reltuples = rel->rd_rel->reltuples;
		relpages = rel->rd_rel->relpages;
	}

	/*
	 * A large plain table without a filter, whose rows the owner may all
	 * see, is split from its primary key index.  With a filter or row-level
	 * security only a sample of visible rows tells where the mapped rows
	 * are, and a partitioned table has no single index to read.
	 */
	rls = check_enable_rls(job->relid, job->owner, true) == RLS_ENABLED;
	if (nblocks > DSM_EXACT_MAX_BLOCKS && job->filter == NULL &&
		rel->rd_rel->relkind == RELKIND_RELATION && !rls)
	{
		Oid			indexoid = RelationGetPrimaryKeyIndex(rel);

		table_close(rel, AccessShareLock);
		split = split_by_index(job, key, indexoid);
		if (split != NULL)
			return split;
	}
	else
		table_close(rel, AccessShareLock);

	if (reltuples > 0 && relpages > 0)
		estimated_rows = reltuples / relpages * nblocks;
	else
		estimated_rows = (double) nblocks * 60.0;

	/*
	 * Read every key of a small table, a block sample of a large one.  In a
	 * sample the filter is a column, not a condition: the share of sampled
	 * rows that match, times the table's row estimate, gives the expected
	 * count without the variance of how many blocks the sample happened to
	 * take (a ratio estimate).
	 */
	keys = dsm_key_list_sql(key, NULL);
	order = dsm_key_order_sql(key, NULL);
	if (nblocks <= DSM_EXACT_MAX_BLOCKS)
	{
		fraction = 1.0;
		sql = psprintf("SELECT %s, true FROM %s AS %s%s%s%s ORDER BY %s",
					   keys, dsm_quoted_relation_name(job->relid), key->alias,
					   job->filter ? " WHERE (" : "",
					   job->filter ? job->filter : "",
					   job->filter ? "\n)" : "",
					   order);
	}
	else
	{
		double		target = Max(DSM_SAMPLE_MIN_ROWS,
								 (double) DSM_SAMPLE_ROWS_PER_SHARD * job->shards_wanted);
		double		percent;

		/* A filter that matches few rows needs a larger sample. */
		if (job->filter)
			target *= 2;
		percent = Min(100.0, 100.0 * target / Max(estimated_rows, 1.0));
		fraction = percent / 100.0;
		sql = psprintf("SELECT %s, %s%s%s FROM %s AS %s TABLESAMPLE SYSTEM (%.6f) ORDER BY %s",
					   keys,
					   job->filter ? "coalesce((" : "true",
					   job->filter ? job->filter : "",
					   job->filter ? "\n), false)" : "",
					   dsm_quoted_relation_name(job->relid), key->alias,
					   percent, order);
	}

	dsm_enter_owner(&owner, job->owner, job->search_path);
	rc = SPI_execute(sql, true, 0);
	dsm_leave(&owner);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not sample relation \"%s\"", job->relation_name);
	sample = SPI_tuptable;
	nsample = SPI_processed;

	/* The matching rows of the sample, in key order. */
	match = palloc(sizeof(uint64) * Max(nsample, 1));
	nmatch = 0;
	for (uint64 i = 0; i < nsample; i++)
	{
		bool		isnull;
		Datum		m = SPI_getbinval(sample->vals[i], sample->tupdesc,
									 key->natts + 1, &isnull);

		if (!isnull && DatumGetBool(m))
			match[nmatch++] = i;
	}

	/*
	 * Rows of the table that one matching sample row stands for: the
	 * table's row estimate over the rows sampled, when there are statistics
	 * and the sample saw every row of its blocks; otherwise (row-level
	 * security hides some) the nominal sampling fraction.
	 */
	if (fraction >= 1.0)
		rows_per_match = 1.0;
	else if (!rls && reltuples > 0 && relpages > 0 && nsample > 0)
		rows_per_match = estimated_rows / (double) nsample;
	else
		rows_per_match = 1.0 / fraction;

	/*
	 * Small tables get fewer shards: no shard should be expected to hold
	 * less than a page of rows.
	 */
	{
		double		matching = nmatch * rows_per_match;
		double		by_size = ceil(matching / Max(job->page_size, 1));

		nshards = (int) Min((double) job->shards_wanted, Max(1.0, by_size));
		if ((uint64) nshards > nmatch)
			nshards = (int) Max(nmatch, 1);
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
			end = nmatch;
		else
		{
			end = (uint64) ((double) nmatch * (i + 1) / nshards);
			if (end <= prev_end)
				end = prev_end + 1;
			split->boundaries = lappend(split->boundaries,
										key_strings(key, sample->vals[match[end]],
													sample->tupdesc));
		}
		split->expected[i] = (int64) ((end - prev_end) * rows_per_match + 0.5);
		prev_end = end;
	}
	split->nshards = nshards;

	return split;
}
