
# 020_crash_kill.pl: SIGKILL of dsmapper workers at random moments, and once
# of the launcher, during a job.  Each kill makes the postmaster restart
# every process (crash recovery); the launcher then probes the database and
# the workers resume from the committed checkpoints.  The job still succeeds
# and every row is mapped exactly once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

# The test framework turns restart_after_crash off; this test needs it.
my $node = new_node('crash_kill', extra_conf => "restart_after_crash = on\n");

my $rows = 200000;
create_counter_table($node, 't', $rows);
create_counter_mapper($node, 'count_t', 't', sleep => 0.05);

# The kill moments are random; the seed is printed so that a failure can be
# replayed (DSM_TEST_SEED in the environment of prove; test/run does not
# pass it on).
my $seed = $ENV{DSM_TEST_SEED} // int(time());
srand($seed);
note "random seed $seed";

my $log_offset = log_position($node);
my $job = launch($node, 'count_t', 't',
	'shards => 4, page_size => 200, max_attempts => 20');
like($job, qr/^\d+$/, 'job launched');

# Kill a worker three times and the launcher once, in a random order, each
# time at a random moment while a worker is inside a page of the job.
my @plan = ('worker', 'worker', 'worker');
splice(@plan, int(rand(4)), 0, 'launcher');
my $in_page = "state = 'active' AND query ~ '^dsmapper job $job shard [0-9]+\$'";

my ($worker_kills, $launcher_kills, $restarts) = (0, 0, 0);
foreach my $victim (@plan)
{
	# Wait until a worker works on the job (again).
	my $busy = poll_until(
		$node, qq{
		SELECT count(*) > 0 FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND $in_page},
		't', 60);
	if (!$busy)
	{
		diag "no worker on the job before kill of the $victim";
		last;
	}
	usleep(int(rand(1_500_000)));

	my $state = $node->safe_psql('postgres',
		"SELECT state FROM dsmapper.jobs WHERE job_id = $job");
	last if $state ne 'running';

	my $old_launcher = launcher_pid($node);
	my $pid;
	if ($victim eq 'launcher')
	{
		$pid = $old_launcher;
	}
	else
	{
		my @pids = backend_pids($node, 'dsmapper worker', where => $in_page);
		$pid = $pids[ int(rand(@pids)) ] if @pids;
	}
	next unless defined $pid && $pid ne '';

	note "kill -9 of the $victim (pid $pid)";
	next unless kill('KILL', $pid);
	$victim eq 'launcher' ? $launcher_kills++ : $worker_kills++;

	# The crash restart is over once another launcher answers.
	if (wait_for_new_launcher($node, $old_launcher, 60))
	{
		$restarts++;
	}
	else
	{
		diag "the server did not come back after kill of pid $pid";
		last;
	}
}

my $kills = $worker_kills + $launcher_kills;
note "kills: $kills ($worker_kills workers, $launcher_kills launcher), crash restarts: $restarts";
diag "kill -9 count: $kills ($worker_kills workers, $launcher_kills launcher)";
is($worker_kills, 3, 'three workers were killed while the job ran');
is($launcher_kills, 1, 'the launcher was killed once while the job ran');
is($restarts, $kills, 'the server came back after every kill');

is(wait_job($node, $job, timeout => '90 s'), 'succeeded',
	'the job succeeds despite the kills');
is(counter_summary($node, 't'), "$rows|$rows|0|0",
	'every row was mapped exactly once');

my $info = job_info($node, $job);
is($info->{processed}, $rows, 'processed equals the row count');
is($info->{shards_done}, $info->{shards}, 'every shard succeeded');
is($info->{error}, '', 'the job has no error');
is( $node->safe_psql(
		'postgres',
		"SELECT sum(processed), count(*) FILTER (WHERE attempts <> 0 OR error IS NOT NULL) FROM dsmapper.shards WHERE job_id = $job"
	),
	"$rows|0",
	'shard counts add up; attempts and errors are cleared');

# The log shows the crash restarts and that a turn cut off by a crash was
# noticed and retried.
my $log = log_since($node, $log_offset);
my $crashes = () = $log =~ /terminating any other active server processes|all server processes terminated; reinitializing/g;
cmp_ok($crashes, '>=', $kills, 'the log shows a crash restart per kill');
like($log, qr/dsmapper job $job shard \d+ will retry: a previous turn exited inside a page/,
	'a turn cut off by a crash is noticed and retried');
unlike($log, qr/dsmapper job $job shard \d+ failed/, 'no shard failed');

# Still one launcher, and workers are usable: another job runs.
is(scalar(backend_pids($node, 'dsmapper launcher')), 1, 'exactly one launcher');
create_counter_table($node, 'after', 5000);
create_counter_mapper($node, 'count_after', 'after');
my $job2 = launch($node, 'count_after', 'after', 'shards => 2, page_size => 500');
is(wait_job($node, $job2), 'succeeded', 'a job after the crashes succeeds');
is(counter_summary($node, 'after'), '5000|5000|0|0', 'and maps every row once');

$node->stop;
done_testing();
