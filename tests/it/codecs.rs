//! Every compression codec Kafka has reaches the database, and a record the client cannot hand
//! us is never a silent stop: it is counted by reason and turns readiness down.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::common::*;
use nexus_analytics::cli::produce::{self, ProduceOptions};
use rdkafka::ClientConfig;

const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];
const PER_CODEC: u64 = 300;

/// Produces `count` valid demo events with the producer setting `compression.type=codec`.
fn produce_compressed(bootstrap: &str, topic: &str, codec: &str, count: u64, seed: u64) -> u64 {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("compression.type", codec);
    let options =
        ProduceOptions { count, rate: 0, topic: topic.into(), invalid_percent: 0, users: 50, seed };
    let report = produce::produce(config, &options, &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("cannot produce with compression.type={codec}: {e}"));
    assert_eq!(report.failed, 0, "{codec}: undelivered records");
    report.delivered
}

#[test]
fn records_of_every_codec_are_stored() {
    let Fixture { bootstrap, db, topic, .. } = Fixture::new("codecs", 2);
    // zstd in the middle: before the fix its batches stopped their partitions, so the records
    // produced after them (whatever their codec) never arrived either.
    let mut produced = 0;
    for (i, codec) in CODECS.iter().enumerate() {
        produced += produce_compressed(&bootstrap, &topic, codec, PER_CODEC, i as u64 + 1);
    }
    assert_eq!(produced, PER_CODEC * CODECS.len() as u64);
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    let stored = wait_until(Duration::from_secs(60), || db.rows() >= produced as i64);
    let per_codec_note = "each codec's 300 records have their own seed; see the log for errors";
    assert!(
        stored,
        "{} of {produced} rows ({per_codec_note}); consume errors: {:?}\n{}",
        db.rows(),
        svc.metric("analytics_consume_errors_total{reason=\"not_implemented\"}"),
        svc.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(db.rows(), produced as i64);
    assert_eq!(db.distinct_coordinates(), produced as i64);
    let body = svc.get("/metrics").map(|(_, b)| b).unwrap_or_default();
    let consume_errors: f64 = body
        .lines()
        .filter(|l| l.starts_with("analytics_consume_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(consume_errors, 0.0, "no consume error\n{body}");
    svc.wait_ready(Duration::from_secs(10));
}

/// A subscribed topic that does not exist is the simplest error librdkafka hands the consume
/// loop instead of records (an undecodable batch arrives the same way, as
/// `KafkaError::MessageConsumption`): it is counted by reason, readiness names it, and once the
/// cause is gone the service consumes and turns ready by itself.
#[test]
fn consume_errors_are_counted_and_turn_readiness_down_until_fixed() {
    let broker = Broker::start();
    let topic = unique("missing");
    broker.create_topic(&format!("{topic}.dlq"), 1);
    let db = TestDb::create();
    let bootstrap = broker.bootstrap();
    // librdkafka sees a topic created later at its next metadata refresh (5 min by default).
    let refresh = [("KAFKA_PROPERTY_TOPIC_METADATA_REFRESH_INTERVAL_MS", "2000")];
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &refresh);
    let series = "analytics_consume_errors_total{reason=\"unknown_topic_or_partition\"}";
    let counted = wait_until(Duration::from_secs(30), || svc.metric(series).unwrap_or(0.0) > 0.0);
    assert!(counted, "{series} never counted\n{}", svc.log_text());
    // librdkafka reports a missing subscribed topic on each metadata refresh, so look while the
    // error is recent (a stuck batch, by contrast, errors on every fetch retry).
    let blamed = wait_until(Duration::from_secs(10), || {
        matches!(svc.get("/readyz"), Some((503, b)) if b.contains(r#""database":{"up":true"#)
            && b.contains(r#""consume":{"up":false"#))
    });
    let (code, body) = svc.get("/readyz").expect("readyz");
    assert!(blamed, "{body}");
    assert_eq!(code, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["consume"]["up"], false, "{body}");
    assert!(
        ready["consume"]["detail"].as_str().unwrap_or_default().contains("UnknownTopicOrPartition"),
        "{body}"
    );
    assert_eq!(ready["database"]["up"], true, "the database is not blamed: {body}");
    assert!(svc.log_text().contains("consume error"), "logged");

    broker.create_topic(&topic, 1);
    let produced = produce_demo(&bootstrap, &topic, 100, 0, 7) as i64;
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() >= produced),
        "{} of {produced} rows\n{}",
        db.rows(),
        svc.log_text()
    );
    svc.wait_ready(Duration::from_secs(40));
}
