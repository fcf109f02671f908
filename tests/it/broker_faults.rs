//! Broker faults on Apache Kafka that need a broker of their own: the broker process SIGKILLed
//! mid-stream and restarted on the same data directory, and on a three-node cluster the loss
//! of the partitions' leader and of the group coordinator. Each test counts rows against what
//! was produced (acks=all, idempotent: "produced" is exact) and prints its recovery figures.

use std::time::{Duration, Instant};

use crate::common::*;

/// 2 % malformed events, so the dead-letter producer is exercised through the fault too.
const INVALID_PERCENT: u8 = 2;

fn readyz(svc: &Service) -> Option<u16> {
    svc.get("/readyz").map(|(code, _)| code)
}

/// Waits until the stream is complete: valid rows stored exactly once, every malformed record
/// dead-lettered; asserts it and the aggregates.
fn assert_complete(
    bootstrap: &str,
    dlq: &str,
    db: &TestDb,
    svc: &Service,
    produced: u64,
    seed: u64,
) {
    let valid = valid_among(produced, seed, INVALID_PERCENT) as i64;
    let invalid = produced as usize - valid as usize;
    assert!(
        wait_until(Duration::from_secs(120), || db.rows() >= valid),
        "only {} of {valid} valid events stored\n{}",
        db.rows(),
        svc.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(db.rows(), valid, "rows");
    assert_eq!(db.distinct_coordinates(), valid, "distinct coordinates");
    assert_eq!(db.aggregate_mismatches(), 0, "event_counts equal COUNT(*)");
    let (distinct, letters) = dead_letter_sources(bootstrap, dlq, invalid, Duration::from_secs(60));
    assert_eq!(distinct, invalid, "dead letters (distinct source records); {letters} read");
    eprintln!(
        "produced={produced} rows={} distinct={} dead_letters={distinct} (letters read {letters})",
        db.rows(),
        db.distinct_coordinates()
    );
}

#[test]
fn broker_sigkill_mid_stream_and_restart_on_the_same_data_loses_and_doubles_nothing() {
    let mut broker = Broker::private();
    let topic = unique("events");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 4);
    broker.create_topic(&dlq, 1);
    let db = TestDb::create();
    let bootstrap = broker.bootstrap();
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    svc.wait_ready(Duration::from_secs(60));

    let seed = 31;
    let (b, t) = (bootstrap.clone(), topic.clone());
    let producer =
        std::thread::spawn(move || produce_mixed(&b, &t, 24_000, 1500, seed, INVALID_PERCENT));
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() > 3000),
        "no progress before the kill"
    );

    broker.kill();
    let killed = Instant::now();
    let at_kill = db.rows();
    // Within 20 s although the consume loop may sit for up to 30 s (the dead-letter producer's
    // message.timeout.ms) delivering this batch's dead letters to the dead broker: the last
    // client report ("1 broker(s) up") goes stale after 10 s. Before that it stayed on /readyz.
    let not_ready = wait_until(Duration::from_secs(20), || readyz(&svc) == Some(503));
    let flipped = killed.elapsed();
    assert!(not_ready, "readiness still {:?} with the broker dead", svc.get("/readyz"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(svc.get("/livez").map(|r| r.0), Some(200), "liveness must not fail");

    broker.spawn_again();
    broker.wait_serving();
    let serving = Instant::now();
    let ready = wait_until(Duration::from_secs(90), || readyz(&svc) == Some(200));
    assert!(
        ready,
        "not ready after the broker came back: {:?}\n{}",
        svc.get("/readyz"),
        svc.log_text()
    );
    let ready_after = serving.elapsed();
    let moving = wait_until(Duration::from_secs(60), || db.rows() > at_kill);
    assert!(moving, "no rows stored after the restart");
    let rows_after = serving.elapsed();

    let produced = producer.join().expect("producer");
    assert_complete(&bootstrap, &dlq, &db, &svc, produced, seed);
    eprintln!(
        "broker SIGKILL: /readyz 503 after {flipped:?}; broker down {:?}; after it served again: \
         /readyz 200 in {ready_after:?}, rows growing in {rows_after:?}; rows at kill {at_kill}",
        serving - killed
    );
}

#[test]
fn killing_the_partitions_leader_in_a_three_node_cluster_moves_consumption_to_the_new_leaders() {
    let mut cluster = Cluster::start();
    let bootstrap = cluster.bootstrap();
    let topic = unique("events");
    let dlq = format!("{topic}.dlq");
    // Node 1 leads every partition of the topic: killing it moves all of them.
    cluster.create_topic_led_by(&topic, 3, 1);
    cluster.create_topic(&dlq, 1);
    let db = TestDb::create();
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    svc.wait_ready(Duration::from_secs(60));

    let seed = 32;
    let (b, t) = (bootstrap.clone(), topic.clone());
    let producer =
        std::thread::spawn(move || produce_mixed(&b, &t, 24_000, 1500, seed, INVALID_PERCENT));
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() > 3000),
        "no progress before the kill"
    );
    assert_eq!((0..3).map(|p| cluster.leader(&topic, p)).collect::<Vec<_>>(), vec![1, 1, 1]);

    cluster.kill(1);
    let killed = Instant::now();
    let at_kill = db.rows();
    let moved = wait_until(Duration::from_secs(60), || {
        (0..3).all(|p| matches!(cluster.leader(&topic, p), 2 | 3))
    });
    assert!(moved, "leaders {:?}", (0..3).map(|p| cluster.leader(&topic, p)).collect::<Vec<_>>());
    let new_leaders = killed.elapsed();
    let moving = wait_until(Duration::from_secs(60), || db.rows() > at_kill + 1000);
    assert!(moving, "no progress on the new leaders\n{}", svc.log_text());
    let progress = killed.elapsed();

    let produced = producer.join().expect("producer");
    assert_complete(&bootstrap, &dlq, &db, &svc, produced, seed);
    assert_eq!(readyz(&svc), Some(200), "{:?}", svc.get("/readyz"));
    eprintln!(
        "leader kill: new leaders after {new_leaders:?}, 1000 more rows {progress:?} after the kill \
         (rows at kill {at_kill})"
    );
}

