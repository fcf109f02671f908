//! PostgreSQL storage: migrations, the idempotent batch insert, and health pings.
//!
//! A batch is one statement, so one transaction: its rows and their per-minute counts in
//! `analytics.event_counts` commit together or not at all. Two statements exist:
//!
//! - The fast path, tried first: a plain `INSERT … SELECT FROM UNNEST(…)` plus the batch's
//!   counts, aggregated here. Without `ON CONFLICT` PostgreSQL skips the speculative insertion
//!   into the unique index; measured on the benchmark's rows it costs the database ~13 µs of CPU
//!   per row against ~16.5 µs for the idempotent statement, and the database is what bounds
//!   throughput (`scripts/bench`). A redelivered record (same topic/partition/offset/timestamp)
//!   makes it fail as a whole on the unique key (nothing of it is kept), and the batch takes the
//!   idempotent path. Redeliveries come in runs (after a restart, a rebalance, a replay), so
//!   after a conflict the following batches go straight to the idempotent path until one meets
//!   no duplicate.
//! - The idempotent path: `INSERT … ON CONFLICT DO NOTHING`; a redelivered record is skipped,
//!   not doubled, and the statement adds exactly the rows it inserted to the counts. When
//!   PostgreSQL rejects a batch because of its data, the batch is split in halves until the
//!   offending rows are isolated; the rest is stored.

pub mod partitions;
pub mod sqlstate;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Row};

use crate::ingest::event::Event;

/// Embedded migrations from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The batch's rows as one `INSERT … SELECT FROM UNNEST` over the eight column arrays $1–$8
/// bound by [`bind_rows`]; both statements below start with it.
macro_rules! insert_batch_rows {
    () => {
        r#"
WITH inserted AS (
    INSERT INTO analytics.events
        (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
    SELECT t.event_type, t.user_id, t.service, t.ts, t.data::jsonb, t.topic, t.part, t.off
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                $6::text[], $7::int4[], $8::int8[])
         AS t(event_type, user_id, service, ts, data, topic, part, off)
"#
    };
}

/// One statement, one transaction: insert the batch, skip redeliveries, and add exactly the
/// inserted rows to the per-minute counts. Counts are upserted in key order so concurrent
/// replicas lock count rows in the same order and cannot deadlock.
const INSERT_SQL: &str = concat!(
    insert_batch_rows!(),
    r#"    ON CONFLICT DO NOTHING
    RETURNING event_type, service, "timestamp"
), counted AS (
    INSERT INTO analytics.event_counts AS c (bucket, event_type, service, count)
    SELECT date_trunc('minute', "timestamp", 'UTC'), event_type, service, count(*)
    FROM inserted
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (bucket, event_type, service) DO UPDATE SET count = c.count + EXCLUDED.count
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted)
"#
);

/// The fast path: insert the whole batch, failing on any already-stored record (SQLSTATE
/// 23505), and add the batch's counts ($9–$12, aggregated by [`Counts::of`]). The counts read
/// `inserted`, so they are upserted after the events as in [`INSERT_SQL`] (same lock order),
/// in key order by the database's collation.
const FAST_INSERT_SQL: &str = concat!(
    insert_batch_rows!(),
    r#"    RETURNING 1
), counted AS (
    INSERT INTO analytics.event_counts AS c (bucket, event_type, service, count)
    SELECT u.bucket, u.event_type, u.service, u.n
    FROM UNNEST($9::timestamptz[], $10::text[], $11::text[], $12::int8[])
         AS u(bucket, event_type, service, n)
    WHERE (SELECT count(*) FROM inserted) > 0
    ORDER BY 1, 2, 3
    ON CONFLICT (bucket, event_type, service) DO UPDATE SET count = c.count + EXCLUDED.count
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted)
"#
);

/// An event with the Kafka coordinates that make its write idempotent.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The decoded event.
    pub event: Event,
}

/// A failure that says nothing about the rows: retry the same batch later.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Connection refused, pool exhausted, timeout, server shutting down, missing table…
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(String),
}

