//! The operational endpoints of the API-only process (`nexus-analytics api`) on `METRICS_PORT`:
//! `/metrics` (the same OpenTelemetry Prometheus exporter as the consumer), `/livez`, and
//! `/readyz` and `/health`, which depend on the database only — the process has no Kafka.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::observe::endpoints::SERVICE_NAME;
use crate::observe::metrics::Metrics;
use crate::observe::status::Status;

/// How often the read pool is pinged for readiness, and how long a ping may take.
const PING_INTERVAL: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Probes {
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

/// `/metrics`, `/livez`, `/readyz`, `/health` for the API-only process.
pub fn router(status: Arc<Status>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .with_state(Probes { status, metrics })
}

async fn metrics_text(State(p): State<Probes>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.metrics.render())
        .into_response()
}

/// Alive while the process answers: a database outage is a readiness matter, never a restart.
async fn livez() -> Response {
    Json(json!({"alive": true})).into_response()
}

async fn readyz(State(p): State<Probes>) -> Response {
    let database = p.status.database();
    let code = if database.up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({"ready": database.up, "database": database}))).into_response()
}

async fn health(State(p): State<Probes>) -> Response {
    let database = p.status.database();
    if database.up {
        Json(json!({"status": "healthy", "service": SERVICE_NAME})).into_response()
    } else {
        let body = json!({"status": "unhealthy", "service": SERVICE_NAME,
                          "components": {"database": database}});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Pings the read pool every second and records the outcome (the error without connection
/// details) until `stop`.
pub async fn watch_database(pool: PgPool, status: Arc<Status>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let ping = tokio::time::timeout(PING_TIMEOUT, sqlx::query("SELECT 1").execute(&pool));
        match ping.await {
            Ok(Ok(_)) => status.set_database(true, "ping ok"),
            Ok(Err(e)) => status.set_database(false, crate::storage::describe_error(&e)),
            Err(_) => status.set_database(false, "ping timed out"),
        }
    }
}
