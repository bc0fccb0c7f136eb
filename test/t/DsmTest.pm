
# DsmTest.pm: shared helpers of the dsmapper TAP tests.
#
# Every test file starts a private cluster through new_node(), creates its
# tables and mappers with the helpers below, and waits for jobs with
# wait_job() or poll_until() (never with fixed sleeps where a state can be
# polled).

package DsmTest;

use strict;
use warnings;

use Exporter 'import';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(
  new_node
  create_counter_table
  create_counter_mapper
  poll_until
  wait_job
  job_info
  launch
  counter_summary
  log_position
  log_since
);

# new_node(name, preload => 1, max_workers => 4, extra_conf => '',
#          create_extension => 1)
#
# Creates, configures and starts a cluster and creates the extension in the
# database "postgres" (unless create_extension => 0).  With preload => 0 the
# library is not preloaded, so there are no background workers.
sub new_node
{
	my ($name, %opts) = @_;
	my $preload = exists $opts{preload} ? $opts{preload} : 1;
	my $max_workers = exists $opts{max_workers} ? $opts{max_workers} : 4;

	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;

	# The framework logs every statement; our own polling queries mention
	# dsmapper, which would drown the server log checks, so turn that off.
	my $conf = "log_statement = none\n"
	  . "log_min_messages = log\n"
	  . "max_worker_processes = 16\n";
	if ($preload)
	{
		$conf .= "shared_preload_libraries = 'dsmapper'\n"
		  . "dsmapper.max_workers = $max_workers\n";
	}
	$conf .= $opts{extra_conf} if defined $opts{extra_conf};
	$node->append_conf('postgresql.conf', $conf);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION dsmapper')
	  unless defined $opts{create_extension} && !$opts{create_extension};
	return $node;
}

# create_counter_table(node, table, nrows, db => 'postgres', keytype => 'bigint')
#
# A table (id keytype PRIMARY KEY, n int, tag text) holding the ids 1..nrows,
# every n = 0.  The counter mapper adds one to n for each key it is given,
# so after a job n = 1 everywhere means "every row exactly once".
sub create_counter_table
{
	my ($node, $table, $nrows, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $keytype = $opts{keytype} // 'bigint';

	$node->safe_psql(
		$db, qq{
		CREATE TABLE $table (id $keytype PRIMARY KEY,
		                     n integer NOT NULL DEFAULT 0,
		                     tag text);
		INSERT INTO $table (id) SELECT g FROM generate_series(1, $nrows) g;
		ANALYZE $table;
	});
	return;
}

# create_counter_mapper(node, mapper, table, db => 'postgres',
#                       keytype => 'bigint', sleep => 0, extra => '')
#
# Creates the function <mapper>(keys keytype[], params jsonb) that adds one
# to n of every given key of the table, optionally sleeping per page and
# running extra PL/pgSQL statements after the update, and registers it as
# mapper id <mapper>.
sub create_counter_mapper
{
	my ($node, $mapper, $table, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $keytype = $opts{keytype} // 'bigint';
	my $sleep = $opts{sleep} // 0;
	my $extra = $opts{extra} // '';
	my $sleep_stmt = $sleep ? "PERFORM pg_sleep($sleep);" : '';

	$node->safe_psql(
		$db, qq{
		CREATE FUNCTION $mapper(keys $keytype\[], params jsonb)
		RETURNS void LANGUAGE plpgsql AS \$fn\$
		BEGIN
			UPDATE $table SET n = n + 1 WHERE id = ANY (keys);
			$extra
			$sleep_stmt
		END \$fn\$;
		SELECT dsmapper_register('$mapper', '$mapper($keytype\[], jsonb)');
	});
	return;
}

# launch(node, mapper, table, args, db => 'postgres'): job id.
# args is extra named-notation text such as "shards => 4, page_size => 100".
sub launch
{
	my ($node, $mapper, $table, $args, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $extra = defined $args && $args ne '' ? ", $args" : '';
	return $node->safe_psql($db,
		"SELECT dsmapper_launch('$mapper', '$table'$extra)");
}

# poll_until(node, sql, expected, timeout_seconds, db => 'postgres')
#
# Runs sql every 0.1 s until its output equals expected; true on success.
sub poll_until
{
	my ($node, $sql, $expected, $timeout, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	$timeout //= 60;
	local $PostgreSQL::Test::Utils::timeout_default = $timeout;
	return $node->poll_query_until($db, $sql, $expected);
}

# wait_job(node, job, db => 'postgres', timeout => '120 s'): the job's state
# once it is final (or the timeout passed).
sub wait_job
{
	my ($node, $job, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $timeout = $opts{timeout} // '120 s';
	return $node->safe_psql($db, "SELECT dsmapper_wait($job, '$timeout')");
}

# job_info(node, job, db => 'postgres'): hash of the job's dsmapper.jobs row.
sub job_info
{
	my ($node, $job, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	return $node->query_hash(
		$db,
		"SELECT __COLUMNS__ FROM dsmapper.jobs WHERE job_id = $job",
		qw(state shards shards_done shards_failed processed expected
		  progress error finished));
}

# counter_summary(node, table, db => 'postgres'): "total|ones|zeros|more",
# the row count and how many rows have n = 1, n = 0 and n > 1.
sub counter_summary
{
	my ($node, $table, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	return $node->safe_psql(
		$db, qq{
		SELECT count(*), count(*) FILTER (WHERE n = 1),
		       count(*) FILTER (WHERE n = 0), count(*) FILTER (WHERE n > 1)
		  FROM $table});
}

# log_position(node): the current size of the server log, for log_since.
sub log_position
{
	my ($node) = @_;
	return -s $node->logfile;
}

# log_since(node, offset): the server log written after offset.
sub log_since
{
	my ($node, $offset) = @_;
	return slurp_file($node->logfile, $offset);
}

1;
