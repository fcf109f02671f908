//! Test helpers that start real things: Apache Kafka (the shared broker with unique topic and
//! group names per test, or a private broker or three-node cluster for fault tests), a fresh
//! database per test on the local PostgreSQL (or a private PostgreSQL cluster for outage
//! tests), and the real `nexus-analytics` binary as a child process.
//!
//! Environment (set by `scripts/test`): `TEST_KAFKA_BROKERS` (the shared broker), `KAFKA_LIBS`
//! (Kafka's jars, read by `scripts/kafka node`), `TEST_DATABASE_URL` (an admin URL that may
//! create databases), `PG_BIN_DIR` (initdb, pg_ctl).

mod fixture;
pub use fixture::Fixture;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use nexus_analytics::cli::produce::{self, ProduceOptions};

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

// ------------------------------------------------------------------------------------ kafka

/// The shared Apache Kafka that `scripts/services up` runs (`TEST_KAFKA_BROKERS`, by default
/// 127.0.0.1:9092). Tests on it isolate themselves by unique topic and group names.
fn shared_bootstrap() -> String {
    let bootstrap =
        std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_string());
    let reachable = bootstrap.split(',').any(|hp| {
        hp.parse::<std::net::SocketAddr>()
            .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
    });
    assert!(
        reachable,
        "no Kafka at TEST_KAFKA_BROKERS={bootstrap} (run the tests with scripts/test, or start \
         the broker with scripts/services up)"
    );
    bootstrap
}

