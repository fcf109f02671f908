//! The flat layer operators write: one table of environment variables ([`VARS`]), the
//! [`RawSettings`] they deserialise into (field = variable name in lower case, as in the
//! `CONFIG_FILE` TOML), and the figment stack that layers defaults < file < environment.
//!
//! Nothing outside `config` sees this layer: [`super::Settings`] is parsed from it once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use super::{LogFormat, PartitionInterval};

/// Prefix of environment variables passed through to librdkafka.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// Names the TOML file's path; read before the other variables, never a setting itself.
pub const CONFIG_FILE: &str = "CONFIG_FILE";

/// How figment reads a variable's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    /// Numbers, booleans and enums: figment's value parsing.
    Parsed,
    /// Free text (URLs, names, tokens, JSON): taken verbatim, so a token of digits or a JSON
    /// rule list is never reinterpreted.
    Text,
}

/// Every variable the service reads besides `CONFIG_FILE` and `KAFKA_PROPERTY_*`: the one list
/// `nexus-analytics env-vars` prints, the chart is checked against, and figment filters by. A
/// unit test holds it equal to [`RawSettings`]' fields, so neither can grow alone.
const VARS: &[(&str, Value)] = &[
    ("DATABASE_URL", Value::Text),
    ("DATABASE_POOL_SIZE", Value::Parsed),
    ("DATABASE_WRITE_TIMEOUT_SECS", Value::Parsed),
    ("KAFKA_BROKERS", Value::Text),
    ("KAFKA_TOPICS", Value::Text),
    ("KAFKA_GROUP_ID", Value::Text),
    ("KAFKA_DLQ_TOPIC", Value::Text),
    ("KAFKA_SESSION_TIMEOUT_MS", Value::Parsed),
    ("METRICS_PORT", Value::Parsed),
    ("BATCH_MAX_EVENTS", Value::Parsed),
    ("BATCH_MAX_BYTES", Value::Parsed),
    ("BATCH_LINGER_MS", Value::Parsed),
    ("BATCH_MAX_IN_FLIGHT", Value::Parsed),
    ("MAX_EVENT_BYTES", Value::Parsed),
    ("FETCH_BUFFER_KBYTES", Value::Parsed),
    ("SHUTDOWN_TIMEOUT_SECS", Value::Parsed),
    ("LIVENESS_STALL_SECS", Value::Parsed),
    ("GROUP_UNSTEADY_LIVENESS_SECS", Value::Parsed),
    ("LAG_REFRESH_SECS", Value::Parsed),
    ("LOG_FORMAT", Value::Parsed),
    ("LOG_LEVEL", Value::Text),
    ("RUST_LOG", Value::Text),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", Value::Text),
    ("OTEL_SERVICE_NAME", Value::Text),
    ("API_PORT", Value::Parsed),
    ("API_TOKEN", Value::Text),
    ("API_DATABASE_URL", Value::Text),
    ("API_MAX_PAGE_BYTES", Value::Parsed),
    ("API_MAX_CONCURRENT_REQUESTS", Value::Parsed),
    ("API_STATEMENT_TIMEOUT_MS", Value::Parsed),
    ("PARTITION_INTERVAL", Value::Parsed),
    ("PARTITIONS_AHEAD", Value::Parsed),
    ("RETENTION_DAYS", Value::Parsed),
    ("MAINTENANCE_INTERVAL", Value::Text),
    ("ROUTING_RULES", Value::Text),
    // The Kafka client id (Kubernetes sets it to the pod name).
    ("HOSTNAME", Value::Text),
    // The operator's Lease identity and Event reporter (the chart's downward API).
    ("POD_NAME", Value::Text),
];

/// Every environment variable the binary reads, `CONFIG_FILE` first (`KAFKA_PROPERTY_*` aside).
pub fn env_vars() -> impl Iterator<Item = &'static str> {
    std::iter::once(CONFIG_FILE).chain(VARS.iter().map(|(name, _)| *name))
}

