//! Pure builders of the objects one `AnalyticsPipeline` owns.
//!
//! No I/O here: every function maps the resource (plus the partition count read elsewhere) to the
//! desired object, so the whole shape of what the operator applies is unit-tested without a cluster.
//! Objects are written as JSON literals (the shape one reads in YAML manifests) and converted to
//! the typed k8s-openapi structs, which also checks them against the API types.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::crd::{AnalyticsPipeline, AutoscalerKind, ReplicasSpec};

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "nexus-analytics-operator";
/// Container port of /metrics, /livez and /readyz (contract: METRICS_PORT, port name `metrics`).
pub const METRICS_PORT: i32 = 9090;
/// Container port of the query API (API_PORT, port name `api`).
pub const API_PORT: i32 = 8080;
/// Label holding the pipeline name on every owned object and pod.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Consumer pods drain for up to SHUTDOWN_TIMEOUT_SECS (20 s by default); the grace period must exceed it.
const TERMINATION_GRACE_SECS: i64 = 30;

/// Why a desired object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Owner references need the resource's uid, which only objects read from the API have.
    #[error("AnalyticsPipeline has no {0}; it must come from the API server")]
    MissingMetadata(&'static str),
    /// A literal did not match the k8s-openapi type (a bug in this module; caught by unit tests).
    #[error("building {kind}: {source}")]
    Shape {
        /// Kind being built.
        kind: &'static str,
        /// The serde error.
        source: serde_json::Error,
    },
    /// The pipeline's Kafka Secret asks for something KEDA's Kafka scaler cannot do.
    #[error(
        "KEDA's Kafka scaler cannot use {0} from spec.kafka.secretRef (use SASL PLAIN or SCRAM, or autoscaling.kind hpa)"
    )]
    KedaAuth(String),
}

/// Replica bounds after applying the partition cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaPlan {
    /// Autoscaler minimum.
    pub min: i32,
    /// Autoscaler maximum.
    pub max: i32,
    /// True when the maximum was lowered because the topics have fewer partitions.
    pub capped: bool,
}

/// Caps `max` (and `min` if needed) at the partition count: consumers beyond it would sit idle.
/// An unknown count (Kafka unreachable) leaves the bounds as declared.
pub fn plan_replicas(spec: &ReplicasSpec, partitions: Option<i32>) -> ReplicaPlan {
    let min = spec.min.max(1);
    let max = spec.max.max(min);
    match partitions {
        Some(p) if p >= 1 && p < max => ReplicaPlan { min: min.min(p), max: p, capped: true },
        _ => ReplicaPlan { min, max, capped: false },
    }
}

/// Labels on every owned object.
pub fn labels(p: &AnalyticsPipeline, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(p, component);
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.to_owned());
    l
}

/// Labels that select the pods of one component of one pipeline.
pub fn selector_labels(p: &AnalyticsPipeline, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "nexus-analytics".to_owned()),
        (INSTANCE_LABEL.to_owned(), p.name_any()),
        ("app.kubernetes.io/component".to_owned(), component.to_owned()),
    ])
}

/// Label selector string for the consumer pods (used to count running pods during a replay).
pub fn consumer_selector(p: &AnalyticsPipeline) -> String {
    selector_labels(p, "consumer")
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Controller owner reference, so the API server garbage-collects children with the pipeline.
pub fn owner_ref(p: &AnalyticsPipeline) -> Result<OwnerReference, BuildError> {
    if p.meta().uid.is_none() {
        return Err(BuildError::MissingMetadata("metadata.uid"));
    }
    p.controller_owner_ref(&()).ok_or(BuildError::MissingMetadata("metadata.name"))
}

fn metadata(p: &AnalyticsPipeline, name: &str, component: &str) -> Result<Value, BuildError> {
    Ok(json!({
        "name": name,
        "namespace": p.namespace(),
        "labels": labels(p, component),
        "ownerReferences": [owner_ref(p)?],
    }))
}

fn typed<T: serde::de::DeserializeOwned>(kind: &'static str, v: Value) -> Result<T, BuildError> {
    serde_json::from_value(v).map_err(|source| BuildError::Shape { kind, source })
}

/// FNV-1a: a stable short hash (std's hasher is randomly seeded per process).
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
}

/// Name of the consumer Deployment, Service, autoscaler and PDB.
pub fn consumer_name(p: &AnalyticsPipeline) -> String {
    p.name_any()
}

