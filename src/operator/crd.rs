//! The `AnalyticsPipeline` custom resource: one declaration of "consume these topics into this
//! database, scale on lag", which the controller keeps true.
//!
//! The types are the single source of truth: `nexus-analytics crd` prints the schema derived from
//! them, and the chart's copy is compared against that output in CI.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// Group (the project's own, not a Kubernetes one), version and kind are stated once, in the
// derive; code reads them through `kube::Resource`. (Not a doc comment: it would enter the CRD.)
/// Desired state of one consumer pipeline.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "analytics.nexuscore.io",
    version = "v1alpha1",
    kind = "AnalyticsPipeline",
    namespaced,
    shortname = "ap",
    status = "AnalyticsPipelineStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".status.partitionCount"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.currentLag"}"#,
    printcolumn = r#"{"name":"Replay","type":"string","jsonPath":".status.lastReplay.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AnalyticsPipelineSpec {
    /// Where the events come from.
    pub kafka: KafkaSpec,
    /// Where the events go.
    pub database: DatabaseSpec,
    /// Container image of nexus-analytics (used for both the consumer and the migration Job).
    pub image: String,
    /// Bounds for the number of consumer pods.
    #[serde(default)]
    pub replicas: ReplicasSpec,
    /// How the consumer Deployment is scaled between `replicas.min` and `replicas.max`.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// Resource requests and limits of the consumer container, e.g. `{requests: {cpu: 100m}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// The query API: by default served by the consumer pods (on port 8080, no Service); with
    /// `api.separate` from pods of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiSpec>,
    /// Create a Prometheus Operator ServiceMonitor (only when its API exists in the cluster).
    #[serde(default)]
    pub service_monitor: bool,
    /// Stop consuming: the consumers are scaled to zero and the autoscaler removed.
    #[serde(default)]
    pub paused: bool,
    /// Request an event replay; a new `id` starts a new replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySpec>,
}

/// Kafka connection of the pipeline.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Bootstrap servers, comma-separated (`KAFKA_BROKERS`).
    pub brokers: String,
    /// Topics to consume (`KAFKA_TOPICS`).
    #[schemars(length(min = 1))]
    pub topics: Vec<String>,
    /// Consumer group (`KAFKA_GROUP_ID`); replays reset this group's offsets.
    pub group_id: String,
    /// Optional Secret whose keys are librdkafka properties in environment spelling without the
    /// prefix (e.g. `SECURITY_PROTOCOL`, `SASL_PASSWORD`); they become `KAFKA_PROPERTY_*` variables
    /// in the pods, and the operator uses the same properties for its own Kafka calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// Where the query API runs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Serve the API from its own Deployment and Service `<name>-api` (`nexus-analytics api`:
    /// no consumer, no Kafka), so API load cannot hurt ingestion; the consumer pods then run
    /// with `API_PORT=0`.
    #[serde(default)]
    pub separate: bool,
    /// API pods when `separate`.
    #[serde(default = "default_api_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Resource requests and limits of the API container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
}

fn default_api_replicas() -> i32 {
    2
}

/// Reference to a Secret in the pipeline's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
}

/// Database connection of the pipeline.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret holding the PostgreSQL URL; it never appears in the resource itself.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the pipeline's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_database_key")]
    pub key: String,
}

fn default_database_key() -> String {
    "DATABASE_URL".to_owned()
}

/// Replica bounds.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ReplicasSpec {
    /// Lower bound (at least 1).
    #[serde(default = "default_min")]
    #[schemars(range(min = 1))]
    pub min: i32,
    /// Upper bound before the partition cap is applied.
    #[serde(default = "default_max")]
    #[schemars(range(min = 1))]
    pub max: i32,
}

fn default_min() -> i32 {
    1
}
fn default_max() -> i32 {
    6
}

impl Default for ReplicasSpec {
    fn default() -> Self {
        Self { min: default_min(), max: default_max() }
    }
}

/// Autoscaling settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// `hpa` (needs prometheus-adapter serving the External metric `nexus_analytics_consumer_lag`,
    /// rule in `k8s/prometheus-adapter/values.yaml`) or `keda` (needs KEDA; its Kafka scaler).
    #[serde(default)]
    pub kind: AutoscalerKind,
    /// Target consumer lag (records) per replica.
    #[serde(default = "default_lag_per_replica")]
    #[schemars(range(min = 1))]
    pub lag_per_replica: i64,
}

fn default_lag_per_replica() -> i64 {
    1000
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self { kind: AutoscalerKind::default(), lag_per_replica: default_lag_per_replica() }
    }
}

/// Which autoscaler drives the consumer Deployment.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalerKind {
    /// A HorizontalPodAutoscaler (autoscaling/v2).
    #[default]
    Hpa,
    /// A KEDA ScaledObject (keda.sh/v1alpha1).
    Keda,
}

/// Container resources as plain strings (quantities such as `250m`, `512Mi`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ResourcesSpec {
    /// Requests by resource name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Limits by resource name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// A replay request.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ReplaySpec {
    /// Any string; changing it starts a new replay, keeping it never repeats one.
    #[schemars(length(min = 1))]
    pub id: String,
    /// `earliest`, or an RFC 3339 timestamp: the group re-reads from the first record at or after it.
    pub from: String,
}

/// Observed state, written only by the controller.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalyticsPipelineStatus {
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Partitions of the consumed topics (summed), as last read from Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_count: Option<i32>,
    /// True when `replicas.max` was lowered to the partition count.
    #[serde(default)]
    pub max_replicas_capped: bool,
    /// Ready consumer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Records the consumer group has not committed yet (summed over the topics' partitions), as
    /// of the last reconcile; unset when Kafka could not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_lag: Option<i64>,
    /// Progress of the latest replay; the replay driver resumes from here after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replay: Option<ReplayStatus>,
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in PascalCase.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last status change.
    pub last_transition_time: String,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Persisted state of a replay.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// The `spec.replay.id` this entry belongs to.
    pub id: String,
    /// Current step.
    pub state: ReplayPhase,
    /// RFC 3339 start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// RFC 3339 end time (Done or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Last step's outcome in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Steps of a replay, in order; `Done` and `Failed` are final.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReplayPhase {
    /// Scaling the consumers to zero and removing the autoscaler.
    ScalingDown,
    /// Waiting until no consumer pod runs.
    WaitingForPodsGone,
    /// Resetting the group's committed offsets (retried while the group still has members).
    ResettingOffsets,
    /// Restoring the normal Deployment and autoscaler.
    Restoring,
    /// Finished.
    Done,
    /// Gave up; `message` says why. A new id starts over.
    Failed,
}

impl ReplayPhase {
    /// Final states need no further action.
    pub fn is_final(self) -> bool {
        matches!(self, ReplayPhase::Done | ReplayPhase::Failed)
    }
}

/// The CRD as YAML, for `nexus-analytics crd` and the chart's copy.
pub fn crd_yaml() -> String {
    let crd = AnalyticsPipeline::crd();
    // Serializing a k8s-openapi struct into YAML cannot fail: it holds only strings, numbers,
    // maps and sequences; fall back to JSON (also valid YAML) rather than panic.
    serde_saphyr::to_string(&crd)
        .unwrap_or_else(|_| serde_json::to_string_pretty(&crd).unwrap_or_default())
}
