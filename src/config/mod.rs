//! Service configuration, loaded once with figment (defaults < `CONFIG_FILE` TOML < `.env` <
//! environment), validated and parsed into the types the code uses before anything starts.
//!
//! Operators write flat environment variables ([`env`]: the original Go service's
//! `KAFKA_BROKERS`, `DATABASE_URL`, `METRICS_PORT` and the others `nexus-analytics env-vars`
//! lists); the code reads [`Settings`], grouped by concern: [`KafkaSettings`],
//! [`DatabaseSettings`], [`BatchSettings`], [`ApiSettings`], [`MaintenanceSettings`],
//! [`ObserveSettings`]. Durations, topic lists and routing rules are parsed here, once. Any
//! librdkafka property can be passed as `KAFKA_PROPERTY_<NAME>` (dots become underscores), so
//! TLS and SASL need no code changes. Nothing else in the crate reads the environment.

mod env;

use std::collections::BTreeMap;
use std::time::Duration;

use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::api::ApiLimits;
use crate::ingest::batch_policy::BatchPolicy;
use crate::ingest::routing::Rules;
use crate::storage::partitions;

use env::RawSettings;
pub use env::{KAFKA_PROPERTY_PREFIX, env_vars};

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

fn invalid(setting: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting: setting.into(), reason: reason.into() }
}

/// The whole configuration, parsed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Brokers, topics, group and client properties.
    pub kafka: KafkaSettings,
    /// The write database.
    pub database: DatabaseSettings,
    /// When batches are written and how many at once.
    pub batch: BatchSettings,
    /// Filtering and routing rules (`ROUTING_RULES`, see [`crate::ingest::routing`]).
    pub routing: Rules,
    /// The query API.
    pub api: ApiSettings,
    /// Partitions and retention.
    pub maintenance: MaintenanceSettings,
    /// Probes, logs, spans and the ops port.
    pub observe: ObserveSettings,
    /// Drain budget on SIGTERM (`SHUTDOWN_TIMEOUT_SECS`); the pod's grace period must be longer.
    pub shutdown_timeout: Duration,
    /// The pod this process runs as (`POD_NAME`), for the operator's Lease and Events.
    pub pod_name: Option<String>,
}

/// Kafka: where to consume from and as whom.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated (`KAFKA_BROKERS`).
    pub brokers: String,
    /// Topics to consume (`KAFKA_TOPICS`, comma-separated), at least one.
    pub topics: Vec<String>,
    /// Consumer group shared by all replicas (`KAFKA_GROUP_ID`).
    pub group_id: String,
    /// Where undecodable or rejected records go (`KAFKA_DLQ_TOPIC`).
    pub dlq_topic: String,
    /// Group session timeout; a dead replica's partitions move after this long.
    pub session_timeout: Duration,
    /// Bound on records librdkafka prefetches (`queued.max.messages.kbytes`): caps memory.
    pub fetch_buffer_kbytes: u32,
    /// How often consumer lag is recomputed (`LAG_REFRESH_SECS`).
    pub lag_refresh: Duration,
    /// The client id brokers see: `HOSTNAME` (the pod name in Kubernetes).
    pub client_id: String,
    /// librdkafka properties passed through verbatim (`KAFKA_PROPERTY_*`: security, tuning).
    pub properties: BTreeMap<String, SecretString>,
}

/// The database events are written to.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    url: Option<SecretString>,
    /// Connections in the write pool (`DATABASE_POOL_SIZE`).
    pub pool_size: u32,
    /// A batch write that takes longer is abandoned and retried (keeps the loop turning).
    pub write_timeout: Duration,
}

impl DatabaseSettings {
    /// The database URL; commands that use the database call this first, so a missing
    /// `DATABASE_URL` stops them (and only them) with a message naming it.
    pub fn url(&self) -> Result<&str, ConfigError> {
        self.url
            .as_ref()
            .map(ExposeSecret::expose_secret)
            .ok_or(ConfigError::Missing("DATABASE_URL"))
    }

    /// The database URL with its password replaced, for log lines.
    pub fn url_redacted(&self) -> String {
        self.url.as_ref().map(|u| redact_url(u.expose_secret())).unwrap_or_default()
    }
}

/// Batching: when a batch is written, how many are written at once, what is too big to store.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// `BATCH_MAX_EVENTS`, `BATCH_MAX_BYTES`, `BATCH_LINGER_MS`.
    pub policy: BatchPolicy,
    /// Batches written at once, in overlapping transactions on separate pool connections, while
    /// the next one is consumed; offsets still commit in consumption order.
    pub max_in_flight: usize,
    /// Records larger than this are dead-lettered instead of stored (`MAX_EVENT_BYTES`).
    pub max_event_bytes: usize,
}

