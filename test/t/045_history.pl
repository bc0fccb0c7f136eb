
# 045_history.pl: finished jobs are removed after
# dsmapper.history_retention, on a timer that needs no polling, and on
# demand with dsmapper_forget().
#
#  - history_retention = 2 s: job A finishes; about 2 s later it is removed
#    with its shards (from the views and the internal tables) by the
#    workers busy with an unfinished job C (older than A), which remains;
#  - in an idle database (no worker left), job D is removed on time by a
#    worker the launcher starts for it;
#  - dsmapper_forget(B) returns true and removes B with its shards;
#  - dsmapper_forget refuses a running or paused job (55000) and another
#    role's job (42501); the owner, a member of the owner role and a
#    superuser may forget a finished job.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use DsmTest;

my $node = new_node('history');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# try(role, sql): (SQLSTATE of the error or '', stdout, stderr).
sub try
{
	my ($role, $query) = @_;
	my ($out, $err) = ('', '');
	$node->psql('postgres', "\\set VERBOSITY verbose\n$query",
		stdout => \$out, stderr => \$err,
		extra_params => defined $role ? [ '-U', $role ] : []);
	my $state = $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : '';
	return ($state, $out, $err);
}

# present(job): "jobs|shards|internal jobs|internal shards|queue" counts
# of the job, as the superuser sees them.
sub present
{
	my ($job) = @_;
	return sql(
		qq{
		SELECT (SELECT count(*) FROM dsmapper.jobs WHERE job_id = $job) || '|'
		    || (SELECT count(*) FROM dsmapper.shards WHERE job_id = $job) || '|'
		    || (SELECT count(*) FROM dsmapper.job WHERE job_id = $job) || '|'
		    || (SELECT count(*) FROM dsmapper.shard WHERE job_id = $job) || '|'
		    || (SELECT count(*) FROM dsmapper.queue WHERE job_id = $job)});
}

# The retention is a superuser setting read by the worker that finishes a
# job: set it for the whole cluster.
sql("ALTER SYSTEM SET dsmapper.history_retention = '2s'");
$node->reload;
ok(poll_until($node, 'SHOW dsmapper.history_retention', '2s', 30),
	'dsmapper.history_retention is 2s');

create_counter_table($node, 't', 3000);
create_counter_mapper($node, 'count_t', 't');
create_counter_table($node, 'slow', 20000);
create_counter_mapper($node, 'count_slow', 'slow', sleep => 0.05);

# C: an unfinished job, older than A and B.
my $job_c = launch($node, 'count_slow', 'slow', "shards => 2, page_size => 10, task_duration => '1 s'");
ok( poll_until(
		$node, "SELECT state = 'running' AND processed > 0 FROM dsmapper.jobs WHERE job_id = $job_c",
		't', 60),
	'job C is running');

my $job_a = launch($node, 'count_t', 't', 'shards => 3, page_size => 100');
is(wait_job($node, $job_a), 'succeeded', 'job A succeeds');
like(present($job_a), qr/^1\|3\|1\|3\|0$/, 'job A and its 3 shards are kept at first');

my $a_finished = sql("SELECT extract(epoch FROM finished) FROM dsmapper.job WHERE job_id = $job_a");
# The busy workers of job C remove it at their next claim (C's turns last
# a second), though no other job finishes.
ok(poll_until($node, "SELECT count(*) FROM dsmapper.job WHERE job_id = $job_a", '0', 30),
	'job A is removed on time while job C keeps the workers busy');
cmp_ok(sql("SELECT extract(epoch FROM clock_timestamp()) - $a_finished"), '>=', 2,
	'but not before the 2 s retention had passed');
is(present($job_a), '0|0|0|0|0', 'job A and its shards are gone from the views and the tables');

my $job_b = launch($node, 'count_t', 't', 'shards => 2, page_size => 100');
is(wait_job($node, $job_b), 'succeeded', 'job B succeeds');
is(present($job_b), '1|2|1|2|0', 'job B and its shards remain');
like(present($job_c), qr/^1\|2\|1\|2\|\d$/, 'the unfinished job C remains, though it is older');

