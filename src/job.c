/*-------------------------------------------------------------------------
 *
 * job.c
 *		Loading jobs, primary-key metadata, and switching identities.
 *
 * Two identities are used for SQL that dsmapper runs:
 *
 *	- "internal": the extension owner, with search_path pinned to
 *	  pg_catalog, for every read and write of dsmapper's own tables;
 *	- "owner": the role that launched the job, with the search_path it had
 *	  at launch, for everything that touches user data or runs user code
 *	  (sampling, key reads, the filter, the mapper).
 *
 * Both are entered with SECURITY_LOCAL_USERID_CHANGE, so user code cannot
 * SET ROLE its way out, and both are undone by transaction or
 * subtransaction abort as well as by dsm_leave, which also reverts any
 * setting the code inside changed.
 *
 *-------------------------------------------------------------------------
 */
#include "dsmapper.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "parser/parse_coerce.h"
#include "parser/parser.h"
#include "parser/scanner.h"
#include "common/keywords.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

/*
 * dsm_extension_owner returns the role that owns the dsmapper extension in
 * the current database.  Inside a transaction; errors if not installed.
 */
static void
read_extension_row(Oid *owner, Oid *schema)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	*owner = InvalidOid;
	*schema = InvalidOid;
	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber,
				F_NAMEEQ, CStringGetDatum(DSM_EXTENSION_NAME));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		*owner = ((Form_pg_extension) GETSTRUCT(tuple))->extowner;
		*schema = ((Form_pg_extension) GETSTRUCT(tuple))->extnamespace;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
}

/*
 * dsm_extension_schema returns the schema holding the API functions.
 * Inside a transaction.
 */
Oid
dsm_extension_schema(void)
{
	Oid			owner;
	Oid			schema;

	read_extension_row(&owner, &schema);
	return schema;
}

Oid
dsm_extension_owner(void)
{
	Oid			owner;
	Oid			schema;

	read_extension_row(&owner, &schema);

	if (!OidIsValid(owner))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"%s\" is not installed in this database",
						DSM_EXTENSION_NAME)));
	return owner;
}

/*
 * dsm_extension_exists tells whether the extension is installed and not
 * being dropped right now.  Inside a transaction.
 */
bool
dsm_extension_exists(void)
{
	return OidIsValid(get_extension_oid(DSM_EXTENSION_NAME, true)) &&
		OidIsValid(get_namespace_oid("dsmapper", true));
}

/*
 * The role that called dsmapper_run() in this session, while it runs;
 * InvalidOid in workers and elsewhere.
 */
Oid			dsm_session_runner = InvalidOid;

/*
 * enter_identity switches to a role and a search_path until dsm_leave.
 * restricted makes it a security-restricted operation, as PostgreSQL does
 * for user code that maintenance commands run.
 */
