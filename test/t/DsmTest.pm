
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
use JSON::PP;
use Time::HiRes qw(usleep time);

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
  wait_for_server
  backend_pids
  launcher_pid
  wait_for_new_launcher
  elapsed_since
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

# wait_for_server(node, timeout_seconds): true once the server answers a
# query again (after a crash restart or a start), false after the timeout.
sub wait_for_server
{
	my ($node, $timeout) = @_;
	$timeout //= 60;
	my $deadline = time() + $timeout;
	while (time() < $deadline)
	{
		my ($out, $err) = ('', '');
		my $rc = $node->psql('postgres', 'SELECT 1',
			stdout => \$out, stderr => \$err);
		return 1 if $rc == 0 && $out eq '1';
		usleep(100_000);
	}
	return 0;
}

# backend_pids(node, backend_type, where => ''): the pids of the backends of
# that type (e.g. 'dsmapper worker'), optionally with an extra SQL condition
# on pg_stat_activity.  An empty list when the query fails (server down).
sub backend_pids
{
	my ($node, $type, %opts) = @_;
	my $where = defined $opts{where} && $opts{where} ne '' ? " AND ($opts{where})" : '';
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = '$type'$where ORDER BY pid",
		stdout => \$out, stderr => \$err);
	return () if $rc != 0;
	return grep { /^\d+$/ } split /\n/, $out;
}

# launcher_pid(node): the pid of the dsmapper launcher, or '' when there is
# none (or the server does not answer).
sub launcher_pid
{
	my ($node) = @_;
	my @pids = backend_pids($node, 'dsmapper launcher');
	return @pids ? $pids[0] : '';
}

# wait_for_new_launcher(node, old_pid, timeout_seconds): after a crash, true
# once the server answers again and a launcher other than old_pid runs (so
# the crash restart is over, not merely not noticed yet).
sub wait_for_new_launcher
{
	my ($node, $old, $timeout) = @_;
	$timeout //= 60;
	my $deadline = time() + $timeout;
	while (time() < $deadline)
	{
		my $pid = launcher_pid($node);
		return 1 if $pid ne '' && $pid ne $old;
		usleep(100_000);
	}
	return 0;
}

# elapsed_since(t0): seconds since t0 (a Time::HiRes time()).
sub elapsed_since
{
	my ($t0) = @_;
	return time() - $t0;
}

# Helpers of the key type, rows mode, filter and balance tests (010-013).
push @EXPORT, qw(create_keyed_table shard_list shard_balance
  shard_range_mismatches job_count launch_error);