/// One migration Job per image: a new image runs its migrations before its Deployment rolls,
/// while an unchanged image re-applies the same (immutable) Job.
pub fn migration_job_name(p: &AnalyticsPipeline) -> String {
    let mut base = p.name_any();
    // Job names end up in a 63-character pod label.
    base.truncate(63 - "-migrate-".len() - 8 - 6);
    format!("{base}-migrate-{}", short_hash(&p.spec.image))
}

fn database_env(p: &AnalyticsPipeline) -> Value {
    let db = &p.spec.database.secret_ref;
    json!({"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": db.name, "key": db.key}}})
}

fn kafka_env_from(p: &AnalyticsPipeline) -> Value {
    match &p.spec.kafka.secret_ref {
        Some(s) => json!([{"prefix": "KAFKA_PROPERTY_", "secretRef": {"name": s.name}}]),
        None => json!([]),
    }
}

fn container_security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn pod_security_context() -> Value {
    json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}})
}

/// The Job that runs `nexus-analytics migrate` (idempotent) before consumers start.
pub fn migration_job(p: &AnalyticsPipeline) -> Result<Job, BuildError> {
    let name = migration_job_name(p);
    typed(
        "Job",
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": metadata(p, &name, "migration")?,
            "spec": {
                "backoffLimit": 3,
                "template": {
                    "metadata": {"labels": labels(p, "migration")},
                    "spec": {
                        "restartPolicy": "Never",
                        "securityContext": pod_security_context(),
                        "containers": [{
                            "name": "migrate",
                            "image": p.spec.image,
                            "args": ["migrate"],
                            "env": [database_env(p)],
                            "securityContext": container_security_context(),
                        }],
                    },
                },
            },
        }),
    )
}

/// The consumer Deployment. `replicas: None` leaves the count to the autoscaler (a fixed value
/// would fight it); `Some(0)` parks the consumers during a replay or pause.
pub fn deployment(p: &AnalyticsPipeline, replicas: Option<i32>) -> Result<Deployment, BuildError> {
    let s = &p.spec;
    let mut env = vec![
        database_env(p),
        json!({"name": "KAFKA_BROKERS", "value": s.kafka.brokers}),
        json!({"name": "KAFKA_TOPICS", "value": s.kafka.topics.join(",")}),
        json!({"name": "KAFKA_GROUP_ID", "value": s.kafka.group_id}),
        json!({"name": "METRICS_PORT", "value": METRICS_PORT.to_string()}),
    ];
    env.push(json!({"name": "LOG_FORMAT", "value": "json"}));
    if separate_api(p) {
        // The API pods serve it.
        env.push(json!({"name": "API_PORT", "value": "0"}));
    }
    let mut container = json!({
        "name": "consumer",
        "image": s.image,
        "args": ["run"],
        "env": env,
        "envFrom": kafka_env_from(p),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "metrics"}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5, "failureThreshold": 2},
        "securityContext": container_security_context(),
    });
    if let Some(r) = &s.resources {
        container["resources"] = json!({"requests": r.requests, "limits": r.limits});
    }
    let mut spec = json!({
        "selector": {"matchLabels": selector_labels(p, "consumer")},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": labels(p, "consumer")},
            "spec": {
                "terminationGracePeriodSeconds": TERMINATION_GRACE_SECS,
                "securityContext": pod_security_context(),
                "containers": [container],
            },
        },
    });
    if let Some(n) = replicas {
        spec["replicas"] = json!(n);
    }
    typed(
        "Deployment",
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(p, &consumer_name(p), "consumer")?,
            "spec": spec,
        }),
    )
}

/// Service in front of the metrics port (scraped via the ServiceMonitor or annotations).
pub fn service(p: &AnalyticsPipeline) -> Result<Service, BuildError> {
    typed(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(p, &consumer_name(p), "consumer")?,
            "spec": {
                "selector": selector_labels(p, "consumer"),
                "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
            },
        }),
    )
}

/// Whether the pipeline's query API runs in pods of its own (`spec.api.separate`).
pub fn separate_api(p: &AnalyticsPipeline) -> bool {
    p.spec.api.as_ref().is_some_and(|a| a.separate)
}

/// Name of the API Deployment and Service.
pub fn api_name(p: &AnalyticsPipeline) -> String {
    let mut base = p.name_any();
    base.truncate(63 - "-api".len());
    format!("{base}-api")
}