static void
enter_identity(DsmIdentity *id, Oid role, const char *search_path,
			   bool restricted)
{
	GetUserIdAndSecContext(&id->saved_userid, &id->saved_sec_context);
	SetUserIdAndSecContext(role,
						   id->saved_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   (restricted ? SECURITY_RESTRICTED_OPERATION : 0));
	id->guc_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", search_path,
							 PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/*
 * dsm_enter_internal switches to the extension owner with a pinned
 * search_path.  Inside a transaction; pair with dsm_leave.
 */
void
dsm_enter_internal(DsmIdentity *id)
{
	enter_identity(id, dsm_extension_owner(), "pg_catalog, pg_temp", false);

	/*
	 * Keys are stored as text: write and read them with fixed settings so
	 * that the text means the same in every session and worker.
	 */
	(void) set_config_option("datestyle", "ISO, YMD", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("intervalstyle", "postgres", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("extra_float_digits", "3", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("bytea_output", "hex", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/*
 * search_path_names_temp tells whether a search_path setting lists the
 * temporary schema ("pg_temp" as a whole element, not inside a name).
 */
static bool
search_path_names_temp(const char *search_path)
{
	char	   *copy = pstrdup(search_path);
	List	   *names;
	ListCell   *lc;
	bool		found = false;

	if (!SplitIdentifierString(copy, ',', &names))
		return false;			/* unparsable: append pg_temp to be safe */
	foreach(lc, names)
	{
		if (strcmp((char *) lfirst(lc), "pg_temp") == 0)
			found = true;
	}
	list_free(names);
	pfree(copy);
	return found;
}

/*
 * dsm_enter_owner switches to a job's owner and its launch-time
 * search_path.  Inside a transaction; pair with dsm_leave.
 */
void
dsm_enter_owner(DsmIdentity *id, Oid owner, const char *search_path)
{
	/*
	 * The temporary schema of whatever session runs the job (a worker, or
	 * dsmapper_run() in someone's session) is searched last, never first,
	 * unless the owner's own search_path placed it.
	 */
	if (!search_path_names_temp(search_path))
		search_path = psprintf("%s%spg_temp", search_path,
							   search_path[0] != '\0' ? ", " : "");

	/*
	 * In dsmapper_run() a superuser's session may run other roles' jobs.
	 * Their code then must not leave temporary tables, held cursors or
	 * listeners behind for the session's own later statements to meet: it
	 * runs as a security-restricted operation.  (Workers instead clear
	 * such state after every turn, see worker.c.)
	 */
	enter_identity(id, owner, search_path,
				   OidIsValid(dsm_session_runner) && owner != dsm_session_runner);
}

/*
 * dsm_leave undoes dsm_enter_internal or dsm_enter_owner.
 */
void
dsm_leave(DsmIdentity *id)
{
	/*
	 * Undo every setting made since entering, including plain SETs in user
	 * code, so nothing one owner's mapper sets reaches another owner's job
	 * or the session running dsmapper_run().
	 */
	AtEOXact_GUC(false, id->guc_nestlevel);
	SetUserIdAndSecContext(id->saved_userid, id->saved_sec_context);
}

/*
 * dsm_spi_int64 runs a query and returns its first column of its first row
 * as int64; *found tells whether there was a row with a non-NULL value.
 * SPI must be connected.
 */
int64
dsm_spi_int64(const char *sql, int nargs, Oid *types, Datum *values,
			  bool *found)
{
	int			rc;
	bool		isnull = true;
	Datum		d = (Datum) 0;

	rc = SPI_execute_with_args(sql, nargs, types, values, NULL, false, 0);
	if (rc < 0)
		elog(ERROR, "dsmapper: SPI_execute failed (%d): %s", rc, sql);

	if (SPI_processed > 0 && SPI_tuptable != NULL)
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
						  &isnull);
	if (found)
		*found = !isnull;
	if (isnull)
		return 0;

	switch (SPI_gettypeid(SPI_tuptable->tupdesc, 1))
	{
		case INT2OID:
			return DatumGetInt16(d);
		case INT4OID:
			return DatumGetInt32(d);
		case INT8OID:
			return DatumGetInt64(d);
		case BOOLOID:
			return DatumGetBool(d) ? 1 : 0;
		default:
			elog(ERROR, "dsmapper: unexpected result type");
	}
	return 0;
}

/*
 * dsm_spi_exec runs a statement and checks its result code.  SPI must be
 * connected.
 */
void
dsm_spi_exec(const char *sql, int nargs, Oid *types, Datum *values,
			 int expected)
{
	int			rc;

	rc = SPI_execute_with_args(sql, nargs, types, values, NULL, false, 0);
	if (rc != expected)
		elog(ERROR, "dsmapper: SPI_execute returned %d: %s", rc, sql);
}

/*
 * dsm_text_array_datum builds a text[] from a List of C strings.
 */
Datum
dsm_text_array_datum(List *strings)
{
	int			n = list_length(strings);
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	int			i = 0;
	ListCell   *lc;

	foreach(lc, strings)
		elems[i++] = CStringGetTextDatum((char *) lfirst(lc));
	return PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false,
										   TYPALIGN_INT));
}

/*
 * dsm_text_array_list returns the elements of a text[] as a List of C
 * strings, in the current memory context.
 */
List *
dsm_text_array_list(Datum array)
{
	ArrayType  *arr = DatumGetArrayTypeP(array);
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	List	   *result = NIL;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
		result = lappend(result, nulls[i] ? NULL : TextDatumGetCString(elems[i]));
	return result;
}

static char *
spi_text(HeapTuple tuple, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * dsm_load_job reads a job row; NULL when it does not exist.  With
 * lock_row the row is locked FOR NO KEY UPDATE, which serializes job state
 * changes.  SPI connected, internal identity; the result is allocated in
 * mcxt, which should outlive SPI_finish.
 */
DsmJob *
dsm_load_job(int64 job_id, bool lock_row, MemoryContext mcxt)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(job_id)};
	HeapTuple	tuple;
	TupleDesc	desc;
	DsmJob	   *job;
	bool		isnull;
	int			rc;
	MemoryContext oldcxt;

	rc = SPI_execute_with_args(psprintf(
			"SELECT mapper, relation, relation_name, key_columns, mode,"
			" params::text, shards_wanted, page_size, filter, pages_per_task,"
			" (extract(epoch FROM task_duration) * 1000)::int8,"
			" track_progress, max_attempts, owner, search_path, state,"
			" started, fn, key_signature"
			" FROM dsmapper.job WHERE job_id OPERATOR(pg_catalog.=) $1%s",
			lock_row ? " FOR NO KEY UPDATE" : ""),
			1, types, values, NULL, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "dsmapper: could not read job " INT64_FORMAT, job_id);
	if (SPI_processed == 0)
		return NULL;

	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	oldcxt = MemoryContextSwitchTo(mcxt);
	job = palloc0(sizeof(DsmJob));
	job->job_id = job_id;
	job->mapper = spi_text(tuple, desc, 1);
	job->relid = DatumGetObjectId(SPI_getbinval(tuple, desc, 2, &isnull));
	job->relation_name = spi_text(tuple, desc, 3);
	job->key_columns = dsm_text_array_list(SPI_getbinval(tuple, desc, 4, &isnull));
	job->rows_mode = strcmp(spi_text(tuple, desc, 5), "rows") == 0;
	job->params = spi_text(tuple, desc, 6);
	job->shards_wanted = DatumGetInt32(SPI_getbinval(tuple, desc, 7, &isnull));
	job->page_size = DatumGetInt32(SPI_getbinval(tuple, desc, 8, &isnull));
	job->filter = spi_text(tuple, desc, 9);
	job->pages_per_task = DatumGetInt32(SPI_getbinval(tuple, desc, 10, &isnull));
	job->task_duration_ms = DatumGetInt64(SPI_getbinval(tuple, desc, 11, &isnull));
	job->track_progress = DatumGetBool(SPI_getbinval(tuple, desc, 12, &isnull));
	job->max_attempts = DatumGetInt32(SPI_getbinval(tuple, desc, 13, &isnull));
	job->owner = DatumGetObjectId(SPI_getbinval(tuple, desc, 14, &isnull));
	job->search_path = spi_text(tuple, desc, 15);
	job->state = spi_text(tuple, desc, 16);
	job->started = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 17, &isnull));
	if (isnull)
		job->started = 0;
	job->fn = DatumGetObjectId(SPI_getbinval(tuple, desc, 18, &isnull));
	job->key_signature = spi_text(tuple, desc, 19);
	MemoryContextSwitchTo(oldcxt);

	return job;
}