/// The query API (`/api/v1/...`).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Its port, separate from the metrics port; 0 disables it in `nexus-analytics run`.
    pub port: u16,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    pub token: Option<SecretString>,
    /// `API_DATABASE_URL`, else `DATABASE_URL`.
    database_url: Option<SecretString>,
    /// Statement timeout, page budget and concurrency bound.
    pub limits: ApiLimits,
}

impl ApiSettings {
    /// The URL the query API reads with: `API_DATABASE_URL`, else `DATABASE_URL`.
    pub fn database_url(&self) -> Result<&str, ConfigError> {
        self.database_url.as_ref().map(ExposeSecret::expose_secret).ok_or(ConfigError::Missing(
            "DATABASE_URL (or API_DATABASE_URL for nexus-analytics api)",
        ))
    }
}

/// Partition maintenance.
#[derive(Debug, Clone, Copy)]
pub struct MaintenanceSettings {
    /// `PARTITION_INTERVAL`, `PARTITIONS_AHEAD`, `RETENTION_DAYS`.
    pub policy: partitions::Policy,
    /// How often maintenance runs (`MAINTENANCE_INTERVAL`).
    pub interval: Duration,
}

/// What the service tells the outside about itself.
#[derive(Debug, Clone)]
pub struct ObserveSettings {
    /// Port of `/metrics`, `/health`, `/livez`, `/readyz`.
    pub metrics_port: u16,
    /// `/livez` fails when the consume loop has not turned for this long.
    pub liveness_stall: Duration,
    /// `/livez` fails when a broker answers but the member has not been in a steady group
    /// (joined, assignment received) for this long: a restart rejoins from scratch.
    pub group_unsteady_limit: Duration,
    /// `LOG_FORMAT`.
    pub log_format: LogFormat,
    /// The `tracing` filter: `RUST_LOG` when it parses, else `LOG_LEVEL`.
    pub log_filter: String,
    /// OTLP/HTTP endpoint for spans; unset means no span export.
    pub otlp_endpoint: Option<String>,
    /// The spans' `service.name` (`OTEL_SERVICE_NAME`).
    pub service_name: String,
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
        env::figment()
    }

    /// Extracts, validates and parses; errors name the setting in environment-variable spelling.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let raw: RawSettings = figment.extract().map_err(|e| {
            let setting = e
                .path
                .first()
                .map(|p| p.to_ascii_uppercase())
                .unwrap_or_else(|| "configuration".into());
            // figment's message may echo the value; a secret setting gets a generic reason.
            let reason = if matches!(
                setting.as_str(),
                "DATABASE_URL" | "API_DATABASE_URL" | "API_TOKEN" | "KAFKA_PROPERTIES"
            ) {
                "wrong type".to_string()
            } else {
                e.kind.to_string()
            };
            ConfigError::Invalid { setting, reason }
        })?;
        Self::parse(raw)
    }

    fn parse(raw: RawSettings) -> Result<Self, ConfigError> {
        let kafka = parse_kafka(&raw)?;
        let database = DatabaseSettings {
            url: raw
                .database_url
                .as_deref()
                .map(|u| postgres_url("DATABASE_URL", u))
                .transpose()?,
            pool_size: positive("DATABASE_POOL_SIZE", raw.database_pool_size)?,
            write_timeout: secs("DATABASE_WRITE_TIMEOUT_SECS", raw.database_write_timeout_secs)?,
        };
        let batch = BatchSettings {
            policy: BatchPolicy {
                max_events: positive("BATCH_MAX_EVENTS", raw.batch_max_events)?,
                max_bytes: positive("BATCH_MAX_BYTES", raw.batch_max_bytes)?,
                linger: Duration::from_millis(raw.batch_linger_ms),
            },
            max_in_flight: positive("BATCH_MAX_IN_FLIGHT", raw.batch_max_in_flight)?,
            max_event_bytes: positive("MAX_EVENT_BYTES", raw.max_event_bytes)?,
        };
        if batch.max_in_flight > database.pool_size as usize {
            return Err(invalid(
                "BATCH_MAX_IN_FLIGHT",
                "must not exceed DATABASE_POOL_SIZE (each write holds a connection)",
            ));
        }
        let observe = parse_observe(&raw)?;
        if observe.liveness_stall <= database.write_timeout {
            return Err(invalid(
                "LIVENESS_STALL_SECS",
                "must exceed DATABASE_WRITE_TIMEOUT_SECS, or a slow write would restart the pod",
            ));
        }
        let api = parse_api(&raw, database.url.clone())?;
        if api.port != 0 && api.port == observe.metrics_port {
            return Err(invalid("API_PORT", "must differ from METRICS_PORT"));
        }
        let maintenance = parse_maintenance(&raw)?;
        let routing = Rules::parse(raw.routing_rules.as_deref().unwrap_or("[]"))
            .map_err(|reason| invalid("ROUTING_RULES", reason))?;
        Ok(Self {
            kafka,
            database,
            batch,
            routing,
            api,
            maintenance,
            observe,
            shutdown_timeout: Duration::from_secs(raw.shutdown_timeout_secs),
            pod_name: raw.pod_name.filter(|p| !p.trim().is_empty()),
        })
    }
}