/// The API Deployment (`nexus-analytics api`): the query API only, ready when the database
/// answers; built for `spec.api.separate`.
pub fn api_deployment(p: &AnalyticsPipeline) -> Result<Deployment, BuildError> {
    let s = &p.spec;
    let (replicas, resources) = match &s.api {
        Some(a) => (a.replicas, a.resources.as_ref()),
        None => (2, None),
    };
    let mut container = json!({
        "name": "api",
        "image": s.image,
        "args": ["api"],
        "env": [
            database_env(p),
            {"name": "METRICS_PORT", "value": METRICS_PORT.to_string()},
            {"name": "API_PORT", "value": API_PORT.to_string()},
            {"name": "LOG_FORMAT", "value": "json"},
        ],
        "ports": [
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "api", "containerPort": API_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "metrics"}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5, "failureThreshold": 2},
        "securityContext": container_security_context(),
    });
    if let Some(r) = resources {
        container["resources"] = json!({"requests": r.requests, "limits": r.limits});
    }
    typed(
        "Deployment",
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(p, &api_name(p), "api")?,
            "spec": {
                "replicas": replicas.max(0),
                "selector": {"matchLabels": selector_labels(p, "api")},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {"labels": labels(p, "api")},
                    "spec": {
                        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECS,
                        "securityContext": pod_security_context(),
                        "containers": [container],
                    },
                },
            },
        }),
    )
}

/// The API Service: ports `api` and `metrics` of the API pods.
pub fn api_service(p: &AnalyticsPipeline) -> Result<Service, BuildError> {
    typed(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(p, &api_name(p), "api")?,
            "spec": {
                "selector": selector_labels(p, "api"),
                "ports": [
                    {"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"},
                    {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
                ],
            },
        }),
    )
}

/// API resource of the Prometheus Operator's ServiceMonitor.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// API resource of KEDA's ScaledObject.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

/// API resource of KEDA's TriggerAuthentication.
pub fn trigger_authentication_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "TriggerAuthentication"),
        "triggerauthentications",
    )
}

/// How KEDA's Kafka scaler authenticates, derived from the pipeline's Kafka Secret (librdkafka
/// properties in environment spelling, the ones the pods get as `KAFKA_PROPERTY_*`). `sasl` and
/// `tls` are literals of the trigger (KEDA takes them nowhere else); credentials are references
/// into that same Secret, so no secret value is copied into a KEDA object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KedaAuth {
    /// The Secret the references point into.
    pub secret: String,
    /// KEDA's SASL mode: `plaintext`, `scram_sha256` or `scram_sha512`.
    pub sasl: Option<&'static str>,
    /// The brokers speak TLS.
    pub tls: bool,
    /// (KEDA parameter, key of the Secret), in KEDA's order.
    pub params: Vec<(&'static str, String)>,
}

/// The librdkafka property a Kafka Secret key names: `SASL_PASSWORD` is `sasl.password`, the
/// inverse of the service's `KAFKA_PROPERTY_*` mapping (the pods get the same keys with that prefix).
pub fn property_name(secret_key: &str) -> String {
    secret_key.to_ascii_lowercase().replace('_', ".")
}

