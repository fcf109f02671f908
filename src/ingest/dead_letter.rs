//! The dead-letter topic: records that cannot be stored, with why and where they came from.
//!
//! Each dead letter keeps the original key, value and headers and adds `dlq.*` headers
//! (reason, error, source topic/partition/offset/timestamp, consumer group), so it can be
//! inspected, fixed and replayed. Delivery is acknowledged (acks=all, idempotent producer)
//! before the source offset is committed; a record the broker refuses as too large is sent
//! again with its value cut to [`TRUNCATED_VALUE_BYTES`], so one huge record cannot stall a
//! partition forever (the original stays in the source topic at the recorded coordinates).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::ingest::event::{RejectReason, Rejection};

/// Value bytes kept when the full record is too large for the dead-letter topic.
pub const TRUNCATED_VALUE_BYTES: usize = 64 * 1024;

/// A record on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The source record, as consumed.
    pub record: OwnedMessage,
    /// Why it was not stored.
    pub rejection: Rejection,
}

/// A record a routing rule copies to another topic.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The source record, as consumed.
    pub record: OwnedMessage,
    /// Destination topic.
    pub topic: String,
    /// The rule that matched.
    pub rule: String,
}

/// The result of [`DeadLetterSink::send_all`].
#[derive(Debug, Default)]
pub struct SendOutcome {
    /// Reasons of the letters the broker acknowledged.
    pub delivered: Vec<RejectReason>,
    /// Letters to retry.
    pub failed: Vec<DeadLetter>,
    /// The last delivery error, if any.
    pub error: Option<KafkaError>,
}

/// Produces dead letters (and routing copies) and waits for their acknowledgement. One
/// idempotent producer per process serves both.
pub struct DeadLetterSink {
    producer: FutureProducer,
    topic: String,
    group_id: String,
}

impl DeadLetterSink {
    /// Creates the producer from the shared client settings (brokers, security).
    pub fn new(mut config: ClientConfig, topic: &str, group_id: &str) -> Result<Self, KafkaError> {
        let producer = config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { producer, topic: topic.to_string(), group_id: group_id.to_string() })
    }

    /// Sends every letter. Delivered ones are reported by reason; undelivered ones are handed
    /// back for a retry, so a partial failure does not duplicate the delivered ones.
    pub async fn send_all(&self, letters: Vec<DeadLetter>) -> SendOutcome {
        let mut pending = Vec::with_capacity(letters.len());
        let mut out = SendOutcome::default();
        for letter in letters {
            let enqueued = match self.enqueue(&letter, false) {
                Err(e) if is_too_large(&e) => self.enqueue(&letter, true),
                other => other,
            };
            match enqueued {
                Ok(future) => pending.push((letter, future)),
                Err(e) => {
                    out.error = Some(e);
                    out.failed.push(letter);
                }
            }
        }
        for (letter, future) in pending {
            let result = match future.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) if is_too_large(&e) => self.send_truncated(&letter).await,
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            };
            match result {
                Ok(()) => out.delivered.push(letter.rejection.reason),
                Err(e) => {
                    out.error = Some(e);
                    out.failed.push(letter);
                }
            }
        }
        out
    }

    async fn send_truncated(&self, letter: &DeadLetter) -> Result<(), KafkaError> {
        match self.enqueue(letter, true)?.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    fn enqueue(
        &self,
        letter: &DeadLetter,
        truncate: bool,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let record = &letter.record;
        let original_size = record.payload().map_or(0, <[u8]>::len).to_string();
        let mut extra = vec![
            ("dlq.reason", letter.rejection.reason.as_str().to_string()),
            ("dlq.error", letter.rejection.detail.clone()),
            ("dlq.source.topic", record.topic().to_string()),
            ("dlq.source.partition", record.partition().to_string()),
            ("dlq.source.offset", record.offset().to_string()),
            (
                "dlq.source.timestamp",
                record.timestamp().to_millis().map(|t| t.to_string()).unwrap_or_default(),
            ),
            ("dlq.consumer.group", self.group_id.clone()),
        ];
        if truncate {
            extra.push(("dlq.value.truncated.from", original_size));
        }
        self.copy(record, &self.topic, &extra, truncate)
    }

    /// Enqueues a copy of `record` (key, value, headers) to `topic` with `extra` headers.
    fn copy(
        &self,
        record: &OwnedMessage,
        topic: &str,
        extra: &[(&str, String)],
        truncate: bool,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = record.headers() {
            for h in original.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        for (key, value) in extra {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        // A null value (tombstone) stays null.
        if let Some(value) = record.payload() {
            out = out.payload(if truncate {
                &value[..value.len().min(TRUNCATED_VALUE_BYTES)]
            } else {
                value
            });
        }
        if let Some(key) = record.key() {
            out = out.key(key);
        }
        self.producer.send_result(out).map_err(|(e, _)| e)
    }

    /// Forwards copies of records to the topics routing rules name, waiting for every
    /// acknowledgement; returns the ones to retry. A forwarded copy carries the header
    /// `routed.rule` and its source coordinates.
    pub async fn forward_all(&self, forwards: Vec<Forward>) -> (Vec<Forward>, Option<KafkaError>) {
        let mut pending = Vec::with_capacity(forwards.len());
        let mut failed = Vec::new();
        let mut error = None;
        for f in forwards {
            let extra = [
                ("routed.rule", f.rule.clone()),
                ("routed.source.topic", f.record.topic().to_string()),
                ("routed.source.partition", f.record.partition().to_string()),
                ("routed.source.offset", f.record.offset().to_string()),
            ];
            match self.copy(&f.record, &f.topic, &extra, false) {
                Ok(future) => pending.push((f, future)),
                Err(e) => {
                    error = Some(e);
                    failed.push(f);
                }
            }
        }
        for (f, future) in pending {
            match future.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    error = Some(e);
                    failed.push(f);
                }
                Err(_) => {
                    error = Some(KafkaError::Canceled);
                    failed.push(f);
                }
            }
        }
        (failed, error)
    }

    /// Waits for in-flight deliveries (shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        let _ = self.producer.flush(timeout);
    }
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessageSize)
    )
}
