
# 051_drop_recreate.pl: database-wide DDL next to dsmapper workers
# (README "Runtime").
#
# An idle worker stays connected to its database for
# dsmapper.worker_idle_timeout (60 s by default here).  Checked here:
#
#  - DROP DATABASE of a database with idle workers succeeds at once (under
#    5 s; PostgreSQL alone would fail after 5 s with "being accessed by
#    other users");
#  - the same for ALTER DATABASE ... RENAME and CREATE DATABASE ...
#    TEMPLATE, and jobs work in the renamed database and in the copy;
#  - DROP EXTENSION dsmapper while a slow job runs returns within seconds,
#    the workers stop without crashing the server, and CREATE EXTENSION
#    dsmapper again in the same database works without a restart (a new job
#    succeeds, mapping every row exactly once);
#  - DROP EXTENSION dsmapper with idle workers is immediate, and again the
#    extension can be created anew and used.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use DsmTest;

my $node = new_node('dropdb', max_workers => 4);

# ---------------------------------------------------------------------------
# Local helpers.

# workers_in(db): how many dsmapper workers are connected to db.
sub workers_in
{
	my ($db) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper worker' AND datname = '$db'"
	);
}

# wait_idle_workers(db): true once at least one worker is connected to db
# and none of them is in a turn (every job there is final).
sub wait_idle_workers
{
	my ($db) = @_;
	return poll_until(
		$node, qq{
		SELECT count(*) > 0
		       AND count(*) FILTER (WHERE wait_event = 'Extension') = count(*)
		  FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND datname = '$db'},
		't', 30);
}

# timed(db, sql): (exit code, stderr, seconds).
sub timed
{
	my ($db, $sql) = @_;
	my ($out, $err) = ('', '');
	my $t0 = time();
	my $rc = $node->psql($db, $sql, stdout => \$out, stderr => \$err);
	return ($rc, $err, time() - $t0);
}

# setup_db(db, rows): creates db with the extension, a counter table t of
# rows rows and the counter mapper count_t.
sub setup_db
{
	my ($db, $rows) = @_;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION dsmapper');
	create_counter_table($node, 't', $rows, db => $db);
	create_counter_mapper($node, 'count_t', 't', db => $db);
	return;
}

is($node->safe_psql('postgres', "SHOW dsmapper.worker_idle_timeout"),
	'1min', 'idle workers stay for a minute');

# ===========================================================================
# 1. DROP DATABASE with idle workers.
# ===========================================================================

setup_db('d1', 2000);
setup_db('d2', 2000);
my $j1 = launch($node, 'count_t', 't', 'shards => 2, page_size => 100', db => 'd1');
my $j2 = launch($node, 'count_t', 't', 'shards => 2, page_size => 100', db => 'd2');
is(wait_job($node, $j1, db => 'd1', timeout => '60 s'), 'succeeded', 'job in d1 succeeds');
is(wait_job($node, $j2, db => 'd2', timeout => '60 s'), 'succeeded', 'job in d2 succeeds');
ok(wait_idle_workers('d1'), 'idle workers stay connected to d1');

my $logpos = log_position($node);
my ($rc, $err, $secs) = timed('postgres', 'DROP DATABASE d1');
is($rc, 0, 'DROP DATABASE d1 succeeds') or diag($err);
cmp_ok($secs, '<', 5, sprintf('  and quickly (%.2f s)', $secs));
unlike($err, qr/being accessed by other users/, '  without "being accessed by other users"');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_database WHERE datname = 'd1'"),
	'0', '  d1 is gone');
is(workers_in('d1'), '0', '  no worker left in d1');

# ===========================================================================
# 2. ALTER DATABASE ... RENAME, then CREATE DATABASE ... TEMPLATE.
# ===========================================================================

ok(wait_idle_workers('d2'), 'idle workers stay connected to d2');
($rc, $err, $secs) = timed('postgres', 'ALTER DATABASE d2 RENAME TO d3');
is($rc, 0, 'ALTER DATABASE d2 RENAME TO d3 succeeds') or diag($err);
cmp_ok($secs, '<', 5, sprintf('  and quickly (%.2f s)', $secs));

# The renamed database still runs jobs.
$node->safe_psql('d3', 'UPDATE t SET n = 0');
my $j3 = launch($node, 'count_t', 't', 'shards => 2, page_size => 100', db => 'd3');
is(wait_job($node, $j3, db => 'd3', timeout => '60 s'), 'succeeded',
	'a job in the renamed database d3 succeeds');
is(counter_summary($node, 't', db => 'd3'), '2000|2000|0|0', '  every row once');
ok(wait_idle_workers('d3'), 'idle workers stay connected to d3');

($rc, $err, $secs) = timed('postgres', 'CREATE DATABASE x TEMPLATE d3');
is($rc, 0, 'CREATE DATABASE x TEMPLATE d3 succeeds') or diag($err);
cmp_ok($secs, '<', 5, sprintf('  and quickly (%.2f s)', $secs));