/// The scaler's authentication for a Secret's data (original key -> value); `None` for a
/// plaintext, unauthenticated connection. `ssl.ca.location` and other file paths have no KEDA
/// counterpart (the scaler's own trust store applies); PEM properties (`SSL_CA_PEM`,
/// `SSL_CERTIFICATE_PEM`, `SSL_KEY_PEM`) map to `ca`, `cert`, `key`.
pub fn keda_auth(
    secret: &str,
    data: &BTreeMap<String, String>,
) -> Result<Option<KedaAuth>, BuildError> {
    let property = |name: &str| data.iter().find(|(k, _)| property_name(k) == name);
    let upper = |name: &str| property(name).map(|(_, v)| v.trim().to_ascii_uppercase());
    let protocol = upper("security.protocol").unwrap_or_else(|| "PLAINTEXT".into());
    let (uses_sasl, tls) = match protocol.as_str() {
        "PLAINTEXT" => (false, false),
        "SSL" => (false, true),
        "SASL_PLAINTEXT" => (true, false),
        "SASL_SSL" => (true, true),
        other => return Err(BuildError::KedaAuth(format!("security.protocol {other}"))),
    };
    let sasl = if uses_sasl {
        // librdkafka's default mechanism is GSSAPI (Kerberos), which the scaler lacks.
        let mechanism = upper("sasl.mechanism")
            .or_else(|| upper("sasl.mechanisms"))
            .unwrap_or_else(|| "GSSAPI".into());
        Some(match mechanism.as_str() {
            "PLAIN" => "plaintext",
            "SCRAM-SHA-256" => "scram_sha256",
            "SCRAM-SHA-512" => "scram_sha512",
            other => return Err(BuildError::KedaAuth(format!("sasl.mechanism {other}"))),
        })
    } else {
        None
    };
    if sasl.is_none() && !tls {
        return Ok(None);
    }
    let wanted: &[(&'static str, &str)] = &[
        ("username", "sasl.username"),
        ("password", "sasl.password"),
        ("ca", "ssl.ca.pem"),
        ("cert", "ssl.certificate.pem"),
        ("key", "ssl.key.pem"),
        ("keyPassword", "ssl.key.password"),
    ];
    let params = wanted
        .iter()
        .filter(|(parameter, _)| sasl.is_some() || !matches!(*parameter, "username" | "password"))
        .filter_map(|(parameter, prop)| property(prop).map(|(key, _)| (*parameter, key.clone())))
        .collect();
    Ok(Some(KedaAuth { secret: secret.to_owned(), sasl, tls, params }))
}

/// Name of the TriggerAuthentication the ScaledObject's triggers refer to.
pub fn trigger_authentication_name(p: &AnalyticsPipeline) -> String {
    format!("{}-kafka", consumer_name(p))
}

/// The TriggerAuthentication for `auth`: each parameter a reference into the Kafka Secret.
pub fn trigger_authentication(
    p: &AnalyticsPipeline,
    auth: &KedaAuth,
) -> Result<DynamicObject, BuildError> {
    let ar = trigger_authentication_resource();
    let refs: Vec<Value> = auth
        .params
        .iter()
        .map(|(parameter, key)| json!({"parameter": parameter, "name": auth.secret, "key": key}))
        .collect();
    dynamic(
        &ar,
        "TriggerAuthentication",
        json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": metadata(p, &trigger_authentication_name(p), "consumer")?,
            "spec": {"secretTargetRef": refs},
        }),
    )
}

fn dynamic(ar: &ApiResource, kind: &'static str, v: Value) -> Result<DynamicObject, BuildError> {
    let mut obj: DynamicObject = typed(kind, v)?;
    obj.types =
        Some(kube::api::TypeMeta { api_version: ar.api_version.clone(), kind: ar.kind.clone() });
    Ok(obj)
}

/// The External metric the HPA scales on (served by prometheus-adapter).
pub const LAG_METRIC: &str = "nexus_analytics_consumer_lag";

/// ServiceMonitor for the Prometheus Operator (applied only when that API exists).
pub fn service_monitor(p: &AnalyticsPipeline) -> Result<DynamicObject, BuildError> {
    let ar = service_monitor_resource();
    dynamic(
        &ar,
        "ServiceMonitor",
        json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": metadata(p, &consumer_name(p), "consumer")?,
            "spec": {
                "selector": {"matchLabels": selector_labels(p, "consumer")},
                "endpoints": [{
                    "port": "metrics",
                    "path": "/metrics",
                    "interval": "30s",
                    // The HPA's External metric selects the group by this label.
                    "relabelings": [{
                        "action": "replace",
                        "targetLabel": "consumer_group",
                        "replacement": p.spec.kafka.group_id,
                    }],
                }],
            },
        }),
    )
}

/// HPA on the group's total lag, the External metric `nexus_analytics_consumer_lag` that
/// prometheus-adapter serves from the pods' `analytics_consumer_instance_lag` (the rule in
/// `k8s/prometheus-adapter/values.yaml`, shared with the chart). With `AverageValue` the HPA
/// wants ceil(lag / lagPerReplica) replicas.
pub fn hpa(
    p: &AnalyticsPipeline,
    plan: ReplicaPlan,
) -> Result<HorizontalPodAutoscaler, BuildError> {
    typed(
        "HorizontalPodAutoscaler",
        json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(p, &consumer_name(p), "consumer")?,
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": consumer_name(p)},
                "minReplicas": plan.min,
                "maxReplicas": plan.max,
                "metrics": [{
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": LAG_METRIC,
                            "selector": {"matchLabels": {"consumer_group": p.spec.kafka.group_id}},
                        },
                        "target": {"type": "AverageValue", "averageValue": p.spec.autoscaling.lag_per_replica.to_string()},
                    },
                }],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            },
        }),
    )
}

