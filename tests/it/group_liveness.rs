//! A member that cannot get into a steady consumer group while the brokers answer must not sit
//! there silently: after GROUP_UNSTEADY_LIVENESS_SECS `/livez` fails (Kubernetes restarts the
//! pod), a gauge and a log line say why, and once it can join it consumes again.
//!
//! How the member is kept out: another member already holds the group with a different,
//! incompatible assignment strategy (`range` against the service's `cooperative-sticky`). The
//! coordinator is up and answers every JoinGroup — with INCONSISTENT_GROUP_PROTOCOL — so the
//! service retries joining forever while a broker is reachable. That is the same symptom
//! (reachable broker, member never `up`/`steady`) as the orphaned members of the soak runs, made
//! deterministic; it happens for real during a rollout that changes the strategy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

#[test]
fn livez_fails_while_the_member_cannot_join_a_steady_group_and_recovers() {
    let Fixture { bootstrap, db, topic, group, .. } = Fixture::new("group", 2);

    // The member that holds the group with another protocol.
    let stop = Arc::new(AtomicBool::new(false));
    let holder = {
        let (bootstrap, topic, group, stop) =
            (bootstrap.clone(), topic.clone(), group.clone(), stop.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .set("partition.assignment.strategy", "range")
                .set("session.timeout.ms", "6000")
                .set("enable.auto.commit", "false")
                .create()
                .expect("holder");
            consumer.subscribe(&[&topic]).expect("subscribe");
            let mut assigned = false;
            while !stop.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
                assigned |= consumer.assignment().map(|a| a.count() > 0).unwrap_or(false);
            }
            consumer.unsubscribe();
            assigned
        })
    };
    std::thread::sleep(Duration::from_secs(5));

    let svc = Service::start(&[
        ("KAFKA_BROKERS", &bootstrap),
        ("KAFKA_TOPICS", &topic),
        ("KAFKA_DLQ_TOPIC", &format!("{topic}.dlq")),
        ("KAFKA_GROUP_ID", &group),
        ("DATABASE_URL", &db.url),
        ("GROUP_UNSTEADY_LIVENESS_SECS", "5"),
    ]);
    let failed =
        wait_until(Duration::from_secs(40), || matches!(svc.get("/livez"), Some((503, _))));
    assert!(
        failed,
        "/livez kept answering {:?} while the member could not join\n{}",
        svc.get("/livez"),
        svc.log_text()
    );
    let (_, body) = svc.get("/livez").expect("livez");
    let live: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(live["group_unsteady_secs"].as_u64().unwrap_or(0) >= 5, "{body}");
    assert_ne!(live["group_state"], "up/steady", "{body}");
    assert!(svc.metric("analytics_consumer_group_unsteady_seconds").unwrap_or(0.0) >= 5.0, "gauge");
    assert!(svc.log_text().contains("GROUP_UNSTEADY_LIVENESS_SECS"), "a log line says why");
    assert!(matches!(svc.get("/readyz"), Some((503, _))), "not ready either");

    // The other member leaves: the service joins, consumes and is alive again.
    stop.store(true, Ordering::Relaxed);
    assert!(holder.join().expect("holder thread"), "the holder owned the partitions");
    let produced = produce_demo(&bootstrap, &topic, 200, 0, 3) as i64;
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() >= produced),
        "{} of {produced} rows\n{}",
        db.rows(),
        svc.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(10), || matches!(svc.get("/livez"), Some((200, _)))),
        "{:?}",
        svc.get("/livez")
    );
    assert_eq!(svc.metric("analytics_consumer_group_unsteady_seconds"), Some(0.0));
}
