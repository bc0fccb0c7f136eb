
# 010_key_types.pl: keys mode works with a single-column primary key of any
# btree type: integers, numeric with fractions, text under a non-C
# collation, varchar (through text[] and varchar[] mappers), uuid, date,
# timestamp, timestamptz around time zone changes, inet and bytea.  Every
# row is mapped exactly once, keys arrive in key order, and the shard
# ranges in dsmapper.shards are readable text that reads back as the key
# type, whatever DateStyle and TimeZone the reading session uses.  Tables
# above 1024 blocks are split from the primary key index, in balance.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

# The server runs in a time zone with daylight saving time; the sessions
# below use others.
my $node = new_node('key_types',
	extra_conf => "timezone = 'America/New_York'\n");

# A non-C collation for the text key: ICU if the server has it, else a libc
# locale, else the default.
my $collation = $node->safe_psql(
	'postgres', q{
	SELECT collname FROM pg_collation
	 WHERE collname IN ('en-US-x-icu', 'en-x-icu', 'und-x-icu', 'en_US.utf8', 'en_US')
	 ORDER BY array_position(ARRAY['en-US-x-icu', 'en-x-icu', 'und-x-icu',
	                               'en_US.utf8', 'en_US']::name[], collname)
	 LIMIT 1});
$collation = 'default' if $collation eq '';
note("text keys use collation \"$collation\"");

# Sessions that launch and read back use settings unlike the server's.
my $odd_session = q{SET TimeZone = 'Asia/Kathmandu'; SET DateStyle = 'SQL, DMY'};
my @reader_sessions = (
	$odd_session,
	q{SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'},
	q{SET TimeZone = 'Pacific/Chatham'; SET DateStyle = 'German'});

my $rows = 3000;

# name => [key type (DDL), key type of the mapper, key expression of g,
#          pattern a range bound must match]
my $ts_re = qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?$/;
my %types = (
	k_int2 => [ 'smallint', 'smallint', '(g - 1500)::smallint', qr/^-?\d+$/ ],
	k_int4 => [ 'integer', 'integer', 'g * 7919 - 10000000', qr/^-?\d+$/ ],
	k_int8 => [
		'bigint', 'bigint', 'g * 3000000000001 - 4000000000000000',
		qr/^-?\d+$/
	],
	# keys cast implicitly to the mapper's element type
	k_int4_as_int8 => [ 'integer', 'bigint', 'g * 7919 - 10000000', qr/^-?\d+$/ ],
	k_date_as_ts => [
		'date', 'timestamp', q{date '1999-12-25' + g * 3},
		qr/^\d{4}-\d\d-\d\d$/
	],
	# fractions of many scales, negative and positive
	k_numeric => [
		'numeric', 'numeric',
		'round((g - 1500)::numeric / 7, (g % 13)) + g * 0.000000000000000001',
		qr/^-?\d+(\.\d+)?$/
	],
	# words whose order differs between C and a linguistic collation
	k_text => [
		qq{text COLLATE "$collation"}, 'text',
		q{(ARRAY['apple', 'Apple', 'Äpfel', 'banana', 'Banana', 'éclair',
		         'Eclair', 'zebra', 'Zebra', 'ångström'])[1 + g % 10]
		  || ' ' || (g * 7 % 3001)::text},
		qr/^\S+ \d+$/
	],
	k_varchar => [
		'varchar(40)', 'text', q{('v-' || md5(g::text))::varchar(40)},
		qr/^v-[0-9a-f]{32}$/
	],
	k_uuid => [
		'uuid', 'uuid', 'md5(g::text)::uuid',
		qr/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
	],
	k_date => [
		'date', 'date', q{date '1999-12-25' + g * 3},
		qr/^\d{4}-\d\d-\d\d$/
	],
	k_timestamp => [
		'timestamp', 'timestamp',
		q{timestamp '2024-03-10 01:00:00.5' + g * interval '2.000123 s'},
		$ts_re
	],
	# two hours around the spring-forward change (2024-03-10 07:00 UTC in
	# New York) and two around the fall-back change (2024-11-03 06:00 UTC),
	# where local times 01:00-02:00 happen twice
	k_timestamptz => [
		'timestamptz', 'timestamptz',
		q{CASE WHEN g <= 1000
		       THEN timestamptz '2024-03-10 06:00:00.123456+00' + g * interval '7.2 s'
		       ELSE timestamptz '2024-11-03 05:00:00+00' + (g - 1000) * interval '3.6 s'
		  END},
		qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?[+-]\d\d(:\d\d)?$/
	],
	# IPv4 with two netmasks, and IPv6
	k_inet => [
		'inet', 'inet',
		q{CASE g % 3 WHEN 0 THEN '10.0.0.0'::inet + g
		             WHEN 1 THEN set_masklen('10.0.0.0'::inet + g, 24)
		             ELSE '2001:db8::'::inet + g END},
		qr{^[0-9a-f:.]+(/\d+)?$}
	],
	k_bytea => [
		'bytea', 'bytea',
		q{decode(md5(g::text), 'hex') || '\x00ff'::bytea},
		qr/^\\x[0-9a-f]+$/
	],);

# Each table gets a mapper that counts every key it is given and records
# pages whose keys are not strictly ascending in the key's own order.
$node->safe_psql('postgres',
	'CREATE TABLE disorder (tab text, keys text, page_order text)');
foreach my $t (sort keys %types)
{
	my ($keytype, $argtype, $expr) = @{ $types{$t} };
	create_keyed_table($node, $t, $keytype, $expr, $rows);
	my $coll = $t eq 'k_text' ? qq{COLLATE "$collation"} : '';
	$node->safe_psql(
		'postgres', qq{
		CREATE FUNCTION map_$t(keys $argtype\[], params jsonb)
		RETURNS void LANGUAGE plpgsql AS \$fn\$
		BEGIN
			UPDATE $t SET n = n + 1 WHERE id = ANY (keys);
			IF EXISTS (SELECT 1 FROM generate_subscripts(keys, 1) i
			            WHERE i > 1 AND NOT (keys[i - 1] $coll < keys[i] $coll)) THEN
				INSERT INTO disorder VALUES ('$t', keys::text, 'not ascending');
			END IF;
		END \$fn\$;
		SELECT dsmapper_register('map_$t', 'map_$t($argtype\[], jsonb)');
	});
}

# The text table's keys really are in a different order under C.
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) > 0 FROM (
		  SELECT row_number() OVER (ORDER BY id) AS r1,
		         row_number() OVER (ORDER BY id COLLATE "C") AS r2 FROM k_text) s
		 WHERE r1 <> r2}),
	$collation eq 'default' || $collation eq 'C' ? 'f' : 't',
	"text keys sort differently under \"$collation\" and \"C\"");

