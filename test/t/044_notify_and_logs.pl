
# 044_notify_and_logs.pl: what operators get told, through NOTIFY and the
# server log.
#
#  - A session that LISTENs on channel dsmapper receives every job state
#    change, in order, as {"job": N, "state": "..."}: starting, running,
#    succeeded for a plain job; starting, running, paused, running,
#    aborting, aborted for a job that is paused, resumed and aborted.
#  - The server log has exactly one "started" and one "<outcome> after"
#    line per job at LOG and no page-level lines; with log_min_messages =
#    debug1 the page lines ("page of") appear.
#  - An idle cluster writes no dsmapper lines.
#  - With max_worker_processes too small for dsmapper.max_workers the
#    launcher says "could not start a worker" once, not every time it
#    retries; the queued work is not lost (dsmapper_run() can still run it).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use JSON::PP;
use DsmTest;

my $node = new_node('notify_logs');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $log_start = log_position($node);

# The listener, and everything it has printed so far.
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN dsmapper');
my $heard = '';

# listen_until(regex, timeout): pumps the listener (psql prints
# notifications after each command) until what it heard matches.
sub listen_until
{
	my ($re, $timeout) = @_;
	my $deadline = time() + ($timeout // 30);
	while (1)
	{
		$heard .= $listener->query_safe('SELECT 1');
		return 1 if $heard =~ $re;
		return 0 if time() > $deadline;
		usleep(100_000);
	}
}

# states_of(job): the states announced for the job, in order; dies on a
# payload that is not exactly {"job": N, "state": "..."}.
sub states_of
{
	my ($job) = @_;
	my @states;
	while ($heard =~ /Asynchronous notification "dsmapper" with payload "(.*?)" received/g)
	{
		my $payload = $1;
		like($payload, qr/^\{"job": \d+, "state": "[a-z]+"\}$/, "payload $payload has the documented form")
		  if $payload !~ /^\{"job": \d+, "state": "[a-z]+"\}$/;
		my $p = decode_json($payload);
		push @states, $p->{state} if $p->{job} == $job;
	}
	return @states;
}

##
## A job that succeeds.
##
create_counter_table($node, 'quick', 2000);
create_counter_mapper($node, 'count_quick', 'quick');
my $job1 = launch($node, 'count_quick', 'quick', 'shards => 2, page_size => 100');
is(wait_job($node, $job1), 'succeeded', 'job 1 succeeds');
ok(listen_until(qr/"job": $job1, "state": "succeeded"/), 'the listener hears job 1 succeed');
is(join(' ', states_of($job1)), 'starting running succeeded',
	'job 1 is announced as starting, running, succeeded');
unlike($heard, qr/Asynchronous notification "dsmapper" with payload "(?!\{"job": \d+, "state": "[a-z]+"\}")/,
	'every payload is {"job": N, "state": "..."}');

##
## A job that is paused, resumed and aborted.
##
create_counter_table($node, 'slow', 8000);
create_counter_mapper($node, 'count_slow', 'slow', sleep => 0.05);
my $job2 = launch($node, 'count_slow', 'slow', 'shards => 2, page_size => 10');
ok( poll_until(
		$node, "SELECT state = 'running' AND processed > 0 FROM dsmapper.jobs WHERE job_id = $job2",
		't', 60),
	'job 2 is running');
is(sql("SELECT dsmapper_pause($job2)"), 'paused', 'job 2 is paused');
ok( poll_until(
		$node, "SELECT count(*) FILTER (WHERE state <> 'paused') FROM dsmapper.shards WHERE job_id = $job2",
		'0', 60),
	'every shard of job 2 is paused');
is(sql("SELECT dsmapper_resume($job2)"), 'running', 'job 2 is resumed');
ok( poll_until(
		$node, "SELECT shards_running = 2 FROM dsmapper.jobs WHERE job_id = $job2",
		't', 60),
	'both shards of job 2 are in a turn again');
is(sql("SELECT dsmapper_abort($job2)"), 'aborting', 'aborting job 2 returns aborting');
is(wait_job($node, $job2), 'aborted', 'job 2 is aborted');
ok(listen_until(qr/"job": $job2, "state": "aborted"/), 'the listener hears job 2 abort');
is(join(' ', states_of($job2)), 'starting running paused running aborting aborted',
	'job 2 is announced as starting, running, paused, running, aborting, aborted');
$listener->quit;

