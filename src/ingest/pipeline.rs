//! The batch in hand and how it becomes durable: rows to PostgreSQL, rejects to the dead-letter
//! topic, and only then the offsets to Kafka.
//!
//! Writes are pipelined: a full batch is handed to the database on the async runtime and the
//! consumer thread goes on decoding the next one, with up to `max_in_flight` batches being
//! written at once (one pool connection each). Batches complete strictly in the order they were
//! consumed — a batch's offsets are committed only after its own rows *and every earlier
//! batch's* are durable, so a crash can never leave a committed offset ahead of a lost row.
//!
//! The batches live behind mutexes because two callers drive them: the consume loop, and the
//! rebalance callback that must flush before partitions are handed to another replica. Both run
//! on the consumer thread, never at the same time; the mutexes only make that sharing safe.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Headers;
use rdkafka::message::{BorrowedMessage, Message};
use tracing::{debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use crate::ingest::batch::FlushReport;
use crate::ingest::batch::{Batch, Consumed, Outcome, Report};
use crate::ingest::batch_policy::{BatchPolicy, Step};
use crate::ingest::dead_letter::{DeadLetter, DeadLetterSink, Forward};
use crate::ingest::event::{self, RejectReason, Rejection};
use crate::ingest::routing::Rules;
use crate::observe::metrics::Metrics;
use crate::observe::status::Status;
use crate::observe::tracing::parse_traceparent;
use crate::storage::partitions::{self, Admission};
use crate::storage::{EventStore, StorageError, StoredEvent, WriteOutcome};

/// Longest `poll` while writes run: how late a finished batch's offsets may commit.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(2);

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

/// How records are batched, bounded and routed.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// When a batch is written.
    pub policy: BatchPolicy,
    /// Larger records are dead-lettered.
    pub max_event_bytes: usize,
    /// Filtering and routing rules.
    pub rules: Rules,
    /// Batches being written at once (at least 1; each holds a pool connection).
    pub max_in_flight: usize,
    /// Partitioning and retention: which event times are stored
    /// ([`partitions::ingest_window`]).
    pub partitions: partitions::Policy,
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
    /// The batch being filled.
    batch: Mutex<Batch>,
    /// Sealed batches, oldest first, not yet committed.
    in_flight: Mutex<VecDeque<Batch>>,
    max_in_flight: usize,
    partitions: partitions::Policy,
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
        let PipelineOptions { policy, max_event_bytes, rules, max_in_flight, partitions } = options;
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
            in_flight: Mutex::new(VecDeque::new()),
            max_in_flight: max_in_flight.max(1),
            partitions,
        }
    }

    fn batch(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn in_flight(&self) -> MutexGuard<'_, VecDeque<Batch>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
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
        let window = partitions::ingest_window(&self.partitions, chrono::Utc::now());
        let decoded = event::decode(payload, msg.timestamp().to_millis(), self.max_event_bytes)
            .and_then(|event| match window.admit(event.timestamp) {
                Admission::TooFarAhead => Err(Rejection::new(
                    RejectReason::FutureTimestamp,
                    format!(
                        "timestamp {} is beyond the partitions kept ready (until {})",
                        event.timestamp.to_rfc3339(),
                        window.newest.to_rfc3339()
                    ),
                )),
                _ => Ok(event),
            });
        let outcome = match decoded {
            // Past retention: storing it would only have it dropped. Counted (and the batch's
            // log line says how many); its offset commits with the batch.
            Ok(event) if window.admit(event.timestamp) == Admission::Expired => Outcome::Expired,
            Ok(event) => {
                debug!(
                    "Received event: {} from {} (user: {})",
                    event.event_type, event.service, event.user_id
                );
                let decision = self.rules.decide(&event.event_type, &event.service);
                let forward = decision.rule.zip(decision.forward).map(|(rule, topic)| Forward {
                    record: msg.detach(),
                    topic: topic.to_string(),
                    rule: rule.to_string(),
                });
                let row = decision.store.then(|| {
                    let row = StoredEvent {
                        topic: msg.topic().to_string(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                        event,
                    };
                    (row, msg.detach())
                });
                Outcome::Routed { rule: decision.rule.map(str::to_string), row, forward }
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
                Outcome::Rejected(DeadLetter { record: msg.detach(), rejection })
            }
        };
        let link = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
            .and_then(|h| h.value)
            .and_then(parse_traceparent);
        let consumed = Consumed {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
            bytes: payload.len(),
            link,
        };
        self.batch().add(consumed, outcome);
    }

    /// What to do with the batch in hand, given the writes running.
    fn next_step(&self, now: Instant) -> Step {
        let in_flight = self.in_flight().len();
        let b = self.batch();
        self.policy.next_step(
            b.len(),
            b.bytes(),
            b.first_at(),
            now,
            (in_flight, self.max_in_flight),
        )
    }

    /// How long the loop may block in `poll`: not at all when there is work, and briefly
    /// while writes run, so their offsets commit soon after they finish.
    pub fn poll_timeout(&self, now: Instant, idle: Duration) -> Duration {
        let in_flight = self.in_flight().len();
        let b = self.batch();
        let slots = (in_flight, self.max_in_flight);
        match self.policy.next_step(b.len(), b.bytes(), b.first_at(), now, slots) {
            Step::Dispatch | Step::WaitOldest => Duration::ZERO,
            // Not zero even when the batch is due but waits for a write slot: do not spin.
            Step::Fill if in_flight > 0 => IN_FLIGHT_POLL.min(idle),
            Step::Fill => self.policy.poll_timeout(b.first_at(), now, idle),
        }
    }

    /// Events in hand, not yet committed.
    pub fn pending(&self) -> usize {
        self.batch().len() + self.in_flight().iter().map(Batch::len).sum::<usize>()
    }

    /// The consume loop's step: completes, in order, the batches whose writes finished, and
    /// when the batch in hand is due and a write slot is free, seals it and starts its write.
    /// A full batch with no free slot waits for the oldest write. Offsets commit asynchronously.
    ///
    /// Must be called from a thread outside the async runtime (the consumer thread).
    pub fn advance<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        now: Instant,
    ) -> Result<(), FlushError> {
        while self.complete_oldest(consumer, CommitMode::Async, false)?.is_some() {}
        match self.next_step(now) {
            Step::Fill => {}
            Step::Dispatch => self.dispatch(),
            Step::WaitOldest => {
                self.complete_oldest(consumer, CommitMode::Async, true)?;
                self.dispatch();
            }
        }
        Ok(())
    }

    /// Writes and commits everything in hand, in order, waiting for the database: before
    /// partitions are revoked, at shutdown, and to retry after a failure. On error what is
    /// left stays in hand, and calling it again resumes where it stopped.
    ///
    /// Must be called from a thread outside the async runtime (the consumer thread).
    pub fn flush<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        mode: CommitMode,
    ) -> Result<FlushReport, FlushError> {
        self.dispatch();
        let mut total = FlushReport::default();
        while let Some(r) = self.complete_oldest(consumer, mode, true)? {
            total.events += r.events;
            total.inserted += r.inserted;
            total.duplicates += r.duplicates;
            total.dead_lettered += r.dead_lettered;
        }
        Ok(total)
    }

    /// Seals the batch in hand and starts writing its rows on the runtime.
    fn dispatch(&self) {
        let mut batch = std::mem::take(&mut *self.batch());
        if batch.is_empty() {
            return;
        }
        if !batch.rows().is_empty() {
            let store = self.store.clone();
            let rows = batch.rows().clone();
            batch.writing = Some(self.runtime.spawn(async move {
                let started = Instant::now();
                (store.write(&rows).await, started.elapsed())
            }));
        }
        self.in_flight().push_back(batch);
    }

    /// Completes the oldest sealed batch; `None` when there is none, or when `wait` is false
    /// and its write is still running.
    fn complete_oldest<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        mode: CommitMode,
        wait: bool,
    ) -> Result<Option<FlushReport>, FlushError> {
        let mut queue = self.in_flight();
        let Some(batch) = queue.front_mut() else {
            return Ok(None);
        };
        if !wait && batch.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            return Ok(None);
        }
        let report = self.complete(batch, consumer, mode)?;
        queue.pop_front();
        Ok(Some(report))
    }

    /// Takes the result of the batch's write (waiting for it), or writes the rows now when no
    /// write ran or the last one failed. Rows PostgreSQL refused become dead letters.
    fn await_write(&self, batch: &mut Batch) -> Result<(), FlushError> {
        if batch.is_written() {
            return Ok(());
        }
        let (result, took) = match batch.writing.take() {
            Some(writing) => self.runtime.block_on(writing).unwrap_or_else(|e| {
                (Err(StorageError::Unavailable(format!("write task failed: {e}"))), Duration::ZERO)
            }),
            None if batch.rows().is_empty() => (Ok(WriteOutcome::default()), Duration::ZERO),
            None => {
                let started = Instant::now();
                (self.runtime.block_on(self.store.write(batch.rows())), started.elapsed())
            }
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                self.metrics.record_error("db_unavailable");
                return Err(e.into());
            }
        };
        if !batch.rows().is_empty() {
            self.metrics.record_db_write(took.as_secs_f64());
        }
        batch.set_written(outcome);
        Ok(())
    }

    /// Makes a sealed batch durable: rows, then routed copies and dead letters, then offsets.
    fn complete<C: ConsumerContext>(
        &self,
        batch: &mut Batch,
        consumer: &BaseConsumer<C>,
        mode: CommitMode,
    ) -> Result<FlushReport, FlushError> {
        let span = Self::batch_span(batch);
        let _entered = span.enter();
        self.await_write(batch)?;
        self.send_forwards(batch)?;
        self.send_dead_letters(batch)?;
        self.commit(consumer, &batch.commit_list(), mode);
        let report = batch.report();
        self.record(&report, &batch.partitions(), &span);
        if tracing::enabled!(tracing::Level::DEBUG) {
            for row in batch.stored_rows() {
                debug!("Processed event: {} (user: {})", row.event.event_type, row.event.user_id);
            }
        }
        let flushed = report.flush;
        *batch = Batch::default();
        Ok(flushed)
    }

    /// One span per batch (not per event); it links to the producers' traces.
    fn batch_span(batch: &mut Batch) -> tracing::Span {
        let span = info_span!(
            "batch",
            events = batch.len(),
            partitions = %batch.partitions(),
            inserted = tracing::field::Empty,
            duplicates = tracing::field::Empty,
            dead_lettered = tracing::field::Empty,
        );
        for link in batch.take_links() {
            span.add_link(link);
        }
        span
    }

    /// Delivers the routed copies; the undelivered stay in the batch for the retry.
    fn send_forwards(&self, batch: &mut Batch) -> Result<(), FlushError> {
        if batch.forwards.is_empty() {
            return Ok(());
        }
        let forwards = std::mem::take(&mut batch.forwards);
        let (failed, error) = self.runtime.block_on(self.dead_letters.forward_all(forwards));
        if !failed.is_empty() {
            batch.forwards = failed;
            self.metrics.record_error("forward_failed");
            let error = error.map(|e| e.to_string()).unwrap_or_else(|| "unknown".into());
            return Err(FlushError::Forward(error));
        }
        Ok(())
    }

    /// Delivers the dead letters; the undelivered stay in the batch for the retry.
    fn send_dead_letters(&self, batch: &mut Batch) -> Result<(), FlushError> {
        if batch.dead.is_empty() {
            return Ok(());
        }
        let letters = std::mem::take(&mut batch.dead);
        let sent = self.runtime.block_on(self.dead_letters.send_all(letters));
        batch.dead_lettered.extend(sent.delivered);
        if !sent.failed.is_empty() {
            batch.dead = sent.failed;
            self.metrics.record_error("dead_letter_failed");
            let error = sent.error.map(|e| e.to_string()).unwrap_or_else(|| "unknown".into());
            return Err(FlushError::DeadLetter(error));
        }
        Ok(())
    }

    /// Commits the batch's offsets. The rows are durable; an offset that did not commit only
    /// means a harmless redelivery (skipped by the unique key). A later commit supersedes it.
    fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: &TopicPartitionList,
        mode: CommitMode,
    ) {
        if let Err(e) = consumer.commit(offsets, mode) {
            self.metrics.record_error("commit_failed");
            warn!(error = %e, "offset commit failed; records may be redelivered and skipped");
        }
    }

    /// Metrics, span fields and the "batch committed" line of a durable batch.
    fn record(&self, report: &Report<'_>, partitions: &str, span: &tracing::Span) {
        let flush = &report.flush;
        span.record("inserted", flush.inserted);
        span.record("duplicates", flush.duplicates);
        span.record("dead_lettered", flush.dead_lettered);
        self.metrics.record_processed(&report.per_type);
        for reason in report.dead_lettered {
            self.metrics.record_dead_letter(*reason);
        }
        self.metrics.record_routing(report.rule_hits, report.skipped);
        if report.expired > 0 {
            self.metrics.record_expired(report.expired);
            warn!(
                expired = report.expired,
                "events older than RETENTION_DAYS skipped, not stored (counted in analytics_events_expired_total)"
            );
        }
        let seconds = report.first_at.unwrap_or_else(Instant::now).elapsed().as_secs_f64();
        self.metrics.record_batch(flush.events, flush.inserted, flush.duplicates, seconds);
        info!(
            events = flush.events,
            inserted = flush.inserted,
            duplicates = flush.duplicates,
            dead_lettered = flush.dead_lettered,
            skipped = report.skipped,
            expired = report.expired,
            statements = report.statements,
            partitions,
            duration_ms = (seconds * 1000.0) as u64,
            "batch committed"
        );
    }

    /// Drops what the batches in hand hold for partitions we no longer own and could not
    /// flush: uncommitted, they will be consumed again by their new owner. What belongs to
    /// partitions we keep stays.
    pub fn discard(&self, revoked: &TopicPartitionList) {
        let gone: Vec<(String, i32)> =
            revoked.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        let owned =
            |topic: &str, partition: i32| !gone.iter().any(|(t, p)| t == topic && *p == partition);
        let mut queue = self.in_flight();
        for batch in queue.iter_mut() {
            // Let running writes end first, so rows and their outcome stay consistent; a
            // failed one is simply written again later.
            if batch.writing.is_some() {
                let _ = self.await_write(batch);
            }
            batch.retain(&owned);
        }
        queue.retain(|b| !b.is_empty());
        self.batch().retain(&owned);
    }
}