/// What happened to a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows newly inserted.
    pub inserted: u64,
    /// Rows already present (redeliveries), skipped by the unique key.
    pub duplicates: u64,
    /// Indexes into the batch of rows PostgreSQL refused, with its message.
    pub rejected: Vec<(usize, String)>,
    /// Statements executed (1 unless the batch had to be split).
    pub statements: u32,
}

/// A round trip on `pool` within `timeout`, for readiness (the consumer's pool and the API
/// process's read pool alike); the error carries no connection details.
pub async fn ping(pool: &PgPool, timeout: Duration) -> Result<(), StorageError> {
    match tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(StorageError::Unavailable(describe_error(&e))),
        Err(_) => Err(StorageError::Unavailable(format!("no answer within {timeout:?}"))),
    }
}

/// The write side of `analytics.events`.
#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    write_timeout: Duration,
    /// Set when a batch met already-stored records: skip the fast path (it would fail) until
    /// a batch meets none.
    expect_duplicates: Arc<AtomicBool>,
}

impl EventStore {
    /// Creates a lazily-connecting pool, so a database that is down at start-up delays
    /// readiness instead of crashing the process.
    pub fn connect_lazy(
        url: &str,
        pool_size: u32,
        write_timeout: Duration,
    ) -> Result<Self, StorageError> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StorageError::Unavailable(format!("bad DATABASE_URL: {}", describe_error(&e)))
        })?;
        let pool = lazy_pool(options.application_name("nexus-analytics"), pool_size);
        Ok(Self { pool, write_timeout, expect_duplicates: Arc::new(AtomicBool::new(false)) })
    }

    /// The pool, for read paths and tests.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations; safe to run concurrently from several replicas
    /// (sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), StorageError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StorageError::Migration(e.to_string()))
    }

    /// Writes a batch idempotently, isolating rows PostgreSQL refuses.
    ///
    /// Returns `Err` only when the database itself is unavailable; then nothing can be said
    /// about which rows landed, and the caller retries the whole batch (duplicates are skipped).
    pub async fn write(&self, rows: &[StoredEvent]) -> Result<WriteOutcome, StorageError> {
        let mut outcome = WriteOutcome::default();
        if rows.is_empty() {
            return Ok(outcome);
        }
        if !self.expect_duplicates.load(Ordering::Relaxed) {
            outcome.statements += 1;
            match self.insert_new(rows).await {
                Ok(inserted) => {
                    outcome.inserted = inserted;
                    return Ok(outcome);
                }
                Err(FastFailure::Duplicate) => {
                    self.expect_duplicates.store(true, Ordering::Relaxed)
                }
                // Some row is refused: the idempotent path finds which.
                Err(FastFailure::Other(Failure::Rejected(_))) => {}
                Err(FastFailure::Other(Failure::Unavailable(message))) => {
                    return Err(StorageError::Unavailable(message));
                }
            }
        }
        // Ranges still to insert; a rejected range is split in halves until rows are isolated.
        let mut pending = Vec::new();
        pending.push(0..rows.len());
        while let Some(range) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            outcome.statements += 1;
            match self.insert(&rows[range.clone()]).await {
                Ok(inserted) => {
                    outcome.inserted += inserted;
                    outcome.duplicates += range.len() as u64 - inserted;
                }
                Err(Failure::Rejected(message)) if range.len() == 1 => {
                    outcome.rejected.push((range.start, message));
                }
                Err(Failure::Rejected(_)) => {
                    let mid = range.start + range.len() / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                }
                Err(Failure::Unavailable(message)) => {
                    return Err(StorageError::Unavailable(message));
                }
            }
        }
        outcome.rejected.sort_by_key(|(i, _)| *i);
        self.expect_duplicates.store(outcome.duplicates > 0, Ordering::Relaxed);
        Ok(outcome)
    }

    /// The fast path: all rows or none.
    async fn insert_new(&self, rows: &[StoredEvent]) -> Result<u64, FastFailure> {
        let counts = Counts::of(rows);
        let query = bind_rows(sqlx::query(FAST_INSERT_SQL), rows)
            .bind(counts.buckets)
            .bind(counts.event_types)
            .bind(counts.services)
            .bind(counts.counts);
        match self.run(query).await {
            Ok(inserted) => Ok(inserted),
            Err(Failed::Db(e)) => match &e {
                sqlx::Error::Database(db)
                    if db.code().as_deref() == Some(sqlstate::UNIQUE_VIOLATION) =>
                {
                    Err(FastFailure::Duplicate)
                }
                _ => Err(FastFailure::Other(classify(&e))),
            },
            Err(Failed::Other(failure)) => Err(FastFailure::Other(failure)),
        }
    }

    /// Runs a statement returning one count, within the write timeout.
    async fn run(&self, query: Query<'_, Postgres, PgArguments>) -> Result<u64, Failed> {
        let started = Instant::now();
        match tokio::time::timeout(self.write_timeout, query.fetch_one(&self.pool)).await {
            Ok(Ok(row)) => {
                let n: i64 = row
                    .try_get(0)
                    .map_err(|e| Failed::Other(Failure::Unavailable(describe_error(&e))))?;
                Ok(n as u64)
            }
            Ok(Err(e)) => Err(Failed::Db(e)),
            Err(_) => Err(Failed::Other(Failure::Unavailable(format!(
                "write did not finish within {:?}",
                started.elapsed()
            )))),
        }
    }

    /// The idempotent statement.
    async fn insert(&self, rows: &[StoredEvent]) -> Result<u64, Failure> {
        match self.run(bind_rows(sqlx::query(INSERT_SQL), rows)).await {
            Ok(inserted) => Ok(inserted),
            Err(Failed::Db(e)) => Err(classify(&e)),
            Err(Failed::Other(failure)) => Err(failure),
        }
    }
}