/*
 * qualified_operator renders an operator as OPERATOR(schema.name).
 */
static char *
qualified_operator(Oid opno)
{
	HeapTuple	tuple;
	Form_pg_operator form;
	char	   *result;

	tuple = SearchSysCache1(OPEROID, ObjectIdGetDatum(opno));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "dsmapper: operator %u of a primary key index not found", opno);
	form = (Form_pg_operator) GETSTRUCT(tuple);
	result = psprintf("OPERATOR(%s.%s)",
					  quote_identifier(get_namespace_name(form->oprnamespace)),
					  NameStr(form->oprname));
	ReleaseSysCache(tuple);
	return result;
}

/*
 * dsm_key_signature describes what orders a primary key: the type,
 * collation and ordering operator of every column.  A job's shard bounds
 * and checkpoints are only valid while it stays the same.
 */
char *
dsm_key_signature(DsmKey *key)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < key->natts; i++)
		appendStringInfo(&buf, "%s%u/%u/%s", i > 0 ? "," : "",
						 key->typids[i], key->collations[i], key->lt_ops[i]);
	return buf.data;
}

/*
 * Widening casts a key may go through to reach a keys-mode mapper: each
 * maps distinct keys to distinct values, so the mapper's WHERE key = ANY
 * (keys) still finds exactly the page's rows.  (Other implicit casts, such
 * as bigint to double precision or text to name, can merge keys.)
 */
