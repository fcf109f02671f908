//! The batch in hand and how it becomes durable: rows to PostgreSQL, rejects to the dead-letter
//! topic, and only then the offsets to Kafka.
//!
//! The batch lives behind a mutex because two callers flush it: the consume loop, and the
//! rebalance callback that must flush before partitions are handed to another replica. Both run
//! on the consumer thread, never at the same time; the mutex only makes that sharing safe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Headers;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batch::{BatchPolicy, OffsetTracker};
use crate::dead_letter::{DeadLetter, DeadLetterSink, Forward};
use crate::event::{self, RejectReason, Rejection};
use crate::health::Status;
use crate::routing::Rules;
use crate::storage::{EventStore, StorageError, StoredEvent, WriteOutcome};
use crate::telemetry::{Metrics, parse_traceparent};

/// Links per batch span; enough to follow a sample of producers without bloating spans.
const MAX_SPAN_LINKS: usize = 32;

/// Why a flush did not complete; the batch is kept and the flush can be retried.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// PostgreSQL is unavailable.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Dead letters could not be delivered.
    #[error("dead-letter delivery failed: {0}")]
    DeadLetter(String),
    /// Routing copies could not be delivered.
    #[error("forwarding failed: {0}")]
    Forward(String),
}

#[derive(Default)]
struct Batch {
    rows: Vec<StoredEvent>,
    /// The consumed record behind each row, for dead-lettering rows PostgreSQL refuses.
    sources: Vec<rdkafka::message::OwnedMessage>,
    dead: Vec<DeadLetter>,
    offsets: OffsetTracker,
    bytes: usize,
    first_at: Option<Instant>,
    /// Set once the rows are durable, so a retry after a dead-letter failure skips the insert.
    written: Option<WriteOutcome>,
    dead_lettered: Vec<RejectReason>,
    /// Records consumed into this batch (stored, skipped, forwarded or dead-lettered).
    offsets_seen: usize,
    /// Producers' trace contexts (W3C `traceparent` headers) the batch span links to.
    links: Vec<SpanContext>,
    /// Copies routing rules send elsewhere (before the offsets commit).
    forwards: Vec<Forward>,
    /// Events routing rules decided on, per rule; and how many were skipped.
    rule_hits: HashMap<String, u64>,
    skipped: u64,
}

impl Batch {
    fn len(&self) -> usize {
        self.offsets_seen
    }

    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
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

/// How records are batched, bounded and routed.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// When a batch is written.
    pub policy: BatchPolicy,
    /// Larger records are dead-lettered.
    pub max_event_bytes: usize,
    /// Filtering and routing rules.
    pub rules: Rules,
}

/// Turns consumed records into durable rows and committed offsets.
pub struct Pipeline {
    store: EventStore,
    dead_letters: DeadLetterSink,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    policy: BatchPolicy,
    max_event_bytes: usize,
    rules: Rules,
    runtime: tokio::runtime::Handle,
    batch: Mutex<Batch>,
}

impl Pipeline {
    /// `runtime` runs the async database and producer calls from the consumer thread.
    pub fn new(
        store: EventStore,
        dead_letters: DeadLetterSink,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        options: PipelineOptions,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let PipelineOptions { policy, max_event_bytes, rules } = options;
        Self {
            store,
            dead_letters,
            metrics,
            status,
            policy,
            max_event_bytes,
            rules,
            runtime,
            batch: Mutex::new(Batch::default()),
        }
    }

