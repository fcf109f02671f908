//! Migrations against real databases shaped like the ones they must upgrade.

use crate::common::*;

const GO_TABLE: &str = "CREATE SCHEMA analytics;
    CREATE TABLE analytics.events (id SERIAL PRIMARY KEY, event_type VARCHAR(100) NOT NULL,
        user_id VARCHAR(100) NOT NULL, service VARCHAR(50) NOT NULL, timestamp TIMESTAMP NOT NULL,
        data JSONB, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
    INSERT INTO analytics.events (event_type, user_id, service, timestamp, data)
    SELECT 'user.login', 'u' || g, 'auth-service', timestamp '2024-11-01' + g * interval '1 hour', '{}'
    FROM generate_series(1, 100) g;";

fn empty_database() -> (String, String) {
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = unique("na_migr");
    run_sql(&admin, &format!("CREATE DATABASE {name}"));
    let mut url = url::Url::parse(&admin).expect("url");
    url.set_path(&format!("/{name}"));
    (admin, url.to_string())
}

#[test]
fn the_go_services_table_is_upgraded_in_place_without_losing_rows() {
    let (admin, url) = empty_database();
    run_sql(&url, GO_TABLE);
    migrate(&url);
    assert_eq!(scalar(&url, "SELECT count(*) FROM analytics.events"), 100);
    assert_eq!(
        scalar(&url, "SELECT count(*) FROM analytics.events_legacy"),
        100,
        "kept as a partition"
    );
    assert_eq!(
        scalar(&url, "SELECT sum(count)::bigint FROM analytics.event_counts"),
        100,
        "counts backfilled"
    );
    // UTC wall-clock values kept their meaning.
    assert_eq!(
        scalar(&url, "SELECT extract(epoch FROM min(\"timestamp\"))::bigint FROM analytics.events"),
        1_730_422_800
    );
    // New ids continue after the old ones; new rows land in the right partition.
    let id = scalar(
        &url,
        "INSERT INTO analytics.events (event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset) \
         VALUES ('user.login', 'u', 'auth-service', now(), 't', 0, 0) RETURNING id",
    );
    assert!(id > 100, "id {id}");
    // Migrating again is a no-op.
    migrate(&url);
    assert_eq!(scalar(&url, "SELECT count(*) FROM analytics.events"), 101);
    run_sql(
        &admin,
        &format!("DROP DATABASE {} WITH (FORCE)", url.rsplit('/').next().unwrap_or_default()),
    );
}

#[test]
fn a_reused_offset_with_a_new_timestamp_is_stored_in_the_legacy_partition() {
    let (admin, url) = empty_database();
    // The table as the first migration created it, with one consumed record.
    run_sql(&url, include_str!("../../migrations/20261126000001_create_events.sql"));
    run_sql(
        &url,
        "INSERT INTO analytics.events (event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset) \
         VALUES ('user.login', 'u', 'auth-service', now() - interval '1 minute', 'user-events', 0, 0)",
    );
    migrate(&url);
    // A recreated topic starts again at offset 0: a different event, not a duplicate.
    let inserted = scalar(
        &url,
        "WITH i AS (INSERT INTO analytics.events (event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset) \
         VALUES ('user.logout', 'u', 'auth-service', now(), 'user-events', 0, 0) ON CONFLICT DO NOTHING RETURNING 1) \
         SELECT count(*) FROM i",
    );
    assert_eq!(inserted, 1);
    // The same record again is still a duplicate.
    let again = scalar(
        &url,
        "WITH i AS (INSERT INTO analytics.events (event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset) \
         SELECT event_type, user_id, service, \"timestamp\", kafka_topic, kafka_partition, kafka_offset FROM analytics.events \
         ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM i",
    );
    assert_eq!(again, 0);
    run_sql(
        &admin,
        &format!("DROP DATABASE {} WITH (FORCE)", url.rsplit('/').next().unwrap_or_default()),
    );
}