# Launch every job from the odd session: its settings must not matter.
my %job;
foreach my $t (sort keys %types)
{
	$job{$t} = $node->safe_psql('postgres',
		"$odd_session; SELECT dsmapper_launch('map_$t', '$t', shards => 4, page_size => 100)"
	);
	like($job{$t}, qr/^\d+$/, "$t: launched");
}

foreach my $t (sort keys %types)
{
	my $re = $types{$t}[3];
	is(wait_job($node, $job{$t}, timeout => '30 s'), 'succeeded', "$t: job succeeds");
	is(counter_summary($node, $t), "$rows|$rows|0|0",
		"$t: every row mapped exactly once");
	my $info = job_info($node, $job{$t});
	is($info->{processed}, $rows, "$t: processed = $rows");
	is($info->{expected}, $rows, "$t: expected is exact");
	is($info->{shards}, 4, "$t: 4 shards");

	my @shards = shard_list($node, $job{$t});
	my @bounds = grep { defined } map { ($_->{range_start}, $_->{range_end}) } @shards;
	is(scalar(@bounds), 6, "$t: 3 boundaries, each shown as range_end and range_start");
	my @bad = grep { $_ !~ $re } @bounds;
	ok(!@bad, "$t: range bounds are readable text of the key type")
	  or diag("unexpected bounds: @bad");

	foreach my $setup (@reader_sessions)
	{
		my @problems = shard_range_mismatches($node, $job{$t}, $t,
			$types{$t}[1] eq 'text' ? 'text' : $types{$t}[0],
			setup => $setup,
			collate => $t eq 'k_text' ? qq{"$collation"} : undef);
		ok(!@problems, "$t: ranges read back and hold each shard's rows ($setup)")
		  or diag(join("\n", @problems));
	}
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM disorder'),
	'0', 'every page had its keys in ascending order');

