//! Filtering/routing rules and command-line replay, end to end through the real broker.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use rdkafka::message::{Headers, Message};

fn record(event_type: &str, service: &str, i: usize) -> RawRecord {
    RawRecord {
        key: Some(format!("k{i}").into_bytes()),
        value: Some(
            format!(r#"{{"event_type":"{event_type}","user_id":"u{i}","service":"{service}","timestamp":"2026-11-26T10:00:00Z"}}"#)
                .into_bytes(),
        ),
        headers: vec![],
        partition: None,
    }
}

#[test]
fn rules_skip_forward_and_store_in_order() {
    let broker = Broker::start();
    let topic = unique("events");
    let searches = unique("searches");
    let billing = unique("billing");
    for (t, p) in [(&topic, 2), (&searches, 1), (&billing, 1)] {
        broker.create_topic(t, p);
    }
    broker.create_topic(&format!("{topic}.dlq"), 1);
    let db = TestDb::create();
    let rules = format!(
        r#"[{{"name":"drop-views","event_type":"user.profile_viewed","action":"skip"}},
            {{"name":"searches","event_type":"user.search_*","service":"user-service","action":"forward","topic":"{searches}"}},
            {{"name":"billing-only","event_type":"*","service":"billing-*","action":"forward","topic":"{billing}","store":false}}]"#
    );
    let mut records = Vec::new();
    for i in 0..10 {
        records.push(record("user.profile_viewed", "user-service", i));
        records.push(record("user.search_performed", "user-service", 100 + i));
        records.push(record("invoice.paid", "billing-service", 200 + i));
        records.push(record("user.login", "auth-service", 300 + i));
    }
    produce_raw(&broker.bootstrap(), &topic, &records);

    let bootstrap = broker.bootstrap();
    let dlq = format!("{topic}.dlq");
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[("ROUTING_RULES", &rules)]);
    let done = wait_until(Duration::from_secs(60), || {
        svc.metric("analytics_routing_rule_hits_total{rule=\"billing-only\"}") == Some(10.0)
            && db.rows() >= 20
    });
    assert!(done, "rows {}\n{}", db.rows(), svc.log_text());
    std::thread::sleep(Duration::from_secs(1));
    let by_type: HashMap<&str, i64> =
        ["user.profile_viewed", "user.search_performed", "invoice.paid", "user.login"]
            .into_iter()
            .map(|t| {
                (
                    t,
                    db.scalar(&format!(
                        "SELECT count(*) FROM analytics.events WHERE event_type = '{t}'"
                    )),
                )
            })
            .collect();
    assert_eq!(by_type["user.profile_viewed"], 0, "skipped events are not stored");
    assert_eq!(by_type["user.search_performed"], 10, "forward keeps storing by default");
    assert_eq!(by_type["invoice.paid"], 0, "store: false forwards instead of storing");
    assert_eq!(by_type["user.login"], 10, "no rule matched: stored");

    let copies = read_topic(&bootstrap, &searches, 10, Duration::from_secs(20));
    assert_eq!(copies.len(), 10);
    let rule = copies[0].headers().and_then(|h| {
        h.iter().find(|h| h.key == "routed.rule").and_then(|h| h.value.map(<[u8]>::to_vec))
    });
    assert_eq!(rule.as_deref(), Some(&b"searches"[..]));
    assert!(copies.iter().all(|m| {
        m.payload().is_some_and(|p| p.starts_with(b"{\"event_type\":\"user.search_performed\""))
    }));
    assert_eq!(read_topic(&bootstrap, &billing, 10, Duration::from_secs(20)).len(), 10);
    assert_eq!(svc.metric("analytics_routing_rule_hits_total{rule=\"drop-views\"}"), Some(10.0));
    assert_eq!(svc.metric("analytics_events_skipped_total"), Some(10.0));
    let dead = read_topic(&bootstrap, &dlq, 1, Duration::from_secs(3));
    assert!(dead.is_empty(), "skipped events must not be dead-lettered");
}

#[test]
fn replay_is_refused_with_a_live_member_and_reconsumes_without_duplicates_when_applied() {
    let Fixture { bootstrap, db, topic, dlq, group, .. } = Fixture::new("events", 3);
    let produced = produce_demo(&bootstrap, &topic, 3000, 0, 21) as i64;
    let env = [
        ("KAFKA_BROKERS", bootstrap.as_str()),
        ("KAFKA_TOPICS", topic.as_str()),
        ("KAFKA_DLQ_TOPIC", dlq.as_str()),
        ("KAFKA_GROUP_ID", group.as_str()),
        ("DATABASE_URL", db.url.as_str()),
    ];
    let mut svc = Service::start(&env);
    assert!(wait_until(Duration::from_secs(60), || db.rows() >= produced));
    let replay = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nexus-analytics"))
            .args(["replay", "--to-earliest"])
            .args(extra)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .output()
            .expect("replay");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // A live member would commit over the reset: refused.
    let (code, refused) = replay(&[]);
    assert_ne!(code, Some(0), "replay ran while the service was a member: {refused}");
    assert!(refused.contains("active member"), "{refused}");

    assert_eq!(svc.sigterm(Duration::from_secs(30)).and_then(|s| s.code()), Some(0));
    // The coordinator may list a departed member for a moment after it left: retry while
    // refused.
    let mut out = String::new();
    let dry = wait_until(Duration::from_secs(40), || {
        let (code, text) = replay(&["--dry-run"]);
        out = text;
        code == Some(0)
    });
    assert!(dry && out.contains("would move") && out.contains("dry run"), "{out}");
    let applied = wait_until(Duration::from_secs(40), || {
        let (code, text) = replay(&[]);
        out = text;
        code == Some(0)
    });
    assert!(applied, "{out}");
    assert!(out.contains(&format!("{produced} event(s) will be consumed again")), "{out}");

    svc.restart();
    let reread = wait_until(Duration::from_secs(60), || {
        svc.metric("analytics_events_duplicates_total") == Some(produced as f64)
    });
    assert!(
        reread,
        "duplicates {:?}\n{}",
        svc.metric("analytics_events_duplicates_total"),
        svc.log_text()
    );
    assert_eq!(db.rows(), produced);
    assert_eq!(db.aggregate_mismatches(), 0);
    assert_eq!(db.scalar("SELECT sum(count)::bigint FROM analytics.event_counts"), produced);
}
