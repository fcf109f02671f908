//! `nexus-analytics operator`: a kube-rs controller that keeps each `AnalyticsPipeline` true.
//!
//! - [`crd`]: the custom resource types and [`crd_yaml`] for `nexus-analytics crd`.
//! - [`resources`]: pure builders of the owned objects.
//! - [`reconcile`]: the reconciler, error policy and the Kafka seams.
//! - [`replay`]: the replay state machine.
//! - [`metrics`]: the operator's own reconcile metrics.
//! - [`leader`]: leader election on a Lease (`--leader-elect`), for more than one replica.

pub mod crd;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod replay;
pub mod resources;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};

pub use crd::{AnalyticsPipeline, crd_yaml};
pub use leader::LeaderElection;
pub use reconcile::{Context, KafkaAdmin, KafkaConnection, OffsetResetter, PartitionSource};

use metrics::OperatorMetrics;

/// Placeholder uid for a manifest read from a file: the API server assigns the real one, and
/// the children's owner references need one.
const RENDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// `nexus-analytics operator-render`: reads an AnalyticsPipeline manifest and returns what the
/// operator would apply for it (namespace `default` when the manifest names none).
pub fn render_file(path: &std::path::Path, partitions: Option<i32>) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut p: AnalyticsPipeline = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not an AnalyticsPipeline", path.display()))?;
    p.metadata.uid.get_or_insert_with(|| RENDER_UID.to_owned());
    p.metadata.namespace.get_or_insert_with(|| "default".to_owned());
    Ok(resources::render_children(&p, partitions)?)
}

/// Options of `nexus-analytics operator`.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// Port of /livez, /readyz and /metrics.
    pub port: u16,
    /// Watch only this namespace (`None`: all namespaces).
    pub namespace: Option<String>,
    /// How often a healthy pipeline is re-checked (partition count growth).
    pub recheck_interval: Duration,
    /// Reconcile only while holding this Lease (`None`: always, a single replica).
    pub leader_election: Option<LeaderElection>,
    /// The instance its Kubernetes Events are reported as (`POD_NAME`).
    pub instance: Option<String>,
}

impl Default for OperatorOptions {
    fn default() -> Self {
        Self {
            port: 8080,
            namespace: None,
            recheck_interval: Duration::from_secs(300),
            leader_election: None,
            instance: None,
        }
    }
}

#[derive(Clone)]
struct HttpState {
    ready: Arc<AtomicBool>,
    metrics: Arc<OperatorMetrics>,
}

/// The HTTP routes of the operator process.
fn router(ready: Arc<AtomicBool>, metrics: Arc<OperatorMetrics>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route("/metrics", get(|State(s): State<HttpState>| async move { s.metrics.render() }))
        .with_state(HttpState { ready, metrics })
}

/// Resolves on SIGTERM or SIGINT (while a standby waits for the Lease; the controller has its
/// own handler once it runs).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the controller until SIGTERM/SIGINT.
///
/// Ready once the AnalyticsPipeline API answers (CRD installed, RBAC in place); the
/// ServiceMonitor API is looked up once here, so installing the Prometheus Operator later needs a
/// restart of the operator. With leader election the process is ready as a standby too, starts
/// the controller once it holds the Lease, and exits with an error if it loses it (a restart
/// rejoins as a standby: no reconcile may outlive the leadership).
pub async fn run(opts: OperatorOptions) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let pipelines: Api<AnalyticsPipeline> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let metrics = Arc::new(OperatorMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));

    let addr = SocketAddr::from(([0, 0, 0, 0], opts.port));
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let app = router(ready.clone(), metrics.clone());
    // Served until the controller ends, then drained like the service's servers.
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(crate::app::serve(listener, app, http_stop.clone()));
    let result = control(client, pipelines, opts, ready, metrics).await;
    http_stop.cancel();
    match http.await {
        Ok(Err(e)) => tracing::error!(error = %e, "operator HTTP server failed"),
        Err(e) => tracing::error!(error = %e, "operator HTTP server task failed"),
        Ok(Ok(())) => {}
    }
    result
}

/// The controller proper: checks the APIs, waits for the Lease if asked to, reconciles until
/// SIGTERM/SIGINT or a lost Lease.
async fn control(
    client: Client,
    pipelines: Api<AnalyticsPipeline>,
    opts: OperatorOptions,
    ready: Arc<AtomicBool>,
    metrics: Arc<OperatorMetrics>,
) -> anyhow::Result<()> {
    pipelines
        .list(&ListParams::default().limit(1))
        .await
        .context("listing AnalyticsPipelines (is the CRD installed? `nexus-analytics crd | kubectl apply -f -`)")?;
    let monitoring_api = client
        .list_api_group_resources("monitoring.coreos.com/v1")
        .await
        .map(|l| l.resources.iter().any(|r| r.name == "servicemonitors"))
        .unwrap_or(false);
    tracing::info!(monitoring_api, "operator starting");

    let reporter =
        Reporter { controller: resources::FIELD_MANAGER.into(), instance: opts.instance.clone() };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        Arc::new(KafkaAdmin),
        Arc::new(KafkaAdmin),
        monitoring_api,
        opts.recheck_interval,
        metrics,
    ));
    let owned = watcher::Config::default()
        .labels(&format!("app.kubernetes.io/managed-by={}", resources::FIELD_MANAGER));
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = &opts.namespace;
    ready.store(true, Ordering::Relaxed);
    let mut leadership = None;
    if let Some(le) = &opts.leader_election {
        let mut l = leader::Leadership::join(client.clone(), le).await?;
        tracing::info!(lease = %le.lease_name, namespace = %le.namespace, identity = %le.identity,
            "waiting for the leader-election Lease");
        tokio::select! {
            res = l.acquired() => res?,
            _ = shutdown_signal() => {
                l.release().await;
                return Ok(());
            }
        }
        tracing::info!(identity = %le.identity, "holding the leader-election Lease: reconciling");
        leadership = Some(l);
    }
    let controller = Controller::new(pipelines, watcher::Config::default())
        .owns(api::<Job>(&client, ns), owned.clone())
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(pipeline = %obj.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile error"),
            }
        });
    let Some(mut l) = leadership else {
        controller.await;
        return Ok(());
    };
    tokio::select! {
        _ = controller => {
            l.release().await;
            Ok(())
        }
        _ = l.lost() => {
            anyhow::bail!("lost the leader-election Lease; exiting so that a restart rejoins as a standby")
        }
    }
}
