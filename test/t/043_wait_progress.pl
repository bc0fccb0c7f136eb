
# 043_wait_progress.pl: dsmapper_wait with a timeout, cancelled, and with
# progress notices.
#
#  - dsmapper_wait(job, timeout => '1 s') on a long job returns 'running'
#    after about a second;
#  - a dsmapper_wait without timeout can be cancelled (pg_cancel_backend
#    from another session): it fails at once with 57014, and the job goes
#    on;
#  - dsmapper_wait(job, progress => true) emits NOTICE lines with the
#    percentage done, rows/s and an ETA, the last one saying 'succeeded';
#  - CALL dsmapper_await (the procedure form) waits the same way but,
#    outside a transaction block, holds no snapshot while it waits;
#  - it refuses to wait in a REPEATABLE READ transaction and for a job the
#    same transaction launched (which could never move).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('wait_progress');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# A long job: 20000 rows in pages of 10, 50 ms per page, 2 shards.
create_counter_table($node, 'slow', 20000);
create_counter_mapper($node, 'count_slow', 'slow', sleep => 0.05);
my $long = launch($node, 'count_slow', 'slow', 'shards => 2, page_size => 10');
ok( poll_until(
		$node,
		"SELECT state = 'running' AND processed > 0 FROM dsmapper.jobs WHERE job_id = $long",
		't', 60),
	'the long job is running');

##
## Timeout
##
{
	my $t0 = time();
	my $state = sql("SELECT dsmapper_wait($long, timeout => '1 s')");
	my $elapsed = elapsed_since($t0);
	is($state, 'running', "dsmapper_wait with a 1 s timeout returns running");
	cmp_ok($elapsed, '>=', 0.8, sprintf('it waited about the timeout (%.3f s >= 0.8 s)', $elapsed));
	cmp_ok($elapsed, '<=', 5, sprintf('it returned soon after the timeout (%.3f s <= 5 s)', $elapsed));
}

##
## Cancel
##
{
	my $bg = $node->background_psql('postgres', on_error_stop => 0);
	$bg->query_safe('\set VERBOSITY verbose');
	my $pid = $bg->query_safe('SELECT pg_backend_pid()');
	like($pid, qr/^\d+$/, 'the waiting session has a pid');

	# Start the wait without waiting for it.
	$bg->query_until(qr/wait starts/, "\\echo wait starts\nSELECT dsmapper_wait($long);\n");
	ok( poll_until(
			$node, qq{
			SELECT count(*) FROM pg_stat_activity
			 WHERE pid = $pid AND state = 'active' AND query LIKE '%dsmapper_wait%'},
			'1', 30),
		'the session is waiting in dsmapper_wait');
	# It keeps waiting: the job is far from done.
	usleep(300_000);
	is( sql(qq{SELECT count(*) FROM pg_stat_activity
	            WHERE pid = $pid AND state = 'active' AND query LIKE '%dsmapper_wait%'}),
		'1', 'the session is still waiting');

	my $t0 = time();
	is(sql("SELECT pg_cancel_backend($pid)"), 't', 'pg_cancel_backend signals the waiting session');
	# The next query of the session runs once the cancelled wait returned.
	my ($out) = $bg->query('SELECT 42');
	my $elapsed = elapsed_since($t0);
	is($out, '42', 'the session is usable after the cancelled wait');
	like($bg->{stderr}, qr/ERROR:\s+57014:\s+canceling statement due to user request/,
		'the cancelled wait fails with 57014');
	cmp_ok($elapsed, '<', 3, sprintf('the wait returned quickly after the cancel (%.3f s)', $elapsed));
	$bg->quit;

	is(sql("SELECT state FROM dsmapper.jobs WHERE job_id = $long"), 'running',
		'cancelling a wait does not affect the job');
}

