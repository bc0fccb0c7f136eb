
# 053_standby.pl: dsmapper on a streaming standby, and after its promotion.
#
# A primary (dsmapper preloaded, 2 workers) and a streaming standby made
# from its base backup (also preloading dsmapper).  Checked here:
#
#  - on the standby the launcher does not run (it starts only once recovery
#    is over), nothing fails in its log, dsmapper.jobs is readable and
#    mirrors the primary, and dsmapper_launch fails as a read-only
#    transaction (25006);
#  - with a job of the primary queued, dsmapper_run() on the standby
#    returns 0 at once, without an error in the result or the log;
#  - a slow job running on the primary when the primary dies (immediate
#    stop) continues on the promoted standby from the replicated
#    checkpoints and succeeds, every row mapped exactly once: after
#    promotion the launcher starts and probes the databases for work.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes ();
use DsmTest;

# The primary needs WAL for streaming, which new_node() does not set up.
my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
$primary->append_conf(
	'postgresql.conf', q{
log_statement = none
log_min_messages = warning
max_worker_processes = 16
shared_preload_libraries = 'dsmapper'
dsmapper.max_workers = 2
});
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION dsmapper');

# A finished job, so there is something to mirror.
create_counter_table($primary, 'small', 1000);
create_counter_mapper($primary, 'count_small', 'small');
my $j0 = launch($primary, 'count_small', 'small', 'shards => 2, page_size => 100');
is(wait_job($primary, $j0, timeout => '60 s'), 'succeeded', 'a job on the primary succeeds');

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby, 'replay');

# ===========================================================================
# 1. On the standby.
# ===========================================================================

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is($standby->safe_psql('postgres', "SHOW shared_preload_libraries"), 'dsmapper',
	'the standby preloads dsmapper');
ok(launcher_pid($primary) ne '', 'the primary runs a launcher');

# Give a launcher time to show up if it (wrongly) were to start.
sleep(2);
is( $standby->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('dsmapper launcher', 'dsmapper worker')"
	),
	'0',
	'no dsmapper launcher or worker on the standby');

my $jobs_sql = 'SELECT job_id, state, processed, shards, shards_done FROM dsmapper.jobs ORDER BY job_id';
is($standby->safe_psql('postgres', $jobs_sql),
	$primary->safe_psql('postgres', $jobs_sql),
	'dsmapper.jobs on the standby mirrors the primary');
is( $standby->safe_psql('postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $j0 AND state = 'succeeded'"),
	$primary->safe_psql('postgres',
		"SELECT count(*) FROM dsmapper.shards WHERE job_id = $j0 AND state = 'succeeded'"),
	'dsmapper.shards is readable too');
is($standby->safe_psql('postgres', "SELECT dsmapper_wait($j0, '1 s')"),
	'succeeded', 'dsmapper_wait of a finished job works on the standby');

# (log_min_messages = warning, so ERROR lines would show.)
my $standby_log = slurp_file($standby->logfile);
unlike($standby_log, qr/ERROR|FATAL|PANIC|terminated by signal/,
	'nothing fails in the standby log')
  or diag($standby_log);

{
	my ($out, $err) = ('', '');
	$standby->psql(
		'postgres',
		"\\set VERBOSITY verbose\nSELECT dsmapper_launch('count_small', 'small')",
		stdout => \$out,
		stderr => \$err);
	like($err, qr/ERROR:\s+25006:/, 'dsmapper_launch on the standby: read-only transaction (25006)')
	  or diag("stdout: $out\nstderr: $err");
}

# ===========================================================================
# 2. A job survives the loss of the primary.
# ===========================================================================

create_counter_table($primary, 'big', 5000);
create_counter_mapper($primary, 'count_big', 'big', sleep => 0.2);
my $job = launch($primary, 'count_big', 'big', 'shards => 4, page_size => 50');
ok( poll_until($primary,
		"SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job", 't', 60),
	'the slow job makes progress on the primary');
$primary->wait_for_catchup($standby, 'replay');
my $replicated = $standby->safe_psql('postgres',
	"SELECT processed FROM dsmapper.jobs WHERE job_id = $job");
cmp_ok($replicated, '>', 0, "the standby has seen progress ($replicated rows)");
cmp_ok($replicated, '<', 5000, '  but not the end');

# dsmapper_run on the hot standby, with the primary's job queued there: it
# runs nothing and returns 0 at once, without an error.
cmp_ok($standby->safe_psql('postgres', "SELECT count(*) FROM dsmapper.queue WHERE job_id = $job"),
	'>', 0, 'the standby sees queued work of the running job');
{
	my $pos = log_position($standby);
	my ($out, $err) = ('', '');
	my $rc = $standby->psql('postgres', "SELECT dsmapper_run('1 s')",
		stdout => \$out, stderr => \$err);
	is($rc, 0, "dsmapper_run('1 s') on the standby succeeds") or diag($err);
	is($out, '0', '  and returns 0');
	is($err, '', '  without an error, warning or notice');

	# A long max_duration shows that it does not wait for work.
	($out, $err) = ('', '');
	my $t0 = Time::HiRes::time();
	$rc = $standby->psql('postgres', "SELECT dsmapper_run('30 s')",
		stdout => \$out, stderr => \$err);
	my $secs = Time::HiRes::time() - $t0;
	is("$rc|$out", '0|0', "dsmapper_run('30 s') on the standby returns 0 as well") or diag($err);
	cmp_ok($secs, '<', 5, sprintf('  at once (%.2f s)', $secs));

	is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't',
		'  the standby is still in recovery');
	my $run_log = log_since($standby, $pos);
	unlike($run_log, qr/ERROR|FATAL|PANIC|terminated by signal/,
		'  the standby log shows no error from dsmapper_run')
	  or diag($run_log);
}

$primary->stop('immediate');
$standby->promote;
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 'f', 'the standby is promoted');

ok( poll_until($standby,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper launcher'", '1', 30),
	'after promotion the launcher runs');
is(wait_job($standby, $job, timeout => '90 s'), 'succeeded',
	'the job continues on the promoted standby and succeeds');
is(counter_summary($standby, 'big'), '5000|5000|0|0', 'every row mapped exactly once');
my $info = job_info($standby, $job);
is($info->{processed}, '5000', 'processed = 5000');
cmp_ok($standby->safe_psql('postgres',
		"SELECT min(processed) FROM dsmapper.shards WHERE job_id = $job"),
	'>', 0, 'every shard did its part');

# A new job on the promoted node works as well.
$standby->safe_psql('postgres', 'UPDATE small SET n = 0');
# It must start at once (the commit wakes an idle worker), not when an idle
# worker's 60 s dsmapper.worker_idle_timeout runs out.
my $t0 = Time::HiRes::time();
my $j2 = launch($standby, 'count_small', 'small', 'shards => 2, page_size => 100');
my $s2 = wait_job($standby, $j2, timeout => '20 s');
is($s2, 'succeeded', 'a new job on the promoted node succeeds within 20 s');
if ($s2 ne 'succeeded')
{
	diag($standby->safe_psql('postgres',
		"SELECT pid, backend_type, state, wait_event, query FROM pg_stat_activity WHERE backend_type LIKE 'dsmapper%'"));
	my $late = wait_job($standby, $j2, timeout => '90 s');
	diag(sprintf('job %s: %s after %.1f s', $j2, $late, Time::HiRes::time() - $t0));
}
is(counter_summary($standby, 'small'), '1000|1000|0|0', '  every row exactly once');

unlike(slurp_file($standby->logfile), qr/terminated by signal|PANIC/,
	'no crash on the promoted node');

$standby->stop;
done_testing();
