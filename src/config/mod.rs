//! Service configuration: one struct, loaded once with figment
//! (defaults < `CONFIG_FILE` TOML < `.env` < environment), validated before anything starts.
//!
//! Environment variable names are the original Go service's (`KAFKA_BROKERS`, `DATABASE_URL`,
//! `METRICS_PORT`) plus the ones listed in [`ENV_VARS`]. Any librdkafka property can be passed as
//! `KAFKA_PROPERTY_<NAME>` (dots become underscores), so TLS and SASL need no code changes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Prefix of environment variables passed through to librdkafka.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// Every environment variable the service reads (besides `KAFKA_PROPERTY_*`), so the chart and
/// the code cannot drift apart unnoticed (`nexus-analytics env-vars` prints this list).
pub const ENV_VARS: &[&str] = &[
    "CONFIG_FILE",
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "DATABASE_WRITE_TIMEOUT_SECS",
    "KAFKA_BROKERS",
    "KAFKA_TOPICS",
    "KAFKA_GROUP_ID",
    "KAFKA_DLQ_TOPIC",
    "KAFKA_SESSION_TIMEOUT_MS",
    "METRICS_PORT",
    "BATCH_MAX_EVENTS",
    "BATCH_MAX_BYTES",
    "BATCH_LINGER_MS",
    "BATCH_MAX_IN_FLIGHT",
    "MAX_EVENT_BYTES",
    "FETCH_BUFFER_KBYTES",
    "SHUTDOWN_TIMEOUT_SECS",
    "LIVENESS_STALL_SECS",
    "GROUP_UNSTEADY_LIVENESS_SECS",
    "LAG_REFRESH_SECS",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "API_PORT",
    "API_TOKEN",
    "API_DATABASE_URL",
    "API_MAX_PAGE_BYTES",
    "API_MAX_CONCURRENT_REQUESTS",
    "API_STATEMENT_TIMEOUT_MS",
    "PARTITION_INTERVAL",
    "PARTITIONS_AHEAD",
    "RETENTION_DAYS",
    "MAINTENANCE_INTERVAL",
    "ROUTING_RULES",
    // Read by `nexus-analytics operator` only (the pod name it reports events as).
    "POD_NAME",
];

/// Variables holding free text (URLs, names, tokens, JSON): never parsed as numbers or lists.
const TEXT_ENV_VARS: &[&str] = &[
    "DATABASE_URL",
    "KAFKA_BROKERS",
    "KAFKA_TOPICS",
    "KAFKA_GROUP_ID",
    "KAFKA_DLQ_TOPIC",
    "LOG_LEVEL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "API_TOKEN",
    "API_DATABASE_URL",
    "MAINTENANCE_INTERVAL",
    "ROUTING_RULES",
];

/// Listed in [`ENV_VARS`] but read elsewhere: the file path, the log filter override, the
/// OpenTelemetry SDK and the operator.
const NOT_SETTINGS: &[&str] = &["CONFIG_FILE", "RUST_LOG", "OTEL_SERVICE_NAME", "POD_NAME"];

/// Bounds of `API_MAX_PAGE_BYTES`: a page smaller than one typical event is pointless, a
/// larger one than 64 MiB defeats the point of a budget.
const MIN_API_PAGE_BYTES: usize = 16 * 1024;
const MAX_API_PAGE_BYTES: usize = 64 * 1024 * 1024;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Width of one `analytics.events` partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionInterval {
    /// One partition per UTC day.
    Day,
    /// One partition per UTC month.
    Month,
}

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration problem, naming the setting as the operator spells it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting has no value.
    #[error("missing setting {0}: it is required")]
    Missing(&'static str),
    /// A setting has a value the service cannot use.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The environment variable name.
        setting: String,
        /// Why it was rejected (never contains the secret value).
        reason: String,
    },
    /// The config file or `.env` could not be read.
    #[error("cannot read configuration: {0}")]
    Source(String),
}