##
## The log at LOG: one start and one end line per job, no page lines.
##
{
	local $PostgreSQL::Test::Utils::timeout_default = 30;
	ok($node->wait_for_log(qr/dsmapper job $job1 in database "postgres" succeeded after/, $log_start),
		'the end of job 1 is logged');
	ok($node->wait_for_log(qr/dsmapper job $job2 in database "postgres" aborted after/, $log_start),
		'the end of job 2 is logged');
}
my $log = log_since($node, $log_start);
foreach my $j ([ $job1, 'succeeded' ], [ $job2, 'aborted' ])
{
	my ($job, $outcome) = @$j;
	my @started = $log =~ /^.*dsmapper job $job in database "postgres" started.*$/mg;
	my @ended = $log =~ /^.*dsmapper job $job in database "postgres" \w+ after .*$/mg;
	is(scalar(@started), 1, "job $job: exactly one 'started' line") or diag(join("\n", @started));
	like($started[0] // '', qr/\bLOG:\s+dsmapper job $job /, "job $job: the start is logged at LOG");
	is(scalar(@ended), 1, "job $job: exactly one end line") or diag(join("\n", @ended));
	like($ended[0] // '', qr/\bLOG:\s+dsmapper job $job in database "postgres" $outcome after [0-9.]+ s: /,
		"job $job: the end line says $outcome, at LOG");
}
unlike($log, qr/page of/, 'no page-level lines at LOG');
unlike($log, qr/DEBUG/, 'no DEBUG lines at LOG');

##
## debug1: page lines appear.
##
$node->append_conf('postgresql.conf', "log_min_messages = debug1\n");
$node->reload;
ok(poll_until($node, 'SHOW log_min_messages', 'debug1', 30), 'log_min_messages is debug1');
my $debug_start = log_position($node);
my $job3 = launch($node, 'count_quick', 'quick', 'shards => 2, page_size => 500');
is(wait_job($node, $job3), 'succeeded', 'job 3 succeeds');
{
	local $PostgreSQL::Test::Utils::timeout_default = 30;
	ok($node->wait_for_log(qr/DEBUG:\s+dsmapper job $job3 shard \d+: page of \d+ rows/, $debug_start),
		'with log_min_messages = debug1 the pages of job 3 are logged');
}
my @pages = log_since($node, $debug_start) =~ /dsmapper job $job3 shard \d+: page of [1-9]\d* rows/g;
cmp_ok(scalar(@pages), '>=', 4, 'every page of job 3 is logged (' . scalar(@pages) . ' lines)');

# Idle at debug1: no dsmapper line at all over 3 s.
ok($node->wait_for_log(qr/dsmapper job $job3 in database "postgres" succeeded after/, $debug_start),
	'the end of job 3 is logged');
my $idle_start = log_position($node);
usleep(3_000_000);
my @idle = grep { /dsmapper/ } split /\n/, log_since($node, $idle_start);
is(scalar(@idle), 0, 'an idle cluster writes no dsmapper lines at debug1 (3 s)')
  or diag(join("\n", @idle[0 .. ($#idle < 9 ? $#idle : 9)]));

# Back to LOG; idle again.
$node->append_conf('postgresql.conf', "log_min_messages = log\n");
$node->reload;
ok(poll_until($node, 'SHOW log_min_messages', 'log', 30), 'log_min_messages is log again');
$idle_start = log_position($node);
usleep(3_000_000);
@idle = grep { /dsmapper/ } split /\n/, log_since($node, $idle_start);
is(scalar(@idle), 0, 'an idle cluster writes no dsmapper lines at LOG (3 s)')
  or diag(join("\n", @idle));
is( sql(
		q{SELECT count(*) FROM pg_stat_activity
		   WHERE backend_type LIKE 'dsmapper%' AND state = 'active'}),
	'0',
	'no dsmapper process runs a query while idle');
$node->stop;

##
## Too few background worker processes.
##
# max_worker_processes = 2 leaves no room for a dsmapper worker next to the
# launcher and the logical replication launcher.
my $small = new_node('few_slots', max_workers => 4,
	extra_conf => "max_worker_processes = 2\n");
create_counter_table($small, 'pending', 1000);
create_counter_mapper($small, 'count_pending', 'pending');
my $job = launch($small, 'count_pending', 'pending', 'shards => 2, page_size => 100');
{
	local $PostgreSQL::Test::Utils::timeout_default = 30;
	ok($small->wait_for_log(qr/dsmapper launcher could not start a worker/, 0),
		'the launcher says it could not start a worker');
}
# About five seconds of pending work, with a retry every second.
is(wait_job($small, $job, timeout => '5 s'), 'starting', 'the job waits for a worker');
my $slog = log_since($small, 0);
my @complaints = $slog =~ /^.*could not start a worker.*$/mg;
is(scalar(@complaints), 1, 'the complaint is logged once, not at every retry')
  or diag(join("\n", @complaints));
like($slog, qr/could not start a worker.*\n(?:.*\n)?.*HINT:.*max_worker_processes/,
	'the complaint hints at max_worker_processes');
# The work is still there: a session can run it.
cmp_ok($small->safe_psql('postgres', "SELECT dsmapper_run('30 s')"), '>', 0,
	'dsmapper_run() maps the pending job in a session');
is($small->safe_psql('postgres', "SELECT state FROM dsmapper.jobs WHERE job_id = $job"),
	'succeeded', 'the pending job succeeds through dsmapper_run()');
is(counter_summary($small, 'pending'), '1000|1000|0|0', 'every row mapped once');
$small->stop;

done_testing();
