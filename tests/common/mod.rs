//! Test helpers that start real things: a private tansu broker per test, a fresh database per
//! test on the local PostgreSQL (or a private PostgreSQL cluster for outage tests), and the
//! real `nexus-analytics` binary as a child process.
//!
//! Environment (set by `scripts/test`): `TANSU_BIN`, `TEST_DATABASE_URL` (an admin URL that may
//! create databases), `PG_BIN_DIR` (initdb, pg_ctl).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use nexus_analytics::demo::{self, ProduceOptions};

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name unique across concurrently running test processes.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_dir() -> PathBuf {
    let dir = repo_root().join("target").join("test-logs");
    std::fs::create_dir_all(&dir).expect("cannot create target/test-logs");
    dir
}

fn terminate(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    unsafe_signal(child.id(), "TERM");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn unsafe_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

// ------------------------------------------------------------------------------------ broker

/// A private tansu broker (Kafka protocol) on a free loopback port, with in-memory storage.
pub struct Broker {
    child: Option<Child>,
    /// The port clients use (the proxy's, when the broker sits behind one).
    pub port: u16,
    /// The port the broker itself listens on.
    listen_port: u16,
    proxy: Option<Proxy>,
    log: PathBuf,
}

fn tansu_bin() -> PathBuf {
    let bin = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin/tansu"));
    assert!(
        bin.exists(),
        "tansu not found at {} (run scripts/install-tools broker)",
        bin.display()
    );
    bin
}

impl Broker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let log = log_dir().join(format!("{}.log", unique("tansu")));
        let mut broker = Self { child: None, port, listen_port: port, proxy: None, log };
        broker.spawn();
        broker
    }

    /// Starts a broker with extra broker settings, e.g. `("auto.create.topics.enable", "false")`.
    /// tansu has no such settings: only Apache Kafka honours them (until the harness moves to
    /// it, tests using this are ignored).
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        assert!(settings.is_empty(), "tansu takes no broker settings: {settings:?}");
        Self::start()
    }

    /// Starts a broker that clients reach only through a TCP proxy (it advertises the proxy's
    /// address), so a test can cut every connection and refuse new ones while the broker keeps
    /// its topics, offsets and topic ids — a network outage as clients see it.
    pub fn start_behind_proxy() -> Self {
        let listen_port = free_port();
        let port = free_port();
        let log = log_dir().join(format!("{}.log", unique("tansu")));
        let mut broker = Self { child: None, port, listen_port, proxy: None, log };
        broker.spawn();
        broker.proxy = Some(Proxy::start(port, listen_port));
        broker
    }

    fn spawn(&mut self) {
        let listen = format!("tcp://127.0.0.1:{}", self.listen_port);
        let advertised = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(&self.log).expect("tansu log");
        let child = Command::new(tansu_bin())
            .args(["broker", "--listener-url", &listen, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            // tansu reads these as defaults for its own flags.
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env_remove("CLUSTER_ID")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start tansu");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || port_open(self.listen_port)),
            "tansu did not listen"
        );
    }

    /// `host:port` for clients.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a topic with the broker's own CLI.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(tansu_bin())
            .args(["topic", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "cannot create topic {name}");
    }

    /// Cuts every client connection and refuses new ones (needs `start_behind_proxy`).
    ///
    /// Why not kill and restart tansu: its memory storage comes back empty, topics get new ids,
    /// and tansu then answers fetches for the old id with a zero topic id plus a leader-change
    /// tag, on which librdkafka 2.12.1 dereferences a null topic name (SIGSEGV in
    /// `rd_kafka_metadata_update_op`). Real Kafka keeps topic ids across restarts.
    pub fn disconnect(&mut self) {
        self.proxy.as_mut().expect("broker not behind a proxy").stop();
    }

    /// Accepts connections again after `disconnect`.
    pub fn reconnect(&mut self) {
        let proxy = self.proxy.as_mut().expect("broker not behind a proxy");
        proxy.resume();
    }

    /// Kills the broker (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.stop();
        }
        self.kill();
    }
}

// ------------------------------------------------------------------------------------- proxy

/// A TCP forwarder on loopback that can be switched off (listener closed, live connections
/// shut down) and on again on the same port.
pub struct Proxy {
    listen: u16,
    target: u16,
    stop: std::sync::Arc<AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Forwards `127.0.0.1:listen` to `127.0.0.1:target`.
    pub fn start(listen: u16, target: u16) -> Self {
        let mut proxy = Self {
            listen,
            target,
            stop: Default::default(),
            conns: Default::default(),
            acceptor: None,
        };
        proxy.resume();
        proxy
    }

