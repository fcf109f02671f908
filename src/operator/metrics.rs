//! The operator's own metrics, through the `prometheus` crate (already in the tree for the
//! service's exporter) on a registry of their own.
//!
//! The operator is a separate process from the consumers, so it serves these on its own
//! /metrics without needing the service's OpenTelemetry exporter.

use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, Registry, TextEncoder};

/// Upper bounds (seconds) of the reconcile duration histogram.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Reconcile counters and duration histogram.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Registry,
    reconciles: IntCounter,
    failures: IntCounter,
    duration: Histogram,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let reconciles = IntCounter::new(
            "nexus_operator_reconciles_total",
            "Reconciles of AnalyticsPipeline resources.",
        )
        .expect("valid metric");
        let failures = IntCounter::new(
            "nexus_operator_reconcile_failures_total",
            "Reconciles that returned an error.",
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "nexus_operator_reconcile_duration_seconds",
                "Time spent in one reconcile.",
            )
            .buckets(BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let registry = Registry::new();
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
        ] {
            registry.register(collector).expect("distinct metric names");
        }
        Self { registry, reconciles, failures, duration }
    }
}

impl OperatorMetrics {
    /// Records one reconcile.
    pub fn observe(&self, ok: bool, took: Duration) {
        self.reconciles.inc();
        if !ok {
            self.failures.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// Reconciles so far (successful or not).
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// Failed reconciles so far.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the operator metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = OperatorMetrics::default();
        m.observe(true, Duration::from_millis(20));
        m.observe(false, Duration::from_secs(3));
        let t = m.render();
        assert!(t.contains("nexus_operator_reconciles_total 2\n"), "{t}");
        assert!(t.contains("nexus_operator_reconcile_failures_total 1\n"));
        assert!(t.contains("_bucket{le=\"0.025\"} 1\n"));
        assert!(t.contains("_bucket{le=\"5\"} 2\n"));
        assert!(t.contains("_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("_count 2\n"));
    }
}