##
## Progress notices
##
{
	my $rows = 3000;
	create_counter_table($node, 'prog', $rows);
	create_counter_mapper($node, 'count_prog', 'prog', sleep => 0.05);
	my $job = launch($node, 'count_prog', 'prog', 'shards => 2, page_size => 20');

	my ($out, $err) = ('', '');
	my $t0 = time();
	my $rc = $node->psql('postgres', "SELECT dsmapper_wait($job, progress => true)",
		stdout => \$out, stderr => \$err);
	my $elapsed = elapsed_since($t0);
	is($rc, 0, 'dsmapper_wait with progress runs without error');
	is($out, 'succeeded', 'dsmapper_wait with progress returns succeeded');
	diag(sprintf("progress output after %.1f s:\n%s", $elapsed, $err));

	my @notices = grep { /NOTICE:/ } split /\n/, $err;
	cmp_ok(scalar(@notices), '>=', 2, 'it reported progress more than once');
	is(scalar(grep { /done/ && /rows\/s/ && /ETA/ } @notices), scalar(@notices),
		"every NOTICE has 'done', 'rows/s' and 'ETA'");
	is(scalar(grep { /job $job / } @notices), scalar(@notices), 'every NOTICE names the job');
	ok((grep { /job $job running: / } @notices), 'a NOTICE reports the job running');
	like($notices[-1], qr/job $job succeeded: 100(\.0+)?% done, $rows of $rows rows/,
		"the last NOTICE says 'succeeded', 100% done and the row counts");
	like($notices[-1], qr/\d+\/\d+ shards/, 'the last NOTICE counts the shards');

	# The percentages never go down.  (A NOTICE from before the split, when
	# the wait began that early, says "unknown done".)
	my @pct = map { /([0-9.]+)% done/ ? $1 : -1 } grep { !/job $job starting: unknown done/ } @notices;
	my $monotonic = 1;
	for my $i (1 .. $#pct)
	{
		$monotonic = 0 if $pct[$i] < $pct[ $i - 1 ];
	}
	ok($monotonic && $pct[0] >= 0, "the percentage done never decreases (@pct)");

	# The rate and ETA are those of the moment each NOTICE is sent: the job
	# runs at a steady pace, so no running NOTICE may claim a rate far above
	# the job's overall rate, and an ETA is never before the moment it is
	# reported (NOTICE i comes about 2 i s after the wait began; the ETA is
	# printed to the second, truncated).
	my $overall = sql(
		qq{SELECT round($rows / extract(epoch FROM finished - created), 1)
		     FROM dsmapper.jobs WHERE job_id = $job});
	for my $i (0 .. $#notices)
	{
		my $n = $notices[$i];
		next unless $n =~ /running: /;
		my ($rate) = $n =~ /([0-9.]+) rows\/s/;
		cmp_ok($rate, '<=', 4 * $overall + 50,
			"NOTICE $i: rate $rate rows/s is plausible (job overall $overall rows/s)");
		if ($n =~ /ETA (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+)/)
		{
			my $eta = $1;
			my $not_before = $t0 + 2 * $i - 0.5;
			is( sql(
					"SELECT '$eta'::timestamptz + interval '1 s' >= to_timestamp($not_before)"),
				't',
				"NOTICE $i: ETA $eta is not before the time it was reported");
		}
	}
	is(counter_summary($node, 'prog'), "$rows|$rows|0|0", 'the job mapped every row once');

	# With a timeout, progress notices stop when the wait does.
	($out, $err) = ('', '');
	$rc = $node->psql('postgres',
		"SELECT dsmapper_wait($long, timeout => '2.5 s', progress => true)",
		stdout => \$out, stderr => \$err);
	is($out, 'running', 'dsmapper_wait with progress and a timeout returns running');
	my @running = grep { /NOTICE:/ } split /\n/, $err;
	cmp_ok(scalar(@running), '>=', 1, 'it reported progress while waiting')
	  or diag($err);
	like($running[-1] // '', qr/job $long running: [0-9.]+% done, \d+ of 20000 rows, .*rows\/s.*ETA/,
		'a running job reports its percentage, rows, rate and ETA');
}

##
## The procedure form: CALL dsmapper_await holds no snapshot while it waits
##
{
	# In a transaction block it behaves like the function.
	is(sql("BEGIN; CALL dsmapper_await($long, '0.5 s'); COMMIT;"), 'running',
		'CALL dsmapper_await in a transaction block returns the state after the timeout');

	my $bg = $node->background_psql('postgres', on_error_stop => 0);
	my $pid = $bg->query_safe('SELECT pg_backend_pid()');

	# The function form holds its snapshot for the whole wait.
	$bg->query_until(qr/fwait starts/, "\\echo fwait starts\nSELECT dsmapper_wait($long, timeout => '3 s');\n");
	ok( poll_until(
			$node, qq{
			SELECT count(*) FROM pg_stat_activity
			 WHERE pid = $pid AND state = 'active' AND query LIKE '%dsmapper_wait%'
			   AND backend_xmin IS NOT NULL},
			'1', 30),
		'a session in dsmapper_wait() holds a snapshot (backend_xmin is set)');
	my ($out) = $bg->query('SELECT 1');
	like($out, qr/^running\n1$/, 'the timed function wait returned running');

	# The procedure outside a transaction block ends its transaction before
	# every check: sampled many times, the waiting session shows no xmin
	# (except, rarely, at the instant of a check).
	$bg->query_until(qr/pwait starts/, "\\echo pwait starts\nCALL dsmapper_await($long, '60 s');\n");
	ok( poll_until(
			$node, qq{
			SELECT count(*) FROM pg_stat_activity
			 WHERE pid = $pid AND state = 'active' AND query LIKE '%dsmapper_await%'},
			'1', 30),
		'the session is waiting in CALL dsmapper_await');
	my ($with_xmin, $samples) = (0, 20);
	for (1 .. $samples)
	{
		$with_xmin += sql(qq{SELECT count(*) FROM pg_stat_activity
		                      WHERE pid = $pid AND backend_xmin IS NOT NULL});
		usleep(50_000);
	}
	cmp_ok($with_xmin, '<=', 2,
		"CALL dsmapper_await holds no snapshot while waiting ($with_xmin of $samples samples had an xmin)");

	# It is cancellable, and the job goes on.
	is(sql("SELECT pg_cancel_backend($pid)"), 't', 'pg_cancel_backend signals the CALL');
	($out) = $bg->query('SELECT 42');
	is($out, '42', 'the session is usable after the cancelled CALL');
	like($bg->{stderr}, qr/canceling statement due to user request/,
		'the cancelled CALL fails with the cancel message');
	$bg->quit;
	is(sql("SELECT state FROM dsmapper.jobs WHERE job_id = $long"), 'running',
		'cancelling the CALL does not affect the job');

	# Progress notices and the final state, as with the function.
	create_counter_table($node, 'proc', 1000);
	create_counter_mapper($node, 'count_proc', 'proc', sleep => 0.02);
	my $job = launch($node, 'count_proc', 'proc', 'shards => 2, page_size => 20');
	my ($rc, $err);
	($out, $err) = ('', '');
	$rc = $node->psql('postgres', "CALL dsmapper_await($job, progress => true)",
		stdout => \$out, stderr => \$err);
	is($out, 'succeeded', 'CALL dsmapper_await returns the final state in its INOUT parameter');
	like($err, qr/NOTICE:\s+job $job succeeded: 100(\.0+)?% done/, 'and reports progress as it waits');
	is(counter_summary($node, 'proc'), "1000|1000|0|0", 'that job mapped every row once');

	# From PL/pgSQL, the INOUT parameter receives the state.
	is( sql(qq{DO \$\$ DECLARE s text; BEGIN CALL dsmapper_await($job, NULL, false, s);
	          RAISE NOTICE 'state=%', s; END \$\$;
	          SELECT state FROM dsmapper.jobs WHERE job_id = $job}),
		'succeeded', 'CALL dsmapper_await works from PL/pgSQL');
	($rc, $out, $err) = $node->psql('postgres', 'CALL dsmapper_await(987654)');
	like($err, qr/ERROR:\s+job 987654 does not exist/, 'CALL dsmapper_await on an unknown job fails');
}

##
## Refusals
##
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT dsmapper_wait($long, timeout => '1 s');\nCOMMIT;");
	like($err, qr/ERROR:.*REPEATABLE READ/, 'dsmapper_wait refuses a REPEATABLE READ transaction');

	my $t0 = time();
	($rc, $out, $err) = $node->psql('postgres',
		qq{BEGIN;
		SELECT dsmapper_launch('count_prog', 'prog') AS j \\gset
		SELECT dsmapper_wait(:j, timeout => '30 s');
		ROLLBACK;});
	like($err, qr/ERROR:/, 'dsmapper_wait refuses a job launched in the same transaction')
	  or diag("out: $out");
	cmp_ok(elapsed_since($t0), '<', 10, 'and says so at once instead of waiting');
}

sql("SELECT dsmapper_abort($long)");
is(wait_job($node, $long, timeout => '60 s'), 'aborted', 'the long job is aborted');

$node->stop;
done_testing();
