//! Kafka-side administration shared by the operator and the `replay` CLI: partition counts,
//! consumer-group membership and lag, and committed-offset resets.
//!
//! All functions block (librdkafka calls with timeouts); async callers run them on
//! `tokio::task::spawn_blocking`. `props` are librdkafka properties (e.g. `security.protocol`),
//! the same ones the service reads from `KAFKA_PROPERTY_*`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::ingest::lag;

/// Timeout of each broker round trip.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the Kafka administration functions.
#[derive(Debug, thiserror::Error)]
pub enum KafkaAdminError {
    /// A librdkafka call failed.
    #[error("{context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The librdkafka error.
        source: KafkaError,
    },
    /// The topic does not exist (or has no partitions).
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    /// Offsets of a group with members cannot be reset: the members would overwrite them.
    #[error("consumer group {group:?} still has {} active member(s): {}", members.len(), members.join(", "))]
    GroupNotEmpty {
        /// Group id.
        group: String,
        /// Member descriptions (`client_id@host`).
        members: Vec<String>,
    },
    /// The broker answered with an offset that cannot be committed.
    #[error("no usable offset for {topic}[{partition}]: {offset:?}")]
    UnusableOffset {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// What came back.
        offset: String,
    },
}

fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> KafkaAdminError {
    let context = context.into();
    move |source| KafkaAdminError::Kafka { context, source }
}

/// Where a reset moves the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTarget {
    /// The log start (low watermark) of every partition.
    Earliest,
    /// The first record whose timestamp is at or after this time; partitions with no such record
    /// go to their end (nothing to replay there).
    Time(DateTime<Utc>),
}

/// One partition's committed offset before and after a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionChange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Committed offset before (`None` if the group had none).
    pub old: Option<i64>,
    /// Committed offset after.
    pub new: i64,
}

/// A member of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Member id assigned by the coordinator.
    pub id: String,
    /// The member's `client.id`.
    pub client_id: String,
    /// The member's host as seen by the broker.
    pub host: String,
}

/// State and members of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupInfo {
    /// Coordinator's state (`Empty`, `Stable`, `PreparingRebalance`, `Dead`, ...).
    pub state: String,
    /// Active members; empty when no consumer is joined.
    pub members: Vec<GroupMember>,
}

fn consumer(
    brokers: &str,
    props: &BTreeMap<String, String>,
    group: Option<&str>,
) -> Result<BaseConsumer, KafkaAdminError> {
    let mut cfg = ClientConfig::new();
    for (k, v) in props {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", brokers)
        .set("enable.auto.commit", "false")
        .set("client.id", "nexus-analytics-admin");
    // Without a group.id librdkafka refuses to create a consumer; an unused one does no harm as
    // long as this consumer never subscribes.
    cfg.set("group.id", group.unwrap_or("nexus-analytics-admin"));
    cfg.create().map_err(kafka("creating Kafka client"))
}

fn partitions_of(c: &BaseConsumer, topic: &str) -> Result<Vec<i32>, KafkaAdminError> {
    let md =
        c.fetch_metadata(Some(topic), TIMEOUT).map_err(kafka(format!("metadata of {topic}")))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| KafkaAdminError::UnknownTopic(topic.to_owned()))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(KafkaAdminError::UnknownTopic(topic.to_owned()));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Number of partitions of `topic` (the most consumers of one group that can be busy on it).
pub fn partition_count(
    brokers: &str,
    props: &BTreeMap<String, String>,
    topic: &str,
) -> Result<i32, KafkaAdminError> {
    let c = consumer(brokers, props, None)?;
    let n = partitions_of(&c, topic)?.len();
    Ok(i32::try_from(n).unwrap_or(i32::MAX))
}

/// Every partition of `topics`, each with `group`'s committed offset (`Invalid` where none).
fn committed_offsets(
    c: &BaseConsumer,
    group: &str,
    topics: &[String],
) -> Result<TopicPartitionList, KafkaAdminError> {
    let mut all = TopicPartitionList::new();
    for topic in topics {
        for p in partitions_of(c, topic)? {
            all.add_partition(topic, p);
        }
    }
    // A coordinator that is moving (a broker failed over) or still loading its offsets
    // partition (the first group on a new cluster creates __consumer_offsets) answers with a
    // retriable error for a moment.
    let mut attempt = 0;
    loop {
        match c.committed_offsets(all.clone(), TIMEOUT) {
            Err(e) if attempt < COORDINATOR_RETRIES && coordinator_moving(&e) => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            other => {
                return other.map_err(kafka(format!("committed offsets of group {group}")));
            }
        }
    }
}

/// How often a committed-offsets read is retried while the group's coordinator moves.
const COORDINATOR_RETRIES: u32 = 20;

fn coordinator_moving(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
        )
    )
}

/// Records `group` still has to consume on `topics`: per partition, high watermark minus the
/// committed offset (the log start when it never committed), summed. Reads offsets only; it
/// never joins the group.
pub fn group_lag(
    brokers: &str,
    props: &BTreeMap<String, String>,
    group: &str,
    topics: &[String],
) -> Result<i64, KafkaAdminError> {
    let c = consumer(brokers, props, Some(group))?;
    let committed = committed_offsets(&c, group, topics)?;
    let mut total = 0i64;
    for e in committed.elements() {
        let (low, high) = c
            .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
            .map_err(kafka(format!("watermarks of {}[{}]", e.topic(), e.partition())))?;
        let offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        total += lag::partition_lag(low, high, offset).unwrap_or(0);
    }
    Ok(total)
}