/// Binds the rows as the eight column arrays $1–$8 of both insert statements.
fn bind_rows<'q>(
    query: Query<'q, Postgres, PgArguments>,
    rows: &'q [StoredEvent],
) -> Query<'q, Postgres, PgArguments> {
    let n = rows.len();
    let mut event_types = Vec::with_capacity(n);
    let mut user_ids = Vec::with_capacity(n);
    let mut services = Vec::with_capacity(n);
    let mut timestamps: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut data = Vec::with_capacity(n);
    let mut topics = Vec::with_capacity(n);
    let mut partitions = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    for r in rows {
        event_types.push(r.event.event_type.as_str());
        user_ids.push(r.event.user_id.as_str());
        services.push(r.event.service.as_str());
        timestamps.push(r.event.timestamp);
        data.push(r.event.data.as_deref());
        topics.push(r.topic.as_str());
        partitions.push(r.partition);
        offsets.push(r.offset);
    }
    query
        .bind(event_types)
        .bind(user_ids)
        .bind(services)
        .bind(timestamps)
        .bind(data)
        .bind(topics)
        .bind(partitions)
        .bind(offsets)
}

/// Per-minute counts of a batch (UTC minute, type, service), as the arrays $9–$12 of
/// [`FAST_INSERT_SQL`].
#[derive(Debug, Default, PartialEq)]
struct Counts {
    buckets: Vec<DateTime<Utc>>,
    event_types: Vec<String>,
    services: Vec<String>,
    counts: Vec<i64>,
}

impl Counts {
    fn of(rows: &[StoredEvent]) -> Self {
        let mut totals: HashMap<(i64, &str, &str), i64> = HashMap::new();
        for r in rows {
            let minute = r.event.timestamp.timestamp().div_euclid(60) * 60;
            *totals.entry((minute, &r.event.event_type, &r.event.service)).or_default() += 1;
        }
        let mut out = Counts::default();
        for ((minute, event_type, service), n) in totals {
            // The floor of a valid timestamp is valid.
            out.buckets.push(DateTime::from_timestamp(minute, 0).unwrap_or_default());
            out.event_types.push(event_type.to_owned());
            out.services.push(service.to_owned());
            out.counts.push(n);
        }
        out
    }
}

