
# 054_session_pacing.pl: a cancel (statement_timeout) that arrives while
# dsmapper_run() paces between pages, in a session without background
# workers (README "dsmapper_tune", "dsmapper_run").
#
#  1. With page_delay => '30 s', SET statement_timeout = '2s' and
#     dsmapper_run('1 minute') fail after about 2 s with the ordinary
#     "canceling statement due to statement timeout" ERROR: no FATAL, no
#     crash, nothing charged to the shard, the page rolled back with the
#     transaction; the node keeps working and a later dsmapper_run maps
#     pages once the delay is turned off.
#  2. The same cancel inside a PL/pgSQL block with an EXCEPTION WHEN
#     query_canceled handler is caught: the session goes on in the same
#     transaction, its own earlier INSERT survives to the commit, the pages
#     of the block are rolled back with it, and the same session can run
#     dsmapper_run again afterwards.
#  3. A statement timeout inside a long mapper call in dsmapper_run is the
#     same ordinary ERROR.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use DsmTest;

my $node = new_node('pacing', preload => 0);
my $timeout_re = qr/ERROR:\s+canceling statement due to statement timeout/;
my $bad_log_re = qr/FATAL|PANIC|terminated by signal|server process .* was terminated/;
my $bad_client_re = qr/FATAL|server closed the connection|terminated abnormally|connection to server was lost/;

is( $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'dsmapper%'"),
	'0', 'no dsmapper background processes on this node');

# ---------------------------------------------------------------------------
# Local helpers.

# timed(sql): (exit code, stdout, stderr, seconds) of one psql call.
sub timed
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $t0 = time();
	my $rc = $node->psql('postgres', $sql, stdout => \$out, stderr => \$err);
	return ($rc, $out, $err, time() - $t0);
}

# shard_problems(job): shards with an attempt or an error, or failed.
sub shard_problems
{
	my ($job) = @_;
	return $node->safe_psql(
		'postgres', qq{
		SELECT string_agg(shard || ':' || state || ':' || attempts || ':' || coalesce(error, ''), E'\\n' ORDER BY shard)
		  FROM dsmapper.shards
		 WHERE job_id = $job AND (attempts > 0 OR error IS NOT NULL OR state IN ('failed', 'aborted'))});
}

# run_until_final(job): dsmapper_run('5 s') calls until the job is final;
# (state, calls, pages).
sub run_until_final
{
	my ($job) = @_;
	my ($calls, $pages) = (0, 0);
	my $state = '';
	while ($calls < 20)
	{
		$pages += $node->safe_psql('postgres', "SELECT dsmapper_run('5 s')");
		$calls++;
		$state = $node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job");
		last if $state =~ /^(succeeded|failed|aborted)$/;
	}
	return ($state, $calls, $pages);
}

# ===========================================================================
# 1. statement_timeout while dsmapper_run sleeps for page_delay.
# ===========================================================================

create_counter_table($node, 'paced', 200);
create_counter_mapper($node, 'count_paced', 'paced');
my $job = $node->safe_psql('postgres',
	"SET client_min_messages = warning; SELECT dsmapper_launch('count_paced', 'paced', shards => 1, page_size => 10)");
like($node->safe_psql('postgres', "SELECT dsmapper_tune($job, page_delay => '30 s')"),
	qr/"page_delay": "00:00:30"/, "page_delay of the job set to 30 s");

my $logpos = log_position($node);
my ($rc, $out, $err, $secs) =
  timed("SET statement_timeout = '2s';\nSELECT dsmapper_run('1 minute');");
isnt($rc, 0, 'dsmapper_run under statement_timeout = 2s fails');
like($err, $timeout_re, '  with "canceling statement due to statement timeout"') or diag($err);
unlike($err, $bad_client_re, '  not with FATAL or a lost connection') or diag($err);
cmp_ok($secs, '>=', 1.5, sprintf('  after the timeout (%.2f s)', $secs));
cmp_ok($secs, '<', 10, '  not after the 30 s page delay');

ok(wait_for_server($node, 10), 'the server answers');
my $log = log_since($node, $logpos);
# (log_min_messages = log hides ERROR lines, but not FATAL or PANIC.)
unlike($log, $bad_log_re, 'the server log shows no FATAL, PANIC or crashed process') or diag($log);

is(counter_summary($node, 'paced'), '200|0|200|0',
	'the canceled transaction rolled its page back');
is(shard_problems($job), '', '  no shard was charged an attempt, has an error or failed');
like($node->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job"),
	qr/^(starting|running)$/, '  the job still waits for work');

# The node keeps working once the delay is off.
like($node->safe_psql('postgres', "SELECT dsmapper_tune($job, page_delay => '0')"),
	qr/"page_delay": null|"page_delay": "00:00:00"/, 'page_delay turned off');
my $pages = $node->safe_psql('postgres', "SELECT dsmapper_run('5 s')");
cmp_ok($pages, '>', 0, "a following dsmapper_run('5 s') maps pages ($pages)");
cmp_ok($node->safe_psql('postgres', 'SELECT count(*) FROM paced WHERE n = 1'),
	'>', 0, '  rows are mapped');
my ($state, $calls, $more) = run_until_final($job);
is($state, 'succeeded', "the job succeeds ($calls more calls)");
is(counter_summary($node, 'paced'), '200|200|0|0', '  every row exactly once');

