//! Partition maintenance and retention on a real PostgreSQL.

use crate::common::*;
use chrono::{DateTime, Utc};
use nexus_analytics::config::PartitionInterval;
use nexus_analytics::storage::partitions::{self, ADVISORY_LOCK_KEY, Policy};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
}

fn run(db: &TestDb, policy: Policy, now: &str) -> partitions::Report {
    let (url, now) = (db.url.clone(), at(now));
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(
        async move {
            let pool = sqlx::PgPool::connect(&url).await.expect("pool");
            partitions::run_once(&pool, &policy, now).await.expect("maintenance")
        },
    )
}

fn insert_day(db: &TestDb, day: &str, n: i64, offset_base: i64) {
    run_sql(
        &db.url,
        &format!(
            "INSERT INTO analytics.events (event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset) \
             SELECT 'user.login', 'u' || g, 'auth-service', timestamptz '{day} 12:00:00+00' + g * interval '1 second', 't', 0, {offset_base} + g \
             FROM generate_series(1, {n}) g"
        ),
    );
}

fn partition_of(db: &TestDb, day: &str) -> i64 {
    db.scalar(&format!(
        "SELECT count(*) FROM analytics.events WHERE tableoid = 'analytics.events_p{}'::regclass",
        day.replace('-', "")
    ))
}

