//! The reconciler: turns one `AnalyticsPipeline` into its owned objects with server-side apply,
//! drives replays, and reports progress in the status and as Events.
//!
//! Kafka is reached only through [`PartitionSource`] and [`OffsetResetter`], so the reconciler is
//! tested against a mocked API server with fakes in their place.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::crd::{
    AnalyticsPipeline, AnalyticsPipelineStatus, AutoscalerKind, Condition, ReplayPhase,
    ReplayStatus,
};
use super::metrics::OperatorMetrics;
use super::replay::{self, Observations};
use super::resources::{self, BuildError, FIELD_MANAGER};
use crate::kafka::admin::{self, KafkaAdminError, PartitionChange, ResetTarget};

/// Requeue while a migration Job runs.
const MIGRATION_POLL: Duration = Duration::from_secs(10);
/// Requeue between replay steps (a step that just finished continues almost at once).
const REPLAY_STEP: Duration = Duration::from_secs(1);
/// Requeue while consumer pods stop or the group still has members.
const REPLAY_WAIT: Duration = Duration::from_secs(5);
/// Requeue while the Deployment is not ready yet.
const NOT_READY_POLL: Duration = Duration::from_secs(30);
/// First error backoff; doubles per consecutive failure up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_secs(5);
/// Longest error backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Errors that make a reconcile fail (and requeue with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A desired object could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The resource has no namespace (the CRD is namespaced, so only a malformed object).
    #[error("AnalyticsPipeline {0} has no namespace")]
    MissingNamespace(String),
}

/// How the operator reaches Kafka for one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    /// Bootstrap servers.
    pub brokers: String,
    /// librdkafka properties from the pipeline's Kafka Secret.
    pub props: BTreeMap<String, String>,
    /// That Secret's data as written (key -> value), for KEDA's references into it.
    pub secret_data: BTreeMap<String, String>,
}

/// Reads partition counts and group lag; the real one is [`KafkaAdmin`], tests inject a fake.
pub trait PartitionSource: Send + Sync {
    /// Partitions of `topic`.
    fn partition_count<'a>(
        &'a self,
        conn: &'a KafkaConnection,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i32, KafkaAdminError>>;

    /// Records `group` has not consumed on `topics`.
    fn group_lag<'a>(
        &'a self,
        conn: &'a KafkaConnection,
        group: &'a str,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<i64, KafkaAdminError>>;
}

/// Resets a group's committed offsets; the real one is [`KafkaAdmin`], tests inject a fake.
pub trait OffsetResetter: Send + Sync {
    /// Moves `group` on `topics` to `target` (refusing while the group has members).
    fn reset<'a>(
        &'a self,
        conn: &'a KafkaConnection,
        group: &'a str,
        topics: &'a [String],
        target: ResetTarget,
    ) -> BoxFuture<'a, Result<Vec<PartitionChange>, KafkaAdminError>>;
}

/// [`PartitionSource`] and [`OffsetResetter`] backed by [`crate::kafka::admin`] on blocking threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaAdmin;

fn join_error(e: tokio::task::JoinError) -> KafkaAdminError {
    KafkaAdminError::Kafka {
        context: format!("Kafka admin task: {e}"),
        source: rdkafka::error::KafkaError::Canceled,
    }
}

impl PartitionSource for KafkaAdmin {
    fn partition_count<'a>(
        &'a self,
        conn: &'a KafkaConnection,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<i32, KafkaAdminError>> {
        let (conn, topic) = (conn.clone(), topic.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                admin::partition_count(&conn.brokers, &conn.props, &topic)
            })
            .await
            .map_err(join_error)?
        })
    }

    fn group_lag<'a>(
        &'a self,
        conn: &'a KafkaConnection,
        group: &'a str,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<i64, KafkaAdminError>> {
        let (conn, group, topics) = (conn.clone(), group.to_owned(), topics.to_vec());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                admin::group_lag(&conn.brokers, &conn.props, &group, &topics)
            })
            .await
            .map_err(join_error)?
        })
    }
}

impl OffsetResetter for KafkaAdmin {
    fn reset<'a>(
        &'a self,
        conn: &'a KafkaConnection,
        group: &'a str,
        topics: &'a [String],
        target: ResetTarget,
    ) -> BoxFuture<'a, Result<Vec<PartitionChange>, KafkaAdminError>> {
        let (conn, group, topics) = (conn.clone(), group.to_owned(), topics.to_vec());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                admin::reset_offsets(&conn.brokers, &conn.props, &group, &topics, target, false)
            })
            .await
            .map_err(join_error)?
        })
    }
}