/// The settings as written, before parsing. Secrets are plain strings here and only here: the
/// type has no `Debug`, and [`super::Settings`] wraps them in `SecretString` at once.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub kafka_brokers: String,
    pub kafka_topics: String,
    pub kafka_group_id: String,
    pub kafka_dlq_topic: String,
    pub kafka_session_timeout_ms: u32,
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, String>,
    pub database_url: Option<String>,
    pub database_pool_size: u32,
    pub database_write_timeout_secs: u64,
    pub metrics_port: u16,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_linger_ms: u64,
    pub batch_max_in_flight: usize,
    pub max_event_bytes: usize,
    pub fetch_buffer_kbytes: u32,
    pub shutdown_timeout_secs: u64,
    pub liveness_stall_secs: u64,
    pub group_unsteady_liveness_secs: u64,
    pub lag_refresh_secs: u64,
    pub log_format: LogFormat,
    pub log_level: String,
    pub rust_log: Option<String>,
    pub otel_exporter_otlp_endpoint: Option<String>,
    pub otel_service_name: String,
    pub api_port: u16,
    pub api_token: Option<String>,
    pub api_database_url: Option<String>,
    pub api_max_page_bytes: usize,
    pub api_max_concurrent_requests: usize,
    pub api_statement_timeout_ms: u64,
    pub partition_interval: PartitionInterval,
    pub partitions_ahead: u32,
    pub retention_days: Option<u32>,
    pub maintenance_interval: String,
    pub routing_rules: Option<String>,
    pub hostname: Option<String>,
    pub pod_name: Option<String>,
}

impl Default for RawSettings {
    fn default() -> Self {
        Self {
            kafka_brokers: "localhost:9092".into(),
            kafka_topics: "user-events".into(),
            kafka_group_id: "analytics-service".into(),
            kafka_dlq_topic: "user-events.dlq".into(),
            kafka_session_timeout_ms: 10_000,
            kafka_properties: BTreeMap::new(),
            database_url: None,
            database_pool_size: 4,
            database_write_timeout_secs: 10,
            metrics_port: 9090,
            batch_max_events: 10_000,
            batch_max_bytes: 4 * 1024 * 1024,
            batch_linger_ms: 10,
            batch_max_in_flight: 2,
            max_event_bytes: 512 * 1024,
            fetch_buffer_kbytes: 4 * 1024,
            shutdown_timeout_secs: 20,
            liveness_stall_secs: 60,
            group_unsteady_liveness_secs: 300,
            lag_refresh_secs: 5,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            rust_log: None,
            otel_exporter_otlp_endpoint: None,
            otel_service_name: "nexus-analytics".into(),
            api_port: 8080,
            api_token: None,
            api_database_url: None,
            api_max_page_bytes: crate::api::DEFAULT_MAX_PAGE_BYTES,
            api_max_concurrent_requests: crate::api::DEFAULT_MAX_CONCURRENT_REQUESTS,
            api_statement_timeout_ms: crate::api::DEFAULT_STATEMENT_TIMEOUT.as_millis() as u64,
            partition_interval: PartitionInterval::Day,
            partitions_ahead: 7,
            retention_days: None,
            maintenance_interval: "1h".into(),
            routing_rules: None,
            hostname: None,
            pod_name: None,
        }
    }
}

/// The layered sources: defaults < `CONFIG_FILE` < environment (`.env` already merged into it).
pub(super) fn figment() -> Figment {
    let mut figment = Figment::from(Serialized::defaults(RawSettings::default()));
    if let Ok(path) = std::env::var(CONFIG_FILE) {
        figment = figment.merge(Toml::file_exact(PathBuf::from(path)));
    }
    let parsed: Vec<String> = VARS
        .iter()
        .filter(|(_, value)| *value == Value::Parsed)
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    figment = figment.merge(Env::raw().filter(move |k| parsed.iter().any(|n| k == n.as_str())));
    let text: BTreeMap<String, String> = Env::raw()
        .iter()
        .filter(|(k, _)| {
            VARS.iter()
                .any(|(name, value)| *value == Value::Text && k.as_str().eq_ignore_ascii_case(name))
        })
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v))
        .collect();
    figment = figment.merge(Serialized::globals(text));
    let properties: BTreeMap<String, String> = Env::prefixed(KAFKA_PROPERTY_PREFIX)
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase().replace('_', "."), v))
        .collect();
    if !properties.is_empty() {
        figment = figment.merge(Serialized::default("kafka_properties", properties));
    }
    figment
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table and the struct cannot drift: each variable is a field and each field (but the
    /// `KAFKA_PROPERTY_*` map) is a variable.
    #[test]
    fn the_variable_table_is_the_struct() {
        let value = serde_json::to_value(RawSettings::default()).expect("serialises");
        let mut fields: Vec<String> = value
            .as_object()
            .expect("an object")
            .keys()
            .filter(|k| k.as_str() != "kafka_properties")
            .cloned()
            .collect();
        let mut vars: Vec<String> = VARS.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
        fields.sort();
        vars.sort();
        assert_eq!(fields, vars);
        assert_eq!(env_vars().next(), Some(CONFIG_FILE));
    }
}
