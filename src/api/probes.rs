//! The operational endpoints of the API-only process (`nexus-analytics api`) on `METRICS_PORT`:
//! `/metrics` (the same OpenTelemetry Prometheus exporter as the consumer), `/livez`, and
//! `/readyz` and `/health`, which depend on the database only — the process has no Kafka
//! (`app::watch_database` pings its read pool).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::observe::endpoints::SERVICE_NAME;
use crate::observe::metrics::Metrics;
use crate::observe::status::Status;

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
