
# 041_tuning.pl: dsmapper_tune on running jobs.
#
# The mapper logs every call (job, shard, number of keys, start and end
# time) into a table; the rows commit with the pages, so the log shows
# exactly the committed mapper calls.  A change takes effect "within a
# page": each shard may still run one page started under the old settings,
# so the checks below ignore, per shard, the first call that starts after
# the tune committed (and the gap after it, where a pause is checked).
#
#  (a) max_running_shards => 1 on a 4-shard job with 4 workers: after the
#      grace page, at most one shard runs at a time (dsmapper.jobs
#      shards_running, and no two calls of different shards overlap); 0
#      removes the cap and shards run side by side again;
#  (b) rows_per_second => 200 with page_size 50: the measured rate stays
#      under 1.5 x 200; rows_per_second => 0 speeds the job up again;
#  (c) page_delay => '300 ms': consecutive calls of a shard are at least
#      ~250 ms apart; '0' removes the delay;
#  (d) target_page_time => '50 ms' with a mapper whose cost is 0.5 ms per
#      key: page sizes fall from 1000 toward ~100 keys; '0' restores 1000;
#  (e) page_size => 10 takes effect within a page;
#  (f) the returned jsonb, NULL and 0 arguments, bad values, unknown jobs,
#      and who may tune (owner, member of the owner role, superuser; not
#      another role: 42501).

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

my $node = new_node('tuning', max_workers => 4);