#[test]
fn a_group_coordinator_move_keeps_commits_and_rows_exact() {
    let mut cluster = Cluster::start();
    let bootstrap = cluster.bootstrap();
    let topic = unique("events");
    let dlq = format!("{topic}.dlq");
    cluster.create_topic(&topic, 3);
    cluster.create_topic(&dlq, 1);
    let db = TestDb::create();
    let svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    let group = svc.setting("KAFKA_GROUP_ID").expect("group").to_string();
    svc.wait_ready(Duration::from_secs(60));
    // Looked up before the stream starts: the group tool is a JVM that takes seconds.
    let coordinator = cluster.coordinator(&group).expect("the group has a coordinator");

    let seed = 33;
    let (b, t) = (bootstrap.clone(), topic.clone());
    let producer =
        std::thread::spawn(move || produce_mixed(&b, &t, 30_000, 1500, seed, INVALID_PERCENT));
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() > 3000),
        "no progress before the kill"
    );

    cluster.kill(coordinator);
    let killed = Instant::now();
    let at_kill = db.rows();
    let mut now_coordinator = None;
    let moved = wait_until(Duration::from_secs(60), || {
        now_coordinator = cluster.coordinator(&group);
        now_coordinator.is_some_and(|c| c != coordinator)
    });
    assert!(moved, "coordinator still {now_coordinator:?} (was {coordinator})");
    let move_after = killed.elapsed();
    let progressed = wait_until(Duration::from_secs(60), || db.rows() > at_kill + 1000);
    let progress_after = killed.elapsed();
    assert!(
        progressed,
        "no progress after the coordinator moved: rows {} (at kill {at_kill}), topic end offsets \
         {}, assigned {:?}, lag {:?}, readyz {:?}\n{}",
        db.rows(),
        end_offsets(&bootstrap, &topic),
        svc.metric("analytics_assigned_partitions"),
        svc.metric("analytics_consumer_instance_lag"),
        svc.get("/readyz"),
        svc.log_text()
    );

    let produced = producer.join().expect("producer");
    assert_complete(&bootstrap, &dlq, &db, &svc, produced, seed);
    // Commits reach the new coordinator: the group's committed offsets catch up with the log.
    let topics = vec![topic.clone()];
    let no_props = Default::default();
    let mut lag = None;
    let committed = wait_until(Duration::from_secs(60), || {
        lag = nexus_analytics::kafka::admin::group_lag(&bootstrap, &no_props, &group, &topics).ok();
        lag == Some(0)
    });
    assert!(committed, "group lag from committed offsets {lag:?}");
    eprintln!(
        "coordinator move: node {coordinator} killed (rows at kill {at_kill}), coordinator now \
         {now_coordinator:?} after {move_after:?}; 1000 more rows after {progress_after:?}; \
         committed lag 0 after {:?}",
        killed.elapsed()
    );
}
