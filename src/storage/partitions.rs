//! Partition maintenance for `analytics.events`: create partitions ahead of time, create the
//! partitions of past (or later) periods whose rows wait in `events_default` and move them
//! there, drop whole partitions past retention, and delete the few rows past retention that
//! still wait in the default partition. One replica at a time, guarded by a transaction-scoped
//! advisory lock.
//!
//! What reaches the table at all is bounded at ingest by [`ingest_window`]: events older than
//! the retention horizon are skipped (and counted), events further ahead than the partitions
//! kept ready are dead-lettered. So the default partition only ever holds rows for periods
//! whose partition is still to be created, and the next run empties it.
//!
//! Planning is pure ([`plan`], [`ingest_window`]); [`run_once`] reads the catalogue, applies
//! the plan in one transaction and reports what it did.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use sqlx::{PgPool, Row};

use crate::config::PartitionInterval;

/// Advisory lock key shared by every replica ("nexus-analytics maintenance").
pub const ADVISORY_LOCK_KEY: i64 = 0x6e65_7875_735f_6d74;

/// Partitions created per run for periods whose rows wait in the default partition; the rest
/// follow in the next runs (soon after), so one run's transaction stays bounded.
pub const MAX_WAITING_PERIODS_PER_RUN: usize = 32;

/// Rows past retention deleted from the default partition per statement.
const EXPIRED_DELETE_BATCH: i64 = 10_000;

/// Events are accepted at least this far ahead of now, whatever the partition window.
const MIN_FUTURE_TOLERANCE: chrono::Duration = chrono::Duration::days(1);

/// What maintenance keeps true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Width of a partition.
    pub interval: PartitionInterval,
    /// Partitions kept ready after the current one.
    pub ahead: u32,
    /// Drop partitions whose whole range is older than this many days.
    pub retention_days: Option<u32>,
}

/// A bounded partition of `analytics.events`. `from == None` means MINVALUE (the legacy table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Table name in schema `analytics`.
    pub name: String,
    /// Inclusive lower bound.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound (`None`: MAXVALUE).
    pub to: Option<DateTime<Utc>>,
}

/// What to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions to create (rows waiting in the default partition move into them).
    pub create: Vec<Partition>,
    /// Partitions to drop.
    pub drop: Vec<String>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// False when another replica held the lock and nothing was done.
    pub ran: bool,
    /// Partitions created.
    pub created: Vec<String>,
    /// Partitions dropped.
    pub dropped: Vec<String>,
    /// Rows moved out of the default partition into new partitions.
    pub moved_rows: u64,
    /// Rows past retention deleted from the default partition.
    pub expired_rows: u64,
    /// Periods with rows in the default partition left for the next run.
    pub waiting_periods_left: usize,
}

/// The event times the service stores, decided when a record is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestWindow {
    /// Older events are past retention: counted and skipped, never stored.
    pub oldest: Option<DateTime<Utc>>,
    /// Later events are dead-lettered (`future_timestamp`).
    pub newest: DateTime<Utc>,
}

/// Where an event time falls relative to an [`IngestWindow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Stored.
    Store,
    /// Older than the retention horizon.
    Expired,
    /// Further ahead than the partitions kept ready.
    TooFarAhead,
}

impl IngestWindow {
    /// Where `t` falls.
    pub fn admit(&self, t: DateTime<Utc>) -> Admission {
        if self.oldest.is_some_and(|o| t < o) {
            Admission::Expired
        } else if t >= self.newest {
            Admission::TooFarAhead
        } else {
            Admission::Store
        }
    }
}

/// The window of event times stored at `now`: from the retention horizon (`now` minus
/// `RETENTION_DAYS`, none without retention) to the end of the last partition kept ready ahead
/// (`PARTITIONS_AHEAD` periods after the current one), but at least a day ahead of `now`.
pub fn ingest_window(policy: &Policy, now: DateTime<Utc>) -> IngestWindow {
    let oldest = policy.retention_days.map(|d| now - chrono::Duration::days(i64::from(d)));
    let mut end = next_period(policy.interval, period_start(policy.interval, now));
    for _ in 0..policy.ahead {
        end = next_period(policy.interval, end);
    }
    IngestWindow { oldest, newest: end.max(now + MIN_FUTURE_TOLERANCE) }
}

/// A maintenance failure.
#[derive(Debug, thiserror::Error)]
#[error("partition maintenance failed: {0}")]
pub struct MaintenanceError(String);

impl From<sqlx::Error> for MaintenanceError {
    fn from(e: sqlx::Error) -> Self {
        Self(crate::storage::describe_error(&e))
    }
}

