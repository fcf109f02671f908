//! Transactional producers: records of an aborted transaction are never stored, and records
//! behind an open transaction wait for it (the last stable offset), then arrive exactly once.
//! Needs a broker with real transaction support (Apache Kafka).

use std::time::Duration;

use crate::common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const TIMEOUT: Duration = Duration::from_secs(30);

fn event(user: &str) -> Vec<u8> {
    // No timestamp: the record's (now) is used, so the row lands in a current partition.
    format!(r#"{{"event_type":"user.login","user_id":"{user}","service":"auth-service"}}"#)
        .into_bytes()
}

fn producer(
    bootstrap: &str,
    transactional_id: Option<&str>,
) -> ThreadedProducer<DefaultProducerContext> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("enable.idempotence", "true");
    if let Some(id) = transactional_id {
        config.set("transactional.id", id);
    }
    config.create().expect("producer")
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let value = event(&format!("{prefix}-{i}"));
        p.send(BaseRecord::<[u8], [u8]>::to(topic).payload(&value).partition(0))
            .map_err(|(e, _)| e)
            .expect("enqueue");
    }
    p.flush(TIMEOUT).expect("flush");
}

/// Records a `read_uncommitted` reader sees: proves the aborted records are in the log.
fn uncommitted_count(bootstrap: &str, topic: &str, expected: usize) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("uncommitted"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0;
    wait_until(TIMEOUT, || {
        while let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
        }
        n >= expected
    });
    n
}

#[test]
fn aborted_records_are_never_stored_and_open_transactions_hold_later_records_back() {
    let Fixture { bootstrap, db, topic, .. } = Fixture::new("txn", 1);

    let txn = producer(&bootstrap, Some(&unique("tx")));
    txn.init_transactions(TIMEOUT).expect("init_transactions");
    txn.begin_transaction().expect("begin");
    send(&txn, &topic, "committed", 100);
    txn.commit_transaction(TIMEOUT).expect("commit");
    txn.begin_transaction().expect("begin");
    send(&txn, &topic, "aborted", 200);
    txn.abort_transaction(TIMEOUT).expect("abort");
    // An open transaction, then plain records behind it on the same partition.
    txn.begin_transaction().expect("begin");
    send(&txn, &topic, "open", 50);
    let plain = producer(&bootstrap, None);
    send(&plain, &topic, "after", 50);
    assert!(uncommitted_count(&bootstrap, &topic, 400) >= 400, "all records are in the log");

    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() >= 100),
        "the committed transaction: {} rows\n{}",
        db.rows(),
        svc.log_text()
    );
    svc.wait_ready(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    let aborted = "SELECT count(*) FROM analytics.events WHERE user_id LIKE 'aborted-%'";
    assert_eq!(db.scalar(aborted), 0, "no aborted record stored");
    assert_eq!(db.rows(), 100, "nothing past the last stable offset while the transaction is open");

    txn.commit_transaction(TIMEOUT).expect("commit the open transaction");
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() >= 200),
        "{} of 200 rows after the commit\n{}",
        db.rows(),
        svc.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(db.rows(), 200);
    assert_eq!(db.distinct_coordinates(), 200);
    assert_eq!(db.scalar(aborted), 0, "no aborted record stored");
    for prefix in ["committed", "open", "after"] {
        let n = db.scalar(&format!(
            "SELECT count(*) FROM analytics.events WHERE user_id LIKE '{prefix}-%'"
        ));
        assert_eq!(n, if prefix == "committed" { 100 } else { 50 }, "{prefix}");
    }
}
