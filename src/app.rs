//! Wires the service together: [`App::build`] creates storage, dead letters, pipeline, consumer
//! and listeners; [`App::run_until_stopped`] runs the consumer thread, database health checks,
//! partition maintenance and the HTTP endpoints under one [`TaskTracker`] and stops them with one
//! [`CancellationToken`] (SIGTERM/SIGINT in [`run`]): drain, commit, leave, exit 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::api;
use crate::config::Settings;
use crate::ingest::consumer;
use crate::ingest::dead_letter::DeadLetterSink;
use crate::ingest::pipeline::{Pipeline, PipelineOptions};
use crate::kafka::client_config;
use crate::observe::endpoints::{self, AppState};
use crate::observe::metrics::Metrics;
use crate::observe::status::Status;
use crate::storage::partitions;
use crate::storage::{self, EventStore};

/// How often PostgreSQL is pinged for readiness, and how long a ping may take.
const DB_PING_INTERVAL: Duration = Duration::from_secs(1);
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon maintenance runs again while periods still wait in the default partition.
const WAITING_RERUN: Duration = Duration::from_secs(5);

/// Applies the migrations, creates the upcoming partitions, and returns.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store =
        EventStore::connect_lazy(settings.database.url()?, 1, settings.database.write_timeout)?;
    info!(database = %settings.database.url_redacted(), "applying migrations");
    store.migrate().await?;
    // Partitions only; retention is left to the running service.
    let policy = partitions::Policy { retention_days: None, ..settings.maintenance.policy };
    let report = partitions::run_once(store.pool(), &policy, chrono::Utc::now()).await?;
    info!(created = ?report.created, "migrations applied");
    Ok(())
}

/// Listens on `port` on every interface; the error names the setting.
async fn bind(setting: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("cannot listen on {setting} {port}"))
}

/// Runs partition maintenance at start-up and then every `interval` (sooner after a failure).
async fn maintain_partitions(
    store: EventStore,
    policy: partitions::Policy,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
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
            _ = stop.cancelled() => return,
        }
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets the requests in hand
/// finish. The one way every HTTP server of the service runs.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await
}

/// Spawns `serve` on `tasks`, logging how the server ended.
fn spawn_server(
    tasks: &TaskTracker,
    name: &'static str,
    listener: TcpListener,
    router: axum::Router,
    stop: CancellationToken,
) {
    tasks.spawn(async move {
        if let Err(e) = serve(listener, router, stop).await {
            error!(error = %e, server = name, "HTTP server failed");
        }
    });
}

/// The consuming service, built and bound but not yet running.
///
/// [`App::build`] creates everything that can fail on bad settings or busy ports (storage,
/// producer, consumer, listeners); [`App::run_until_stopped`] starts the tasks — all owned by
/// one [`TaskTracker`] — and stops them in order when the token is cancelled.
pub(crate) struct App {
    settings: Settings,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    store: EventStore,
    consumer: consumer::PipelineConsumer,
    metrics_listener: TcpListener,
    api: Option<(TcpListener, axum::Router)>,
}

impl App {
    /// Builds the service from its settings; nothing runs yet.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let status = Arc::new(Status::default());
        let metrics = Metrics::new(status.clone()).context("cannot set up metrics")?;
        let store = EventStore::connect_lazy(
            settings.database.url()?,
            settings.database.pool_size,
            settings.database.write_timeout,
        )?;
        let dead_letters = DeadLetterSink::new(
            client_config(&settings.kafka),
            &settings.kafka.dlq_topic,
            &settings.kafka.group_id,
        )
        .context("cannot create the dead-letter producer")?;
        let rules = settings.routing.clone();
        for rule in rules.names() {
            metrics.register_rule(rule);
        }
        let pipeline = Arc::new(Pipeline::new(
            store.clone(),
            dead_letters,
            metrics.clone(),
            status.clone(),
            PipelineOptions {
                policy: settings.batch.policy,
                max_event_bytes: settings.batch.max_event_bytes,
                rules,
                max_in_flight: settings.batch.max_in_flight,
                partitions: settings.maintenance.policy,
            },
            tokio::runtime::Handle::current(),
        ));
        let consumer = consumer::create_consumer(&settings.kafka, &settings.observe, pipeline)
            .context("cannot create the consumer")?;
        let metrics_listener = bind("METRICS_PORT", settings.observe.metrics_port).await?;
        let api = if settings.api.port != 0 { Some(query_api(&settings).await?) } else { None };
        Ok(Self { settings, status, metrics, store, consumer, metrics_listener, api })
    }

    /// Runs until `shutdown` is cancelled (or the consume loop ends on its own), then drains:
    /// the consumer finishes the batch in hand, commits and leaves the group while the
    /// endpoints still answer; then the servers let their open requests finish (up to
    /// `SHUTDOWN_TIMEOUT_SECS`) and the background tasks end.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { settings, status, metrics, store, consumer, metrics_listener, api } = self;
        let drain = settings.shutdown_timeout;
        let tasks = TaskTracker::new();
        // Stopped after the consumer has left, so probes and scrapes answer during the drain.
        let services = CancellationToken::new();
        let stop_consuming = shutdown.child_token();

        let router = endpoints::router(AppState {
            status: status.clone(),
            metrics: metrics.clone(),
            liveness_stall: settings.observe.liveness_stall,
            group_unsteady_limit: settings.observe.group_unsteady_limit,
        });
        spawn_server(&tasks, "metrics", metrics_listener, router, services.clone());
        if let Some((listener, router)) = api {
            spawn_server(&tasks, "api", listener, router, services.clone());
        }
        tasks.spawn(watch_database(store.pool().clone(), status.clone(), services.clone()));
        tasks.spawn(maintain_partitions(
            store,
            settings.maintenance.policy,
            settings.maintenance.interval,
            metrics.clone(),
            services.clone(),
        ));

        // A dedicated OS thread (librdkafka runs rebalance callbacks on the polling thread);
        // the tracker owns its join.
        let consumer_thread = {
            let stop = stop_consuming.clone();
            let status = status.clone();
            std::thread::Builder::new().name("consumer".into()).spawn(move || {
                let _stopped = StoppedOnExit(status);
                consumer::consume(&consumer, &stop, drain);
                // Dropping the consumer closes it and leaves the group.
                drop(consumer);
                info!("left the consumer group");
            })?
        };
        let mut consumer_done = tasks.spawn_blocking(move || consumer_thread.join());
        info!(
            brokers = %settings.kafka.brokers,
            topics = %settings.kafka.topics.join(","),
            group = %settings.kafka.group_id,
            database = %settings.database.url_redacted(),
            metrics_port = settings.observe.metrics_port,
            api_port = settings.api.port,
            "nexus-analytics started"
        );

        let (unexpected, joined) = tokio::select! {
            _ = stop_consuming.cancelled() => (false, None),
            joined = &mut consumer_done => (true, Some(joined)),
        };
        if unexpected {
            error!("the consume loop stopped on its own");
        } else {
            info!("shutdown requested: finishing the batch in hand");
        }
        stop_consuming.cancel();
        let joined = match joined {
            Some(joined) => joined,
            None => consumer_done.await,
        };
        services.cancel();
        tasks.close();
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            tracing::warn!("requests still open after SHUTDOWN_TIMEOUT_SECS; closing them");
        }
        metrics.shutdown();
        match joined {
            Ok(Ok(())) if !unexpected => {
                info!("shutdown complete");
                Ok(())
            }
            _ => anyhow::bail!("the consume loop failed"),
        }
    }
}