    fn batch(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared runtime status.
    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The dead-letter sink (flushed at shutdown).
    pub fn dead_letters(&self) -> &DeadLetterSink {
        &self.dead_letters
    }

    /// Adds a consumed record to the batch, decoded, or marked for the dead-letter topic.
    pub fn push(&self, msg: &BorrowedMessage<'_>) {
        let payload = msg.payload().unwrap_or_default();
        let decoded = event::decode(payload, msg.timestamp().to_millis(), self.max_event_bytes);
        let mut batch = self.batch();
        match decoded {
            Ok(event) => {
                debug!(
                    "Received event: {} from {} (user: {})",
                    event.event_type, event.service, event.user_id
                );
                let decision = self.rules.decide(&event.event_type, &event.service);
                if let Some(rule) = decision.rule {
                    *batch.rule_hits.entry(rule.to_string()).or_default() += 1;
                    if let Some(topic) = decision.forward {
                        let forward = Forward {
                            record: msg.detach(),
                            topic: topic.to_string(),
                            rule: rule.to_string(),
                        };
                        batch.forwards.push(forward);
                    }
                }
                if decision.store {
                    batch.rows.push(StoredEvent {
                        topic: msg.topic().to_string(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                        event,
                    });
                    batch.sources.push(msg.detach());
                } else if decision.forward.is_none() {
                    batch.skipped += 1;
                }
            }
            Err(rejection) => {
                warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    reason = rejection.reason.as_str(),
                    error = %rejection.detail,
                    "record rejected, sending to the dead-letter topic"
                );
                batch.dead.push(DeadLetter { record: msg.detach(), rejection });
            }
        }
        if batch.links.len() < MAX_SPAN_LINKS
            && let Some(cx) = msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
                .and_then(|h| h.value)
                .and_then(parse_traceparent)
        {
            batch.links.push(cx);
        }
        batch.offsets.observe(msg.topic(), msg.partition(), msg.offset());
        batch.bytes += payload.len();
        batch.offsets_seen += 1;
        batch.first_at.get_or_insert_with(Instant::now);
    }

    /// True when the batch must be written now.
    pub fn is_due(&self, now: Instant) -> bool {
        let b = self.batch();
        self.policy.is_due(b.len(), b.bytes, b.first_at, now)
    }

    /// How long the loop may block in `poll`.
    pub fn poll_timeout(&self, now: Instant, idle: Duration) -> Duration {
        let b = self.batch();
        if self.policy.is_full(b.len(), b.bytes) {
            return Duration::ZERO;
        }
        self.policy.poll_timeout(b.first_at, now, idle)
    }

    /// Events in hand, not yet committed.
    pub fn pending(&self) -> usize {
        self.batch().len()
    }

    /// Writes the batch, dead-letters what cannot be stored, then commits the offsets.
    ///
    /// Must be called from a thread outside the async runtime (the consumer thread).
    pub fn flush<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        mode: CommitMode,
    ) -> Result<FlushReport, FlushError> {
        let mut batch = self.batch();
        if batch.is_empty() {
            return Ok(FlushReport::default());
        }
        let first_at = batch.first_at.unwrap_or_else(Instant::now);
        // One span per batch (not per event); it links to the producers' traces.
        let span = info_span!(
            "batch",
            events = batch.len(),
            partitions = %batch.offsets.partitions().join(","),
            inserted = tracing::field::Empty,
            duplicates = tracing::field::Empty,
            dead_lettered = tracing::field::Empty,
        );
        for link in std::mem::take(&mut batch.links) {
            span.add_link(link);
        }
        let _entered = span.enter();

        if batch.written.is_none() {
            let started = Instant::now();
            let write = async {
                if batch.rows.is_empty() {
                    Ok(WriteOutcome::default())
                } else {
                    self.store.write(&batch.rows).await
                }
            };
            let outcome = match self.runtime.block_on(write) {
                Ok(outcome) => outcome,
                Err(e) => {
                    self.metrics.record_error("db_unavailable");
                    return Err(e.into());
                }
            };
            self.metrics.record_db_write(started.elapsed().as_secs_f64());
            for (index, message) in &outcome.rejected {
                let row = &batch.rows[*index];
                warn!(
                    topic = %row.topic,
                    partition = row.partition,
                    offset = row.offset,
                    error = %message,
                    "PostgreSQL rejected the record, sending to the dead-letter topic"
                );
                let letter = DeadLetter {
                    record: batch.sources[*index].clone(),
                    rejection: Rejection {
                        reason: RejectReason::DbRejected,
                        detail: message.clone(),
                    },
                };
                batch.dead.push(letter);
            }
            batch.sources = Vec::new();
            batch.written = Some(outcome);
        }

        if !batch.forwards.is_empty() {
            let forwards = std::mem::take(&mut batch.forwards);
            let (failed, error) = self.runtime.block_on(self.dead_letters.forward_all(forwards));
            if !failed.is_empty() {
                batch.forwards = failed;
                self.metrics.record_error("forward_failed");
                let error = error.map(|e| e.to_string()).unwrap_or_else(|| "unknown".into());
                return Err(FlushError::Forward(error));
            }
        }

        if !batch.dead.is_empty() {
            let letters = std::mem::take(&mut batch.dead);
            let sent = self.runtime.block_on(self.dead_letters.send_all(letters));
            batch.dead_lettered.extend(sent.delivered);
            if !sent.failed.is_empty() {
                batch.dead = sent.failed;
                self.metrics.record_error("dead_letter_failed");
                let error = sent.error.map(|e| e.to_string()).unwrap_or_else(|| "unknown".into());
                return Err(FlushError::DeadLetter(error));
            }
        }

        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in batch.offsets.commits() {
            if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(next)) {
                warn!(error = %e, topic, partition, "cannot build offset commit");
            }
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            // The rows are durable; an offset that did not commit only means a harmless
            // redelivery (skipped by the unique key). A later commit supersedes it.
            self.metrics.record_error("commit_failed");
            warn!(error = %e, "offset commit failed; records may be redelivered and skipped");
        }