/// Why the fast path did not store the batch.
enum FastFailure {
    /// A row of the batch is already stored.
    Duplicate,
    /// As for the idempotent statement.
    Other(Failure),
}

/// A statement that did not return its count.
enum Failed {
    /// PostgreSQL or the driver reported an error.
    Db(sqlx::Error),
    /// Timeout or unreadable result.
    Other(Failure),
}

enum Failure {
    /// The data is at fault (SQLSTATE classes 22 data exception, 23 integrity, 54 limits).
    Rejected(String),
    /// Anything else: connection, timeout, missing table, shutdown — retry later.
    Unavailable(String),
}

fn classify(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let message = format!("{} (SQLSTATE {code})", db.message());
            if sqlstate::data_at_fault(&code) {
                Failure::Rejected(message)
            } else {
                Failure::Unavailable(message)
            }
        }
        sqlx::Error::Encode(err) => Failure::Rejected(err.to_string()),
        other => Failure::Unavailable(describe_error(other)),
    }
}

/// A pool that connects on first use (start-up never waits for the database) and gives up
/// acquiring a connection after 3 s; the write pool and the query API's read pool.
pub fn lazy_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(options)
}

/// A description of an sqlx error that never includes connection strings; shared by every
/// database path (writes, API, maintenance) so none can leak a password in a message.
pub fn describe_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(_) => "invalid connection configuration".into(),
        sqlx::Error::Database(db) => {
            format!("{} (SQLSTATE {})", db.message(), db.code().unwrap_or_default())
        }
        sqlx::Error::Io(io) => format!("I/O error: {io}"),
        sqlx::Error::Tls(_) => "TLS error".into(),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".into(),
        sqlx::Error::PoolClosed => "pool closed".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(offset: i64, event_type: &str, service: &str, ts: &str) -> StoredEvent {
        StoredEvent {
            topic: "t".into(),
            partition: 0,
            offset,
            event: Event {
                event_type: event_type.into(),
                user_id: "u".into(),
                service: service.into(),
                timestamp: ts.parse().expect("timestamp"),
                data: None,
            },
        }
    }

    fn sorted(c: Counts) -> Vec<(String, String, String, i64)> {
        let mut v: Vec<_> = (0..c.counts.len())
            .map(|i| {
                (
                    c.buckets[i].to_rfc3339(),
                    c.event_types[i].clone(),
                    c.services[i].clone(),
                    c.counts[i],
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn counts_group_by_utc_minute_type_and_service() {
        let rows = [
            row(0, "user.login", "auth", "2024-11-08T12:34:56.999Z"),
            row(1, "user.login", "auth", "2024-11-08T12:34:00Z"),
            row(2, "user.login", "auth", "2024-11-08T12:35:00Z"),
            row(3, "user.logout", "auth", "2024-11-08T14:34:10+02:00"),
            row(4, "user.login", "users", "2024-11-08T12:34:01Z"),
            // Before the epoch the minute is still the floor, as date_trunc has it.
            row(5, "old", "s", "1969-12-31T23:59:30.5Z"),
        ];
        assert_eq!(
            sorted(Counts::of(&rows)),
            vec![
                ("1969-12-31T23:59:00+00:00".into(), "old".into(), "s".into(), 1),
                ("2024-11-08T12:34:00+00:00".into(), "user.login".into(), "auth".into(), 2),
                ("2024-11-08T12:34:00+00:00".into(), "user.login".into(), "users".into(), 1),
                ("2024-11-08T12:34:00+00:00".into(), "user.logout".into(), "auth".into(), 1),
                ("2024-11-08T12:35:00+00:00".into(), "user.login".into(), "auth".into(), 1),
            ]
        );
        assert_eq!(Counts::of(&[]), Counts::default());
    }
}