/// Start of the period containing `t`.
pub fn period_start(interval: PartitionInterval, t: DateTime<Utc>) -> DateTime<Utc> {
    let date = t.date_naive();
    let first = match interval {
        PartitionInterval::Day => date,
        PartitionInterval::Month => {
            NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date)
        }
    };
    Utc.from_utc_datetime(&first.and_time(chrono::NaiveTime::MIN))
}

/// Start of the period after the one starting at `start`.
pub fn next_period(interval: PartitionInterval, start: DateTime<Utc>) -> DateTime<Utc> {
    match interval {
        PartitionInterval::Day => start.checked_add_days(Days::new(1)),
        PartitionInterval::Month => start.checked_add_months(Months::new(1)),
    }
    .unwrap_or(start)
}

fn previous_period(interval: PartitionInterval, start: DateTime<Utc>) -> DateTime<Utc> {
    match interval {
        PartitionInterval::Day => start.checked_sub_days(Days::new(1)),
        PartitionInterval::Month => start.checked_sub_months(Months::new(1)),
    }
    .unwrap_or(start)
}

/// The table name of the partition starting at `start`: `events_p20261126` or `events_p202611`.
pub fn partition_name(interval: PartitionInterval, start: DateTime<Utc>) -> String {
    match interval {
        PartitionInterval::Day => format!("events_p{}", start.format("%Y%m%d")),
        PartitionInterval::Month => format!("events_p{}", start.format("%Y%m")),
    }
}

/// Partitions to create (the previous period, the current one and `ahead` more, plus the
/// periods starting at `waiting` — rows in the default partition — where no partition covers
/// them yet and they are not entirely past retention) and to drop (ranges entirely older than
/// the retention cutoff). At most [`MAX_WAITING_PERIODS_PER_RUN`] waiting periods, oldest first.
pub fn plan(
    policy: &Policy,
    now: DateTime<Utc>,
    existing: &[Partition],
    waiting: &[DateTime<Utc>],
) -> Plan {
    let overlaps = |from: DateTime<Utc>, to: DateTime<Utc>| {
        existing.iter().any(|p| p.from.is_none_or(|f| f < to) && p.to.is_none_or(|t| t > from))
    };
    let mut out = Plan::default();
    let mut start = previous_period(policy.interval, period_start(policy.interval, now));
    for _ in 0..policy.ahead + 2 {
        let end = next_period(policy.interval, start);
        if !overlaps(start, end) {
            out.create.push(Partition {
                name: partition_name(policy.interval, start),
                from: Some(start),
                to: Some(end),
            });
        }
        start = end;
    }
    let cutoff = policy.retention_days.map(|d| now - chrono::Duration::days(i64::from(d)));
    let mut waiting: Vec<DateTime<Utc>> =
        waiting.iter().map(|t| period_start(policy.interval, *t)).collect();
    waiting.sort();
    waiting.dedup();
    let mut taken = 0;
    for start in waiting {
        let end = next_period(policy.interval, start);
        let planned = out.create.iter().any(|p| p.from == Some(start));
        let expired = cutoff.is_some_and(|c| end <= c);
        if planned || expired || overlaps(start, end) {
            continue;
        }
        if taken == MAX_WAITING_PERIODS_PER_RUN {
            break;
        }
        taken += 1;
        out.create.push(Partition {
            name: partition_name(policy.interval, start),
            from: Some(start),
            to: Some(end),
        });
    }
    if let Some(cutoff) = cutoff {
        out.drop = existing
            .iter()
            .filter(|p| p.to.is_some_and(|to| to <= cutoff))
            .map(|p| p.name.clone())
            .collect();
    }
    out
}

/// One end of a partition range; `None` is MINVALUE or MAXVALUE.
pub type Bound = Option<DateTime<Utc>>;

/// Parses PostgreSQL's partition bound expression (session time zone UTC), e.g.
/// `FOR VALUES FROM ('2026-11-26 00:00:00+00') TO ('2026-11-27 00:00:00+00')`.
/// Returns `None` for `DEFAULT` and anything unrecognised.
pub fn parse_bound(expr: &str) -> Option<(Bound, Bound)> {
    let rest = expr.trim().strip_prefix("FOR VALUES FROM (")?;
    let (from, rest) = rest.split_once(") TO (")?;
    let to = rest.strip_suffix(')')?;
    let value = |v: &str| -> Option<Bound> {
        match v.trim() {
            "MINVALUE" | "MAXVALUE" => Some(None),
            quoted => {
                let text = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
                DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%#z")
                    .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
                    .ok()
                    .map(|d| Some(d.with_timezone(&Utc)))
            }
        }
    };
    Some((value(from)?, value(to)?))
}

