
# 040_pause_resume.pl: an operator pauses a running job and resumes it.
#
# While paused, every shard is 'paused', no worker works on the job, and
# neither processed nor any shard's resume_from moves.  After a resume the
# shards go on from their checkpoints: a page log kept by the mapper (it
# commits with each page) shows that each shard's first page after the
# pause starts right after the key it had checkpointed, that no page is
# mapped twice, and the counter table shows every row mapped exactly once.
# Two pause/resume cycles are run.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use DsmTest;

my $node = new_node('pause_resume');

my $rows = 4000;
create_counter_table($node, 'p', $rows);

# The page log: one row per committed mapper call.
$node->safe_psql(
	'postgres', q{
	CREATE TABLE pages (id bigserial PRIMARY KEY, shard int NOT NULL,
	                    first_key bigint NOT NULL, last_key bigint NOT NULL,
	                    n int NOT NULL);
});
create_counter_mapper(
	$node, 'count_p', 'p',
	sleep => 0.05,
	extra => q{INSERT INTO pages (shard, first_key, last_key, n)
	           VALUES (dsmapper_current_shard(), keys[1],
	                   keys[cardinality(keys)], cardinality(keys));});

my $job = launch($node, 'count_p', 'p', 'shards => 4, page_size => 10');
like($job, qr/^\d+$/, 'job launched');

# sql(text): one query's output.
sub sql { return $node->safe_psql('postgres', $_[0]); }

# The job's shards as "shard:state:processed:resume_from" lines, the page
# log count and the mapped row count: everything that must stand still
# while the job is paused.
sub snapshot
{
	return sql(
		qq{
		SELECT (SELECT string_agg(shard || ':' || state || ':' || processed || ':'
		                          || coalesce(resume_from, '-'), ' ' ORDER BY shard)
		          FROM dsmapper.shards WHERE job_id = $job)
		       || ' | pages ' || (SELECT count(*) FROM pages)
		       || ' | mapped ' || (SELECT count(*) FROM p WHERE n > 0)
		       || ' | job processed ' || (SELECT processed FROM dsmapper.jobs WHERE job_id = $job)});
}

# pause_cycle(label, stable_seconds): pauses the job, checks the paused
# state (and that nothing moves for stable_seconds), resumes it.  Returns
# the highest page log id written before the pause and the resume_from of
# each shard, as a hash shard => key.
sub pause_cycle
{
	my ($label, $stable) = @_;

	is(sql("SELECT dsmapper_pause($job)"), 'paused', "$label: dsmapper_pause returns paused");
	is(sql("SELECT state FROM dsmapper.jobs WHERE job_id = $job"),
		'paused', "$label: the job is paused");

	ok( poll_until(
			$node, qq{
			SELECT count(*) FILTER (WHERE state <> 'paused')
			  FROM dsmapper.shards WHERE job_id = $job},
			'0', 60),
		"$label: every shard reaches paused")
	  or diag(sql("SELECT shard, state, processed FROM dsmapper.shards WHERE job_id = $job"));

	ok( poll_until(
			$node, qq{
			SELECT (SELECT shards_running FROM dsmapper.jobs WHERE job_id = $job)
			     + (SELECT count(*) FROM pg_stat_activity
			         WHERE backend_type = 'dsmapper worker' AND state = 'active'
			           AND query LIKE 'dsmapper job $job shard %')},
			'0', 30),
		"$label: no worker is in a turn of the paused job");

	# Nothing moves: sampled several times over the stable window.
	my $first = snapshot();
	my @changed;
	my $samples = 0;
	my $until = time() + $stable;
	while (time() < $until || $samples < 5)
	{
		usleep(400_000);
		my $now = snapshot();
		$samples++;
		push @changed, $now if $now ne $first;
	}
	is(scalar(@changed), 0,
		"$label: processed, resume_from and the mapped rows stay fixed while paused ($samples samples)")
	  or diag("at the pause: $first\nlater: $changed[0]");

	# Checkpoints are what the committed pages say: resume_from is the last
	# key of the shard's last committed page, processed its row count.
	is( sql(
			qq{
			SELECT count(*) FROM dsmapper.shards s
			  LEFT JOIN (SELECT shard, max(last_key) AS last_key, sum(n) AS n
			               FROM pages GROUP BY shard) l USING (shard)
			 WHERE s.job_id = $job
			   AND (s.resume_from IS DISTINCT FROM l.last_key::text
			        OR s.processed <> coalesce(l.n, 0))}),
		'0',
		"$label: each shard's resume_from and processed match its committed pages");
	is( sql(
			qq{SELECT (SELECT processed FROM dsmapper.jobs WHERE job_id = $job)
			        = (SELECT count(*) FROM p WHERE n = 1)}),
		't', "$label: rows mapped = processed while paused");
	cmp_ok(sql("SELECT processed FROM dsmapper.jobs WHERE job_id = $job"),
		'<', $rows, "$label: paused before the end");

	is(wait_job($node, $job, timeout => '0.3 s'), 'paused',
		"$label: dsmapper_wait with a timeout returns paused");
	is(sql("SELECT dsmapper_pause($job)"), 'paused',
		"$label: pausing a paused job changes nothing");

	my $max_id = sql('SELECT coalesce(max(id), 0) FROM pages');
	my %resume = map { split /\|/ } split /\n/,
	  sql("SELECT shard, resume_from FROM dsmapper.shards WHERE job_id = $job");

	is(sql("SELECT dsmapper_resume($job)"), 'running', "$label: dsmapper_resume returns running");
	is(sql("SELECT dsmapper_resume($job)"), 'running',
		"$label: resuming a running job changes nothing");
	return ($max_id, \%resume);
}