        let outcome = batch.written.take().unwrap_or_default();
        let report = FlushReport {
            events: batch.len(),
            inserted: outcome.inserted,
            duplicates: outcome.duplicates,
            dead_lettered: batch.dead_lettered.len(),
        };
        span.record("inserted", report.inserted);
        span.record("duplicates", report.duplicates);
        span.record("dead_lettered", report.dead_lettered);
        let mut per_type: HashMap<(String, String), u64> = HashMap::new();
        let rejected: std::collections::HashSet<usize> =
            outcome.rejected.iter().map(|(i, _)| *i).collect();
        let log_each = tracing::enabled!(tracing::Level::DEBUG);
        for (i, row) in batch.rows.iter().enumerate() {
            if rejected.contains(&i) {
                continue;
            }
            *per_type
                .entry((row.event.event_type.clone(), row.event.service.clone()))
                .or_default() += 1;
            if log_each {
                debug!("Processed event: {} (user: {})", row.event.event_type, row.event.user_id);
            }
        }
        self.metrics.record_processed(&per_type);
        for reason in &batch.dead_lettered {
            self.metrics.record_dead_letter(*reason);
        }
        self.metrics.record_routing(&batch.rule_hits, batch.skipped);
        let seconds = first_at.elapsed().as_secs_f64();
        self.metrics.record_batch(report.events, report.inserted, report.duplicates, seconds);
        info!(
            events = report.events,
            inserted = report.inserted,
            duplicates = report.duplicates,
            dead_lettered = report.dead_lettered,
            skipped = batch.skipped,
            statements = outcome.statements,
            partitions = %batch.offsets.partitions().join(","),
            duration_ms = (seconds * 1000.0) as u64,
            "batch committed"
        );
        *batch = Batch::default();
        Ok(report)
    }

    /// Drops what the batch holds for partitions we no longer own and could not flush:
    /// uncommitted, they will be consumed again by their new owner. What belongs to partitions
    /// we keep stays in the batch.
    pub fn discard(&self, revoked: &TopicPartitionList) {
        let gone: Vec<(String, i32)> =
            revoked.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        let owned =
            |topic: &str, partition: i32| !gone.iter().any(|(t, p)| t == topic && *p == partition);
        let mut batch = self.batch();
        if batch.written.is_none() {
            // Rows not yet durable: drop those of revoked partitions. (Once written, rows stay:
            // they are stored, and the outcome's indexes refer to them.)
            let keep: Vec<bool> = batch.rows.iter().map(|r| owned(&r.topic, r.partition)).collect();
            let mut kept = keep.iter();
            batch.rows.retain(|_| kept.next().copied().unwrap_or(false));
            let mut kept = keep.iter();
            batch.sources.retain(|_| kept.next().copied().unwrap_or(false));
        }
        // Partitions we keep (cooperative rebalancing revokes only some) keep everything
        // pending; their position has moved past these records, so dropping them would lose them.
        batch.dead.retain(|l| owned(l.record.topic(), l.record.partition()));
        batch.forwards.retain(|f| owned(f.record.topic(), f.record.partition()));
        batch.offsets.retain(owned);
        batch.offsets_seen = batch.rows.len() + batch.dead.len() + batch.forwards.len();
        if batch.offsets.is_empty() {
            *batch = Batch::default();
        }
    }
}