#[test]
fn creates_partitions_ahead_and_moves_waiting_rows_out_of_the_default() {
    let db = TestDb::create();
    // Rows arrive before any partition exists: they wait in the default partition.
    insert_day(&db, "2026-11-26", 50, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM analytics.events_default"), 50);

    let policy = Policy { interval: PartitionInterval::Day, ahead: 3, retention_days: None };
    let report = run(&db, policy, "2026-11-26T08:00:00Z");
    assert!(report.ran);
    assert_eq!(report.created.len(), 5, "yesterday, today and 3 ahead: {:?}", report.created);
    assert_eq!(report.moved_rows, 50);
    assert_eq!(db.scalar("SELECT count(*) FROM analytics.events_default"), 0);
    assert_eq!(partition_of(&db, "2026-11-26"), 50);
    assert_eq!(db.rows(), 50, "no row lost while moving");

    // Idempotent: nothing more to do the same day.
    let again = run(&db, policy, "2026-11-26T09:00:00Z");
    assert!(again.created.is_empty() && again.dropped.is_empty());
}

#[test]
fn retention_drops_whole_partitions_with_their_rows_and_keeps_counts() {
    let db = TestDb::create();
    let keep = Policy { interval: PartitionInterval::Day, ahead: 1, retention_days: None };
    run(&db, keep, "2026-10-01T00:00:00Z");
    run(&db, keep, "2026-11-26T00:00:00Z");
    insert_day(&db, "2026-10-01", 40, 0);
    insert_day(&db, "2026-11-26", 10, 1000);
    run_sql(
        &db.url,
        "INSERT INTO analytics.event_counts (bucket, event_type, service, count) \
         SELECT date_trunc('minute', \"timestamp\", 'UTC'), event_type, service, count(*) FROM analytics.events GROUP BY 1, 2, 3",
    );
    assert_eq!(partition_of(&db, "2026-10-01"), 40);

    let retain = Policy { retention_days: Some(30), ..keep };
    let report = run(&db, retain, "2026-11-26T12:00:00Z");
    assert!(report.dropped.contains(&"events_p20261001".to_string()), "{:?}", report.dropped);
    assert!(report.dropped.iter().all(|p| p.as_str() < "events_p20261027"), "{:?}", report.dropped);
    assert_eq!(db.rows(), 10, "only the old partition's rows are gone");
    assert_eq!(db.scalar("SELECT count(*) FROM pg_class WHERE relname = 'events_p20261001'"), 0);
    assert_eq!(
        db.scalar("SELECT sum(count)::bigint FROM analytics.event_counts"),
        50,
        "aggregates outlive retention"
    );
    eprintln!("retention run: {report:?}");
}

#[test]
fn only_one_replica_maintains_at_a_time() {
    let db = TestDb::create();
    let url = db.url.clone();
    let policy = Policy { interval: PartitionInterval::Day, ahead: 1, retention_days: None };
    let report =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(
            async move {
                use sqlx::Connection;
                let mut holder = sqlx::PgConnection::connect(&url).await.expect("holder");
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(ADVISORY_LOCK_KEY)
                    .execute(&mut holder)
                    .await
                    .expect("lock");
                let pool = sqlx::PgPool::connect(&url).await.expect("pool");
                partitions::run_once(&pool, &policy, Utc::now()).await.expect("maintenance")
            },
        );
    assert!(!report.ran, "ran while another session held the lock");
    assert!(report.created.is_empty());
}

#[test]
fn redelivered_rows_still_collide_in_a_partitioned_table() {
    let db = TestDb::create();
    run(
        &db,
        Policy { interval: PartitionInterval::Day, ahead: 1, retention_days: None },
        "2026-11-26T00:00:00Z",
    );
    insert_day(&db, "2026-11-26", 5, 0);
    let inserted = db.scalar(
        "WITH i AS (INSERT INTO analytics.events (event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset) \
         SELECT 'user.login', 'u' || g, 'auth-service', timestamptz '2026-11-26 12:00:00+00' + g * interval '1 second', 't', 0, g \
         FROM generate_series(1, 5) g ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM i",
    );
    assert_eq!(inserted, 0);
    assert_eq!(db.rows(), 5);
}

fn default_rows(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM analytics.events_default")
}

fn explain(db: &TestDb, sql: &str) -> String {
    let (url, sql) = (db.url.clone(), format!("EXPLAIN (COSTS OFF) {sql}"));
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(
        async move {
            let pool = sqlx::PgPool::connect(&url).await.expect("pool");
            let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .expect("explain");
            lines.join("\n")
        },
    )
}

/// Late events (45 and 2 days old) and far-future ones land in the default partition; one
/// maintenance run empties it: past retention deleted, the rest moved into partitions of their
/// own periods, and a time-filtered query still reads one partition only.
#[test]
fn late_and_far_future_rows_leave_the_default_partition_and_retention_reaches_them() {
    let db = TestDb::create();
    insert_day(&db, "2026-10-12", 1000, 0); // 45 days before the run: past RETENTION_DAYS=30
    insert_day(&db, "2026-11-24", 50, 10_000); // 2 days before
    insert_day(&db, "2026-11-26", 20, 20_000); // today
    insert_day(&db, "2027-12-31", 5, 30_000); // far ahead
    assert_eq!(default_rows(&db), 1075, "no partition exists yet: all wait in the default");

    let policy = Policy { interval: PartitionInterval::Day, ahead: 2, retention_days: Some(30) };
    let report = run(&db, policy, "2026-11-26T12:00:00Z");
    eprintln!("{report:?}");
    assert_eq!(report.expired_rows, 1000, "rows past retention are deleted from the default");
    assert_eq!(default_rows(&db), 0, "the default partition is empty after one run");
    assert_eq!(db.rows(), 75);
    assert_eq!(partition_of(&db, "2026-11-24"), 50, "2-day-old rows have their own partition");
    assert_eq!(partition_of(&db, "2026-11-26"), 20);
    assert_eq!(partition_of(&db, "2027-12-31"), 5);
    assert_eq!(report.waiting_periods_left, 0);

    let plan = explain(
        &db,
        "SELECT count(*) FROM analytics.events WHERE \"timestamp\" >= '2026-11-24 00:00:00+00' \
         AND \"timestamp\" < '2026-11-25 00:00:00+00'",
    );
    assert!(plan.contains("events_p20261124"), "{plan}");
    assert!(!plan.contains("events_default"), "the default partition is pruned:\n{plan}");
    assert!(!plan.contains("events_p20261126"), "{plan}");

    // Retention later reaches the partition created for the late rows.
    let later = run(&db, policy, "2026-12-25T12:00:00Z");
    assert!(later.dropped.contains(&"events_p20261124".to_string()), "{later:?}");
    assert_eq!(
        db.rows(),
        25,
        "today's (not yet entirely past the cutoff) and the far-future rows remain"
    );
}

/// Without retention, back-filled history gets partitions of its own periods too.
#[test]
fn back_filled_history_without_retention_gets_its_partitions() {
    let db = TestDb::create();
    insert_day(&db, "2026-10-12", 30, 0);
    let policy = Policy { interval: PartitionInterval::Day, ahead: 1, retention_days: None };
    let report = run(&db, policy, "2026-11-26T12:00:00Z");
    assert_eq!(report.expired_rows, 0);
    assert!(report.created.contains(&"events_p20261012".to_string()), "{report:?}");
    assert_eq!(partition_of(&db, "2026-10-12"), 30);
    assert_eq!(default_rows(&db), 0);
}

/// End to end with RETENTION_DAYS=30: events 45 days old are counted and skipped at ingest
/// (their offsets committed), far-future ones are dead-lettered, 2-day-old ones end up in
/// their own daily partition, and nothing waits in the default partition — also after a restart.
#[test]
fn the_service_applies_retention_at_ingest_and_empties_the_default_partition() {
    use std::time::Duration;
    let broker = Broker::start();
    let topic = unique("late");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 1);
    broker.create_topic(&dlq, 1);
    let db = TestDb::create();
    let now = Utc::now();
    let batches = [
        ("old", now - chrono::Duration::days(45), 1000),
        ("late", now - chrono::Duration::days(2), 100),
        ("now", now, 100),
        ("future", now + chrono::Duration::days(400), 10),
    ];
    let mut records = Vec::new();
    for (kind, at, n) in batches {
        for i in 0..n {
            let ts = (at + chrono::Duration::milliseconds(i)).to_rfc3339();
            let value = format!(
                r#"{{"event_type":"user.login","user_id":"{kind}-{i}","service":"auth-service","timestamp":"{ts}"}}"#
            );
            records.push(RawRecord {
                key: None,
                value: Some(value.into_bytes()),
                headers: vec![],
                partition: Some(0),
            });
        }
    }
    produce_raw(&broker.bootstrap(), &topic, &records);
    let env = [("RETENTION_DAYS", "30"), ("MAINTENANCE_INTERVAL", "2s")];
    let mut svc = Service::consuming(&broker.bootstrap(), &topic, &db.url, &env);
    let expired = "analytics_events_expired_total";
    assert!(
        wait_until(Duration::from_secs(60), || svc.metric(expired) == Some(1000.0)
            && db.rows() >= 200),
        "expired {:?}, rows {}\n{}",
        svc.metric(expired),
        db.rows(),
        svc.log_text()
    );
    let letters = read_topic(&broker.bootstrap(), &dlq, 10, Duration::from_secs(30));
    assert_eq!(letters.len(), 10, "far-future events are dead-lettered");
    assert_eq!(svc.metric("analytics_dead_letters_total{reason=\"future_timestamp\"}"), Some(10.0));
    let late_day = (now - chrono::Duration::days(2)).format("%Y-%m-%d").to_string();
    assert!(
        wait_until(Duration::from_secs(30), || default_rows(&db) == 0
            && partition_of(&db, &late_day) == 100),
        "default {} rows, {late_day}: {}\n{}",
        default_rows(&db),
        partition_of(&db, &late_day),
        svc.log_text()
    );
    assert_eq!(db.scalar("SELECT count(*) FROM analytics.events WHERE user_id LIKE 'old-%'"), 0);
    assert_eq!(db.rows(), 200);
    assert_eq!(db.aggregate_mismatches(), 0);

    // A restart redelivers nothing and stores nothing more: every offset was committed.
    svc.restart();
    svc.wait_ready(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(db.rows(), 200);
    assert_eq!(svc.metric(expired), Some(0.0), "no redelivery after the restart");
}