    /// Starts accepting (again).
    pub fn resume(&mut self) {
        if self.acceptor.is_some() {
            return;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.listen)).expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        self.stop = stop.clone();
        let conns = self.conns.clone();
        let target = self.target;
        self.acceptor = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let mut held = conns.lock().unwrap_or_else(|e| e.into_inner());
                for (from, to) in [(&client, &upstream), (&upstream, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
                held.push(client);
                held.push(upstream);
            }
        }));
        assert!(
            wait_until(Duration::from_secs(5), || port_open(self.listen)),
            "proxy did not listen"
        );
    }

    /// Closes the listener and every connection through it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for conn in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Produces `count` demo events (all valid) as fast as possible; returns the number delivered.
pub fn produce_demo(bootstrap: &str, topic: &str, count: u64, rate: u64, seed: u64) -> u64 {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let options =
        ProduceOptions { count, rate, topic: topic.into(), invalid_percent: 0, users: 500, seed };
    let report = demo::produce(config, &options, &AtomicBool::new(false)).expect("produce");
    assert_eq!(report.failed, 0);
    report.delivered
}

/// A record to produce verbatim.
pub struct RawRecord {
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Target partition.
    pub partition: Option<i32>,
}

/// Produces records exactly as given, in order, and waits for delivery.
pub fn produce_raw(bootstrap: &str, topic: &str, records: &[RawRecord]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.max.bytes", "10000000")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        if let Some(v) = &r.value {
            record = record.payload(v);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        producer.send(record).map_err(|(e, _)| e).expect("enqueue");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Reads a topic from the beginning until `expected` records arrived or `timeout` passed.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    out
}

// ---------------------------------------------------------------------------------- database

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("TEST_DATABASE_URL is not a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// A fresh, migrated database on the shared local PostgreSQL, dropped afterwards.
pub struct TestDb {
    admin: String,
    /// Database name.
    pub name: String,
    /// Connection URL for the service.
    pub url: String,
}

impl TestDb {
    /// Creates and migrates a new database.
    pub fn create() -> Self {
        let admin = admin_url();
        let name = unique("na_test");
        run_sql(&admin, &format!("CREATE DATABASE {name}"));
        let url = with_database(&admin, &name);
        migrate(&url);
        Self { admin, name, url }
    }

    /// Runs one statement returning a single integer.
    pub fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.url, sql)
    }

    /// Rows in analytics.events.
    pub fn rows(&self) -> i64 {
        self.scalar("SELECT count(*) FROM analytics.events")
    }

    /// Distinct Kafka coordinates in analytics.events (equal to rows when nothing doubled).
    pub fn distinct_coordinates(&self) -> i64 {
        self.scalar(
            "SELECT count(DISTINCT (kafka_topic, kafka_partition, kafka_offset)) FROM analytics.events",
        )
    }
}

