//! The operational HTTP endpoints on `METRICS_PORT`: `/metrics`, `/health` (the original
//! service's contract), `/livez` and `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::observe::metrics::Metrics;
use crate::observe::status::Status;

/// The service name in `/health`, as the original service reported it.
pub const SERVICE_NAME: &str = "analytics-service";

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    /// Runtime status.
    pub status: Arc<Status>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// `/livez` fails when the consume loop has not turned for this long.
    pub liveness_stall: Duration,
    /// `/livez` fails when a broker answers but the member has been outside a steady group
    /// for this long.
    pub group_unsteady_limit: Duration,
}

/// The router for the operational endpoints.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    let readiness = state.status.readiness();
    if readiness.ready {
        (StatusCode::OK, Json(json!({"status": "healthy", "service": SERVICE_NAME})))
            .into_response()
    } else {
        let body = json!({
            "status": "unhealthy",
            "service": SERVICE_NAME,
            "components": {
                "kafka": readiness.kafka,
                "database": readiness.database,
                "dead_letter": readiness.dead_letter,
                "forwarding": readiness.forwarding,
                "consume": readiness.consume,
            },
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn livez(State(state): State<AppState>) -> Response {
    let liveness = state.status.liveness(state.liveness_stall, state.group_unsteady_limit);
    let code = if liveness.alive { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(liveness)).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.status.readiness();
    let code = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(readiness)).into_response()
}