/// Shared state of the controller.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Partition counts.
    pub partitions: Arc<dyn PartitionSource>,
    /// Offset resets.
    pub resetter: Arc<dyn OffsetResetter>,
    /// Whether the `monitoring.coreos.com/v1` ServiceMonitor API exists (checked at start).
    pub monitoring_api: bool,
    /// How often a healthy pipeline is re-checked (partition count may have grown).
    pub recheck: Duration,
    /// Reconcile metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Builds the context.
    pub fn new(
        client: Client,
        recorder: Recorder,
        partitions: Arc<dyn PartitionSource>,
        resetter: Arc<dyn OffsetResetter>,
        monitoring_api: bool,
        recheck: Duration,
        metrics: Arc<OperatorMetrics>,
    ) -> Self {
        Self {
            client,
            recorder,
            partitions,
            resetter,
            monitoring_api,
            recheck,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }
}

fn key(p: &AnalyticsPipeline) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// Entry point for the Controller: reconciles and records metrics.
pub async fn reconcile(p: Arc<AnalyticsPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let res = reconcile_inner(&p, &ctx).await;
    ctx.metrics.observe(res.is_ok(), start.elapsed());
    match &res {
        Ok(_) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key(&p));
            }
        }
        Err(e) => {
            tracing::warn!(pipeline = %key(&p), error = %e, "reconcile failed");
            publish(&ctx, &p, EventType::Warning, "ReconcileFailed", "Reconcile", e.to_string())
                .await;
        }
    }
    res
}

/// Requeues a failed object after 5 s, doubling per consecutive failure up to 5 min.
pub fn error_policy(p: Arc<AnalyticsPipeline>, _err: &Error, ctx: Arc<Context>) -> Action {
    let n = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(key(&p)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
    Action::requeue(BASE_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF))
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn publish(
    ctx: &Context,
    p: &AnalyticsPipeline,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    // An Event that cannot be written must not fail the reconcile that caused it.
    if let Err(e) = ctx.recorder.publish(&ev, &p.object_ref(&())).await {
        tracing::warn!(pipeline = %key(p), error = %e, "publishing event failed");
    }
}

async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(name, &pp, &Patch::Apply(obj)).await?)
}

/// Deletes, treating "already gone" as success.
async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sets a condition, keeping its transition time when the status did not change.
fn set_condition(
    conds: &mut Vec<Condition>,
    old: &[Condition],
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if on { "True" } else { "False" };
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    conds.retain(|c| c.type_ != type_);
    conds.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
        observed_generation: generation,
    });
}

fn condition<'a>(st: &'a AnalyticsPipelineStatus, type_: &str) -> Option<&'a Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

/// What one reconcile concluded, turned into the three conditions.
struct Verdict<'a> {
    ready: bool,
    progressing: bool,
    degraded: bool,
    reason: &'a str,
    message: String,
}

struct Run<'a> {
    p: &'a AnalyticsPipeline,
    ctx: &'a Context,
    ns: String,
    name: String,
    old: AnalyticsPipelineStatus,
    st: AnalyticsPipelineStatus,
    conn: KafkaConnection,
    kafka_problem: Option<String>,
}

