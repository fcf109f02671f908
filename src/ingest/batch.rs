//! The batch in hand: what each consumed record became (a row, a routed copy, a dead letter,
//! a skip), the offsets it may commit and what it reports once durable. No I/O: the
//! [`Pipeline`](crate::ingest::pipeline::Pipeline) writes, sends and commits it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanContext;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::ingest::batch_policy::OffsetTracker;
use crate::ingest::dead_letter::{DeadLetter, Forward};
use crate::ingest::event::{RejectReason, Rejection};
use crate::storage::{StorageError, StoredEvent, WriteOutcome};

/// Links per batch span; enough to follow a sample of producers without bloating spans.
const MAX_SPAN_LINKS: usize = 32;

/// A write running on the runtime: its result and how long the database took.
pub(crate) type Writing = tokio::task::JoinHandle<(Result<WriteOutcome, StorageError>, Duration)>;

/// Where a consumed record sits in its partition, and what it weighs.
#[derive(Debug, Clone)]
pub(crate) struct Consumed<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Payload bytes, counted against the batch's byte limit.
    pub bytes: usize,
    /// The producer's trace context (its `traceparent` header), if any.
    pub link: Option<SpanContext>,
}

/// What a consumed record became.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "built and taken apart once per record, never kept")]
pub(crate) enum Outcome {
    /// Older than the retention horizon: counted, not stored; its offset commits.
    Expired,
    /// Refused before storage; goes to the dead-letter topic.
    Rejected(DeadLetter),
    /// Decoded and routed: stored (the row and its source record), copied elsewhere, both,
    /// or skipped when neither.
    Routed {
        rule: Option<String>,
        row: Option<(StoredEvent, OwnedMessage)>,
        forward: Option<Forward>,
    },
}

/// What a successful flush did, for callers that report on it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Records in the batch.
    pub events: usize,
    /// Rows inserted.
    pub inserted: u64,
    /// Rows already present.
    pub duplicates: u64,
    /// Records dead-lettered.
    pub dead_lettered: usize,
}

/// Consumed records not yet committed, and what became of each.
#[derive(Default)]
pub(crate) struct Batch {
    /// Shared with the write task while it runs; only this batch holds it otherwise.
    rows: Arc<Vec<StoredEvent>>,
    /// The consumed record behind each row, for dead-lettering rows PostgreSQL refuses.
    sources: Vec<OwnedMessage>,
    /// Letters not yet delivered (taken while sending, handed back when some fail).
    pub dead: Vec<DeadLetter>,
    /// Copies routing rules send elsewhere, not yet delivered (same hand-over as `dead`).
    pub forwards: Vec<Forward>,
    /// Offsets to commit, and the records consumed per partition: the batch's length.
    offsets: OffsetTracker,
    bytes: usize,
    first_at: Option<Instant>,
    /// The write started when the batch was sealed, until its result is taken.
    pub writing: Option<Writing>,
    /// Set once the rows are durable, so a retry after a dead-letter failure skips the insert.
    written: Option<WriteOutcome>,
    /// Reasons of the letters delivered.
    pub dead_lettered: Vec<RejectReason>,
    /// Producers' trace contexts (W3C `traceparent` headers) the batch span links to.
    links: Vec<SpanContext>,
    /// Events routing rules decided on, per rule; and how many were skipped.
    rule_hits: HashMap<String, u64>,
    skipped: u64,
    /// Events older than the retention horizon: counted, not stored, their offsets committed.
    expired: u64,
}

impl Batch {
    /// Adds a consumed record and what it became.
    pub fn add(&mut self, record: Consumed<'_>, outcome: Outcome) {
        match outcome {
            Outcome::Expired => self.expired += 1,
            Outcome::Rejected(letter) => self.dead.push(letter),
            Outcome::Routed { rule, row, forward } => {
                if let Some(rule) = rule {
                    *self.rule_hits.entry(rule).or_default() += 1;
                }
                let forwarded = forward.is_some();
                self.forwards.extend(forward);
                match row {
                    Some((row, source)) => {
                        // Not shared while filling: no copy.
                        Arc::make_mut(&mut self.rows).push(row);
                        self.sources.push(source);
                    }
                    None if !forwarded => self.skipped += 1,
                    None => {}
                }
            }
        }
        if self.links.len() < MAX_SPAN_LINKS
            && let Some(link) = record.link
        {
            self.links.push(link);
        }
        self.offsets.observe(record.topic, record.partition, record.offset);
        self.bytes += record.bytes;
        self.first_at.get_or_insert_with(Instant::now);
    }

