//! kafka_admin against the shared Apache Kafka: exact lag from committed offsets and real
//! ListOffsets watermarks, group membership from DescribeGroups, and resets (to the earliest
//! offset, and to a time through real offsetsForTimes) after which a consumer of the group
//! really re-reads from the expected offsets. Each test has its own topic and groups.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use nexus_analytics::kafka::admin::{
    KafkaAdminError, PartitionChange, ResetTarget, group_lag, group_members, partition_count,
    reset_offsets,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::common::{Broker, unique};

const PARTITIONS: i32 = 3;
const PER_PARTITION: i64 = 10;
/// Record i of each partition has timestamp t0() + i seconds. Two hours ago, not a fixed date:
/// the broker's retention (7 days by timestamp) deletes older records, which moves the log start.
fn t0() -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| (Utc::now().timestamp() - 2 * 3600) * 1000)
}

fn no_props() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// The shared broker and a fresh topic holding PER_PARTITION records per partition.
fn setup() -> (String, String) {
    let broker = Broker::start();
    let topic = unique("admin");
    broker.create_topic(&topic, PARTITIONS as u32);
    let bs = broker.bootstrap();
    fill(&bs, &topic);
    (bs, topic)
}

/// Produces PER_PARTITION records per partition with timestamps t0() + i s.
fn fill(bs: &str, topic: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for p in 0..PARTITIONS {
        for i in 0..PER_PARTITION {
            let payload = format!("{p}-{i}");
            let rec = BaseRecord::<str, str>::to(topic)
                .partition(p)
                .timestamp(t0() + i * 1000)
                .key("k")
                .payload(&payload);
            producer.send(rec).map_err(|(e, _)| e).expect("send");
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
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
fn commit_all(bs: &str, topic: &str, group: &str, offset: i64) {
    let c = group_consumer(bs, group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset)).expect("tpl");
    }
    c.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// Joins `group`, reads until every partition delivered a record, returns the first offset each.
fn first_offsets(bs: &str, topic: &str, group: &str) -> BTreeMap<i32, i64> {
    let c = group_consumer(bs, group);
    c.subscribe(&[topic]).expect("subscribe");
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

fn changes(topic: &str, old: Option<i64>, new: i64) -> Vec<PartitionChange> {
    (0..PARTITIONS)
        .map(|p| PartitionChange { topic: topic.into(), partition: p, old, new })
        .collect()
}

#[test]
fn partition_count_reads_metadata() {
    let (bs, topic) = setup();
    assert_eq!(partition_count(&bs, &no_props(), &topic).expect("count"), PARTITIONS);
    assert!(matches!(
        partition_count(&bs, &no_props(), &unique("no_such_topic")),
        Err(KafkaAdminError::UnknownTopic(_))
    ));
}

#[test]
fn group_lag_is_what_the_group_has_not_committed() {
    let (bs, topic) = setup();
    let topics = vec![topic.clone()];
    let group = unique("lag");
    let total = PER_PARTITION * PARTITIONS as i64;
    assert_eq!(group_lag(&bs, &no_props(), &group, &topics).expect("lag"), total, "no commit yet");
    commit_all(&bs, &topic, &group, 7);
    let lag = group_lag(&bs, &no_props(), &group, &topics).expect("lag");
    assert_eq!(lag, (PER_PARTITION - 7) * PARTITIONS as i64);
    commit_all(&bs, &topic, &group, PER_PARTITION);
    assert_eq!(group_lag(&bs, &no_props(), &group, &topics).expect("lag"), 0);
    // Records produced after the commit are lag again: the high watermark is exact.
    fill(&bs, &topic);
    assert_eq!(group_lag(&bs, &no_props(), &group, &topics).expect("lag"), total);
    let missing = vec![unique("no_such_topic")];
    assert!(matches!(
        group_lag(&bs, &no_props(), &group, &missing),
        Err(KafkaAdminError::UnknownTopic(_))
    ));
}

#[test]
fn reset_to_earliest_makes_the_group_reread_everything() {
    let (bs, topic) = setup();
    let group = unique("earliest");
    commit_all(&bs, &topic, &group, 7);
    let topics = vec![topic.clone()];
    let expected = changes(&topic, Some(7), 0);

    let planned = reset_offsets(&bs, &no_props(), &group, &topics, ResetTarget::Earliest, true)
        .expect("dry run");
    assert_eq!(planned, expected);
    let again = reset_offsets(&bs, &no_props(), &group, &topics, ResetTarget::Earliest, true)
        .expect("dry run 2");
    assert_eq!(again, expected, "the dry run committed nothing");

    let done = reset_offsets(&bs, &no_props(), &group, &topics, ResetTarget::Earliest, false)
        .expect("reset");
    assert_eq!(done, expected);
    assert_eq!(first_offsets(&bs, &topic, &group), all(0), "consumer re-reads from the start");
}

#[test]
fn reset_to_a_time_replays_from_the_first_record_at_or_after_it() {
    let (bs, topic) = setup();
    let group = unique("to_time");
    commit_all(&bs, &topic, &group, PER_PARTITION);
    let topics = vec![topic.clone()];

    // Between record 4 (T0 + 4 s) and record 5 (T0 + 5 s): offsetsForTimes answers 5.
    let at = Utc.timestamp_millis_opt(t0() + 4500).single().expect("time");
    let done = reset_offsets(&bs, &no_props(), &group, &topics, ResetTarget::Time(at), false)
        .expect("reset to time");
    assert_eq!(done, changes(&topic, Some(PER_PARTITION), 5));
    assert_eq!(first_offsets(&bs, &topic, &group), all(5), "consumer re-reads from record 5");

    // After the newest record: nothing to replay, the group goes to the end.
    let group = unique("to_future");
    commit_all(&bs, &topic, &group, 2);
    let later = Utc.timestamp_millis_opt(t0() + 3_600_000).single().expect("time");
    let done = reset_offsets(&bs, &no_props(), &group, &topics, ResetTarget::Time(later), false)
        .expect("reset past the end");
    assert_eq!(done, changes(&topic, Some(2), PER_PARTITION));
    assert_eq!(group_lag(&bs, &no_props(), &group, &topics).expect("lag"), 0);
}

#[test]
fn reset_is_refused_while_the_group_has_members() {
    let (bs, topic) = setup();
    let group = unique("busy");
    commit_all(&bs, &topic, &group, 2);
    let member = joined_member(&bs, &topic, &group);
    let info = group_members(&bs, &no_props(), &group).expect("describe group");
    assert_eq!(info.state, "Stable", "{info:?}");
    assert_eq!(info.members.len(), 1, "{info:?}");
    let err = reset_offsets(
        &bs,
        &no_props(),
        &group,
        std::slice::from_ref(&topic),
        ResetTarget::Earliest,
        false,
    )
    .expect_err("must refuse");
    match &err {
        KafkaAdminError::GroupNotEmpty { members, .. } => {
            assert_eq!(members.len(), 1, "{err}");
            assert!(members[0].starts_with(&info.members[0].client_id), "{err}");
        }
        other => panic!("expected GroupNotEmpty, got {other}"),
    }
    drop(member);
    // Once the member has left (a clean close sends LeaveGroup), the reset goes through.
    let left = crate::common::wait_until(Duration::from_secs(20), || {
        group_members(&bs, &no_props(), &group).is_ok_and(|i| i.members.is_empty())
    });
    assert!(left, "{:?}", group_members(&bs, &no_props(), &group));
    reset_offsets(&bs, &no_props(), &group, &[topic], ResetTarget::Earliest, false)
        .expect("reset after the member left");
}

/// Subscribes a consumer to `group` and polls until it has an assignment.
fn joined_member(bs: &str, topic: &str, group: &str) -> BaseConsumer {
    let member = group_consumer(bs, group);
    member.subscribe(&[topic]).expect("subscribe");
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
