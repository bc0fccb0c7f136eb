
# 031_hostile_names.pl: names and texts chosen to break quoting.
#
#  - schema, table and key column names with quotes, spaces, mixed case,
#    dots, semicolons and non-ASCII letters; text keys full of characters
#    that matter in array and row literals; jobs map every row exactly once
#    in keys mode and rows mode;
#  - mapper ids with spaces, quotes, backslashes, format directives and
#    non-ASCII letters;
#  - filters that try to break out of the expression they are embedded in:
#    refused at launch, or mapping exactly the rows the expression selects;
#    a filter reading a table the owner cannot read is refused at launch;
#  - a table with a column named __dsmapper_row (dsmapper's own alias).
#
# Everything is owned and launched by alice, an ordinary role.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

# The framework turns restart_after_crash off; a crash (see part 5) must not
# end the test.
my $node = new_node('hostile_names', extra_conf => "restart_after_crash = on\n");

diag('server_encoding: ' . $node->safe_psql('postgres', 'SHOW server_encoding'));

# ---------------------------------------------------------------------------
# Helpers.

# qi(name): the name as a quoted SQL identifier.
sub qi
{
	my ($name) = @_;
	$name =~ s/"/""/g;
	return "\"$name\"";
}

# lit(text): the text as a SQL string literal.
sub lit
{
	my ($text) = @_;
	$text =~ s/'/''/g;
	return "'$text'";
}

sub su
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub alice
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql, extra_params => [ '-U', 'alice' ]);
}

# try_alice(sql): (SQLSTATE of the error or '', stdout, stderr).
sub try_alice
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	$node->psql(
		'postgres', "\\set VERBOSITY verbose\n" . $sql,
		stdout => \$out,
		stderr => \$err,
		extra_params => [ '-U', 'alice' ]);
	my $state = $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : '';
	return ($state, $out, $err);
}

my $final = "('succeeded', 'failed', 'aborted')";

# settle(job, nrows): waits until the job is final, but gives up early when
# it has processed more rows than the table has (a runaway job) or after
# 20 s; a job that is not final then is aborted.  Returns the final state,
# or 'runaway' / 'timeout'.
sub settle
{
	my ($job, $nrows) = @_;
	my $deadline = time() + 20;
	while (time() < $deadline)
	{
		my $r = su(
			"SELECT state || '|' || processed FROM dsmapper.jobs WHERE job_id = $job");
		my ($state, $processed) = split /\|/, $r;
		return $state if $state =~ /^(succeeded|failed|aborted)$/;
		if ($processed > $nrows)
		{
			su("SELECT dsmapper_abort($job)");
			wait_job($node, $job, timeout => '30 s');
			return 'runaway';
		}
		usleep(100_000);
	}
	su("SELECT dsmapper_abort($job)");
	wait_job($node, $job, timeout => '30 s');
	return 'timeout';
}

# ---------------------------------------------------------------------------
# Roles.

su(q{
	CREATE ROLE alice LOGIN;
	GRANT CREATE ON DATABASE postgres TO alice;
	CREATE SCHEMA sec;
	CREATE TABLE sec.secret (x integer);
	INSERT INTO sec.secret VALUES (1);
	CREATE SCHEMA sec_usage;
	CREATE TABLE sec_usage.secret (x integer);
	INSERT INTO sec_usage.secret VALUES (1);
	GRANT USAGE ON SCHEMA sec_usage TO alice;
});
alice('CREATE SCHEMA alice');

# ===========================================================================
# 1. Keys mode: schema My "Schema", table Tab le"X, key column Id "x".
# ===========================================================================