impl TestDb {
    /// Rows whose per-minute count in analytics.event_counts differs from COUNT(*) over
    /// analytics.events grouped the same way (0 when the aggregates are exact).
    pub fn aggregate_mismatches(&self) -> i64 {
        self.scalar(
            r#"SELECT count(*) FROM (
                 SELECT date_trunc('minute', "timestamp", 'UTC') AS bucket, event_type, service, count(*) AS n
                 FROM analytics.events GROUP BY 1, 2, 3
               ) e
               FULL JOIN analytics.event_counts c USING (bucket, event_type, service)
               WHERE e.n IS DISTINCT FROM c.count"#,
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = try_run_sql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Applies the service's migrations to `url`.
pub fn migrate(url: &str) {
    let url = url.to_string();
    runtime().block_on(async move {
        let pool = sqlx::PgPool::connect(&url).await.expect("connect for migrations");
        nexus_analytics::storage::MIGRATOR.run(&pool).await.expect("migrations");
        pool.close().await;
    });
}

fn try_run_sql(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    let (url, sql) = (url.to_string(), sql.to_string());
    runtime().block_on(async move {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&mut conn).await?;
        conn.close().await
    })
}

/// Runs SQL, panicking on error.
pub fn run_sql(url: &str, sql: &str) {
    try_run_sql(url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Runs a query returning one integer.
pub fn scalar(url: &str, sql: &str) -> i64 {
    let (url, sql) = (url.to_string(), sql.to_string());
    runtime().block_on(async move {
        use sqlx::{Connection, Row};
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.try_get::<i64, _>(0).expect("integer result")
    })
}

/// A private PostgreSQL cluster (initdb in a temp dir) that a test may stop and start.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    /// Listening port.
    pub port: u16,
    bin: PathBuf,
}

fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(base)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("no PostgreSQL server binaries (set PG_BIN_DIR)")
}

fn as_postgres_user(program: &Path) -> Command {
    // initdb and postgres refuse to run as root; use the postgres OS user then.
    if std::env::var("USER").as_deref() == Ok("root") || unsafe_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

impl PrivatePostgres {
    /// initdb + start on a free port, with a database `analytics` migrated.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("na-pg").tempdir_in("/tmp").expect("tempdir");
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
        let bin = pg_bin_dir();
        let data = dir.path().join("data");
        let status = as_postgres_user(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let pg = Self { dir, port: free_port(), bin };
        pg.start_server();
        run_sql(&pg.admin_url(), "CREATE DATABASE analytics");
        migrate(&pg.url());
        pg
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// URL of the migrated database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/analytics", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let status = as_postgres_user(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&data)
            .args(["-l"])
            .arg(&log)
            .args(["-o", &opts, "-w", "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl start");
        assert!(status.success(), "pg_ctl start failed");
    }

    /// Stops the server immediately (like a crash: no checkpoint).
    pub fn stop_server(&self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres_user(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }

    /// Runs a query returning one integer against the migrated database.
    pub fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.url(), sql)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop_server();
    }
}

// ----------------------------------------------------------------------------------- service

/// The real binary, started as a child process.
pub struct Service {
    child: Option<Child>,
    /// The metrics/health port.
    pub port: u16,
    /// Where its output goes.
    pub log: PathBuf,
    env: Vec<(String, String)>,
}

impl Service {
    /// Starts `nexus-analytics run` with test-friendly timings plus `env`.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = log_dir().join(format!("{}.log", unique("service")));
        let mut all: Vec<(String, String)> = vec![
            ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
            ("BATCH_LINGER_MS", "50"),
            ("LAG_REFRESH_SECS", "1"),
            ("SHUTDOWN_TIMEOUT_SECS", "10"),
            ("LOG_LEVEL", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        all.push(("METRICS_PORT".into(), port.to_string()));
        if !all.iter().any(|(k, _)| k == "API_PORT") {
            all.push(("API_PORT".into(), free_port().to_string()));
        }
        let mut s = Self { child: None, port, log, env: all };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexus-analytics"));
        cmd.arg("run").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .current_dir(std::env::temp_dir())
            .spawn()
            .expect("cannot start nexus-analytics");
        self.child = Some(child);
    }

    /// Starts a consumer of `topic` in a fresh group, dead letters to `{topic}.dlq`, writing to
    /// `database_url`, plus `extra` settings.
    pub fn consuming(
        bootstrap: &str,
        topic: &str,
        database_url: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let group = unique("group");
        let dlq = format!("{topic}.dlq");
        let mut env = vec![
            ("KAFKA_BROKERS", bootstrap),
            ("KAFKA_TOPICS", topic),
            ("KAFKA_DLQ_TOPIC", dlq.as_str()),
            ("KAFKA_GROUP_ID", group.as_str()),
            ("DATABASE_URL", database_url),
        ];
        env.extend_from_slice(extra);
        Self::start(&env)
    }

    /// The value the service was started with for `key`.
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Starts the same configuration again (after a kill or exit).
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// The service's log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path; returns (status code, body), or None when nothing answers.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    /// Waits for `/readyz` to answer 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let ok = wait_until(timeout, || matches!(self.get("/readyz"), Some((200, _))));
        assert!(
            ok,
            "service not ready in {timeout:?}: {:?}\n{}",
            self.get("/readyz"),
            self.log_text()
        );
    }

    /// The value of one exact series line in `/metrics` (e.g. `analytics_events_stored_total`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        parse_metric(&body, series)
    }

    /// The exit status if the process has ended (for failure messages).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and returns the exit status (None if it did not exit in time).
    pub fn sigterm(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = terminate(&mut child, timeout);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Finds `series value` in a Prometheus text exposition.
pub fn parse_metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// A minimal HTTP/1.0 GET, to keep test dependencies small.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}