# A key cast for the mapper: a failing page still records the key itself
# (not the cast value) as its first and last key.
$node->safe_psql(
	'postgres', q{
	CREATE TABLE k_cast_err (id date PRIMARY KEY);
	INSERT INTO k_cast_err SELECT date '2020-01-01' + g FROM generate_series(1, 100) g;
	CREATE FUNCTION map_cast_err(keys timestamp[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF timestamp '2020-02-20' = ANY (keys) THEN
			RAISE EXCEPTION 'bad key in %', keys[1];
		END IF;
	END $$;
	SELECT dsmapper_register('map_cast_err', 'map_cast_err(timestamp[], jsonb)');
});
my $cast_job = $node->safe_psql('postgres',
	"SELECT dsmapper_launch('map_cast_err', 'k_cast_err', shards => 1, page_size => 10)");
is(wait_job($node, $cast_job), 'failed', 'a mapper of cast keys fails on its bad page');
is( $node->safe_psql(
		'postgres',
		"SELECT error_first_key || '|' || error_last_key || '|' || resume_from
		   FROM dsmapper.shards WHERE job_id = $cast_job"),
	'2020-02-11|2020-02-20|2020-02-10',
	'the failed page and the checkpoint are recorded as keys of the key type');

# A timestamptz range bound denotes the same instant in every session.
{
	my @shards = shard_list($node, $job{k_timestamptz});
	my $bound = $shards[1]{range_end};
	my @epochs = map {
		$node->safe_psql('postgres',
			"$_; SELECT extract(epoch FROM '$bound'::timestamptz)")
	} @reader_sessions;
	is(scalar(keys %{ { map { $_ => 1 } @epochs } }), 1,
		"timestamptz bound $bound is one instant in every session");
}

# varchar key with a varchar[] mapper: a second job maps every row again.
$node->safe_psql(
	'postgres', q{
	CREATE FUNCTION map_varchar_arr(keys varchar[], params jsonb)
	RETURNS void LANGUAGE plpgsql AS $fn$
	BEGIN
		UPDATE k_varchar SET n = n + 1 WHERE id = ANY (keys);
	END $fn$;
	SELECT dsmapper_register('map_varchar_arr', 'map_varchar_arr(varchar[], jsonb)');
});
{
	my $j = launch($node, 'map_varchar_arr', 'k_varchar', 'shards => 4, page_size => 100');
	is(wait_job($node, $j), 'succeeded', 'varchar key, varchar[] mapper: job succeeds');
	is($node->safe_psql('postgres', 'SELECT count(*) FILTER (WHERE n = 2) FROM k_varchar'),
		$rows, 'varchar key, varchar[] mapper: every row mapped once more');
}

##
## A database whose sessions default to another DateStyle, TimeZone and
## float precision (so the workers serving it use them too): keys still
## round-trip exactly, and the ranges read back alike in any session.
##
$node->safe_psql('postgres', 'CREATE DATABASE odd');
$node->safe_psql(
	'postgres', q{
	ALTER DATABASE odd SET DateStyle = 'SQL, DMY';
	ALTER DATABASE odd SET TimeZone = 'Asia/Kathmandu';
	ALTER DATABASE odd SET extra_float_digits = 0;
});
$node->safe_psql('odd', 'CREATE EXTENSION dsmapper');
my %odd = (
	o_timestamptz => [ 'timestamptz', $types{k_timestamptz}[2] ],
	o_date => [ 'date', $types{k_date}[2] ],
	# thirds are not exact in binary: 15 significant digits lose them
	o_float8 => [ 'float8', 'g::float8 / 3' ],);
foreach my $t (sort keys %odd)
{
	my ($type, $expr) = @{ $odd{$t} };
	create_keyed_table($node, $t, $type, $expr, $rows, db => 'odd');
	create_counter_mapper($node, "map_$t", $t, db => 'odd', keytype => $type);
	my $j = launch($node, "map_$t", $t, 'shards => 4, page_size => 100', db => 'odd');
	is(wait_job($node, $j, db => 'odd'), 'succeeded', "database odd, $t: job succeeds");
	is(counter_summary($node, $t, db => 'odd'), "$rows|$rows|0|0",
		"database odd, $t: every row mapped exactly once");
	foreach my $setup (@reader_sessions, 'SET DateStyle = DEFAULT')
	{
		my @problems = shard_range_mismatches($node, $j, $t, $type,
			db => 'odd', setup => $setup);
		ok(!@problems, "database odd, $t: ranges read back and hold each shard's rows ($setup)")
		  or diag(join("\n", @problems));
	}
}

##
## Large tables (over 1024 blocks) are split from the primary key index:
## shards balance by row count and expected is close.
##
my $big = 150000;
create_keyed_table($node, 'big_int8', 'bigint', 'g * 1000 + (g % 7)', $big, pad => 60);
create_keyed_table($node, 'big_text', qq{text COLLATE "$collation"},
	q{(ARRAY['apple', 'Apple', 'Äpfel', 'zebra', 'Zebra'])[1 + g % 5] || ' ' || md5(g::text)},
	$big, pad => 30);
foreach my $t ('big_int8', 'big_text')
{
	my $type = $t eq 'big_int8' ? 'bigint' : 'text';
	cmp_ok($node->safe_psql('postgres', "SELECT pg_relation_size('$t') / 8192"),
		'>', 1024, "$t has more than 1024 blocks");
	create_counter_mapper($node, "map_$t", $t, keytype => $type);
	my $j = launch($node, "map_$t", $t, 'shards => 8, page_size => 1000');
	is(wait_job($node, $j), 'succeeded', "$t: job succeeds");
	is(counter_summary($node, $t), "$big|$big|0|0", "$t: every row mapped exactly once");
	my $b = shard_balance($node, $j);
	diag(sprintf("%s: %d shards, processed %s, max/mean %.3f, expected %d",
		$t, $b->{shards}, $b->{counts}, $b->{ratio}, $b->{expected}));
	is($b->{shards}, 8, "$t: 8 shards");
	cmp_ok($b->{ratio}, '<=', 1.25, "$t: largest shard at most 1.25 x the mean");
	cmp_ok(abs($b->{expected} - $big), '<=', 0.1 * $big, "$t: expected within 10% of the rows");
	my @problems = shard_range_mismatches($node, $j, $t, $type, setup => $odd_session,
		collate => $t eq 'big_text' ? qq{"$collation"} : undef);
	ok(!@problems, "$t: ranges hold each shard's rows") or diag(join("\n", @problems));
}

$node->stop;

##
## Without background workers, dsmapper_run() does the work in whichever
## session calls it: a split made in a session with DateStyle 'SQL, DMY'
## must be read correctly by a session with 'ISO, MDY' and another zone.
##
my $solo = new_node('key_types_solo', preload => 0,
	extra_conf => "timezone = 'America/New_York'\n");
foreach my $t ('o_date', 'o_timestamptz')
{
	my $type = $odd{$t}[0];
	create_keyed_table($solo, $t, $type, $odd{$t}[1], $rows);
	create_counter_mapper($solo, "map_$t", $t, keytype => $type);
	my $j = launch($solo, "map_$t", $t, 'shards => 4, page_size => 100');
	# The first call runs at least one task: the split.
	$solo->safe_psql('postgres', "$odd_session; SELECT dsmapper_run('1 ms')");
	is($solo->safe_psql('postgres', "SELECT shards FROM dsmapper.jobs WHERE job_id = $j"),
		'4', "dsmapper_run, $t: the first session split the job");
	$solo->safe_psql('postgres',
		"SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'; SELECT dsmapper_run('30 s')");
	is($solo->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $j"),
		'succeeded', "dsmapper_run, $t: a second session finished the job");
	is(counter_summary($solo, $t), "$rows|$rows|0|0",
		"dsmapper_run, $t: every row mapped exactly once");
}
$solo->stop;

done_testing();