# The copy has the extension and its own jobs.
$node->safe_psql('x', 'UPDATE t SET n = 0');
my $jx = launch($node, 'count_t', 't', 'shards => 2, page_size => 100', db => 'x');
is(wait_job($node, $jx, db => 'x', timeout => '60 s'), 'succeeded', 'a job in the copy x succeeds');
is(counter_summary($node, 't', db => 'x'), '2000|2000|0|0', '  every row once');

my $ddl_log = log_since($node, $logpos);
unlike($ddl_log, qr/being accessed by other users/,
	'no "being accessed by other users" in the log');

# ===========================================================================
# 3. DROP EXTENSION while a slow job runs, then CREATE EXTENSION again.
# ===========================================================================

$node->safe_psql('postgres', 'CREATE DATABASE e1');
$node->safe_psql('e1', 'CREATE EXTENSION dsmapper');
create_counter_table($node, 'slow', 4000, db => 'e1');
create_counter_mapper($node, 'count_slow', 'slow', db => 'e1', sleep => 0.1);
my $js = launch($node, 'count_slow', 'slow', 'shards => 2, page_size => 20', db => 'e1');
ok( poll_until(
		$node,
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $js AND state = 'running' AND processed > 0",
		'2', 60, db => 'e1'),
	'the slow job runs in two shards');
my @busy = split /\n/,
  $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'dsmapper worker' AND datname = 'e1' AND query LIKE 'dsmapper job $js shard %'"
  );
cmp_ok(scalar(@busy), '>=', 1, 'workers are mapping pages of it (' . join(',', @busy) . ')');

$logpos = log_position($node);
($rc, $err, $secs) = timed('e1', 'DROP EXTENSION dsmapper');
is($rc, 0, 'DROP EXTENSION dsmapper during the job succeeds') or diag($err);
cmp_ok($secs, '<', 15, sprintf('  and returns within seconds (%.2f s)', $secs));
is($node->safe_psql('e1', "SELECT count(*) FROM pg_extension WHERE extname = 'dsmapper'"),
	'0', '  the extension is gone');
is($node->safe_psql('e1', "SELECT count(*) FROM pg_namespace WHERE nspname = 'dsmapper'"),
	'0', '  and its schema');

# The workers that were busy notice and exit (or at least stop mapping).
my $busy_list = join(',', @busy) || '0';
ok( poll_until(
		$node,
		"SELECT count(*) FROM pg_stat_activity WHERE pid IN ($busy_list) AND state = 'active'",
		'0', 30),
	'the busy workers stop working');
my $mapped_after_drop = $node->safe_psql('e1', 'SELECT count(*) FILTER (WHERE n > 0) FROM slow');
sleep(1);
is($node->safe_psql('e1', 'SELECT count(*) FILTER (WHERE n > 0) FROM slow'),
	$mapped_after_drop, 'nothing is mapped any more after the drop');
is($node->safe_psql('e1', 'SELECT count(*) FROM slow WHERE n > 1'),
	'0', 'no row of the dropped job was mapped twice');
ok(wait_for_server($node, 10), 'the server still answers');
my $drop_log = log_since($node, $logpos);
unlike($drop_log, qr/terminated by signal|PANIC|server process .* was terminated/,
	'no worker crashed');
diag("log after DROP EXTENSION:\n$drop_log") if $drop_log =~ /ERROR|FATAL|exit code/;

# Again, without a restart.
($rc, $err) = timed('e1', 'CREATE EXTENSION dsmapper');
is($rc, 0, 'CREATE EXTENSION dsmapper again works') or diag($err);
create_counter_table($node, 't_new', 3000, db => 'e1');
create_counter_mapper($node, 'count_new', 't_new', db => 'e1');
my $jn = launch($node, 'count_new', 't_new', 'shards => 4, page_size => 100', db => 'e1');
is(wait_job($node, $jn, db => 'e1', timeout => '60 s'), 'succeeded',
	"a new job ($jn) in the re-created extension succeeds");
is(counter_summary($node, 't_new', db => 'e1'), '3000|3000|0|0', '  every row exactly once');

# ===========================================================================
# 4. DROP EXTENSION with idle workers, then once more CREATE EXTENSION.
# ===========================================================================

ok(wait_idle_workers('e1'), 'idle workers stay connected to e1');
($rc, $err, $secs) = timed('e1', 'DROP EXTENSION dsmapper');
is($rc, 0, 'DROP EXTENSION dsmapper with idle workers succeeds') or diag($err);
cmp_ok($secs, '<', 3, sprintf('  immediately (%.2f s)', $secs));

($rc, $err) = timed('e1', 'CREATE EXTENSION dsmapper');
is($rc, 0, 'CREATE EXTENSION dsmapper once more works') or diag($err);
$node->safe_psql('e1', 'UPDATE t_new SET n = 0');
$node->safe_psql('e1', "SELECT dsmapper_register('count_new', 'count_new(bigint[], jsonb)')");
my $jn2 = launch($node, 'count_new', 't_new', 'shards => 3, page_size => 100', db => 'e1');
is(wait_job($node, $jn2, db => 'e1', timeout => '60 s'), 'succeeded',
	"a job ($jn2) after the second re-creation succeeds");
is(counter_summary($node, 't_new', db => 'e1'), '3000|3000|0|0', '  every row exactly once');

my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|PANIC/, 'no crash in the whole server log');

$node->stop;
done_testing();