static const struct
{
	Oid			from;
	Oid			to;
}			widening_casts[] =
{
	{INT2OID, INT4OID}, {INT2OID, INT8OID}, {INT4OID, INT8OID},
	{INT2OID, NUMERICOID}, {INT4OID, NUMERICOID}, {INT8OID, NUMERICOID},
	{FLOAT4OID, FLOAT8OID}, {DATEOID, TIMESTAMPOID},
};

/*
 * dsm_key_fits_mapper tells whether keys of key_type can be passed to a
 * keys-mode mapper whose array holds elem_type: as they are when the types
 * are binary compatible, or through one of the widening casts above (an
 * integer key for a bigint[] mapper, say), in which case *cast is set.
 */
bool
dsm_key_fits_mapper(Oid key_type, Oid elem_type, bool *cast)
{
	Oid			base = getBaseType(key_type);

	*cast = false;
	if (IsBinaryCoercible(key_type, elem_type))
		return true;
	for (int i = 0; i < lengthof(widening_casts); i++)
	{
		if (widening_casts[i].from == base && widening_casts[i].to == elem_type)
		{
			*cast = true;
			return true;
		}
	}
	return false;
}

/*
 * dsm_check_no_inheritance_children refuses an ordinary table that has
 * inheritance children: their rows belong to it in queries, but its primary
 * key is unique only within each table, so two rows may share a key and
 * paging by key would skip one of them.  (Partitioned tables are fine:
 * their primary key is unique across the partitions.)
 */
void
dsm_check_no_inheritance_children(Relation rel)
{
	if (rel->rd_rel->relkind == RELKIND_RELATION &&
		find_inheritance_children(RelationGetRelid(rel), NoLock) != NIL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot map table \"%s\" because it has inheritance children",
						RelationGetRelationName(rel)),
				 errdetail("Its primary key is unique within each table of the hierarchy, not across it, so its rows cannot be paged by key."),
				 errhint("Launch a job on each table of the hierarchy, or use declarative partitioning.")));
}

/*
 * dsm_primary_key describes the primary key of an open relation, or
 * returns NULL (missing_ok) or errors when it has none.  Allocated in the
 * current memory context.
 */
