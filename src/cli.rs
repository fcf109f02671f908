//! The command line: subcommands and how each is carried out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{self, Settings};
use crate::consumer::client_config;
use crate::demo::{self, ProduceOptions};
use crate::startup;
use crate::telemetry;

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
}

/// A configuration problem: the process exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigFailure(#[from] pub config::ConfigError);

/// Carries out a parsed command line. Loads configuration before any thread starts.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::EnvVars = command {
        for name in config::ENV_VARS {
            println!("{name}");
        }
        println!("{}*", config::KAFKA_PROPERTY_PREFIX);
        return Ok(());
    }
    let settings = Settings::load().map_err(ConfigFailure)?;
    if matches!(command, Command::Run | Command::Migrate) {
        settings.database_url().map_err(ConfigFailure)?;
    }
    let _tracing = telemetry::init_tracing(&settings);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nexus-analytics-rt")
        .build()
        .context("cannot start the async runtime")?;
    match command {
        Command::Run => runtime.block_on(startup::run(settings)),
        Command::Migrate => runtime.block_on(startup::migrate(&settings)),
        Command::Produce { count, rate, topic, invalid_percent, users, seed } => {
            let topic = topic.unwrap_or_else(|| {
                settings.topics().first().map(|t| t.to_string()).unwrap_or_default()
            });
            let options = ProduceOptions { count, rate, topic, invalid_percent, users, seed };
            let stop = Arc::new(AtomicBool::new(false));
            let signal_stop = stop.clone();
            runtime.spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                signal_stop.store(true, Ordering::Relaxed);
            });
            let report = demo::produce(client_config(&settings), &options, &stop)?;
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
        Command::EnvVars => Ok(()),
    }
}
