//! PostgreSQL storage: migrations, the idempotent batch insert, and health pings.
//!
//! A batch is one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING` statement, so it is
//! one transaction and a redelivered record (same topic/partition/offset/timestamp) is skipped,
//! not doubled; the same statement adds the rows it inserted to `analytics.event_counts`. When PostgreSQL rejects a batch because of its data, the batch is split in halves
//! until the offending rows are isolated; the rest is stored.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::event::Event;

/// Embedded migrations from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One statement, one transaction: insert the batch, skip redeliveries, and add exactly the
/// inserted rows to the per-minute counts. Counts are upserted in key order so concurrent
/// replicas lock count rows in the same order and cannot deadlock.
const INSERT_SQL: &str = r#"
WITH inserted AS (
    INSERT INTO analytics.events
        (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
    SELECT t.event_type, t.user_id, t.service, t.ts, t.data::jsonb, t.topic, t.part, t.off
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                $6::text[], $7::int4[], $8::int8[])
         AS t(event_type, user_id, service, ts, data, topic, part, off)
    ON CONFLICT DO NOTHING
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
"#;

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

/// The write side of `analytics.events`.
#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    write_timeout: Duration,
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
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(options.application_name("nexus-analytics"));
        Ok(Self { pool, write_timeout })
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

    /// A round trip within `timeout`, for readiness.
    pub async fn ping(&self, timeout: Duration) -> Result<(), StorageError> {
        match tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StorageError::Unavailable(describe_error(&e))),
            Err(_) => Err(StorageError::Unavailable(format!("no answer within {timeout:?}"))),
        }
    }

    /// Writes a batch idempotently, isolating rows PostgreSQL refuses.
    ///
    /// Returns `Err` only when the database itself is unavailable; then nothing can be said
    /// about which rows landed, and the caller retries the whole batch (duplicates are skipped).
    pub async fn write(&self, rows: &[StoredEvent]) -> Result<WriteOutcome, StorageError> {
        let mut outcome = WriteOutcome::default();
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
        Ok(outcome)
    }

    async fn insert(&self, rows: &[StoredEvent]) -> Result<u64, Failure> {
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
        let query = sqlx::query(INSERT_SQL)
            .bind(event_types)
            .bind(user_ids)
            .bind(services)
            .bind(timestamps)
            .bind(data)
            .bind(topics)
            .bind(partitions)
            .bind(offsets);
        let started = Instant::now();
        match tokio::time::timeout(self.write_timeout, query.fetch_one(&self.pool)).await {
            Ok(Ok(row)) => {
                let inserted: i64 =
                    row.try_get(0).map_err(|e| Failure::Unavailable(describe_error(&e)))?;
                Ok(inserted as u64)
            }
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Unavailable(format!(
                "write did not finish within {:?}",
                started.elapsed()
            ))),
        }
    }
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
            if code.starts_with("22") || code.starts_with("23") || code.starts_with("54") {
                Failure::Rejected(message)
            } else {
                Failure::Unavailable(message)
            }
        }
        sqlx::Error::Encode(err) => Failure::Rejected(err.to_string()),
        other => Failure::Unavailable(describe_error(other)),
    }
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