# create_keyed_table(node, table, keytype, key_expr, nrows, db => 'postgres',
#                    pad => 0, random_order => 1)
#
# A table (id keytype PRIMARY KEY, n integer NOT NULL DEFAULT 0, pad text)
# whose ids are key_expr evaluated for g = 1..nrows (key_expr must give
# distinct values), inserted in random order unless random_order => 0, with
# pad characters of padding per row.  keytype may carry a COLLATE clause.
# Works with create_counter_mapper and counter_summary.
sub create_keyed_table
{
	my ($node, $table, $keytype, $expr, $nrows, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $pad = $opts{pad} // 0;
	my $order = (!defined $opts{random_order} || $opts{random_order})
	  ? 'ORDER BY random()' : '';

	$node->safe_psql(
		$db, qq{
		CREATE TABLE $table (id $keytype PRIMARY KEY,
		                     n integer NOT NULL DEFAULT 0,
		                     pad text);
		INSERT INTO $table (id, pad)
		SELECT k, repeat('x', $pad)
		  FROM (SELECT $expr AS k FROM generate_series(1, $nrows) g) s $order;
		ANALYZE $table;
	});
	return;
}

# shard_list(node, job, db => 'postgres'): the job's shards in shard order,
# as a list of hashes with the columns of dsmapper.shards (NULL as undef).
sub shard_list
{
	my ($node, $job, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $json = $node->safe_psql(
		$db, qq{
		SELECT coalesce(json_agg(s ORDER BY shard), '[]')
		  FROM dsmapper.shards s WHERE job_id = $job});
	return @{ JSON::PP->new->utf8(0)->decode($json) };
}

# shard_balance(node, job, db => 'postgres'): hash with shards, max, mean,
# ratio (max / mean of processed), processed and expected (sums), and
# counts (the processed counts as text, for diagnostics).
sub shard_balance
{
	my ($node, $job, %opts) = @_;
	my @shards = shard_list($node, $job, %opts);
	my ($max, $sum, $exp) = (0, 0, 0);
	foreach my $s (@shards)
	{
		$max = $s->{processed} if $s->{processed} > $max;
		$sum += $s->{processed};
		$exp += $s->{expected} // 0;
	}
	my $mean = @shards ? $sum / @shards : 0;
	return {
		shards => scalar(@shards),
		max => $max,
		mean => $mean,
		ratio => $mean > 0 ? $max / $mean : 0,
		processed => $sum,
		expected => $exp,
		counts => join(' ', map { $_->{processed} } @shards),
	};
}

# shard_range_mismatches(node, job, table, keytype, db => 'postgres',
#                        key => 'id', setup => '', filter => undef,
#                        collate => undef)
#
# Reads the job's shard ranges back as keytype in a session that first runs
# setup (say "SET DateStyle = 'SQL, DMY'") and checks them against the
# table: the ranges must be contiguous, unbounded at both ends, strictly
# increasing, and shard i must hold exactly its processed count of rows
# with range_start <= key < range_end (and the filter, when given).
# collate names the key's collation (quoted), for comparing bounds with
# each other.  Returns a list of problems, empty when all is well (or the
# error of the check query).
sub shard_range_mismatches
{
	my ($node, $job, $table, $keytype, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my $key = $opts{key} // 'id';
	my $setup = $opts{setup} // '';
	my $filter = defined $opts{filter} ? "AND ($opts{filter})" : '';
	my $collate = defined $opts{collate} ? "COLLATE $opts{collate}" : '';

	my ($ret, $out, $err) = $node->psql(
		$db, qq{
		$setup;
		SELECT shard || ': ' || problem
		  FROM (SELECT s.shard,
		               CASE
		                 WHEN s.shard = 0 AND s.range_start IS NOT NULL
		                   THEN 'first shard has a lower bound'
		                 WHEN s.last AND s.range_end IS NOT NULL
		                   THEN 'last shard has an upper bound'
		                 WHEN NOT s.last AND s.range_end IS NULL
		                   THEN 'unbounded shard before the last'
		                 WHEN s.shard > 0 AND s.range_start IS DISTINCT FROM s.prev_end
		                   THEN 'range_start is not the previous range_end'
		                 WHEN s.range_start IS NOT NULL AND s.range_end IS NOT NULL
		                      AND NOT (s.range_start::$keytype $collate < s.range_end::$keytype $collate)
		                   THEN 'range_start ' || s.range_start || ' is not below range_end ' || s.range_end
		                 WHEN s.processed <>
		                      (SELECT count(*) FROM $table t
		                        WHERE (s.range_start IS NULL OR t.$key >= s.range_start::$keytype)
		                          AND (s.range_end IS NULL OR t.$key < s.range_end::$keytype)
		                          $filter)
		                   THEN 'processed ' || s.processed || ' but ['
		                        || coalesce(s.range_start, '-inf') || ', '
		                        || coalesce(s.range_end, '+inf') || ') holds '
		                        || (SELECT count(*) FROM $table t
		                             WHERE (s.range_start IS NULL OR t.$key >= s.range_start::$keytype)
		                               AND (s.range_end IS NULL OR t.$key < s.range_end::$keytype)
		                               $filter)
		               END AS problem
		          FROM (SELECT sh.*,
		                       lag(range_end) OVER (ORDER BY shard) AS prev_end,
		                       shard = max(shard) OVER () AS last
		                  FROM dsmapper.shards sh WHERE job_id = $job) s) p
		 WHERE problem IS NOT NULL
		 ORDER BY shard});
	return ("check query failed: $err") if $ret != 0;
	return grep { $_ ne '' } split /\n/, $out;
}

# job_count(node, db => 'postgres'): the number of rows in dsmapper.jobs.
sub job_count
{
	my ($node, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	return $node->safe_psql($db, 'SELECT count(*) FROM dsmapper.jobs');
}

# launch_error(node, sql, db => 'postgres'): runs sql (a launch that should
# fail) and returns its stderr, or undef when it succeeded.  A job that was
# launched anyway is aborted at once so it cannot run away.
sub launch_error
{
	my ($node, $sql, %opts) = @_;
	my $db = $opts{db} // 'postgres';
	my ($ret, $out, $err) = $node->psql($db, $sql);
	return $err if $ret != 0;
	$node->psql($db, "SELECT dsmapper_abort($out)") if $out =~ /^\d+$/;
	return undef;
}

1;