# Wait until every shard has mapped something, so that each is paused in
# the middle of its range.
ok( poll_until(
		$node, qq{
		SELECT count(*) = 4 AND bool_and(processed > 0)
		  FROM dsmapper.shards WHERE job_id = $job},
		't', 60),
	'every shard of the running job has mapped pages');
is(sql("SELECT state FROM dsmapper.jobs WHERE job_id = $job"), 'running', 'job is running');

my ($max1, $resume1) = pause_cycle('first pause', 2);

# The job moves again after the resume.
ok( poll_until(
		$node, "SELECT count(*) > 0 FROM pages WHERE id > $max1", 't', 60),
	'pages are mapped again after the resume');
ok( poll_until(
		$node, qq{
		SELECT count(DISTINCT shard) = 4 FROM pages WHERE id > $max1},
		't', 60),
	'every shard maps pages again after the resume');

my ($max2, $resume2) = pause_cycle('second pause', 1);

is(wait_job($node, $job, timeout => '120 s'), 'succeeded', 'the resumed job succeeds');
is(counter_summary($node, 'p'), "$rows|$rows|0|0", 'every row was mapped exactly once');
my $info = job_info($node, $job);
is($info->{processed}, $rows, 'processed equals the row count');
is($info->{shards_done}, 4, 'every shard succeeded');
is(sql('SELECT sum(n) FROM pages'), $rows, 'the committed pages hold every row once');

# Within each shard, pages follow each other without overlap.
is( sql(
		q{
		SELECT count(*) FROM (
		    SELECT first_key, lag(last_key) OVER (PARTITION BY shard ORDER BY id) AS prev_last
		      FROM pages) x
		 WHERE first_key <= prev_last}),
	'0',
	'no page of a shard overlaps an earlier one');

# Each shard's first page after a pause starts right after its checkpoint.
foreach my $cycle ([ 'first pause', $max1, $resume1 ], [ 'second pause', $max2, $resume2 ])
{
	my ($label, $max, $resume) = @$cycle;
	foreach my $shard (sort keys %$resume)
	{
		my $from = $resume->{$shard};
		my $next = sql(
			qq{
			SELECT first_key FROM pages
			 WHERE shard = $shard AND id > $max ORDER BY id LIMIT 1});
		my $want = sql(
			qq{SELECT min(id) FROM p WHERE id > $from});
		is($next, $want,
			"$label: shard $shard resumed right after its checkpoint $from");
	}
}

$node->stop;
done_testing();
