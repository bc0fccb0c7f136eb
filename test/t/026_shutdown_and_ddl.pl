
# 026_shutdown_and_ddl.pl: interruptions that are not the mapper's fault
# charge no attempt and do not disturb jobs (README "Failure semantics" and
# "Runtime").  Checked here:
#
#  1. pg_ctl stop -m fast while a page sleeps, with max_attempts => 1: after
#     the start the job succeeds, every row mapped exactly once, and no shard
#     ever shows an attempt or an error (a charged attempt would fail the
#     shard at once with "a previous turn exited inside a page");
#  2. DROP DATABASE by a role that does not own the database fails with
#     "must be owner" and leaves the workers of that database alone: the
#     same worker pids keep mapping pages of the job, no attempt is charged;
#  3. DROP DATABASE by the owner that fails because another session is
#     connected: the workers asked to leave come back at once, the job goes
#     on (processed grows) and succeeds, every row once, no attempt charged;
#  4. DROP EXTENSION dsmapper while a 60 s page is in flight returns within
#     seconds (the page is canceled and rolled back), and CREATE EXTENSION
#     dsmapper afterwards works in the same database.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('shutdown_ddl', max_workers => 4);
my $exited_re = qr/a previous turn exited inside a page/;

# ---------------------------------------------------------------------------
# Local helpers.

# in_flight_sql(job, db): true once a worker of db sleeps inside a page of job.
sub in_flight_sql
{
	my ($job, $db) = @_;
	return qq{
		SELECT count(*) > 0 FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND datname = '$db'
		   AND wait_event = 'PgSleep' AND query ~ '^dsmapper job $job shard'};
}

# busy_pids(job, db): pids of the workers of db running a page of job.
sub busy_pids
{
	my ($job, $db) = @_;
	return backend_pids($node, 'dsmapper worker',
		where => "datname = '$db' AND query ~ '^dsmapper job $job shard'");
}

# charged(job, db): the shards of job that show an attempt or an error, as
# "shard:state:attempts:error" lines ('' when none).
sub charged
{
	my ($job, $db) = @_;
	return $node->safe_psql(
		$db, qq{
		SELECT string_agg(shard || ':' || state || ':' || attempts || ':' || coalesce(error, ''), E'\\n' ORDER BY shard)
		  FROM dsmapper.shards
		 WHERE job_id = $job AND (attempts > 0 OR error IS NOT NULL)});
}

# shard_processed(job, db): the shards' processed counts, in shard order.
sub shard_processed
{
	my ($job, $db) = @_;
	return split /\n/, $node->safe_psql($db,
		"SELECT processed FROM dsmapper.shards WHERE job_id = $job ORDER BY shard");
}

# timed(db, sql, opts...): (exit code, stderr, seconds).
sub timed
{
	my ($db, $sql, @opts) = @_;
	my ($out, $err) = ('', '');
	my $t0 = time();
	my $rc = $node->psql($db, $sql, stdout => \$out, stderr => \$err, @opts);
	return ($rc, $err, time() - $t0);
}

# setup_db(db): creates db with the extension.
sub setup_db
{
	my ($db) = @_;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION dsmapper');
	return;
}

# ===========================================================================
# 1. Fast shutdown inside a page charges no attempt.
# ===========================================================================

my $frows = 40;
create_counter_table($node, 'faststop', $frows);
create_counter_mapper($node, 'count_faststop', 'faststop', sleep => 2);
my $jf = launch($node, 'count_faststop', 'faststop',
	'shards => 2, page_size => 5, max_attempts => 1');
ok(poll_until($node, in_flight_sql($jf, 'postgres'), 't', 30),
	'fast shutdown: a page of the job is in flight');
my ($fstate, $fproc) = split /\|/, $node->safe_psql('postgres',
	"SELECT state, processed FROM dsmapper.jobs WHERE job_id = $jf");
is($fstate, 'running', '  the job runs when the server is stopped');
cmp_ok($fproc, '<', $frows, "  and is not done ($fproc of $frows)");
is(charged($jf, 'postgres'), '', '  no shard has an attempt before the stop');

my $logpos = log_position($node);
$node->stop('fast');
$node->start;