/// One Apache Kafka node (combined broker + controller), started through `scripts/kafka node`,
/// which formats its storage on first use and then execs the JVM, so `child` is the JVM itself.
struct KafkaNode {
    id: i32,
    /// Client listener.
    port: u16,
    /// The node's directory (server.properties, data/): it survives kill and restart.
    dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl KafkaNode {
    fn new(id: i32, port: u16, dir: PathBuf, args: Vec<String>) -> Self {
        let log = log_dir().join(format!("{}.log", unique(&format!("kafka-node{id}"))));
        Self { id, port, dir, args, log, child: None }
    }

    /// Starts the JVM (without waiting for it to serve).
    #[allow(unsafe_code)] // PR_SET_PDEATHSIG in pre_exec, below
    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "node {} is running", self.id);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        writeln!(&log, "==== test harness: node start").expect("log");
        let mut cmd = Command::new(repo_root().join("scripts/kafka"));
        cmd.arg("node").arg("--dir").arg(&self.dir).args(&self.args);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        // SAFETY: prctl is async-signal-safe. The JVM dies with the test process, even when
        // the test runner kills it without running destructors.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("cannot run scripts/kafka node"));
    }

    /// Waits until the node logged "Kafka Server started" (since its last start) and listens.
    fn wait_serving(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let this_run = log.rsplit("==== test harness: node start").next().unwrap_or_default();
            if this_run.contains("Kafka Server started") && port_open(self.port) {
                return;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let tail: Vec<&str> = this_run.lines().rev().take(30).collect();
            assert!(
                exited.is_none(),
                "Kafka node {} exited during startup ({exited:?}); log {}:\n{}",
                self.id,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            assert!(
                Instant::now() < deadline,
                "Kafka node {} not serving after {timeout:?}; log {}",
                self.id,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL and reap: no controlled shutdown, the log is recovered at the next start.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KafkaNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct free loopback ports (the listeners are held until all are chosen).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("no free port")).collect();
    held.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// How long a node gets to start (JVM start on a busy 2-core machine).
const NODE_START: Duration = Duration::from_secs(120);

/// A Kafka broker for one test: the shared broker (`Broker::start`), or a private single-node
/// Apache Kafka on free ports with its own data directory (`Broker::private`,
/// `Broker::start_behind_proxy`) for tests that kill, restart or cut off the broker.
pub struct Broker {
    /// `host:port` clients use (the proxy's, when the broker sits behind one).
    bootstrap: String,
    node: Option<KafkaNode>,
    proxy: Option<Proxy>,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// The shared broker: topics and groups are per test (unique names), so tests run side by
    /// side on one JVM. It cannot be killed or cut off; use `private` for that.
    pub fn start() -> Self {
        Self { bootstrap: shared_bootstrap(), node: None, proxy: None, _dir: None }
    }

    /// A private broker on free ports (a JVM of its own: takes seconds to start).
    pub fn private() -> Self {
        Self::private_with(&[])
    }

    /// A private broker with extra broker settings, e.g. `("auto.create.topics.enable", "true")`.
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        Self::private_with(settings)
    }

    /// A private broker with extra broker settings (`key`, `value`).
    pub fn private_with(settings: &[(&str, &str)]) -> Self {
        let ports = free_ports(2);
        Self::spawn_private(ports[0], ports[0], ports[1], settings)
    }

    /// A private broker that clients reach only through a TCP proxy (it advertises the proxy's
    /// address), so a test can cut every connection and refuse new ones while the broker keeps
    /// running — a network outage as clients see it.
    pub fn start_behind_proxy() -> Self {
        let ports = free_ports(3);
        let (listen_port, port) = (ports[0], ports[1]);
        let mut broker = Self::spawn_private(listen_port, port, ports[2], &[]);
        broker.proxy = Some(Proxy::start(port, listen_port));
        broker
    }

    fn spawn_private(
        listen_port: u16,
        advertised: u16,
        controller: u16,
        settings: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::Builder::new().prefix("na-kafka").tempdir().expect("tempdir");
        let mut args: Vec<String> = vec![
            "--port".into(),
            listen_port.to_string(),
            "--controller-port".into(),
            controller.to_string(),
            "--advertised-port".into(),
            advertised.to_string(),
        ];
        for (k, v) in settings {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        let mut node = KafkaNode::new(1, listen_port, dir.path().join("node1"), args);
        node.spawn();
        node.wait_serving(NODE_START);
        Self {
            bootstrap: format!("127.0.0.1:{advertised}"),
            node: Some(node),
            proxy: None,
            _dir: Some(dir),
        }
    }

    /// `host:port` for clients.
    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// Creates a topic (AdminClient) and waits until every partition has a leader.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        create_topic(&self.bootstrap, name, partitions, 1);
    }

    /// Cuts every client connection and refuses new ones (needs `start_behind_proxy`).
    pub fn disconnect(&mut self) {
        self.proxy.as_mut().expect("broker not behind a proxy").stop();
    }

    /// Accepts connections again after `disconnect`.
    pub fn reconnect(&mut self) {
        let proxy = self.proxy.as_mut().expect("broker not behind a proxy");
        proxy.resume();
    }

    fn node(&mut self) -> &mut KafkaNode {
        self.node.as_mut().expect("the shared broker cannot be killed: use Broker::private()")
    }

    /// Kills the broker process (SIGKILL) and waits for it to exit; its data stays.
    pub fn kill(&mut self) {
        self.node().kill();
    }

    /// Starts the broker again after `kill` without waiting (the caller measures recovery).
    pub fn spawn_again(&mut self) {
        self.node().spawn();
    }

    /// Waits until a restarted broker serves again.
    pub fn wait_serving(&mut self) {
        self.node().wait_serving(NODE_START);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.stop();
        }
    }
}

/// Three combined Apache Kafka nodes (ids 1-3) on free ports: replication factor 3,
/// `min.insync.replicas=2`, a static controller quorum, for failover tests.
pub struct Cluster {
    nodes: Vec<KafkaNode>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts three nodes and waits until each serves.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("na-kafka-cluster").tempdir().expect("tempdir");
        let free = free_ports(6);
        let ports: Vec<(u16, u16)> = (0..3).map(|i| (free[2 * i], free[2 * i + 1])).collect();
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect();
        let voters = voters.join(",");
        let cluster_id = "bmV4dXMtYW5hbHl0aWNzLg"; // any 16 bytes, base64url
        let mut nodes: Vec<KafkaNode> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, controller))| {
                let id = i as i32 + 1;
                let args = vec![
                    "--node-id".into(),
                    id.to_string(),
                    "--port".into(),
                    port.to_string(),
                    "--controller-port".into(),
                    controller.to_string(),
                    "--voters".into(),
                    voters.clone(),
                    "--cluster-id".into(),
                    cluster_id.into(),
                ];
                KafkaNode::new(id, *port, dir.path().join(format!("node{id}")), args)
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_serving(NODE_START);
        }
        Self { nodes, _dir: dir }
    }

    /// All three nodes, for clients' `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        let all: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        all.join(",")
    }

    /// Creates a topic with replication factor 3 whose partitions all prefer node `leader`
    /// (so killing that node moves every partition's leadership).
    pub fn create_topic_led_by(&self, name: &str, partitions: u32, leader: i32) {
        let others: Vec<i32> = (1..=3).filter(|n| *n != leader).collect();
        let replicas = vec![leader, others[0], others[1]];
        create_topic_with(&self.bootstrap(), name, partitions, Some(replicas));
    }

    /// Creates a topic with replication factor 3 (the brokers place the replicas).
    pub fn create_topic(&self, name: &str, partitions: u32) {
        create_topic(&self.bootstrap(), name, partitions, 3);
    }

    /// The node id leading `topic[partition]` now (-1 while there is none).
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        partition_leaders(&self.bootstrap(), topic).get(partition as usize).copied().unwrap_or(-1)
    }

    /// The node id that coordinates `group`, as the group command reports it
    /// (FindCoordinator + DescribeGroups); None while the group is unknown.
    pub fn coordinator(&self, group: &str) -> Option<i32> {
        let out = Command::new(repo_root().join("scripts/kafka"))
            .args(["tool", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"])
            .args([
                "--bootstrap-server",
                &self.bootstrap(),
                "--describe",
                "--state",
                "--group",
                group,
            ])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        // GROUP  COORDINATOR (ID)  ASSIGNMENT-STRATEGY  STATE  #MEMBERS
        // g      127.0.0.1:41234  (2)  ...
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find(|l| l.starts_with(group)).and_then(|l| {
            let open = l.find('(')?;
            let close = l[open..].find(')')? + open;
            l[open + 1..close].trim().parse().ok()
        })
    }

    /// SIGKILLs node `id` (1-3).
    pub fn kill(&mut self, id: i32) {
        self.node(id).kill();
    }

    fn node(&mut self, id: i32) -> &mut KafkaNode {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id 1-3")
    }
}

fn admin(bootstrap: &str) -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client")
}