/// Runs maintenance once, unless another replica is already doing it.
pub async fn run_once(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<Report, MaintenanceError> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(ADVISORY_LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(Report::default());
    }
    // Bounds print in UTC; DDL waits at most this long for writers instead of stalling them.
    sqlx::query("SET LOCAL TimeZone = 'UTC'").execute(&mut *tx).await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
    let rows = sqlx::query(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'analytics.events'::regclass",
    )
    .fetch_all(&mut *tx)
    .await?;
    let existing: Vec<Partition> = rows
        .iter()
        .filter_map(|r| {
            let name: String = r.try_get(0).ok()?;
            let bound: String = r.try_get(1).ok()?;
            let (from, to) = parse_bound(&bound)?;
            Some(Partition { name, from, to })
        })
        .collect();
    let mut report = Report { ran: true, ..Report::default() };
    // Rows past retention that wait in the default partition: deleted in bounded statements
    // (retention at ingest keeps new ones out; these come from before it or from a clock jump).
    if let Some(days) = policy.retention_days {
        let cutoff = now - chrono::Duration::days(i64::from(days));
        loop {
            let deleted = sqlx::query(
                "DELETE FROM analytics.events_default WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM analytics.events_default WHERE \"timestamp\" < $1 LIMIT $2))",
            )
            .bind(cutoff)
            .bind(EXPIRED_DELETE_BATCH)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            report.expired_rows += deleted;
            if deleted < EXPIRED_DELETE_BATCH as u64 {
                break;
            }
        }
    }
    let unit = match policy.interval {
        PartitionInterval::Day => "day",
        PartitionInterval::Month => "month",
    };
    let waiting: Vec<DateTime<Utc>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT date_trunc('{unit}', \"timestamp\", 'UTC') FROM analytics.events_default"
    )))
    .fetch_all(&mut *tx)
    .await?;
    let plan = plan(policy, now, &existing, &waiting);
    let created_waiting =
        plan.create.iter().filter(|p| waiting.contains(&p.from.unwrap_or(now))).count();
    report.waiting_periods_left = waiting.len().saturating_sub(created_waiting);
    for p in &plan.create {
        let (Some(from), Some(to)) = (p.from, p.to) else { continue };
        let table = format!("analytics.{}", p.name);
        // Names come from `partition_name` (digits only); bounds are bound as parameters
        // where PostgreSQL allows it and formatted as UTC literals where it does not.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (LIKE analytics.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS); \
             LOCK TABLE analytics.events_default IN ACCESS EXCLUSIVE MODE"
        )))
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH moved AS (DELETE FROM analytics.events_default \
             WHERE \"timestamp\" >= $1 AND \"timestamp\" < $2 RETURNING *) \
             INSERT INTO {table} SELECT * FROM moved"
        )))
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await?;
        report.moved_rows += moved.rows_affected();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE analytics.events ATTACH PARTITION {table} FOR VALUES FROM ('{}') TO ('{}')",
            from.format("%Y-%m-%d %H:%M:%S+00"),
            to.format("%Y-%m-%d %H:%M:%S+00"),
        )))
        .execute(&mut *tx)
        .await?;
        report.created.push(p.name.clone());
    }
    for name in &plan.drop {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE analytics.\"{name}\"")))
            .execute(&mut *tx)
            .await?;
        report.dropped.push(name.clone());
    }
    tx.commit().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods_and_names() {
        let t = at("2026-11-26T20:15:00Z");
        assert_eq!(period_start(PartitionInterval::Day, t), at("2026-11-26T00:00:00Z"));
        assert_eq!(period_start(PartitionInterval::Month, t), at("2026-11-01T00:00:00Z"));
        assert_eq!(
            next_period(PartitionInterval::Month, at("2026-12-01T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            partition_name(PartitionInterval::Day, at("2026-11-26T00:00:00Z")),
            "events_p20261126"
        );
        assert_eq!(
            partition_name(PartitionInterval::Month, at("2026-11-01T00:00:00Z")),
            "events_p202611"
        );
    }

    #[test]
    fn plans_missing_partitions_only() {
        let policy = Policy { interval: PartitionInterval::Day, ahead: 2, retention_days: None };
        let now = at("2026-11-26T20:15:00Z");
        let fresh = plan(&policy, now, &[], &[]);
        let names: Vec<_> = fresh.create.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["events_p20261125", "events_p20261126", "events_p20261127", "events_p20261128"]
        );
        assert!(fresh.drop.is_empty());
        let existing = vec![
            Partition {
                name: "events_legacy".into(),
                from: None,
                to: Some(at("2026-11-26T00:00:00Z")),
            },
            Partition {
                name: "events_p20261126".into(),
                from: Some(at("2026-11-26T00:00:00Z")),
                to: Some(at("2026-11-27T00:00:00Z")),
            },
        ];
        let names: Vec<_> =
            plan(&policy, now, &existing, &[]).create.into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["events_p20261127", "events_p20261128"], "legacy covers the 25th");
    }

    #[test]
    fn retention_drops_whole_partitions_past_the_cutoff() {
        let policy =
            Policy { interval: PartitionInterval::Day, ahead: 0, retention_days: Some(30) };
        let now = at("2026-11-26T12:00:00Z");
        let day = |d: &str, e: &str| Partition {
            name: format!("events_p{}", d.replace('-', "")),
            from: Some(at(&format!("{d}T00:00:00Z"))),
            to: Some(at(&format!("{e}T00:00:00Z"))),
        };
        let existing = vec![
            Partition {
                name: "events_legacy".into(),
                from: None,
                to: Some(at("2026-09-01T00:00:00Z")),
            },
            day("2026-10-26", "2026-10-27"),
            day("2026-10-27", "2026-10-28"),
        ];
        assert_eq!(plan(&policy, now, &existing, &[]).drop, ["events_legacy", "events_p20261026"]);
    }

    #[test]
    fn periods_holding_waiting_rows_get_partitions_unless_past_retention() {
        let policy =
            Policy { interval: PartitionInterval::Day, ahead: 1, retention_days: Some(30) };
        let now = at("2026-11-26T12:00:00Z");
        let waiting = [
            at("2026-10-12T00:00:00Z"), // 45 days old: past retention, its rows are deleted
            at("2026-11-24T00:00:00Z"), // 2 days old
            at("2026-11-24T00:00:00Z"),
            at("2026-11-26T00:00:00Z"), // today: planned anyway
            at("2027-12-31T00:00:00Z"), // far ahead (left over from before ingest checks)
        ];
        let names: Vec<_> =
            plan(&policy, now, &[], &waiting).create.into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "events_p20261125",
                "events_p20261126",
                "events_p20261127",
                "events_p20261124",
                "events_p20271231"
            ]
        );
        let many: Vec<_> =
            (0..100).map(|d| at("2025-01-01T00:00:00Z") + chrono::Duration::days(d)).collect();
        let keep_all = Policy { retention_days: None, ..policy };
        let planned = plan(&keep_all, now, &[], &many).create.len();
        assert_eq!(planned, 3 + MAX_WAITING_PERIODS_PER_RUN, "bounded per run");
    }

    #[test]
    fn the_ingest_window_runs_from_the_retention_horizon_to_the_last_ready_partition() {
        let now = at("2026-11-26T20:00:00Z");
        let policy =
            Policy { interval: PartitionInterval::Day, ahead: 7, retention_days: Some(30) };
        let w = ingest_window(&policy, now);
        assert_eq!(w.oldest, Some(at("2026-10-27T20:00:00Z")));
        assert_eq!(w.newest, at("2026-12-04T00:00:00Z"));
        assert_eq!(w.admit(at("2026-10-12T00:00:00Z")), Admission::Expired);
        assert_eq!(w.admit(at("2026-11-24T00:00:00Z")), Admission::Store);
        assert_eq!(w.admit(at("2026-12-03T23:59:59Z")), Admission::Store);
        assert_eq!(w.admit(at("2026-12-04T00:00:00Z")), Admission::TooFarAhead);
        let keep = Policy { ahead: 0, retention_days: None, ..policy };
        let w = ingest_window(&keep, now);
        assert_eq!(w.admit(at("1999-01-01T00:00:00Z")), Admission::Store, "no retention");
        assert_eq!(w.newest, at("2026-11-27T20:00:00Z"), "at least a day ahead");
    }

    #[test]
    fn bounds_parse() {
        assert_eq!(
            parse_bound("FOR VALUES FROM ('2026-11-26 00:00:00+00') TO ('2026-11-27 00:00:00+00')"),
            Some((Some(at("2026-11-26T00:00:00Z")), Some(at("2026-11-27T00:00:00Z"))))
        );
        assert_eq!(
            parse_bound("FOR VALUES FROM (MINVALUE) TO ('2024-11-06 00:00:00+00')"),
            Some((None, Some(at("2024-11-06T00:00:00Z"))))
        );
        assert_eq!(parse_bound("DEFAULT"), None);
    }
}