$node->safe_psql(
	'postgres', q{
	CREATE TABLE big (id bigint PRIMARY KEY);
	INSERT INTO big SELECT g FROM generate_series(1, 100000) g;
	ANALYZE big;

	CREATE TABLE calls (id bigserial PRIMARY KEY, job bigint, shard int,
	                    n int, t0 timestamptz, t1 timestamptz);

	-- Sleeps params.sleep seconds plus params.per_key seconds per key.
	CREATE FUNCTION logmap(keys bigint[], params jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	DECLARE
	    started timestamptz := clock_timestamp();
	BEGIN
	    PERFORM pg_sleep(coalesce((params->>'sleep')::float8, 0)
	                     + coalesce((params->>'per_key')::float8, 0) * cardinality(keys));
	    INSERT INTO calls (job, shard, n, t0, t1)
	    VALUES (dsmapper_current_job(), dsmapper_current_shard(),
	            cardinality(keys), started, clock_timestamp());
	END $$;
	SELECT dsmapper_register('logmap', 'logmap(bigint[], jsonb)');
});

# sql(query): the output of one or more statements.
sub sql { return $node->safe_psql('postgres', $_[0]); }

# launch_log(params, args): a job of logmap on big.
sub launch_log
{
	my ($params, $args) = @_;
	return launch($node, 'logmap', 'big', "params => '$params', $args");
}

# tune(job, args): (the returned jsonb, the server's clock as epoch seconds
# right after the tune committed).
sub tune
{
	my ($job, $args) = @_;
	my $out = sql(
		"SELECT dsmapper_tune($job, $args);\n"
		  . "SELECT extract(epoch FROM clock_timestamp());");
	my ($json, $t) = split /\n/, $out;
	return ($json, $t);
}

# stop(job): abort the job and wait until it is aborted.
sub stop
{
	my ($job) = @_;
	sql("SELECT dsmapper_abort($job)");
	ok(poll_until($node, "SELECT state FROM dsmapper.jobs WHERE job_id = $job", 'aborted', 60),
		"job $job aborted");
}

# wait_clock(epoch, timeout): until the server's clock passes epoch.
sub wait_clock
{
	my ($epoch, $timeout) = @_;
	return poll_until($node,
		"SELECT extract(epoch FROM clock_timestamp()) > $epoch", 't', $timeout // 60);
}

# The calls of a job that started after epoch t, without the first such
# call of each shard (the grace page), as a SQL subquery.
sub after_grace
{
	my ($job, $t) = @_;
	return qq{(SELECT * FROM (
	             SELECT c.*, row_number() OVER (PARTITION BY shard ORDER BY t0) AS rn
	               FROM calls c
	              WHERE job = $job AND extract(epoch FROM t0) > $t) x
	            WHERE rn > 1)};
}

# Pairs of calls of different shards that overlap in time, in a call set.
sub overlaps
{
	my ($set) = @_;
	return sql(
		qq{
		SELECT count(*) FROM $set a JOIN $set b
		    ON a.shard < b.shard AND a.t0 < b.t1 AND b.t0 < a.t1});
}

##
## (a) max_running_shards
##
{
	my $job = launch_log('{"sleep": 0.05}', 'shards => 4, page_size => 10');
	ok( poll_until(
			$node, "SELECT count(DISTINCT shard) FROM calls WHERE job = $job",
			'4', 60),
		'(a) all four shards map pages');
	ok( poll_until(
			$node,
			"SELECT shards_running > 1 FROM dsmapper.jobs WHERE job_id = $job",
			't', 30),
		'(a) without a cap, several shards are in a turn at once');
	cmp_ok(overlaps("(SELECT * FROM calls WHERE job = $job)"),
		'>', 0, '(a) without a cap, calls of different shards overlap');

	my ($json, $t) = tune($job, 'max_running_shards => 1');
	is(decode_json($json)->{max_running_shards}, 1,
		'(a) tune returns max_running_shards 1');
	is(sql("SELECT max_running_shards FROM dsmapper.jobs WHERE job_id = $job"),
		'1', '(a) dsmapper.jobs shows max_running_shards 1');

	ok( poll_until(
			$node,
			"SELECT shards_running <= 1 FROM dsmapper.jobs WHERE job_id = $job",
			't', 30),
		'(a) the cap takes effect: at most one shard in a turn');

	# A sustained window: sample shards_running for about 2 s while the
	# capped job maps at least 20 more pages.
	my $grace_set = after_grace($job, $t);
	my ($max_running, $samples, @seen) = (0, 0);
	my $until = time() + 2;
	while (time() < $until || $samples < 10)
	{
		my ($running, $active) = split /\|/, sql(
			qq{
			SELECT (SELECT shards_running FROM dsmapper.jobs WHERE job_id = $job),
			       (SELECT count(*) FROM pg_stat_activity
			         WHERE backend_type = 'dsmapper worker' AND state = 'active'
			           AND query LIKE 'dsmapper job $job shard %')});
		$max_running = $running if $running > $max_running;
		push @seen, "$running/$active";
		$samples++;
		usleep(100_000);
	}
	cmp_ok($max_running, '<=', 1,
		"(a) shards_running stays at most 1 ($samples samples)")
	  or diag("shards_running/active workers: @seen");
	ok(poll_until($node, "SELECT count(*) >= 20 FROM $grace_set s", 't', 60),
		'(a) the capped job keeps mapping');
	is(overlaps($grace_set), '0',
		'(a) with max_running_shards 1 no two shards map at the same time')
	  or diag(sql("SELECT shard, n, t0, t1 FROM $grace_set s ORDER BY t0"));

	($json, $t) = tune($job, 'max_running_shards => 0');
	ok(exists decode_json($json)->{max_running_shards}
		  && !defined decode_json($json)->{max_running_shards},
		'(a) max_running_shards => 0 returns null (no cap)');
	is(sql("SELECT max_running_shards IS NULL FROM dsmapper.jobs WHERE job_id = $job"),
		't', '(a) dsmapper.jobs shows no cap');
	ok( poll_until(
			$node,
			"SELECT shards_running > 1 FROM dsmapper.jobs WHERE job_id = $job",
			't', 30),
		'(a) without the cap several shards are in a turn again');
	ok( poll_until(
			$node, "SELECT " . overlaps_sql(after_grace($job, $t)) . " > 0",
			't', 30),
		'(a) without the cap calls of different shards overlap again');
	stop($job);
}

# overlaps_sql(set): the overlap count as a scalar subquery.
sub overlaps_sql
{
	my ($set) = @_;
	return qq{(SELECT count(*) FROM $set a JOIN $set b
	              ON a.shard < b.shard AND a.t0 < b.t1 AND b.t0 < a.t1)};
}

# rate(job, from, to): rows per second of the calls that started between
# the epochs from and to.
sub rate
{
	my ($job, $from, $to) = @_;
	return sql(
		qq{
		SELECT round(coalesce(sum(n), 0) / ($to - $from), 1) FROM calls
		 WHERE job = $job AND extract(epoch FROM t0) >= $from
		   AND extract(epoch FROM t0) < $to});
}

##
## (b) rows_per_second
##
{
	my $job = launch_log('{"sleep": 0.01}', 'shards => 4, page_size => 50');
	ok( poll_until(
			$node, "SELECT count(DISTINCT shard) FROM calls WHERE job = $job",
			'4', 60),
		'(b) all four shards map pages');

	my ($json, $t) = tune($job, 'rows_per_second => 200');
	is(decode_json($json)->{rows_per_second}, 200, '(b) tune returns rows_per_second 200');

	# One second for the pages in flight, then a 4 s window.
	my ($from, $to) = ($t + 1, $t + 5);
	ok(wait_clock($to + 0.2), '(b) measured for 4 s');
	my $limited = rate($job, $from, $to);
	diag("rate with rows_per_second 200: $limited rows/s");
	cmp_ok($limited, '<=', 300, '(b) the rate stays under 1.5 x rows_per_second')
	  or diag(sql("SELECT shard, n, t0 FROM calls WHERE job = $job AND extract(epoch FROM t0) >= $from ORDER BY t0"));
	cmp_ok($limited, '>=', 50, '(b) the rate-limited job still makes progress');

	($json, $t) = tune($job, 'rows_per_second => 0');
	ok(!defined decode_json($json)->{rows_per_second}, '(b) rows_per_second => 0 removes the limit');
	# Sleeps in progress end within a second; then a 2 s window.
	($from, $to) = ($t + 1.5, $t + 3.5);
	ok(wait_clock($to + 0.2), '(b) measured for 2 s without the limit');
	my $free = rate($job, $from, $to);
	diag("rate without the limit: $free rows/s");
	cmp_ok($free, '>', 3 * 200, '(b) without the limit the job is faster than 3 x 200 rows/s');
	stop($job);
}

##
## (c) page_delay
##
# gaps(job, t): the pauses between consecutive calls of a shard (start of
# a call minus end of the previous one) for calls that started after t,
# without the gap after each shard's grace page.
sub gaps
{
	my ($job, $t, $before) = @_;
	my $cond = defined $before
	  ? "extract(epoch FROM t0) < $t"
	  : "extract(epoch FROM t0) > $t";
	return qq{(SELECT * FROM (
	             SELECT shard, rn,
	                    extract(epoch FROM t0 - lag(t1) OVER (PARTITION BY shard ORDER BY t0)) AS gap
	               FROM (SELECT c.*, row_number() OVER (PARTITION BY shard ORDER BY t0) AS rn
	                       FROM calls c WHERE job = $job AND $cond) y) x
	            WHERE rn > 2)};
}

{
	my $job = launch_log('{"sleep": 0.01}', 'shards => 2, page_size => 10');
	ok( poll_until(
			$node,
			"SELECT count(DISTINCT shard) = 2 AND count(*) >= 10 FROM calls WHERE job = $job",
			't', 60),
		'(c) both shards map pages');

	my ($json, $t) = tune($job, q{page_delay => '300 ms'});
	is(sql("SELECT ('$json'::jsonb->>'page_delay')::interval = '300 ms'"),
		't', '(c) tune returns page_delay 300 ms');
	my $before = sql("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) FROM "
		  . gaps($job, $t, 1) . " s");
	cmp_ok($before, '<', 0.2, "(c) before the tune, calls follow each other quickly (median gap $before s)");

	my $set = gaps($job, $t);
	ok( poll_until(
			$node, "SELECT count(*) >= 8 AND count(DISTINCT shard) = 2 FROM $set s",
			't', 60),
		'(c) the delayed job keeps mapping');
	my $min = sql("SELECT min(gap) FROM $set s");
	cmp_ok($min, '>=', 0.25, "(c) consecutive calls of a shard are >= 250 ms apart (min $min s)")
	  or diag(sql("SELECT shard, rn, gap FROM $set s ORDER BY shard, rn"));

	($json, $t) = tune($job, q{page_delay => '0'});
	ok(!defined decode_json($json)->{page_delay}, '(c) page_delay => 0 removes the delay');
	$set = gaps($job, $t);
	ok( poll_until(
			$node, "SELECT count(*) >= 10 AND count(DISTINCT shard) = 2 FROM $set s",
			't', 60),
		'(c) the job maps on without the delay');
	my $median = sql("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) FROM $set s");
	cmp_ok($median, '<', 0.2, "(c) without the delay calls follow each other quickly (median gap $median s)");
	stop($job);
}

##
## (d) target_page_time
##
{
	my $job = launch_log('{"per_key": 0.0005}', 'shards => 2, page_size => 1000');
	my ($json, $t) = tune($job, q{target_page_time => '50 ms'});
	is(sql("SELECT ('$json'::jsonb->>'target_page_time')::interval = '50 ms'"),
		't', '(d) tune returns target_page_time 50 ms');
	is(decode_json($json)->{page_size}, 1000, '(d) the configured page_size stays 1000');

	ok( poll_until(
			$node, qq{
			SELECT count(*) = 2 AND bool_and(c >= 12)
			  FROM (SELECT shard, count(*) AS c FROM calls WHERE job = $job GROUP BY shard) s},
			't', 60),
		'(d) both shards map at least 12 pages');
	my $sizes = sql(
		qq{
		SELECT shard || ': ' || string_agg(n::text, ' ' ORDER BY t0)
		  FROM calls WHERE job = $job GROUP BY shard ORDER BY shard});
	diag("page sizes with target_page_time 50 ms:\n$sizes");
	is( sql(
			qq{
			SELECT string_agg(n::text, ',' ORDER BY shard) FROM (
			    SELECT DISTINCT ON (shard) shard, n FROM calls
			     WHERE job = $job ORDER BY shard, t0) f}),
		'1000,1000',
		'(d) each shard starts with pages of 1000 keys');
	my $late = sql(
		qq{
		SELECT count(*) FILTER (WHERE n BETWEEN 40 AND 250) || '/' || count(*)
		  FROM (SELECT n, row_number() OVER (PARTITION BY shard ORDER BY t0 DESC) AS back
		          FROM calls WHERE job = $job) x
		 WHERE back <= 5});
	is($late, '10/10', '(d) the last five pages of each shard hold 40 to 250 keys')
	  or diag($sizes);

	($json, $t) = tune($job, q{target_page_time => '0'});
	ok(!defined decode_json($json)->{target_page_time},
		'(d) target_page_time => 0 turns adaptive sizing off');
	ok( poll_until(
			$node, qq{
			SELECT count(*) = 2 AND bool_and(n = 1000)
			  FROM (SELECT shard, n, row_number() OVER (PARTITION BY shard ORDER BY t0) AS rn
			          FROM calls WHERE job = $job AND extract(epoch FROM t0) > $t) x
			 WHERE rn = 2},
			't', 60),
		'(d) without a target the pages are back to page_size 1000');
	stop($job);
}

##
## (e) page_size
##
{
	my $job = launch_log('{"sleep": 0.1}', 'shards => 2, page_size => 500');
	ok( poll_until(
			$node, "SELECT count(DISTINCT shard) FROM calls WHERE job = $job",
			'2', 60),
		'(e) both shards map pages');
	is(sql("SELECT min(n) FROM calls WHERE job = $job"), '500', '(e) pages of 500 keys before the tune');

	my ($json, $t) = tune($job, 'page_size => 10');
	is(decode_json($json)->{page_size}, 10, '(e) tune returns page_size 10');
	is(sql("SELECT page_size FROM dsmapper.jobs WHERE job_id = $job"), '10',
		'(e) dsmapper.jobs shows page_size 10');
	my $set = after_grace($job, $t);
	ok( poll_until(
			$node, "SELECT count(*) >= 6 AND count(DISTINCT shard) = 2 FROM $set s",
			't', 60),
		'(e) the job keeps mapping');
	is(sql("SELECT count(*) FILTER (WHERE n <> 10) FROM $set s"), '0',
		'(e) after at most one page per shard, every page has 10 keys')
	  or diag(sql("SELECT shard, n, t0 FROM calls WHERE job = $job ORDER BY shard, t0"));
	stop($job);
}

##
## (f) the result, argument checks and who may tune
##
{
	$node->safe_psql(
		'postgres', q{
		CREATE ROLE alice LOGIN;
		CREATE ROLE bob LOGIN;
		CREATE ROLE carol LOGIN IN ROLE alice;
		GRANT SELECT ON big TO alice;
		GRANT INSERT ON calls TO alice;
		GRANT USAGE ON SEQUENCE calls_id_seq TO alice;
	});
	my $job = $node->safe_psql('postgres',
		q{SELECT dsmapper_launch('logmap', 'big', params => '{"sleep": 0.2}', shards => 2, page_size => 10)},
		extra_params => [ '-U', 'alice' ]);
	like($job, qr/^\d+$/, '(f) alice launched a job');

	my $check = sub {
		my ($json, $want, $name) = @_;
		is( sql(
				qq{
				SELECT concat_ws(',', r->'page_size', coalesce(r->>'max_running_shards', 'null'),
				                 coalesce(r->>'rows_per_second', 'null'),
				                 coalesce(((r->>'page_delay')::interval)::text, 'null'),
				                 coalesce(((r->>'target_page_time')::interval)::text, 'null'))
				  FROM (SELECT '$json'::jsonb AS r) x}),
			$want, $name);
	};

	my ($json) = tune($job,
		q{page_size => 77, max_running_shards => 3, rows_per_second => 1000,
		  page_delay => '10 ms', target_page_time => '1 s'});
	is_deeply(
		[ sort keys %{ decode_json($json) } ],
		[qw(max_running_shards page_delay page_size rows_per_second target_page_time)],
		'(f) tune returns every setting');
	$check->($json, '77,3,1000,00:00:00.01,00:00:01', '(f) tune returns the new settings');
	is( sql(
			qq{
			SELECT concat_ws(',', page_size, max_running_shards, rows_per_second,
			                 page_delay, target_page_time)
			  FROM dsmapper.jobs WHERE job_id = $job}),
		'77,3,1000,00:00:00.01,00:00:01',
		'(f) dsmapper.jobs shows the new settings');

	($json) = tune($job, 'page_size => NULL');
	$check->($json, '77,3,1000,00:00:00.01,00:00:01', '(f) NULL arguments leave the settings as they are');
	($json) = tune($job, 'rows_per_second => 50');
	$check->($json, '77,3,50,00:00:00.01,00:00:01', '(f) one argument changes one setting');

	# Bad values: an error, and nothing changes.
	my @bad = (
		'page_size => 0', 'page_size => -1', 'page_size => 1000001',
		'max_running_shards => -1', 'max_running_shards => 1025',
		'rows_per_second => -1', q{rows_per_second => 'NaN'},
		q{rows_per_second => 'Infinity'}, 'rows_per_second => 1e13',
		q{page_delay => '-1 s'}, q{page_delay => '61 s'}, q{page_delay => '2 hours'}, q{page_delay => '1 day'},
		q{target_page_time => '-1 ms'}, q{target_page_time => '1 mon'},
		q{target_page_time => '61 min'});
	foreach my $args (@bad)
	{
		my ($rc, $out, $err) = $node->psql('postgres',
			"\\set VERBOSITY verbose\nSELECT dsmapper_tune($job, $args)");
		like($err, qr/ERROR:\s+22023:/, "(f) $args is refused (22023)")
		  or diag("rc $rc out $out err $err");
	}
	is( sql(
			qq{
			SELECT concat_ws(',', page_size, max_running_shards, rows_per_second,
			                 page_delay, target_page_time)
			  FROM dsmapper.jobs WHERE job_id = $job}),
		'77,3,50,00:00:00.01,00:00:01',
		'(f) refused values change nothing');

	# Limits themselves are accepted.
	($json) = tune($job, q{page_size => 1000000, max_running_shards => 1024,
		rows_per_second => 1e12, page_delay => '1 minute', target_page_time => '1 hour'});
	$check->($json, '1000000,1024,1000000000000,00:01:00,01:00:00', '(f) the largest values are accepted');

	# Zero turns the limits off.
	($json) = tune($job, q{page_size => 10, max_running_shards => 0, rows_per_second => 0,
		page_delay => '0', target_page_time => '0 s'});
	$check->($json, '10,null,null,null,null', '(f) zero turns every limit off');

	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSELECT dsmapper_tune(987654321, page_size => 5)");
	like($err, qr/ERROR:\s+42704:/, '(f) tuning an unknown job is an error (42704)');
	($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSELECT dsmapper_tune(NULL, page_size => 5)");
	like($err, qr/ERROR:\s+22004:/, '(f) a NULL job is an error (22004)');

	# Who may tune.
	($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSELECT dsmapper_tune($job, page_size => 5)",
		extra_params => [ '-U', 'bob' ]);
	like($err, qr/ERROR:\s+42501:/, '(f) another role cannot tune the job (42501)');
	is(sql("SELECT page_size FROM dsmapper.jobs WHERE job_id = $job"), '10',
		'(f) the refused tune changed nothing');
	($rc, $out, $err) = $node->psql('postgres',
		"SELECT dsmapper_tune($job, page_size => 11)->>'page_size'",
		extra_params => [ '-U', 'alice' ]);
	is($out, '11', '(f) the owner can tune') or diag($err);
	($rc, $out, $err) = $node->psql('postgres',
		"SELECT dsmapper_tune($job, page_size => 12)->>'page_size'",
		extra_params => [ '-U', 'carol' ]);
	is($out, '12', '(f) a member of the owner role can tune') or diag($err);
	is(sql("SELECT dsmapper_tune($job, page_size => 13)->>'page_size'"),
		'13', '(f) a superuser can tune');

	stop($job);
}

##
## (g) A pause between pages ends as soon as the job is paused or retuned:
## with a 50 s page_delay, a pause settles every shard within seconds, and
## after a resume a retune to no delay makes pages follow each other again.
##
{
	my $job = launch_log('{"sleep": 0.05}', 'shards => 2, page_size => 10');
	ok(poll_until($node, "SELECT processed > 0 FROM dsmapper.jobs WHERE job_id = $job", 't', 30),
		'(g) the job runs');
	tune($job, q{page_delay => '50 s'});
	# Wait until both shards sleep after a page under the new delay.
	my $mark = sql("SELECT count(*) FROM calls WHERE job = $job");
	ok(poll_until($node, "SELECT count(*) >= $mark + 2 FROM calls WHERE job = $job", 't', 30),
		'(g) pages ran after the retune');
	ok(poll_until($node,
			"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper worker' AND wait_event = 'Extension' AND query ~ '^dsmapper job $job shard'",
			'2', 30),
		'(g) both shards sleep between pages');
	my $t0 = time();
	sql("SELECT dsmapper_pause($job)");
	ok(poll_until($node, "SELECT count(*) FROM dsmapper.shards WHERE job_id = $job AND state = 'paused'", '2', 20),
		'(g) a pause settles the sleeping shards');
	cmp_ok(elapsed_since($t0), '<', 20, '(g) well before the 50 s delay ends');
	sql("SELECT dsmapper_resume($job)");
	my $before = sql("SELECT count(*) FROM calls WHERE job = $job");
	tune($job, q{page_delay => '0'});
	ok(poll_until($node, "SELECT count(*) >= $before + 10 FROM calls WHERE job = $job", 't', 20),
		'(g) after the retune to no delay pages follow each other again');
	stop($job);
}

$node->stop;
done_testing();
