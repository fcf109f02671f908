//! Bad input never stops the stream and is never silently dropped: every malformed record
//! lands in the dead-letter topic with its reason and source coordinates, and the good records
//! around it are stored.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use rdkafka::message::{Headers, Message};

fn good(i: usize) -> Vec<u8> {
    format!(
        r#"{{"event_type":"user.login","user_id":"good-{i}","service":"auth-service","timestamp":"2024-11-08T12:34:56Z","data":{{"n":{i}}}}}"#
    )
    .into_bytes()
}

/// (expected reason, payload); `None` payload is a tombstone.
fn corpus() -> Vec<(&'static str, Option<Vec<u8>>)> {
    let long = "x".repeat(101);
    vec![
        ("invalid_json", Some(b"{not json".to_vec())),
        ("invalid_json", Some(Vec::new())),
        ("invalid_json", None),
        ("invalid_json", Some(vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'])),
        ("missing_field", Some(br#"{"user_id":"u","service":"s"}"#.to_vec())),
        ("missing_field", Some(br#"{"event_type":"user.login","service":"s"}"#.to_vec())),
        ("invalid_field", Some(br#"{"event_type":"","user_id":"u","service":"s"}"#.to_vec())),
        ("invalid_field", Some(br#"{"event_type":7,"user_id":"u","service":"s"}"#.to_vec())),
        ("invalid_field", Some(format!(r#"{{"event_type":"{long}","user_id":"u","service":"s"}}"#).into_bytes())),
        ("invalid_field", Some(br#"{"event_type":"t","user_id":"u","service":"s","data":{"a":"\u0000"}}"#.to_vec())),
        ("invalid_timestamp", Some(br#"{"event_type":"t","user_id":"u","service":"s","timestamp":"2024-02-30T00:00:00Z"}"#.to_vec())),
        ("invalid_timestamp", Some(br#"{"event_type":"t","user_id":"u","service":"s","timestamp":-9999999999999999}"#.to_vec())),
        ("too_large", Some(format!(r#"{{"event_type":"t","user_id":"u","service":"s","data":"{}"}}"#, "y".repeat(600 * 1024)).into_bytes())),
        // Valid JSON that only PostgreSQL refuses: found by splitting the batch.
        ("db_rejected", Some(br#"{"event_type":"t","user_id":"u","service":"s","data":{"a":"\ud800"}}"#.to_vec())),
        ("db_rejected", Some(br#"{"event_type":"t","user_id":"u","service":"s","data":1e1000000}"#.to_vec())),
    ]
}

#[test]
fn malformed_records_are_dead_lettered_and_neighbours_stored() {
    let broker = Broker::start();
    let topic = unique("events");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 1);
    broker.create_topic(&dlq, 1);
    let db = TestDb::create();

    // good, bad, good, bad, … on one partition so the offsets are predictable.
    let bad = corpus();
    let mut records = Vec::new();
    let mut expected: HashMap<i64, &str> = HashMap::new();
    let mut offset = 0i64;
    for (i, (reason, payload)) in bad.iter().enumerate() {
        records.push(RawRecord {
            key: Some(b"k".to_vec()),
            value: Some(good(i)),
            headers: vec![],
            partition: Some(0),
        });
        offset += 1;
        records.push(RawRecord {
            key: Some(format!("bad-{i}").into_bytes()),
            value: payload.clone(),
            headers: vec![("origin".into(), b"test".to_vec())],
            partition: Some(0),
        });
        expected.insert(offset, reason);
        offset += 1;
    }
    records.push(RawRecord {
        key: None,
        value: Some(good(999)),
        headers: vec![],
        partition: Some(0),
    });
    let good_count = (bad.len() + 1) as i64;
    produce_raw(&broker.bootstrap(), &topic, &records);

    let bootstrap = broker.bootstrap();
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    let group = svc.setting("KAFKA_GROUP_ID").unwrap_or_default().to_string();
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() >= good_count),
        "only {} good rows\n{}",
        db.rows(),
        svc.log_text()
    );

    let letters = read_topic(&bootstrap, &dlq, bad.len(), Duration::from_secs(30));
    assert_eq!(letters.len(), bad.len(), "dead letters\n{}", svc.log_text());
    for letter in &letters {
        let headers: HashMap<String, Vec<u8>> = letter
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let text = |k: &str| {
            String::from_utf8_lossy(headers.get(k).map(Vec::as_slice).unwrap_or_default())
                .to_string()
        };
        let source_offset: i64 = text("dlq.source.offset").parse().expect("dlq.source.offset");
        let want = expected
            .get(&source_offset)
            .unwrap_or_else(|| panic!("unexpected dead letter at offset {source_offset}"));
        assert_eq!(text("dlq.reason"), *want, "offset {source_offset}: {}", text("dlq.error"));
        assert_eq!(text("dlq.source.topic"), topic);
        assert_eq!(text("dlq.source.partition"), "0");
        assert_eq!(text("dlq.consumer.group"), group);
        assert!(!text("dlq.error").is_empty());
        assert_eq!(text("origin"), "test", "original headers kept");
        let index = (source_offset - 1) / 2;
        assert_eq!(letter.key(), Some(format!("bad-{index}").as_bytes()), "original key kept");
        let original = &bad[index as usize].1;
        if *want != "too_large" {
            // Empty and null values are the same to Kafka clients; compare the bytes.
            let got = letter.payload().filter(|p| !p.is_empty());
            let sent = original.as_deref().filter(|p| !p.is_empty());
            assert_eq!(got, sent, "original value kept at offset {source_offset}");
        }
    }

    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(db.rows(), good_count, "exactly the good records are stored");
    let dead: f64 = [
        "invalid_json",
        "missing_field",
        "invalid_field",
        "invalid_timestamp",
        "too_large",
        "db_rejected",
    ]
    .iter()
    .map(|r| svc.metric(&format!("analytics_dead_letters_total{{reason=\"{r}\"}}")).unwrap_or(0.0))
    .sum();
    assert_eq!(dead, bad.len() as f64);
    assert_eq!(svc.metric("analytics_dead_letters_total{reason=\"db_rejected\"}"), Some(2.0));
    let log = svc.log_text();
    assert!(log.contains("sending to the dead-letter topic"), "dead letters are logged");
}

/// A dead-letter topic the producer cannot write to (missing, with auto-creation off) stops the
/// partition at the bad record and makes the service not ready — blaming the dead-letter topic,
/// not PostgreSQL. Creating the topic lets it resume by itself: the letter is delivered once and
/// every good record is stored once.
#[test]
fn an_unwritable_dead_letter_topic_is_reported_as_such_and_recovers() {
    let broker = Broker::start_with(&[("auto.create.topics.enable", "false")]);
    let topic = unique("events");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 1);
    let db = TestDb::create();
    let record = |value: Vec<u8>| RawRecord {
        key: None,
        value: Some(value),
        headers: vec![],
        partition: Some(0),
    };
    produce_raw(
        &broker.bootstrap(),
        &topic,
        &[record(good(1)), record(b"{not json".to_vec()), record(good(2))],
    );
    // Short metadata timings so that "missing" is known, and the topic's creation seen, quickly.
    let svc = Service::consuming(
        &broker.bootstrap(),
        &topic,
        &db.url,
        &[
            ("KAFKA_PROPERTY_TOPIC_METADATA_PROPAGATION_MAX_MS", "2000"),
            ("KAFKA_PROPERTY_TOPIC_METADATA_REFRESH_INTERVAL_MS", "2000"),
        ],
    );
    let blamed = wait_until(
        Duration::from_secs(90),
        || matches!(svc.get("/readyz"), Some((503, body)) if body.contains(r#""dead_letter":{"up":false"#)),
    );
    let readyz = svc.get("/readyz");
    assert!(blamed, "dead-letter failure not reported: {readyz:?}\n{}", svc.log_text());
    let (_, body) = readyz.expect("readyz");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["database"]["up"], true, "the database is not blamed: {body}");
    assert!(ready["dead_letter"]["detail"].as_str().unwrap_or_default().contains("dead-letter"));
    assert_eq!(svc.metric("analytics_dead_letter_up"), Some(0.0));
    assert_eq!(svc.metric("analytics_database_up"), Some(1.0));

    broker.create_topic(&dlq, 1);
    assert!(
        wait_until(Duration::from_secs(90), || matches!(svc.get("/readyz"), Some((200, _)))),
        "not ready again: {:?}\n{}",
        svc.get("/readyz"),
        svc.log_text()
    );
    assert_eq!(svc.metric("analytics_dead_letter_up"), Some(1.0));
    let letters = read_topic(&broker.bootstrap(), &dlq, 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1, "the letter is delivered");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(db.rows(), 2, "the good records are stored once");
    assert_eq!(db.distinct_coordinates(), 2);
    assert_eq!(svc.metric("analytics_dead_letters_total{reason=\"invalid_json\"}"), Some(1.0));
}
