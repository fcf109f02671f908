//! kafka_admin against librdkafka's in-process mock cluster: after a reset, a consumer of the
//! group really re-reads from the expected offsets.
//!
//! Not covered here because no broker on this machine implements them: the mock answers
//! ListOffsets-by-timestamp with -1 ("FIXME" in librdkafka 2.12) and has no ListGroups /
//! DescribeGroups; tansu 0.6 answers a timestamp lookup with offset 0 and lists no members. So
//! resets to a time and `group_members` are unit-tested only (see docs/operator.md).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nexus_analytics::kafka_admin::{
    KafkaAdminError, PartitionChange, ResetTarget, group_lag, partition_count, reset_offsets,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TOPIC: &str = "user-events";
const PARTITIONS: i32 = 3;
const PER_PARTITION: i64 = 10;
/// Record i of each partition has timestamp T0 + i seconds.
const T0: i64 = 1_780_000_000_000;

fn no_props() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// A mock cluster with TOPIC holding PER_PARTITION records per partition.
fn cluster() -> (MockCluster<'static, DefaultProducerContext>, String) {
    let mc = MockCluster::new(1).expect("mock cluster");
    mc.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let bs = mc.bootstrap_servers();
    fill(&bs);
    (mc, bs)
}

/// Produces PER_PARTITION records per partition with timestamps T0 + i s.
fn fill(bs: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", bs).create().expect("producer");
    for p in 0..PARTITIONS {
        for i in 0..PER_PARTITION {
            let payload = format!("{p}-{i}");
            let rec = BaseRecord::<str, str>::to(TOPIC)
                .partition(p)
                .timestamp(T0 + i * 1000)
                .key("k")
                .payload(&payload);
            producer.send(rec).map_err(|(e, _)| e).expect("send");
        }
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
}

fn group_consumer(bs: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // Without a committed offset, start at the end: the tests must see committed offsets work.
        .set("auto.offset.reset", "latest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer")
}

/// Commits `offset` on every partition for `group`, as a consumer that processed that far.
fn commit_all(bs: &str, group: &str, offset: i64) {
    let c = group_consumer(bs, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Offset(offset)).expect("tpl");
    }
    c.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// Joins `group`, reads until every partition delivered a record, returns the first offset each.
fn first_offsets(bs: &str, group: &str) -> BTreeMap<i32, i64> {
    let c = group_consumer(bs, group);
    c.subscribe(&[TOPIC]).expect("subscribe");
    let mut first = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.len() < PARTITIONS as usize && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            first.entry(m.partition()).or_insert(m.offset());
        }
    }
    c.unsubscribe();
    first
}

fn all(v: i64) -> BTreeMap<i32, i64> {
    (0..PARTITIONS).map(|p| (p, v)).collect()
}

#[test]
fn partition_count_reads_metadata() {
    let (_mc, bs) = cluster();
    assert_eq!(partition_count(&bs, &no_props(), TOPIC).expect("count"), PARTITIONS);
    assert!(matches!(
        partition_count(&bs, &no_props(), "no-such-topic"),
        Err(KafkaAdminError::UnknownTopic(_))
    ));
}

#[test]
fn group_lag_is_what_the_group_has_not_committed() {
    let (_mc, bs) = cluster();
    let topics = vec![TOPIC.to_owned()];
    let group = "analytics-lag";
    let total = PER_PARTITION * PARTITIONS as i64;
    assert_eq!(group_lag(&bs, &no_props(), group, &topics).expect("lag"), total, "no commit yet");
    commit_all(&bs, group, 7);
    let lag = group_lag(&bs, &no_props(), group, &topics).expect("lag");
    assert_eq!(lag, (PER_PARTITION - 7) * PARTITIONS as i64);
    commit_all(&bs, group, PER_PARTITION);
    assert_eq!(group_lag(&bs, &no_props(), group, &topics).expect("lag"), 0);
    let missing = vec!["no-such-topic".to_owned()];
    assert!(matches!(
        group_lag(&bs, &no_props(), group, &missing),
        Err(KafkaAdminError::UnknownTopic(_))
    ));
}

#[test]
fn reset_to_earliest_makes_the_group_reread_everything() {
    let (_mc, bs) = cluster();
    let group = "analytics-earliest";
    commit_all(&bs, group, 7);
    let topics = vec![TOPIC.to_owned()];
    let expected: Vec<PartitionChange> = (0..PARTITIONS)
        .map(|p| PartitionChange { topic: TOPIC.into(), partition: p, old: Some(7), new: 0 })
        .collect();

    let planned = reset_offsets(&bs, &no_props(), group, &topics, ResetTarget::Earliest, true)
        .expect("dry run");
    assert_eq!(planned, expected);
    let again = reset_offsets(&bs, &no_props(), group, &topics, ResetTarget::Earliest, true)
        .expect("dry run 2");
    assert_eq!(again, expected, "the dry run committed nothing");

    let done = reset_offsets(&bs, &no_props(), group, &topics, ResetTarget::Earliest, false)
        .expect("reset");
    assert_eq!(done, expected);
    assert_eq!(first_offsets(&bs, group), all(0), "consumer re-reads from the start");
}

#[test]
fn reset_is_refused_while_the_group_has_members() {
    let (_mc, bs) = cluster();
    let group = "analytics-busy";
    commit_all(&bs, group, 2);
    let member = joined_member(&bs, group);
    let err =
        reset_offsets(&bs, &no_props(), group, &[TOPIC.to_owned()], ResetTarget::Earliest, false)
            .expect_err("must refuse");
    assert!(matches!(err, KafkaAdminError::GroupNotEmpty { .. }), "{err}");
    drop(member);
}

/// Subscribes a consumer to `group` and polls until it has an assignment.
fn joined_member(bs: &str, group: &str) -> BaseConsumer {
    let member = group_consumer(bs, group);
    member.subscribe(&[TOPIC]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut partitions = BTreeSet::new();
    while partitions.is_empty() && Instant::now() < deadline {
        let _ = member.poll(Duration::from_millis(200));
        if let Ok(a) = member.assignment() {
            partitions.extend(a.elements().iter().map(|e| e.partition()));
        }
    }
    assert!(!partitions.is_empty(), "member never joined");
    member
}