/// Runs the service until SIGTERM or SIGINT, then drains and returns.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    app.run_until_stopped(cancel_on_signal()).await
}

/// A token cancelled on SIGTERM or SIGINT.
fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        cancel.cancel();
    });
    token
}

/// The query API's listener and router: a read pool with one connection per admitted request,
/// the token and the limits from `settings`.
async fn query_api(settings: &Settings) -> anyhow::Result<(TcpListener, axum::Router)> {
    let url = settings.api.database_url()?;
    let limits = settings.api.limits;
    let pool = api::read_pool(url, limits.max_concurrent_requests as u32).map_err(|_| {
        anyhow::anyhow!("invalid API_DATABASE_URL or DATABASE_URL for the query API")
    })?;
    let listener = bind("API_PORT", settings.api.port).await?;
    let state = api::ApiState::new(pool.clone(), settings.api.token.clone()).with_limits(limits);
    Ok((listener, api::router(state)))
}

/// Runs only the query API (`nexus-analytics api`): no consumer, no Kafka. Serves `API_PORT`,
/// and on `METRICS_PORT` `/metrics`, `/livez` (the process serves), `/readyz` and `/health`
/// (the database answers pings). Stops on SIGTERM/SIGINT after in-flight requests finish.
pub async fn run_api(settings: Settings) -> anyhow::Result<()> {
    if settings.api.port == 0 {
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
    let ping_pool = api::read_pool(settings.api.database_url()?, 1)
        .map_err(|_| anyhow::anyhow!("invalid API_DATABASE_URL or DATABASE_URL"))?;
    let ops = bind("METRICS_PORT", settings.observe.metrics_port).await?;
    let shutdown = cancel_on_signal();
    let tasks = TaskTracker::new();
    let ops_app = api::probes::router(status.clone(), metrics.clone());
    let ops_server = tasks.spawn(serve(ops, ops_app, shutdown.clone()));
    let api_server = tasks.spawn(serve(api_listener, app, shutdown.clone()));
    tasks.spawn(watch_database(ping_pool, status.clone(), shutdown.clone()));
    tasks.close();
    info!(
        database = %crate::config::redact_url(settings.api.database_url()?),
        metrics_port = settings.observe.metrics_port,
        api_port = settings.api.port,
        max_page_bytes = settings.api.limits.max_page_bytes,
        max_concurrent_requests = settings.api.limits.max_concurrent_requests,
        "nexus-analytics api started"
    );
    shutdown.cancelled().await;
    info!("shutdown requested: finishing the requests in hand");
    let drain = settings.shutdown_timeout;
    let joined = tokio::time::timeout(drain, async {
        let servers = tokio::join!(api_server, ops_server);
        tasks.wait().await;
        servers
    })
    .await;
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

/// Pings `pool` every `DB_PING_INTERVAL` and records the outcome for readiness until `stop`
/// (the consumer's pool in `run`, the read pool in `api`).
async fn watch_database(pool: PgPool, status: Arc<Status>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(DB_PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match storage::ping(&pool, DB_PING_TIMEOUT).await {
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