    /// Records consumed into the batch (stored, skipped, forwarded, expired or dead-lettered).
    pub fn len(&self) -> usize {
        self.offsets.records()
    }

    /// True when no record is in hand.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Payload bytes in hand.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the oldest record in hand was added.
    pub fn first_at(&self) -> Option<Instant> {
        self.first_at
    }

    /// The rows to write, shared with the write task.
    pub fn rows(&self) -> &Arc<Vec<StoredEvent>> {
        &self.rows
    }

    /// True once the rows are durable.
    pub fn is_written(&self) -> bool {
        self.written.is_some()
    }

    /// Takes the database's answer: rows PostgreSQL refused become dead letters, and the
    /// rows count as durable.
    pub fn set_written(&mut self, outcome: WriteOutcome) {
        for (index, message) in &outcome.rejected {
            let row = &self.rows[*index];
            warn!(
                topic = %row.topic,
                partition = row.partition,
                offset = row.offset,
                error = %message,
                "PostgreSQL rejected the record, sending to the dead-letter topic"
            );
            let letter = DeadLetter {
                record: self.sources[*index].clone(),
                rejection: Rejection { reason: RejectReason::DbRejected, detail: message.clone() },
            };
            self.dead.push(letter);
        }
        self.sources = Vec::new();
        self.written = Some(outcome);
    }

    /// Keeps only what belongs to partitions still `owned`, after a revocation the batch
    /// could not be flushed before; the rest is consumed again by its new owner.
    pub fn retain(&mut self, owned: &impl Fn(&str, i32) -> bool) {
        if self.written.is_none() {
            // Rows not yet durable: drop those of revoked partitions. (Once written, rows stay:
            // they are stored, and the outcome's indexes refer to them.)
            let keep: Vec<bool> = self.rows.iter().map(|r| owned(&r.topic, r.partition)).collect();
            let mut kept = keep.iter();
            Arc::make_mut(&mut self.rows).retain(|_| kept.next().copied().unwrap_or(false));
            let mut kept = keep.iter();
            self.sources.retain(|_| kept.next().copied().unwrap_or(false));
        }
        // Partitions we keep (cooperative rebalancing revokes only some) keep everything
        // pending; their position has moved past these records, so dropping them would lose them.
        self.dead.retain(|l| owned(l.record.topic(), l.record.partition()));
        self.forwards.retain(|f| owned(f.record.topic(), f.record.partition()));
        self.offsets.retain(owned);
        if self.offsets.is_empty() {
            *self = Batch::default();
        }
    }