/// KEDA ScaledObject with one Kafka trigger per topic (KEDA scales on the largest); with `auth`
/// the triggers carry its `sasl`/`tls` literals and refer to [`trigger_authentication`].
pub fn scaled_object(
    p: &AnalyticsPipeline,
    plan: ReplicaPlan,
    auth: Option<&KedaAuth>,
) -> Result<DynamicObject, BuildError> {
    let ar = scaled_object_resource();
    let k = &p.spec.kafka;
    let triggers: Vec<Value> = k
        .topics
        .iter()
        .map(|t| {
            let mut trigger = json!({
                "type": "kafka",
                "metadata": {
                    "bootstrapServers": k.brokers,
                    "consumerGroup": k.group_id,
                    "topic": t,
                    "lagThreshold": p.spec.autoscaling.lag_per_replica.to_string(),
                },
            });
            if let Some(auth) = auth {
                if let Some(sasl) = auth.sasl {
                    trigger["metadata"]["sasl"] = json!(sasl);
                }
                if auth.tls {
                    trigger["metadata"]["tls"] = json!("enable");
                }
                trigger["authenticationRef"] = json!({"name": trigger_authentication_name(p)});
            }
            trigger
        })
        .collect();
    dynamic(
        &ar,
        "ScaledObject",
        json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": metadata(p, &consumer_name(p), "consumer")?,
            "spec": {
                "scaleTargetRef": {"name": consumer_name(p)},
                "minReplicaCount": plan.min,
                "maxReplicaCount": plan.max,
                "triggers": triggers,
            },
        }),
    )
}

/// Keeps all but one consumer up during voluntary disruptions (node drains).
pub fn pdb(p: &AnalyticsPipeline) -> Result<PodDisruptionBudget, BuildError> {
    typed(
        "PodDisruptionBudget",
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(p, &consumer_name(p), "consumer")?,
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector_labels(p, "consumer")},
            },
        }),
    )
}