my $s1 = qi('My "Schema"');
my $t1 = "$s1." . qi('Tab le"X');
my $k1 = qi('Id "x"');
my $f1 = "$s1." . qi('Map "per" ü');
my $id1 = q{alice's "mapper" ✓ ünï 表 ; DROP TABLE x; --};
my $rows1 = 2000;

alice(qq{
	CREATE SCHEMA $s1;
	CREATE TABLE $t1 ($k1 bigint PRIMARY KEY, "N" integer NOT NULL DEFAULT 0,
	                  "select" text, "Valüe" integer);
	INSERT INTO $t1 ($k1) SELECT g FROM generate_series(1, $rows1) g;
	ANALYZE $t1;
	CREATE FUNCTION $f1(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS \$fn\$
		UPDATE $t1 SET "N" = "N" + 1 WHERE $k1 = ANY (keys)
	\$fn\$;
});
alice('SELECT dsmapper_register(' . lit($id1) . ', ' . lit("$f1(bigint[], jsonb)") . ')');
is(su('SELECT function::text FROM dsmapper.mappers WHERE mapper = ' . lit($id1)),
	"$f1(bigint[],jsonb)", 'keys mode: the mapper id is registered as given');

my $job1 = alice('SELECT dsmapper_launch(' . lit($id1) . ', ' . lit($t1) . ', shards => 4, page_size => 100)');
like($job1, qr/^\d+$/, 'keys mode: launch on a hostile name works');
is(wait_job($node, $job1, timeout => '60 s'), 'succeeded', 'keys mode: the job succeeds');
is(su(qq{SELECT count(*), count(*) FILTER (WHERE "N" = 1) FROM $t1}),
	"$rows1|$rows1", 'keys mode: every row mapped exactly once');
is(su("SELECT mapper = " . lit($id1) . ", relation::text FROM dsmapper.jobs WHERE job_id = $job1"),
	"t|$t1", 'keys mode: dsmapper.jobs shows the mapper id and the quoted relation');
is(su("SELECT count(*) > 1, sum(processed) FROM dsmapper.shards WHERE job_id = $job1"),
	"t|$rows1", 'keys mode: several shards, counts add up');

# ===========================================================================
# 2. Rows mode with a composite key (text, integer) in a schema with
#    non-ASCII letters, a table name with a semicolon, quotes and a dot, and
#    text keys full of array- and row-literal syntax.
# ===========================================================================

my $s2 = qi('Ünïcødé 表 "s"');
my $t2 = "$s2." . qi('t; DROP TABLE "Tab le""X"; --.x');
my $f2 = "$s2." . qi('rows "fn"');
my $id2 = q{rows ✓ "two" 'quoted' \ back};

alice(qq{
	CREATE SCHEMA $s2;
	CREATE TABLE $t2 ("k ey" text, "K2" integer, "V" integer NOT NULL DEFAULT 0,
	                  PRIMARY KEY ("k ey", "K2"));
	INSERT INTO $t2 ("k ey", "K2")
	SELECT (ARRAY['a,b', '{x}', '"q"', 'back\\slash', '(p)', ' lead', 'ü表',
	              E'tab\\tch', 'comma, ) paren', 'NULL'])[1 + g % 10] || g, g % 3
	  FROM generate_series(1, 1500) g;
	INSERT INTO $t2 ("k ey", "K2") VALUES ('NULL', 0), ('', 0), ('', 1), ('"', 2), ('\\', 2), ('''', 2);
	ANALYZE $t2;
	CREATE FUNCTION $f2(rs $t2\[], params jsonb)
	RETURNS void LANGUAGE sql AS \$fn\$
		UPDATE $t2 AS t SET "V" = t."V" + 1
		  FROM unnest(rs) AS r
		 WHERE t."k ey" = r."k ey" AND t."K2" = r."K2"
	\$fn\$;
});
my $rows2 = su("SELECT count(*) FROM $t2");
is($rows2, '1506', 'rows mode: the table has its rows');
alice('SELECT dsmapper_register(' . lit($id2) . ', ' . lit("$f2($t2\[], jsonb)") . ')');
my $job2 = alice('SELECT dsmapper_launch(' . lit($id2) . ', ' . lit($t2) . ', shards => 4, page_size => 100)');
is(wait_job($node, $job2, timeout => '60 s'), 'succeeded', 'rows mode: the job succeeds');
is(su(qq{SELECT count(*), count(*) FILTER (WHERE "V" = 1) FROM $t2}),
	"$rows2|$rows2", 'rows mode: every row mapped exactly once')
  or diag(su(qq{SELECT string_agg(quote_literal("k ey") || ',' || "K2" || '=' || "V", '; ') FROM $t2 WHERE "V" <> 1}));
is(su("SELECT mapper = " . lit($id2) . ", relation::text FROM dsmapper.jobs WHERE job_id = $job2"),
	"t|$t2", 'rows mode: dsmapper.jobs shows the mapper id and the quoted relation');
is(su("SELECT count(*) > 1, sum(processed) FROM dsmapper.shards WHERE job_id = $job2"),
	"t|$rows2", 'rows mode: several shards, counts add up');
diag('rows mode shard bounds: '
	  . su("SELECT string_agg(coalesce(range_start, '-') || ' .. ' || coalesce(range_end, '-'), ' | ' ORDER BY shard) FROM dsmapper.shards WHERE job_id = $job2"));

# ===========================================================================
# 3. Mapper ids.
# ===========================================================================

alice(q{
	CREATE TABLE alice.mt (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0);
	INSERT INTO alice.mt (id) SELECT g FROM generate_series(1, 10) g;
	CREATE FUNCTION alice.mt_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		UPDATE alice.mt SET n = n + 1 WHERE id = ANY (keys)
	$fn$;
	CREATE TABLE alice.canary (x integer);
});

my @ids = (
	'with  two  spaces',
	q{single ' quote},
	q{double " quote},
	'ünïcødé ✓ 表',
	q{x'); DROP TABLE alice.canary; --},
	q{back\slash \\ \n},
	'%s %d %n %% %x',
	'  leading and trailing  ',
	'MiXeD CaSe',
	'"',
	q{'});
my $nids = scalar @ids;
foreach my $id (@ids)
{
	alice('SELECT dsmapper_register(' . lit($id) . ", 'alice.mt_map(bigint[], jsonb)')");
	is(su('SELECT count(*) FROM dsmapper.mappers WHERE mapper = ' . lit($id)),
		'1', "mapper id [$id] is registered verbatim");
	my $job = alice('SELECT dsmapper_launch(' . lit($id) . ", 'alice.mt')");
	is(wait_job($node, $job, timeout => '60 s'), 'succeeded', "mapper id [$id]: job succeeds");
	is(su("SELECT mapper = " . lit($id) . " FROM dsmapper.jobs WHERE job_id = $job"),
		't', "mapper id [$id]: dsmapper.jobs shows it verbatim");
}
is(su('SELECT count(*), count(*) FILTER (WHERE n = ' . $nids . ') FROM alice.mt'),
	"10|10", "each of the $nids jobs mapped every row once");
foreach my $id (@ids)
{
	alice('SELECT dsmapper_unregister(' . lit($id) . ')');
}
is(su("SELECT count(*) FROM dsmapper.mappers WHERE function = 'alice.mt_map(bigint[], jsonb)'::regprocedure"),
	'0', 'every such mapper id can be unregistered');
my ($cstate) = try_alice("SELECT dsmapper_register(E'line\\nbreak', 'alice.mt_map(bigint[], jsonb)')");
is($cstate, '22023', 'a mapper id with a control character is refused');
is(su("SELECT to_regclass('alice.canary') IS NOT NULL"), 't', 'the canary table still exists');

# ===========================================================================
# 4. Filters that try to escape.  Each case is one of
#      refuse => SQLSTATE        refused at launch with that SQLSTATE
#      rows => predicate         accepted, and maps exactly the rows where
#                                the predicate holds, once each
#      either => predicate       refused with a syntax error (42601), or
#                                accepted and mapping exactly those rows
# ===========================================================================

my $frows = 1000;
alice(qq{
	CREATE TABLE alice.ft (id bigint PRIMARY KEY, n integer NOT NULL DEFAULT 0,
	                       grp integer NOT NULL);
	INSERT INTO alice.ft (id, grp) SELECT g, g % 4 FROM generate_series(1, $frows) g;
	ANALYZE alice.ft;
	CREATE FUNCTION alice.ft_map(keys bigint[], params jsonb)
	RETURNS void LANGUAGE sql AS \$fn\$
		UPDATE alice.ft SET n = n + 1 WHERE id = ANY (keys)
	\$fn\$;
	SELECT dsmapper_register('ft', 'alice.ft_map(bigint[], jsonb)');
});

my @filters = (
	[ 'true; DROP TABLE alice.canary', refuse => '42601' ],
	[ 'true); DROP TABLE alice.canary; SELECT (true', refuse => '42601' ],
	[ 'true) ORDER BY 1; DROP TABLE alice.canary; SELECT (1', refuse => '42601' ],
	[ 'true) OR (1=1', either => 'true' ],
	[ 'grp = 0) OR (grp = 1', either => 'grp IN (0, 1)' ],
	[ 'false) OR (id > 900', either => 'id > 900' ],
	[ '1=1 --', either => 'true' ],
	[ 'grp = 2 -- ) OR (true', rows => 'grp = 2' ],
	[ q{(select pg_sleep(0))::text = ''}, rows => 'true' ],
	[ 'grp = 2 /* ) OR (true */', rows => 'grp = 2' ],
	[ q{grp = 3 AND $$)$$ = ')'}, rows => 'grp = 3' ],
	[ q{grp = 1 AND ')'' OR true --' = ')'' OR true --'}, rows => 'grp = 1' ],
	[ 'id IN (SELECT f.id FROM alice.ft f WHERE f.grp = 1)', rows => 'grp = 1' ],
	[ '1=1 /*', refuse => '42601' ],
	[ 'true)', refuse => '42601' ],
	[ '(true', refuse => '42601' ],
	[ 'exists (SELECT 1 FROM sec.secret)', refuse => '42501' ],
	[ 'exists (SELECT 1 FROM sec_usage.secret)', refuse => '42501' ],
	[ 'count(*) > 0', refuse => '42803' ],
	[ 'generate_series(1, 2) = 1', refuse => '0A000' ],
	[ 'grp', refuse => '42804' ],
	[ 'no_such_column = 1', refuse => '42703' ],
	[ '   ', refuse => '22023' ]);

foreach my $case (@filters)
{
	my ($filter, $kind, $want) = @$case;
	(my $label = $filter) =~ s/\n/\\n/g;
	alice('UPDATE alice.ft SET n = 0');
	my $jobs_before = su('SELECT count(*) FROM dsmapper.job');
	my ($state, $out, $err) = try_alice(
		"SELECT dsmapper_launch('ft', 'alice.ft', shards => 4, page_size => 50, filter => "
		  . lit($filter) . ')');
	chomp $out;

	if ($kind eq 'refuse')
	{
		is($state, $want, "filter [$label] is refused at launch with $want")
		  or diag("stdout: $out\nstderr: $err");
		if ($state eq '')
		{
			# Accepted after all: it must at least not map anything it
			# should not, so let it finish and show what it did.
			my $final_state = settle($out, $frows);
			diag("filter [$label] was accepted: job $out ended $final_state: "
				  . su("SELECT coalesce(error, '') FROM dsmapper.jobs WHERE job_id = $out")
				  . ' / '
				  . su("SELECT coalesce(string_agg(DISTINCT error_sqlstate || ' ' || error, ' | '), '') FROM dsmapper.shards WHERE job_id = $out"));
			is(su('SELECT count(*) FROM alice.ft WHERE n <> 0'),
				'0', "filter [$label]: nothing was mapped");
		}
		else
		{
			is(su('SELECT count(*) FROM dsmapper.job'), $jobs_before,
				"filter [$label]: nothing was stored");
		}
		next;
	}

	if ($state ne '')
	{
		if ($kind eq 'either' && $state eq '42601')
		{
			pass("filter [$label] is refused at launch ($state)");
		}
		else
		{
			fail("filter [$label] is accepted");
			diag("stderr: $err");
		}
		next;
	}

	my $final_state = settle($out, $frows);
	is($final_state, 'succeeded', "filter [$label]: the job succeeds");
	my $wrong = su(
		"SELECT count(*) FILTER (WHERE n <> CASE WHEN ($want) THEN 1 ELSE 0 END) || ' wrong of ' || count(*) FILTER (WHERE $want) || ' intended, processed ' || (SELECT processed FROM dsmapper.jobs WHERE job_id = $out) FROM alice.ft"
	);
	like($wrong, qr/^0 wrong of \d+ intended, processed \d+$/,
		"filter [$label]: exactly the rows where ($want) were mapped, once each")
	  or diag($wrong);
	my ($intended, $processed) = $wrong =~ /of (\d+) intended, processed (\d+)/;
	is($processed, $intended, "filter [$label]: processed counts the intended rows")
	  if defined $intended;
}
is(su("SELECT to_regclass('alice.canary') IS NOT NULL AND to_regclass('alice.ft') IS NOT NULL"),
	't', 'the canary and the filtered table still exist');

# ===========================================================================
# 5. A column named __dsmapper_row.  In keys mode and in a filter it must
#    work; in rows mode the mapper must get whole rows.  If dsmapper cannot
#    handle it, the launch must be refused cleanly; the server must not
#    crash either way.  (Run last: a crash restarts the server.)
# ===========================================================================

alice(q{
	CREATE TABLE alice.dr (id integer PRIMARY KEY, __dsmapper_row integer NOT NULL,
	                       n integer NOT NULL DEFAULT 0);
	INSERT INTO alice.dr (id, __dsmapper_row) SELECT g, g * 1000 FROM generate_series(1, 300) g;
	CREATE TABLE alice.dr_seen (id integer, v integer);
	CREATE FUNCTION alice.dr_keys(keys integer[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		UPDATE alice.dr SET n = n + 1 WHERE id = ANY (keys)
	$fn$;
	CREATE FUNCTION alice.dr_rows(rs alice.dr[], params jsonb)
	RETURNS void LANGUAGE sql AS $fn$
		INSERT INTO alice.dr_seen SELECT r.id, r.__dsmapper_row FROM unnest(rs) AS r
	$fn$;
	SELECT dsmapper_register('dr-keys', 'alice.dr_keys(integer[], jsonb)');
	SELECT dsmapper_register('dr-rows', 'alice.dr_rows(alice.dr[], jsonb)');
});

my $jk = alice("SELECT dsmapper_launch('dr-keys', 'alice.dr', shards => 3, page_size => 50)");
is(wait_job($node, $jk, timeout => '60 s'), 'succeeded', '__dsmapper_row column, keys mode: job succeeds');
is(su('SELECT count(*), count(*) FILTER (WHERE n = 1) FROM alice.dr'),
	'300|300', '__dsmapper_row column, keys mode: every row mapped once');

alice('UPDATE alice.dr SET n = 0');
my $jf = alice(
	"SELECT dsmapper_launch('dr-keys', 'alice.dr', shards => 3, page_size => 50, filter => '__dsmapper_row > 150000')"
);
is(wait_job($node, $jf, timeout => '60 s'), 'succeeded',
	'__dsmapper_row column in a filter: job succeeds');
is(su('SELECT count(*) FILTER (WHERE n <> CASE WHEN id > 150 THEN 1 ELSE 0 END) FROM alice.dr'),
	'0', '__dsmapper_row column in a filter: the column is what the filter reads');

my $log_offset = log_position($node);
my ($rstate, $jr, $rerr) = try_alice(
	"SELECT dsmapper_launch('dr-rows', 'alice.dr', shards => 1, page_size => 1000, max_attempts => 1)");
chomp $jr;
if ($rstate ne '')
{
	pass("__dsmapper_row column, rows mode: refused at launch ($rstate)");
	diag("refusal: $rerr");
}
else
{
	# Wait for the job to be final, riding out a server restart.
	my $state = '';
	my $deadline = time() + 60;
	while (time() < $deadline)
	{
		my ($o, $e) = ('', '');
		$node->psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $jr",
			stdout => \$o, stderr => \$e);
		$state = $o;
		last if $state =~ /^(succeeded|failed|aborted)$/;
		usleep(200_000);
	}
	is($state, 'succeeded', '__dsmapper_row column, rows mode: the job succeeds');
	my ($o, $e) = ('', '');
	$node->psql('postgres',
		'SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE v = id * 1000) FROM alice.dr_seen',
		stdout => \$o, stderr => \$e);
	is($o, '300|300|300', '__dsmapper_row column, rows mode: the mapper got every whole row once');
	$node->psql('postgres',
		"SELECT string_agg(DISTINCT coalesce(error_sqlstate, '') || ' ' || coalesce(error, ''), ' | ') FROM dsmapper.shards WHERE job_id = $jr",
		stdout => \$o, stderr => \$e);
	diag("rows-mode job $jr: state $state; shard errors: $o");
}
my $crashes = () = log_since($node, $log_offset) =~ /terminated by signal/g;
is($crashes, 0, '__dsmapper_row column: no server process crashed');

$node->stop;
done_testing();
