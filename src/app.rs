//! Wires the service together: storage, dead letters, pipeline, consumer thread,
//! database health checks and the HTTP endpoints; then waits for SIGTERM/SIGINT and drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

use crate::api;
use crate::config::Settings;
use crate::ingest::batch_policy::BatchPolicy;
use crate::ingest::consumer;
use crate::ingest::dead_letter::DeadLetterSink;
use crate::ingest::pipeline::{Pipeline, PipelineOptions};
use crate::kafka::client_config;
use crate::observe::endpoints::{self, AppState};
use crate::observe::metrics::Metrics;
use crate::observe::status::Status;
use crate::storage::EventStore;
use crate::storage::partitions;

/// How often PostgreSQL is pinged for readiness, and how long a ping may take.
const DB_PING_INTERVAL: Duration = Duration::from_secs(1);
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon maintenance runs again while periods still wait in the default partition.
const WAITING_RERUN: Duration = Duration::from_secs(5);

/// Applies the migrations, creates the upcoming partitions, and returns.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = EventStore::connect_lazy(
        settings.database_url()?,
        1,
        Duration::from_secs(settings.database_write_timeout_secs),
    )?;
    info!(database = %settings.database_url_redacted(), "applying migrations");
    store.migrate().await?;
    // Partitions only; retention is left to the running service.
    let policy = partitions::Policy { retention_days: None, ..maintenance_policy(settings) };
    let report = partitions::run_once(store.pool(), &policy, chrono::Utc::now()).await?;
    info!(created = ?report.created, "migrations applied");
    Ok(())
}

fn maintenance_policy(settings: &Settings) -> partitions::Policy {
    partitions::Policy {
        interval: settings.partition_interval,
        ahead: settings.partitions_ahead,
        retention_days: settings.retention_days,
    }
}

/// Runs partition maintenance at start-up and then every `interval` (sooner after a failure).
async fn maintain_partitions(
    store: EventStore,
    policy: partitions::Policy,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = match partitions::run_once(store.pool(), &policy, chrono::Utc::now()).await {
            Ok(report) => {
                metrics.record_maintenance(Ok(&report));
                if !report.ran {
                    info!("partition maintenance skipped: another replica holds the lock");
                } else if !report.created.is_empty()
                    || !report.dropped.is_empty()
                    || report.expired_rows > 0
                {
                    info!(
                        created = ?report.created,
                        dropped = ?report.dropped,
                        moved_rows = report.moved_rows,
                        expired_rows = report.expired_rows,
                        waiting_periods_left = report.waiting_periods_left,
                        "partition maintenance done"
                    );
                }
                // More periods wait in the default partition: continue soon.
                if report.waiting_periods_left > 0 { interval.min(WAITING_RERUN) } else { interval }
            }
            Err(e) => {
                metrics.record_maintenance(Err(()));
                tracing::warn!(error = %e, "partition maintenance failed; retrying soon");
                interval.min(Duration::from_secs(60))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Runs the service until SIGTERM or SIGINT, then drains and returns.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let status = Arc::new(Status::default());
    let metrics = Metrics::new(status.clone()).context("cannot set up metrics")?;
    let store = EventStore::connect_lazy(
        settings.database_url()?,
        settings.database_pool_size,
        Duration::from_secs(settings.database_write_timeout_secs),
    )?;
    let dead_letters = DeadLetterSink::new(
        client_config(&settings),
        &settings.kafka_dlq_topic,
        &settings.kafka_group_id,
    )
    .context("cannot create the dead-letter producer")?;
    let policy = BatchPolicy {
        max_events: settings.batch_max_events,
        max_bytes: settings.batch_max_bytes,
        linger: settings.batch_linger(),
    };
    let rules = settings.routing_rules()?;
    for rule in rules.names() {
        metrics.register_rule(rule);
    }
    let pipeline = Arc::new(Pipeline::new(
        store.clone(),
        dead_letters,
        metrics.clone(),
        status.clone(),
        PipelineOptions {
            policy,
            max_event_bytes: settings.max_event_bytes,
            rules,
            max_in_flight: settings.batch_max_in_flight,
            partitions: maintenance_policy(&settings),
        },
        tokio::runtime::Handle::current(),
    ));
    let consumer =
        consumer::create_consumer(&settings, pipeline).context("cannot create the consumer")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = TcpListener::bind(("0.0.0.0", settings.metrics_port))
        .await
        .with_context(|| format!("cannot listen on METRICS_PORT {}", settings.metrics_port))?;
    let app = endpoints::router(AppState {
        status: status.clone(),
        metrics: metrics.clone(),
        liveness_stall: Duration::from_secs(settings.liveness_stall_secs),
        group_unsteady_limit: Duration::from_secs(settings.group_unsteady_liveness_secs),
    });
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = server_stop.wait_for(|stop| *stop).await;
        };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    });
    if settings.api_port != 0 {
        let (listener, app) = query_api(&settings).await?;
        let mut api_stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = api_stop.wait_for(|stop| *stop).await;
            };
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        });
    }
    tokio::spawn(watch_database(store.clone(), status.clone(), stop_rx.clone()));
    tokio::spawn(maintain_partitions(
        store,
        maintenance_policy(&settings),
        settings.maintenance_interval()?,
        metrics.clone(),
        stop_rx,
    ));

    let shutdown = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let consumer_thread = {
        let shutdown = shutdown.clone();
        let status = status.clone();
        let drain = Duration::from_secs(settings.shutdown_timeout_secs);
        std::thread::Builder::new().name("consumer".into()).spawn(move || {
            let _done = done_tx;
            let _stopped = StoppedOnExit(status);
            consumer::consume(&consumer, &shutdown, drain);
            // Dropping the consumer closes it and leaves the group.
            drop(consumer);
            info!("left the consumer group");
        })?
    };
    info!(
        brokers = %settings.kafka_brokers,
        topics = %settings.kafka_topics,
        group = %settings.kafka_group_id,
        database = %settings.database_url_redacted(),
        metrics_port = settings.metrics_port,
        api_port = settings.api_port,
        "nexus-analytics started"
    );

    let unexpected = tokio::select! {
        _ = shutdown_signal() => false,
        _ = done_rx => true,
    };
    if unexpected {
        error!("the consume loop stopped on its own");
    } else {
        info!("shutdown requested: finishing the batch in hand");
    }
    shutdown.store(true, Ordering::Relaxed);
    let joined = tokio::task::spawn_blocking(move || consumer_thread.join()).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    metrics.shutdown();
    match joined {
        Ok(Ok(())) if !unexpected => {
            info!("shutdown complete");
            Ok(())
        }
        _ => anyhow::bail!("the consume loop failed"),
    }
}

