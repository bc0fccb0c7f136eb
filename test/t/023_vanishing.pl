
# 023_vanishing.pl: things a running job depends on vanish or change under
# it: the mapper registration, its function, the table, its primary key,
# the owner role, the owner's SELECT privilege.  The affected shards fail
# at their next turn with a clear message; a healthy job running alongside
# in the same database succeeds, and the workers stay up.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('vanishing');
my $launcher = launcher_pid($node);
my $log_offset = log_position($node);

# A role that launches jobs, and the tables and mappers of every case.
$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN');

my $rows = 4000;

# start_case(name, as => role, task_duration => '100 ms'): a victim table
# <name> with a slow counter mapper count_<name>, and a healthy table h_<name>
# with its own mapper.  Both jobs are launched (the victim one as the given
# role, pages of 10 keys and by default turns of 100 ms so the shards come
# back to the queue often); returns
# (victim job, healthy job) once the victim job has mapped a page.
sub start_case
{
	my ($name, %opts) = @_;
	create_counter_table($node, $name, $rows);
	create_counter_mapper($node, "count_$name", $name, sleep => 0.02);
	create_counter_table($node, "h_$name", $rows);
	create_counter_mapper($node, "count_h_$name", "h_$name", sleep => 0.01);
	my $turn = $opts{task_duration} // '100 ms';
	my $launch = "SELECT dsmapper_launch('count_$name', '$name', shards => 2, page_size => 10, task_duration => '$turn')";
	if ($opts{as})
	{
		$node->safe_psql('postgres', qq{
			GRANT SELECT, UPDATE ON $name TO $opts{as};
			GRANT USAGE ON SCHEMA public TO $opts{as};
		});
		$launch = "SET ROLE $opts{as}; $launch";
	}
	my $victim = $node->safe_psql('postgres', $launch);
	my $healthy = launch($node, "count_h_$name", "h_$name",
		'shards => 2, page_size => 20');
	ok( poll_until(
			$node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $victim",
			't', 30),
		"$name: the victim job runs");
	return ($victim, $healthy);
}

# pause_job(job): pause and wait until no shard of it is running.
sub pause_job
{
	my ($name, $job) = @_;
	is($node->safe_psql('postgres', "SELECT dsmapper_pause($job)"), 'paused',
		"$name: victim job paused");
	ok( poll_until(
			$node,
			"SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state NOT IN ('paused', 'succeeded')",
			'0', 30),
		"$name: every shard stopped");
}

# check_case(name, victim, healthy, error regex, sqlstate): the victim job
# fails, every shard that did not finish failed with the error, the healthy
# job succeeds and mapped every row once.
sub check_case
{
	my ($name, $victim, $healthy, $error, $sqlstate, %opts) = @_;
	is(wait_job($node, $victim, timeout => '30 s'), 'failed', "$name: victim job fails");
	my $shards = $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state NOT IN ('failed', 'succeeded')) FROM dsmapper.shards WHERE job_id = $victim");
	my ($failed, $open) = split /\|/, $shards;
	cmp_ok($failed, '>=', 1, "$name: a shard failed");
	is($open, 0, "$name: no shard is left open");
	my @errors = split /\n/, $node->safe_psql('postgres',
		"SELECT error || ' [' || error_sqlstate || ']' FROM dsmapper.shards WHERE job_id = $victim AND state = 'failed'");
	is(scalar(grep { $_ =~ $error && $_ =~ /\[\Q$sqlstate\E\]$/ } @errors), scalar(@errors),
		"$name: every failed shard says $error [$sqlstate]")
	  or diag join("\n", @errors);
	like(job_info($node, $victim)->{error}, $error, "$name: the job error says so");
	if (!$opts{table_gone})
	{
		is($node->safe_psql('postgres', "SELECT count(*) FROM $name WHERE n > 1"),
			'0', "$name: no row mapped twice");
	}
	is(wait_job($node, $healthy, timeout => '60 s'), 'succeeded',
		"$name: the healthy job alongside succeeds");
	is(counter_summary($node, "h_$name"), "$rows|$rows|0|0",
		"$name: the healthy job mapped every row once");
	is(launcher_pid($node), $launcher, "$name: the launcher is still the same process");
}

##
## (a) The mapper is unregistered while the job runs.
##
{
	my ($v, $h) = start_case('unreg');
	$node->safe_psql('postgres', "SELECT dsmapper_unregister('count_unreg')");
	check_case('unreg', $v, $h, qr/mapper "count_unreg" is no longer registered/, '42704');
}

##
## (b) The mapper's function is dropped.
##
{
	my ($v, $h) = start_case('dropfn');
	pause_job('dropfn', $v);
	$node->safe_psql('postgres', 'DROP FUNCTION count_dropfn(bigint[], jsonb)');
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'dropfn: resumed');
	check_case('dropfn', $v, $h, qr/function of mapper "count_dropfn" no longer exists/, '42883');
}