DsmKey *
dsm_primary_key(Relation rel, bool missing_ok)
{
	Oid			indexoid = RelationGetPrimaryKeyIndex(rel);
	Relation	index;
	DsmKey	   *key;
	TupleDesc	desc = RelationGetDescr(rel);

	if (!OidIsValid(indexoid))
	{
		if (missing_ok)
			return NULL;
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("relation \"%s\" has no primary key",
						RelationGetRelationName(rel)),
				 errdetail("dsmapper splits and pages a table by its primary key."),
				 errhint("Add a primary key to the table.")));
	}

	index = index_open(indexoid, AccessShareLock);
	key = palloc0(sizeof(DsmKey));
	key->natts = index->rd_index->indnkeyatts;
	key->attnums = palloc(sizeof(AttrNumber) * key->natts);
	key->typids = palloc(sizeof(Oid) * key->natts);
	key->collations = palloc(sizeof(Oid) * key->natts);
	key->names = palloc(sizeof(char *) * key->natts);
	key->input_funcs = palloc(sizeof(Oid) * key->natts);
	key->typioparams = palloc(sizeof(Oid) * key->natts);
	key->output_funcs = palloc(sizeof(Oid) * key->natts);

	for (int i = 0; i < key->natts; i++)
	{
		AttrNumber	attnum = index->rd_index->indkey.values[i];
		Form_pg_attribute attr = TupleDescAttr(desc, attnum - 1);
		bool		varlena;

		key->attnums[i] = attnum;
		key->typids[i] = attr->atttypid;
		key->collations[i] = index->rd_indcollation[i];
		key->names[i] = pstrdup(quote_identifier(NameStr(attr->attname)));
		getTypeInputInfo(attr->atttypid, &key->input_funcs[i],
						 &key->typioparams[i]);
		getTypeOutputInfo(attr->atttypid, &key->output_funcs[i], &varlena);
	}
	/*
	 * The comparison operators of the index's own operator families, fully
	 * qualified: page queries then compare exactly as the index orders, and
	 * no operator on anyone's search_path can stand in for them.
	 */
	key->lt_ops = palloc(sizeof(char *) * key->natts);
	key->gt_ops = palloc(sizeof(char *) * key->natts);
	key->ge_ops = palloc(sizeof(char *) * key->natts);
	key->eq_ops = palloc(sizeof(char *) * key->natts);
	for (int i = 0; i < key->natts; i++)
	{
		Oid			family = index->rd_opfamily[i];
		Oid			type = index->rd_opcintype[i];

		key->lt_ops[i] = qualified_operator(get_opfamily_member(family, type, type,
																BTLessStrategyNumber));
		key->gt_ops[i] = qualified_operator(get_opfamily_member(family, type, type,
																BTGreaterStrategyNumber));
		key->ge_ops[i] = qualified_operator(get_opfamily_member(family, type, type,
																BTGreaterEqualStrategyNumber));
		key->eq_ops[i] = qualified_operator(get_opfamily_member(family, type, type,
																BTEqualStrategyNumber));
	}
	index_close(index, AccessShareLock);

	/* An alias for the table that no column of it is called. */
	key->alias = pstrdup("__dsmapper_row");
	while (get_attnum(RelationGetRelid(rel), key->alias) != InvalidAttrNumber)
		key->alias = psprintf("%s_", key->alias);

	return key;
}

/*
 * dsm_key_order_sql renders "a USING OPERATOR(s.<), b USING ..." for
 * ORDER BY, in the index's order.
 */
char *
dsm_key_order_sql(DsmKey *key, const char *prefix)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < key->natts; i++)
		appendStringInfo(&buf, "%s%s%s%s USING %s", i > 0 ? ", " : "",
						 prefix ? prefix : "", prefix ? "." : "",
						 key->names[i], key->lt_ops[i]);
	return buf.data;
}

/*
 * dsm_key_compare_sql renders "key op ($first_param, ...)" for op one of
 * "<", ">", ">=".  A single column is a plain comparison; several columns
 * are a row comparison (which a btree index serves) when their operators
 * share a schema, else the equivalent lexicographic expansion.
 */