# ===========================================================================
# 2. The cancel caught by an exception block.
# ===========================================================================

create_counter_table($node, 'caught', 200);
create_counter_mapper($node, 'count_caught', 'caught');
$node->safe_psql('postgres', 'CREATE TABLE scratch (x integer)');
my $jc = $node->safe_psql('postgres',
	"SET client_min_messages = warning; SELECT dsmapper_launch('count_caught', 'caught', shards => 1, page_size => 10)");
$node->safe_psql('postgres', "SELECT dsmapper_tune($jc, page_delay => '30 s')");

$logpos = log_position($node);
($rc, $out, $err, $secs) = timed(qq{
BEGIN;
INSERT INTO scratch VALUES (1);
SET LOCAL statement_timeout = '2s';
DO \$\$
DECLARE
	t0 timestamptz := clock_timestamp();
	n bigint;
BEGIN
	BEGIN
		n := dsmapper_run('1 minute');
		RAISE NOTICE 'dsmapper_run returned % pages', n;
	EXCEPTION WHEN query_canceled THEN
		RAISE NOTICE 'caught % after % s', SQLSTATE,
			round(extract(epoch FROM clock_timestamp() - t0)::numeric, 2);
	END;
END \$\$;
SET LOCAL statement_timeout = 0;
SELECT 'scratch ' || string_agg(x::text, ',' ORDER BY x) FROM scratch;
SELECT 'mapped ' || count(*) FROM caught WHERE n <> 0;
SELECT 'identity ' || (current_user = session_user);
INSERT INTO scratch VALUES (2);
COMMIT;
SELECT 'committed yes';
SELECT 'tuned ' || (dsmapper_tune($jc, page_delay => '0') IS NOT NULL);
SELECT 'pages ' || dsmapper_run('5 s');
});
is($rc, 0, 'the script with the exception block runs to its end') or diag("stdout: $out\nstderr: $err");
unlike($err, $bad_client_re, '  no FATAL or lost connection') or diag($err);
unlike($err, qr/ERROR/, '  and no ERROR reaches the client') or diag($err);
like($err, qr/NOTICE:\s+caught 57014 after [\d.]+ s/, 'the handler caught the cancel (57014)')
  or diag($err);
unlike($err, qr/dsmapper_run returned/, '  dsmapper_run did not return normally');
if ($err =~ /caught 57014 after ([\d.]+) s/)
{
	cmp_ok($1, '>=', 1.5, "  after the timeout ($1 s)");
	cmp_ok($1, '<', 10, '  not after the 30 s page delay');
}
else
{
	fail('  the handler reported its time');
}
my %o = map { /^(\w+) (.*)$/ ? ($1 => $2) : () } split /\n/, $out;
is($o{scratch}, '1', 'after the block the earlier INSERT of the transaction is there');
is($o{mapped}, '0', '  the pages mapped inside the block were rolled back with it');
is($o{identity}, 'true', '  the session runs as its own role again');
ok(exists $o{committed}, '  the transaction commits');
is($o{tuned}, 'true', '  the same session tunes the job');
cmp_ok($o{pages} // 0, '>', 0, "  and maps pages with dsmapper_run afterwards (" . ($o{pages} // 'none') . ")");

is($node->safe_psql('postgres', 'SELECT string_agg(x::text, \',\' ORDER BY x) FROM scratch'),
	'1,2', 'both INSERTs of the transaction were committed');
is(shard_problems($jc), '', 'no shard of the job was charged an attempt or failed');
($state, $calls, $more) = run_until_final($jc);
is($state, 'succeeded', "the job succeeds ($calls more calls)");
is(counter_summary($node, 'caught'), '200|200|0|0', '  every row exactly once');
$log = log_since($node, $logpos);
unlike($log, $bad_log_re, 'no FATAL, PANIC or crashed process in the log') or diag($log);

# ===========================================================================
# 3. statement_timeout inside a long mapper call.
# ===========================================================================

create_counter_table($node, 'longpage', 50);
create_counter_mapper($node, 'count_longpage', 'longpage', sleep => 30);
my $jl = $node->safe_psql('postgres',
	"SET client_min_messages = warning; SELECT dsmapper_launch('count_longpage', 'longpage', shards => 1, page_size => 10)");
$logpos = log_position($node);
($rc, $out, $err, $secs) =
  timed("SET statement_timeout = '2s';\nSELECT dsmapper_run('1 minute');");
isnt($rc, 0, 'a statement timeout inside a 30 s mapper call fails dsmapper_run');
like($err, $timeout_re, '  with "canceling statement due to statement timeout"') or diag($err);
unlike($err, $bad_client_re, '  not with FATAL or a lost connection') or diag($err);
cmp_ok($secs, '<', 10, sprintf('  after about 2 s (%.2f s)', $secs));
is(shard_problems($jl), '', '  nothing charged to the shard');
is($node->safe_psql('postgres', 'SELECT count(*) FROM longpage WHERE n <> 0'), '0',
	'  the page was rolled back');
$node->safe_psql('postgres', "SELECT dsmapper_abort($jl)");
ok(wait_for_server($node, 10), 'the server answers');
$log = log_since($node, $logpos);
unlike($log, $bad_log_re, '  and its log has no FATAL, PANIC or crashed process') or diag($log);

unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC/, 'no crash in the whole server log');

$node->stop;
done_testing();