fn parse_kafka(raw: &RawSettings) -> Result<KafkaSettings, ConfigError> {
    if raw.kafka_brokers.trim().is_empty() {
        return Err(invalid("KAFKA_BROKERS", "must not be empty"));
    }
    let topics: Vec<String> = raw
        .kafka_topics
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    if topics.is_empty() {
        return Err(invalid("KAFKA_TOPICS", "must name at least one topic"));
    }
    if raw.kafka_group_id.trim().is_empty() {
        return Err(invalid("KAFKA_GROUP_ID", "must not be empty"));
    }
    if raw.kafka_dlq_topic.trim().is_empty() {
        return Err(invalid("KAFKA_DLQ_TOPIC", "must not be empty"));
    }
    if topics.contains(&raw.kafka_dlq_topic) {
        return Err(invalid("KAFKA_DLQ_TOPIC", "must not be one of KAFKA_TOPICS"));
    }
    if !(1000..=3_600_000).contains(&raw.kafka_session_timeout_ms) {
        return Err(invalid("KAFKA_SESSION_TIMEOUT_MS", "must be between 1000 and 3600000"));
    }
    // The delivery contract: records of aborted transactions are never stored.
    if let Some(level) = raw.kafka_properties.get("isolation.level")
        && level != "read_committed"
    {
        return Err(invalid(
            "KAFKA_PROPERTY_ISOLATION_LEVEL",
            "must be read_committed (records of aborted transactions must never be stored)",
        ));
    }
    for key in raw.kafka_properties.keys() {
        if !key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.') {
            return Err(invalid(
                &format!("{KAFKA_PROPERTY_PREFIX}{}", key.replace('.', "_").to_uppercase()),
                "not a librdkafka property name",
            ));
        }
    }
    Ok(KafkaSettings {
        brokers: raw.kafka_brokers.clone(),
        topics,
        group_id: raw.kafka_group_id.clone(),
        dlq_topic: raw.kafka_dlq_topic.clone(),
        session_timeout: Duration::from_millis(raw.kafka_session_timeout_ms.into()),
        fetch_buffer_kbytes: positive("FETCH_BUFFER_KBYTES", raw.fetch_buffer_kbytes)?,
        lag_refresh: secs("LAG_REFRESH_SECS", raw.lag_refresh_secs)?,
        client_id: raw
            .hostname
            .clone()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| "nexus-analytics".into()),
        properties: raw
            .kafka_properties
            .iter()
            .map(|(k, v)| (k.clone(), SecretString::from(v.as_str())))
            .collect(),
    })
}

fn parse_observe(raw: &RawSettings) -> Result<ObserveSettings, ConfigError> {
    tracing_subscriber::EnvFilter::try_new(&raw.log_level)
        .map_err(|e| invalid("LOG_LEVEL", e.to_string()))?;
    // RUST_LOG is the developer's override: one that does not parse is ignored, as before.
    let log_filter = raw
        .rust_log
        .as_deref()
        .filter(|f| tracing_subscriber::EnvFilter::try_new(f).is_ok())
        .unwrap_or(&raw.log_level)
        .to_string();
    Ok(ObserveSettings {
        metrics_port: raw.metrics_port,
        liveness_stall: secs("LIVENESS_STALL_SECS", raw.liveness_stall_secs)?,
        group_unsteady_limit: secs(
            "GROUP_UNSTEADY_LIVENESS_SECS",
            raw.group_unsteady_liveness_secs,
        )?,
        log_format: raw.log_format,
        log_filter,
        otlp_endpoint: raw.otel_exporter_otlp_endpoint.clone().filter(|e| !e.trim().is_empty()),
        service_name: raw.otel_service_name.clone(),
    })
}

