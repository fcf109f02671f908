//! Partition maintenance and retention on a real PostgreSQL.

mod common;

use chrono::{DateTime, Utc};
use common::*;
use nexus_analytics::config::PartitionInterval;
use nexus_analytics::maintenance::{self, ADVISORY_LOCK_KEY, Policy};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
}

fn run(db: &TestDb, policy: Policy, now: &str) -> maintenance::Report {
    let (url, now) = (db.url.clone(), at(now));
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(
        async move {
            let pool = sqlx::PgPool::connect(&url).await.expect("pool");
            maintenance::run_once(&pool, &policy, now).await.expect("maintenance")
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
                maintenance::run_once(&pool, &policy, Utc::now()).await.expect("maintenance")
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