/// State and active members of `group`; an unknown group reads as empty.
pub fn group_members(
    brokers: &str,
    props: &BTreeMap<String, String>,
    group: &str,
) -> Result<GroupInfo, KafkaAdminError> {
    let c = consumer(brokers, props, None)?;
    let list = c
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(kafka(format!("describing group {group}")))?;
    let Some(g) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok(GroupInfo::default());
    };
    Ok(GroupInfo {
        state: g.state().to_owned(),
        members: g
            .members()
            .iter()
            .map(|m| GroupMember {
                id: m.id().to_owned(),
                client_id: m.client_id().to_owned(),
                host: m.client_host().to_owned(),
            })
            .collect(),
    })
}

/// Maps an offsets-for-times answer to the offset to commit; `End` (no record at or after the
/// time) is resolved by the caller to the high watermark, anything else unusable is `None`.
fn resolve_time_offset(found: Offset) -> Option<i64> {
    match found {
        Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    }
}

/// Moves `group`'s committed offsets on every partition of `topics` to `target`.
///
/// Refuses while the group has members: a running consumer would commit over the reset. With
/// `dry_run` nothing is committed and the returned changes say what would happen. Resetting to
/// the same target twice gives the same offsets, so a retried reset is harmless.
pub fn reset_offsets(
    brokers: &str,
    props: &BTreeMap<String, String>,
    group: &str,
    topics: &[String],
    target: ResetTarget,
    dry_run: bool,
) -> Result<Vec<PartitionChange>, KafkaAdminError> {
    // Friendly refusal listing the members. A broker without ListGroups/DescribeGroups (such as
    // librdkafka's mock cluster) cannot answer; the coordinator's own check on the commit below
    // (a commit from outside the group is refused while it has members) still protects the group.
    match group_members(brokers, props, group) {
        Ok(info) if !info.members.is_empty() => {
            return Err(KafkaAdminError::GroupNotEmpty {
                group: group.to_owned(),
                members: info
                    .members
                    .iter()
                    .map(|m| format!("{}@{}", m.client_id, m.host))
                    .collect(),
            });
        }
        Ok(_) => {}
        Err(KafkaAdminError::Kafka {
            source: KafkaError::GroupListFetch(RDKafkaErrorCode::UnsupportedFeature),
            ..
        }) => {
            tracing::debug!(group, "broker cannot describe groups; relying on the commit check");
        }
        Err(e) => return Err(e),
    }
    let c = consumer(brokers, props, Some(group))?;
    let committed = committed_offsets(&c, group, topics)?;

    let targets: TopicPartitionList = match target {
        ResetTarget::Earliest => {
            let mut tpl = TopicPartitionList::new();
            for e in committed.elements() {
                let (low, _) = c
                    .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
                    .map_err(kafka(format!("watermarks of {}[{}]", e.topic(), e.partition())))?;
                tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(low))
                    .map_err(kafka("building offsets"))?;
            }
            tpl
        }
        ResetTarget::Time(t) => {
            let mut query = TopicPartitionList::new();
            for e in committed.elements() {
                query
                    .add_partition_offset(
                        e.topic(),
                        e.partition(),
                        Offset::Offset(t.timestamp_millis()),
                    )
                    .map_err(kafka("building offsets"))?;
            }
            let found = c
                .offsets_for_times(query, TIMEOUT)
                .map_err(kafka(format!("offsets for time {t}")))?;
            let mut tpl = TopicPartitionList::new();
            for e in found.elements() {
                let off = match e.offset() {
                    Offset::End => {
                        let (_, high) =
                            c.fetch_watermarks(e.topic(), e.partition(), TIMEOUT).map_err(
                                kafka(format!("watermarks of {}[{}]", e.topic(), e.partition())),
                            )?;
                        high
                    }
                    other => resolve_time_offset(other).ok_or_else(|| {
                        KafkaAdminError::UnusableOffset {
                            topic: e.topic().to_owned(),
                            partition: e.partition(),
                            offset: format!("{other:?}"),
                        }
                    })?,
                };
                tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(off))
                    .map_err(kafka("building offsets"))?;
            }
            tpl
        }
    };

    let mut changes = Vec::new();
    for e in targets.elements() {
        let Offset::Offset(new) = e.offset() else {
            continue;
        };
        let old =
            committed.find_partition(e.topic(), e.partition()).and_then(|c| match c.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        changes.push(PartitionChange {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            old,
            new,
        });
    }
    changes.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));

    if !dry_run && !changes.is_empty() {
        c.commit(&targets, CommitMode::Sync).map_err(|e| match e {
            // What the coordinator answers a commit from outside a group that has members.
            KafkaError::ConsumerCommit(
                code @ (RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress),
            ) => KafkaAdminError::GroupNotEmpty {
                group: group.to_owned(),
                members: vec![format!("unknown (the coordinator refused the commit: {code})")],
            },
            other => kafka(format!("committing offsets of group {group}"))(other),
        })?;
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_lookup_results_map_to_offsets() {
        assert_eq!(resolve_time_offset(Offset::Offset(5)), Some(5));
        assert_eq!(resolve_time_offset(Offset::Offset(0)), Some(0));
        assert_eq!(resolve_time_offset(Offset::Invalid), None);
        assert_eq!(resolve_time_offset(Offset::Beginning), None);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = KafkaAdminError::GroupNotEmpty {
            group: "g".into(),
            members: vec!["rdkafka@/10.0.0.7".into()],
        };
        assert_eq!(
            e.to_string(),
            "consumer group \"g\" still has 1 active member(s): rdkafka@/10.0.0.7"
        );
    }
}