/// The whole service configuration. Field names are the environment variable names in lower case.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Bootstrap servers, comma-separated.
    pub kafka_brokers: String,
    /// Topics to consume, comma-separated.
    pub kafka_topics: String,
    /// Consumer group shared by all replicas.
    pub kafka_group_id: String,
    /// Where undecodable or rejected records go.
    pub kafka_dlq_topic: String,
    /// Group session timeout; a dead replica's partitions move after this long.
    pub kafka_session_timeout_ms: u32,
    /// librdkafka properties passed through verbatim (security, tuning).
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, Secret>,
    /// PostgreSQL URL (required).
    pub database_url: Option<Secret>,
    /// Connections in the write pool.
    pub database_pool_size: u32,
    /// A batch write that takes longer is abandoned and retried (keeps the loop turning).
    pub database_write_timeout_secs: u64,
    /// Port of `/metrics`, `/health`, `/livez`, `/readyz`.
    pub metrics_port: u16,
    /// A batch is written when it holds this many events...
    pub batch_max_events: usize,
    /// ...or this many payload bytes...
    pub batch_max_bytes: usize,
    /// ...or its first event has waited this long.
    pub batch_linger_ms: u64,
    /// Batches written at once, in overlapping transactions on separate pool connections, while
    /// the next one is consumed; offsets still commit in consumption order.
    pub batch_max_in_flight: usize,
    /// Records larger than this are dead-lettered instead of stored.
    pub max_event_bytes: usize,
    /// Bound on records librdkafka prefetches (`queued.max.messages.kbytes`): caps memory.
    pub fetch_buffer_kbytes: u32,
    /// Drain budget on SIGTERM; the pod's grace period must be longer.
    pub shutdown_timeout_secs: u64,
    /// `/livez` fails when the consume loop has not turned for this long.
    pub liveness_stall_secs: u64,
    /// `/livez` fails when a broker answers but the member has not been in a steady group
    /// (joined, assignment received) for this long: a restart rejoins from scratch.
    pub group_unsteady_liveness_secs: u64,
    /// How often consumer lag is recomputed.
    pub lag_refresh_secs: u64,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `nexus_analytics=debug`.
    pub log_level: String,
    /// OTLP/HTTP endpoint for spans; unset means no span export.
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// Port of the query API (`/api/v1/...`), separate from the metrics port; 0 disables it.
    pub api_port: u16,
    /// When set, every API request must carry `Authorization: Bearer <token>`.
    pub api_token: Option<Secret>,
    /// Read-only connection for the API; defaults to `DATABASE_URL`.
    pub api_database_url: Option<Secret>,
    /// JSON bytes one API event page may hold (a single larger event is returned alone).
    pub api_max_page_bytes: usize,
    /// API requests served at once (one read connection each); more get 503 `overloaded`.
    pub api_max_concurrent_requests: usize,
    /// Statement timeout of every API query.
    pub api_statement_timeout_ms: u64,
    /// `day` or `month`.
    pub partition_interval: PartitionInterval,
    /// Partitions created ahead of the current one.
    pub partitions_ahead: u32,
    /// Drop event partitions entirely older than this many days; unset keeps everything.
    pub retention_days: Option<u32>,
    /// How often partition maintenance runs, e.g. `1h`, `15m`, `3600s`.
    pub maintenance_interval: String,
    /// Filtering and routing rules as a JSON array (see [`crate::ingest::routing`]).
    pub routing_rules: Option<String>,
}

impl Default for Settings {
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
            fetch_buffer_kbytes: 16 * 1024,
            shutdown_timeout_secs: 20,
            liveness_stall_secs: 60,
            group_unsteady_liveness_secs: 300,
            lag_refresh_secs: 5,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otel_exporter_otlp_endpoint: None,
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
        }
    }
}

