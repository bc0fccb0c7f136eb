# The upgrade chain: from every version that has a full install script,
# ALTER EXTENSION dsmapper UPDATE reaches the default version, and the
# result has the same objects as a fresh install of the default version.
# Also: DROP EXTENSION and CREATE EXTENSION again without a restart.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('upgrade', create_extension => 0);

# Versions the installation offers, oldest first.
my $default = $node->safe_psql('postgres',
	"SELECT default_version FROM pg_available_extensions WHERE name = 'dsmapper'");
ok($default ne '', "default version is $default");

my @versions = split /\n/, $node->safe_psql('postgres',
	"SELECT version FROM pg_available_extension_versions
	  WHERE name = 'dsmapper' ORDER BY string_to_array(version, '.')::int[]");
ok(scalar(@versions) >= 1, 'at least one version is installable: ' . join(', ', @versions));

# What a schema looks like: every object of the extension, described.
sub describe_extension
{
	my ($db) = @_;
	return $node->safe_psql($db, q{
		SELECT pg_describe_object(classid, objid, objsubid)
		  FROM pg_depend
		 WHERE refclassid = 'pg_extension'::regclass
		   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'dsmapper')
		   AND deptype = 'e'
		 ORDER BY 1});
}

sub describe_columns
{
	my ($db) = @_;
	return $node->safe_psql($db, q{
		SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
		       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
		  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
		 WHERE c.relnamespace = 'dsmapper'::regnamespace
		   AND a.attnum > 0 AND NOT a.attisdropped
		 ORDER BY c.relname, a.attnum});
}

sub describe_functions
{
	my ($db) = @_;
	return $node->safe_psql($db, q{
		SELECT p.oid::regprocedure::text || ' -> ' || p.prorettype::regtype::text
		       || ' (' || pg_get_function_arguments(p.oid) || ')'
		  FROM pg_proc p
		 WHERE p.proname LIKE 'dsmapper%' OR p.pronamespace = 'dsmapper'::regnamespace
		 ORDER BY 1});
}

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION dsmapper');
my %fresh = (
	objects => describe_extension('fresh'),
	columns => describe_columns('fresh'),
	functions => describe_functions('fresh'));

foreach my $from (@versions)
{
	my $db = "from_" . ($from =~ s/\W/_/gr);
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION dsmapper VERSION '$from'");
	$node->safe_psql($db, 'ALTER EXTENSION dsmapper UPDATE');
	is($node->safe_psql($db,
			"SELECT extversion FROM pg_extension WHERE extname = 'dsmapper'"),
		$default, "$from updates to $default");
	is(describe_extension($db), $fresh{objects},
		"$from updated has the objects of a fresh $default");
	is(describe_columns($db), $fresh{columns},
		"$from updated has the columns of a fresh $default");
	is(describe_functions($db), $fresh{functions},
		"$from updated has the functions of a fresh $default");

	# And it works: a job runs to the end.
	create_counter_table($node, 't', 500, db => $db);
	create_counter_mapper($node, 'count_t', 't', db => $db);
	my $job = $node->safe_psql($db,
		"SELECT dsmapper_launch('count_t', 't', shards => 2, page_size => 50)");
	is($node->safe_psql($db, "SELECT dsmapper_wait($job, '120 s')"),
		'succeeded', "a job succeeds after updating from $from");
}

# DROP EXTENSION and CREATE EXTENSION again, no restart in between.
$node->safe_psql('fresh', 'DROP EXTENSION dsmapper');
$node->safe_psql('fresh', 'CREATE EXTENSION dsmapper');
create_counter_table($node, 't2', 300, db => 'fresh');
create_counter_mapper($node, 'count_t2', 't2', db => 'fresh');
my $job = $node->safe_psql('fresh',
	"SELECT dsmapper_launch('count_t2', 't2', shards => 2, page_size => 50)");
is($node->safe_psql('fresh', "SELECT dsmapper_wait($job, '120 s')"),
	'succeeded', 'a job succeeds after DROP and CREATE EXTENSION');

$node->stop;
done_testing();
