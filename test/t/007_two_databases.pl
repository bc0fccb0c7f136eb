
# 007_two_databases.pl: jobs run in every database that has the extension,
# with no database named in the configuration; a database without the
# extension is left alone.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use DsmTest;

my $node = new_node('twodb');
$node->safe_psql('postgres', 'CREATE DATABASE second');
$node->safe_psql('postgres', 'CREATE DATABASE plain');
$node->safe_psql('second', 'CREATE EXTENSION dsmapper');
$node->safe_psql('plain', 'CREATE TABLE untouched (id int PRIMARY KEY)');

my $rows = 20000;
foreach my $db ('postgres', 'second')
{
	create_counter_table($node, 't', $rows, db => $db);
	create_counter_mapper($node, 'count_t', 't', db => $db, sleep => 0.01);
}

my $log_offset = log_position($node);

# Launch in both databases back to back, with short turns (5 pages) so that
# workers go back to the queue and a waiting database gets its share.
my $job1 = launch($node, 'count_t', 't',
	'shards => 4, page_size => 250, pages_per_task => 5');
my $job2 = launch($node, 'count_t', 't',
	'shards => 4, page_size => 250, pages_per_task => 5',
	db => 'second');
like($job1, qr/^\d+$/, 'job launched in postgres');
like($job2, qr/^\d+$/, 'job launched in second');

# While they run, workers serve both databases and never the plain one.
my ($saw_postgres, $saw_second, $saw_plain) = (0, 0, 0);
foreach my $i (1 .. 300)
{
	my $dbs = $node->safe_psql('postgres',
		"SELECT string_agg(DISTINCT datname, ',') FROM pg_stat_activity WHERE backend_type = 'dsmapper worker'"
	);
	$saw_postgres = 1 if $dbs =~ /\bpostgres\b/;
	$saw_second   = 1 if $dbs =~ /\bsecond\b/;
	$saw_plain    = 1 if $dbs =~ /\bplain\b/;
	last if $saw_postgres && $saw_second;
	usleep(50_000);
}
ok($saw_postgres, 'a worker served database postgres');
ok($saw_second,   'a worker served database second');

is(wait_job($node, $job1), 'succeeded', 'job in postgres succeeds');
is(wait_job($node, $job2, db => 'second'), 'succeeded', 'job in second succeeds');

is(counter_summary($node, 't'), "$rows|$rows|0|0",
	'postgres: every row mapped exactly once');
is(counter_summary($node, 't', db => 'second'), "$rows|$rows|0|0",
	'second: every row mapped exactly once');

# The two jobs ran at the same time, not one after the other.
my ($s1, $f1) = split /\|/, $node->safe_psql('postgres',
	"SELECT extract(epoch FROM started), extract(epoch FROM finished) FROM dsmapper.job WHERE job_id = $job1");
my ($s2, $f2) = split /\|/, $node->safe_psql('second',
	"SELECT extract(epoch FROM started), extract(epoch FROM finished) FROM dsmapper.job WHERE job_id = $job2");
ok($s1 < $f2 && $s2 < $f1, 'the two jobs overlapped in time');

# The plain database: no worker ever connected, nothing created, no errors.
ok(!$saw_plain, 'no worker connected to the database without the extension');
is($node->safe_psql('plain',
		"SELECT count(*) FROM pg_namespace WHERE nspname = 'dsmapper'"),
	'0', 'no dsmapper schema in the plain database');
is($node->safe_psql('plain', 'SELECT count(*) FROM untouched'),
	'0', 'the plain database still works');

my $log = log_since($node, $log_offset);
unlike($log, qr/(ERROR|FATAL|PANIC).*/, 'no errors in the server log')
  or diag(join("\n", grep { /ERROR|FATAL|PANIC/ } split /\n/, $log));
my @ends = ($log =~ /dsmapper job (\d+) in database "[^"]+" succeeded after/g);
is(join(',', sort @ends), join(',', sort ($job1, $job2)),
	'the end of both jobs is logged');

# Idle workers of busy databases must not keep a third database waiting:
# new work wakes a worker at once, so with every slot held by an idle
# worker of another database the new job still starts within seconds
# (not after dsmapper.worker_idle_timeout, 60 s by default).
ok( poll_until(
		$node,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'dsmapper worker' AND datname IN ('postgres', 'second')",
		'4', 10),
	'all four worker slots are held by the two databases');
$node->safe_psql('postgres', 'CREATE DATABASE third');
$node->safe_psql('third', 'CREATE EXTENSION dsmapper');
create_counter_table($node, 't', 1000, db => 'third');
create_counter_mapper($node, 'count_t', 't', db => 'third');
my $job3 = launch($node, 'count_t', 't', 'shards => 2, page_size => 100',
	db => 'third');
is(wait_job($node, $job3, db => 'third', timeout => '10 s'), 'succeeded',
	'a job in a third database finishes promptly while other databases hold idle workers');
$node->safe_psql('third', "SELECT dsmapper_abort($job3)");

$node->stop;
done_testing();