impl Settings {
    /// Loads from the process environment, `.env` in the working directory and `CONFIG_FILE`.
    ///
    /// Call before any thread starts: `.env` values are put into the process environment
    /// (without overriding variables that are already set), which is what makes them rank
    /// between the file and the real environment.
    pub fn load() -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(ConfigError::Source(format!(".env: {e}"))),
        }
        Self::from_figment(Self::figment())
    }

    /// The layered sources, exposed so tests can run them inside `figment::Jail`.
    pub fn figment() -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Ok(path) = std::env::var("CONFIG_FILE") {
            figment = figment.merge(Toml::file_exact(PathBuf::from(path)));
        }
        // Numbers and enums go through figment's value parsing; text settings are taken
        // verbatim, so a token of digits or a JSON rule list is not reinterpreted.
        let parsed: Vec<String> = ENV_VARS
            .iter()
            .filter(|v| !TEXT_ENV_VARS.contains(v) && !NOT_SETTINGS.contains(v))
            .map(|v| v.to_ascii_lowercase())
            .collect();
        figment = figment.merge(Env::raw().filter(move |k| parsed.iter().any(|n| k == n.as_str())));
        let text: BTreeMap<String, String> = Env::raw()
            .iter()
            .filter(|(k, _)| TEXT_ENV_VARS.iter().any(|n| k.as_str().eq_ignore_ascii_case(n)))
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

    /// Extracts and validates; errors name the setting in environment-variable spelling.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(|e| {
            let setting = e
                .path
                .first()
                .map(|p| p.to_ascii_uppercase())
                .unwrap_or_else(|| "configuration".into());
            // figment's message may echo the value; a secret setting gets a generic reason.
            let reason = if setting == "DATABASE_URL" || setting == "KAFKA_PROPERTIES" {
                "wrong type".to_string()
            } else {
                e.kind.to_string()
            };
            ConfigError::Invalid { setting, reason }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(setting: &str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { setting: setting.into(), reason: reason.into() }
        }
        if let Some(url) = &self.database_url {
            let parsed = url::Url::parse(url.expose())
                .map_err(|e| invalid("DATABASE_URL", format!("not a URL ({e})")))?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(invalid("DATABASE_URL", "scheme must be postgres:// or postgresql://"));
            }
        }
        if self.kafka_brokers.trim().is_empty() {
            return Err(invalid("KAFKA_BROKERS", "must not be empty"));
        }
        if self.topics().is_empty() {
            return Err(invalid("KAFKA_TOPICS", "must name at least one topic"));
        }
        if self.kafka_group_id.trim().is_empty() {
            return Err(invalid("KAFKA_GROUP_ID", "must not be empty"));
        }
        if self.kafka_dlq_topic.trim().is_empty() {
            return Err(invalid("KAFKA_DLQ_TOPIC", "must not be empty"));
        }
        if self.topics().iter().any(|t| *t == self.kafka_dlq_topic) {
            return Err(invalid("KAFKA_DLQ_TOPIC", "must not be one of KAFKA_TOPICS"));
        }
        if !(1000..=3_600_000).contains(&self.kafka_session_timeout_ms) {
            return Err(invalid("KAFKA_SESSION_TIMEOUT_MS", "must be between 1000 and 3600000"));
        }
        let positive = [
            ("DATABASE_POOL_SIZE", self.database_pool_size as u64),
            ("DATABASE_WRITE_TIMEOUT_SECS", self.database_write_timeout_secs),
            ("BATCH_MAX_EVENTS", self.batch_max_events as u64),
            ("BATCH_MAX_BYTES", self.batch_max_bytes as u64),
            ("BATCH_MAX_IN_FLIGHT", self.batch_max_in_flight as u64),
            ("MAX_EVENT_BYTES", self.max_event_bytes as u64),
            ("FETCH_BUFFER_KBYTES", self.fetch_buffer_kbytes as u64),
            ("LIVENESS_STALL_SECS", self.liveness_stall_secs),
            ("GROUP_UNSTEADY_LIVENESS_SECS", self.group_unsteady_liveness_secs),
            ("LAG_REFRESH_SECS", self.lag_refresh_secs),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        if self.batch_max_in_flight > self.database_pool_size as usize {
            return Err(invalid(
                "BATCH_MAX_IN_FLIGHT",
                "must not exceed DATABASE_POOL_SIZE (each write holds a connection)",
            ));
        }
        if self.liveness_stall_secs <= self.database_write_timeout_secs {
            return Err(invalid(
                "LIVENESS_STALL_SECS",
                "must exceed DATABASE_WRITE_TIMEOUT_SECS, or a slow write would restart the pod",
            ));
        }
        // The delivery contract: records of aborted transactions are never stored.
        if let Some(level) = self.kafka_properties.get("isolation.level")
            && level.expose() != "read_committed"
        {
            return Err(invalid(
                "KAFKA_PROPERTY_ISOLATION_LEVEL",
                "must be read_committed (records of aborted transactions must never be stored)",
            ));
        }
        for key in self.kafka_properties.keys() {
            if !key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.') {
                return Err(invalid(
                    &format!("{KAFKA_PROPERTY_PREFIX}{}", key.replace('.', "_").to_uppercase()),
                    "not a librdkafka property name",
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("LOG_LEVEL", e.to_string()))?;
        if let Some(url) = &self.api_database_url {
            let parsed = url::Url::parse(url.expose())
                .map_err(|e| invalid("API_DATABASE_URL", format!("not a URL ({e})")))?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(invalid(
                    "API_DATABASE_URL",
                    "scheme must be postgres:// or postgresql://",
                ));
            }
        }
        if self.api_port != 0 && self.api_port == self.metrics_port {
            return Err(invalid("API_PORT", "must differ from METRICS_PORT"));
        }
        if !(MIN_API_PAGE_BYTES..=MAX_API_PAGE_BYTES).contains(&self.api_max_page_bytes) {
            return Err(invalid(
                "API_MAX_PAGE_BYTES",
                format!("must be between {MIN_API_PAGE_BYTES} and {MAX_API_PAGE_BYTES}"),
            ));
        }
        if !(1..=1024).contains(&self.api_max_concurrent_requests) {
            return Err(invalid("API_MAX_CONCURRENT_REQUESTS", "must be between 1 and 1024"));
        }
        if !(1..=600_000).contains(&self.api_statement_timeout_ms) {
            return Err(invalid("API_STATEMENT_TIMEOUT_MS", "must be between 1 and 600000"));
        }
        if self.api_token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
            return Err(invalid("API_TOKEN", "must not be empty when set"));
        }
        if self.partitions_ahead > 366 {
            return Err(invalid("PARTITIONS_AHEAD", "must be at most 366"));
        }
        if self.retention_days == Some(0) {
            return Err(invalid(
                "RETENTION_DAYS",
                "must be at least 1 (unset it to keep everything)",
            ));
        }
        self.maintenance_interval()?;
        self.routing_rules()?;
        Ok(())
    }

    /// The maintenance period.
    pub fn maintenance_interval(&self) -> Result<Duration, ConfigError> {
        parse_duration(&self.maintenance_interval).ok_or_else(|| ConfigError::Invalid {
            setting: "MAINTENANCE_INTERVAL".into(),
            reason: "expected a positive duration such as 30s, 15m, 1h or 1d".into(),
        })
    }

    /// The routing rules, parsed and checked.
    pub fn routing_rules(&self) -> Result<crate::ingest::routing::Rules, ConfigError> {
        crate::ingest::routing::Rules::parse(self.routing_rules.as_deref().unwrap_or("[]"))
            .map_err(|reason| ConfigError::Invalid { setting: "ROUTING_RULES".into(), reason })
    }

    /// The topics to subscribe to.
    pub fn topics(&self) -> Vec<&str> {
        self.kafka_topics.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
    }

    /// The database URL; commands that use the database call this first, so a missing
    /// `DATABASE_URL` stops them (and only them) with a message naming it.
    pub fn database_url(&self) -> Result<&str, ConfigError> {
        self.database_url.as_ref().map(Secret::expose).ok_or(ConfigError::Missing("DATABASE_URL"))
    }

    /// The database URL with its password replaced, for log lines.
    pub fn database_url_redacted(&self) -> String {
        self.database_url.as_ref().map(|u| redact_url(u.expose())).unwrap_or_default()
    }

    /// The query API's bounds.
    pub fn api_limits(&self) -> crate::api::ApiLimits {
        crate::api::ApiLimits {
            statement_timeout: Duration::from_millis(self.api_statement_timeout_ms),
            max_page_bytes: self.api_max_page_bytes,
            max_concurrent_requests: self.api_max_concurrent_requests,
        }
    }

    /// The URL the query API reads with: `API_DATABASE_URL`, else `DATABASE_URL`.
    pub fn api_database_url(&self) -> Result<&str, ConfigError> {
        match &self.api_database_url {
            Some(url) => Ok(url.expose()),
            None => self.database_url.as_ref().map(Secret::expose).ok_or(ConfigError::Missing(
                "DATABASE_URL (or API_DATABASE_URL for nexus-analytics api)",
            )),
        }
    }

    /// Linger limit as a duration.
    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }
}

