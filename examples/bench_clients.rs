//! Two small clients for `scripts/bench` (not part of the service):
//!
//! - `bench_clients drain BROKERS TOPIC N` — the broker's raw consume rate: a librdkafka consumer
//!   (the same client library as the service) assigned every partition from the beginning,
//!   counting records until N arrived. No decoding, no database.
//! - `bench_clients naive BROKERS TOPIC DATABASE_URL N MAX_SECS` — the original design: one
//!   `INSERT` and one commit (autocommit) per event, on one connection, stopping after N events
//!   or MAX_SECS, whichever comes first. It decodes with the service's own decoder, so only the
//!   write strategy differs.
//!
//! - `bench_clients latency BROKERS TOPIC N WARM_SECS` — the broker's own delivery latency: a
//!   consumer (the service's fetch settings) reading the topic while it is produced, reporting
//!   percentiles of (receive time − the event's embedded send time) after a warm-up. What the
//!   service cannot beat: its rows can only be written after this.
//!
//! Each prints one JSON line: {"mode", "records", "elapsed_s", "first_s", "last_s"}, times in
//! seconds since the client started (`first_s`/`last_s`: first and last record handled).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn usage() -> ! {
    eprintln!(
        "usage: bench_clients drain BROKERS TOPIC N\n       bench_clients naive BROKERS TOPIC DATABASE_URL N MAX_SECS\n       bench_clients latency BROKERS TOPIC N WARM_SECS"
    );
    std::process::exit(2)
}

fn assigned_consumer(brokers: &str, topic: &str) -> BaseConsumer {
    let mut config = ClientConfig::new();
    // Pass-through properties as the service takes them (KAFKA_PROPERTY_FETCH_WAIT_MAX_MS=10).
    for (key, value) in std::env::vars() {
        if let Some(name) = key.strip_prefix("KAFKA_PROPERTY_") {
            config.set(name.to_lowercase().replace('_', "."), value);
        }
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-clients-unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

fn report(
    mode: &str,
    records: u64,
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
) {
    let s = |t: Option<Instant>| t.map(|t| t.duration_since(started).as_secs_f64()).unwrap_or(0.0);
    println!(
        "{{\"mode\":\"{mode}\",\"records\":{records},\"elapsed_s\":{:.6},\"first_s\":{:.6},\"last_s\":{:.6}}}",
        started.elapsed().as_secs_f64(),
        s(first),
        s(last)
    );
}

fn drain(brokers: &str, topic: &str, n: u64) {
    let started = Instant::now();
    let consumer = assigned_consumer(brokers, topic);
    let (mut count, mut bytes) = (0u64, 0usize);
    let mut first = None;
    let deadline = started + Duration::from_secs(600);
    while count < n && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                bytes += m.payload().map(|p| p.len()).unwrap_or(0);
                count += 1;
            }
            Some(Err(e)) => eprintln!("consume error: {e}"),
            None => {}
        }
    }
    let last = Some(Instant::now());
    eprintln!("drain: {count} records, {bytes} payload bytes");
    report("drain", count, started, first, last);
}

const NAIVE_INSERT: &str = r#"INSERT INTO analytics.events
    (event_type, user_id, service, "timestamp", data, kafka_topic, kafka_partition, kafka_offset)
    VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)"#;

fn naive(brokers: &str, topic: &str, url: &str, n: u64, max_secs: f64) {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    let mut conn = runtime
        .block_on(async {
            use sqlx::Connection;
            sqlx::PgConnection::connect(url).await
        })
        .expect("connect");
    let consumer = assigned_consumer(brokers, topic);
    let mut count = 0u64;
    let (mut first, mut last) = (None, None);
    let mut stop_at = started + Duration::from_secs(600);
    while count < n && Instant::now() < stop_at {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        if first.is_none() {
            // The time cap counts from the first event, so start-up does not eat into it.
            first = Some(Instant::now());
            stop_at = Instant::now() + Duration::from_secs_f64(max_secs);
        }
        let payload = m.payload().unwrap_or_default();
        let Ok(e) =
            nexus_analytics::ingest::event::decode(payload, m.timestamp().to_millis(), 1 << 20)
        else {
            continue;
        };
        // Autocommit: each statement is its own transaction (one commit per event).
        runtime
            .block_on(
                sqlx::query(NAIVE_INSERT)
                    .bind(&e.event_type)
                    .bind(&e.user_id)
                    .bind(&e.service)
                    .bind(e.timestamp)
                    .bind(e.data.as_deref())
                    .bind(m.topic())
                    .bind(m.partition())
                    .bind(m.offset())
                    .execute(&mut conn),
            )
            .expect("insert");
        count += 1;
        last = Some(Instant::now());
    }
    report("naive", count, started, first, last);
}

fn latency(brokers: &str, topic: &str, n: u64, warm_secs: f64) {
    let started = Instant::now();
    let consumer = assigned_consumer(brokers, topic);
    let mut count = 0u64;
    let mut first_ts: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut millis: Vec<f64> = Vec::with_capacity(n as usize);
    let deadline = started + Duration::from_secs(3600);
    while count < n && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let now = chrono::Utc::now();
        count += 1;
        let Ok(e) =
            nexus_analytics::ingest::event::decode(m.payload().unwrap_or_default(), None, 1 << 20)
        else {
            continue;
        };
        let first = *first_ts.get_or_insert(e.timestamp);
        if (e.timestamp - first).as_seconds_f64() >= warm_secs {
            millis.push((now - e.timestamp).as_seconds_f64() * 1000.0);
        }
    }
    millis.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if millis.is_empty() {
            0.0
        } else {
            millis[((millis.len() - 1) as f64 * p).round() as usize]
        }
    };
    println!(
        "{{\"mode\":\"latency\",\"records\":{count},\"measured\":{},\"p50_ms\":{:.3},\"p95_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        millis.len(),
        pct(0.5),
        pct(0.95),
        pct(0.99),
        pct(1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage());
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["drain", brokers, topic, n] => drain(brokers, topic, num(n)),
        ["latency", brokers, topic, n, warm] => {
            latency(brokers, topic, num(n), warm.parse().unwrap_or_else(|_| usage()))
        }
        ["naive", brokers, topic, url, n, secs] => {
            naive(brokers, topic, url, num(n), secs.parse().unwrap_or_else(|_| usage()))
        }
        _ => usage(),
    }
}