    /// The offsets to commit once everything in the batch is durable: one past the highest
    /// offset consumed per partition.
    pub fn commit_list(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in self.offsets.commits() {
            if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(next)) {
                warn!(error = %e, topic, partition, "cannot build offset commit");
            }
        }
        tpl
    }

    /// The partitions in the batch, for log lines and spans.
    pub fn partitions(&self) -> String {
        self.offsets.partitions().join(",")
    }

    /// Takes the producers' trace contexts, for the batch span.
    pub fn take_links(&mut self) -> Vec<SpanContext> {
        std::mem::take(&mut self.links)
    }

    /// What the durable batch did, for metrics and the caller.
    pub fn report(&self) -> Report<'_> {
        let outcome = self.written.clone().unwrap_or_default();
        let rejected: HashSet<usize> = outcome.rejected.iter().map(|(i, _)| *i).collect();
        let mut per_type: HashMap<(String, String), u64> = HashMap::new();
        for (i, row) in self.rows.iter().enumerate() {
            if !rejected.contains(&i) {
                let key = (row.event.event_type.clone(), row.event.service.clone());
                *per_type.entry(key).or_default() += 1;
            }
        }
        Report {
            flush: FlushReport {
                events: self.len(),
                inserted: outcome.inserted,
                duplicates: outcome.duplicates,
                dead_lettered: self.dead_lettered.len(),
            },
            statements: outcome.statements,
            per_type,
            rule_hits: &self.rule_hits,
            skipped: self.skipped,
            expired: self.expired,
            dead_lettered: &self.dead_lettered,
            first_at: self.first_at,
        }
    }

    /// The rows stored (not refused), for per-event debug lines.
    pub fn stored_rows(&self) -> impl Iterator<Item = &StoredEvent> {
        let rejected: HashSet<usize> = self
            .written
            .as_ref()
            .map(|o| o.rejected.iter().map(|(i, _)| *i).collect())
            .unwrap_or_default();
        self.rows.iter().enumerate().filter(move |(i, _)| !rejected.contains(i)).map(|(_, r)| r)
    }
}

/// Everything a durable batch reports: the caller's [`FlushReport`] and what the metrics and
/// the "batch committed" line need.
pub(crate) struct Report<'a> {
    pub flush: FlushReport,
    pub statements: u32,
    /// Rows stored per (event type, service).
    pub per_type: HashMap<(String, String), u64>,
    pub rule_hits: &'a HashMap<String, u64>,
    pub skipped: u64,
    pub expired: u64,
    pub dead_lettered: &'a [RejectReason],
    pub first_at: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;

    use super::*;
    use crate::ingest::event::Event;

    fn record(partition: i32, offset: i64) -> OwnedMessage {
        let payload = Some(b"{}".to_vec());
        OwnedMessage::new(
            payload,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn at(partition: i32, offset: i64) -> Consumed<'static> {
        Consumed { topic: "t", partition, offset, bytes: 2, link: None }
    }

    fn row(partition: i32, offset: i64) -> (StoredEvent, OwnedMessage) {
        let event = Event {
            event_type: "user.login".into(),
            user_id: "u".into(),
            service: "auth-service".into(),
            timestamp: chrono::DateTime::UNIX_EPOCH,
            data: None,
        };
        (StoredEvent { topic: "t".into(), partition, offset, event }, record(partition, offset))
    }

    fn forward(partition: i32, offset: i64) -> Forward {
        Forward { record: record(partition, offset), topic: "copies".into(), rule: "r".into() }
    }

    /// One record counts once, whatever it became, before and after a partial revocation.
    #[test]
    fn length_counts_each_record_once_across_a_partial_revocation() {
        let mut batch = Batch::default();
        let stored_and_forwarded = Outcome::Routed {
            rule: Some("r".into()),
            row: Some(row(0, 0)),
            forward: Some(forward(0, 0)),
        };
        batch.add(at(0, 0), stored_and_forwarded);
        batch.add(at(0, 1), Outcome::Routed { rule: Some("s".into()), row: None, forward: None });
        batch.add(at(0, 2), Outcome::Expired);
        let letter = DeadLetter {
            record: record(0, 3),
            rejection: Rejection { reason: RejectReason::InvalidJson, detail: "x".into() },
        };
        batch.add(at(0, 3), Outcome::Rejected(letter));
        batch.add(at(1, 0), Outcome::Routed { rule: None, row: Some(row(1, 0)), forward: None });
        assert_eq!(batch.len(), 5);

        batch.retain(&|_, partition| partition == 0);
        assert_eq!(batch.len(), 4, "partition 0 still holds four records");
        assert_eq!(batch.report().flush.events, 4);
        let commits: Vec<_> =
            batch.commit_list().elements().iter().map(|e| (e.partition(), e.offset())).collect();
        assert_eq!(commits, vec![(0, Offset::Offset(4))]);

        batch.retain(&|_, _| false);
        assert!(batch.is_empty());
        assert_eq!(batch.len(), 0);
    }
}