fn parse_api(
    raw: &RawSettings,
    database_url: Option<SecretString>,
) -> Result<ApiSettings, ConfigError> {
    if !(MIN_API_PAGE_BYTES..=MAX_API_PAGE_BYTES).contains(&raw.api_max_page_bytes) {
        return Err(invalid(
            "API_MAX_PAGE_BYTES",
            format!("must be between {MIN_API_PAGE_BYTES} and {MAX_API_PAGE_BYTES}"),
        ));
    }
    if !(1..=1024).contains(&raw.api_max_concurrent_requests) {
        return Err(invalid("API_MAX_CONCURRENT_REQUESTS", "must be between 1 and 1024"));
    }
    if !(1..=600_000).contains(&raw.api_statement_timeout_ms) {
        return Err(invalid("API_STATEMENT_TIMEOUT_MS", "must be between 1 and 600000"));
    }
    if raw.api_token.as_ref().is_some_and(|t| t.trim().is_empty()) {
        return Err(invalid("API_TOKEN", "must not be empty when set"));
    }
    let own_url =
        raw.api_database_url.as_deref().map(|u| postgres_url("API_DATABASE_URL", u)).transpose()?;
    Ok(ApiSettings {
        port: raw.api_port,
        token: raw.api_token.as_deref().map(SecretString::from),
        database_url: own_url.or(database_url),
        limits: ApiLimits {
            statement_timeout: Duration::from_millis(raw.api_statement_timeout_ms),
            max_page_bytes: raw.api_max_page_bytes,
            max_concurrent_requests: raw.api_max_concurrent_requests,
        },
    })
}

fn parse_maintenance(raw: &RawSettings) -> Result<MaintenanceSettings, ConfigError> {
    if raw.partitions_ahead > 366 {
        return Err(invalid("PARTITIONS_AHEAD", "must be at most 366"));
    }
    if raw.retention_days == Some(0) {
        return Err(invalid("RETENTION_DAYS", "must be at least 1 (unset it to keep everything)"));
    }
    let interval = parse_duration(&raw.maintenance_interval).ok_or_else(|| {
        invalid("MAINTENANCE_INTERVAL", "expected a positive duration such as 30s, 15m, 1h or 1d")
    })?;
    Ok(MaintenanceSettings {
        policy: partitions::Policy {
            interval: raw.partition_interval,
            ahead: raw.partitions_ahead,
            retention_days: raw.retention_days,
        },
        interval,
    })
}

/// A `postgres://` URL, checked without ever echoing it.
fn postgres_url(setting: &str, raw: &str) -> Result<SecretString, ConfigError> {
    let parsed = url::Url::parse(raw).map_err(|e| invalid(setting, format!("not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid(setting, "scheme must be postgres:// or postgresql://"));
    }
    Ok(SecretString::from(raw))
}

/// `value` unless it is zero.
fn positive<T: PartialEq + Default>(setting: &str, value: T) -> Result<T, ConfigError> {
    if value == T::default() { Err(invalid(setting, "must be greater than 0")) } else { Ok(value) }
}

fn secs(setting: &str, value: u64) -> Result<Duration, ConfigError> {
    positive(setting, value).map(Duration::from_secs)
}

/// Parses a positive duration in humantime's syntax (`30s`, `15m`, `1h`, `1d`, `1h 30m`) or a
/// bare number of seconds; zero and garbage yield `None`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).ok()?,
    };
    (!duration.is_zero()).then_some(duration)
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
            assert_eq!(s.kafka.brokers, "localhost:9092");
            assert_eq!(s.observe.metrics_port, 9090);
            assert_eq!(s.kafka.topics, vec!["user-events"]);
            assert_eq!(s.kafka.group_id, "analytics-service");
            assert_eq!(s.kafka.client_id, "nexus-analytics");
            assert_eq!(s.maintenance.interval, Duration::from_secs(3600));
            assert_eq!(s.observe.log_filter, "info");
            Ok(())
        });
    }

    #[test]
    fn missing_database_url_names_the_setting() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let settings =
                Settings::from_figment(Settings::figment()).expect("valid without a database");
            let err = settings.database.url().unwrap_err();
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
            assert_eq!(s.observe.metrics_port, 9100);
            assert_eq!(s.kafka.group_id, "from-env");
            assert_eq!(s.kafka.properties["security.protocol"].expose_secret(), "SASL_SSL");
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
            for name in env_vars() {
                let value = match name {
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
                    | "HOSTNAME"
                    | "API_TOKEN" => "x",
                    _ => "7",
                };
                jail.set_env(name, value);
            }
            jail.set_env("KAFKA_DLQ_TOPIC", "y");
            jail.set_env("API_TOKEN", "12345");
            jail.set_env("KAFKA_GROUP_ID", "true");
            let s = Settings::from_figment(Settings::figment()).map_err(|e| e.to_string())?;
            assert_eq!(s.api.token.as_ref().map(ExposeSecret::expose_secret), Some("12345"));
            assert_eq!(s.kafka.group_id, "true");
            assert!(s.routing.is_empty());
            assert_eq!(s.kafka.client_id, "x");
            assert_eq!(s.pod_name.as_deref(), Some("x"));
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
            assert_eq!(s.api.limits.max_page_bytes, 4 * 1024 * 1024);
            assert_eq!(s.api.limits.max_concurrent_requests, 8);
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
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        for bad in ["", "0", "0s", "h", "1 fortnight", "-1h", "1.5.h"] {
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
