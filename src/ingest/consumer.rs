//! The consumer group member and the consume loop with back-pressure. Its librdkafka callbacks
//! (rebalances, statistics and lag) are in [`rebalance`](super::rebalance).
//!
//! The loop runs on a dedicated OS thread with a `BaseConsumer`, because librdkafka runs
//! rebalance callbacks on the thread that polls, and the callback must flush the batch in hand
//! (a blocking database write) before partitions move. Offsets are committed explicitly, only
//! after the batch's transaction committed (`enable.auto.commit=false`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{KafkaSettings, ObserveSettings};
use crate::ingest::batch_policy::Backoff;
use crate::ingest::pipeline::{FlushError, Pipeline};
use crate::ingest::rebalance::PipelineContext;
use crate::kafka::client_config;

/// Longest the loop blocks in `poll` when idle, which bounds how quickly it notices shutdown.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Per-partition budget of a watermark query while paused.
const WATERMARK_TIMEOUT: Duration = Duration::from_millis(500);
/// A consume error that repeats (a stuck partition errors on every fetch retry) is logged at
/// most this often, with the number of repeats.
const CONSUME_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits a repeating log line: counts occurrences and says when the next line is due.
#[derive(Debug)]
struct LogEvery {
    every: Duration,
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl LogEvery {
    fn new(every: Duration) -> Self {
        Self { every, unlogged: 0, logged_at: None }
    }

    /// Counts one occurrence at `now`; `Some(repeats)` when a line is due (the first one, then
    /// at most one per `every`), and the count starts again.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self.logged_at.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// The `reason` label of `analytics_consume_errors_total`: the librdkafka error code in
/// snake_case (`not_implemented`, `bad_compression`, `unknown_topic_or_partition`, ...), a
/// bounded set. Pure.
pub fn consume_error_reason(error: &KafkaError) -> String {
    let code = match error {
        KafkaError::MessageConsumption(code) | KafkaError::MessageConsumptionFatal(code) => code,
        _ => return "other".into(),
    };
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        }
    }
    out
}

/// True for errors about reaching one broker (a broker restarting, a leader moving), not about
/// records: librdkafka reconnects and fetches from the new leader by itself, so these neither
/// count as consume errors nor turn the `consume` component down — one dead node of three must
/// not make every pod unready. `AllBrokersDown` is not one of them: with no broker at all the
/// pod is not ready. Pure.
pub fn is_connectivity_error(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        error,
        KafkaError::MessageConsumption(code) | KafkaError::MessageConsumptionFatal(code)
            if matches!(
                code,
                C::BrokerTransportFailure
                    | C::NotLeaderForPartition
                    | C::LeaderNotAvailable
                    | C::NotCoordinator
                    | C::CoordinatorNotAvailable
                    | C::RequestTimedOut
                    | C::OperationTimedOut
                    | C::NetworkException
            )
    )
}

/// True when the client reports that no broker at all is reachable. Pure.
pub fn is_all_brokers_down(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)
            | KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::AllBrokersDown)
    )
}

/// `max.partition.fetch.bytes`: a partition's share of one fetch. A larger record still
/// arrives whole (the broker returns at least the first batch of a partition).
const MAX_PARTITION_FETCH_BYTES: u32 = 256 * 1024;

/// `fetch.max.bytes` for a prefetch bound of `fetch_buffer_kbytes` KiB: that bound, but never
/// below 1 MiB, because librdkafka refuses a value below `message.max.bytes` (1,000,000 by
/// default). Pure.
pub fn fetch_max_bytes(fetch_buffer_kbytes: u32) -> u64 {
    (u64::from(fetch_buffer_kbytes) * 1024).max(1024 * 1024)
}

/// A consumer group member wired to a pipeline.
pub type PipelineConsumer = BaseConsumer<PipelineContext>;

