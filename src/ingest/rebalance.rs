//! The consumer's librdkafka callbacks, run on the consumer thread: a revocation flushes the
//! batch in hand before partitions move (or gives them up after a bounded wait); statistics
//! drive Kafka readiness, group liveness and consumer lag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use tracing::{error, info, warn};

use crate::ingest::batch_policy::Backoff;
use crate::ingest::lag;
use crate::ingest::pipeline::Pipeline;
use crate::observe::status::{LagMap, Status};

/// How long a revocation waits for an unavailable database before giving the partitions up.
const REVOKE_FLUSH_BUDGET: Duration = Duration::from_secs(10);

/// The consumer's context: serves librdkafka's callbacks.
pub struct PipelineContext {
    pub(super) pipeline: Arc<Pipeline>,
    /// When lag was last published, and how often it may be.
    lag_published: Mutex<Option<Instant>>,
    pub(super) lag_refresh: Duration,
    /// Watermarks (log start, high) listed from the brokers while fetching is paused:
    /// statistics only learn them from fetch responses, so without these the lag would freeze
    /// during an outage, and a partition paused before its first fetch would count as unknown.
    pub(super) listed: Mutex<HashMap<(String, i32), (i64, i64)>>,
    /// `/livez` fails after this long outside a steady group; logged once per episode.
    group_unsteady_limit: Duration,
    unsteady_reported: AtomicBool,
}

impl PipelineContext {
    /// Serves `pipeline`; lag is published at most every `lag_refresh`, and `/livez` fails
    /// after `group_unsteady_limit` outside a steady group.
    pub fn new(
        pipeline: Arc<Pipeline>,
        lag_refresh: Duration,
        group_unsteady_limit: Duration,
    ) -> Self {
        Self {
            pipeline,
            lag_published: Mutex::new(None),
            lag_refresh,
            listed: Mutex::new(HashMap::new()),
            group_unsteady_limit,
            unsteady_reported: AtomicBool::new(false),
        }
    }

    pub(super) fn status(&self) -> &Status {
        self.pipeline.status()
    }

    /// Lag from librdkafka's statistics, which arrive on the consumer thread: the high
    /// watermark from fetch responses, the committed offset and the log start of every partition
    /// assigned to us. No extra broker request per refresh, and no librdkafka call from another
    /// thread. While paused, the watermarks listed by [`refresh_listed_watermarks`] count too.
    fn publish_lag(&self, stats: &Statistics) {
        let mut last = self.lag_published.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.lag_refresh) {
            return;
        }
        *last = Some(Instant::now());
        let listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        let mut lag = LagMap::new();
        for (topic, t) in &stats.topics {
            for p in t.partitions.values() {
                if p.partition < 0 || !p.desired {
                    continue;
                }
                let committed = (p.committed_offset >= 0).then_some(p.committed_offset);
                let (listed_low, listed_high) =
                    listed.get(&(topic.clone(), p.partition)).copied().unzip();
                let low = lag::freshest_watermark(listed_low, Some(p.lo_offset)).unwrap_or(-1);
                let high = lag::freshest_watermark(listed_high, Some(p.hi_offset)).unwrap_or(-1);
                if let Some(l) = lag::partition_lag(low, high, committed) {
                    lag.insert((topic.clone(), p.partition), l);
                }
            }
        }
        self.status().set_lag(lag);
    }
}

impl ClientContext for PipelineContext {
    fn stats(&self, stats: Statistics) {
        let brokers_up =
            stats.brokers.values().filter(|b| b.nodeid >= 0 && b.state == "UP").count();
        let (joined, group_state) = match &stats.cgrp {
            Some(g) => (
                g.state == "up" && g.join_state == "steady",
                format!("{}/{}", g.state, g.join_state),
            ),
            None => (false, "no group".into()),
        };
        self.status().observe_group(brokers_up > 0, joined, &group_state);
        match self.status().unsteady_for() {
            Some(d) if d >= self.group_unsteady_limit => {
                if !self.unsteady_reported.swap(true, Ordering::Relaxed) {
                    error!(
                        group_state = %group_state,
                        unsteady_secs = d.as_secs(),
                        limit_secs = self.group_unsteady_limit.as_secs(),
                        assigned = self.status().assigned_partitions(),
                        "a broker answers but this member has not been in a steady consumer group \
                         for GROUP_UNSTEADY_LIVENESS_SECS: /livez fails so that the pod is restarted"
                    );
                }
            }
            Some(_) => {}
            None => {
                if self.unsteady_reported.swap(false, Ordering::Relaxed) {
                    info!(group_state = %group_state, "back in a steady consumer group");
                }
            }
        }
        let up = brokers_up > 0 && joined;
        let detail = format!(
            "{brokers_up} broker(s) up, group {group_state}, {} partition(s) assigned",
            self.status().assigned_partitions()
        );
        self.status().set_kafka(up, detail);
        self.publish_lag(&stats);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status().set_kafka(false, format!("all brokers down: {reason}"));
        }
        self.pipeline.metrics().record_error("kafka_error");
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(revoked) => {
                self.pipeline.metrics().record_rebalance("revoke");
                info!(
                    partitions = revoked.count(),
                    "partitions revoked; flushing the batch in hand"
                );
                let deadline = Instant::now() + REVOKE_FLUSH_BUDGET;
                let mut backoff = Backoff::default();
                loop {
                    match self.pipeline.flush(consumer, CommitMode::Sync) {
                        Ok(_) => break,
                        Err(e) if Instant::now() < deadline => {
                            warn!(error = %e, "flush before revocation failed; retrying");
                            std::thread::sleep(backoff.next_delay());
                        }
                        Err(e) => {
                            warn!(
                                error = %e,
                                "could not flush before revocation; the new owner will consume these records again"
                            );
                            self.pipeline.discard(revoked);
                            break;
                        }
                    }
                }
            }
            Rebalance::Assign(_) => self.pipeline.metrics().record_rebalance("assign"),
            Rebalance::Error(e) => {
                self.pipeline.metrics().record_rebalance("error");
                warn!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Listed watermarks belong to the old assignment (and a recreated topic starts lower).
        self.listed.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.status().set_assigned_partitions(assigned as i64);
        if let Rebalance::Assign(tpl) = rebalance {
            info!(assigned_now = tpl.count(), total = assigned, "partitions assigned");
            if self.status().paused() {
                // Still waiting for the database: do not fetch for new partitions either.
                if let Err(e) = consumer.pause(tpl) {
                    warn!(error = %e, "cannot pause newly assigned partitions");
                }
            }
        }
    }
}