/// Creates `name` with `replication` replicas per partition and waits until each partition of
/// it has a leader in the metadata (real Kafka creates topics asynchronously).
pub fn create_topic(bootstrap: &str, name: &str, partitions: u32, replication: i32) {
    create_topic_inner(bootstrap, name, partitions, replication, None);
}

fn create_topic_with(bootstrap: &str, name: &str, partitions: u32, replicas: Option<Vec<i32>>) {
    create_topic_inner(bootstrap, name, partitions, 3, replicas);
}

fn create_topic_inner(
    bootstrap: &str,
    name: &str,
    partitions: u32,
    replication: i32,
    replicas: Option<Vec<i32>>,
) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let assignment: Vec<Vec<i32>> = match &replicas {
        Some(r) => (0..partitions).map(|_| r.clone()).collect(),
        None => Vec::new(),
    };
    let slices: Vec<&[i32]> = assignment.iter().map(Vec::as_slice).collect();
    let replication = if replicas.is_some() {
        TopicReplication::Variable(&slices)
    } else {
        TopicReplication::Fixed(replication)
    };
    let topic = NewTopic::new(name, partitions as i32, replication);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let admin = admin(bootstrap);
    let results = runtime()
        .block_on(admin.create_topics([&topic], &options))
        .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
    for r in results {
        if let Err((t, code)) = r {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "create topic {t}: {code}"
            );
        }
    }
    let led = wait_until(Duration::from_secs(30), || {
        let leaders = partition_leaders(bootstrap, name);
        leaders.len() == partitions as usize && leaders.iter().all(|l| *l >= 0)
    });
    assert!(
        led,
        "topic {name}: partitions without a leader: {:?}",
        partition_leaders(bootstrap, name)
    );
}