/// Creates the consumer and subscribes it to the configured topics.
pub fn create_consumer(
    kafka: &KafkaSettings,
    observe: &ObserveSettings,
    pipeline: Arc<Pipeline>,
) -> Result<PipelineConsumer, KafkaError> {
    let session_timeout_ms = kafka.session_timeout.as_millis();
    let mut config = client_config(kafka);
    config
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // librdkafka's default, stated because the delivery contract depends on it: records
        // of aborted transactions are never returned, and the consumer does not read past
        // the last stable offset (an open transaction). Validation refuses any other value.
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (session_timeout_ms / 3).max(100).to_string())
        .set("statistics.interval.ms", "1000")
        .set("queued.max.messages.kbytes", kafka.fetch_buffer_kbytes.to_string())
        // One fetch response no larger than the prefetch bound, and a small share of it per
        // partition: with librdkafka's defaults (50 MiB per response, 1 MiB per partition)
        // the buffers in flight, not the queue, set the peak RSS while draining a backlog.
        .set("fetch.max.bytes", fetch_max_bytes(kafka.fetch_buffer_kbytes).to_string())
        .set("max.partition.fetch.bytes", MAX_PARTITION_FETCH_BYTES.to_string())
        // Incremental rebalancing: when a replica joins or leaves (HPA), only the partitions
        // that move stop; the others keep consuming.
        .set("partition.assignment.strategy", "cooperative-sticky");
    // Pass-through properties win, so operators can override any of the above.
    for (key, value) in &kafka.properties {
        config.set(key, value.expose_secret());
    }
    let context = PipelineContext::new(pipeline, kafka.lag_refresh, observe.group_unsteady_limit);
    let consumer: PipelineConsumer = config.create_with_context(context)?;
    let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Lists the watermarks (log start, high) of every assigned partition while paused: nothing is
/// fetched, so statistics would not see new records, nor the log start of a partition paused
/// before its first fetch. Gives up at the first failure, so an unreachable broker costs one
/// short timeout per refresh.
fn refresh_listed_watermarks(consumer: &PipelineConsumer) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let mut listed = HashMap::new();
    for e in assignment.elements() {
        match consumer.fetch_watermarks(e.topic(), e.partition(), WATERMARK_TIMEOUT) {
            Ok(watermarks) => {
                listed.insert((e.topic().to_string(), e.partition()), watermarks);
            }
            Err(_) => break,
        }
    }
    let context = consumer.context();
    let mut held = context.listed.lock().unwrap_or_else(|e| e.into_inner());
    held.extend(listed);
}

fn set_paused(consumer: &PipelineConsumer, paused: bool) {
    let result = consumer
        .assignment()
        .and_then(|tpl| if paused { consumer.pause(&tpl) } else { consumer.resume(&tpl) });
    if let Err(e) = result {
        warn!(error = %e, paused, "cannot change fetch state");
    }
    consumer.context().status().set_paused(paused);
}

