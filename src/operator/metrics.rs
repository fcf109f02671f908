//! The operator's own metrics as plain atomics rendered in Prometheus text format.
//!
//! The operator is a separate process from the consumers, so it serves these on its own
//! /metrics without needing the service's OpenTelemetry exporter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the reconcile duration histogram.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Reconcile counters and duration histogram.
#[derive(Debug, Default)]
pub struct OperatorMetrics {
    reconciles: AtomicU64,
    failures: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl OperatorMetrics {
    /// Records one reconcile.
    pub fn observe(&self, ok: bool, took: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Reconciles so far (successful or not).
    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    /// Failed reconciles so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP nexus_operator_reconciles_total Reconciles of AnalyticsPipeline resources.\n",
        );
        out.push_str("# TYPE nexus_operator_reconciles_total counter\n");
        out.push_str(&format!("nexus_operator_reconciles_total {}\n", self.reconciles()));
        out.push_str(
            "# HELP nexus_operator_reconcile_failures_total Reconciles that returned an error.\n",
        );
        out.push_str("# TYPE nexus_operator_reconcile_failures_total counter\n");
        out.push_str(&format!("nexus_operator_reconcile_failures_total {}\n", self.failures()));
        out.push_str(
            "# HELP nexus_operator_reconcile_duration_seconds Time spent in one reconcile.\n",
        );
        out.push_str("# TYPE nexus_operator_reconcile_duration_seconds histogram\n");
        for (b, bound) in self.buckets.iter().zip(BUCKETS) {
            out.push_str(&format!(
                "nexus_operator_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {}\n",
                b.load(Ordering::Relaxed)
            ));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!(
            "nexus_operator_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n"
        ));
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        out.push_str(&format!("nexus_operator_reconcile_duration_seconds_sum {sum}\n"));
        out.push_str(&format!("nexus_operator_reconcile_duration_seconds_count {count}\n"));
        out
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