# Watch the shards from the start until the job is final: no sample may show
# an attempt or an error.
my ($samples, $running_samples, @bad) = (0, 0);
my $final = '';
my $deadline = time() + 90;
while (time() < $deadline)
{
	my ($rc, $out, $err) = $node->psql(
		'postgres', qq{
		SELECT j.state || '|' || coalesce((
		       SELECT string_agg(shard || ':' || s.state || ':' || attempts || ':' || coalesce(error, ''), ',' ORDER BY shard)
		         FROM dsmapper.shards s
		        WHERE s.job_id = j.job_id AND (attempts > 0 OR error IS NOT NULL)), '')
		  FROM dsmapper.jobs j WHERE j.job_id = $jf});
	if ($rc == 0 && $out =~ /^(\w+)\|(.*)$/)
	{
		my ($st, $problem) = ($1, $2);
		$samples++;
		$running_samples++ if $st eq 'running';
		push @bad, "$st: $problem" if $problem ne '';
		if ($st =~ /^(succeeded|failed|aborted)$/)
		{
			$final = $st;
			last;
		}
	}
	usleep(100_000);
}
is($final, 'succeeded', 'after the fast shutdown and a start the job succeeds (max_attempts => 1)');
cmp_ok($running_samples, '>', 0,
	"  the shards were watched while the job ran after the start ($running_samples of $samples samples)");
is(join("\n", @bad), '', '  no shard showed an attempt or an error at any time after the start');
is(charged($jf, 'postgres'), '', '  and none does at the end');
is(counter_summary($node, 'faststop'), "$frows|$frows|0|0", '  every row mapped exactly once');
is(job_info($node, $jf)->{processed}, $frows, '  processed = rows');
my $flog = log_since($node, $logpos);
unlike($flog, qr/dsmapper job $jf shard \d+ (will retry|failed): $exited_re/,
	'  the interrupted page was not counted as a turn that exited inside a page')
  or diag($flog);

# ===========================================================================
# 2. DROP DATABASE by a role that does not own it leaves the workers alone.
# ===========================================================================

setup_db('d2');
create_counter_table($node, 'slow2', 10000, db => 'd2');
create_counter_mapper($node, 'count_slow2', 'slow2', db => 'd2', sleep => 1);
my $js = launch($node, 'count_slow2', 'slow2', 'shards => 2, page_size => 10', db => 'd2');
ok( poll_until(
		$node, qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND datname = 'd2'
		   AND wait_event = 'PgSleep' AND query ~ '^dsmapper job $js shard'},
		'2', 30),
	'non-owner DROP DATABASE: both shards of the slow job in d2 are in a page');
my @pids = busy_pids($js, 'd2');
is(scalar(@pids), 2, '  two workers of d2 run the job (' . join(',', @pids) . ')');

$node->safe_psql('postgres', 'CREATE ROLE mallory LOGIN');
$logpos = log_position($node);
my ($rc, $err, $secs) = timed('postgres', 'DROP DATABASE d2', extra_params => [ '-U', 'mallory' ]);
isnt($rc, 0, '  DROP DATABASE d2 as mallory fails');
like($err, qr/must be owner of database d2|permission denied/, '  with "must be owner"')
  or diag($err);
note sprintf('non-owner DROP DATABASE took %.2f s', $secs);

# Let every shard commit another page after the attempt: a worker that had
# been asked to leave would be gone by then.
my @after = shard_processed($js, 'd2');
ok( poll_until(
		$node, qq{
		SELECT bool_and(processed > CASE shard WHEN 0 THEN $after[0] ELSE $after[1] END)
		  FROM dsmapper.shards WHERE job_id = $js},
		't', 30, db => 'd2'),
	'  both shards commit pages after the attempt');
my @pids_after = busy_pids($js, 'd2');
is(join(',', @pids_after), join(',', @pids), '  the same two workers still run the job');
is( $node->safe_psql('postgres',
		'SELECT count(*) FROM pg_stat_activity WHERE pid IN (' . join(',', @pids) . ") AND datname = 'd2'"),
	'2', '  both original worker pids are still connected to d2');
is(charged($js, 'd2'), '', '  no shard of the job has an attempt or an error');
is($node->safe_psql('d2', "SELECT state FROM dsmapper.jobs WHERE job_id = $js"),
	'running', '  the job is still running');
my $log2 = log_since($node, $logpos);
unlike($log2, qr/dsmapper job $js shard \d+ (will retry|failed)/, '  the log shows no retry or failure of the job')
  or diag($log2);

is($node->safe_psql('d2', "SELECT dsmapper_abort($js)"), 'aborting', 'the slow job is aborted');
is(wait_job($node, $js, db => 'd2', timeout => '30 s'), 'aborted', '  and ends aborted');

# ===========================================================================
# 3. A DROP DATABASE by the owner that fails: the workers come back.
# ===========================================================================

my $qrows = 40;
create_counter_table($node, 'quick2', $qrows, db => 'd2');
create_counter_mapper($node, 'count_quick2', 'quick2', db => 'd2', sleep => 1);

my $holder = $node->background_psql('d2');
my $holder_pid = $holder->query_safe('SELECT pg_backend_pid()');
like($holder_pid, qr/^\d+$/, 'failed DROP DATABASE: a second session holds d2 open');

