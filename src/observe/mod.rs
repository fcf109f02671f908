//! Seeing the service run: [`tracing`] (logs and spans), [`metrics`] (Prometheus through
//! OpenTelemetry), [`status`] (what readiness and liveness are computed from) and
//! [`endpoints`] (`/metrics`, `/health`, `/livez`, `/readyz` on `METRICS_PORT`).

pub(crate) mod endpoints;
pub(crate) mod metrics;
pub(crate) mod status;
pub(crate) mod tracing;