/// Every child the reconciler applies for a running (not paused, not replaying) pipeline, in
/// its order, as YAML documents: for `nexus-analytics operator-render`, so CI can validate the
/// operator's output against the real Kubernetes and CRD schemas without a cluster.
/// `partitions` stands in for the count the reconciler reads from Kafka.
pub fn render_children(
    p: &AnalyticsPipeline,
    partitions: Option<i32>,
) -> Result<String, BuildError> {
    let plan = plan_replicas(&p.spec.replicas, partitions);
    let mut docs =
        vec![to_value(migration_job(p)?), to_value(deployment(p, None)?), to_value(service(p)?)];
    if p.spec.service_monitor {
        docs.push(to_value(service_monitor(p)?));
    }
    docs.push(match p.spec.autoscaling.kind {
        AutoscalerKind::Hpa => to_value(hpa(p, plan)?),
        AutoscalerKind::Keda => to_value(scaled_object(p, plan, None)?),
    });
    docs.push(to_value(pdb(p)?));
    if separate_api(p) {
        docs.push(to_value(api_deployment(p)?));
        docs.push(to_value(api_service(p)?));
    }
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        // Plain JSON values always serialise; JSON is valid YAML should that ever change.
        out.push_str(&serde_saphyr::to_string(&doc).unwrap_or_else(|_| doc.to_string()));
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

fn to_value(object: impl serde::Serialize) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// The autoscaler kind in use, for callers that must delete or apply it.
pub fn autoscaler_kind(p: &AnalyticsPipeline) -> AutoscalerKind {
    p.spec.autoscaling.kind
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::operator::crd::AnalyticsPipelineSpec;

    /// A pipeline as read from the API server (with uid), shared by the operator's tests.
    pub(crate) fn pipeline() -> AnalyticsPipeline {
        let spec: AnalyticsPipelineSpec = serde_json::from_value(json!({
            "kafka": {"brokers": "kafka:9092", "topics": ["user-events"], "groupId": "analytics-service"},
            "database": {"secretRef": {"name": "analytics-db"}},
            "image": "ghcr.io/nexuscore/nexus-analytics:0.1.0",
            "replicas": {"min": 2, "max": 10},
        }))
        .expect("valid spec literal");
        let mut p = AnalyticsPipeline::new("events", spec);
        p.metadata.namespace = Some("analytics".into());
        p.metadata.uid = Some("0d6b7a2e-1111-2222-3333-444455556666".into());
        p.metadata.generation = Some(1);
        p
    }

    #[test]
    fn spec_defaults_apply() {
        let p = pipeline();
        assert_eq!(p.spec.database.secret_ref.key, "DATABASE_URL");
        assert_eq!(p.spec.autoscaling.kind, AutoscalerKind::Hpa);
        assert_eq!(p.spec.autoscaling.lag_per_replica, 1000);
        assert!(!p.spec.paused && !p.spec.service_monitor);
    }

    #[test]
    fn plan_caps_at_partitions() {
        let r = ReplicasSpec { min: 2, max: 10 };
        assert_eq!(plan_replicas(&r, Some(6)), ReplicaPlan { min: 2, max: 6, capped: true });
        assert_eq!(plan_replicas(&r, Some(12)), ReplicaPlan { min: 2, max: 10, capped: false });
        assert_eq!(plan_replicas(&r, Some(10)), ReplicaPlan { min: 2, max: 10, capped: false });
        assert_eq!(plan_replicas(&r, None), ReplicaPlan { min: 2, max: 10, capped: false });
        // Fewer partitions than the minimum: the minimum follows, never above max.
        assert_eq!(plan_replicas(&r, Some(1)), ReplicaPlan { min: 1, max: 1, capped: true });
        // A zero count (topic missing) is treated as unknown rather than scaling to nothing.
        assert_eq!(plan_replicas(&r, Some(0)), ReplicaPlan { min: 2, max: 10, capped: false });
        // max below min is lifted to min.
        let bad = ReplicasSpec { min: 3, max: 1 };
        assert_eq!(plan_replicas(&bad, None), ReplicaPlan { min: 3, max: 3, capped: false });
    }

    #[test]
    fn deployment_uses_contract_env_and_probes() {
        let p = pipeline();
        let d = serde_json::to_value(deployment(&p, None).expect("builds")).expect("json");
        assert_eq!(d["metadata"]["ownerReferences"][0]["kind"], "AnalyticsPipeline");
        assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
        assert!(d["spec"].get("replicas").is_none(), "autoscaler owns replicas");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"], json!(["run"]));
        let env = c["env"].as_array().expect("env");
        let get = |n: &str| env.iter().find(|e| e["name"] == n).cloned();
        assert_eq!(
            get("DATABASE_URL").expect("db")["valueFrom"]["secretKeyRef"],
            json!({"name": "analytics-db", "key": "DATABASE_URL"})
        );
        assert_eq!(get("KAFKA_BROKERS").expect("b")["value"], "kafka:9092");
        assert_eq!(get("KAFKA_TOPICS").expect("t")["value"], "user-events");
        assert_eq!(get("KAFKA_GROUP_ID").expect("g")["value"], "analytics-service");
        assert_eq!(get("METRICS_PORT").expect("m")["value"], "9090");
        assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/livez", "port": "metrics"}));
        assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
        assert_eq!(c["ports"][0]["name"], "metrics");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert!(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64() > Some(20));

        let zero = serde_json::to_value(deployment(&p, Some(0)).expect("builds")).expect("json");
        assert_eq!(zero["spec"]["replicas"], 0);
    }

    #[test]
    fn kafka_secret_becomes_prefixed_env_from() {
        let mut p = pipeline();
        p.spec.kafka.secret_ref =
            Some(crate::operator::crd::SecretRef { name: "kafka-auth".into() });
        let d = serde_json::to_value(deployment(&p, None).expect("builds")).expect("json");
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["envFrom"],
            json!([{"prefix": "KAFKA_PROPERTY_", "secretRef": {"name": "kafka-auth"}}])
        );
    }

    #[test]
    fn migration_job_runs_migrate_and_is_named_per_image() {
        let mut p = pipeline();
        let j = serde_json::to_value(migration_job(&p).expect("builds")).expect("json");
        let name = j["metadata"]["name"].as_str().expect("name").to_owned();
        assert!(name.starts_with("events-migrate-"), "{name}");
        let c = &j["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"], json!(["migrate"]));
        assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");
        p.spec.image = "ghcr.io/nexuscore/nexus-analytics:0.2.0".into();
        assert_ne!(migration_job_name(&p), name, "a new image gets a new Job");
        p.metadata.name = Some("x".repeat(80));
        assert!(migration_job_name(&p).len() <= 63 - 6);
    }

    #[test]
    fn hpa_and_scaled_object_carry_the_plan() {
        let p = pipeline();
        let plan = ReplicaPlan { min: 2, max: 6, capped: true };
        let h = serde_json::to_value(hpa(&p, plan).expect("builds")).expect("json");
        assert_eq!(h["spec"]["maxReplicas"], 6);
        assert_eq!(h["spec"]["minReplicas"], 2);
        let m = &h["spec"]["metrics"][0]["external"];
        assert_eq!(m["metric"]["name"], LAG_METRIC);
        assert_eq!(m["metric"]["selector"]["matchLabels"]["consumer_group"], p.spec.kafka.group_id);
        assert_eq!(m["target"]["averageValue"], "1000");
        let sm = serde_json::to_value(service_monitor(&p).expect("builds")).expect("json");
        let relabel = &sm["spec"]["endpoints"][0]["relabelings"][0];
        assert_eq!(relabel["targetLabel"], "consumer_group");
        assert_eq!(relabel["replacement"], p.spec.kafka.group_id);
        let so =
            serde_json::to_value(scaled_object(&p, plan, None).expect("builds")).expect("json");
        assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
        assert_eq!(so["kind"], "ScaledObject");
        assert_eq!(so["spec"]["maxReplicaCount"], 6);
        assert_eq!(so["spec"]["triggers"][0]["metadata"]["topic"], "user-events");
        assert_eq!(so["spec"]["triggers"][0]["metadata"]["lagThreshold"], "1000");
        assert!(so["spec"]["triggers"][0].get("authenticationRef").is_none());
    }

    fn secret(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The operator gives KEDA what the pods get: SASL/TLS from the Kafka Secret, by reference.
    #[test]
    fn keda_authenticates_like_the_pods() {
        let p = pipeline();
        let data = secret(&[
            ("SECURITY_PROTOCOL", "SASL_SSL"),
            ("SASL_MECHANISMS", "SCRAM-SHA-512"),
            ("SASL_USERNAME", "analytics"),
            ("SASL_PASSWORD", "hunter2"),
            ("SSL_CA_PEM", "-----BEGIN CERTIFICATE-----"),
        ]);
        let auth = keda_auth("kafka-auth", &data).expect("supported").expect("needs auth");
        assert_eq!(auth.sasl, Some("scram_sha512"));
        assert!(auth.tls);
        let plan = ReplicaPlan { min: 1, max: 6, capped: false };
        let so = serde_json::to_value(scaled_object(&p, plan, Some(&auth)).expect("builds"))
            .expect("json");
        let t = &so["spec"]["triggers"][0];
        assert_eq!(t["metadata"]["sasl"], "scram_sha512");
        assert_eq!(t["metadata"]["tls"], "enable");
        assert_eq!(t["authenticationRef"]["name"], "events-kafka");
        let ta =
            serde_json::to_value(trigger_authentication(&p, &auth).expect("builds")).expect("json");
        assert_eq!(ta["kind"], "TriggerAuthentication");
        assert_eq!(ta["metadata"]["name"], "events-kafka");
        assert_eq!(
            ta["spec"]["secretTargetRef"],
            json!([
                {"parameter": "username", "name": "kafka-auth", "key": "SASL_USERNAME"},
                {"parameter": "password", "name": "kafka-auth", "key": "SASL_PASSWORD"},
                {"parameter": "ca", "name": "kafka-auth", "key": "SSL_CA_PEM"},
            ])
        );
        assert!(!ta.to_string().contains("hunter2"), "a reference, never the value");
    }

    #[test]
    fn keda_auth_covers_each_protocol() {
        assert_eq!(keda_auth("s", &secret(&[])).expect("ok"), None);
        assert_eq!(
            keda_auth("s", &secret(&[("SECURITY_PROTOCOL", "plaintext")])).expect("ok"),
            None
        );
        let tls = keda_auth("s", &secret(&[("SECURITY_PROTOCOL", "SSL"), ("SASL_USERNAME", "u")]))
            .expect("ok")
            .expect("tls");
        assert_eq!((tls.sasl, tls.tls), (None, true));
        assert!(tls.params.is_empty(), "no SASL credentials without SASL: {:?}", tls.params);
        let plain = keda_auth(
            "s",
            &secret(&[("SECURITY_PROTOCOL", "SASL_PLAINTEXT"), ("sasl_mechanism", "PLAIN")]),
        )
        .expect("ok")
        .expect("sasl");
        assert_eq!((plain.sasl, plain.tls), (Some("plaintext"), false));
        for bad in [
            secret(&[("SECURITY_PROTOCOL", "SASL_SSL")]),
            secret(&[("SECURITY_PROTOCOL", "SASL_SSL"), ("SASL_MECHANISMS", "OAUTHBEARER")]),
            secret(&[("SECURITY_PROTOCOL", "TLS")]),
        ] {
            let err = keda_auth("s", &bad).expect_err("unsupported").to_string();
            assert!(err.starts_with("KEDA's Kafka scaler cannot use"), "{err}");
        }
    }

    #[test]
    fn service_pdb_and_monitor_select_consumers() {
        let p = pipeline();
        let sel = json!(selector_labels(&p, "consumer"));
        let s = serde_json::to_value(service(&p).expect("builds")).expect("json");
        assert_eq!(s["spec"]["selector"], sel);
        assert_eq!(s["spec"]["ports"][0]["port"], 9090);
        let b = serde_json::to_value(pdb(&p).expect("builds")).expect("json");
        assert_eq!(b["spec"]["selector"]["matchLabels"], sel);
        let m = serde_json::to_value(service_monitor(&p).expect("builds")).expect("json");
        assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(m["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(
            consumer_selector(&p),
            "app.kubernetes.io/component=consumer,app.kubernetes.io/instance=events,app.kubernetes.io/name=nexus-analytics"
        );
    }

    #[test]
    fn separate_api_gets_its_own_deployment_and_service() {
        let mut p = pipeline();
        let consumer_env = |p: &AnalyticsPipeline| {
            let d = serde_json::to_value(deployment(p, None).expect("builds")).expect("json");
            d["spec"]["template"]["spec"]["containers"][0]["env"].clone()
        };
        assert!(!consumer_env(&p).as_array().unwrap().iter().any(|e| e["name"] == "API_PORT"));
        assert!(!render_children(&p, Some(6)).unwrap().contains("nexus-analytics api"));
        p.spec.api = serde_json::from_value(json!({"separate": true, "replicas": 3})).unwrap();
        let env = consumer_env(&p);
        assert!(env.as_array().unwrap().contains(&json!({"name": "API_PORT", "value": "0"})));

        let d = serde_json::to_value(api_deployment(&p).expect("builds")).expect("json");
        assert_eq!(d["metadata"]["name"], "events-api");
        assert_eq!(d["spec"]["replicas"], 3);
        let sel = json!(selector_labels(&p, "api"));
        assert_eq!(d["spec"]["selector"]["matchLabels"], sel);
        assert_ne!(sel, json!(selector_labels(&p, "consumer")));
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"], json!(["api"]));
        assert!(
            c["env"].as_array().unwrap().contains(&json!({"name": "API_PORT", "value": "8080"}))
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        let s = serde_json::to_value(api_service(&p).expect("builds")).expect("json");
        assert_eq!(s["spec"]["selector"], sel);
        assert_eq!(s["spec"]["ports"][0]["name"], "api");
        let rendered = render_children(&p, Some(6)).unwrap();
        assert!(rendered.contains("name: events-api"), "{rendered}");
    }

    #[test]
    fn builders_refuse_objects_without_uid() {
        let mut p = pipeline();
        p.metadata.uid = None;
        assert!(matches!(deployment(&p, None), Err(BuildError::MissingMetadata(_))));
    }

    #[test]
    fn crd_yaml_names_group_kind_and_shortname() {
        let y = crate::operator::crd::crd_yaml();
        assert!(y.contains("name: analyticspipelines.analytics.nexuscore.io"), "{y}");
        assert!(y.contains("kind: AnalyticsPipeline"));
        assert!(y.contains("- ap"));
        assert!(y.contains("scope: Namespaced"));
        assert!(y.contains("v1alpha1"));
    }
}