/// Parses `90`, `90s`, `15m`, `1h` or `1d`; zero and garbage yield `None`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok().filter(|n| *n > 0)?;
    let seconds = match unit.trim() {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

/// Replaces the password in a URL with `***`; unparsable input is hidden entirely.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "***".into(),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_match_the_original_service() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("DATABASE_URL", "postgres://u:p@localhost/db");
            let s = Settings::from_figment(Settings::figment()).expect("valid");
            assert_eq!(s.kafka_brokers, "localhost:9092");
            assert_eq!(s.metrics_port, 9090);
            assert_eq!(s.topics(), vec!["user-events"]);
            assert_eq!(s.kafka_group_id, "analytics-service");
            Ok(())
        });
    }

    #[test]
    fn missing_database_url_names_the_setting() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let settings =
                Settings::from_figment(Settings::figment()).expect("valid without a database");
            let err = settings.database_url().unwrap_err();
            assert_eq!(err.to_string(), "missing setting DATABASE_URL: it is required");
            Ok(())
        });
    }

    #[test]
    fn bad_number_names_the_setting() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("DATABASE_URL", "postgres://u:p@localhost/db");
            jail.set_env("METRICS_PORT", "ninety");
            let err = Settings::from_figment(Settings::figment()).unwrap_err().to_string();
            assert!(err.starts_with("invalid setting METRICS_PORT"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_and_properties_pass_through() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("app.toml", "metrics_port = 9100\nkafka_group_id = \"from-file\"\n")?;
            jail.set_env("CONFIG_FILE", "app.toml");
            jail.set_env("DATABASE_URL", "postgres://u:p@localhost/db");
            jail.set_env("KAFKA_GROUP_ID", "from-env");
            jail.set_env("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL");
            jail.set_env("KAFKA_PROPERTY_SASL_PASSWORD", "hunter2");
            let s = Settings::from_figment(Settings::figment()).expect("valid");
            assert_eq!(s.metrics_port, 9100);
            assert_eq!(s.kafka_group_id, "from-env");
            assert_eq!(s.kafka_properties["security.protocol"].expose(), "SASL_SSL");
            assert!(!format!("{s:?}").contains("hunter2"));
            assert!(!format!("{s:?}").contains("u:p@"));
            Ok(())
        });
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("DATABASE_URL", "mysql://user:hunter2@localhost/db");
            let err = Settings::from_figment(Settings::figment()).unwrap_err().to_string();
            assert!(err.starts_with("invalid setting DATABASE_URL"), "{err}");
            assert!(!err.contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn every_listed_variable_is_accepted() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            for name in ENV_VARS {
                let value = match *name {
                    "CONFIG_FILE" => continue,
                    "DATABASE_URL" | "API_DATABASE_URL" => "postgres://u:p@localhost/db",
                    "LOG_FORMAT" => "json",
                    "LOG_LEVEL" | "RUST_LOG" => "info",
                    "PARTITION_INTERVAL" => "month",
                    "MAINTENANCE_INTERVAL" => "15m",
                    "ROUTING_RULES" => "[]",
                    "API_PORT" => "8081",
                    "API_MAX_PAGE_BYTES" => "65536",
                    "KAFKA_SESSION_TIMEOUT_MS" => "6000",
                    "LIVENESS_STALL_SECS" => "61",
                    "KAFKA_BROKERS" | "KAFKA_TOPICS" | "KAFKA_GROUP_ID" | "KAFKA_DLQ_TOPIC" => "x",
                    "OTEL_EXPORTER_OTLP_ENDPOINT"
                    | "OTEL_SERVICE_NAME"
                    | "POD_NAME"
                    | "API_TOKEN" => "x",
                    _ => "7",
                };
                jail.set_env(name, value);
            }
            jail.set_env("KAFKA_DLQ_TOPIC", "y");
            jail.set_env("API_TOKEN", "12345");
            jail.set_env("KAFKA_GROUP_ID", "true");
            let s = Settings::from_figment(Settings::figment()).map_err(|e| e.to_string())?;
            assert_eq!(s.api_token.as_ref().map(Secret::expose), Some("12345"));
            assert_eq!(s.kafka_group_id, "true");
            assert!(s.routing_rules().map_err(|e| e.to_string())?.is_empty());
            Ok(())
        });
    }

    #[test]
    fn api_limits_are_validated() {
        for (name, bad) in [
            ("API_MAX_PAGE_BYTES", "100"),
            ("API_MAX_PAGE_BYTES", "1073741824"),
            ("API_MAX_CONCURRENT_REQUESTS", "0"),
            ("API_STATEMENT_TIMEOUT_MS", "0"),
        ] {
            Jail::expect_with(|jail| {
                jail.clear_env();
                jail.set_env(name, bad);
                let err = Settings::from_figment(Settings::figment()).unwrap_err().to_string();
                assert!(err.starts_with(&format!("invalid setting {name}")), "{err}");
                Ok(())
            });
        }
        Jail::expect_with(|jail| {
            jail.clear_env();
            let s = Settings::from_figment(Settings::figment()).map_err(|e| e.to_string())?;
            assert_eq!(s.api_max_page_bytes, 4 * 1024 * 1024);
            assert_eq!(s.api_max_concurrent_requests, 8);
            Ok(())
        });
    }

    #[test]
    fn read_uncommitted_is_refused() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KAFKA_PROPERTY_ISOLATION_LEVEL", "read_uncommitted");
            let err = Settings::from_figment(Settings::figment()).unwrap_err().to_string();
            assert!(err.starts_with("invalid setting KAFKA_PROPERTY_ISOLATION_LEVEL"), "{err}");
            jail.set_env("KAFKA_PROPERTY_ISOLATION_LEVEL", "read_committed");
            Settings::from_figment(Settings::figment()).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        for bad in ["", "0", "h", "1y", "-1h", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn invalid_rules_stop_start_up_naming_the_setting() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env(
                "ROUTING_RULES",
                r#"[{"name":"x","event_type":"user.*","action":"teleport"}]"#,
            );
            let err = Settings::from_figment(Settings::figment()).unwrap_err().to_string();
            assert!(err.starts_with("invalid setting ROUTING_RULES"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redaction_hides_password_only() {
        assert_eq!(
            redact_url("postgres://nexus:secret@db:5432/x"),
            "postgres://nexus:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact_url("not a url"), "***");
    }
}
