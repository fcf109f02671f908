//! The Prometheus metrics, recorded through the OpenTelemetry SDK and exposed by its
//! Prometheus exporter.
//!
//! Exporter choices (documented in the README): no `otel_scope_*` labels (one scope, they
//! would only add noise to every series), no `target_info` (we export `analytics_build_info`),
//! counter names carry `_total` themselves and histogram names their unit, so the exporter adds
//! no suffixes and the names are exactly the original service's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::ingest::event::{KNOWN_EVENT_TYPES, KNOWN_SERVICES, RejectReason};
use crate::observe::status::Status;

/// Distinct producer-supplied label values tracked beyond the known ones; the rest fold into
/// `other`, so a flood of random event types cannot grow memory or the scrape.
pub const MAX_EXTRA_LABEL_VALUES: usize = 50;

/// Why processing failed, beyond record rejections: the `reason` label values.
pub const OPERATIONAL_ERROR_REASONS: &[&str] =
    &["db_unavailable", "dead_letter_failed", "forward_failed", "kafka_error", "commit_failed"];

/// Consume-error reasons registered at zero, so an alert sees the first increase: codecs the
/// client lacks, corrupt batches, a missing topic. Others appear when they first happen.
pub const PREREGISTERED_CONSUME_ERROR_REASONS: &[&str] =
    &["not_implemented", "bad_compression", "bad_msg", "unknown_topic_or_partition", "other"];

/// Buckets for per-batch durations: sub-millisecond to tens of seconds.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const BATCH_SIZE_BUCKETS: [f64; 12] =
    [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// The kind of a series, as Prometheus' `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Histogram,
    Gauge,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
            Kind::Gauge => "gauge",
        }
    }
}

/// One metric a process registers: `nexus-analytics metrics` prints these, so dashboards and
/// alerts are checked against what the binary exports, not against its source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// Builds instruments and remembers each one it built: the catalogue cannot drift from the
/// instruments because it is the list of calls that made them.
struct Instruments {
    meter: Meter,
    series: Vec<Series>,
}

impl Instruments {
    fn note(&mut self, name: &'static str, kind: Kind, help: &'static str) {
        self.series.push(Series { name, kind, help });
    }

    fn counter(&mut self, name: &'static str, help: &'static str) -> Counter<u64> {
        self.note(name, Kind::Counter, help);
        self.meter.u64_counter(name).with_description(help).build()
    }

    fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        bounds: &[f64],
    ) -> Histogram<f64> {
        self.note(name, Kind::Histogram, help);
        self.meter
            .f64_histogram(name)
            .with_description(help)
            .with_boundaries(bounds.to_vec())
            .build()
    }

    /// An observable gauge read at scrape time by `observe`.
    fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        observe: impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<i64>) + Send + Sync + 'static,
    ) {
        self.note(name, Kind::Gauge, help);
        self.meter.i64_observable_gauge(name).with_description(help).with_callback(observe).build();
    }
}

/// Caps the distinct values of a producer-controlled label.
#[derive(Debug)]
pub struct LabelCap {
    known: HashSet<&'static str>,
    extra: Mutex<HashSet<String>>,
    max_extra: usize,
}