# dsmapper_forget on a finished job.
is(sql("SELECT dsmapper_forget($job_b)"), 't', 'dsmapper_forget(B) returns true');
is(present($job_b), '0|0|0|0|0', 'job B and its shards are gone');
my ($state) = try(undef, "SELECT dsmapper_forget($job_b)");
isnt($state, '', "forgetting a forgotten job is an error ($state)");

# Not while running or paused.
($state) = try(undef, "SELECT dsmapper_forget($job_c)");
is($state, '55000', 'dsmapper_forget refuses a running job (55000)');
is(sql("SELECT dsmapper_pause($job_c)"), 'paused', 'job C is paused');
($state) = try(undef, "SELECT dsmapper_forget($job_c)");
is($state, '55000', 'dsmapper_forget refuses a paused job (55000)');
like(present($job_c), qr/^1\|2\|1\|2\|/, 'the refused job C is still there');
is(sql("SELECT dsmapper_abort($job_c)"), 'aborted', 'job C is aborted');
is(sql("SELECT dsmapper_forget($job_c)"), 't', 'dsmapper_forget removes the aborted job C');
is(present($job_c), '0|0|0|0|0', 'job C and its shards are gone');

# An idle database: when job D is due for removal no worker lives there any
# more, and the launcher starts one for it at that time.
sql("ALTER SYSTEM SET dsmapper.worker_idle_timeout = 1");
$node->reload;
ok(poll_until($node, 'SHOW dsmapper.worker_idle_timeout', '1s', 30), 'worker_idle_timeout is 1s');
my $job_d = launch($node, 'count_t', 't', 'shards => 1, page_size => 1000');
is(wait_job($node, $job_d), 'succeeded', 'job D succeeds');
ok(poll_until($node, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper worker'", '0', 30),
	'then no worker is left');
is(present($job_d), '1|1|1|1|0', 'job D is kept at first');
ok(poll_until($node, "SELECT count(*) FROM dsmapper.job WHERE job_id = $job_d", '0', 30),
	'job D is removed on time in the idle database');
sql("ALTER SYSTEM RESET dsmapper.worker_idle_timeout");
$node->reload;

# Other roles.  Retention 0 keeps finished jobs for good, so that the jobs
# below stay until they are forgotten.
sql("ALTER SYSTEM SET dsmapper.history_retention = 0");
$node->reload;
ok(poll_until($node, 'SHOW dsmapper.history_retention', '0', 30),
	'dsmapper.history_retention is 0');
$node->safe_psql(
	'postgres', q{
	CREATE ROLE alice LOGIN;
	CREATE ROLE bob LOGIN;
	CREATE ROLE carol LOGIN IN ROLE alice;
	GRANT SELECT, UPDATE ON t TO alice;
});
my @jobs;
foreach my $i (1 .. 3)
{
	my $job = $node->safe_psql('postgres',
		q{SELECT dsmapper_launch('count_t', 't', shards => 1)},
		extra_params => [ '-U', 'alice' ]);
	is(wait_job($node, $job), 'succeeded', "alice's job $i succeeds");
	push @jobs, $job;
}
($state) = try('bob', "SELECT dsmapper_forget($jobs[0])");
is($state, '42501', "another role cannot forget alice's job (42501)");
like(present($jobs[0]), qr/^1\|1\|1\|1\|0$/, 'the job is still there');
is( $node->safe_psql('postgres', "SELECT dsmapper_forget($jobs[0])", extra_params => [ '-U', 'alice' ]),
	't', 'the owner can forget her job');
is( $node->safe_psql('postgres', "SELECT dsmapper_forget($jobs[1])", extra_params => [ '-U', 'carol' ]),
	't', 'a member of the owner role can forget it');
is(sql("SELECT dsmapper_forget($jobs[2])"), 't', 'a superuser can forget it');
is(present($jobs[0]) . ' ' . present($jobs[1]) . ' ' . present($jobs[2]),
	'0|0|0|0|0 0|0|0|0|0 0|0|0|0|0', "alice's jobs are gone");

$node->stop;
done_testing();