##
## (b2) The function is dropped while a turn is under way (turns of a
## minute): the shard's next page must not call the dropped function and
## the failure must still say what happened.
##
{
	my ($v, $h) = start_case('dropfn_midturn', task_duration => '1 minute');
	$node->safe_psql('postgres', 'DROP FUNCTION count_dropfn_midturn(bigint[], jsonb)');
	check_case('dropfn_midturn', $v, $h,
		qr/function of mapper "count_dropfn_midturn" no longer exists/, '42883');
}

##
## (c) The function is replaced by one of another signature under the same
## name (drop and create: a new function, not the registered one).
##
{
	my ($v, $h) = start_case('newsig');
	pause_job('newsig', $v);
	$node->safe_psql('postgres', q{
		DROP FUNCTION count_newsig(bigint[], jsonb);
		CREATE FUNCTION count_newsig(keys integer[], params jsonb) RETURNS void
		LANGUAGE sql AS 'UPDATE newsig SET n = n + 100 WHERE id = ANY (keys)';
	});
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'newsig: resumed');
	check_case('newsig', $v, $h, qr/function of mapper "count_newsig" no longer exists/, '42883');
	is($node->safe_psql('postgres', 'SELECT count(*) FROM newsig WHERE n >= 100'),
		'0', 'newsig: the new function was never called');
}

##
## (d) The table is dropped.
##
{
	my ($v, $h) = start_case('droptab');
	pause_job('droptab', $v);
	$node->safe_psql('postgres', 'DROP TABLE droptab');
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'droptab: resumed');
	check_case('droptab', $v, $h, qr/relation "(public\.)?droptab" no longer exists/, '42P01',
		table_gone => 1);
}

##
## (e) The primary key changes (another column).
##
{
	my ($v, $h) = start_case('newpk');
	pause_job('newpk', $v);
	$node->safe_psql('postgres', q{
		ALTER TABLE newpk ADD COLUMN id2 bigint;
		UPDATE newpk SET id2 = id;
		ALTER TABLE newpk DROP CONSTRAINT newpk_pkey;
		ALTER TABLE newpk ADD PRIMARY KEY (id2);
	});
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'newpk: resumed');
	check_case('newpk', $v, $h,
		qr/primary key of relation "(public\.)?newpk" changed since the job was launched/, '55000');
}

##
## (e2) The key keeps its column but changes type (so its order could
##      change too): the shard bounds and checkpoints no longer apply.
##
{
	my ($v, $h) = start_case('newkeytype');
	pause_job('newkeytype', $v);
	$node->safe_psql('postgres', 'ALTER TABLE newkeytype ALTER COLUMN id TYPE integer');
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'newkeytype: resumed');
	check_case('newkeytype', $v, $h,
		qr/primary key of relation "(public\.)?newkeytype" changed since the job was launched/,
		'55000');
}

##
## (f) The owner loses SELECT on the table.
##
{
	my ($v, $h) = start_case('revoked', as => 'alice');
	pause_job('revoked', $v);
	$node->safe_psql('postgres', 'REVOKE SELECT ON revoked FROM alice');
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'revoked: resumed');
	check_case('revoked', $v, $h,
		qr/job owner alice no longer has SELECT privilege on relation "(public\.)?revoked"/, '42501');
}

##
## (g) The owner role is dropped (its privileges first: DROP OWNED BY).
##
{
	$node->safe_psql('postgres', 'CREATE ROLE bob LOGIN');
	my ($v, $h) = start_case('noowner', as => 'bob');
	pause_job('noowner', $v);
	$node->safe_psql('postgres', 'DROP OWNED BY bob; DROP ROLE bob');
	is($node->safe_psql('postgres', "SELECT dsmapper_resume($v)"), 'running', 'noowner: resumed');
	check_case('noowner', $v, $h, qr/role of job owner .* no longer exists/, '42704');
}

# No process crashed or was restarted over all this.
my $log = log_since($node, $log_offset);
unlike($log, qr/terminated by signal|terminating any other active server processes|exited with exit code [^01]/,
	'no process crashed');
unlike($log, qr/a previous turn exited inside a page/, 'no turn died inside a page');

# And a last job runs fine.
create_counter_table($node, 'last', 2000);
create_counter_mapper($node, 'count_last', 'last');
my $job = launch($node, 'count_last', 'last', 'shards => 2, page_size => 100');
is(wait_job($node, $job), 'succeeded', 'a job after all this succeeds');
is(counter_summary($node, 'last'), '2000|2000|0|0', 'and maps every row once');

$node->stop;
done_testing();
