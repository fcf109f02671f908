//! `nexus-analytics produce`: realistic user events for demos, tests and benchmarks.
//!
//! Events follow Nexus Core's envelope; user ids are stable per simulated user and used as the
//! record key (so one user's events stay ordered in one partition, as the real producers do).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use serde_json::json;

/// What to produce.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Events to send; 0 means until interrupted.
    pub count: u64,
    /// Events per second; 0 means as fast as possible.
    pub rate: u64,
    /// Destination topic.
    pub topic: String,
    /// Share of deliberately malformed records, in percent (shows the dead-letter path).
    pub invalid_percent: u8,
    /// Distinct simulated users.
    pub users: u32,
    /// RNG seed, for reproducible runs.
    pub seed: u64,
}

/// What was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceReport {
    /// Records acknowledged by the broker.
    pub delivered: u64,
    /// Records the broker did not acknowledge.
    pub failed: u64,
    /// Wall time.
    pub elapsed: Duration,
}

#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
}

/// The producer's context: counts acknowledgements.
struct DeliveryCounter(Arc<Deliveries>);

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, m)) => {
                tracing::warn!(error = %e, topic = m.topic(), "delivery failed");
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// (event type, publishing service, relative weight). Logins and views dominate, as in life.
const CATALOGUE: &[(&str, &str, u32)] = &[
    ("user.registered", "auth-service", 5),
    ("user.login", "auth-service", 30),
    ("user.logout", "auth-service", 20),
    ("user.profile_updated", "user-service", 8),
    ("user.profile_viewed", "user-service", 20),
    ("user.search_performed", "user-service", 12),
    ("user.deactivated", "user-service", 1),
    ("user.activated", "user-service", 1),
    // Types the service has never heard of: stored all the same.
    ("user.password_reset", "auth-service", 2),
    ("user.avatar_uploaded", "user-service", 1),
];

/// Builds one event payload and its key.
pub fn make_event(rng: &mut SmallRng, users: u32, invalid_percent: u8) -> (String, Vec<u8>) {
    let total: u32 = CATALOGUE.iter().map(|c| c.2).sum();
    let mut pick = rng.random_range(0..total);
    let (event_type, service, _) = CATALOGUE
        .iter()
        .find(|c| {
            if pick < c.2 {
                true
            } else {
                pick -= c.2;
                false
            }
        })
        .copied()
        .unwrap_or(CATALOGUE[0]);
    let user = rng.random_range(0..users.max(1));
    let user_id = format!("00000000-0000-4000-8000-{user:012x}");
    let now = Utc::now();
    let data = match event_type {
        "user.registered" => json!({"email": format!("user{user}@example.com"), "plan": "free"}),
        "user.login" => {
            json!({"ip": format!("10.0.{}.{}", user % 250, rng.random_range(1..250)), "method": "password"})
        }
        "user.search_performed" => {
            let query = ["alice", "bob", "admin", "rust"][rng.random_range(0..4)];
            json!({"query": query, "results": rng.random_range(0..50)})
        }
        "user.profile_updated" => json!({"fields": ["display_name", "bio"]}),
        "user.profile_viewed" => {
            json!({"viewer_id": format!("00000000-0000-4000-8000-{:012x}", rng.random_range(0..users.max(1)))})
        }
        _ => json!({}),
    };
    let mut payload = json!({
        "event_type": event_type,
        "user_id": user_id,
        "service": service,
        "timestamp": now.to_rfc3339_opts(SecondsFormat::Micros, true),
        "data": data,
    })
    .to_string();
    if invalid_percent > 0 && rng.random_range(0..100u8) < invalid_percent {
        payload = match rng.random_range(0..3) {
            0 => payload[..payload.len() / 2].to_string(),
            1 => json!({"event_type": event_type, "service": service}).to_string(),
            _ => json!({"event_type": event_type, "user_id": user_id, "service": service, "timestamp": "not a time"}).to_string(),
        };
    }
    (user_id, payload.into_bytes())
}

/// Produces events until `count` is reached or `stop` is set.
pub fn produce(
    config: ClientConfig,
    options: &ProduceOptions,
    stop: &AtomicBool,
) -> Result<ProduceReport, KafkaError> {
    let deliveries = Arc::new(Deliveries::default());
    let producer: ThreadedProducer<DeliveryCounter> = config
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "200000")
        .create_with_context(DeliveryCounter(deliveries.clone()))?;
    let mut rng = SmallRng::seed_from_u64(options.seed);
    let started = Instant::now();
    let mut sent: u64 = 0;
    while (options.count == 0 || sent < options.count) && !stop.load(Ordering::Relaxed) {
        if options.rate > 0 {
            // Pace against the schedule, not per message, so the average rate is exact.
            let due = Duration::from_secs_f64(sent as f64 / options.rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
                continue;
            }
        }
        let (key, payload) = make_event(&mut rng, options.users, options.invalid_percent);
        let mut record = BaseRecord::to(&options.topic).key(key.as_bytes()).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(ProduceReport {
        delivered: deliveries.delivered.load(Ordering::Relaxed),
        failed: deliveries.failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event;

    #[test]
    fn generated_events_decode_and_cover_every_known_type() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            let (_, payload) = make_event(&mut rng, 100, 0);
            let e = event::decode(&payload, None, 1 << 20).expect("valid");
            seen.insert(e.event_type);
        }
        for t in event::KNOWN_EVENT_TYPES {
            assert!(seen.contains(*t), "{t} never generated");
        }
        assert!(seen.len() > event::KNOWN_EVENT_TYPES.len(), "no unknown types generated");
    }

    #[test]
    fn invalid_share_is_respected() {
        let mut rng = SmallRng::seed_from_u64(1);
        let bad = (0..2000)
            .filter(|_| event::decode(&make_event(&mut rng, 10, 20).1, None, 1 << 20).is_err())
            .count();
        assert!((300..500).contains(&bad), "{bad} of 2000 invalid");
    }
}