/// Sum of the high watermarks of `topic` (records produced so far; -1 when unreadable).
pub fn end_offsets(bootstrap: &str, topic: &str) -> i64 {
    let Ok(consumer) =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create::<BaseConsumer>()
    else {
        return -1;
    };
    let partitions = partition_leaders(bootstrap, topic).len() as i32;
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .map(|(_, h)| h)
                .unwrap_or(-1)
        })
        .sum()
}

/// The leader node id of each partition of `topic`, in partition order (-1: none).
pub fn partition_leaders(bootstrap: &str, topic: &str) -> Vec<i32> {
    let consumer: BaseConsumer =
        match ClientConfig::new().set("bootstrap.servers", bootstrap).create() {
            Ok(c) => c,
            Err(_) => return Vec::new(),
        };
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return Vec::new();
    };
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Vec::new();
    };
    if t.error().is_some() {
        return Vec::new();
    }
    let mut parts: Vec<_> = t.partitions().iter().map(|p| (p.id(), p)).collect();
    parts.sort_by_key(|(id, _)| *id);
    parts.into_iter().map(|(_, p)| if p.error().is_some() { -1 } else { p.leader() }).collect()
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
    let report = produce::produce(config, &options, &AtomicBool::new(false)).expect("produce");
    assert_eq!(report.failed, 0);
    report.delivered
}

/// Produces `count` demo events of which about `invalid_percent` % are malformed (dead letters),
/// acks=all and idempotent, so what is delivered is exact; returns the number delivered.
pub fn produce_mixed(
    bootstrap: &str,
    topic: &str,
    count: u64,
    rate: u64,
    seed: u64,
    invalid_percent: u8,
) -> u64 {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let options =
        ProduceOptions { count, rate, topic: topic.into(), invalid_percent, users: 500, seed };
    let report = produce::produce(config, &options, &AtomicBool::new(false)).expect("produce");
    assert_eq!(report.failed, 0, "deliveries failed");
    report.delivered
}

/// How many of the events `produce_mixed(.., count, _, seed, invalid_percent)` sends are valid
/// (the demo stream is a pure function of its seed).
pub fn valid_among(count: u64, seed: u64, invalid_percent: u8) -> u64 {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..count)
        .filter(|_| {
            let (_, payload) = produce::make_event(&mut rng, 500, invalid_percent);
            nexus_analytics::ingest::event::decode(&payload, None, 512 * 1024).is_ok()
        })
        .count() as u64
}

/// Distinct source coordinates (`dlq.source.partition`/`dlq.source.offset` headers) of the
/// dead letters read from `dlq` within `timeout`, stopping early at `expected`; plus the total
/// number of letters read (a bad record redelivered after a crash may be dead-lettered twice).
pub fn dead_letter_sources(
    bootstrap: &str,
    dlq: &str,
    expected: usize,
    timeout: Duration,
) -> (usize, usize) {
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("dlq_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[dlq]).expect("subscribe");
    let mut sources = std::collections::HashSet::new();
    let mut total = 0;
    let deadline = Instant::now() + timeout;
    while sources.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            total += 1;
            let header = |k: &str| {
                m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == k)
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).to_string()))
                })
            };
            sources.insert((header("dlq.source.partition"), header("dlq.source.offset")));
        }
    }
    (sources.len(), total)
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

/// GET `path` on 127.0.0.1:`port`: (status code, body), or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, &[]).map(|r| (r.status, r.body))
}

/// An HTTP answer, read whole.
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body as text.
    pub body: String,
}

/// One request to 127.0.0.1:`port` (reqwest's blocking client; no connection is reused, so a
/// restarted server never meets a stale one); None when nothing answers in time.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<HttpResponse> {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(0)
            .build()
            .expect("an HTTP client")
    });
    let method = reqwest::Method::from_bytes(method.as_bytes()).ok()?;
    let mut request = client.request(method, format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().ok()?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().ok()?;
    Some(HttpResponse { status, headers, body })
}
