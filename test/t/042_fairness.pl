
# 042_fairness.pl: a small job launched next to a huge one is not stuck
# behind it for task_duration.
#
# With dsmapper.max_workers = 2, a huge slow job (4 shards, default
# task_duration of 1 minute) keeps both workers in turns.  When a small job
# is launched, the busy workers end their turns at the next page boundary
# (README "Turns"), so the small job finishes about as fast as it does on
# an idle system.  Its launch-to-finish time is measured alone first, then
# next to the huge job; the contended time must be at most 3 x the alone
# time + 2 s.  A second small job, launched once every shard of the huge
# job has had a turn, is measured the same way.  Last, the shards of one
# job with more shards than workers advance together.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('fairness', max_workers => 2);

sub sql { return $node->safe_psql('postgres', $_[0]); }

create_counter_table($node, 'huge', 100000);
create_counter_mapper($node, 'count_huge', 'huge', sleep => 0.05);
create_counter_table($node, 'small', 200);
create_counter_mapper($node, 'count_small', 'small');

# run_small(label, timeout): launches the small job and waits for it (at
# most timeout seconds).  Returns its launch-to-finish time in seconds as
# the server saw it (from the launch transaction to the final state; the
# client's time when it is not final), as the client saw it, the job id and
# its state.
sub run_small
{
	my ($label, $timeout, $check_after) = @_;
	my $t0 = time();
	my $job = launch($node, 'count_small', 'small', 'shards => 1');
	my $state = '';

	# Not done after check_after seconds: show what the workers are doing.
	if (defined $check_after)
	{
		$state = wait_job($node, $job, timeout => "$check_after s");
		diag("the small job is still $state after $check_after s; workers and queue:\n"
			  . sql(q{SELECT pid, state, query FROM pg_stat_activity
			           WHERE backend_type = 'dsmapper worker' ORDER BY pid})
			  . "\n"
			  . sql(q{SELECT job_id, shard, last_turn FROM dsmapper.queue
			           ORDER BY last_turn NULLS FIRST, job_id, shard}))
		  if $state ne 'succeeded';
	}
	$state = wait_job($node, $job, timeout => "$timeout s") if $state ne 'succeeded';
	my $client = elapsed_since($t0);
	is($state, 'succeeded', "$label: the small job succeeds within $timeout s");
	my $server = sql(
		"SELECT round(extract(epoch FROM finished - created), 3) FROM dsmapper.jobs WHERE job_id = $job");
	$server = $client if $server eq '';
	return ($server, $client, $job, $state);
}

# Alone, on an idle system (twice: the first launch also starts workers).
my ($alone1, $alone1_client) = run_small('alone, first', 30);
my ($alone, $alone_client) = run_small('alone', 30);
$alone = $alone1 if $alone1 > $alone;
diag(sprintf('small job alone: %.3f s and %.3f s (client %.3f s and %.3f s)',
		$alone1, $alone, $alone1_client, $alone_client));

# The huge job keeps both workers busy.
my $huge = launch($node, 'count_huge', 'huge', 'shards => 4, page_size => 100');
ok( poll_until(
		$node, qq{
		SELECT count(*) FROM pg_stat_activity
		 WHERE backend_type = 'dsmapper worker' AND state = 'active'
		   AND query LIKE 'dsmapper job $huge shard %'},
		'2', 60),
	'both workers are in turns of the huge job');
is(sql("SELECT count(*) FROM dsmapper.shards WHERE job_id = $huge"), '4',
	'the huge job has 4 shards');
ok(poll_until($node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $huge", 't', 30),
	'the huge job makes progress');

my $bound = 3 * $alone + 2;
my ($contended, $contended_client, $small, $small_state) =
  run_small('next to the huge job', 20, 3);
diag(sprintf('small job next to the huge one: %.3f s (client %.3f s); alone %.3f s; bound %.3f s',
		$contended, $contended_client, $alone, $bound));
cmp_ok($contended, '<=', $bound,
	'next to the huge job, the small job takes at most 3 x its alone time + 2 s');
if ($small_state ne 'succeeded')
{
	is(wait_job($node, $small, timeout => '45 s'), 'succeeded', 'the small job succeeds later');
}
is(sql('SELECT count(*) FILTER (WHERE n = 3) FROM small'), '200',
	'each of the three small jobs mapped every row once');

# The huge job is still running: the small one did not wait for its end.
is(sql("SELECT state FROM dsmapper.jobs WHERE job_id = $huge"), 'running',
	'the huge job was still running when the small job finished');

# Once every shard of the huge job has had a turn (so its never-run shards
# do not come first), a further small job is just as quick.
ok( poll_until(
		$node, qq{
		SELECT count(*) FILTER (WHERE processed > 0) FROM dsmapper.shards WHERE job_id = $huge},
		'4', 45),
	'every shard of the huge job has had a turn');
my ($again, $again_client) = run_small('next to the huge job, again', 20, 3);
diag(sprintf('second small job next to the huge one: %.3f s (client %.3f s)', $again, $again_client));
cmp_ok($again, '<=', $bound,
	'again, the small job takes at most 3 x its alone time + 2 s');

# The huge job lost nothing by yielding.
is(sql("SELECT state FROM dsmapper.jobs WHERE job_id = $huge"), 'running',
	'the huge job was still running when the second small job finished');
sql("SELECT dsmapper_abort($huge)");
ok(poll_until($node, "SELECT state FROM dsmapper.jobs WHERE job_id = $huge", 'aborted', 60),
	'the huge job is aborted');
is( sql(
		qq{SELECT (SELECT processed FROM dsmapper.jobs WHERE job_id = $huge)
		        = (SELECT count(*) FROM huge WHERE n = 1)
		      AND NOT EXISTS (SELECT FROM huge WHERE n > 1)}),
	't',
	'the huge job mapped each row at most once, processed = rows mapped');

# Within one job: with more shards than workers, a turn ends after a
# quarter of its shard while other shards wait, so every shard has started
# before the first one finishes (the job does not end with one shard
# running alone).
sql("SELECT dsmapper_abort(job_id) FROM dsmapper.jobs WHERE finished IS NULL");
create_counter_table($node, 'even', 2000);
create_counter_mapper($node, 'count_even', 'even', sleep => 0.01);
my $je = launch($node, 'count_even', 'even', 'shards => 4, page_size => 25');
is(wait_job($node, $je, timeout => '120 s'), 'succeeded', 'the four-shard job succeeds');
is(counter_summary($node, 'even'), '2000|2000|0|0', '  every row exactly once');
is( sql(qq{SELECT max(started) < min(updated) FILTER (WHERE state = 'succeeded')
             FROM dsmapper.shard WHERE job_id = $je}),
	't', '  every shard started before the first one finished');

$node->stop;
done_testing();