my $jq = launch($node, 'count_quick2', 'quick2', 'shards => 2, page_size => 5', db => 'd2');
ok( poll_until(
		$node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $jq", 't', 30, db => 'd2'),
	'  the job in d2 committed a page');
ok(poll_until($node, in_flight_sql($jq, 'd2'), 't', 30), '  a page of it is in flight');
my @qpids = busy_pids($jq, 'd2');
cmp_ok(scalar(@qpids), '>=', 1, '  workers run the job (' . join(',', @qpids) . ')');

$logpos = log_position($node);
($rc, $err, $secs) = timed('postgres', 'DROP DATABASE d2');
isnt($rc, 0, '  DROP DATABASE d2 as superuser fails');
like($err, qr/being accessed by other users/, '  because another session is connected') or diag($err);
note sprintf('failed owner DROP DATABASE took %.2f s', $secs);
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_database WHERE datname = 'd2'"),
	'1', '  d2 is still there');
is( $node->safe_psql('postgres',
		'SELECT count(*) FROM pg_stat_activity WHERE pid IN (' . join(',', @qpids) . ')'),
	'0', '  the workers that ran the job were asked to leave');

my ($qstate, $qproc) = split /\|/, $node->safe_psql('d2',
	"SELECT state, processed FROM dsmapper.jobs WHERE job_id = $jq");
is($qstate, 'running', '  the job is still running after the failed DROP');
cmp_ok($qproc, '<', $qrows, "  and not done ($qproc of $qrows)");
my $t0 = time();
ok( poll_until(
		$node, "SELECT processed > $qproc FROM dsmapper.jobs WHERE job_id = $jq",
		't', 30, db => 'd2'),
	'  the job continues: processed increases');
note sprintf('progress resumed %.2f s after the failed DROP', elapsed_since($t0));
is(wait_job($node, $jq, db => 'd2', timeout => '60 s'), 'succeeded', '  and the job succeeds');
is(counter_summary($node, 'quick2', db => 'd2'), "$qrows|$qrows|0|0", '  every row mapped exactly once');
is(job_info($node, $jq, db => 'd2')->{processed}, $qrows, '  processed = rows');
my $log3 = log_since($node, $logpos);
unlike($log3, qr/dsmapper job $jq shard \d+ (will retry|failed)/,
	'  no attempt was charged for the page interrupted by the DROP')
  or diag($log3);

$holder->quit;
ok( poll_until(
		$node, "SELECT count(*) FROM pg_stat_activity WHERE pid = $holder_pid", '0', 30),
	'the holding session is closed');
($rc, $err, $secs) = timed('postgres', 'DROP DATABASE d2');
is($rc, 0, 'then DROP DATABASE d2 succeeds') or diag($err);

# ===========================================================================
# 4. DROP EXTENSION is not held up by a long page.
# ===========================================================================

setup_db('d3');
create_counter_table($node, 'long3', 100, db => 'd3');
create_counter_mapper($node, 'count_long3', 'long3', db => 'd3', sleep => 60);
my $jl = launch($node, 'count_long3', 'long3', 'shards => 1, page_size => 10', db => 'd3');
ok(poll_until($node, in_flight_sql($jl, 'd3'), 't', 30),
	'DROP EXTENSION: a 60 s page is in flight in d3');

$logpos = log_position($node);
($rc, $err, $secs) = timed('d3', 'DROP EXTENSION dsmapper');
is($rc, 0, '  DROP EXTENSION dsmapper succeeds') or diag($err);
cmp_ok($secs, '<', 10, sprintf('  in well under 10 s (%.2f s)', $secs));
is($node->safe_psql('d3', "SELECT count(*) FROM pg_extension WHERE extname = 'dsmapper'"),
	'0', '  the extension is gone');
ok( poll_until(
		$node, qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND datname = 'd3' AND wait_event = 'PgSleep'},
		'0', 30),
	'  no worker sleeps in the page any more');
is($node->safe_psql('d3', 'SELECT count(*) FROM long3 WHERE n <> 0'),
	'0', '  the canceled page was rolled back');

($rc, $err) = timed('d3', 'CREATE EXTENSION dsmapper');
is($rc, 0, 'CREATE EXTENSION dsmapper works again in d3') or diag($err);
create_counter_table($node, 'again3', 500, db => 'd3');
create_counter_mapper($node, 'count_again3', 'again3', db => 'd3');
my $ja = launch($node, 'count_again3', 'again3', 'shards => 2, page_size => 50', db => 'd3');
is(wait_job($node, $ja, db => 'd3', timeout => '60 s'), 'succeeded',
	'  a job in the re-created extension succeeds');
is(counter_summary($node, 'again3', db => 'd3'), '500|500|0|0', '  every row exactly once');
ok(wait_for_server($node, 10), 'the server still answers');

my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|PANIC/, 'no crash in the whole server log');

$node->stop;
done_testing();