/// The query API's listener and router: a read pool with one connection per admitted request,
/// the token and the limits from `settings`.
async fn query_api(settings: &Settings) -> anyhow::Result<(TcpListener, axum::Router)> {
    let url = settings.api_database_url()?;
    let limits = settings.api_limits();
    let pool = api::read_pool(url, limits.max_concurrent_requests as u32).map_err(|_| {
        anyhow::anyhow!("invalid API_DATABASE_URL or DATABASE_URL for the query API")
    })?;
    let listener = TcpListener::bind(("0.0.0.0", settings.api_port))
        .await
        .with_context(|| format!("cannot listen on API_PORT {}", settings.api_port))?;
    let state = api::ApiState::new(pool.clone(), settings.api_token.clone()).with_limits(limits);
    Ok((listener, api::router(state)))
}

/// Runs only the query API (`nexus-analytics api`): no consumer, no Kafka. Serves `API_PORT`,
/// and on `METRICS_PORT` `/metrics`, `/livez` (the process serves), `/readyz` and `/health`
/// (the database answers pings). Stops on SIGTERM/SIGINT after in-flight requests finish.
pub async fn run_api(settings: Settings) -> anyhow::Result<()> {
    if settings.api_port == 0 {
        return Err(crate::cli::ConfigFailure(crate::config::ConfigError::Invalid {
            setting: "API_PORT".into(),
            reason: "must not be 0 for nexus-analytics api (nothing to serve)".into(),
        })
        .into());
    }
    let status = Arc::new(Status::default());
    status.set_kafka(false, "not used by nexus-analytics api");
    let metrics = Metrics::for_role(status.clone(), crate::observe::metrics::Role::Api)
        .context("cannot set up metrics")?;
    let (api_listener, app) = query_api(&settings).await?;
    let ping_pool = api::read_pool(settings.api_database_url()?, 1)
        .map_err(|_| anyhow::anyhow!("invalid API_DATABASE_URL or DATABASE_URL"))?;
    let ops = TcpListener::bind(("0.0.0.0", settings.metrics_port))
        .await
        .with_context(|| format!("cannot listen on METRICS_PORT {}", settings.metrics_port))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let ops_app = api::probes::router(status.clone(), metrics.clone());
    let ops_stop = stopped(stop_rx.clone());
    let ops_server =
        tokio::spawn(
            async move { axum::serve(ops, ops_app).with_graceful_shutdown(ops_stop).await },
        );
    let api_stop = stopped(stop_rx.clone());
    let api_server = tokio::spawn(async move {
        axum::serve(api_listener, app).with_graceful_shutdown(api_stop).await
    });
    tokio::spawn(api::probes::watch_database(ping_pool, status.clone(), stop_rx.clone()));
    info!(
        database = %crate::config::redact_url(settings.api_database_url()?),
        metrics_port = settings.metrics_port,
        api_port = settings.api_port,
        max_page_bytes = settings.api_max_page_bytes,
        max_concurrent_requests = settings.api_max_concurrent_requests,
        "nexus-analytics api started"
    );
    shutdown_signal().await;
    info!("shutdown requested: finishing the requests in hand");
    let _ = stop_tx.send(true);
    let drain = Duration::from_secs(settings.shutdown_timeout_secs);
    let joined = tokio::time::timeout(drain, async { tokio::join!(api_server, ops_server) }).await;
    metrics.shutdown();
    match joined {
        Ok((api_result, ops_result)) => {
            api_result.context("the API server task failed")?.context("the API server failed")?;
            ops_result
                .context("the metrics server task failed")?
                .context("the metrics server failed")?;
            info!("shutdown complete");
        }
        Err(_) => tracing::warn!("requests still open after SHUTDOWN_TIMEOUT_SECS; closing them"),
    }
    Ok(())
}

/// Marks the consumer as gone when its thread ends, however it ends (panics included).
struct StoppedOnExit(Arc<Status>);

impl Drop for StoppedOnExit {
    fn drop(&mut self) {
        self.0.set_consumer_stopped();
    }
}

async fn watch_database(store: EventStore, status: Arc<Status>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(DB_PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match store.ping(DB_PING_TIMEOUT).await {
            Ok(()) => status.set_database(true, "ping ok"),
            Err(e) => status.set_database(false, e.to_string()),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