char *
dsm_key_compare_sql(DsmKey *key, const char *prefix, const char *op,
					int first_param)
{
	char	  **ops = strcmp(op, "<") == 0 ? key->lt_ops :
		strcmp(op, ">") == 0 ? key->gt_ops : key->ge_ops;
	StringInfoData buf;
	bool		same = true;

	initStringInfo(&buf);
	for (int i = 1; i < key->natts; i++)
		if (strcmp(ops[i], ops[0]) != 0)
			same = false;

	if (key->natts == 1 || same)
	{
		StringInfoData params;

		initStringInfo(&params);
		for (int i = 0; i < key->natts; i++)
			appendStringInfo(&params, "%s$%d", i > 0 ? ", " : "", first_param + i);
		if (key->natts == 1)
			appendStringInfo(&buf, "%s %s %s", dsm_key_list_sql(key, prefix), ops[0],
							 params.data);
		else
			appendStringInfo(&buf, "ROW(%s) %s ROW(%s)", dsm_key_list_sql(key, prefix),
							 ops[0], params.data);
		return buf.data;
	}

	/*
	 * (a, b, c) op (x, y, z) is a op' x OR (a = x AND (b op' y OR (b = y AND
	 * c op z))), where op' is the strict form of op.
	 */
	appendStringInfoChar(&buf, '(');
	for (int i = 0; i < key->natts; i++)
	{
		bool		last = (i == key->natts - 1);
		const char *col = psprintf("%s%s%s", prefix ? prefix : "", prefix ? "." : "",
								   key->names[i]);
		const char *strict = strcmp(op, "<") == 0 ? key->lt_ops[i] : key->gt_ops[i];

		if (last)
			appendStringInfo(&buf, "%s %s $%d", col, ops[i], first_param + i);
		else
			appendStringInfo(&buf, "%s %s $%d OR (%s %s $%d AND (",
							 col, strict, first_param + i,
							 col, key->eq_ops[i], first_param + i);
	}
	for (int i = 0; i < key->natts - 1; i++)
		appendStringInfoString(&buf, "))");
	appendStringInfoChar(&buf, ')');
	return buf.data;
}

/*
 * dsm_key_list_sql renders the key columns as "prefix.a, prefix.b"
 * (prefix may be NULL).
 */
char *
dsm_key_list_sql(DsmKey *key, const char *prefix)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < key->natts; i++)
		appendStringInfo(&buf, "%s%s%s%s", i > 0 ? ", " : "",
						 prefix ? prefix : "", prefix ? "." : "",
						 key->names[i]);
	return buf.data;
}

/*
 * dsm_quoted_relation_name returns schema.table, both quoted, or errors if
 * the relation no longer exists.
 */
char *
dsm_quoted_relation_name(Oid relid)
{
	char	   *relname = get_rel_name(relid);
	char	   *nspname;

	if (relname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	nspname = get_namespace_name(get_rel_namespace(relid));
	return quote_qualified_identifier(nspname, relname);
}

/*
 * dsm_check_filter_syntax makes sure a filter is one plain SQL expression,
 * so that it cannot change the shape of the queries it is embedded in.
 * Columns and type are checked later by preparing a real query.
 */
void
dsm_check_filter_syntax(const char *filter)
{
	List	   *stmts = NIL;
	RawStmt    *raw;
	SelectStmt *select;
	ResTarget  *target;
	bool		plain = false;
	MemoryContext cxt = CurrentMemoryContext;

	/* One plain expression, reported as a filter error when it is not. */
	PG_TRY();
	{
		stmts = raw_parser(psprintf("SELECT (%s\n)", filter), RAW_PARSE_DEFAULT);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		ereport(ERROR,
				(errcode(edata->sqlerrcode),
				 errmsg("invalid filter: %s", edata->message),
				 errdetail("The filter was: %s", filter),
				 errhint("Write a boolean expression over the table's columns, such as \"status = 'new'\".")));
	}
	PG_END_TRY();

	/*
	 * The filter is embedded as "(filter)": a closing parenthesis that it
	 * did not open would change the shape of the query around it.  The
	 * scanner skips parentheses inside literals, identifiers and comments.
	 */
	{
		core_yyscan_t scanner;
		core_yy_extra_type extra;
		core_YYSTYPE yylval;
		YYLTYPE		yylloc;
		int			depth = 0;

		scanner = scanner_init(filter, &extra, &ScanKeywords, ScanKeywordTokens);
		PG_TRY();
		{
			for (;;)
			{
				int			token = core_yylex(&yylval, &yylloc, scanner);

				if (token == 0)
					break;
				if (token == '(')
					depth++;
				else if (token == ')' && --depth < 0)
					break;
			}
		}
		PG_FINALLY();
		{
			scanner_finish(scanner);
		}
		PG_END_TRY();
		if (depth < 0)
			ereport(ERROR,
					(errcode(ERRCODE_SYNTAX_ERROR),
					 errmsg("filter must be a single SQL expression"),
					 errdetail("The filter closes a parenthesis it did not open: %s", filter),
					 errhint("Write a boolean expression over the table's columns, such as \"status = 'new'\".")));
	}

	if (list_length(stmts) == 1)
	{
		raw = linitial_node(RawStmt, stmts);
		if (IsA(raw->stmt, SelectStmt))
		{
			select = (SelectStmt *) raw->stmt;
			plain = select->op == SETOP_NONE &&
				list_length(select->targetList) == 1 &&
				select->fromClause == NIL &&
				select->whereClause == NULL &&
				select->groupClause == NIL &&
				select->havingClause == NULL &&
				select->windowClause == NIL &&
				select->valuesLists == NIL &&
				select->sortClause == NIL &&
				select->limitCount == NULL &&
				select->limitOffset == NULL &&
				select->lockingClause == NIL &&
				select->withClause == NULL &&
				select->distinctClause == NIL &&
				select->intoClause == NULL;
			if (plain)
			{
				target = linitial_node(ResTarget, select->targetList);
				plain = target->name == NULL;
			}
		}
	}

	if (!plain)
		ereport(ERROR,
				(errcode(ERRCODE_SYNTAX_ERROR),
				 errmsg("filter must be a single SQL expression"),
				 errdetail("The filter was: %s", filter),
				 errhint("Write a boolean expression over the table's columns, such as \"status = 'new'\".")));
}

static void
set_task_locktag(LOCKTAG *tag, int64 job_id, int32 shard)
{
	/*
	 * An advisory lock tag with our own field4, so it can never collide
	 * with pg_advisory_lock() keys.  XXX: job ids above 2^32 share lock
	 * tags with lower ids; that only costs a skipped claim.
	 */
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) job_id, (uint32) shard,
						 DSM_LOCK_SPACE);
}