/// Runs the consume loop until `shutdown` is cancelled, then drains: stop fetching, flush,
/// commit. Leaving the group happens when the consumer is dropped.
pub fn consume(consumer: &PipelineConsumer, shutdown: &CancellationToken, drain_budget: Duration) {
    let pipeline = &consumer.context().pipeline;
    let status = pipeline.status().clone();
    let mut backoff = Backoff::default();
    // Some while paused: when to try the failed batch again.
    let mut retry_at: Option<Instant> = None;
    // While paused: when the high watermarks were last listed.
    let mut watermarks_at: Option<Instant> = None;
    let lag_refresh = consumer.context().lag_refresh;
    // Errors the client returned instead of records, logged at most every 10 s.
    let mut consume_error_log = LogEvery::new(CONSUME_ERROR_LOG_EVERY);
    while !shutdown.is_cancelled() {
        status.beat();
        if retry_at.is_some() && watermarks_at.is_none_or(|t| t.elapsed() >= lag_refresh) {
            refresh_listed_watermarks(consumer);
            watermarks_at = Some(Instant::now());
        }
        let now = Instant::now();
        let timeout = match retry_at {
            Some(at) => at.saturating_duration_since(now).min(IDLE_POLL),
            None => pipeline.poll_timeout(now, IDLE_POLL),
        };
        match consumer.poll(timeout) {
            Some(Ok(message)) => pipeline.push(&message),
            Some(Err(e)) if is_connectivity_error(&e) => {
                pipeline.metrics().record_error("kafka_error");
                debug!(error = %e, "broker connectivity error while fetching; librdkafka retries");
            }
            Some(Err(e)) if is_all_brokers_down(&e) => {
                // No broker at all: Kafka is down, not the partition; librdkafka reconnects
                // by itself.
                pipeline.metrics().record_error("kafka_error");
                status.set_kafka(false, "all brokers down");
                if let Some(repeats) = consume_error_log.hit(Instant::now()) {
                    warn!(
                        error = %e,
                        repeats,
                        "no broker reachable; the client reconnects by itself and fetching \
                         resumes where it stopped"
                    );
                }
            }
            Some(Err(e)) => {
                // A record or batch the client cannot hand us (a codec it lacks, a corrupt
                // batch, a missing topic). librdkafka retries the fetch at the same offset, so
                // the partition does not move until the cause is fixed: count it by reason,
                // turn the `consume` readiness component down, and log it (rate-limited).
                pipeline.metrics().record_error("kafka_error");
                let reason = consume_error_reason(&e);
                pipeline.metrics().record_consume_error(&reason);
                status.record_consume_error(e.to_string());
                if let Some(repeats) = consume_error_log.hit(Instant::now()) {
                    error!(
                        error = %e,
                        reason,
                        repeats,
                        "consume error: the client returned an error instead of a record; the \
                         partition does not advance until its cause is fixed (see README, Metrics)"
                    );
                }
            }
            None => {}
        }
        let now = Instant::now();
        let result = match retry_at {
            Some(at) if now < at => continue,
            // Paused after a failure: write everything in hand before fetching again.
            Some(_) => pipeline.flush(consumer, CommitMode::Async).map(|_| ()),
            None => pipeline.advance(consumer, now),
        };
        match result {
            Ok(()) => {
                if retry_at.take().is_some() {
                    status.set_write_error(None);
                    status.set_dead_letter(true, "delivered");
                    status.set_forwarding(true, "delivered");
                    set_paused(consumer, false);
                    // The listed watermarks stay: until fetch responses pass them they are the
                    // freshest, and forgetting them would show a lag of 0 for a moment.
                    watermarks_at = None;
                    info!("writes succeed again; fetching resumed");
                    backoff.reset();
                }
            }
            Err(e) => {
                // Blame the component that failed: the database only for storage errors.
                match &e {
                    FlushError::Storage(_) => status.set_write_error(Some(e.to_string())),
                    FlushError::DeadLetter(_) => status.set_dead_letter(false, e.to_string()),
                    FlushError::Forward(_) => status.set_forwarding(false, e.to_string()),
                }
                if retry_at.is_none() {
                    set_paused(consumer, true);
                    warn!(
                        pending = pipeline.pending(),
                        "writes failing; fetching paused until they succeed"
                    );
                }
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "batch not stored; will retry");
                retry_at = Some(now + delay);
            }
        }
    }

    info!(pending = pipeline.pending(), "shutting down: flushing the batch in hand");
    set_paused(consumer, true);
    let deadline = Instant::now() + drain_budget;
    loop {
        status.beat();
        match pipeline.flush(consumer, CommitMode::Sync) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                warn!(error = %e, "final flush failed; retrying");
                // Keep serving callbacks while waiting (paused: no new records arrive).
                let _ = consumer.poll(backoff.next_delay());
            }
            Err(e) => {
                error!(
                    error = %e,
                    pending = pipeline.pending(),
                    "giving up on the final flush; uncommitted records will be redelivered"
                );
                break;
            }
        }
    }
    pipeline.dead_letters().flush(Duration::from_secs(5));
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn a_fetch_is_at_most_the_prefetch_bound_but_never_below_librdkafkas_floor() {
        assert_eq!(fetch_max_bytes(4096), 4 * 1024 * 1024);
        assert_eq!(fetch_max_bytes(64), 1024 * 1024);
        assert!(u64::from(MAX_PARTITION_FETCH_BYTES) <= fetch_max_bytes(1));
    }

    #[test]
    fn broker_connectivity_is_not_a_consume_error() {
        use rdkafka::types::RDKafkaErrorCode as C;
        for code in [C::BrokerTransportFailure, C::NotLeaderForPartition] {
            assert!(is_connectivity_error(&KafkaError::MessageConsumption(code)), "{code:?}");
        }
        for code in [C::AllBrokersDown, C::NotImplemented, C::BadCompression] {
            assert!(!is_connectivity_error(&KafkaError::MessageConsumption(code)), "{code:?}");
        }
    }

    #[test]
    fn a_repeating_line_is_logged_first_then_at_most_once_per_interval_with_its_repeats() {
        let t0 = Instant::now();
        let mut log = LogEvery::new(Duration::from_secs(10));
        assert_eq!(log.hit(t0), Some(1));
        assert_eq!(log.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(log.hit(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn all_brokers_down_is_told_apart_from_a_stuck_partition() {
        use rdkafka::types::RDKafkaErrorCode as C;
        assert!(is_all_brokers_down(&KafkaError::MessageConsumption(C::AllBrokersDown)));
        for code in [C::BrokerTransportFailure, C::UnknownTopicOrPartition] {
            assert!(!is_all_brokers_down(&KafkaError::MessageConsumption(code)), "{code:?}");
        }
    }

    #[test]
    fn consume_error_reasons_are_snake_case_error_codes() {
        let e = KafkaError::MessageConsumption(RDKafkaErrorCode::NotImplemented);
        assert_eq!(consume_error_reason(&e), "not_implemented");
        let e = KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert_eq!(consume_error_reason(&e), "unknown_topic_or_partition");
        let e = KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::BadCompression);
        assert_eq!(consume_error_reason(&e), "bad_compression");
        assert_eq!(consume_error_reason(&KafkaError::Canceled), "other");
    }
}
