//! The delivery contract against Apache Kafka and a real PostgreSQL: every event stored exactly
//! once through restarts, crashes, outages, shutdowns and rebalances. Broker crashes and
//! failover are in broker_faults.rs.

use std::time::Duration;

use crate::common::*;

const PARTITIONS: u32 = 4;

#[test]
fn every_event_is_stored_exactly_once_even_when_replayed() {
    let s = Fixture::new("events", PARTITIONS);
    let produced = produce_demo(&s.broker.bootstrap(), &s.topic, 5000, 0, 1) as i64;
    let svc = s.service();
    assert!(
        s.wait_rows(produced, Duration::from_secs(60)),
        "only {} of {produced}\n{}",
        s.db.rows(),
        svc.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    s.assert_exactly(produced);
    assert_eq!(svc.metric("analytics_events_stored_total"), Some(produced as f64));
    drop(svc);

    // Replay everything under a new group: every record is redelivered, no row is added.
    let mut env = s.env();
    let replay_group = unique("replay");
    env.retain(|(k, _)| *k != "KAFKA_GROUP_ID");
    env.push(("KAFKA_GROUP_ID", &replay_group));
    let replay = Service::start(&env);
    let seen = wait_until(Duration::from_secs(60), || {
        replay.metric("analytics_events_duplicates_total") == Some(produced as f64)
    });
    assert!(
        seen,
        "replay did not re-read everything: {:?}",
        replay.metric("analytics_events_duplicates_total")
    );
    assert_eq!(replay.metric("analytics_events_stored_total"), Some(0.0));
    s.assert_exactly(produced);
}

#[test]
fn sigkill_mid_stream_loses_and_doubles_nothing() {
    let s = Fixture::new("events", PARTITIONS);
    let mut svc = s.service();
    svc.wait_ready(Duration::from_secs(30));
    let bootstrap = s.broker.bootstrap();
    let topic = s.topic.clone();
    let producer = std::thread::spawn(move || produce_demo(&bootstrap, &topic, 20_000, 4000, 2));
    assert!(s.wait_rows(3000, Duration::from_secs(30)), "no progress before the kill");
    svc.kill9();
    let at_kill = s.db.rows();
    std::thread::sleep(Duration::from_secs(1));
    svc.restart();
    let produced = producer.join().expect("producer") as i64;
    assert!(
        s.wait_rows(produced, Duration::from_secs(90)),
        "only {} of {produced} after restart\n{}",
        s.db.rows(),
        svc.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    s.assert_exactly(produced);
    assert!(at_kill < produced, "the kill happened after everything was stored");
}

#[test]
fn sigterm_drains_commits_and_exits_zero() {
    let s = Fixture::new("events", PARTITIONS);
    let mut svc = s.service();
    svc.wait_ready(Duration::from_secs(30));
    let bootstrap = s.broker.bootstrap();
    let topic = s.topic.clone();
    let producer = std::thread::spawn(move || produce_demo(&bootstrap, &topic, 12_000, 3000, 3));
    assert!(s.wait_rows(2000, Duration::from_secs(30)), "no progress before SIGTERM");
    let status = svc.sigterm(Duration::from_secs(30)).expect("did not exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status\n{}", svc.log_text());
    let log = svc.log_text();
    assert!(log.contains("shutdown complete"), "{log}");
    let produced = producer.join().expect("producer") as i64;

    // What the drained instance committed is not delivered into rows again.
    svc.restart();
    assert!(s.wait_rows(produced, Duration::from_secs(60)), "only {} of {produced}", s.db.rows());
    std::thread::sleep(Duration::from_secs(2));
    s.assert_exactly(produced);
    assert_eq!(
        svc.metric("analytics_events_duplicates_total"),
        Some(0.0),
        "records committed before SIGTERM were redelivered"
    );
}

#[test]
fn two_instances_split_the_partitions_and_store_each_event_once() {
    let s = Fixture::new("events", PARTITIONS);
    let a = s.service();
    let b = s.service();
    a.wait_ready(Duration::from_secs(40));
    b.wait_ready(Duration::from_secs(40));
    let both_assigned = wait_until(Duration::from_secs(30), || {
        a.metric("analytics_assigned_partitions").unwrap_or(0.0) > 0.0
            && b.metric("analytics_assigned_partitions").unwrap_or(0.0) > 0.0
    });
    assert!(
        both_assigned,
        "partitions not split: a={:?} b={:?}",
        a.metric("analytics_assigned_partitions"),
        b.metric("analytics_assigned_partitions")
    );
    let total = a.metric("analytics_assigned_partitions").unwrap_or(0.0)
        + b.metric("analytics_assigned_partitions").unwrap_or(0.0);
    assert_eq!(total, PARTITIONS as f64);
    let produced = produce_demo(&s.broker.bootstrap(), &s.topic, 8000, 0, 4) as i64;
    assert!(s.wait_rows(produced, Duration::from_secs(60)), "only {} of {produced}", s.db.rows());
    std::thread::sleep(Duration::from_secs(2));
    s.assert_exactly(produced);
    let stored_a = a.metric("analytics_events_stored_total").unwrap_or(0.0);
    let stored_b = b.metric("analytics_events_stored_total").unwrap_or(0.0);
    assert!(
        stored_a > 0.0 && stored_b > 0.0,
        "one instance did all the work: {stored_a} / {stored_b}"
    );
    assert_eq!(stored_a + stored_b, produced as f64);
}

#[test]
fn database_outage_pauses_then_resumes_without_loss_or_duplicates() {
    let broker = Broker::start();
    let topic = unique("events");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, PARTITIONS);
    broker.create_topic(&dlq, 1);
    let pg = PrivatePostgres::start();
    let url = pg.url();
    let bootstrap = broker.bootstrap();
    let svc = Service::consuming(&bootstrap, &topic, &url, &[("DATABASE_WRITE_TIMEOUT_SECS", "3")]);
    svc.wait_ready(Duration::from_secs(30));
    let (b, t) = (bootstrap.clone(), topic.clone());
    let producer = std::thread::spawn(move || produce_demo(&b, &t, 15_000, 1500, 5));
    assert!(wait_until(Duration::from_secs(30), || pg
        .scalar("SELECT count(*) FROM analytics.events")
        > 1000));

    pg.stop_server();
    let down = std::time::Instant::now();
    let not_ready = wait_until(
        Duration::from_secs(5),
        || matches!(svc.get("/readyz"), Some((503, body)) if body.contains("\"database\":{\"up\":false")),
    );
    assert!(not_ready, "readiness did not flip within 5 s: {:?}", svc.get("/readyz"));
    let flipped_after = down.elapsed();
    assert!(
        wait_until(Duration::from_secs(10), || svc.metric("analytics_consumer_paused")
            == Some(1.0)),
        "not paused"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        svc.get("/livez").map(|r| r.0),
        Some(200),
        "liveness must not fail in a dependency outage"
    );

    pg.start_server();
    let up = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || matches!(svc.get("/readyz"), Some((200, _)))),
        "not ready again"
    );
    let recovered_after = up.elapsed();
    let produced = producer.join().expect("producer") as i64;
    let all = wait_until(Duration::from_secs(60), || {
        pg.scalar("SELECT count(*) FROM analytics.events") >= produced
    });
    assert!(
        all,
        "only {} of {produced}\n{}",
        pg.scalar("SELECT count(*) FROM analytics.events"),
        svc.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pg.scalar("SELECT count(*) FROM analytics.events"), produced);
    assert_eq!(
        pg.scalar("SELECT count(DISTINCT (kafka_partition, kafka_offset)) FROM analytics.events"),
        produced
    );
    assert_eq!(svc.metric("analytics_consumer_paused"), Some(0.0));
    eprintln!(
        "readiness flipped {flipped_after:?} after the database stopped, recovered {recovered_after:?} after it started"
    );
}

