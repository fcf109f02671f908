//! The command line: subcommands and how each is carried out.

pub mod produce;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::app;
use crate::config::{self, Settings};
use crate::kafka::admin;
use crate::kafka::client_config;
use crate::operator;
use produce::ProduceOptions;

/// Consumes Nexus Core user events from Kafka and stores each exactly once in PostgreSQL.
///
/// Configuration comes from environment variables (see `nexus-analytics env-vars`), an
/// optional `.env` file and an optional TOML file named by `CONFIG_FILE`.
#[derive(Debug, Parser)]
#[command(name = "nexus-analytics", version, about, long_about)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: consume, store, serve /metrics /health /livez /readyz.
    Run,
    /// Serve only the query API on API_PORT (no consumer, no Kafka), with /metrics /livez
    /// /readyz /health on METRICS_PORT (ready when the database answers). Reads with
    /// API_DATABASE_URL, else DATABASE_URL.
    Api,
    /// Apply the database migrations and exit (idempotent).
    Migrate,
    /// Produce realistic demo or load events to Kafka.
    Produce {
        /// Events to send; 0 sends until interrupted.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Events per second; 0 sends as fast as possible.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Destination topic (default: the first of KAFKA_TOPICS).
        #[arg(long)]
        topic: Option<String>,
        /// Percentage of deliberately malformed records (shows the dead-letter path).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        invalid_percent: u8,
        /// Distinct simulated users.
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        /// Random seed, for reproducible runs.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Print every environment variable the service reads, one per line.
    EnvVars,
    /// Print every metric the process exports: name, type and help, one per line
    /// (`--api`: the `nexus-analytics api` process's few).
    Metrics {
        /// The query-API process's metrics instead of the consumer's.
        #[arg(long)]
        api: bool,
    },
    /// Print the AnalyticsPipeline CustomResourceDefinition (YAML).
    Crd,
    /// Print what the operator would apply for an AnalyticsPipeline manifest (YAML documents),
    /// without a cluster: for review and for validating against schemas in CI.
    OperatorRender {
        /// The AnalyticsPipeline manifest (YAML).
        file: std::path::PathBuf,
        /// Partition count to assume (the operator reads it from Kafka; caps max replicas).
        #[arg(long)]
        partitions: Option<i32>,
    },
    /// Run the Kubernetes operator that reconciles AnalyticsPipeline resources.
    Operator {
        /// Port of the operator's /livez, /readyz and /metrics.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long)]
        namespace: Option<String>,
        /// Seconds between re-checks of a healthy pipeline (partition growth).
        #[arg(long, default_value_t = 300)]
        recheck_secs: u64,
        /// Reconcile only while holding a coordination.k8s.io Lease (for more than one replica).
        #[arg(long)]
        leader_elect: bool,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "nexus-analytics-operator")]
        lease_name: String,
        /// Namespace of the Lease (required with --leader-elect; the chart sets POD_NAMESPACE).
        #[arg(long, env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// Seconds a leader that stopped renewing blocks the others (at least 3).
        #[arg(long, default_value_t = 15)]
        lease_duration_secs: u64,
    },
    /// Move a consumer group's committed offsets back to replay events (rows stay exact:
    /// writes are idempotent). Refuses while the group has active members.
    Replay {
        /// The consumer group (default: KAFKA_GROUP_ID).
        #[arg(long)]
        group: Option<String>,
        /// Replay from the first record at or after this RFC 3339 time.
        #[arg(long, conflicts_with = "to_earliest", required_unless_present = "to_earliest")]
        to_time: Option<String>,
        /// Replay everything still in the topics.
        #[arg(long)]
        to_earliest: bool,
        /// Topics to reset, comma-separated (default: KAFKA_TOPICS).
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Print what would change without committing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Holder identity of the operator's Lease: the pod name, else the host name and process id.
fn lease_identity(pod_name: Option<&str>) -> String {
    if let Some(pod) = pod_name {
        return pod.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "operator".to_owned());
    format!("{host}-{}", std::process::id())
}

/// A configuration problem: the process exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigFailure(#[from] pub config::ConfigError);

/// Carries out a parsed command line. Loads configuration before any thread starts.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Run);
    match command {
        Command::EnvVars => {
            for name in config::env_vars() {
                println!("{name}");
            }
            println!("{}*", config::KAFKA_PROPERTY_PREFIX);
            return Ok(());
        }
        Command::Metrics { api } => {
            use crate::observe::metrics::{Metrics, Role};
            let role = if api { Role::Api } else { Role::Ingest };
            let metrics = Metrics::for_role(Arc::default(), role)
                .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
            for s in metrics.series() {
                println!("{} {} {}", s.name, s.kind.as_str(), s.help);
            }
            return Ok(());
        }
        Command::Crd => {
            print!("{}", operator::crd_yaml());
            return Ok(());
        }
        Command::OperatorRender { file, partitions } => {
            print!("{}", operator::render_file(&file, partitions)?);
            return Ok(());
        }
        _ => {}
    }
    let settings = Settings::load().map_err(ConfigFailure)?;
    if matches!(command, Command::Run | Command::Migrate) {
        settings.database.url().map_err(ConfigFailure)?;
    }
    if matches!(command, Command::Api) {
        settings.api.database_url().map_err(ConfigFailure)?;
    }
    let _tracing = crate::observe::tracing::init_tracing(&settings.observe);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nexus-analytics-rt")
        .build()
        .context("cannot start the async runtime")?;
    match command {
        Command::Run => runtime.block_on(app::run(settings)),
        Command::Api => runtime.block_on(app::run_api(settings)),
        Command::Migrate => runtime.block_on(app::migrate(&settings)),
        Command::Produce { count, rate, topic, invalid_percent, users, seed } => {
            let topic =
                topic.unwrap_or_else(|| settings.kafka.topics.first().cloned().unwrap_or_default());
            let options = ProduceOptions { count, rate, topic, invalid_percent, users, seed };
            let stop = Arc::new(AtomicBool::new(false));
            let signal_stop = stop.clone();
            runtime.spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                signal_stop.store(true, Ordering::Relaxed);
            });
            let report = produce::produce(client_config(&settings.kafka), &options, &stop)?;
            let rate = report.delivered as f64 / report.elapsed.as_secs_f64().max(1e-9);
            println!(
                "produced {} events to {} in {:.2}s ({rate:.0}/s), {} failed",
                report.delivered,
                options.topic,
                report.elapsed.as_secs_f64(),
                report.failed
            );
            if report.failed > 0 {
                anyhow::bail!("{} events were not delivered", report.failed);
            }
            Ok(())
        }
        Command::Operator {
            port,
            namespace,
            recheck_secs,
            leader_elect,
            lease_name,
            lease_namespace,
            lease_duration_secs,
        } => {
            let leader_election = if leader_elect {
                let namespace = lease_namespace.ok_or_else(|| {
                    anyhow::anyhow!("--leader-elect needs --lease-namespace (or POD_NAMESPACE)")
                })?;
                Some(operator::LeaderElection {
                    lease_name,
                    namespace,
                    identity: lease_identity(settings.pod_name.as_deref()),
                    lease_duration: std::time::Duration::from_secs(lease_duration_secs),
                })
            } else {
                None
            };
            let options = operator::OperatorOptions {
                port,
                namespace,
                recheck_interval: std::time::Duration::from_secs(recheck_secs),
                leader_election,
                instance: settings.pod_name.clone(),
            };
            runtime.block_on(operator::run(options))
        }
        Command::Replay { group, to_time, to_earliest, topics, dry_run } => {
            let target = match (to_time, to_earliest) {
                (Some(t), _) => operator::replay::parse_target(&t)
                    .map_err(|e| anyhow::anyhow!("invalid --to-time: {e}"))?,
                (None, _) => admin::ResetTarget::Earliest,
            };
            let group = group.unwrap_or_else(|| settings.kafka.group_id.clone());
            let topics = if topics.is_empty() { settings.kafka.topics.clone() } else { topics };
            let properties = settings
                .kafka
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), v.expose_secret().to_owned()))
                .collect();
            let changes = admin::reset_offsets(
                &settings.kafka.brokers,
                &properties,
                &group,
                &topics,
                target,
                dry_run,
            )?;
            let verb = if dry_run { "would move" } else { "moved" };
            for c in &changes {
                let old = c.old.map_or_else(|| "none".to_string(), |o| o.to_string());
                println!("{}/{}: {verb} {old} -> {}", c.topic, c.partition, c.new);
            }
            let replayed: i64 =
                changes.iter().map(|c| c.old.unwrap_or(c.new) - c.new).filter(|d| *d > 0).sum();
            println!(
                "{} partition(s) of group {group}; {replayed} event(s) will be consumed again{}",
                changes.len(),
                if dry_run { " (dry run: nothing committed)" } else { "" }
            );
            Ok(())
        }
        Command::EnvVars
        | Command::Metrics { .. }
        | Command::Crd
        | Command::OperatorRender { .. } => Ok(()),
    }
}