impl LabelCap {
    /// Known values are always kept; up to `max_extra` others are admitted first-come.
    pub fn new(known: &[&'static str], max_extra: usize) -> Self {
        Self {
            known: known.iter().copied().collect(),
            extra: Mutex::new(HashSet::new()),
            max_extra,
        }
    }

    /// The label value to record for `value`.
    pub fn label(&self, value: &str) -> String {
        if self.known.contains(value) {
            return value.to_string();
        }
        let mut extra = self.extra.lock().unwrap_or_else(|e| e.into_inner());
        if extra.contains(value) {
            return value.to_string();
        }
        if extra.len() < self.max_extra {
            extra.insert(value.to_string());
            return value.to_string();
        }
        "other".to_string()
    }
}

/// Every instrument the service records, plus the registry `/metrics` renders.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    processed: Counter<u64>,
    processing_duration: Histogram<f64>,
    errors: Counter<u64>,
    stored: Counter<u64>,
    duplicates: Counter<u64>,
    dead_letters: Counter<u64>,
    batch_size: Histogram<f64>,
    db_write_duration: Histogram<f64>,
    rebalances: Counter<u64>,
    consume_errors: Counter<u64>,
    rule_hits: Counter<u64>,
    skipped: Counter<u64>,
    expired: Counter<u64>,
    maintenance_runs: Counter<u64>,
    partitions_created: Counter<u64>,
    partitions_dropped: Counter<u64>,
    event_types: LabelCap,
    services: LabelCap,
    series: Vec<Series>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// What the process does, and so which series its `/metrics` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `nexus-analytics run`: the consumer's series, pre-registered so `rate()` works at once.
    Ingest,
    /// `nexus-analytics api`: no consumer, so no Kafka, lag or dead-letter series, which would
    /// read 0 and fire the consumer's alerts for pods that never consume.
    Api,
}

impl Metrics {
    /// Builds the instruments of an ingesting process; gauges read `status` at scrape time.
    pub fn new(status: Arc<Status>) -> Result<Arc<Self>, opentelemetry_sdk::error::OTelSdkError> {
        Self::for_role(status, Role::Ingest)
    }