impl Run<'_> {
    fn api<K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>>(
        &self,
    ) -> Api<K> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn write_status(&mut self, v: Verdict<'_>) -> Result<(), Error> {
        let generation = self.p.metadata.generation;
        let old = self.old.conditions.clone();
        let mut conds = Vec::new();
        let msg = v.message.as_str();
        let (ready_reason, prog_reason) =
            if v.ready { ("Ready", "Stable") } else { (v.reason, v.reason) };
        set_condition(&mut conds, &old, "Ready", v.ready, ready_reason, msg, generation);
        set_condition(&mut conds, &old, "Progressing", v.progressing, prog_reason, msg, generation);
        let (degraded, dreason, dmsg) = match (&self.kafka_problem, v.degraded) {
            (_, true) => (true, v.reason, msg.to_owned()),
            (Some(k), false) => (true, "KafkaUnreachable", k.clone()),
            (None, false) => (false, "AsExpected", String::new()),
        };
        set_condition(&mut conds, &old, "Degraded", degraded, dreason, &dmsg, generation);
        self.st.conditions = conds;
        self.st.observed_generation = generation;
        let api: Api<AnalyticsPipeline> = self.api();
        let body = json!({
            "apiVersion": AnalyticsPipeline::api_version(&()),
            "kind": AnalyticsPipeline::kind(&()),
            "status": self.st
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&self.name, &pp, &Patch::Apply(&body)).await?;
        Ok(())
    }

    /// Consumers to zero: the autoscaler goes first so it cannot scale them back up.
    async fn scale_to_zero(&self) -> Result<(), Error> {
        match resources::autoscaler_kind(self.p) {
            AutoscalerKind::Hpa => {
                delete_if_exists(&self.api::<HorizontalPodAutoscaler>(), &self.name).await?
            }
            AutoscalerKind::Keda => {
                let api: Api<DynamicObject> = Api::namespaced_with(
                    self.ctx.client.clone(),
                    &self.ns,
                    &resources::scaled_object_resource(),
                );
                delete_if_exists(&api, &self.name).await?
            }
        }
        apply(&self.api::<Deployment>(), &self.name, &resources::deployment(self.p, Some(0))?)
            .await?;
        Ok(())
    }

    async fn running_pods(&self) -> Result<u32, Error> {
        let lp = ListParams::default().labels(&resources::consumer_selector(self.p));
        let pods = self.api::<Pod>().list(&lp).await?;
        let running = pods
            .items
            .iter()
            .filter(|pod| {
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .count();
        Ok(u32::try_from(running).unwrap_or(u32::MAX))
    }

    fn replay_status(&mut self, id: &str, state: ReplayPhase, message: String) {
        let prev = self.old.last_replay.as_ref().filter(|l| l.id == id);
        let started = prev.and_then(|l| l.started.clone()).or_else(|| Some(now()));
        let finished = state.is_final().then(now);
        self.st.last_replay = Some(ReplayStatus {
            id: id.to_owned(),
            state,
            started,
            finished,
            message: Some(message),
        });
    }

    fn replay_id(&self) -> String {
        self.p.spec.replay.as_ref().map(|r| r.id.clone()).unwrap_or_default()
    }

    async fn replaying(&mut self, message: String, requeue: Duration) -> Result<Action, Error> {
        self.write_status(Verdict {
            ready: false,
            progressing: true,
            degraded: false,
            reason: "Replaying",
            message,
        })
        .await?;
        Ok(Action::requeue(requeue))
    }

    /// Executes one replay step. `Some(action)` ends this reconcile; `None` continues normally.
    async fn drive_replay(&mut self) -> Result<Option<Action>, Error> {
        let spec = self.p.spec.replay.clone();
        let last = self.old.last_replay.clone();
        let mut obs = Observations::default();
        let mut step = replay::next_step(spec.as_ref(), last.as_ref(), &obs);
        if step == replay::Action::CountPods {
            obs.running_pods = Some(self.running_pods().await?);
            step = replay::next_step(spec.as_ref(), last.as_ref(), &obs);
        }
        match step {
            replay::Action::Idle => Ok(None),
            replay::Action::CountPods => Ok(Some(Action::requeue(REPLAY_WAIT))),
            replay::Action::ScaleDown { id, new } => {
                self.scale_to_zero().await?;
                let msg = "consumers scaled to 0; waiting for their pods to stop".to_owned();
                self.replay_status(&id, ReplayPhase::WaitingForPodsGone, msg.clone());
                if new {
                    let from = spec.map(|s| s.from).unwrap_or_default();
                    let note = format!("replay {id} from {from}: scaling consumers to 0");
                    publish(self.ctx, self.p, EventType::Normal, "ReplayStarted", "Replay", note)
                        .await;
                }
                self.replaying(msg, REPLAY_STEP).await.map(Some)
            }
            replay::Action::WaitForPods { running } => {
                let msg = format!("waiting for {running} consumer pod(s) to stop");
                self.replay_status(&self.replay_id(), ReplayPhase::WaitingForPodsGone, msg.clone());
                self.replaying(msg, REPLAY_WAIT).await.map(Some)
            }
            replay::Action::PodsGone => {
                let msg = "no consumer pod runs; resetting offsets".to_owned();
                self.replay_status(&self.replay_id(), ReplayPhase::ResettingOffsets, msg.clone());
                self.replaying(msg, REPLAY_STEP).await.map(Some)
            }
            replay::Action::ResetOffsets { target } => {
                let k = &self.p.spec.kafka;
                let res = self.ctx.resetter.reset(&self.conn, &k.group_id, &k.topics, target).await;
                let id = self.replay_id();
                match res {
                    Ok(changes) => {
                        let msg = format!(
                            "reset {} partition(s) of group {} to {}",
                            changes.len(),
                            k.group_id,
                            describe(target)
                        );
                        self.replay_status(&id, ReplayPhase::Restoring, msg.clone());
                        publish(
                            self.ctx,
                            self.p,
                            EventType::Normal,
                            "OffsetsReset",
                            "Replay",
                            msg.clone(),
                        )
                        .await;
                        self.replaying(msg, REPLAY_STEP).await.map(Some)
                    }
                    Err(e) => {
                        // Stay in ResettingOffsets: a lingering member leaves within its session
                        // timeout, a broker hiccup passes; the step is retried as is.
                        let msg = format!("offset reset not done yet: {e}");
                        let repeated =
                            last.as_ref().and_then(|l| l.message.as_deref()) == Some(msg.as_str());
                        self.replay_status(&id, ReplayPhase::ResettingOffsets, msg.clone());
                        if !repeated {
                            publish(
                                self.ctx,
                                self.p,
                                EventType::Warning,
                                "OffsetResetRetry",
                                "Replay",
                                msg.clone(),
                            )
                            .await;
                        }
                        self.replaying(msg, REPLAY_WAIT).await.map(Some)
                    }
                }
            }
            replay::Action::Restore => {
                let id = self.replay_id();
                self.replay_status(&id, ReplayPhase::Done, "consumers restored".into());
                let note = format!("replay {id} finished; consumers restored");
                publish(self.ctx, self.p, EventType::Normal, "ReplayFinished", "Replay", note)
                    .await;
                Ok(None)
            }
            replay::Action::Fail { id, message } => {
                self.replay_status(&id, ReplayPhase::Failed, message.clone());
                publish(self.ctx, self.p, EventType::Warning, "ReplayFailed", "Replay", message)
                    .await;
                Ok(None)
            }
        }
    }

    /// Sums the partitions of all topics (consumers beyond that would sit idle); on failure the
    /// last known count is kept and the problem reported as Degraded.
    async fn read_partitions(&mut self) -> Option<i32> {
        let mut total = 0i32;
        for topic in &self.p.spec.kafka.topics {
            match self.ctx.partitions.partition_count(&self.conn, topic).await {
                Ok(n) => total = total.saturating_add(n),
                Err(e) => {
                    self.kafka_problem = Some(format!("reading partitions of {topic}: {e}"));
                    return self.old.partition_count;
                }
            }
        }
        Some(total)
    }

    /// The group's lag, for `kubectl get`; unknown (and logged) when Kafka cannot say. Not a
    /// health signal: scaling reads lag from Prometheus or KEDA.
    async fn read_lag(&self) -> Option<i64> {
        let kafka = &self.p.spec.kafka;
        match self.ctx.partitions.group_lag(&self.conn, &kafka.group_id, &kafka.topics).await {
            Ok(lag) => Some(lag),
            Err(e) => {
                tracing::warn!(pipeline = %self.name, error = %e, "cannot read the consumer group's lag");
                None
            }
        }
    }
}

fn describe(t: ResetTarget) -> String {
    match t {
        ResetTarget::Earliest => "earliest".into(),
        ResetTarget::Time(t) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

/// librdkafka properties from a Secret's data (key -> value): keys through
/// [`resources::property_name`].
pub fn props_from_secret(data: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    data.iter().map(|(k, v)| (resources::property_name(k), v.clone())).collect()
}

async fn kafka_connection(
    ctx: &Context,
    p: &AnalyticsPipeline,
    ns: &str,
) -> Result<KafkaConnection, Error> {
    let data = match &p.spec.kafka.secret_ref {
        Some(s) => Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get(&s.name)
            .await?
            .data
            .unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let secret_data: BTreeMap<String, String> =
        data.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect();
    Ok(KafkaConnection {
        brokers: p.spec.kafka.brokers.clone(),
        props: props_from_secret(&secret_data),
        secret_data,
    })
}

fn job_state(job: &Job) -> (bool, bool) {
    let Some(s) = &job.status else {
        return (false, false);
    };
    let cond = |t: &str| {
        s.conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    (s.succeeded.unwrap_or(0) > 0 || cond("Complete"), cond("Failed"))
}

async fn reconcile_inner(p: &AnalyticsPipeline, ctx: &Context) -> Result<Action, Error> {
    let name = p.name_any();
    let ns = p.namespace().ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let old = p.status.clone().unwrap_or_default();
    let conn = kafka_connection(ctx, p, &ns).await?;
    let mut run = Run { p, ctx, ns, name, st: old.clone(), old, conn, kafka_problem: None };

    if let Some(action) = run.drive_replay().await? {
        return Ok(action);
    }

    if p.spec.paused {
        run.scale_to_zero().await?;
        run.write_status(Verdict {
            ready: false,
            progressing: false,
            degraded: false,
            reason: "Paused",
            message: "spec.paused: consumers scaled to 0".into(),
        })
        .await?;
        return Ok(Action::requeue(ctx.recheck));
    }

    // The migration must succeed before a Deployment with this image rolls out.
    let job =
        apply(&run.api::<Job>(), &resources::migration_job_name(p), &resources::migration_job(p)?)
            .await?;
    let (done, failed) = job_state(&job);
    if !done {
        let job_name = resources::migration_job_name(p);
        let (reason, message, degraded) = if failed {
            (
                "MigrationFailed",
                format!("migration Job {job_name} failed; fix and change the image to retry"),
                true,
            )
        } else {
            ("MigrationRunning", format!("waiting for migration Job {job_name}"), false)
        };
        if failed
            && condition(&run.old, "Degraded").map(|c| c.reason.as_str()) != Some("MigrationFailed")
        {
            publish(ctx, p, EventType::Warning, "MigrationFailed", "Migrate", message.clone())
                .await;
        }
        run.write_status(Verdict { ready: false, progressing: !failed, degraded, reason, message })
            .await?;
        return Ok(Action::requeue(if failed { ctx.recheck } else { MIGRATION_POLL }));
    }

    let partitions = run.read_partitions().await;
    let plan = resources::plan_replicas(&p.spec.replicas, partitions);
    let dep = apply(&run.api::<Deployment>(), &run.name, &resources::deployment(p, None)?).await?;
    apply(&run.api::<Service>(), &run.name, &resources::service(p)?).await?;
    if p.spec.service_monitor && ctx.monitoring_api {
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            &run.ns,
            &resources::service_monitor_resource(),
        );
        apply(&api, &run.name, &resources::service_monitor(p)?).await?;
    }
    match p.spec.autoscaling.kind {
        AutoscalerKind::Hpa => {
            apply(&run.api::<HorizontalPodAutoscaler>(), &run.name, &resources::hpa(p, plan)?)
                .await?;
        }
        AutoscalerKind::Keda => {
            // The scaler authenticates as the pods do (spec.kafka.secretRef), by reference.
            let auth = match &p.spec.kafka.secret_ref {
                Some(s) => resources::keda_auth(&s.name, &run.conn.secret_data)?,
                None => None,
            };
            let auth_api: Api<DynamicObject> = Api::namespaced_with(
                ctx.client.clone(),
                &run.ns,
                &resources::trigger_authentication_resource(),
            );
            let auth_name = resources::trigger_authentication_name(p);
            match &auth {
                Some(a) => {
                    apply(&auth_api, &auth_name, &resources::trigger_authentication(p, a)?).await?;
                }
                None => delete_if_exists(&auth_api, &auth_name).await?,
            }
            let api: Api<DynamicObject> = Api::namespaced_with(
                ctx.client.clone(),
                &run.ns,
                &resources::scaled_object_resource(),
            );
            apply(&api, &run.name, &resources::scaled_object(p, plan, auth.as_ref())?).await?;
        }
    }
    apply(&run.api::<PodDisruptionBudget>(), &run.name, &resources::pdb(p)?).await?;
    if resources::separate_api(p) {
        // The query API in pods of its own (spec.api.separate): readers never share a process
        // with ingestion.
        let name = resources::api_name(p);
        apply(&run.api::<Deployment>(), &name, &resources::api_deployment(p)?).await?;
        apply(&run.api::<Service>(), &name, &resources::api_service(p)?).await?;
    }

    if plan.capped && !run.old.max_replicas_capped {
        let note = format!(
            "max replicas capped at {} (partition count) instead of {}",
            plan.max, p.spec.replicas.max
        );
        publish(ctx, p, EventType::Normal, "MaxReplicasCapped", "Scale", note).await;
    }
    let ready_replicas = dep.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    run.st.partition_count = partitions;
    run.st.current_lag = run.read_lag().await;
    run.st.max_replicas_capped = plan.capped;
    run.st.ready_replicas = Some(ready_replicas);
    let ready = ready_replicas >= plan.min;
    let mut message = format!("{ready_replicas}/{} consumer(s) ready, max {}", plan.min, plan.max);
    if plan.capped {
        message.push_str(&format!(
            " (capped: topics have {} partition(s), spec.replicas.max is {})",
            plan.max, p.spec.replicas.max
        ));
    }
    let was_ready = condition(&run.old, "Ready").is_some_and(|c| c.status == "True");
    if ready && !was_ready {
        publish(ctx, p, EventType::Normal, "Ready", "Reconcile", message.clone()).await;
    }
    run.write_status(Verdict {
        ready,
        progressing: !ready,
        degraded: false,
        reason: if ready { "Ready" } else { "RollingOut" },
        message,
    })
    .await?;
    Ok(Action::requeue(if ready { ctx.recheck } else { NOT_READY_POLL }))
}