#[test]
fn broker_outage_flips_readiness_but_not_liveness_and_loses_nothing() {
    let mut broker = Broker::start_behind_proxy();
    let topic = unique("events");
    broker.create_topic(&topic, 2);
    let db = TestDb::create();
    let bootstrap = broker.bootstrap();
    let before = produce_demo(&bootstrap, &topic, 1000, 0, 5) as i64;
    let mut svc = Service::consuming(&bootstrap, &topic, &db.url, &[]);
    svc.wait_ready(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(30), || db.rows() >= before), "nothing consumed");

    broker.disconnect();
    let down = std::time::Instant::now();
    let flipped = wait_until(
        Duration::from_secs(5),
        || matches!(svc.get("/readyz"), Some((503, body)) if body.contains("\"kafka\":{\"up\":false")),
    );
    assert!(flipped, "readiness did not flip within 5 s: {:?}", svc.get("/readyz"));
    let flipped_after = down.elapsed();
    // Long enough for the session to expire on the broker's side (the group rebalances).
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(svc.get("/livez").map(|r| r.0), Some(200));
    assert!(svc.exit_status().is_none(), "the service exited during the outage");

    broker.reconnect();
    let up = std::time::Instant::now();
    let recovered =
        wait_until(Duration::from_secs(60), || matches!(svc.get("/readyz"), Some((200, _))));
    let log = svc.log_text();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let readyz = svc.get("/readyz");
    let exit = svc.exit_status();
    assert!(
        recovered,
        "not ready after the broker returned: {readyz:?} (process exit: {exit:?})\n{}",
        tail.join("\n")
    );
    eprintln!(
        "kafka readiness flipped {flipped_after:?} after the broker became unreachable, recovered {:?} after it returned",
        up.elapsed()
    );
    // Still consuming after the outage, and every event exactly once.
    let after = produce_demo(&bootstrap, &topic, 1000, 0, 6) as i64;
    let produced = before + after;
    assert!(
        wait_until(Duration::from_secs(60), || db.rows() >= produced),
        "no consumption after the outage: {} of {produced} rows",
        db.rows()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(db.rows(), produced);
}