    /// Builds the instruments; only [`Role::Ingest`] registers the consumer's series.
    pub fn for_role(
        status: Arc<Status>,
        role: Role,
    ) -> Result<Arc<Self>, opentelemetry_sdk::error::OTelSdkError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .without_target_info()
            .without_counter_suffixes()
            .without_units()
            .build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let mut r = Instruments { meter: provider.meter("nexus-analytics"), series: Vec::new() };
        let mut metrics = Self {
            processed: r.counter("analytics_events_processed_total", "Events stored or found already stored, by type and service"),
            processing_duration: r.histogram("analytics_events_processing_duration_seconds", "Seconds from a batch's first record being polled to its offsets being committed", &SECONDS_BUCKETS),
            errors: r.counter("analytics_events_processing_errors_total", "Processing errors by reason (rejected records and operational failures)"),
            stored: r.counter("analytics_events_stored_total", "Rows this process inserted into analytics.events (redeliveries excluded)"),
            duplicates: r.counter("analytics_events_duplicates_total", "Redelivered records skipped because their row already existed"),
            dead_letters: r.counter("analytics_dead_letters_total", "Records written to the dead-letter topic, by reason"),
            batch_size: r.histogram("analytics_batch_size", "Events per written batch", &BATCH_SIZE_BUCKETS),
            db_write_duration: r.histogram("analytics_db_write_duration_seconds", "Seconds per batch insert into PostgreSQL", &SECONDS_BUCKETS),
            rebalances: r.counter("analytics_rebalances_total", "Consumer group rebalances seen by this instance, by kind"),
            consume_errors: r.counter("analytics_consume_errors_total", "Errors the Kafka client returned instead of records, by librdkafka error code (a partition stuck on an undecodable batch repeats its error)"),
            rule_hits: r.counter("analytics_routing_rule_hits_total", "Events a routing rule decided on, by rule name"),
            skipped: r.counter("analytics_events_skipped_total", "Events a skip rule kept out of the database (not dead-lettered)"),
            expired: r.counter("analytics_events_expired_total", "Events older than the retention horizon (RETENTION_DAYS) when consumed: not stored, offsets committed"),
            maintenance_runs: r.counter("analytics_maintenance_runs_total", "Partition maintenance runs by result (ok, skipped: another replica held the lock, error)"),
            partitions_created: r.counter("analytics_partitions_created_total", "Event partitions created ahead of time"),
            partitions_dropped: r.counter("analytics_partitions_dropped_total", "Event partitions dropped by retention"),
            event_types: LabelCap::new(KNOWN_EVENT_TYPES, MAX_EXTRA_LABEL_VALUES),
            services: LabelCap::new(KNOWN_SERVICES, MAX_EXTRA_LABEL_VALUES),
            series: Vec::new(),
            registry,
            provider: provider.clone(),
        };
        if role == Role::Api {
            // The api process builds the consumer's instruments but never records them, so
            // they are not exported: its catalogue is its gauges.
            let consumer_instruments = r.series.len();
            register_api_gauges(&mut r, status);
            metrics.series = r.series.split_off(consumer_instruments);
            return Ok(Arc::new(metrics));
        }
        register_gauges(&mut r, status);
        metrics.series = r.series;
        // Pre-register error series at zero so rate() works before the first error.
        for reason in RejectReason::ALL {
            metrics.errors.add(0, &[KeyValue::new("reason", reason.as_str())]);
            metrics.dead_letters.add(0, &[KeyValue::new("reason", reason.as_str())]);
        }
        for reason in OPERATIONAL_ERROR_REASONS {
            metrics.errors.add(0, &[KeyValue::new("reason", *reason)]);
        }
        metrics.stored.add(0, &[]);
        metrics.skipped.add(0, &[]);
        metrics.expired.add(0, &[]);
        metrics.partitions_created.add(0, &[]);
        metrics.partitions_dropped.add(0, &[]);
        for result in ["ok", "skipped", "error"] {
            metrics.maintenance_runs.add(0, &[KeyValue::new("result", result)]);
        }
        metrics.duplicates.add(0, &[]);
        for reason in PREREGISTERED_CONSUME_ERROR_REASONS {
            metrics.consume_errors.add(0, &[KeyValue::new("reason", *reason)]);
        }
        Ok(Arc::new(metrics))
    }

    /// Every metric this process registered, in registration order.
    pub fn series(&self) -> &[Series] {
        &self.series
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts events written (inserted or already present), aggregated per batch by the caller.
    pub fn record_processed(&self, counts: &HashMap<(String, String), u64>) {
        for ((event_type, service), n) in counts {
            self.processed.add(
                *n,
                &[
                    KeyValue::new("event_type", self.event_types.label(event_type)),
                    KeyValue::new("service", self.services.label(service)),
                ],
            );
        }
    }

    /// Records a committed batch.
    pub fn record_batch(&self, events: usize, inserted: u64, duplicates: u64, seconds: f64) {
        self.batch_size.record(events as f64, &[]);
        self.stored.add(inserted, &[]);
        self.duplicates.add(duplicates, &[]);
        self.processing_duration.record(seconds, &[]);
    }

    /// Records one insert statement's duration.
    pub fn record_db_write(&self, seconds: f64) {
        self.db_write_duration.record(seconds, &[]);
    }

    /// Counts a dead-lettered record (also an error of the same reason).
    pub fn record_dead_letter(&self, reason: RejectReason) {
        let attrs = [KeyValue::new("reason", reason.as_str())];
        self.dead_letters.add(1, &attrs);
        self.errors.add(1, &attrs);
    }

    /// Counts an operational error (one of [`OPERATIONAL_ERROR_REASONS`]).
    pub fn record_error(&self, reason: &'static str) {
        self.errors.add(1, &[KeyValue::new("reason", reason)]);
    }

    /// Counts routing decisions of a committed batch.
    pub fn record_routing(&self, hits: &HashMap<String, u64>, skipped: u64) {
        for (rule, n) in hits {
            self.rule_hits.add(*n, &[KeyValue::new("rule", rule.clone())]);
        }
        if skipped > 0 {
            self.skipped.add(skipped, &[]);
        }
    }

    /// Counts events skipped because they were past retention when consumed.
    pub fn record_expired(&self, n: u64) {
        self.expired.add(n, &[]);
    }

    /// Pre-registers a rule's series at zero (rule names come from configuration: bounded).
    pub fn register_rule(&self, rule: &str) {
        self.rule_hits.add(0, &[KeyValue::new("rule", rule.to_string())]);
    }

    /// Records a maintenance run.
    pub fn record_maintenance(&self, result: Result<&crate::storage::partitions::Report, ()>) {
        let outcome = match result {
            Ok(r) if r.ran => {
                self.partitions_created.add(r.created.len() as u64, &[]);
                self.partitions_dropped.add(r.dropped.len() as u64, &[]);
                "ok"
            }
            Ok(_) => "skipped",
            Err(()) => "error",
        };
        self.maintenance_runs.add(1, &[KeyValue::new("result", outcome)]);
    }

    /// Counts an error the consumer returned instead of a record.
    pub fn record_consume_error(&self, reason: &str) {
        self.consume_errors.add(1, &[KeyValue::new("reason", reason.to_string())]);
    }

    /// Counts a rebalance (`assign`, `revoke` or `error`).
    pub fn record_rebalance(&self, kind: &'static str) {
        self.rebalances.add(1, &[KeyValue::new("kind", kind)]);
    }

    /// Flushes and stops the SDK.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// The query-API process's gauges: its database and its build.
fn register_api_gauges(r: &mut Instruments, status: Arc<Status>) {
    database_up_gauge(r, status);
    build_info_gauge(r);
}

fn database_up_gauge(r: &mut Instruments, status: Arc<Status>) {
    r.gauge("analytics_database_up", "1 when PostgreSQL answered the last ping", move |obs| {
        obs.observe(status.database().up as i64, &[])
    });
}

fn build_info_gauge(r: &mut Instruments) {
    r.gauge("analytics_build_info", "Always 1; labels carry the version", |obs| {
        obs.observe(1, &[KeyValue::new("version", env!("CARGO_PKG_VERSION"))])
    });
}

fn register_gauges(r: &mut Instruments, status: Arc<Status>) {
    let s = status.clone();
    r.gauge(
        "analytics_consumer_lag",
        "Messages behind per assigned partition: high watermark minus committed offset",
        move |obs| {
            for ((topic, partition), lag) in s.lag() {
                obs.observe(
                    lag,
                    &[
                        KeyValue::new("topic", topic),
                        KeyValue::new("partition", partition.to_string()),
                    ],
                );
            }
        },
    );
    let s = status.clone();
    r.gauge(
        "analytics_consumer_instance_lag",
        "Sum of analytics_consumer_lag over this instance's partitions",
        move |obs| obs.observe(s.lag().values().sum(), &[]),
    );
    let s = status.clone();
    r.gauge("analytics_assigned_partitions", "Partitions assigned to this instance", move |obs| {
        obs.observe(s.assigned_partitions(), &[])
    });
    let s = status.clone();
    r.gauge(
        "analytics_consumer_paused",
        "1 while fetching is paused because writes fail",
        move |obs| obs.observe(s.paused() as i64, &[]),
    );
    let s = status.clone();
    r.gauge(
        "analytics_kafka_up",
        "1 when a broker is reachable and the group is joined",
        move |obs| obs.observe(s.kafka().up as i64, &[]),
    );
    database_up_gauge(r, status.clone());
    let s = status.clone();
    r.gauge(
        "analytics_dead_letter_up",
        "0 while dead letters cannot be delivered to the dead-letter topic",
        move |obs| obs.observe(s.dead_letter().up as i64, &[]),
    );
    let s = status.clone();
    r.gauge(
        "analytics_forwarding_up",
        "0 while routing copies cannot be delivered to their topics",
        move |obs| obs.observe(s.forwarding().up as i64, &[]),
    );
    let s = status;
    r.gauge(
        "analytics_consumer_group_unsteady_seconds",
        "Seconds a broker has answered while this member was not in a steady group (0 when steady); /livez fails at GROUP_UNSTEADY_LIVENESS_SECS",
        move |obs| {
            obs.observe(s.unsteady_for().map_or(0, |d| d.as_secs()) as i64, &[])
        },
    );
    build_info_gauge(r);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_cap_folds_overflow_into_other() {
        let cap = LabelCap::new(&["user.login"], 2);
        assert_eq!(cap.label("user.login"), "user.login");
        assert_eq!(cap.label("a"), "a");
        assert_eq!(cap.label("b"), "b");
        assert_eq!(cap.label("c"), "other");
        assert_eq!(cap.label("a"), "a");
        assert_eq!(cap.label("user.login"), "user.login");
    }

    #[test]
    fn the_catalogue_is_what_the_exposition_carries() {
        let status = Arc::new(Status::default());
        status.set_lag([(("user-events".to_string(), 0), 1)].into_iter().collect());
        let m = Metrics::new(status).unwrap();
        m.record_processed(&[(("user.login".into(), "auth-service".into()), 1)].into());
        m.record_batch(1, 1, 0, 0.01);
        m.record_db_write(0.01);
        m.record_rebalance("assign");
        m.register_rule("r");
        let text = m.render();
        let rendered: HashSet<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        let catalogue: HashSet<(&str, &str)> =
            m.series().iter().map(|s| (s.name, s.kind.as_str())).collect();
        assert_eq!(catalogue.len(), m.series().len(), "a series registered twice");
        assert_eq!(rendered, catalogue, "every exported series, and only those, is catalogued");
        let api = Metrics::for_role(Arc::new(Status::default()), Role::Api).unwrap();
        let names: Vec<_> = api.series().iter().map(|s| s.name).collect();
        assert_eq!(names, ["analytics_database_up", "analytics_build_info"]);
    }

    #[test]
    fn exposition_has_the_original_names_and_no_otel_noise() {
        let status = Arc::new(Status::default());
        status.set_lag([(("user-events".to_string(), 3), 42)].into_iter().collect());
        let m = Metrics::new(status).unwrap();
        let mut counts = HashMap::new();
        counts.insert(("user.login".to_string(), "auth-service".to_string()), 3);
        m.record_processed(&counts);
        m.record_batch(3, 2, 1, 0.004);
        let text = m.render();
        for name in [
            "analytics_events_processed_total{event_type=\"user.login\",service=\"auth-service\"} 3",
            "analytics_events_stored_total 2",
            "analytics_events_processing_duration_seconds_bucket{le=\"0.005\"} 1",
            "analytics_events_processing_errors_total{reason=\"invalid_json\"} 0",
            "analytics_consumer_lag{partition=\"3\",topic=\"user-events\"} 42",
            "analytics_consumer_instance_lag 42",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(!text.contains("otel_scope"), "{text}");
        assert!(!text.contains("target_info"), "{text}");
    }

    #[test]
    fn the_api_process_exposes_no_consumer_series() {
        let status = Arc::new(Status::default());
        status.set_database(true, "ping ok");
        let text = Metrics::for_role(status, Role::Api).unwrap().render();
        assert!(text.contains("analytics_database_up 1"), "{text}");
        assert!(text.contains("analytics_build_info{"), "{text}");
        for absent in [
            "analytics_kafka_up",
            "analytics_consumer_",
            "analytics_dead_letter",
            "analytics_events_",
        ] {
            assert!(!text.contains(absent), "{absent} in the api process's exposition:\n{text}");
        }
    }

    #[test]
    fn a_flood_of_event_types_keeps_the_scrape_bounded() {
        let m = Metrics::new(Arc::new(Status::default())).unwrap();
        let mut counts = HashMap::new();
        for i in 0..1000 {
            counts.insert((format!("random.{i}"), "svc".to_string()), 1);
        }
        m.record_processed(&counts);
        let series = m
            .render()
            .lines()
            .filter(|l| l.starts_with("analytics_events_processed_total{"))
            .count();
        assert!(series <= MAX_EXTRA_LABEL_VALUES + 1, "{series} series");
    }
}