/*
 * dsm_lock_task takes the claim lock of a task (a shard, or the split task
 * of a job).  A session lock outlives transactions and is what a worker
 * holds for a turn; a transaction lock is what the API takes to settle a
 * shard nobody works on, and what dsmapper_run() keeps until its caller's
 * transaction ends.  Returns false if not available and !wait.
 */
bool
dsm_lock_task(int64 job_id, int32 shard, bool session, bool wait)
{
	LOCKTAG		tag;

	set_task_locktag(&tag, job_id, shard);
	return LockAcquire(&tag, ExclusiveLock, session, !wait) !=
		LOCKACQUIRE_NOT_AVAIL;
}

/*
 * dsm_unlock_task releases a session claim lock.
 */
void
dsm_unlock_task(int64 job_id, int32 shard)
{
	LOCKTAG		tag;

	set_task_locktag(&tag, job_id, shard);
	LockRelease(&tag, ExclusiveLock, true);
}

/*
 * dsm_lock_running_slot takes one of the job's max_running_shards slots (a
 * session lock in a second key space), never waiting.
 */
bool
dsm_lock_running_slot(int64 job_id, int32 slot)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) job_id, (uint32) slot,
						 DSM_LOCK_SPACE + 1);
	return LockAcquire(&tag, ExclusiveLock, true, true) != LOCKACQUIRE_NOT_AVAIL;
}

void
dsm_unlock_running_slot(int64 job_id, int32 slot)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) job_id, (uint32) slot,
						 DSM_LOCK_SPACE + 1);
	LockRelease(&tag, ExclusiveLock, true);
}

/*
 * dsm_release_task gives up everything a claim took.
 */
void
dsm_release_task(DsmTask *task)
{
	if (task->running_slot >= 0)
		dsm_unlock_running_slot(task->job_id, task->running_slot);
	task->running_slot = -1;
	dsm_unlock_task(task->job_id, task->shard);
}

bool
dsm_is_final_job_state(const char *state)
{
	return strcmp(state, "succeeded") == 0 ||
		strcmp(state, "failed") == 0 ||
		strcmp(state, "aborted") == 0;
}
